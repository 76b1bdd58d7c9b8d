//! Wallet policy inside the ledger: the record a shard keeps per MSISDN (tier, PIN tag and
//! failures, blocks, the live OTP), the policy table (KYC tiers and their limits, attempt
//! limits), the outflow counters per wallet account, and the journaled commands that change
//! them. Pure: no IO, no clock (windows come from the batch time the shard passes in).
//!
//! Limits are enforced by [`crate::ledger::Ledger`] in the same step that applies a transfer,
//! so no check-then-act race exists: two parallel debits of one wallet run one after the other
//! on its shard. Secrets arrive here only as keyed tags ([`Tag`]: HMAC-SHA256 under the server
//! secret, computed by the caller); the ledger compares them in constant time and never sees a
//! PIN or a code.
//!
//! These types are journaled and checkpointed as they are (they derive rkyv), unlike transfers
//! and accounts whose wire forms live in [`crate::journal::record`]: they change with the
//! product, and one definition is easier to keep right than two.

use crate::ids::TransferId;
use crate::money::Currency;
use crate::transfer::Transfer;

/// Operation codes (`Transfer::code`) the policy distinguishes. Other codes count as ordinary
/// operations.
pub mod codes {
    pub const P2P: u16 = 1;
    pub const CASH_IN: u16 = 2;
    pub const CASH_OUT: u16 = 3;
    /// The hold behind a cash-by-code, and its posting at redemption.
    pub const CASH_CODE: u16 = 4;
    pub const MERCHANT_PAYMENT: u16 = 5;
    pub const BILL_PAYMENT: u16 = 6;
    /// E-money issued against funds received (agent float top-up, bank deposit).
    pub const ISSUANCE: u16 = 7;
    /// A fee leg: counts toward outflow amounts but not toward operation counts or the
    /// per-operation maximum.
    pub const FEE: u16 = 100;
    /// An agent's commission leg (from fee income to the agent).
    pub const COMMISSION: u16 = 101;
    /// Unwinds a posted transfer, authorised by staff: exempt from every wallet limit.
    pub const REVERSAL: u16 = 200;
    /// A new transfer back to a payer (a merchant refund): an ordinary operation.
    pub const REFUND: u16 = 201;
}

/// Whether a leg with this code is exempt from wallet limits.
pub fn exempt(code: u16) -> bool {
    code == codes::REVERSAL
}

/// Whether a leg with this code is an operation of its own (counted, capped per operation) or a
/// companion leg (fee, commission).
pub fn counts_as_operation(code: u16) -> bool {
    !matches!(code, codes::FEE | codes::COMMISSION)
}

/// An HMAC-SHA256 tag of a secret (PIN, OTP, cash code) under the server secret.
#[derive(Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Tag(pub [u8; 32]);

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tag(..)")
    }
}

impl Tag {
    /// Constant-time comparison: the time taken says nothing about how many bytes matched.
    pub fn ct_eq(&self, other: &Tag) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

/// Limits of one tier in one currency, in minor units. `u64::MAX` / `u32::MAX`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Limits {
    /// Posted + incoming pending credits less posted debits may not exceed this.
    pub max_balance: u64,
    pub max_per_operation: u64,
    pub daily_amount: u64,
    pub daily_count: u32,
    pub monthly_amount: u64,
    pub monthly_count: u32,
}

