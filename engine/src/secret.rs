//! Secrets that must never reach a log: the server's HMAC key, PINs and one-time codes.
//!
//! [`ServerSecret`] keys HMAC-SHA256. PINs are stored only as [`Tag`]s from
//! [`ServerSecret::pin_tag`], bound to the subscriber's MSISDN, and checked with [`Tag::ct_eq`].
//! One-time codes (SMS OTPs, cash-by-code) are derived from a nonce with
//! [`ServerSecret::derive_code`] and checked through [`ServerSecret::code_tag`], so neither the
//! codes nor the PINs need to be stored.
//!
//! Every type here prints a mask under `Debug` and has no `Display`, so a secret that ends up in a
//! `tracing` field or an error chain shows as `Pin(****)`. Error messages never repeat the input.
//!
//! Everything is pure except [`ServerSecret::generate`], which reads the thread's CSPRNG once.
//! Each HMAC message starts with a `qepik/<domain>/…/v1\0` label, so a tag made for one purpose
//! can never be replayed as another's.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why secret input was refused. Messages describe the expected shape, never the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("server secret must be at least {min} bytes, got {got}")]
    TooShort { min: usize, got: usize },
    #[error("server secret is not an even-length hex string")]
    InvalidHex,
    #[error("PIN must be 4 to 6 digits")]
    InvalidPin,
    #[error("code must be exactly {digits} digits")]
    InvalidCode { digits: usize },
    #[error("codes have 4 to 12 digits, not {digits}")]
    UnsupportedCodeLength { digits: usize },
}

impl SecretError {
    /// A stable machine-readable code for API responses and metrics.
    pub const fn code(&self) -> &'static str {
        match self {
            SecretError::TooShort { .. } => "secret_too_short",
            SecretError::InvalidHex => "secret_invalid_hex",
            SecretError::InvalidPin => "pin_invalid",
            SecretError::InvalidCode { .. } => "code_invalid",
            SecretError::UnsupportedCodeLength { .. } => "code_length_unsupported",
        }
    }
}

/// The server's HMAC key. Losing it invalidates every stored PIN tag; leaking it lets an attacker
/// brute-force PINs offline, so it lives in a protected file and nowhere else.
pub struct ServerSecret(Vec<u8>);

impl ServerSecret {
    /// 256 bits: the output size of SHA-256, and what [`ServerSecret::generate`] makes.
    pub const LEN_MIN: usize = 32;

    pub fn from_bytes(bytes: &[u8]) -> Result<ServerSecret, SecretError> {
        if bytes.len() < ServerSecret::LEN_MIN {
            return Err(SecretError::TooShort { min: ServerSecret::LEN_MIN, got: bytes.len() });
        }
        Ok(ServerSecret(bytes.to_vec()))
    }

