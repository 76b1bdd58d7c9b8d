//! Money: integer minor units per currency, parsed and formatted with `rust_decimal` at the edges.
//!
//! Inside the engine an amount is an `i64` count of minor units (qəpik for AZN) tagged with its
//! [`Currency`]. Floats never appear. [`Amount::parse`] and [`Amount`]'s `Display` are the only
//! places where decimal text meets money.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// The currencies the ledger holds. AZN is the default; USD and EUR serve international transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Currency {
    #[default]
    Azn = 0,
    Usd = 1,
    Eur = 2,
}

impl Currency {
    pub const ALL: [Currency; 3] = [Currency::Azn, Currency::Usd, Currency::Eur];

    /// Digits after the decimal point in the currency's minor unit (ISO 4217 exponent).
    pub const fn decimals(self) -> u32 {
        2
    }

    pub const fn code(self) -> &'static str {
        match self {
            Currency::Azn => "AZN",
            Currency::Usd => "USD",
            Currency::Eur => "EUR",
        }
    }

    pub const fn from_u8(value: u8) -> Option<Currency> {
        match value {
            0 => Some(Currency::Azn),
            1 => Some(Currency::Usd),
            2 => Some(Currency::Eur),
            _ => None,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown currency {0:?}: expected AZN, USD or EUR")]
pub struct ParseCurrencyError(String);

impl FromStr for Currency {
    type Err = ParseCurrencyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "AZN" => Ok(Currency::Azn),
            "USD" => Ok(Currency::Usd),
            "EUR" => Ok(Currency::Eur),
            _ => Err(ParseCurrencyError(s.chars().take(16).collect())),
        }
    }
}

/// An amount of money: minor units of one currency. Never negative once parsed for a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Amount {
    minor: i64,
    currency: Currency,
}

/// Whether zero is an acceptable amount where the text is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    Allowed,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseAmountError {
    #[error("amount is not a decimal number")]
    NotANumber,
    #[error("amount has {found} decimals but {currency} has {allowed}")]
    TooManyDecimals { found: u32, allowed: u32, currency: Currency },
    #[error("amount must not be negative")]
    Negative,
    #[error("amount must not be zero")]
    Zero,
    #[error("amount is too large")]
    Overflow,
}

impl Amount {
    pub const fn from_minor(minor: i64, currency: Currency) -> Amount {
        Amount { minor, currency }
    }

    pub const fn minor(self) -> i64 {
        self.minor
    }

    pub const fn currency(self) -> Currency {
        self.currency
    }

    /// Parses decimal text such as `"12.50"` in `currency`. Rejects more decimals than the
    /// currency has, negative amounts, zero when `zero` says so, and values beyond `i64` minor units.
    pub fn parse(text: &str, currency: Currency, zero: Zero) -> Result<Amount, ParseAmountError> {
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.len() > 40 {
            return Err(ParseAmountError::NotANumber);
        }
        let value = Decimal::from_str_exact(trimmed).map_err(|error| match error {
            rust_decimal::Error::ExceedsMaximumPossibleValue
            | rust_decimal::Error::LessThanMinimumPossibleValue => ParseAmountError::Overflow,
            _ => ParseAmountError::NotANumber,
        })?;
        Amount::from_decimal(value, currency, zero)
    }

    pub fn from_decimal(value: Decimal, currency: Currency, zero: Zero) -> Result<Amount, ParseAmountError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(ParseAmountError::Negative);
        }
        let value = value.normalize();
        let allowed = currency.decimals();
        if value.scale() > allowed {
            return Err(ParseAmountError::TooManyDecimals { found: value.scale(), allowed, currency });
        }
        let factor = Decimal::from(10_i64.pow(allowed));
        let minor =
            value.checked_mul(factor).and_then(|minor| minor.to_i64()).ok_or(ParseAmountError::Overflow)?;
        if minor == 0 && zero == Zero::Rejected {
            return Err(ParseAmountError::Zero);
        }
        Ok(Amount { minor, currency })
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.minor, self.currency.decimals())
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        if self.currency != other.currency {
            return None;
        }
        Some(Amount { minor: self.minor.checked_add(other.minor)?, currency: self.currency })
    }
}

impl fmt::Display for Amount {
    /// `12.50 AZN`: always the currency's full number of decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal(), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_rejects() {
        let azn = Currency::Azn;
        assert_eq!(Amount::parse("12.5", azn, Zero::Rejected).map(Amount::minor), Ok(1250));
        assert_eq!(Amount::parse(" 0.01 ", azn, Zero::Rejected).map(Amount::minor), Ok(1));
        assert_eq!(Amount::parse("7", azn, Zero::Rejected).map(Amount::minor), Ok(700));
        assert_eq!(Amount::parse("1.230", azn, Zero::Rejected).map(Amount::minor), Ok(123));
        assert_eq!(
            Amount::parse("1.234", azn, Zero::Rejected),
            Err(ParseAmountError::TooManyDecimals { found: 3, allowed: 2, currency: azn })
        );
        assert_eq!(Amount::parse("-1", azn, Zero::Rejected), Err(ParseAmountError::Negative));
        assert_eq!(Amount::parse("0", azn, Zero::Rejected), Err(ParseAmountError::Zero));
        assert_eq!(Amount::parse("0.00", azn, Zero::Allowed).map(Amount::minor), Ok(0));
        assert_eq!(Amount::parse("abc", azn, Zero::Rejected), Err(ParseAmountError::NotANumber));
        assert_eq!(Amount::parse("1e5", azn, Zero::Rejected), Err(ParseAmountError::NotANumber));
        assert_eq!(Amount::parse("", azn, Zero::Rejected), Err(ParseAmountError::NotANumber));
        assert_eq!(
            Amount::parse("92233720368547758.08", azn, Zero::Rejected),
            Err(ParseAmountError::Overflow)
        );
        assert_eq!(
            Amount::parse("92233720368547758.07", azn, Zero::Rejected).map(Amount::minor),
            Ok(i64::MAX)
        );
        assert_eq!(Amount::from_minor(1250, azn).to_string(), "12.50 AZN");
        assert_eq!(Amount::from_minor(5, Currency::Usd).to_string(), "0.05 USD");
    }

    proptest! {
        #[test]
        fn parse_format_roundtrip(minor in 0_i64..=i64::MAX, currency in 0_u8..3) {
            let currency = Currency::from_u8(currency).expect("valid currency");
            let amount = Amount::from_minor(minor, currency);
            let text = amount.to_decimal().to_string();
            prop_assert_eq!(Amount::parse(&text, currency, Zero::Allowed), Ok(amount));
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,48}") {
            let _ = Amount::parse(&text, Currency::Azn, Zero::Rejected);
        }
    }
}
