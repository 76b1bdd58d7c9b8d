//! Transfers: the only way money moves, and the result codes of every way one can be refused.

use crate::ids::{AccountId, TransferId};
use crate::money::Currency;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransferFlags(pub u16);

impl TransferFlags {
    /// This transfer and the next one in the batch commit or fail together.
    pub const LINKED: TransferFlags = TransferFlags(1);
    /// A hold: moves the amount into the pending columns until posted, voided or expired.
    pub const PENDING: TransferFlags = TransferFlags(2);
    /// Posts the hold named by `pending_id`, with `amount` up to the held amount (0 = all of it);
    /// a partial post releases the remainder.
    pub const POST_PENDING: TransferFlags = TransferFlags(4);
    /// Voids the hold named by `pending_id`.
    pub const VOID_PENDING: TransferFlags = TransferFlags(8);
    const KNOWN: u16 = 15;

    pub const fn empty() -> TransferFlags {
        TransferFlags(0)
    }
    pub const fn contains(self, other: TransferFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: TransferFlags) -> TransferFlags {
        TransferFlags(self.0 | other.0)
    }
    pub const fn without(self, other: TransferFlags) -> TransferFlags {
        TransferFlags(self.0 & !other.0)
    }
    pub const fn is_known(self) -> bool {
        self.0 & !Self::KNOWN == 0
    }
    /// A transfer with none of the pending flags: posted at once.
    pub const fn is_plain(self) -> bool {
        self.0 & (Self::PENDING.0 | Self::POST_PENDING.0 | Self::VOID_PENDING.0) == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    pub id: TransferId,
    pub debit_account_id: AccountId,
    pub credit_account_id: AccountId,
    /// Minor units of `currency`.
    pub amount: u64,
    pub currency: Currency,
    /// For `POST_PENDING` and `VOID_PENDING`: the hold being resolved.
    pub pending_id: TransferId,
    /// External reference (a biller's receipt, an agent's reference), opaque to the ledger.
    pub user_data: u128,
    /// For `PENDING`: seconds until the hold voids itself; 0 means it never expires.
    pub timeout_s: u32,
    /// The operation kind (cash-in, P2P, bill payment, fee, ...), opaque to the ledger.
    pub code: u16,
    pub flags: TransferFlags,
}

impl Transfer {
    /// A plain posted transfer of `amount` minor units of AZN; other fields zero.
    pub fn new(id: u128, debit: AccountId, credit: AccountId, amount: u64) -> Transfer {
        Transfer {
            id: TransferId(id),
            debit_account_id: debit,
            credit_account_id: credit,
            amount,
            currency: Currency::Azn,
            pending_id: TransferId(0),
            user_data: 0,
            timeout_s: 0,
            code: 0,
            flags: TransferFlags::empty(),
        }
    }
}

/// Why a transfer was refused, or `Ok`. Listed in the order the ledger checks, so the first that
/// applies is the one returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransferResult {
    Ok = 0,
    /// Another transfer of this linked chain failed, so this one was not applied.
    LinkedEventFailed,
    /// The batch ended with the `LINKED` flag set: the chain never closed.
    LinkedEventChainOpen,
    /// A cross-shard transfer caught in flight by a crash and voided by recovery before any
    /// reply left; a retry with the same id executes afresh.
    Interrupted,
    /// The submission's authorization failed (see `wallet::Authorization`): checked before any
    /// of its transfers, and every transfer of the submission gets the same code.
    AuthWalletNotFound,
    /// The authorizing wallet is blocked (wrong PINs, or by staff).
    AuthWalletBlocked,
    PinNotSet,
    PinInvalid,
    /// The OTP is wrong, expired, used, or was never issued.
    OtpInvalid,
    /// The amount needs an OTP as well as the PIN.
    StepUpRequired,
    IdMustNotBeZero,
    UnknownFlags,
    FlagsAreMutuallyExclusive,
    PendingIdMustBeZero,
    PendingIdMustNotBeZero,
    PendingIdMustBeDifferent,
    TimeoutReservedForPendingTransfer,
    AccountsMustBeDifferent,
    AccountIdMustNotBeZero,
    AmountMustNotBeZero,
    /// A pending, posting or voiding transfer whose accounts live on two shards, or a linked
    /// chain that leaves its first transfer's shard other than through one plain transfer to a
    /// credit account elsewhere (see ARCHITECTURE.md).
    CrossShardMustBePlain,
    /// The id was used before with a different body.
    ExistsWithDifferentBody,
    DebitAccountNotFound,
    CreditAccountNotFound,
    CurrencyMismatch,
    PendingTransferNotFound,
    PendingTransferNotPending,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferHasDifferentAccounts,
    PendingTransferHasDifferentCurrency,
    ExceedsPendingTransferAmount,
    DebitAccountClosed,
    CreditAccountClosed,
    DebitAccountBlocked,
    CreditAccountBlocked,
    OverflowsDebits,
    OverflowsCredits,
    OverflowsTimeout,
    /// The debit account would be debited beyond its credits: insufficient funds.
    ExceedsCredits,
    ExceedsDebits,
    /// The debit wallet is blocked (wrong PINs, or by staff).
    DebitWalletBlocked,
    /// The credit wallet is blocked by staff.
    CreditWalletBlocked,
    /// Above the debit wallet's tier's maximum per operation.
    LimitPerOperation,
    LimitDailyAmount,
    LimitDailyCount,
    LimitMonthlyAmount,
    LimitMonthlyCount,
    /// The credit wallet's balance would exceed its tier's maximum.
    LimitMaxBalance,
}

