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
    let mixed = account.0.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
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

#[cfg(test)]
mod tests {
    use super::*;

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