impl Limits {
    pub const NONE: Limits = Limits {
        max_balance: u64::MAX,
        max_per_operation: u64::MAX,
        daily_amount: u64::MAX,
        daily_count: u32::MAX,
        monthly_amount: u64::MAX,
        monthly_count: u32::MAX,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Tier {
    pub code: u8,
    pub name: String,
    /// Per currency (`Currency as u8`); a currency not listed has no limits in this tier.
    pub limits: Vec<(u8, Limits)>,
}

impl Tier {
    pub fn limits(&self, currency: Currency) -> Limits {
        self.limits.iter().find(|(c, _)| *c == currency as u8).map_or(Limits::NONE, |(_, l)| *l)
    }
}

/// The tier table and attempt limits every shard enforces. Journaled whole when it changes, so
/// that replay checks each transfer against the policy it met the first time.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Policy {
    pub tiers: Vec<Tier>,
    /// Days and months are counted in this offset from UTC (Baku: +4 h, no daylight saving).
    pub utc_offset_s: i32,
    /// Wrong PINs in a row that block the wallet.
    pub pin_attempts_max: u8,
    pub otp_attempts_max: u8,
    /// OTPs one MSISDN may be sent within `otp_send_window_s`.
    pub otp_sends_max: u8,
    pub otp_send_window_s: u32,
    /// Wrong codes that void a cash-by-code.
    pub code_attempts_max: u8,
}

const AZN: u8 = Currency::Azn as u8;

fn azn(manat: u64) -> u64 {
    manat * 100
}

impl Default for Policy {
    /// Tiers for an e-money issuer, in AZN: an unidentified wallet holds little and moves
    /// little; identification at a post office raises both.
    fn default() -> Policy {
        let tier =
            |code, name: &str, limits| Tier { code, name: name.to_owned(), limits: vec![(AZN, limits)] };
        Policy {
            tiers: vec![
                tier(
                    0,
                    "unidentified",
                    Limits {
                        max_balance: azn(300),
                        max_per_operation: azn(200),
                        daily_amount: azn(300),
                        daily_count: 20,
                        monthly_amount: azn(1_000),
                        monthly_count: 100,
                    },
                ),
                tier(
                    1,
                    "identified",
                    Limits {
                        max_balance: azn(5_000),
                        max_per_operation: azn(3_000),
                        daily_amount: azn(5_000),
                        daily_count: 100,
                        monthly_amount: azn(30_000),
                        monthly_count: 1_000,
                    },
                ),
                tier(
                    2,
                    "enhanced",
                    Limits {
                        max_balance: azn(50_000),
                        max_per_operation: azn(20_000),
                        daily_amount: azn(50_000),
                        daily_count: 500,
                        monthly_amount: azn(300_000),
                        monthly_count: 5_000,
                    },
                ),
            ],
            utc_offset_s: 4 * 3600,
            pin_attempts_max: 3,
            otp_attempts_max: 5,
            otp_sends_max: 3,
            otp_send_window_s: 600,
            code_attempts_max: 3,
        }
    }
}

impl Policy {
    pub fn tier(&self, code: u8) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.code == code)
    }

    /// The limits of tier `code` in `currency`. A wallet whose tier is no longer in the policy
    /// (a configuration that dropped it) gets the strictest of every tier's limits, field by
    /// field: it fails closed, never open.
    pub fn limits(&self, code: u8, currency: Currency) -> Limits {
        if let Some(tier) = self.tier(code) {
            return tier.limits(currency);
        }
        self.tiers
            .iter()
            .map(|t| t.limits(currency))
            .reduce(|a, b| Limits {
                max_balance: a.max_balance.min(b.max_balance),
                max_per_operation: a.max_per_operation.min(b.max_per_operation),
                daily_amount: a.daily_amount.min(b.daily_amount),
                daily_count: a.daily_count.min(b.daily_count),
                monthly_amount: a.monthly_amount.min(b.monthly_amount),
                monthly_count: a.monthly_count.min(b.monthly_count),
            })
            .unwrap_or(Limits::NONE)
    }

    /// The day and month (counted from the epoch, in the policy's offset) that `now_ns` falls in.
    pub fn windows(&self, now_ns: u64) -> Windows {
        let local = i64::try_from(now_ns / 1_000_000_000).unwrap_or(i64::MAX) + i64::from(self.utc_offset_s);
        let day = local.div_euclid(86_400);
        let (year, month, _) = civil_from_days(day);
        Windows {
            day: u32::try_from(day.max(0)).unwrap_or(u32::MAX),
            month: u32::try_from((year * 12 + i64::from(month) - 1).max(0)).unwrap_or(u32::MAX),
        }
    }
}

