//! The wallet part of Qepik's TOML configuration: `[wallet]` (attempt limits, OTP and step-up,
//! the day/month offset, `[[wallet.tiers]]` with their KYC limits), `[[tariffs]]` (customer
//! fees) and `[[commissions]]` (agent commissions). `qepik.example.toml` at the repository root
//! is the annotated file; it holds exactly the defaults.
//!
//! [`WalletSettings::from_toml`] reads the text and checks it; [`WalletSettings::apply_to`]
//! (or [`WalletSettings::policy`] and friends) turns it into the engine's types. Every key is
//! optional and takes its default, except inside a tier or tariff entry, where a forgotten limit
//! must not silently mean "none". Bad input is a [`ConfigError`] naming the key path
//! (`wallet.tiers[1].daily_amount`) and saying what is wrong; no input panics.
//!
//! Amounts are decimal text in the currency's major unit (`"12.50"`, never a TOML float);
//! percentages are decimal text too and become basis points exactly. The file's serde structs
//! stay private to this module: the engine's types derive no serde traits.

use std::fmt;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::domain::{DomainConfig, OTP_TTL_MAX_S};
use crate::money::{Amount, Currency, ParseAmountError, ParseCurrencyError, Zero};
use crate::tariff::{Tariff, TariffError, TariffTable};
use crate::wallet::{Limits, Policy, Tier, codes};

/// Wrong PINs, OTPs or cash codes in a row allowed at most: more would make guessing a short
/// secret practical.
pub const ATTEMPTS_MAX: u8 = 10;
/// OTPs sent to one number per window at most (each wallet keeps one timestamp per send).
pub const OTP_SENDS_MAX: u8 = 10;
/// The OTP send window is at most a day.
pub const OTP_SEND_WINDOW_S_MAX: u32 = 86_400;
/// A cash-by-code holds the customer's money at most a week.
pub const CASH_CODE_TTL_S_MAX: u32 = 7 * 86_400;
/// Staff may reverse an operation at most a year (366 days) after it was posted.
pub const REVERSAL_WINDOW_S_MAX: u64 = 366 * 86_400;
/// A tier's name is at most this many characters.
pub const TIER_NAME_LEN_MAX: usize = 32;
/// Offsets from UTC accepted for the day/month windows: -12:00 to +14:00.
const UTC_OFFSET_S_MIN: i32 = -12 * 3_600;
const UTC_OFFSET_S_MAX: i32 = 14 * 3_600;

/// Names a tariff's `operation` may use instead of the code number. The fee, commission and
/// reversal legs are not operations a tariff can price.
pub const OPERATIONS: [(&str, u16); 8] = [
    ("p2p", codes::P2P),
    ("cash_in", codes::CASH_IN),
    ("cash_out", codes::CASH_OUT),
    ("cash_code", codes::CASH_CODE),
    ("merchant_payment", codes::MERCHANT_PAYMENT),
    ("bill_payment", codes::BILL_PAYMENT),
    ("issuance", codes::ISSUANCE),
    ("refund", codes::REFUND),
];

/// The keyword for "no limit" in a tier (amounts and counts).
const UNLIMITED: &str = "unlimited";
/// The keyword for "never ask for the OTP" in `step_up_above`.
const NEVER: &str = "never";

/// The wallet settings, checked and in the engine's units (minor units, seconds, basis points).
#[derive(Debug, Clone, PartialEq)]
pub struct WalletSettings {
    /// Days and months for the outflow limits are counted in this offset from UTC.
    pub utc_offset_s: i32,
    /// Debits above this amount (AZN minor units) need an OTP as well as the PIN; `u64::MAX`:
    /// never.
    pub step_up_above: u64,
    /// How long an OTP stays valid, `1..=OTP_TTL_MAX_S`.
    pub otp_ttl_s: u32,
    /// Wrong PINs in a row that block the wallet.
    pub pin_attempts_max: u8,
    /// Wrong guesses of one OTP before it is used up.
    pub otp_attempts_max: u8,
    /// OTPs one number may be sent within `otp_send_window_s`.
    pub otp_sends_max: u8,
    /// The window `otp_sends_max` counts in.
    pub otp_send_window_s: u32,
    /// Wrong cash-by-code guesses before the wallet's live codes are cancelled.
    pub code_attempts_max: u8,
    /// How long a cash-by-code stays redeemable.
    pub cash_code_ttl_s: u32,
    /// How long after posting staff may reverse an operation.
    pub reversal_window_s: u64,
    /// KYC tiers in file order; the first is the one self-registration gives.
    pub tiers: Vec<Tier>,
    /// Customer fees per operation code.
    pub tariffs: TariffTable,
    /// Agent commissions per operation code.
    pub commissions: TariffTable,
}

impl Default for WalletSettings {
    /// Today's engine defaults: [`Policy::default`] and the values of [`DomainConfig::new`]; no
    /// fees and no commissions.
    fn default() -> WalletSettings {
        let policy = Policy::default();
        WalletSettings {
            utc_offset_s: policy.utc_offset_s,
            step_up_above: 500 * 100,
            otp_ttl_s: OTP_TTL_MAX_S,
            pin_attempts_max: policy.pin_attempts_max,
            otp_attempts_max: policy.otp_attempts_max,
            otp_sends_max: policy.otp_sends_max,
            otp_send_window_s: policy.otp_send_window_s,
            code_attempts_max: policy.code_attempts_max,
            cash_code_ttl_s: 30 * 60,
            reversal_window_s: 7 * 86_400,
            tiers: policy.tiers,
            tariffs: TariffTable::new(),
            commissions: TariffTable::new(),
        }
    }
}

impl WalletSettings {
    /// Reads the `[wallet]`, `[[tariffs]]` and `[[commissions]]` sections; any other top-level
    /// key is an error. Omitted sections and keys take their defaults; `wallet.tiers`, when
    /// given, replaces the default tiers whole.
    pub fn from_toml(text: &str) -> Result<WalletSettings, ConfigError> {
        let file = parse_file(text)?;
        let mut settings = WalletSettings::default();
        file.wallet.apply(&mut settings)?;
        if let Some(rows) = &file.tariffs {
            settings.tariffs = tariff_table("tariffs", rows)?;
        }
        if let Some(rows) = &file.commissions {
            settings.commissions = tariff_table("commissions", rows)?;
        }
        Ok(settings)
    }

    /// The policy every shard enforces (journaled by `Domain::open`).
    pub fn policy(&self) -> Policy {
        Policy {
            tiers: self.tiers.clone(),
            utc_offset_s: self.utc_offset_s,
            pin_attempts_max: self.pin_attempts_max,
            otp_attempts_max: self.otp_attempts_max,
            otp_sends_max: self.otp_sends_max,
            otp_send_window_s: self.otp_send_window_s,
            code_attempts_max: self.code_attempts_max,
        }
    }

