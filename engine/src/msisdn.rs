//! MSISDNs: phone numbers as people type them, normalised to E.164.
//!
//! [`Msisdn::parse`] turns `+994 50 123 45 67`, `00994501234567`, `994501234567`, `0501234567` and
//! `(050) 123-45-67` into the same [`Msisdn`], checking the length and the operator prefix against
//! a [`NumberingPlan`]. [`NumberingPlan::azerbaijan`] is the plan the wallet runs with; tests and
//! future corridors can build their own.
//!
//! An [`Msisdn`] holds the E.164 digits as a `u64` (country code followed by the national
//! significant number, NSN), so it is `Copy`, hashes cheaply and is the subject that PIN tags and
//! one-time codes are bound to.

use std::fmt;

/// A validated mobile number in E.164 form, held as its digits read as a number (`994501234567`).
///
/// The only ways to build one are [`Msisdn::parse`] and [`Msisdn::from_u64`], so every value has
/// passed a [`NumberingPlan`]'s checks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Msisdn(u64);

/// The countries a deployment accepts numbers from, and the one that a trunk-prefixed national
/// number (`050…`) belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct NumberingPlan {
    /// The country of numbers written with the trunk prefix and no country code.
    pub default_country: u16,
    pub countries: Vec<Country>,
}

/// One country's numbering rules, reduced to what a mobile wallet needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Country {
    /// The ITU country calling code, e.g. 994.
    pub code: u16,
    /// The digits dialled before a national number inside the country ("0" in Azerbaijan); empty
    /// when the country has none.
    pub trunk_prefix: String,
    /// Digits in the national significant number: the number after the country code.
    pub nsn_len: u8,
    /// The leading NSN digits of the mobile operators' ranges; a number must start with one.
    pub mobile_prefixes: Vec<String>,
}

/// Why a string or number is not an acceptable MSISDN. Messages never repeat the input, which is
/// personal data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsisdnError {
    #[error("phone number is empty")]
    Empty,
    /// `position` counts characters (not bytes) from zero.
    #[error(
        "phone number has an invalid character at position {position}: only digits, spaces, '-', \
         '(', ')', '.' and a leading '+' are allowed"
    )]
    InvalidCharacter { position: usize },
    /// `got` counts the digits of the national significant number.
    #[error("phone number has {got} digits after the country code, expected {expected}")]
    WrongLength { expected: u8, got: usize },
    #[error("phone number's country code is not supported")]
    UnknownCountry,
    #[error("phone number does not belong to a supported mobile operator")]
    UnknownOperatorPrefix,
}

impl MsisdnError {
    /// A stable machine-readable code for API responses and metrics.
    pub const fn code(&self) -> &'static str {
        match self {
            MsisdnError::Empty => "msisdn_empty",
            MsisdnError::InvalidCharacter { .. } => "msisdn_invalid_character",
            MsisdnError::WrongLength { .. } => "msisdn_wrong_length",
            MsisdnError::UnknownCountry => "msisdn_unknown_country",
            MsisdnError::UnknownOperatorPrefix => "msisdn_unknown_operator_prefix",
        }
    }
}

/// E.164 caps a number at 15 digits, which also keeps every accepted value inside a `u64`.
const E164_DIGITS_MAX: usize = 15;

impl NumberingPlan {
    /// Azerbaijan: +994, trunk prefix 0, nine-digit NSNs, and the mobile ranges of Azercell
    /// (10, 50, 51), Bakcell (55, 99), Nar (70, 77) and Naxtel (60).
    pub fn azerbaijan() -> NumberingPlan {
        let prefixes = ["10", "50", "51", "55", "99", "70", "77", "60"];
        NumberingPlan {
            default_country: 994,
            countries: vec![Country {
                code: 994,
                trunk_prefix: "0".to_owned(),
                nsn_len: 9,
                mobile_prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            }],
        }
    }

    pub fn country(&self, code: u16) -> Option<&Country> {
        self.countries.iter().find(|c| c.code == code)
    }