/// A day and a month index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub day: u32,
    pub month: u32,
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day count from
/// 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, u32::try_from(month).unwrap_or(1), u32::try_from(day).unwrap_or(1))
}

/// Money and operations that left one wallet account in the current day and month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Outflow {
    pub day: u32,
    pub day_amount: u64,
    pub day_count: u32,
    pub month: u32,
    pub month_amount: u64,
    pub month_count: u32,
}

/// Which limit refused a debit or credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    PerOperation,
    DailyAmount,
    DailyCount,
    MonthlyAmount,
    MonthlyCount,
    MaxBalance,
}

impl Outflow {
    /// The counters as they stand in `windows` (a new day or month starts from zero).
    pub fn current(&self, windows: Windows) -> Outflow {
        let mut out = *self;
        if out.month != windows.month {
            out.month = windows.month;
            out.month_amount = 0;
            out.month_count = 0;
        }
        if out.day != windows.day {
            out.day = windows.day;
            out.day_amount = 0;
            out.day_count = 0;
        }
        out
    }

    /// Checks a debit leg against `limits` and returns the counters with it added.
    pub fn add(
        &self,
        windows: Windows,
        limits: &Limits,
        amount: u64,
        operation: bool,
    ) -> Result<Outflow, LimitHit> {
        let mut out = self.current(windows);
        if operation && amount > limits.max_per_operation {
            return Err(LimitHit::PerOperation);
        }
        let count = u32::from(operation);
        let day_amount = out.day_amount.saturating_add(amount);
        if day_amount > limits.daily_amount {
            return Err(LimitHit::DailyAmount);
        }
        let day_count = out.day_count.saturating_add(count);
        if day_count > limits.daily_count {
            return Err(LimitHit::DailyCount);
        }
        let month_amount = out.month_amount.saturating_add(amount);
        if month_amount > limits.monthly_amount {
            return Err(LimitHit::MonthlyAmount);
        }
        let month_count = out.month_count.saturating_add(count);
        if month_count > limits.monthly_count {
            return Err(LimitHit::MonthlyCount);
        }
        out.day_amount = day_amount;
        out.day_count = day_count;
        out.month_amount = month_amount;
        out.month_count = month_count;
        Ok(out)
    }

    /// Gives back an amount (and an operation) counted at `counted_at` when its hold is voided,
    /// expired or partly posted: only within the same day or month, since a past window's
    /// counters are gone.
    pub fn release(&mut self, counted_at: Windows, amount: u64, operation: bool) {
        let count = u32::from(operation);
        if self.day == counted_at.day {
            self.day_amount = self.day_amount.saturating_sub(amount);
            self.day_count = self.day_count.saturating_sub(count);
        }
        if self.month == counted_at.month {
            self.month_amount = self.month_amount.saturating_sub(amount);
            self.month_count = self.month_count.saturating_sub(count);
        }
    }
}

/// Who made a change: the customer, staff, an agent, or the system itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Actor {
    pub kind: u8,
    pub id: u64,
}

impl Actor {
    pub const CUSTOMER: u8 = 1;
    pub const STAFF: u8 = 2;
    pub const AGENT: u8 = 3;
    pub const SYSTEM: u8 = 4;

    pub fn customer(msisdn: u64) -> Actor {
        Actor { kind: Actor::CUSTOMER, id: msisdn }
    }
    pub fn staff(id: u64) -> Actor {
        Actor { kind: Actor::STAFF, id }
    }
    pub fn agent(id: u64) -> Actor {
        Actor { kind: Actor::AGENT, id }
    }
    pub fn system() -> Actor {
        Actor { kind: Actor::SYSTEM, id: 0 }
    }
}

/// Registration data recorded at identification (personal data: journaled and indexed, never
/// logged).
#[derive(Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Profile {
    pub document_type: String,
    pub document_number: String,
    pub first_name: String,
    pub last_name: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Profile(..)")
    }
}