    /// Customer fees per operation code.
    pub fn tariffs(&self) -> TariffTable {
        self.tariffs.clone()
    }

    /// Agent commissions per operation code.
    pub fn commissions(&self) -> TariffTable {
        self.commissions.clone()
    }

    /// Sets every field of `config` these settings cover; the secret, numbering plan and
    /// currencies are left as they are.
    pub fn apply_to(&self, config: &mut DomainConfig) {
        config.policy = self.policy();
        config.tariffs = self.tariffs();
        config.commissions = self.commissions();
        config.step_up_above = self.step_up_above;
        config.otp_ttl_s = self.otp_ttl_s;
        config.cash_code_ttl_s = self.cash_code_ttl_s;
        config.reversal_window_s = self.reversal_window_s;
    }
}

/// A configuration value that cannot be used, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key path, such as `wallet.tiers[1].daily_amount`; empty for the file as a whole (a
    /// TOML syntax error, whose problem then names the line).
    pub path: String,
    /// What is wrong there.
    pub problem: ConfigProblem,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// What is wrong with a value. Echoed input is cut to 40 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// Not TOML, an unknown or missing key, or a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    #[error("{text:?} is not a usable amount: {error}")]
    Amount { text: String, error: ParseAmountError },
    #[error("0 would refuse every operation; write \"unlimited\" for no limit")]
    ZeroLimit,
    #[error("{value} is outside {min}..={max}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    #[error("{text:?} is not an offset from UTC such as \"+04:00\", between -12:00 and +14:00")]
    UtcOffset { text: String },
    #[error(transparent)]
    Currency(#[from] ParseCurrencyError),
    #[error("{text:?} is not a decimal percentage such as \"0.5\"")]
    PercentNotANumber { text: String },
    #[error("{text:?} is negative")]
    PercentNegative { text: String },
    #[error("{text:?} is more precise than a basis point (0.01 %)")]
    PercentTooPrecise { text: String },
    #[error("{text:?} is above 100 %")]
    PercentTooHigh { text: String },
    #[error("unknown operation {name:?}: expected a code number or one of {}", operation_names())]
    UnknownOperation { name: String },
    #[error("code {code} is a fee, commission or reversal leg, not an operation a tariff can price")]
    NotAnOperation { code: u16 },
    #[error("this operation already has an entry at {first}")]
    DuplicateOperation { first: String },
    #[error("0 would mean no maximum at all; give a positive maximum, or omit `max` for none")]
    TariffMaxZero,
    #[error("{value} is above the maximum {max}")]
    TariffAboveMax { value: String, max: String },
    #[error(transparent)]
    Tariff(#[from] TariffError),
    #[error("at least one tier is needed (the first is the one self-registration gives)")]
    NoTiers,
    #[error("a tier's name is 1..={TIER_NAME_LEN_MAX} characters")]
    TierName,
    #[error("tier {code} already has {currency} limits at {first}")]
    DuplicateTier { code: u8, currency: Currency, first: String },
    #[error("tier {code} is named {name:?} at {first}; its entries must agree")]
    TierNameDiffers { code: u8, name: String, first: String },
    #[error("{name:?} is already the name of tier {code}")]
    TierNameTaken { name: String, code: u8 },
    /// A limit that the other one makes unreachable (or the reverse): per operation above the
    /// day, the day above the month, per operation above the maximum balance.
    #[error("{value} is above {other} ({other_value}), so it could never be reached")]
    LimitAboveLimit { value: String, other: &'static str, other_value: String },
}

fn operation_names() -> String {
    OPERATIONS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

fn error(path: impl Into<String>, problem: ConfigProblem) -> ConfigError {
    ConfigError { path: path.into(), problem }
}

/// Input echoed in an error, cut short: a file may hold anything.
fn echo(text: &str) -> String {
    text.chars().take(40).collect()
}

// ---------------------------------------------------------------------------------------------
// The file as serde sees it. Values whose meaning needs checking stay text here and are
// interpreted below, where the key path is known.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of sections")]
struct File {
    #[serde(default)]
    wallet: WalletSection,
    tariffs: Option<Vec<TariffRow>>,
    commissions: Option<Vec<TariffRow>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of wallet settings")]
struct WalletSection {
    utc_offset: Option<String>,
    step_up_above: Option<DecimalText>,
    otp_ttl_s: Option<u32>,
    pin_attempts: Option<u8>,
    otp_attempts: Option<u8>,
    otp_sends: Option<u8>,
    otp_send_window_s: Option<u32>,
    code_attempts: Option<u8>,
    cash_code_ttl_s: Option<u32>,
    reversal_window_s: Option<u64>,
    tiers: Option<Vec<TierRow>>,
}

/// One tier's limits in one currency. A tier with limits in several currencies has one entry
/// per currency, with the same code and name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table with a tier's code, name and limits")]
struct TierRow {
    code: u8,
    name: String,
    currency: Option<String>,
    max_balance: DecimalText,
    max_per_operation: DecimalText,
    daily_amount: DecimalText,
    daily_count: Count,
    monthly_amount: DecimalText,
    monthly_count: Count,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table with an operation and its fee rule")]
struct TariffRow {
    operation: Operation,
    fixed: Option<DecimalText>,
    percent: Option<PercentText>,
    min: Option<DecimalText>,
    max: Option<DecimalText>,
}

/// Decimal text: a TOML string. Floats are refused because they are inexact; integers because
/// `5` reads as minor units to some and as manat to others. Percentages also take integers.
#[derive(Debug)]
struct DecimalText(String);

impl<'de> Deserialize<'de> for DecimalText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<DecimalText, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = DecimalText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("decimal text in quotes, such as \"12.50\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_owned()))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// A count limit: a non-negative integer, or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Number(i64),
    Unlimited,
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        struct CountVisitor;
        impl Visitor<'_> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number such as 100, or \"unlimited\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
                if v.trim() == UNLIMITED {
                    Ok(Count::Unlimited)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(&echo(v)), &self))
                }
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

/// A tariff's operation: a name from [`OPERATIONS`] or a code number.
#[derive(Debug)]
enum Operation {
    Name(String),
    Code(i64),
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Operation, D::Error> {
        struct OperationVisitor;
        impl Visitor<'_> for OperationVisitor {
            type Value = Operation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an operation name such as \"p2p\", or a code number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Operation, E> {
                Ok(Operation::Code(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Operation, E> {
                Ok(Operation::Code(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Operation, E> {
                Ok(Operation::Name(v.to_owned()))
            }
        }
        deserializer.deserialize_any(OperationVisitor)
    }
}

/// A percentage: decimal text, or a whole number of percent.
#[derive(Debug)]
struct PercentText(String);

impl<'de> Deserialize<'de> for PercentText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PercentText, D::Error> {
        struct PercentVisitor;
        impl Visitor<'_> for PercentVisitor {
            type Value = PercentText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage in quotes, such as \"0.5\", or a whole number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PercentText, E> {
                Ok(PercentText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PercentText, E> {
                Ok(PercentText(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PercentText, E> {
                Ok(PercentText(v.to_owned()))
            }
        }
        deserializer.deserialize_any(PercentVisitor)
    }
}

/// TOML to the file structs, with the key path of any serde error.
fn parse_file(text: &str) -> Result<File, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| syntax_error(text, &e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            syntax_error(text, &inner)
        } else {
            error(path, ConfigProblem::Toml(inner.message().to_owned()))
        }
    })
}

/// An error without a key path: located by line and column instead.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = match e.span() {
        Some(span) => {
            let before = text.as_bytes().get(..span.start).unwrap_or(text.as_bytes());
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_owned(),
    };
    error("", ConfigProblem::Toml(message))
}

impl WalletSection {
    fn apply(&self, s: &mut WalletSettings) -> Result<(), ConfigError> {
        if let Some(text) = &self.utc_offset {
            s.utc_offset_s = utc_offset_s(text)
                .ok_or_else(|| error("wallet.utc_offset", ConfigProblem::UtcOffset { text: echo(text) }))?;
        }
        if let Some(DecimalText(text)) = &self.step_up_above {
            s.step_up_above = if text.trim() == NEVER {
                u64::MAX
            } else {
                amount("wallet.step_up_above", text, Currency::Azn, Zero::Allowed)?
            };
        }
        set(&mut s.otp_ttl_s, self.otp_ttl_s, "wallet.otp_ttl_s", OTP_TTL_MAX_S.into())?;
        set(&mut s.pin_attempts_max, self.pin_attempts, "wallet.pin_attempts", ATTEMPTS_MAX.into())?;
        set(&mut s.otp_attempts_max, self.otp_attempts, "wallet.otp_attempts", ATTEMPTS_MAX.into())?;
        set(&mut s.otp_sends_max, self.otp_sends, "wallet.otp_sends", OTP_SENDS_MAX.into())?;
        let window = OTP_SEND_WINDOW_S_MAX.into();
        set(&mut s.otp_send_window_s, self.otp_send_window_s, "wallet.otp_send_window_s", window)?;
        set(&mut s.code_attempts_max, self.code_attempts, "wallet.code_attempts", ATTEMPTS_MAX.into())?;
        let ttl = CASH_CODE_TTL_S_MAX.into();
        set(&mut s.cash_code_ttl_s, self.cash_code_ttl_s, "wallet.cash_code_ttl_s", ttl)?;
        let window = REVERSAL_WINDOW_S_MAX;
        set(&mut s.reversal_window_s, self.reversal_window_s, "wallet.reversal_window_s", window)?;
        if let Some(rows) = &self.tiers {
            s.tiers = tiers(rows)?;
        }
        Ok(())
    }
}

/// Sets `field` to `value` if given, which must be `1..=max`.
fn set<T: Copy + Into<u64>>(
    field: &mut T,
    value: Option<T>,
    path: &str,
    max: u64,
) -> Result<(), ConfigError> {
    let Some(value) = value else {
        return Ok(());
    };
    let wide: u64 = value.into();
    if wide == 0 || wide > max {
        let value = i64::try_from(wide).unwrap_or(i64::MAX);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        return Err(error(path, ConfigProblem::OutOfRange { value, min: 1, max }));
    }
    *field = value;
    Ok(())
}

/// `+HH:MM` or `-HH:MM` within -12:00..=+14:00, in seconds.
fn utc_offset_s(text: &str) -> Option<i32> {
    let &[sign, h1, h2, b':', m1, m2] = text.trim().as_bytes() else {
        return None;
    };
    let sign = match sign {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digit = |b: u8| b.is_ascii_digit().then(|| i32::from(b - b'0'));
    let (hours, minutes) = (digit(h1)? * 10 + digit(h2)?, digit(m1)? * 10 + digit(m2)?);
    let offset = sign * (hours * 3_600 + minutes * 60);
    (minutes < 60 && (UTC_OFFSET_S_MIN..=UTC_OFFSET_S_MAX).contains(&offset)).then_some(offset)
}

/// Decimal text in `currency` to minor units.
fn amount(path: &str, text: &str, currency: Currency, zero: Zero) -> Result<u64, ConfigError> {
    let problem = |error| ConfigProblem::Amount { text: echo(text), error };
    let parsed = Amount::parse(text, currency, zero).map_err(|e| error(path, problem(e)))?;
    u64::try_from(parsed.minor()).map_err(|_| error(path, problem(ParseAmountError::Negative)))
}

/// A tier limit in minor units: positive, or `"unlimited"` (`u64::MAX`).
fn amount_limit(path: &str, text: &str, currency: Currency) -> Result<u64, ConfigError> {
    if text.trim() == UNLIMITED {
        return Ok(u64::MAX);
    }
    match amount(path, text, currency, Zero::Rejected) {
        Err(ConfigError { problem: ConfigProblem::Amount { error: ParseAmountError::Zero, .. }, .. }) => {
            Err(error(path, ConfigProblem::ZeroLimit))
        }
        other => other,
    }
}

/// A count limit: `1..=u32::MAX`, or `"unlimited"` (`u32::MAX`).
fn count_limit(path: &str, count: &Count) -> Result<u32, ConfigError> {
    match *count {
        Count::Unlimited => Ok(u32::MAX),
        Count::Number(0) => Err(error(path, ConfigProblem::ZeroLimit)),
        Count::Number(n) => u32::try_from(n)
            .map_err(|_| error(path, ConfigProblem::OutOfRange { value: n, min: 1, max: u32::MAX.into() })),
    }
}

/// How a limit value reads in an error: `300.00 AZN` for an amount, `100` for a count.
fn show(value: u64, currency: Option<Currency>) -> String {
    match currency {
        Some(currency) => {
            format!("{} {currency}", Decimal::from_i128_with_scale(i128::from(value), currency.decimals()))
        }
        None => value.to_string(),
    }
}

/// The tier entries, merged by code in file order, each checked for sense.
fn tiers(rows: &[TierRow]) -> Result<Vec<Tier>, ConfigError> {
    if rows.is_empty() {
        return Err(error("wallet.tiers", ConfigProblem::NoTiers));
    }
    let mut tiers: Vec<Tier> = Vec::new();
    // The entry each tier was first named in, and each (tier, currency)'s entry.
    let mut first_row: Vec<usize> = Vec::new();
    let mut seen: Vec<(u8, Currency, usize)> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let path = format!("wallet.tiers[{index}]");
        let currency = match &row.currency {
            Some(text) => {
                text.parse::<Currency>().map_err(|e| error(format!("{path}.currency"), e.into()))?
            }
            None => Currency::Azn,
        };
        let name = tier_name(&format!("{path}.name"), &row.name)?;
        let name = name.as_str();
        let limits = row.limits(&path, currency)?;
        if let Some((_, _, first)) = seen.iter().find(|(c, cur, _)| *c == row.code && *cur == currency) {
            let first = format!("wallet.tiers[{first}]");
            return Err(error(path, ConfigProblem::DuplicateTier { code: row.code, currency, first }));
        }
        seen.push((row.code, currency, index));
        match tiers.iter().position(|t| t.code == row.code) {
            Some(at) => {
                let tier = &mut tiers[at];
                if tier.name != name {
                    let (name, first) = (tier.name.clone(), format!("wallet.tiers[{}]", first_row[at]));
                    let problem = ConfigProblem::TierNameDiffers { code: row.code, name, first };
                    return Err(error(format!("{path}.name"), problem));
                }
                tier.limits.push((currency as u8, limits));
            }
            None => {
                if let Some(other) = tiers.iter().find(|t| t.name == name) {
                    let problem = ConfigProblem::TierNameTaken { name: name.to_owned(), code: other.code };
                    return Err(error(format!("{path}.name"), problem));
                }
                tiers.push(Tier {
                    code: row.code,
                    name: name.to_owned(),
                    limits: vec![(currency as u8, limits)],
                });
                first_row.push(index);
            }
        }
    }
    Ok(tiers)
}

impl TierRow {
    fn limits(&self, path: &str, currency: Currency) -> Result<Limits, ConfigError> {
        let text = LimitsText {
            max_balance: &self.max_balance.0,
            max_per_operation: &self.max_per_operation.0,
            daily_amount: &self.daily_amount.0,
            daily_count: self.daily_count,
            monthly_amount: &self.monthly_amount.0,
            monthly_count: self.monthly_count,
        };
        limits(path, &text, currency)
    }
}

/// One tier's limits in one currency as text, the way the configuration file and the admin API
/// both receive them: amounts as decimal text or `"unlimited"`, counts as numbers or
/// [`Count::Unlimited`]. [`limits`] checks them the same way for both.
#[derive(Debug, Clone, Copy)]
pub struct LimitsText<'a> {
    pub max_balance: &'a str,
    pub max_per_operation: &'a str,
    pub daily_amount: &'a str,
    pub daily_count: Count,
    pub monthly_amount: &'a str,
    pub monthly_count: Count,
}

/// Checks one tier's limits in `currency`; errors name `path.key` (`path` may be empty).
pub fn limits(path: &str, text: &LimitsText<'_>, currency: Currency) -> Result<Limits, ConfigError> {
    let key = |name: &str| if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
    let limits = Limits {
        max_balance: amount_limit(&key("max_balance"), text.max_balance, currency)?,
        max_per_operation: amount_limit(&key("max_per_operation"), text.max_per_operation, currency)?,
        daily_amount: amount_limit(&key("daily_amount"), text.daily_amount, currency)?,
        daily_count: count_limit(&key("daily_count"), &text.daily_count)?,
        monthly_amount: amount_limit(&key("monthly_amount"), text.monthly_amount, currency)?,
        monthly_count: count_limit(&key("monthly_count"), &text.monthly_count)?,
    };
    let l = &limits;
    let (money, count) = (Some(currency), None);
    // (key, value, the limit it may not exceed, its value, the currency): a finite value
    // above its bound can never be reached. An unlimited value leaves the bound in charge.
    let pairs = [
        ("max_per_operation", l.max_per_operation, "daily_amount", l.daily_amount, money),
        ("max_per_operation", l.max_per_operation, "max_balance", l.max_balance, money),
        ("daily_amount", l.daily_amount, "monthly_amount", l.monthly_amount, money),
        ("daily_count", l.daily_count.into(), "monthly_count", l.monthly_count.into(), count),
    ];
    for (name, value, other, bound, currency) in pairs {
        let unlimited = if currency.is_some() { u64::MAX } else { u32::MAX.into() };
        if value != unlimited && value > bound {
            let (value, other_value) = (show(value, currency), show(bound, currency));
            return Err(error(key(name), ConfigProblem::LimitAboveLimit { value, other, other_value }));
        }
    }
    Ok(limits)
}

/// A tier's name, trimmed: 1..=[`TIER_NAME_LEN_MAX`] characters.
pub fn tier_name(path: &str, name: &str) -> Result<String, ConfigError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > TIER_NAME_LEN_MAX || name.chars().any(char::is_control) {
        return Err(error(path, ConfigProblem::TierName));
    }
    Ok(name.to_owned())
}

/// Puts `tier` into `tiers` in place of the tier with its code, or after the others when its
/// code is new (so the first tier, the one self-registration gives, stays first). Refused, at
/// `name_path`, when another tier already has its name. No tier is ever removed here: a wallet
/// keeps its tier code, and a replaced tier's new limits apply to its next operation.
pub fn put_tier(tiers: &mut Vec<Tier>, tier: Tier, name_path: &str) -> Result<(), ConfigError> {
    if let Some(other) = tiers.iter().find(|t| t.name == tier.name && t.code != tier.code) {
        let problem = ConfigProblem::TierNameTaken { name: tier.name.clone(), code: other.code };
        return Err(error(name_path, problem));
    }
    match tiers.iter_mut().find(|t| t.code == tier.code) {
        Some(slot) => *slot = tier,
        None => tiers.push(tier),
    }
    Ok(())
}

/// The tariff entries of `section` (`tariffs` or `commissions`), one per operation code.
fn tariff_table(section: &str, rows: &[TariffRow]) -> Result<TariffTable, ConfigError> {
    let mut table = TariffTable::new();
    let mut first: Vec<(u16, usize)> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let path = format!("{section}[{index}]");
        let code = operation_code(&format!("{path}.operation"), &row.operation)?;
        if let Some((_, at)) = first.iter().find(|(c, _)| *c == code) {
            let first = format!("{section}[{at}]");
            return Err(error(format!("{path}.operation"), ConfigProblem::DuplicateOperation { first }));
        }
        first.push((code, index));
        let tariff = row.tariff(&path)?;
        // Checked above in the file's terms; `set` checks again in the engine's.
        table.set(code, tariff).map_err(|e| error(path.clone(), e.into()))?;
    }
    Ok(table)
}

fn operation_code(path: &str, operation: &Operation) -> Result<u16, ConfigError> {
    let code = match operation {
        Operation::Name(name) => OPERATIONS
            .iter()
            .find(|(known, code)| *known == name.trim() || crate::statement::code_name(*code) == name.trim())
            .map(|(_, code)| *code)
            .ok_or_else(|| error(path, ConfigProblem::UnknownOperation { name: echo(name) }))?,
        Operation::Code(n) => u16::try_from(*n).ok().filter(|code| *code > 0).ok_or_else(|| {
            error(path, ConfigProblem::OutOfRange { value: *n, min: 1, max: u16::MAX.into() })
        })?,
    };
    if matches!(code, codes::FEE | codes::COMMISSION | codes::REVERSAL) {
        return Err(error(path, ConfigProblem::NotAnOperation { code }));
    }
    Ok(code)
}

/// An operation a tariff can price, from text: a name of [`OPERATIONS`] (or the name
/// statements give it, such as `cash_by_code`), or a code number.
pub fn operation(path: &str, text: &str) -> Result<u16, ConfigError> {
    let text = text.trim();
    let operation = match text.parse::<i64>() {
        Ok(n) => Operation::Code(n),
        Err(_) => Operation::Name(text.to_owned()),
    };
    operation_code(path, &operation)
}

impl TariffRow {
    fn tariff(&self, path: &str) -> Result<Tariff, ConfigError> {
        let percent_bps = match &self.percent {
            Some(PercentText(text)) => percent_bps(&format!("{path}.percent"), text)?,
            None => 0,
        };
        fn text(t: &Option<DecimalText>) -> Option<&str> {
            t.as_ref().map(|t| t.0.as_str())
        }
        tariff(
            path,
            &TariffText { fixed: text(&self.fixed), percent_bps, min: text(&self.min), max: text(&self.max) },
        )
    }
}

/// A tariff as text, the way the configuration file (its percentage already in basis points)
/// and the admin API receive it: AZN amounts as decimal text; an absent `fixed` or `min` is 0,
/// an absent `max` is no maximum.
#[derive(Debug, Clone, Copy)]
pub struct TariffText<'a> {
    pub fixed: Option<&'a str>,
    pub percent_bps: u32,
    pub min: Option<&'a str>,
    pub max: Option<&'a str>,
}

/// Checks a tariff; errors name `path.key` (`path` may be empty).
pub fn tariff(path: &str, text: &TariffText<'_>) -> Result<Tariff, ConfigError> {
    let key = |name: &str| if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
    let azn = |name: &str, text: Option<&str>| match text {
        Some(text) => amount(&key(name), text, Currency::Azn, Zero::Allowed),
        None => Ok(0),
    };
    let tariff = Tariff {
        fixed: azn("fixed", text.fixed)?,
        percent_bps: text.percent_bps,
        min: azn("min", text.min)?,
        max: azn("max", text.max)?,
    };
    if text.max.is_some() && tariff.max == 0 {
        return Err(error(key("max"), ConfigProblem::TariffMaxZero));
    }
    if tariff.max > 0 {
        let max = show(tariff.max, Some(Currency::Azn));
        for (name, value) in [("min", tariff.min), ("fixed", tariff.fixed)] {
            if value > tariff.max {
                let value = show(value, Some(Currency::Azn));
                return Err(error(key(name), ConfigProblem::TariffAboveMax { value, max }));
            }
        }
    }
    // The file's percentage was bounded when read; the API's basis points are bounded here.
    tariff.validate().map_err(|e| error(key("percent_bps"), e.into()))?;
    Ok(tariff)
}

/// A percentage to basis points, exactly: `"0.5"` is 50 bps, `"0.005"` an error.
fn percent_bps(path: &str, text: &str) -> Result<u32, ConfigError> {
    let trimmed = text.trim();
    let not_a_number = || error(path, ConfigProblem::PercentNotANumber { text: echo(text) });
    if trimmed.is_empty() || trimmed.len() > 40 {
        return Err(not_a_number());
    }
    let value = Decimal::from_str_exact(trimmed).map_err(|_| not_a_number())?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(error(path, ConfigProblem::PercentNegative { text: echo(text) }));
    }
    let value = value.normalize();
    if value.scale() > 2 {
        return Err(error(path, ConfigProblem::PercentTooPrecise { text: echo(text) }));
    }
    value
        .checked_mul(Decimal::ONE_HUNDRED)
        .and_then(|bps| bps.to_u32())
        .filter(|bps| *bps <= 10_000)
        .ok_or_else(|| error(path, ConfigProblem::PercentTooHigh { text: echo(text) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::ServerSecret;
    use proptest::prelude::*;
    use std::sync::Arc;

    const EXAMPLE: &str = include_str!("../../qepik.example.toml");

    fn fails(text: &str) -> ConfigError {
        match WalletSettings::from_toml(text) {
            Ok(settings) => panic!("accepted {text:?} as {settings:?}"),
            Err(error) => error,
        }
    }

    /// A file with one AZN tier whose `key` is set to `value` (TOML source text).
    fn tier_with(key: &str, value: &str) -> String {
        let mut text = String::from("[[wallet.tiers]]\ncode = 0\nname = \"basic\"\n");
        for (k, v) in [
            ("max_balance", "\"300.00\""),
            ("max_per_operation", "\"200.00\""),
            ("daily_amount", "\"300.00\""),
            ("daily_count", "20"),
            ("monthly_amount", "\"1000.00\""),
            ("monthly_count", "100"),
        ] {
            let v = if k == key { value } else { v };
            text.push_str(&format!("{k} = {v}\n"));
        }
        text
    }

    #[test]
    fn defaults_are_the_engines() {
        let settings = WalletSettings::default();
        assert_eq!(settings.policy(), Policy::default());
        let domain = DomainConfig::new(Arc::new(ServerSecret::generate()));
        assert_eq!(settings.step_up_above, domain.step_up_above);
        assert_eq!(settings.otp_ttl_s, domain.otp_ttl_s);
        assert_eq!(settings.tariffs(), domain.tariffs);
        assert_eq!(settings.commissions(), domain.commissions);
        assert_eq!((settings.cash_code_ttl_s, settings.reversal_window_s), (30 * 60, 7 * 86_400));
        assert_eq!(WalletSettings::from_toml(""), Ok(WalletSettings::default()));
        assert_eq!(WalletSettings::from_toml("[wallet]\n"), Ok(WalletSettings::default()));
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        assert_eq!(WalletSettings::from_toml(EXAMPLE), Ok(WalletSettings::default()));
    }

    #[test]
    fn put_tier_replaces_in_place_appends_new_codes_and_keeps_names_unique() {
        let mut tiers = Policy::default().tiers;
        let basic = |code, name: &str| Tier { code, name: name.to_owned(), limits: vec![] };
        put_tier(&mut tiers, basic(1, "verified"), "name").expect("a new name");
        assert_eq!(
            tiers.iter().map(|t| (t.code, t.name.as_str())).collect::<Vec<_>>(),
            [(0, "unidentified"), (1, "verified"), (2, "enhanced")]
        );
        put_tier(&mut tiers, basic(9, "vip"), "name").expect("a new tier");
        assert_eq!(tiers.last().map(|t| t.code), Some(9));
        assert_eq!(tiers.first().map(|t| t.code), Some(0), "the registration tier stays first");
        let taken = put_tier(&mut tiers, basic(5, "enhanced"), "name").expect_err("taken");
        assert_eq!(taken.path, "name");
        assert_eq!(taken.problem, ConfigProblem::TierNameTaken { name: "enhanced".into(), code: 2 });
        assert_eq!(tiers.len(), 4);
        assert_eq!(tier_name("n", "  a  "), Ok("a".to_owned()));
        assert_eq!(tier_name("n", "a\u{7}").map_err(|e| e.problem), Err(ConfigProblem::TierName));
    }

    #[test]
    fn the_examples_commented_tariffs_parse() {
        // Uncomment the sample entries (`# [[tariffs]]`, `# operation = "p2p"`, …).
        let text: String = EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with("[[") || rest.contains(" = ") => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let settings = WalletSettings::from_toml(&text).expect("the sample tariffs");
        let p2p = Tariff { fixed: 10, percent_bps: 50, min: 20, max: 500 };
        assert_eq!(settings.tariffs.get(codes::P2P), Some(&p2p));
        let cash_out = Tariff { fixed: 0, percent_bps: 100, min: 50, max: 0 };
        assert_eq!(settings.tariffs.get(codes::CASH_OUT), Some(&cash_out));
        let cash_in = Tariff { fixed: 0, percent_bps: 30, min: 0, max: 300 };
        assert_eq!(settings.commissions.get(codes::CASH_IN), Some(&cash_in));
        assert_eq!(settings.tariffs.fee(codes::P2P, 10_000), Ok(60));
        assert_eq!(settings.policy(), Policy::default());
    }

    #[test]
    fn values_reach_the_domain_config() {
        let text = r#"
            [wallet]
            utc_offset = "-03:30"
            step_up_above = "never"
            otp_ttl_s = 120
            pin_attempts = 5
            code_attempts = 4
            cash_code_ttl_s = 600
            reversal_window_s = 86400

            [[tariffs]]
            operation = 6
            fixed = "0.30"

            [[commissions]]
            operation = "bill_payment"
            percent = 2
        "#;
        let settings = WalletSettings::from_toml(text).expect("valid");
        let mut domain = DomainConfig::new(Arc::new(ServerSecret::generate()));
        settings.apply_to(&mut domain);
        assert_eq!(domain.policy.utc_offset_s, -(3 * 3_600 + 30 * 60));
        assert_eq!((domain.policy.pin_attempts_max, domain.policy.code_attempts_max), (5, 4));
        assert_eq!(domain.policy.otp_attempts_max, 5);
        assert_eq!(domain.policy.tiers, Policy::default().tiers);
        assert_eq!((domain.step_up_above, domain.otp_ttl_s), (u64::MAX, 120));
        assert_eq!(domain.tariffs.fee(codes::BILL_PAYMENT, 10_000), Ok(30));
        assert_eq!(domain.commissions.fee(codes::BILL_PAYMENT, 10_000), Ok(200));
        assert_eq!((settings.cash_code_ttl_s, settings.reversal_window_s), (600, 86_400));
    }

    #[test]
    fn a_tier_has_limits_per_currency() {
        let mut text = tier_with("max_balance", "\"500\"");
        text.push_str(
            &tier_with("daily_count", "\"unlimited\"")
                .replace("code = 0\n", "code = 0\ncurrency = \"usd\"\n"),
        );
        let settings = WalletSettings::from_toml(&text).expect("valid");
        let [tier] = settings.tiers.as_slice() else { panic!("one tier: {:?}", settings.tiers) };
        assert_eq!((tier.code, tier.name.as_str()), (0, "basic"));
        assert_eq!(tier.limits(Currency::Azn).max_balance, 50_000);
        assert_eq!(tier.limits(Currency::Usd).daily_count, u32::MAX);
        assert_eq!(tier.limits(Currency::Eur), Limits::NONE);
        let text = tier_with("max_per_operation", "\"unlimited\"");
        let settings = WalletSettings::from_toml(&text).expect("unlimited per operation under a daily cap");
        assert_eq!(settings.tiers[0].limits(Currency::Azn).max_per_operation, u64::MAX);
    }

    #[test]
    fn amounts_name_their_path() {
        let mut text = tier_with("max_balance", "\"300\"");
        text.push_str(
            &tier_with("daily_amount", "\"12.345\"")
                .replace("code = 0\nname = \"basic\"", "code = 1\nname = \"more\""),
        );
        let error = fails(&text);
        assert_eq!(error.path, "wallet.tiers[1].daily_amount");
        let too_many = ParseAmountError::TooManyDecimals { found: 3, allowed: 2, currency: Currency::Azn };
        assert_eq!(error.problem, ConfigProblem::Amount { text: "12.345".into(), error: too_many });
        assert_eq!(
            error.to_string(),
            "wallet.tiers[1].daily_amount: \"12.345\" is not a usable amount: amount has 3 decimals but AZN has 2"
        );
        let error = fails(&tier_with("monthly_amount", "\"-5\""));
        assert_eq!(error.path, "wallet.tiers[0].monthly_amount");
        assert!(matches!(error.problem, ConfigProblem::Amount { error: ParseAmountError::Negative, .. }));
        let error = fails(&tier_with("max_balance", "\"0.00\""));
        assert_eq!(
            (error.path.as_str(), error.problem),
            ("wallet.tiers[0].max_balance", ConfigProblem::ZeroLimit)
        );
        let error = fails(&tier_with("daily_count", "0"));
        assert_eq!(
            (error.path.as_str(), error.problem),
            ("wallet.tiers[0].daily_count", ConfigProblem::ZeroLimit)
        );
        let error = fails(&tier_with("daily_count", "-1"));
        assert_eq!(error.problem, ConfigProblem::OutOfRange { value: -1, min: 1, max: u32::MAX.into() });
        let error = fails(&tier_with("daily_count", "\"lots\""));
        assert_eq!(error.path, "wallet.tiers[0].daily_count");
        // Floats and bare integers are refused for amounts: the type says why.
        let error = fails(&tier_with("max_balance", "300.5"));
        assert_eq!(error.path, "wallet.tiers[0].max_balance");
        assert!(error.to_string().contains("decimal text in quotes"), "{error}");
        let error = fails("[wallet]\nstep_up_above = 500\n");
        assert_eq!(error.path, "wallet.step_up_above");
        let error = fails("[wallet]\nstep_up_above = \"1e3\"\n");
        assert!(matches!(error.problem, ConfigProblem::Amount { error: ParseAmountError::NotANumber, .. }));
        let error = fails("[wallet]\nstep_up_above = \"92233720368547758.08\"\n");
        assert!(matches!(error.problem, ConfigProblem::Amount { error: ParseAmountError::Overflow, .. }));
    }

    #[test]
    fn keys_and_syntax_are_checked() {
        let error = fails("[wallet]\notp_tll_s = 60\n");
        assert_eq!(error.path, "wallet.otp_tll_s");
        assert!(error.to_string().contains("unknown field `otp_tll_s`"), "{error}");
        let error = fails("[server]\nport = 1\n");
        assert_eq!(error.path, "server");
        let error = fails(&tier_with("max_balance", "\"1\"").replace("daily_count", "dayly_count"));
        assert_eq!(error.path, "wallet.tiers[0].dayly_count");
        let error = fails("wallet = 3\n");
        assert_eq!(
            error.to_string(),
            "wallet: invalid type: integer `3`, expected a table of wallet settings"
        );
        let error = fails(&tier_with("max_balance", "\"1\"").replace("monthly_count = 100\n", ""));
        assert_eq!(error.path, "wallet.tiers[0]");
        assert!(error.to_string().contains("monthly_count"), "{error}");
        let error = fails("[[tariffs]]\noperation = \"p2p\"\nfee = \"1\"\n");
        assert_eq!(error.path, "tariffs[0].fee");
        let error = fails("[wallet]\npin_attempts = 300\n");
        assert_eq!(error.path, "wallet.pin_attempts");
        let error = fails("[wallet\n");
        assert_eq!(error.path, "");
        assert!(error.to_string().starts_with("line 1, column"), "{error}");
        let error = fails("[wallet]\notp_ttl_s = 1\notp_ttl_s = 2\n");
        assert!(error.to_string().contains("line 3"), "{error}");
    }

    #[test]
    fn durations_and_counts_have_ranges() {
        let range = |path: &str, value, max| {
            let error = fails(&format!("[wallet]\n{} = {value}\n", path.trim_start_matches("wallet.")));
            assert_eq!(error.path, path);
            assert_eq!(error.problem, ConfigProblem::OutOfRange { value, min: 1, max });
        };
        range("wallet.otp_ttl_s", 0, OTP_TTL_MAX_S.into());
        range("wallet.otp_ttl_s", 301, OTP_TTL_MAX_S.into());
        range("wallet.cash_code_ttl_s", 0, CASH_CODE_TTL_S_MAX.into());
        range("wallet.reversal_window_s", 366 * 86_400 + 1, 366 * 86_400);
        range("wallet.pin_attempts", 0, ATTEMPTS_MAX.into());
        range("wallet.otp_sends", 11, OTP_SENDS_MAX.into());
        range("wallet.otp_send_window_s", 86_401, OTP_SEND_WINDOW_S_MAX.into());
        assert!(WalletSettings::from_toml("[wallet]\notp_ttl_s = 300\npin_attempts = 10\n").is_ok());
        for offset in ["+4:00", "04:00", "+04:60", "+15:00", "-12:30", "+04:00:00", "Z", "+٠٤:00"] {
            let error = fails(&format!("[wallet]\nutc_offset = \"{offset}\"\n"));
            assert_eq!(error.path, "wallet.utc_offset", "{offset}");
        }
        for (offset, seconds) in
            [("+14:00", 14 * 3_600), ("-12:00", -12 * 3_600), ("+05:45", 20_700), ("-00:00", 0)]
        {
            assert_eq!(utc_offset_s(offset), Some(seconds), "{offset}");
        }
    }

    #[test]
    fn tiers_must_make_sense() {
        let twice = format!("{}{}", tier_with("max_balance", "\"300\""), tier_with("max_balance", "\"400\""));
        let error = fails(&twice);
        assert_eq!(error.path, "wallet.tiers[1]");
        let first = "wallet.tiers[0]".to_owned();
        assert_eq!(error.problem, ConfigProblem::DuplicateTier { code: 0, currency: Currency::Azn, first });
        let renamed = twice
            .replacen("name = \"basic\"", "name = \"other\"", 1)
            .replace("max_balance = \"400\"\n", "max_balance = \"400\"\ncurrency = \"EUR\"\n");
        let error = fails(&renamed);
        assert_eq!(error.path, "wallet.tiers[1].name");
        assert!(matches!(error.problem, ConfigProblem::TierNameDiffers { code: 0, .. }));
        let same_name = twice.replacen("code = 0", "code = 1", 1);
        let error = fails(&same_name);
        assert_eq!(error.problem, ConfigProblem::TierNameTaken { name: "basic".into(), code: 1 });
        let error = fails(&tier_with("max_per_operation", "\"301\""));
        assert_eq!(error.path, "wallet.tiers[0].max_per_operation");
        assert_eq!(
            error.to_string(),
            "wallet.tiers[0].max_per_operation: 301.00 AZN is above daily_amount (300.00 AZN), so it could never be reached"
        );
        let error = fails(&tier_with("daily_amount", "\"1000.01\""));
        assert_eq!(error.path, "wallet.tiers[0].daily_amount");
        let error = fails(&tier_with("daily_count", "101"));
        assert_eq!(error.path, "wallet.tiers[0].daily_count");
        let error = fails(&tier_with("max_balance", "\"199.99\""));
        assert_eq!(error.path, "wallet.tiers[0].max_per_operation");
        let error = fails(
            &tier_with("max_balance", "\"1\"")
                .replace("currency", "x")
                .replace("code = 0\n", "code = 0\ncurrency = \"GBP\"\n"),
        );
        assert_eq!(error.path, "wallet.tiers[0].currency");
        let error = fails(&tier_with("max_balance", "\"300\"").replace("\"basic\"", "\"  \""));
        assert_eq!((error.path.as_str(), error.problem), ("wallet.tiers[0].name", ConfigProblem::TierName));
        let error = fails("[wallet]\ntiers = []\n");
        assert_eq!((error.path.as_str(), error.problem), ("wallet.tiers", ConfigProblem::NoTiers));
        let error = fails(&tier_with("max_balance", "\"300\"").replace("code = 0", "code = 256"));
        assert_eq!(error.path, "wallet.tiers[0].code");
    }

    #[test]
    fn tariffs_must_make_sense() {
        let error = fails("[[tariffs]]\noperation = \"p2p\"\n[[tariffs]]\noperation = \"topup\"\n");
        assert_eq!(error.path, "tariffs[1].operation");
        assert_eq!(error.problem, ConfigProblem::UnknownOperation { name: "topup".into() });
        assert!(error.to_string().contains("p2p, cash_in, cash_out"), "{error}");
        let error = fails("[[commissions]]\noperation = 1\n[[commissions]]\noperation = \"p2p\"\n");
        assert_eq!(error.path, "commissions[1].operation");
        assert_eq!(error.problem, ConfigProblem::DuplicateOperation { first: "commissions[0]".into() });
        let error = fails("[[tariffs]]\noperation = 100\n");
        assert_eq!(error.problem, ConfigProblem::NotAnOperation { code: codes::FEE });
        let error = fails("[[tariffs]]\noperation = 70000\n");
        assert_eq!(error.path, "tariffs[0].operation");
        let error = fails("[[tariffs]]\noperation = \"p2p\"\nmin = \"1.00\"\nmax = \"0.50\"\n");
        assert_eq!(error.path, "tariffs[0].min");
        assert_eq!(error.to_string(), "tariffs[0].min: 1.00 AZN is above the maximum 0.50 AZN");
        let error = fails("[[tariffs]]\noperation = \"p2p\"\nfixed = \"1.00\"\nmax = \"0.50\"\n");
        assert_eq!(error.path, "tariffs[0].fixed");
        let error = fails("[[tariffs]]\noperation = \"p2p\"\nmax = \"0\"\n");
        assert_eq!((error.path.as_str(), error.problem), ("tariffs[0].max", ConfigProblem::TariffMaxZero));
        let error = fails("[[tariffs]]\noperation = \"p2p\"\nfixed = \"-0.10\"\n");
        assert_eq!(error.path, "tariffs[0].fixed");
        assert!(matches!(error.problem, ConfigProblem::Amount { error: ParseAmountError::Negative, .. }));
        let error = fails("[[tariffs]]\noperation = \"p2p\"\npercent = 0.5\n");
        assert_eq!(error.path, "tariffs[0].percent");
        assert!(error.to_string().contains("a percentage in quotes"), "{error}");
        let error = fails("[[tariffs]]\nfixed = \"1\"\n");
        assert_eq!(error.to_string(), "tariffs[0]: missing field `operation`");
    }

    #[test]
    fn percent_is_exact_in_basis_points() {
        for (text, bps) in [
            ("0.5", 50),
            ("0.50", 50),
            ("0.01", 1),
            ("1", 100),
            ("1.00", 100),
            ("12.34", 1_234),
            ("100", 10_000),
            ("0", 0),
            ("-0", 0),
            (" 2.5 ", 250),
        ] {
            assert_eq!(percent_bps("p", text), Ok(bps), "{text}");
        }
        let problem = |text: &str| percent_bps("p", text).map_err(|e| e.problem);
        assert_eq!(problem("0.005"), Err(ConfigProblem::PercentTooPrecise { text: "0.005".into() }));
        assert_eq!(problem("0.123"), Err(ConfigProblem::PercentTooPrecise { text: "0.123".into() }));
        assert_eq!(problem("100.01"), Err(ConfigProblem::PercentTooHigh { text: "100.01".into() }));
        assert_eq!(problem("-0.5"), Err(ConfigProblem::PercentNegative { text: "-0.5".into() }));
        assert_eq!(problem("5%"), Err(ConfigProblem::PercentNotANumber { text: "5%".into() }));
        assert_eq!(problem("1e2"), Err(ConfigProblem::PercentNotANumber { text: "1e2".into() }));
        let error = fails("[[tariffs]]\noperation = \"p2p\"\npercent = \"0.005\"\n");
        assert_eq!(error.path, "tariffs[0].percent");
        let settings =
            WalletSettings::from_toml("[[tariffs]]\noperation = \"p2p\"\npercent = 3\n").expect("valid");
        assert_eq!(settings.tariffs.get(codes::P2P).map(|t| t.percent_bps), Some(300));
    }

    /// Text worth splicing into the example: TOML punctuation, keys, edge values.
    const TOKENS: &[&str] = &[
        "\"",
        "'",
        "=",
        "[",
        "]",
        "[[",
        "]]",
        "\n",
        "#",
        ".",
        ",",
        "{",
        "}",
        "-",
        "+",
        "0",
        "-1",
        "1e400",
        "nan",
        "inf",
        "\"unlimited\"",
        "\"never\"",
        "18446744073709551616",
        "9223372036854775807",
        "\"-0\"",
        "\"0.000000000000000000000000001\"",
        "\"99999999999999999999999999999\"",
        "\"\u{0663}\"",
        "[[wallet.tiers]]\n",
        "[[tariffs]]\n",
        "[wallet]\n",
        "code = 0\n",
        "currency = \"USD\"\n",
        "operation = \"p2p\"\n",
        "percent = \"100.00\"\n",
        "max = \"0\"\n",
        "tiers = []\n",
        "x = 1\n",
    ];

    fn mutate(text: &str, edits: &[(u8, usize, usize, String)]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for (kind, at, len, insert) in edits {
            let at = at % (chars.len() + 1);
            let end = (at + len % 64).min(chars.len());
            match kind % 4 {
                0 => {
                    chars.drain(at..end);
                }
                1 => {
                    chars.splice(at..at, insert.chars());
                }
                2 => {
                    chars.splice(at..end, insert.chars());
                }
                _ => {
                    let copy: Vec<char> = chars[at..end].to_vec();
                    chars.splice(end..end, copy);
                }
            }
        }
        chars.into_iter().collect()
    }

    fn insertion() -> impl Strategy<Value = String> {
        prop_oneof![prop::sample::select(TOKENS).prop_map(str::to_owned), "\\PC{0,8}"]
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = WalletSettings::from_toml(&text);
        }

        #[test]
        fn mutated_example_never_panics(
            edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), insertion()), 1..6)
        ) {
            let text = mutate(EXAMPLE, &edits);
            if let Err(error) = WalletSettings::from_toml(&text) {
                // Every error says something; one with a key path names a key.
                prop_assert!(!error.to_string().is_empty());
            }
        }

        #[test]
        fn every_basis_point_round_trips(bps in 0_u32..=10_000) {
            let text = Decimal::new(i64::from(bps), 2).to_string();
            prop_assert_eq!(percent_bps("p", &text), Ok(bps));
        }
    }
}