    /// Reads the hex written by [`ServerSecret::to_hex`], either case; surrounding whitespace
    /// (a file's trailing newline) is ignored.
    pub fn from_hex(hex: &str) -> Result<ServerSecret, SecretError> {
        let pairs = hex.trim_ascii().as_bytes().chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return Err(SecretError::InvalidHex);
        }
        let bytes = pairs
            .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
            .collect::<Option<Vec<u8>>>()
            .ok_or(SecretError::InvalidHex)?;
        ServerSecret::from_bytes(&bytes)
    }

    /// A fresh 32-byte secret from the thread's CSPRNG.
    pub fn generate() -> ServerSecret {
        let mut bytes = vec![0u8; ServerSecret::LEN_MIN];
        rand::rng().fill_bytes(&mut bytes);
        ServerSecret(bytes)
    }

    /// Lowercase hex, for writing a generated secret to its protected file and nowhere else.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(self.0.len() * 2);
        for byte in &self.0 {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        hex
    }

    /// The tag stored in place of a PIN:
    /// HMAC-SHA256(secret, `"qepik/pin/v1\0"` ‖ msisdn as 8 bytes big-endian ‖ PIN digits).
    ///
    /// Binding the MSISDN in means equal PINs of different subscribers have unrelated tags.
    /// `msisdn` is [`crate::msisdn::Msisdn::get`].
    pub fn pin_tag(&self, msisdn: u64, pin: &Pin) -> Tag {
        let mut mac = self.mac();
        mac.update(b"qepik/pin/v1\0");
        mac.update(&msisdn.to_be_bytes());
        mac.update(pin.expose().as_bytes());
        Tag(mac.finalize().into_bytes().into())
    }

    /// A key derived for `domain` and `label` (an API key's id, a session): HMAC-SHA256(secret,
    /// `"qepik/"` ‖ domain ‖ `"/key/v1\0"` ‖ label). The server re-derives it instead of storing
    /// it, so a copy of the server's stores gives no usable key without the secret.
    ///
    /// # Panics
    ///
    /// If `domain` is invalid as for [`ServerSecret::code_tag`].
    pub fn derive_key(&self, domain: &str, label: &[u8]) -> [u8; 32] {
        assert_domain(domain);
        let mut mac = self.mac();
        mac.update(b"qepik/");
        mac.update(domain.as_bytes());
        mac.update(b"/key/v1\0");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// The tag of a one-time code for `subject` (an MSISDN, a voucher id…) within `domain`:
    /// HMAC-SHA256(secret, `"qepik/"` ‖ domain ‖ `"/v1\0"` ‖ subject big-endian ‖ code digits).
    ///
    /// # Panics
    ///
    /// If `domain` is not 1 to 32 characters of `a-z`, `0-9`, `-`, `_`, or is `pin`. Domains are
    /// constants in the caller; the check keeps two purposes from sharing a label.
    pub fn code_tag(&self, domain: &str, subject: u64, code: &OneTimeCode) -> Tag {
        assert_domain(domain);
        let mut mac = self.mac();
        mac.update(b"qepik/");
        mac.update(domain.as_bytes());
        mac.update(b"/v1\0");
        mac.update(&subject.to_be_bytes());
        mac.update(code.expose().as_bytes());
        Tag(mac.finalize().into_bytes().into())
    }

    /// A `digits`-long code for `subject` and `nonce` within `domain`: the first 8 bytes of
    /// HMAC-SHA256(secret, `"qepik/"` ‖ domain ‖ `"/code/v1\0"` ‖ subject BE ‖ nonce BE), read as a
    /// big-endian `u64`, modulo 10^`digits`, zero-padded. The same inputs always give the same
    /// code, so the server can re-derive it instead of storing it; the modulo bias is below 10⁻⁷.
    ///
    /// # Panics
    ///
    /// If `digits` is outside `4..=12`, or `domain` is invalid as for [`ServerSecret::code_tag`].
    pub fn derive_code(&self, domain: &str, subject: u64, nonce: u128, digits: u32) -> OneTimeCode {
        let width = match usize::try_from(digits) {
            Ok(width) if CODE_DIGITS.contains(&width) => width,
            _ => panic!("codes have 4 to 12 digits"),
        };
        assert_domain(domain);
        let mut mac = self.mac();
        mac.update(b"qepik/");
        mac.update(domain.as_bytes());
        mac.update(b"/code/v1\0");
        mac.update(&subject.to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        let out = mac.finalize().into_bytes();
        let mut head = [0u8; 8];
        head.copy_from_slice(&out[..8]);
        let value = u64::from_be_bytes(head) % 10u64.pow(digits);
        OneTimeCode(format!("{value:0width$}"))
    }

    fn mac(&self) -> HmacSha256 {
        match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            // HMAC hashes or pads a key of any length; only fixed-key-size MACs can fail here.
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        }
    }
}

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(..)")
    }
}

fn nibble(hex: u8) -> Option<u8> {
    match hex {
        b'0'..=b'9' => Some(hex - b'0'),
        b'a'..=b'f' => Some(hex - b'a' + 10),
        b'A'..=b'F' => Some(hex - b'A' + 10),
        _ => None,
    }
}