/// The live one-time password of a wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OtpState {
    pub tag: Tag,
    pub expires_at: u64,
    pub attempts: u8,
}

/// A wallet (MSISDN) as checkpoints hold it and lookups answer it. In memory a shard keeps it
/// split: a [`WalletCore`] per wallet, and an [`OtpSide`] only for the wallets that were ever
/// sent an OTP.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalletState {
    pub msisdn: u64,
    pub tier: u8,
    pub flags: u8,
    pub language: u8,
    pub pin: Option<Tag>,
    pub pin_failures: u8,
    pub created_at: u64,
    pub otp: Option<OtpState>,
    /// When the last OTPs were sent (ns), oldest first, at most `otp_sends_max`.
    pub otp_sent: Vec<u64>,
    /// Wrong cash-by-code redemptions since the wallet's codes were last cancelled for them.
    pub code_failures: u8,
}

/// What a shard keeps in memory for every wallet: [`WalletState`] without its key and its OTP
/// state. 48 bytes instead of 136: a wallet that never asked for an OTP (most of those on
/// USSD, which confirms with the PIN) carries no room for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletCore {
    pub pin: Option<Tag>,
    pub created_at: u64,
    pub tier: u8,
    pub flags: u8,
    pub language: u8,
    pub pin_failures: u8,
    pub code_failures: u8,
}

/// A wallet's OTP state, kept beside its [`WalletCore`] once it was first sent an OTP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtpSide {
    pub otp: Option<OtpState>,
    /// When the last OTPs were sent (ns), oldest first, at most `otp_sends_max`.
    pub sent: Vec<u64>,
}

impl WalletCore {
    /// The core of `state`, and its OTP side if it has any OTP state.
    pub fn split(state: WalletState) -> (WalletCore, Option<OtpSide>) {
        let WalletState {
            msisdn: _,
            tier,
            flags,
            language,
            pin,
            pin_failures,
            created_at,
            otp,
            otp_sent,
            code_failures,
        } = state;
        let core = WalletCore { pin, created_at, tier, flags, language, pin_failures, code_failures };
        let side = (otp.is_some() || !otp_sent.is_empty()).then_some(OtpSide { otp, sent: otp_sent });
        (core, side)
    }

    /// The whole state of wallet `msisdn` from its core and OTP side.
    pub fn state(&self, msisdn: u64, side: Option<&OtpSide>) -> WalletState {
        WalletState {
            msisdn,
            tier: self.tier,
            flags: self.flags,
            language: self.language,
            pin: self.pin,
            pin_failures: self.pin_failures,
            created_at: self.created_at,
            otp: side.and_then(|side| side.otp),
            otp_sent: side.map(|side| side.sent.clone()).unwrap_or_default(),
            code_failures: self.code_failures,
        }
    }

    pub fn blocked(&self) -> bool {
        self.flags & (WalletState::PIN_BLOCKED | WalletState::STAFF_BLOCKED) != 0
    }
}

impl WalletState {
    /// Blocked after too many wrong PINs: no debits until staff unblock it.
    pub const PIN_BLOCKED: u8 = 1;
    /// Blocked by staff (fraud, a court order): no debits and no credits.
    pub const STAFF_BLOCKED: u8 = 2;

    pub fn blocked(&self) -> bool {
        self.flags & (Self::PIN_BLOCKED | Self::STAFF_BLOCKED) != 0
    }
}

/// How a customer proved an operation: the step-up evidence journaled with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Evidence {
    pub msisdn: u64,
    /// The first transfer of the operation it authorised.
    pub transfer: u128,
    /// [`Evidence::PIN`], [`Evidence::OTP`] or both.
    pub methods: u8,
    /// The channel code (USSD, API, app, agent terminal), opaque here.
    pub channel: u8,
}

impl Evidence {
    pub const PIN: u8 = 1;
    pub const OTP: u8 = 2;
}

