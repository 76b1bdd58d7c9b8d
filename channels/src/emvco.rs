//! EMVCo merchant-presented QR payloads (EMV QRCPS-MPM): the text a merchant's terminal shows
//! as a QR code. A payload is a sequence of TLV data objects (two-digit id, two-digit length,
//! value) ending with the CRC object `63`, four hex digits of CRC-16/CCITT-FALSE (polynomial
//! 0x1021, initial 0xFFFF) over everything before them, `6304` included.
//!
//! Qepik's dynamic payloads carry: `00` format "01", `01` "12" (dynamic), `26` merchant account
//! information (`00` the globally unique id [`GUI`], `01` the merchant's number, `02` the payment
//! request's id), `52` category code, `53` currency "944" (AZN), `54` amount, `58` "AZ", `59` the
//! merchant's name, `60` the city, `62`/`05` the merchant's reference, `63` the CRC.

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// The globally unique identifier of Qepik's merchant account template.
pub const GUI: &str = "az.qepik";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmvError {
    #[error("the payload is not a sequence of EMV data objects")]
    Malformed,
    #[error("the payload's CRC does not match")]
    Crc,
    #[error("the payload lacks {0}")]
    Missing(&'static str),
    #[error("{0} is too long for an EMV data object")]
    TooLong(&'static str),
}

/// A Qepik payment request as a payload carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub merchant: u64,
    pub request: String,
    /// Decimal text, as printed (`"12.50"`).
    pub amount: String,
    pub merchant_name: String,
    pub city: String,
    pub reference: String,
}

fn object(out: &mut String, id: &str, value: &str, name: &'static str) -> Result<(), EmvError> {
    if value.len() > 99 || value.is_empty() {
        return Err(EmvError::TooLong(name));
    }
    out.push_str(id);
    out.push_str(&format!("{:02}", value.len()));
    out.push_str(value);
    Ok(())
}

/// The payload of `request`, CRC included.
pub fn encode(request: &PaymentRequest) -> Result<String, EmvError> {
    let mut account = String::new();
    object(&mut account, "00", GUI, "the GUI")?;
    object(&mut account, "01", &request.merchant.to_string(), "the merchant")?;
    object(&mut account, "02", &request.request, "the request id")?;
    let mut additional = String::new();
    object(&mut additional, "05", &request.reference, "the reference")?;
    let mut out = String::new();
    object(&mut out, "00", "01", "the format")?;
    object(&mut out, "01", "12", "the initiation method")?;
    object(&mut out, "26", &account, "the merchant account information")?;
    object(&mut out, "52", "5999", "the category")?;
    object(&mut out, "53", "944", "the currency")?;
    object(&mut out, "54", &request.amount, "the amount")?;
    object(&mut out, "58", "AZ", "the country")?;
    object(&mut out, "59", &request.merchant_name, "the merchant name")?;
    object(&mut out, "60", &request.city, "the city")?;
    object(&mut out, "62", &additional, "the additional data")?;
    out.push_str("6304");
    let crc = CRC.checksum(out.as_bytes());
    out.push_str(&format!("{crc:04X}"));
    Ok(out)
}

/// The data objects of `text`: (id, value) pairs in order.
fn objects(text: &str) -> Result<Vec<(&str, &str)>, EmvError> {
    let mut found = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let id = rest.get(..2).ok_or(EmvError::Malformed)?;
        let len: usize =
            rest.get(2..4).ok_or(EmvError::Malformed)?.parse().map_err(|_| EmvError::Malformed)?;
        if !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EmvError::Malformed);
        }
        let value = rest.get(4..4 + len).ok_or(EmvError::Malformed)?;
        found.push((id, value));
        rest = rest.get(4 + len..).ok_or(EmvError::Malformed)?;
    }
    Ok(found)
}

/// Checks the CRC and reads a Qepik payment request back.
pub fn decode(payload: &str) -> Result<PaymentRequest, EmvError> {
    let payload = payload.trim();
    if payload.len() < 8 || !payload.is_char_boundary(payload.len() - 4) {
        return Err(EmvError::Malformed);
    }
    let (body, crc) = payload.split_at(payload.len() - 4);
    if !body.ends_with("6304") {
        return Err(EmvError::Missing("the CRC"));
    }
    let crc = u16::from_str_radix(crc, 16).map_err(|_| EmvError::Malformed)?;
    if CRC.checksum(body.as_bytes()) != crc {
        return Err(EmvError::Crc);
    }
    let top = objects(body.get(..body.len() - 4).ok_or(EmvError::Malformed)?)?;
    let get = |id: &str| top.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    let account = objects(get("26").ok_or(EmvError::Missing("merchant account information"))?)?;
    let sub = |id: &str| account.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    if sub("00") != Some(GUI) {
        return Err(EmvError::Missing("Qepik's merchant account"));
    }
    if get("53") != Some("944") {
        return Err(EmvError::Missing("the AZN currency"));
    }
    let additional = get("62").map(objects).transpose()?.unwrap_or_default();
    Ok(PaymentRequest {
        merchant: sub("01").and_then(|m| m.parse().ok()).ok_or(EmvError::Missing("the merchant"))?,
        request: sub("02").ok_or(EmvError::Missing("the request id"))?.to_owned(),
        amount: get("54").ok_or(EmvError::Missing("the amount"))?.to_owned(),
        merchant_name: get("59").unwrap_or_default().to_owned(),
        city: get("60").unwrap_or_default().to_owned(),
        reference: additional
            .iter()
            .find(|(i, _)| *i == "05")
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PaymentRequest {
        PaymentRequest {
            merchant: 5001,
            request: "9f2c1a".into(),
            amount: "12.50".into(),
            merchant_name: "Demo Cafe".into(),
            city: "Baku".into(),
            reference: "order-17".into(),
        }
    }

    #[test]
    fn the_crc_is_ccitt_false() {
        // The standard check value of CRC-16/CCITT-FALSE.
        assert_eq!(CRC.checksum(b"123456789"), 0x29B1);
    }

    #[test]
    fn payloads_round_trip_and_carry_their_crc() {
        let payload = encode(&request()).expect("encode");
        assert!(payload.starts_with("000201010212"));
        assert!(payload.contains("5303944") && payload.contains("540512.50") && payload.contains("5802AZ"));
        assert_eq!(decode(&payload), Ok(request()));
        // Any one character changed breaks the CRC (or the structure).
        for i in 0..payload.len() {
            let mut bytes = payload.clone().into_bytes();
            bytes[i] = if bytes[i] == b'7' { b'8' } else { b'7' };
            let changed = String::from_utf8(bytes).expect("ascii");
            assert!(decode(&changed).is_err(), "changed at {i}: {changed}");
        }
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        for text in
            ["", "6304", "000201", "0002016304FFFF", "ü0002016304ABCD", "99999999999999", "0002016304zzzz"]
        {
            assert!(decode(text).is_err(), "{text}");
        }
    }
}