    /// The country whose calling code starts `digits`; the longest code wins should a plan hold
    /// codes that are prefixes of each other (real E.164 codes never are).
    fn country_of(&self, digits: &[u8]) -> Option<(&Country, usize)> {
        self.countries
            .iter()
            .filter_map(|c| {
                let code = c.code.to_string();
                digits.starts_with(code.as_bytes()).then_some((c, code.len()))
            })
            .max_by_key(|(_, code_len)| *code_len)
    }
}

impl Default for NumberingPlan {
    fn default() -> NumberingPlan {
        NumberingPlan::azerbaijan()
    }
}

impl Msisdn {
    /// Parses a number as a person would type it.
    ///
    /// Accepted forms: international with `+` or `00` (`+994 50 123 45 67`, `00994501234567`),
    /// international without either (`994501234567`), and national with the default country's
    /// trunk prefix (`0501234567`, `(050) 123-45-67`). Spaces, `-`, `(`, `)` and `.` may separate
    /// digits anywhere; `+` only before the first digit. Only ASCII digits count as digits.
    pub fn parse(input: &str, plan: &NumberingPlan) -> Result<Msisdn, MsisdnError> {
        let mut digits = Vec::with_capacity(E164_DIGITS_MAX);
        let mut plus = false;
        for (position, c) in input.chars().enumerate() {
            match c {
                '0'..='9' => digits.push(c as u8),
                '+' if !plus && digits.is_empty() => plus = true,
                ' ' | '-' | '(' | ')' | '.' => {}
                _ => return Err(MsisdnError::InvalidCharacter { position }),
            }
        }
        if digits.is_empty() {
            return Err(MsisdnError::Empty);
        }
        if plus {
            return Msisdn::from_international(&digits, plan);
        }
        if let Some(rest) = digits.strip_prefix(b"00") {
            return Msisdn::from_international(rest, plan);
        }
        let home = plan.country(plan.default_country);
        if let Some(home) = home.filter(|h| !h.trunk_prefix.is_empty())
            && let Some(nsn) = digits.strip_prefix(home.trunk_prefix.as_bytes())
        {
            return Msisdn::from_parts(home, nsn);
        }
        Msisdn::from_international(&digits, plan)
    }

    /// Accepts a number already in E.164 digit form (`994501234567`), checking it like
    /// [`Msisdn::parse`] does; for values read back from storage or another system.
    pub fn from_u64(value: u64, plan: &NumberingPlan) -> Result<Msisdn, MsisdnError> {
        Msisdn::from_international(value.to_string().as_bytes(), plan)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The E.164 digits without the `+`, as SMPP addresses and billers want them.
    pub fn digits(self) -> String {
        self.0.to_string()
    }

    /// `digits` starts with a country code.
    fn from_international(digits: &[u8], plan: &NumberingPlan) -> Result<Msisdn, MsisdnError> {
        let (country, code_len) = plan.country_of(digits).ok_or(MsisdnError::UnknownCountry)?;
        Msisdn::from_parts(country, &digits[code_len..])
    }

    fn from_parts(country: &Country, nsn: &[u8]) -> Result<Msisdn, MsisdnError> {
        let wrong_length = MsisdnError::WrongLength { expected: country.nsn_len, got: nsn.len() };
        if nsn.len() != usize::from(country.nsn_len) {
            return Err(wrong_length);
        }
        if !country.mobile_prefixes.iter().any(|p| nsn.starts_with(p.as_bytes())) {
            return Err(MsisdnError::UnknownOperatorPrefix);
        }
        // A plan whose code and NSN together exceed E.164's 15 digits cannot yield a valid number;
        // refusing it here also keeps the arithmetic below from overflowing.
        if country.code.to_string().len() + nsn.len() > E164_DIGITS_MAX {
            return Err(wrong_length);
        }
        let value = nsn.iter().fold(u64::from(country.code), |acc, d| acc * 10 + u64::from(d - b'0'));
        Ok(Msisdn(value))
    }
}

impl fmt::Display for Msisdn {
    /// E.164 with its `+`: `+994501234567`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn az() -> NumberingPlan {
        NumberingPlan::azerbaijan()
    }