/// A journaled change of wallet state. Replay applies it again; the ledger's own decisions
/// (a wrong PIN, an OTP used) are journaled as their effects, so replay never needs a secret.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WalletCommand {
    Register {
        msisdn: u64,
        tier: u8,
        pin: Option<crate::wallet::Tag>,
        language: u8,
        actor: Actor,
    },
    SetTier {
        msisdn: u64,
        tier: u8,
        actor: Actor,
    },
    /// Registration data recorded or changed; the ledger keeps none of it.
    Profile {
        msisdn: u64,
        profile: Profile,
        actor: Actor,
    },
    SetPin {
        msisdn: u64,
        pin: crate::wallet::Tag,
        actor: Actor,
    },
    PinFailed {
        msisdn: u64,
    },
    PinReset {
        msisdn: u64,
    },
    Block {
        msisdn: u64,
        flag: u8,
        actor: Actor,
    },
    Unblock {
        msisdn: u64,
        actor: Actor,
    },
    SetLanguage {
        msisdn: u64,
        language: u8,
    },
    /// An OTP was issued. The code is derived from `nonce` under the server secret by whoever
    /// sends it; the journal holds neither the code nor the secret.
    OtpIssued {
        msisdn: u64,
        nonce: u128,
        tag: crate::wallet::Tag,
        expires_at: u64,
    },
    OtpFailed {
        msisdn: u64,
    },
    OtpUsed {
        msisdn: u64,
    },
    /// A redemption or cancellation named a cash code of this wallet that is not one of its live
    /// holds (or the wrong amount): counted toward [`Policy::code_attempts_max`].
    CodeFailed {
        msisdn: u64,
    },
    /// The wallet's live cash codes were cancelled after too many wrong guesses (their voids
    /// follow as transfers); the count starts again.
    CodesCancelled {
        msisdn: u64,
    },
    Evidence(crate::wallet::Evidence),
    /// Staff authorised the operation whose first transfer is `transfer` (a reversal).
    StaffAuthorized {
        actor: Actor,
        transfer: u128,
    },
    SetPolicy(Box<Policy>),
}

impl WalletCommand {
    pub fn msisdn(&self) -> Option<u64> {
        use WalletCommand::*;
        match self {
            Register { msisdn, .. }
            | SetTier { msisdn, .. }
            | Profile { msisdn, .. }
            | SetPin { msisdn, .. }
            | PinFailed { msisdn }
            | PinReset { msisdn }
            | Block { msisdn, .. }
            | Unblock { msisdn, .. }
            | SetLanguage { msisdn, .. }
            | OtpIssued { msisdn, .. }
            | OtpFailed { msisdn }
            | OtpUsed { msisdn }
            | CodeFailed { msisdn }
            | CodesCancelled { msisdn } => Some(*msisdn),
            Evidence(e) => Some(e.msisdn),
            StaffAuthorized { .. } | SetPolicy(_) => None,
        }
    }
}

/// A live request about one wallet, answered by its shard.
#[derive(Debug, Clone)]
pub enum WalletRequest {
    /// Creates the wallet record and one account per currency, together.
    Register {
        msisdn: u64,
        currencies: Vec<Currency>,
        tier: u8,
        pin: Option<Tag>,
        language: u8,
        actor: Actor,
    },
    /// Records identification data and raises (or sets) the tier.
    Identify {
        msisdn: u64,
        tier: u8,
        profile: Profile,
        actor: Actor,
    },
    UpdateProfile {
        msisdn: u64,
        profile: Profile,
        actor: Actor,
    },
    /// Sets a PIN; `old` must match the current one if one is set.
    SetPin {
        msisdn: u64,
        old: Option<Tag>,
        new: Tag,
        actor: Actor,
    },
    VerifyPin {
        msisdn: u64,
        pin: Tag,
    },
    Block {
        msisdn: u64,
        actor: Actor,
    },
    Unblock {
        msisdn: u64,
        actor: Actor,
    },
    SetLanguage {
        msisdn: u64,
        language: u8,
    },
    IssueOtp {
        msisdn: u64,
        nonce: u128,
        tag: Tag,
        ttl_s: u32,
    },
    VerifyOtp {
        msisdn: u64,
        tag: Tag,
    },
    Get {
        msisdn: u64,
    },
    /// Redeems (`cancel` false: posts) or cancels (voids) the cash-by-code hold `hold` of this
    /// wallet, with its fee hold if it has one. `hold` is derived from the code, so a wrong
    /// code names no hold of the wallet: that, or an amount other than the held one, counts as
    /// a wrong guess, and at the policy's limit every live code of the wallet is cancelled.
    /// `resolve` is the post (or void) of the principal: id, code and user data chosen by the
    /// caller, accounts and amount taken from the hold. `then` follows it in the same chain
    /// (the redeeming agent's commission).
    ResolveCode {
        msisdn: u64,
        hold: TransferId,
        amount: u64,
        cancel: bool,
        resolve: Transfer,
        then: Option<Transfer>,
    },
}