/// Digits in a one-time code: fewer is guessable, more does not fit a `u64` draw without bias.
const CODE_DIGITS: std::ops::RangeInclusive<usize> = 4..=12;

fn assert_domain(domain: &str) {
    let well_formed = (1..=32).contains(&domain.len())
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    assert!(well_formed && domain != "pin", "invalid code domain");
}

/// A subscriber's PIN: 4 to 6 ASCII digits.
pub struct Pin(String);

impl Pin {
    pub fn parse(input: &str) -> Result<Pin, SecretError> {
        if (4..=6).contains(&input.len()) && input.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Pin(input.to_owned()))
        } else {
            Err(SecretError::InvalidPin)
        }
    }

    /// The digits, for [`ServerSecret::pin_tag`] only: never log, store or compare them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(****)")
    }
}

/// A one-time code: an SMS OTP (6 digits) or a cash-by-code code (length set by the deployment).
pub struct OneTimeCode(String);

impl OneTimeCode {
    /// Accepts exactly `digits` ASCII digits; `digits` must be 4 to 12.
    pub fn parse(input: &str, digits: usize) -> Result<OneTimeCode, SecretError> {
        if !CODE_DIGITS.contains(&digits) {
            return Err(SecretError::UnsupportedCodeLength { digits });
        }
        if input.len() == digits && input.bytes().all(|b| b.is_ascii_digit()) {
            Ok(OneTimeCode(input.to_owned()))
        } else {
            Err(SecretError::InvalidCode { digits })
        }
    }

    /// The digits, for [`ServerSecret::code_tag`] and for the one message that delivers the code
    /// to its owner; never log them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OneTimeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OneTimeCode(****)")
    }
}

/// An HMAC-SHA256 output, stored in place of a PIN or code. Compare only with [`Tag::ct_eq`].
#[derive(Clone, Copy)]
pub struct Tag(pub [u8; 32]);