    fn parse(s: &str) -> Result<u64, MsisdnError> {
        Msisdn::parse(s, &az()).map(Msisdn::get)
    }

    #[test]
    fn accepted_forms_normalise_to_e164() {
        for input in [
            "+994 50 123 45 67",
            "994501234567",
            "00994501234567",
            "0501234567",
            "(050) 123-45-67",
            "+994-50-123.45.67",
            " 050 123 45 67 ",
            "+(994) 50 1234567",
        ] {
            assert_eq!(parse(input), Ok(994_501_234_567), "{input}");
        }
    }

    #[test]
    fn every_operator_prefix_is_accepted() {
        for prefix in ["10", "50", "51", "55", "99", "70", "77", "60"] {
            let number = format!("0{prefix}1234567");
            assert!(parse(&number).is_ok(), "{number}");
        }
    }

    #[test]
    fn display_and_digits() {
        let m = Msisdn::parse("0501234567", &az()).expect("valid");
        assert_eq!(m.to_string(), "+994501234567");
        assert_eq!(m.digits(), "994501234567");
        assert_eq!(Msisdn::from_u64(994_501_234_567, &az()), Ok(m));
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(parse(""), Err(MsisdnError::Empty));
        assert_eq!(parse("   "), Err(MsisdnError::Empty));
        assert_eq!(parse("+"), Err(MsisdnError::Empty));
        assert_eq!(parse("( ) - ."), Err(MsisdnError::Empty));
    }

    #[test]
    fn rejects_other_characters_naming_the_position() {
        assert_eq!(parse("050123456x"), Err(MsisdnError::InvalidCharacter { position: 9 }));
        assert_eq!(parse("\t0501234567"), Err(MsisdnError::InvalidCharacter { position: 0 }));
        assert_eq!(parse("050/1234567"), Err(MsisdnError::InvalidCharacter { position: 3 }));
        // Arabic-Indic and fullwidth digits are digits to Unicode but not to us; positions count
        // characters, not bytes.
        assert_eq!(parse("٠٥٠1234567"), Err(MsisdnError::InvalidCharacter { position: 0 }));
        assert_eq!(parse("050１234567"), Err(MsisdnError::InvalidCharacter { position: 3 }));
        assert_eq!(parse("ab٠c"), Err(MsisdnError::InvalidCharacter { position: 0 }));
    }

    #[test]
    fn rejects_plus_anywhere_but_the_start() {
        assert_eq!(parse("994+501234567"), Err(MsisdnError::InvalidCharacter { position: 3 }));
        assert_eq!(parse("++994501234567"), Err(MsisdnError::InvalidCharacter { position: 1 }));
        assert_eq!(parse("+994501234567+"), Err(MsisdnError::InvalidCharacter { position: 13 }));
    }

    #[test]
    fn rejects_wrong_length() {
        assert_eq!(parse("050123456"), Err(MsisdnError::WrongLength { expected: 9, got: 8 }));
        assert_eq!(parse("+99450123456789"), Err(MsisdnError::WrongLength { expected: 9, got: 11 }));
        assert_eq!(parse("0"), Err(MsisdnError::WrongLength { expected: 9, got: 0 }));
        assert_eq!(parse("994"), Err(MsisdnError::WrongLength { expected: 9, got: 0 }));
    }

    #[test]
    fn rejects_unknown_country() {
        assert_eq!(parse("+7 912 345 67 89"), Err(MsisdnError::UnknownCountry));
        assert_eq!(parse("0044 20 7946 0000"), Err(MsisdnError::UnknownCountry));
        // Nine digits with no trunk prefix are not read as a national number.
        assert_eq!(parse("501234567"), Err(MsisdnError::UnknownCountry));
        assert_eq!(Msisdn::from_u64(0, &az()), Err(MsisdnError::UnknownCountry));
    }