impl WalletRequest {
    pub fn msisdn(&self) -> u64 {
        use WalletRequest::*;
        match self {
            Register { msisdn, .. }
            | Identify { msisdn, .. }
            | UpdateProfile { msisdn, .. }
            | SetPin { msisdn, .. }
            | VerifyPin { msisdn, .. }
            | Block { msisdn, .. }
            | Unblock { msisdn, .. }
            | SetLanguage { msisdn, .. }
            | IssueOtp { msisdn, .. }
            | VerifyOtp { msisdn, .. }
            | ResolveCode { msisdn, .. }
            | Get { msisdn } => *msisdn,
        }
    }
}

/// Why a wallet request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalletRefusal {
    #[error("no wallet for this number")]
    NotFound,
    #[error("a wallet for this number exists")]
    Exists,
    #[error("unknown tier")]
    UnknownTier,
    #[error("the wallet is blocked")]
    Blocked,
    #[error("no PIN is set")]
    PinNotSet,
    #[error("wrong PIN; {remaining} attempts remain")]
    PinInvalid { remaining: u8 },
    #[error("too many OTPs requested; retry in {retry_after_s} s")]
    OtpRateLimited { retry_after_s: u32 },
    #[error("no OTP is pending")]
    OtpNotIssued,
    #[error("the OTP has expired")]
    OtpExpired,
    #[error("wrong OTP; {remaining} attempts remain")]
    OtpInvalid { remaining: u8 },
    /// Said the same way for a wrong code, a wrong amount and a code already used, so that a
    /// guesser learns nothing but "no".
    #[error("no such code for this number and amount; {remaining} attempts remain")]
    CodeInvalid { remaining: u8 },
    #[error("the code has expired")]
    CodeExpired,
    #[error("the operation's transfers do not all live with the wallet")]
    NotLocal,
}

impl WalletRefusal {
    pub fn code(self) -> &'static str {
        match self {
            WalletRefusal::NotFound => "wallet_not_found",
            WalletRefusal::Exists => "wallet_exists",
            WalletRefusal::UnknownTier => "unknown_tier",
            WalletRefusal::Blocked => "wallet_blocked",
            WalletRefusal::PinNotSet => "pin_not_set",
            WalletRefusal::PinInvalid { .. } => "pin_invalid",
            WalletRefusal::OtpRateLimited { .. } => "otp_rate_limited",
            WalletRefusal::OtpNotIssued => "otp_not_issued",
            WalletRefusal::OtpExpired => "otp_expired",
            WalletRefusal::OtpInvalid { .. } => "otp_invalid",
            WalletRefusal::CodeInvalid { .. } => "code_invalid",
            WalletRefusal::CodeExpired => "code_expired",
            WalletRefusal::NotLocal => "not_local",
        }
    }
}

/// A wallet as a lookup sees it: its state and, per account, its counters and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletView {
    pub state: WalletState,
    pub accounts: Vec<WalletAccountView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletAccountView {
    pub account: crate::account::Account,
    pub limits: Limits,
    /// The counters in the current windows.
    pub outflow: Outflow,
}

