//! Accounts: balances in four columns (TigerBeetle's model) and the flags that constrain them.

use crate::ids::AccountId;
use crate::money::Currency;

/// What an account is for. A code, not behaviour: behaviour comes from [`AccountFlags`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKind(pub u16);

impl AccountKind {
    pub const WALLET: AccountKind = AccountKind(1);
    pub const AGENT_FLOAT: AccountKind = AccountKind(2);
    pub const BILLER_SETTLEMENT: AccountKind = AccountKind(3);
    pub const FEE_INCOME: AccountKind = AccountKind(4);
    pub const CARD_SETTLEMENT: AccountKind = AccountKind(5);
    pub const EMONEY_ISSUANCE: AccountKind = AccountKind(6);
    pub const ATM_CLEARING: AccountKind = AccountKind(7);
    pub const SUSPENSE: AccountKind = AccountKind(8);
    /// What the issuer owes an agent in commissions (a spread account per agent).
    pub const AGENT_COMMISSION: AccountKind = AccountKind(9);
    pub const KIOSK_FLOAT: AccountKind = AccountKind(10);
    pub const POST_OFFICE_FLOAT: AccountKind = AccountKind(11);
    pub const ATM_NETWORK_FLOAT: AccountKind = AccountKind(12);
    /// A merchant's receipts from QR and other payments.
    pub const MERCHANT: AccountKind = AccountKind(13);
}

/// Constraints on an account, as bits so that they journal compactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccountFlags(pub u16);

impl AccountFlags {
    /// Debits (posted + pending) must not exceed posted credits: wallets and agent floats.
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: AccountFlags = AccountFlags(1);
    /// Credits (posted + pending) must not exceed posted debits.
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: AccountFlags = AccountFlags(2);
    /// No new transfer may touch the account (holds already placed may still be posted or voided).
    pub const BLOCKED: AccountFlags = AccountFlags(4);
    /// Closed for good.
    pub const CLOSED: AccountFlags = AccountFlags(8);
    const KNOWN: u16 = 15;

    pub const fn empty() -> AccountFlags {
        AccountFlags(0)
    }
    pub const fn contains(self, other: AccountFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: AccountFlags) -> AccountFlags {
        AccountFlags(self.0 | other.0)
    }
    pub const fn is_known(self) -> bool {
        self.0 & !Self::KNOWN == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub kind: AccountKind,
    pub flags: AccountFlags,
    pub debits_pending: u64,
    pub debits_posted: u64,
    pub credits_pending: u64,
    pub credits_posted: u64,
    /// Nanoseconds since the Unix epoch when the account was created.
    pub timestamp: u64,
}

impl Account {
    /// A fresh account with zero balances; the engine sets `timestamp` when it is created.
    pub fn new(id: AccountId, currency: Currency, kind: AccountKind, flags: AccountFlags) -> Self {
        Account {
            id,
            currency,
            kind,
            flags,
            debits_pending: 0,
            debits_posted: 0,
            credits_pending: 0,
            credits_posted: 0,
            timestamp: 0,
        }
    }

    /// Posted credits minus posted debits: what a wallet holds. Wider than `u64` so it never wraps.
    pub fn balance_posted(&self) -> i128 {
        i128::from(self.credits_posted) - i128::from(self.debits_posted)
    }

    /// What a wallet may still spend: posted credits minus posted and pending debits.
    pub fn balance_available(&self) -> i128 {
        i128::from(self.credits_posted) - i128::from(self.debits_posted) - i128::from(self.debits_pending)
    }

    /// Adds `other`'s balances into `self`: how a spread account's sub-accounts are summed.
    pub fn absorb(&mut self, other: &Account) {
        self.debits_pending = self.debits_pending.saturating_add(other.debits_pending);
        self.debits_posted = self.debits_posted.saturating_add(other.debits_posted);
        self.credits_pending = self.credits_pending.saturating_add(other.credits_pending);
        self.credits_posted = self.credits_posted.saturating_add(other.credits_posted);
    }
}

/// The result of creating an account, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CreateAccountResult {
    Ok = 0,
    IdMustNotBeZero,
    FlagsAreMutuallyExclusive,
    UnknownFlags,
    /// A spread account may not carry a balance constraint: each shard would enforce it alone.
    SpreadAccountCannotLimitBalance,
    /// The id exists with the same currency, kind and flags: creating it again changes nothing.
    Exists,
    ExistsWithDifferentFields,
}