    #[test]
    fn rejects_unknown_operator_prefix() {
        // 12 is a Baku landline range.
        assert_eq!(parse("0124987654"), Err(MsisdnError::UnknownOperatorPrefix));
        assert_eq!(parse("+994 40 123 45 67"), Err(MsisdnError::UnknownOperatorPrefix));
        assert_eq!(Msisdn::from_u64(994_121_234_567, &az()), Err(MsisdnError::UnknownOperatorPrefix));
    }

    #[test]
    fn messages_do_not_echo_the_input() {
        let input = "050123456x";
        let message = Msisdn::parse(input, &az()).expect_err("invalid").to_string();
        assert!(!message.contains("050123456"), "{message}");
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(MsisdnError::Empty.code(), "msisdn_empty");
        assert_eq!(MsisdnError::InvalidCharacter { position: 1 }.code(), "msisdn_invalid_character");
        assert_eq!(MsisdnError::WrongLength { expected: 9, got: 8 }.code(), "msisdn_wrong_length");
        assert_eq!(MsisdnError::UnknownCountry.code(), "msisdn_unknown_country");
        assert_eq!(MsisdnError::UnknownOperatorPrefix.code(), "msisdn_unknown_operator_prefix");
    }

    #[test]
    fn plans_with_several_countries() {
        let mut plan = az();
        plan.countries.push(Country {
            code: 7,
            trunk_prefix: "8".to_owned(),
            nsn_len: 10,
            mobile_prefixes: vec!["9".to_owned()],
        });
        assert_eq!(Msisdn::parse("+7 912 345 67 89", &plan).map(Msisdn::get), Ok(79_123_456_789));
        // The trunk prefix belongs to the default country only.
        assert_eq!(Msisdn::parse("89123456789", &plan), Err(MsisdnError::UnknownCountry));
        assert_eq!(Msisdn::parse("0501234567", &plan).map(Msisdn::get), Ok(994_501_234_567));
        // A default country missing from the plan leaves only international forms.
        plan.default_country = 1;
        assert_eq!(Msisdn::parse("0501234567", &plan), Err(MsisdnError::UnknownCountry));
    }

    #[test]
    fn plans_beyond_e164_length_reject_instead_of_overflowing() {
        let plan = NumberingPlan {
            default_country: 999,
            countries: vec![Country {
                code: 999,
                trunk_prefix: String::new(),
                nsn_len: 20,
                mobile_prefixes: vec!["9".to_owned()],
            }],
        };
        let input = format!("+999{}", "9".repeat(20));
        assert_eq!(Msisdn::parse(&input, &plan), Err(MsisdnError::WrongLength { expected: 20, got: 20 }));
    }

    fn valid_number() -> impl Strategy<Value = Msisdn> {
        let prefixes = prop::sample::select(vec!["10", "50", "51", "55", "99", "70", "77", "60"]);
        (prefixes, 0u32..10_000_000).prop_map(|(prefix, rest)| {
            let digits = format!("994{prefix}{rest:07}");
            Msisdn::parse(&digits, &NumberingPlan::azerbaijan()).expect("generated numbers are valid")
        })
    }

    proptest! {
        #[test]
        fn display_round_trips(m in valid_number()) {
            let plan = az();
            prop_assert_eq!(Msisdn::parse(&m.to_string(), &plan), Ok(m));
            prop_assert_eq!(Msisdn::parse(&m.digits(), &plan), Ok(m));
            prop_assert_eq!(Msisdn::parse(&format!("00{}", m.digits()), &plan), Ok(m));
            prop_assert_eq!(Msisdn::parse(&format!("0{}", &m.digits()[3..]), &plan), Ok(m));
            prop_assert_eq!(Msisdn::from_u64(m.get(), &plan), Ok(m));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Msisdn::parse(&s, &az());
        }

        #[test]
        fn parse_never_panics_on_near_misses(s in "[+0-9 ().\\-٠-٩０-９]{0,24}") {
            let _ = Msisdn::parse(&s, &az());
        }

        #[test]
        fn from_u64_never_panics(v in any::<u64>()) {
            if let Ok(m) = Msisdn::from_u64(v, &az()) {
                prop_assert_eq!(m.get(), v);
            }
        }
    }
}