impl WalletAccountView {
    /// How much more the wallet may receive before its maximum balance.
    pub fn room_to_receive(&self) -> u64 {
        let a = &self.account;
        let held = u128::from(a.credits_posted) + u128::from(a.credits_pending);
        let balance = held.saturating_sub(u128::from(a.debits_posted));
        u64::try_from(u128::from(self.limits.max_balance).saturating_sub(balance)).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalletReply {
    Done,
    Found(Box<WalletView>),
    Refused(WalletRefusal),
    /// The results of the transfers a request submitted (a code's resolution), in order.
    Transfers(Vec<crate::transfer::TransferResult>),
}

/// Checks made before a submission's transfers are applied, on the wallet's shard in the same
/// step: the customer's PIN and/or OTP, and the amount above which an OTP is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization {
    pub msisdn: u64,
    pub pin: Option<Tag>,
    pub otp: Option<Tag>,
    pub channel: u8,
    /// Debits of this wallet above this amount (minor units) need the OTP; `u64::MAX`: never.
    pub step_up_above: u64,
}

/// Who vouches for a submission: the customer (checked on the wallet's shard) or staff
/// (journaled with the transfers, for operations only staff may do, such as a reversal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    Customer(Authorization),
    Staff(Actor),
}

/// The id of leg `leg` (1: fee, 2: commission, …) of operation `op`, derived so that a retried
/// operation names the same legs. Leg 0 is the operation's own id. Never zero.
pub fn leg_id(op: u128, leg: u8) -> TransferId {
    if leg == 0 {
        return TransferId(op);
    }
    let mixed = op.rotate_left(64) ^ u128::from(leg).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    TransferId(mixed | 1)
}

