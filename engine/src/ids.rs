//! Identifiers: accounts, transfers, shards, and the one function that places an account on a shard.

use std::fmt;

/// An account's 64-bit id, chosen by the caller.
///
/// The top bit marks a *spread* account: a system account (fee income, biller settlement, e-money
/// issuance, clearing) that exists as one sub-account on every shard, so that a transfer between a
/// wallet and a system account never leaves the wallet's shard and a hot system account does not
/// serialise the system. Its balance is the sum of its sub-accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub u64);

const SPREAD_BIT: u64 = 1 << 63;
/// Bits 56..63 of a non-spread id name its class; bits 50..56 a currency; bits 0..50 a subject
/// (an MSISDN's E.164 digits, below 10^15 < 2^50, or an agent's number).
const CLASS_SHIFT: u32 = 56;
const CURRENCY_SHIFT: u32 = 50;
const SUBJECT_MASK: u64 = (1 << CURRENCY_SHIFT) - 1;
const CURRENCY_MASK: u64 = 0x3F << CURRENCY_SHIFT;
/// A wallet's account: subject is the MSISDN.
pub const CLASS_WALLET: u8 = 1;
/// An agent's float account (purpose 0) and commission account (purpose 1): subject is
/// `agent << 1 | purpose`.
pub const CLASS_AGENT: u8 = 2;
/// A merchant's account: subject is the merchant's number.
pub const CLASS_MERCHANT: u8 = 3;

impl AccountId {
    /// A system account spread over every shard; `n` must fit in 63 bits.
    pub const fn spread(n: u64) -> AccountId {
        AccountId(n | SPREAD_BIT)
    }

    pub const fn is_spread(self) -> bool {
        self.0 & SPREAD_BIT != 0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The account of the wallet `msisdn` (E.164 digits as a number) in `currency`. Every
    /// currency's account of one wallet lives on the same shard as the wallet's record.
    pub fn wallet(msisdn: u64, currency: crate::money::Currency) -> AccountId {
        AccountId(
            (u64::from(CLASS_WALLET) << CLASS_SHIFT)
                | (u64::from(currency as u8) << CURRENCY_SHIFT)
                | (msisdn & SUBJECT_MASK),
        )
    }

    /// An agent's float (`commission == false`) or commission account in `currency`; both live
    /// on one shard. `agent` must be below 2^49.
    pub fn agent(agent: u64, commission: bool, currency: crate::money::Currency) -> AccountId {
        let subject = ((agent << 1) | u64::from(commission)) & SUBJECT_MASK;
        AccountId(
            (u64::from(CLASS_AGENT) << CLASS_SHIFT) | (u64::from(currency as u8) << CURRENCY_SHIFT) | subject,
        )
    }

    /// A merchant's account in `currency`. `merchant` must be below 2^50.
    pub fn merchant(merchant: u64, currency: crate::money::Currency) -> AccountId {
        AccountId(
            (u64::from(CLASS_MERCHANT) << CLASS_SHIFT)
                | (u64::from(currency as u8) << CURRENCY_SHIFT)
                | (merchant & SUBJECT_MASK),
        )
    }

    fn class(self) -> u8 {
        if self.is_spread() { 0 } else { u8::try_from(self.0 >> CLASS_SHIFT).unwrap_or(0) }
    }

    /// The MSISDN of a wallet account.
    pub fn wallet_msisdn(self) -> Option<u64> {
        (self.class() == CLASS_WALLET).then_some(self.0 & SUBJECT_MASK)
    }

    /// The agent of an agent's float or commission account (a spread commission account too),
    /// and whether it is the commission account.
    pub fn agent_number(self) -> Option<(u64, bool)> {
        let id = AccountId(self.0 & !SPREAD_BIT);
        (id.class() == CLASS_AGENT).then_some(((id.0 & SUBJECT_MASK) >> 1, id.0 & 1 == 1))
    }

    /// The merchant of a merchant's account.
    pub fn merchant_number(self) -> Option<u64> {
        (self.class() == CLASS_MERCHANT).then_some(self.0 & SUBJECT_MASK)
    }

    /// The currency a wallet or agent account id names.
    pub fn currency(self) -> Option<crate::money::Currency> {
        if matches!(self.class(), CLASS_WALLET | CLASS_AGENT | CLASS_MERCHANT) {
            crate::money::Currency::from_u8(u8::try_from((self.0 & CURRENCY_MASK) >> CURRENCY_SHIFT).ok()?)
        } else {
            None
        }
    }

    /// What places the account on a shard: the id without its currency for wallets and agents
    /// (and without the purpose bit for agents), so that each one's accounts sit together.
    fn placement_key(self) -> u64 {
        match self.class() {
            CLASS_WALLET | CLASS_MERCHANT => self.0 & !CURRENCY_MASK,
            CLASS_AGENT => self.0 & !CURRENCY_MASK & !1,
            _ => self.0,
        }
    }
}

/// The shard that keeps the record of wallet `msisdn` (with all its accounts).
pub fn wallet_shard(msisdn: u64, shard_count: u16) -> ShardId {
    home_shard(AccountId::wallet(msisdn, crate::money::Currency::Azn), shard_count)
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_spread() { write!(f, "s{}", self.0 & !SPREAD_BIT) } else { write!(f, "{}", self.0) }
    }
}

