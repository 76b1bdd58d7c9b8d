//! Text on the air: GSM 7-bit (the default alphabet, unpacked, one septet per octet, data_coding
//! 0) where every character has a septet, UCS-2 (data_coding 8) where one does not, as
//! Azerbaijani's ə, ş, ç, ğ, ı and Russian need. The encoders are rusmpp's; the decoder's table is
//! built once by running rusmpp's GSM encoder over the characters it knows, so the two never
//! disagree.
//!
//! A USSD string carries 160 octets: 182 septets in GSM 7-bit (an extension character such as
//! `€` or `{` takes two), or 80 UCS-2 characters. [`fits`] says whether a screen fits.

use std::collections::HashMap;
use std::sync::OnceLock;

use rusmpp::extra::encoding::gsm7bit::Gsm7BitUnpacked;
use rusmpp::extra::encoding::ucs2::Ucs2;

/// data_coding of the GSM 7-bit default alphabet (SMSC default).
pub const DCS_GSM7: u8 = 0x00;
/// data_coding of Latin-1.
pub const DCS_LATIN1: u8 = 0x03;
/// data_coding of UCS-2 (UTF-16BE).
pub const DCS_UCS2: u8 = 0x08;

/// Septets in one USSD string.
pub const GSM7_LIMIT: usize = 182;
/// UCS-2 characters in one USSD string (160 octets).
pub const UCS2_LIMIT: usize = 80;

/// An encoded screen: the data_coding and the octets of short_message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub data_coding: u8,
    pub bytes: Vec<u8>,
}

/// Encodes `text` in GSM 7-bit if it can, else UCS-2. Characters UCS-2 cannot carry (outside the
/// Basic Multilingual Plane) become `?`.
pub fn encode(text: &str) -> Encoded {
    if let Ok(bytes) = Gsm7BitUnpacked::new().encode_to_vec(text) {
        return Encoded { data_coding: DCS_GSM7, bytes };
    }
    let bmp: String = text.chars().map(|c| if (c as u32) < 0x1_0000 { c } else { '?' }).collect();
    let bytes = Ucs2::new().encode_to_vec(&bmp).unwrap_or_default();
    Encoded { data_coding: DCS_UCS2, bytes }
}

/// The size of `text` against its encoding's limit: (units used, limit).
pub fn measure(text: &str) -> (usize, usize) {
    match Gsm7BitUnpacked::new().encode_to_vec(text) {
        Ok(septets) => (septets.len(), GSM7_LIMIT),
        Err(_) => (text.chars().map(char::len_utf16).sum(), UCS2_LIMIT),
    }
}

/// Whether `text` fits one USSD string in the encoding [`encode`] picks.
pub fn fits(text: &str) -> bool {
    let (used, limit) = measure(text);
    used <= limit
}

/// Why a short message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("data_coding {0:#04x} is not supported")]
    UnsupportedCoding(u8),
    #[error("an odd number of octets in UCS-2 text")]
    OddUcs2,
    #[error("an invalid character in the text")]
    Invalid,
}

fn gsm7_table() -> &'static (HashMap<u8, char>, HashMap<u8, char>) {
    static TABLE: OnceLock<(HashMap<u8, char>, HashMap<u8, char>)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let encoder = Gsm7BitUnpacked::new();
        let (mut standard, mut extended) = (HashMap::new(), HashMap::new());
        let mut buffer = [0u8; 4];
        for c in (0u32..0x2200).filter_map(char::from_u32) {
            if let Ok(bytes) = encoder.encode_to_vec(c.encode_utf8(&mut buffer)) {
                match bytes.as_slice() {
                    [b] => {
                        standard.entry(*b).or_insert(c);
                    }
                    [0x1B, b] => {
                        extended.entry(*b).or_insert(c);
                    }
                    _ => {}
                }
            }
        }
        (standard, extended)
    })
}

/// Decodes a short message: GSM 7-bit unpacked (0, and 1 for the IA5 some gateways send), Latin-1
/// (3) or UCS-2 (8).
pub fn decode(data_coding: u8, bytes: &[u8]) -> Result<String, DecodeError> {
    match data_coding {
        0x00 | 0x01 | 0xF0 => {
            let (standard, extended) = gsm7_table();
            let mut text = String::with_capacity(bytes.len());
            let mut escaped = false;
            for &b in bytes {
                if escaped {
                    text.push(*extended.get(&b).ok_or(DecodeError::Invalid)?);
                    escaped = false;
                } else if b == 0x1B {
                    escaped = true;
                } else {
                    text.push(*standard.get(&b).ok_or(DecodeError::Invalid)?);
                }
            }
            Ok(text)
        }
        DCS_LATIN1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        DCS_UCS2 => {
            if !bytes.len().is_multiple_of(2) {
                return Err(DecodeError::OddUcs2);
            }
            let units = bytes.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| DecodeError::Invalid)
        }
        other => Err(DecodeError::UnsupportedCoding(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_text_is_gsm7_and_azerbaijani_letters_are_ucs2() {
        let plain = encode("1 Balance\n2 Send money");
        assert_eq!(plain.data_coding, DCS_GSM7);
        assert_eq!(plain.bytes.len(), 22);
        for word in ["Balans", "Köçürmə", "şəkil", "ağ", "qız", "Баланс"] {
            let encoded = encode(word);
            let expected = if word == "Balans" { DCS_GSM7 } else { DCS_UCS2 };
            assert_eq!(encoded.data_coding, expected, "{word}");
            assert_eq!(decode(encoded.data_coding, &encoded.bytes).as_deref(), Ok(word));
        }
        // ö and ü are in the GSM alphabet; ç is only as a capital there.
        assert_eq!(encode("öü").data_coding, DCS_GSM7);
    }

    #[test]
    fn the_limit_follows_the_encoding() {
        assert!(fits(&"a".repeat(182)));
        assert!(!fits(&"a".repeat(183)));
        assert!(!fits(&format!("{}€", "a".repeat(181))), "an extension character takes two septets");
        assert!(fits(&"ə".repeat(80)));
        assert!(!fits(&"ə".repeat(81)));
    }

    #[test]
    fn decoding_bad_input_is_an_error_not_a_panic() {
        assert_eq!(decode(DCS_UCS2, &[0x00]), Err(DecodeError::OddUcs2));
        assert_eq!(decode(DCS_UCS2, &[0xD8, 0x00]), Err(DecodeError::Invalid));
        assert_eq!(decode(0x02, b"x"), Err(DecodeError::UnsupportedCoding(0x02)));
        assert_eq!(decode(DCS_GSM7, &[0x80]), Err(DecodeError::Invalid));
        assert_eq!(decode(DCS_GSM7, b"*150#").as_deref(), Ok("*150#"));
        assert_eq!(decode(DCS_GSM7, &[0x1B, 0x65]).as_deref(), Ok("€"));
    }
}