impl TransferResult {
    /// Every result, indexed by its numeric code.
    pub const ALL: [TransferResult; 50] = [
        TransferResult::Ok,
        TransferResult::LinkedEventFailed,
        TransferResult::LinkedEventChainOpen,
        TransferResult::Interrupted,
        TransferResult::AuthWalletNotFound,
        TransferResult::AuthWalletBlocked,
        TransferResult::PinNotSet,
        TransferResult::PinInvalid,
        TransferResult::OtpInvalid,
        TransferResult::StepUpRequired,
        TransferResult::IdMustNotBeZero,
        TransferResult::UnknownFlags,
        TransferResult::FlagsAreMutuallyExclusive,
        TransferResult::PendingIdMustBeZero,
        TransferResult::PendingIdMustNotBeZero,
        TransferResult::PendingIdMustBeDifferent,
        TransferResult::TimeoutReservedForPendingTransfer,
        TransferResult::AccountsMustBeDifferent,
        TransferResult::AccountIdMustNotBeZero,
        TransferResult::AmountMustNotBeZero,
        TransferResult::CrossShardMustBePlain,
        TransferResult::ExistsWithDifferentBody,
        TransferResult::DebitAccountNotFound,
        TransferResult::CreditAccountNotFound,
        TransferResult::CurrencyMismatch,
        TransferResult::PendingTransferNotFound,
        TransferResult::PendingTransferNotPending,
        TransferResult::PendingTransferAlreadyPosted,
        TransferResult::PendingTransferAlreadyVoided,
        TransferResult::PendingTransferExpired,
        TransferResult::PendingTransferHasDifferentAccounts,
        TransferResult::PendingTransferHasDifferentCurrency,
        TransferResult::ExceedsPendingTransferAmount,
        TransferResult::DebitAccountClosed,
        TransferResult::CreditAccountClosed,
        TransferResult::DebitAccountBlocked,
        TransferResult::CreditAccountBlocked,
        TransferResult::OverflowsDebits,
        TransferResult::OverflowsCredits,
        TransferResult::OverflowsTimeout,
        TransferResult::ExceedsCredits,
        TransferResult::ExceedsDebits,
        TransferResult::DebitWalletBlocked,
        TransferResult::CreditWalletBlocked,
        TransferResult::LimitPerOperation,
        TransferResult::LimitDailyAmount,
        TransferResult::LimitDailyCount,
        TransferResult::LimitMonthlyAmount,
        TransferResult::LimitMonthlyCount,
        TransferResult::LimitMaxBalance,
    ];

    pub fn from_u8(code: u8) -> Option<TransferResult> {
        TransferResult::ALL.get(usize::from(code)).copied()
    }

    pub fn is_ok(self) -> bool {
        self == TransferResult::Ok
    }

    /// A stable snake_case code for APIs and logs.
    pub fn code(self) -> &'static str {
        use TransferResult::*;
        match self {
            Ok => "ok",
            LinkedEventFailed => "linked_event_failed",
            LinkedEventChainOpen => "linked_event_chain_open",
            Interrupted => "interrupted",
            AuthWalletNotFound => "auth_wallet_not_found",
            AuthWalletBlocked => "auth_wallet_blocked",
            PinNotSet => "pin_not_set",
            PinInvalid => "pin_invalid",
            OtpInvalid => "otp_invalid",
            StepUpRequired => "step_up_required",
            IdMustNotBeZero => "id_must_not_be_zero",
            UnknownFlags => "unknown_flags",
            FlagsAreMutuallyExclusive => "flags_are_mutually_exclusive",
            PendingIdMustBeZero => "pending_id_must_be_zero",
            PendingIdMustNotBeZero => "pending_id_must_not_be_zero",
            PendingIdMustBeDifferent => "pending_id_must_be_different",
            TimeoutReservedForPendingTransfer => "timeout_reserved_for_pending_transfer",
            AccountsMustBeDifferent => "accounts_must_be_different",
            AccountIdMustNotBeZero => "account_id_must_not_be_zero",
            AmountMustNotBeZero => "amount_must_not_be_zero",
            CrossShardMustBePlain => "cross_shard_must_be_plain",
            ExistsWithDifferentBody => "exists_with_different_body",
            DebitAccountNotFound => "debit_account_not_found",
            CreditAccountNotFound => "credit_account_not_found",
            CurrencyMismatch => "currency_mismatch",
            PendingTransferNotFound => "pending_transfer_not_found",
            PendingTransferNotPending => "pending_transfer_not_pending",
            PendingTransferHasDifferentAccounts => "pending_transfer_has_different_accounts",
            PendingTransferHasDifferentCurrency => "pending_transfer_has_different_currency",
            PendingTransferAlreadyPosted => "pending_transfer_already_posted",
            PendingTransferAlreadyVoided => "pending_transfer_already_voided",
            PendingTransferExpired => "pending_transfer_expired",
            ExceedsPendingTransferAmount => "exceeds_pending_transfer_amount",
            DebitAccountClosed => "debit_account_closed",
            CreditAccountClosed => "credit_account_closed",
            DebitAccountBlocked => "debit_account_blocked",
            CreditAccountBlocked => "credit_account_blocked",
            OverflowsDebits => "overflows_debits",
            OverflowsCredits => "overflows_credits",
            OverflowsTimeout => "overflows_timeout",
            ExceedsCredits => "exceeds_credits",
            ExceedsDebits => "exceeds_debits",
            DebitWalletBlocked => "debit_wallet_blocked",
            CreditWalletBlocked => "credit_wallet_blocked",
            LimitPerOperation => "limit_per_operation",
            LimitDailyAmount => "limit_daily_amount",
            LimitDailyCount => "limit_daily_count",
            LimitMonthlyAmount => "limit_monthly_amount",
            LimitMonthlyCount => "limit_monthly_count",
            LimitMaxBalance => "limit_max_balance",
        }
    }
}

impl std::fmt::Display for TransferResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}