/// A transfer's 128-bit id, chosen by the caller; it is the idempotency key of the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u128);

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// The shard that owns a non-spread account. Stable for a given shard count, which is why the
/// journal records the count and refuses to open with another.
pub fn home_shard(account: AccountId, shard_count: u16) -> ShardId {
    let mixed = account.placement_key().wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    let shard = mixed % u64::from(shard_count.max(1));
    ShardId(u16::try_from(shard).unwrap_or(0))
}

/// Where a transfer between two accounts is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Both accounts (or their spread sub-accounts) live on this shard.
    Local(ShardId),
    /// The debit account's shard coordinates; the credit account lives on another shard.
    Cross { debit: ShardId, credit: ShardId },
}

impl Route {
    pub fn coordinator(self) -> ShardId {
        match self {
            Route::Local(shard) => shard,
            Route::Cross { debit, .. } => debit,
        }
    }
}

pub fn route(debit: AccountId, credit: AccountId, shard_count: u16) -> Route {
    match (debit.is_spread(), credit.is_spread()) {
        (true, true) => Route::Local(home_shard(debit, shard_count)),
        (false, true) => Route::Local(home_shard(debit, shard_count)),
        (true, false) => Route::Local(home_shard(credit, shard_count)),
        (false, false) => {
            let d = home_shard(debit, shard_count);
            let c = home_shard(credit, shard_count);
            if d == c { Route::Local(d) } else { Route::Cross { debit: d, credit: c } }
        }
    }
}

/// `value`'s low and high 64-bit halves.
#[expect(clippy::cast_possible_truncation, reason = "each half is cut to 64 bits on purpose")]
pub(crate) fn halves(value: u128) -> [u64; 2] {
    [value as u64, (value >> 64) as u64]
}

/// The `u128` whose [`halves`] these are.
pub(crate) fn from_halves([low, high]: [u64; 2]) -> u128 {
    u128::from(high) << 64 | u128::from(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_round_trip_and_keep_their_order() {
        for value in [0, 1, u128::from(u64::MAX), u128::from(u64::MAX) + 1, (7 << 64) | 5, u128::MAX] {
            assert_eq!(from_halves(halves(value)), value);
        }
        assert_eq!(halves((7 << 64) | 5), [5, 7]);
    }

    #[test]
    fn agent_and_merchant_numbers_read_back() {
        use crate::money::Currency;
        assert_eq!(AccountId::agent(1001, false, Currency::Azn).agent_number(), Some((1001, false)));
        let commission = AccountId::spread(AccountId::agent(1001, true, Currency::Azn).0);
        assert_eq!(commission.agent_number(), Some((1001, true)));
        assert_eq!(AccountId::merchant(5001, Currency::Azn).merchant_number(), Some(5001));
        assert_eq!(AccountId::merchant(5001, Currency::Azn).agent_number(), None);
        assert_eq!(AccountId::wallet(994_501_234_567, Currency::Azn).merchant_number(), None);
        assert_eq!(AccountId::spread(1).agent_number(), None);
    }

    #[test]
    fn spread_accounts_follow_the_wallet() {
        let fee = AccountId::spread(1);
        for n in 1..1000 {
            let wallet = AccountId(n);
            assert_eq!(route(wallet, fee, 4), Route::Local(home_shard(wallet, 4)));
            assert_eq!(route(fee, wallet, 4), Route::Local(home_shard(wallet, 4)));
        }
    }

    #[test]
    fn a_wallets_accounts_share_a_shard() {
        use crate::money::Currency;
        for msisdn in 994_501_234_500..994_501_234_600 {
            let azn = AccountId::wallet(msisdn, Currency::Azn);
            let usd = AccountId::wallet(msisdn, Currency::Usd);
            assert_ne!(azn, usd);
            assert_eq!(home_shard(azn, 7), home_shard(usd, 7));
            assert_eq!(home_shard(azn, 7), wallet_shard(msisdn, 7));
            assert_eq!(azn.wallet_msisdn(), Some(msisdn));
            assert_eq!(usd.currency(), Some(Currency::Usd));
            let float = AccountId::agent(msisdn % 1000, false, Currency::Azn);
            let commission = AccountId::agent(msisdn % 1000, true, Currency::Azn);
            assert_ne!(float, commission);
            assert_eq!(home_shard(float, 7), home_shard(commission, 7));
            assert_eq!(float.wallet_msisdn(), None);
        }
        assert_eq!(AccountId(5).wallet_msisdn(), None);
        assert_eq!(AccountId::spread(AccountId::wallet(1, Currency::Azn).0).wallet_msisdn(), None);
    }

    #[test]
    fn shards_are_balanced() {
        let mut counts = [0_u32; 4];
        for n in 1..=40_000 {
            counts[usize::from(home_shard(AccountId(n), 4).0)] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }
}