impl Tag {
    /// Equality in time independent of where the tags differ, so that response timing does not
    /// reveal how much of a guessed tag was right.
    pub fn ct_eq(&self, other: &Tag) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tag(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(fill: u8) -> ServerSecret {
        ServerSecret::from_bytes(&[fill; 32]).expect("32 bytes")
    }

    fn pin(s: &str) -> Pin {
        Pin::parse(s).expect("valid pin")
    }

    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn has_digit(s: &str) -> bool {
        s.bytes().any(|b| b.is_ascii_digit())
    }

    #[test]
    fn debug_output_is_masked() {
        let s = ServerSecret::from_bytes(&[0x12; 32]).expect("32 bytes");
        let debug = format!("{s:?}");
        assert_eq!(debug, "ServerSecret(..)");
        assert!(!debug.contains("12"));

        let p = pin("918273");
        assert_eq!(format!("{p:?}"), "Pin(****)");
        assert!(!has_digit(&format!("{p:?}")));

        let c = OneTimeCode::parse("456789", 6).expect("valid code");
        assert_eq!(format!("{c:?}"), "OneTimeCode(****)");
        assert!(!has_digit(&format!("{c:?}")));

        let t = s.pin_tag(994_501_234_567, &p);
        assert_eq!(format!("{t:?}"), "Tag(..)");
        // In a containing struct too, as tracing would print it.
        assert!(!has_digit(&format!("{:?}", (&s, &p, &c, &t))));
    }

    #[test]
    fn pin_parse_accepts_four_to_six_ascii_digits() {
        for ok in ["1234", "00000", "987654"] {
            assert_eq!(Pin::parse(ok).map(|p| p.expose().to_owned()), Ok(ok.to_owned()));
        }
        for bad in ["123", "1234567", "12a4", "١٢٣٤", "１２３４", "", " 1234", "12 34", "+1234"] {
            let err = Pin::parse(bad).expect_err("invalid pin");
            assert_eq!(err, SecretError::InvalidPin);
            let message = err.to_string();
            assert!(bad.is_empty() || !message.contains(bad), "{message}");
            assert!(!has_digit(&message.replace("4 to 6", "")), "{message}");
        }
    }

    #[test]
    fn one_time_code_parse() {
        assert_eq!(OneTimeCode::parse("012345", 6).map(|c| c.expose().to_owned()), Ok("012345".to_owned()));
        assert_eq!(OneTimeCode::parse("12345", 6).err(), Some(SecretError::InvalidCode { digits: 6 }));
        assert_eq!(OneTimeCode::parse("1234567", 6).err(), Some(SecretError::InvalidCode { digits: 6 }));
        assert_eq!(OneTimeCode::parse("12345x", 6).err(), Some(SecretError::InvalidCode { digits: 6 }));
        assert_eq!(OneTimeCode::parse("١٢٣٤٥٦", 6).err(), Some(SecretError::InvalidCode { digits: 6 }));
        assert_eq!(OneTimeCode::parse("12345678", 8).map(|c| c.expose().len()), Ok(8));
        assert_eq!(
            OneTimeCode::parse("123", 3).err(),
            Some(SecretError::UnsupportedCodeLength { digits: 3 })
        );
        assert_eq!(
            OneTimeCode::parse("1234567890123", 13).err(),
            Some(SecretError::UnsupportedCodeLength { digits: 13 })
        );
    }

    #[test]
    fn server_secret_bytes_and_hex() {
        assert_eq!(
            ServerSecret::from_bytes(&[1; 31]).err(),
            Some(SecretError::TooShort { min: 32, got: 31 })
        );
        let s = ServerSecret::from_bytes(&(0..=40).collect::<Vec<u8>>()).expect("41 bytes");
        let hex = s.to_hex();
        assert_eq!(hex.len(), 82);
        assert!(hex.starts_with("000102030405060708090a0b"));
        let back = ServerSecret::from_hex(&format!("{}\n", hex.to_uppercase())).expect("round trip");
        assert_eq!(back.to_hex(), hex);

        assert_eq!(ServerSecret::from_hex("abc").err(), Some(SecretError::InvalidHex));
        assert_eq!(ServerSecret::from_hex(&"zz".repeat(32)).err(), Some(SecretError::InvalidHex));
        assert_eq!(ServerSecret::from_hex(&"é".repeat(32)).err(), Some(SecretError::InvalidHex));
        assert_eq!(ServerSecret::from_hex("00ff").err(), Some(SecretError::TooShort { min: 32, got: 2 }));
        // Messages do not carry the input.
        let message = ServerSecret::from_hex(&"5g".repeat(32)).err().map(|e| e.to_string());
        assert_eq!(message.as_deref(), Some("server secret is not an even-length hex string"));
    }

    #[test]
    fn generate_makes_distinct_32_byte_secrets() {
        let a = ServerSecret::generate();
        let b = ServerSecret::generate();
        assert_eq!(a.to_hex().len(), 64);
        assert_ne!(a.to_hex(), b.to_hex());
        assert_eq!(ServerSecret::from_hex(&a.to_hex()).map(|s| s.to_hex()), Ok(a.to_hex()));
    }

    #[test]
    fn pin_tag_layout_matches_its_documentation() {
        let s = secret(7);
        let expected = hmac(&[7; 32], &[b"qepik/pin/v1\0", &994_501_234_567u64.to_be_bytes(), b"1234"]);
        assert_eq!(s.pin_tag(994_501_234_567, &pin("1234")).0, expected);
    }

    #[test]
    fn pin_tag_differs_per_msisdn_pin_and_secret() {
        let s = secret(7);
        let base = s.pin_tag(994_501_234_567, &pin("1234"));
        assert!(base.ct_eq(&s.pin_tag(994_501_234_567, &pin("1234"))));
        assert!(!base.ct_eq(&s.pin_tag(994_501_234_568, &pin("1234"))));
        assert!(!base.ct_eq(&s.pin_tag(994_501_234_567, &pin("1235"))));
        assert!(!base.ct_eq(&s.pin_tag(994_501_234_567, &pin("12340"))));
        assert!(!base.ct_eq(&secret(8).pin_tag(994_501_234_567, &pin("1234"))));
    }

    #[test]
    fn code_tag_layout_and_separation() {
        let s = secret(7);
        let code = OneTimeCode::parse("123456", 6).expect("valid code");
        let expected = hmac(&[7; 32], &[b"qepik/otp/v1\0", &42u64.to_be_bytes(), b"123456"]);
        let tag = s.code_tag("otp", 42, &code);
        assert_eq!(tag.0, expected);
        assert!(!tag.ct_eq(&s.code_tag("cash", 42, &code)));
        assert!(!tag.ct_eq(&s.code_tag("otp", 43, &code)));
        // The same digits as a PIN give another tag.
        assert!(!tag.ct_eq(&s.pin_tag(42, &pin("123456"))));
    }

    #[test]
    fn derive_code_is_deterministic_sized_and_nonce_dependent() {
        let s = secret(7);
        let a = s.derive_code("otp", 994_501_234_567, 1, 6);
        assert_eq!(a.expose(), s.derive_code("otp", 994_501_234_567, 1, 6).expose());
        assert_eq!(a.expose().len(), 6);
        assert_ne!(a.expose(), s.derive_code("otp", 994_501_234_567, 2, 6).expose());
        assert_ne!(a.expose(), s.derive_code("otp", 994_501_234_568, 1, 6).expose());
        assert_ne!(a.expose(), s.derive_code("cash", 994_501_234_567, 1, 6).expose());
        assert_ne!(a.expose(), secret(8).derive_code("otp", 994_501_234_567, 1, 6).expose());

        let mut seen = std::collections::BTreeSet::new();
        for nonce in 0..200u128 {
            for digits in 4..=12 {
                let code = s.derive_code("cash", 7, nonce, digits);
                assert_eq!(code.expose().len(), digits as usize);
                assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
                assert!(OneTimeCode::parse(code.expose(), digits as usize).is_ok());
            }
            seen.insert(s.derive_code("cash", 7, nonce, 12).expose().to_owned());
        }
        assert_eq!(seen.len(), 200);
        // Some 12-digit codes start with 0, so padding is exercised.
        assert!(seen.iter().any(|c| c.starts_with('0')));
    }

    #[test]
    fn derive_code_layout_matches_its_documentation() {
        let s = secret(7);
        let out = hmac(&[7; 32], &[b"qepik/otp/code/v1\0", &42u64.to_be_bytes(), &9u128.to_be_bytes()]);
        let mut head = [0u8; 8];
        head.copy_from_slice(&out[..8]);
        let expected = format!("{:06}", u64::from_be_bytes(head) % 1_000_000);
        assert_eq!(s.derive_code("otp", 42, 9, 6).expose(), expected);
    }

    #[test]
    #[should_panic(expected = "codes have 4 to 12 digits")]
    fn derive_code_refuses_too_many_digits() {
        let _ = secret(7).derive_code("otp", 1, 1, 13);
    }

    #[test]
    #[should_panic(expected = "invalid code domain")]
    fn code_domains_cannot_contain_separators() {
        let _ = secret(7).derive_code("otp/v1", 1, 1, 6);
    }

    #[test]
    #[should_panic(expected = "invalid code domain")]
    fn code_domain_pin_is_reserved() {
        let code = OneTimeCode::parse("1234", 4).expect("valid code");
        let _ = secret(7).code_tag("pin", 1, &code);
    }

    #[test]
    fn ct_eq() {
        let a = Tag([3; 32]);
        let mut b = a.0;
        assert!(a.ct_eq(&Tag(b)));
        b[31] ^= 1;
        assert!(!a.ct_eq(&Tag(b)));
        b[31] ^= 1;
        b[0] ^= 0x80;
        assert!(!a.ct_eq(&Tag(b)));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(SecretError::InvalidPin.code(), "pin_invalid");
        assert_eq!(SecretError::InvalidCode { digits: 6 }.code(), "code_invalid");
        assert_eq!(SecretError::InvalidHex.code(), "secret_invalid_hex");
    }
}