/// Legs of a cash-by-code hold: the principal is the hold itself (leg 0), its fee leg 1.
pub const CODE_FEE_LEG: u8 = 1;
/// The void of a hold cancelled after too many wrong guesses is leg 9 of the held transfer.
pub const CODE_CANCEL_LEG: u8 = 9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wallet_splits_into_core_and_otp_side_and_back() {
        assert!(std::mem::size_of::<WalletCore>() <= 48, "{}", std::mem::size_of::<WalletCore>());
        let plain = WalletState {
            msisdn: 994_501_234_567,
            tier: 2,
            flags: WalletState::PIN_BLOCKED,
            language: 1,
            pin: Some(Tag([7; 32])),
            pin_failures: 3,
            created_at: 1_700_000_000_000_000_000,
            otp: None,
            otp_sent: Vec::new(),
            code_failures: 1,
        };
        let (core, side) = WalletCore::split(plain.clone());
        assert!(side.is_none(), "a wallet never sent an OTP keeps no side");
        assert!(core.blocked());
        assert_eq!(core.state(plain.msisdn, None), plain);
        let otp = OtpState { tag: Tag([9; 32]), expires_at: 5, attempts: 2 };
        for (otp, sent) in [(Some(otp), vec![1, 2]), (None, vec![3]), (Some(otp), Vec::new())] {
            let whole = WalletState { otp, otp_sent: sent, ..plain.clone() };
            let (core, side) = WalletCore::split(whole.clone());
            let side = side.expect("an OTP state has a side");
            assert_eq!(core.state(whole.msisdn, Some(&side)), whole);
        }
    }

    const NS: u64 = 1_000_000_000;

    #[test]
    fn windows_follow_the_local_calendar() {
        let policy = Policy::default();
        // 2026-11-23 19:59:59 UTC is 23:59:59 in Baku; one second later it is the 24th.
        let before = 1_795_464_000 - 1;
        let a = policy.windows(before * NS);
        let b = policy.windows((before + 1) * NS);
        assert_eq!(b.day, a.day + 1);
        assert_eq!(a.month, b.month);
        // 2026-11-30 20:00 UTC is December 1st in Baku.
        let december = policy.windows(1_796_068_800 * NS);
        assert_eq!(december.month, a.month + 1);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
    }

    #[test]
    fn a_tier_missing_from_the_policy_gets_the_strictest_limits_field_by_field() {
        let policy = Policy::default();
        let azn = Currency::Azn;
        assert_eq!(policy.limits(1, azn), policy.tier(1).expect("tier 1").limits(azn));
        let strictest = policy.limits(200, azn);
        for tier in &policy.tiers {
            let l = tier.limits(azn);
            assert!(
                strictest.max_balance <= l.max_balance && strictest.max_per_operation <= l.max_per_operation
            );
            assert!(strictest.daily_amount <= l.daily_amount && strictest.daily_count <= l.daily_count);
            assert!(
                strictest.monthly_amount <= l.monthly_amount && strictest.monthly_count <= l.monthly_count
            );
        }
        let fields = |l: Limits| {
            [
                l.max_balance,
                l.max_per_operation,
                l.daily_amount,
                u64::from(l.daily_count),
                l.monthly_amount,
                u64::from(l.monthly_count),
            ]
        };
        // Each field is one tier's own value: the strictest is not made up.
        for (n, value) in fields(strictest).into_iter().enumerate() {
            assert!(policy.tiers.iter().any(|t| fields(t.limits(azn))[n] == value));
        }
        assert_ne!(strictest, Limits::NONE);
        let empty = Policy { tiers: Vec::new(), ..Policy::default() };
        assert_eq!(empty.limits(0, azn), Limits::NONE);
    }

    #[test]
    fn outflow_limits_at_the_boundary() {
        let limits = Limits {
            max_balance: 1_000,
            max_per_operation: 500,
            daily_amount: 600,
            daily_count: 2,
            monthly_amount: 700,
            monthly_count: 3,
        };
        let w = Windows { day: 10, month: 1 };
        let zero = Outflow::default();
        assert_eq!(zero.add(w, &limits, 501, true), Err(LimitHit::PerOperation));
        let one = zero.add(w, &limits, 500, true).expect("exactly the per-operation limit");
        assert_eq!(one.add(w, &limits, 101, true), Err(LimitHit::DailyAmount));
        let two = one.add(w, &limits, 100, true).expect("exactly the daily amount");
        assert_eq!(two.add(w, &limits, 1, false), Err(LimitHit::DailyAmount));
        // A fee leg counts toward amounts only, never the per-operation cap.
        let next_day = Windows { day: 11, month: 1 };
        let fee = two.add(next_day, &limits, 100, false).expect("fee within the month");
        assert_eq!(fee.day_count, 0);
        assert_eq!(fee.add(next_day, &limits, 1, true), Err(LimitHit::MonthlyAmount));
        let counted = Limits { monthly_amount: u64::MAX, ..limits };
        let three = fee.add(next_day, &counted, 1, true).expect("third operation of the month");
        assert_eq!(three.add(next_day, &counted, 1, true), Err(LimitHit::MonthlyCount));
    }

    #[test]
    fn release_only_within_the_window() {
        let limits = Limits::NONE;
        let w = Windows { day: 10, month: 1 };
        let mut o = Outflow::default().add(w, &limits, 300, true).expect("no limits");
        o.release(w, 300, true);
        assert_eq!((o.day_amount, o.day_count, o.month_amount, o.month_count), (0, 0, 0, 0));
        let mut o = Outflow::default().add(w, &limits, 300, true).expect("no limits");
        let later = o.current(Windows { day: 11, month: 1 });
        let mut later = later;
        later.release(w, 300, true);
        assert_eq!((later.day_amount, later.month_amount), (0, 0));
        o.release(Windows { day: 9, month: 0 }, 300, true);
        assert_eq!(o.day_amount, 300);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let tag = Tag([7; 32]);
        assert_eq!(format!("{tag:?}"), "Tag(..)");
        let profile = Profile { document_number: "AZE1234567".into(), ..Profile::default() };
        assert!(!format!("{profile:?}").contains("1234567"));
        assert!(tag.ct_eq(&Tag([7; 32])));
        assert!(!tag.ct_eq(&Tag([8; 32])));
    }
}
