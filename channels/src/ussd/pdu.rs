//! SMPP PDUs on the wire: framing with its own length checks, a TLV walk that rusmpp does not do
//! (it accepts a TLV whose declared length disagrees with its type), decoding through rusmpp,
//! and the few accessors and builders the USSD channel needs.
//!
//! What a malformed PDU gets (SMPP 3.4 §3.3, §5.1.3):
//!
//! | input | answer | connection |
//! |---|---|---|
//! | command_length < 16, or above [`MAX_PDU`] | generic_nack ESME_RINVCMDLEN | closed: the stream cannot be re-framed |
//! | an unknown command_id | generic_nack ESME_RINVCMDID | stays |
//! | a message whose mandatory part overruns the PDU | `<request>_resp` ESME_RINVCMDLEN | stays |
//! | any other body that does not parse in its length | generic_nack ESME_RINVCMDLEN | stays |
//! | a TLV running past the PDU, or of the wrong length for its tag | `<request>_resp` ESME_RINVTLVLEN | stays |

use bytes::BytesMut;
use rusmpp::tlvs::TlvValue;
use rusmpp::values::{ItsSessionInfo, UssdServiceOp};
use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 16-octet header: command_length, command_id, command_status, sequence_number.
pub const HEADER: usize = 16;
/// The longest PDU accepted: a submit_sm with a full short_message and generous TLVs fits in
/// well under this.
pub const MAX_PDU: usize = 8 * 1024;

/// One PDU as read from the wire, header decoded, not yet parsed.
#[derive(Debug, Clone)]
pub struct Frame {
    pub command_id: u32,
    pub status: u32,
    pub sequence: u32,
    /// The whole PDU, length included.
    pub bytes: Vec<u8>,
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The stream cannot be re-framed: answer generic_nack with this sequence number and close.
    #[error("command_length {length} is outside 16..={MAX_PDU}")]
    BadLength { length: u32, sequence: u32 },
}

/// Reads one PDU. A peer that closes between PDUs gives [`FrameError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER];
    match reader.read_exact(&mut header[..4]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if (length as usize) < HEADER {
        // Not even a header: whatever follows is not framed.
        return Err(FrameError::BadLength { length, sequence: 0 });
    }
    reader.read_exact(&mut header[4..]).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    let word = |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (command_id, status, sequence) = (word(4), word(8), word(12));
    if length as usize > max {
        return Err(FrameError::BadLength { length, sequence });
    }
    let mut bytes = vec![0u8; length as usize];
    bytes[..HEADER].copy_from_slice(&header);
    reader.read_exact(&mut bytes[HEADER..]).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    Ok(Frame { command_id, status, sequence, bytes })
}

/// A PDU that cannot be accepted, and how to say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: CommandStatus,
    pub sequence: u32,
    /// The response's command: the request's `_resp`, or generic_nack.
    pub answer: CommandId,
}

fn is_known(id: CommandId) -> bool {
    !matches!(id, CommandId::Other(_))
}

/// The response id of a request id (bit 31 set), if it has one.
pub fn response_id(id: CommandId) -> Option<CommandId> {
    let raw = u32::from(id);
    if raw & 0x8000_0000 != 0 || matches!(id, CommandId::Outbind | CommandId::AlertNotification) {
        return None;
    }
    let resp = CommandId::from(raw | 0x8000_0000);
    is_known(resp).then_some(resp)
}

/// Skips a C-octet string of at most `max` octets (NUL included) at `at`; the offset after it.
fn skip_c_string(body: &[u8], at: usize, max: usize) -> Option<usize> {
    let window = body.get(at..)?;
    let nul = window.iter().take(max).position(|&b| b == 0)?;
    Some(at + nul + 1)
}

/// Where the TLVs of a message PDU start, walking its mandatory part; `None` if the mandatory
/// part does not fit in the body.
fn tlv_start(id: CommandId, body: &[u8]) -> Option<usize> {
    let mut at = skip_c_string(body, 0, 6)?; // service_type
    at += 2; // source ton, npi
    at = skip_c_string(body, at, 21)?;
    at += 2; // dest ton, npi
    at = skip_c_string(body, at, 21)?;
    match id {
        CommandId::DataSm => {
            at += 3; // esm_class, registered_delivery, data_coding
        }
        _ => {
            at += 3; // esm_class, protocol_id, priority_flag
            at = skip_c_string(body, at, 17)?; // schedule_delivery_time
            at = skip_c_string(body, at, 17)?; // validity_period
            at += 4; // registered_delivery, replace_if_present, data_coding, sm_default_msg_id
            let sm_length = *body.get(at)?;
            at += 1 + usize::from(sm_length);
        }
    }
    (at <= body.len()).then_some(at)
}

/// The fixed value length of the TLV tags whose type has one (SMPP 3.4 §5.3.2).
fn fixed_length(tag: u16) -> Option<usize> {
    Some(match tag {
        0x0017 => 4,
        0x0008 | 0x0204 | 0x020A | 0x020B | 0x020C | 0x1203 | 0x1383 => 2,
        0x0005 | 0x0006 | 0x0007 | 0x000D | 0x000E | 0x000F | 0x0019 | 0x0030 | 0x0201 | 0x0205 | 0x020D
        | 0x020E | 0x020F | 0x0210 | 0x0302 | 0x0304 | 0x0420 | 0x0421 | 0x0422 | 0x0425 | 0x0426
        | 0x0427 | 0x0501 | 0x1201 | 0x1380 => 1,
        _ => return None,
    })
}

/// Checks the TLV area of a message PDU (submit_sm, deliver_sm, data_sm): every TLV's header and
/// value inside the PDU, and the length of fixed-size tags right.
pub fn check_tlvs(id: CommandId, body: &[u8]) -> Result<(), CommandStatus> {
    if !matches!(id, CommandId::SubmitSm | CommandId::DeliverSm | CommandId::DataSm) {
        return Ok(());
    }
    let Some(mut at) = tlv_start(id, body) else {
        return Err(CommandStatus::EsmeRinvcmdlen);
    };
    while at < body.len() {
        let Some(header) = body.get(at..at + 4) else {
            return Err(CommandStatus::EsmeRinvtlvlen);
        };
        let tag = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        at += 4;
        if at + length > body.len() {
            return Err(CommandStatus::EsmeRinvtlvlen);
        }
        if fixed_length(tag).is_some_and(|fixed| fixed != length) {
            return Err(CommandStatus::EsmeRinvtlvlen);
        }
        at += length;
    }
    Ok(())
}

/// Parses a frame. A rejection says what to answer; the connection stays.
pub fn decode(frame: &Frame) -> Result<Command, Rejection> {
    let id = CommandId::from(frame.command_id);
    let nack = |status| Rejection { status, sequence: frame.sequence, answer: CommandId::GenericNack };
    if !is_known(id) {
        return Err(nack(CommandStatus::EsmeRinvcmdid));
    }
    if let Err(status) = check_tlvs(id, &frame.bytes[HEADER..]) {
        let answer = response_id(id).unwrap_or(CommandId::GenericNack);
        return Err(Rejection { status, sequence: frame.sequence, answer });
    }
    let mut src = BytesMut::from(&frame.bytes[4..]);
    let length = frame.bytes.len() - 4;
    match <Command as rusmpp::decode::DecodeWithLength>::decode(&mut src, length) {
        Ok((command, _)) => {
            if let Some(tlvs) = tlvs(&command)
                && tlvs.iter().any(|t| {
                    t.value()
                        .is_some_and(|v| rusmpp::encode::Length::length(v) != usize::from(t.value_length()))
                })
            {
                let answer = response_id(id).unwrap_or(CommandId::GenericNack);
                return Err(Rejection {
                    status: CommandStatus::EsmeRinvtlvlen,
                    sequence: frame.sequence,
                    answer,
                });
            }
            Ok(command)
        }
        Err(_) => Err(nack(CommandStatus::EsmeRinvcmdlen)),
    }
}

/// Encodes a command with its length.
pub fn encode(command: &Command) -> Vec<u8> {
    use rusmpp::encode::{Length, owned::Encode};
    let length = 4 + command.length();
    let mut out = BytesMut::with_capacity(length);
    out.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
    command.encode(&mut out);
    out.to_vec()
}

/// A bare response or nack with no body (enquire_link_resp, unbind_resp, generic_nack), or a
/// response with an empty message id, from raw fields: used for rejections, where no typed PDU
/// is at hand.
pub fn raw_response(answer: CommandId, status: CommandStatus, sequence: u32) -> Vec<u8> {
    let has_message_id = matches!(
        answer,
        CommandId::SubmitSmResp
            | CommandId::DeliverSmResp
            | CommandId::DataSmResp
            | CommandId::SubmitMultiResp
    );
    let has_system_id = matches!(
        answer,
        CommandId::BindReceiverResp | CommandId::BindTransmitterResp | CommandId::BindTransceiverResp
    );
    let length: u32 = if has_message_id || has_system_id { 17 } else { 16 };
    let mut out = Vec::with_capacity(length as usize);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&u32::from(answer).to_be_bytes());
    out.extend_from_slice(&u32::from(status).to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes());
    if length == 17 {
        out.push(0);
    }
    out
}

/// The TLVs of a message PDU.
pub fn tlvs(command: &Command) -> Option<&[rusmpp::tlvs::Tlv]> {
    match command.pdu()? {
        Pdu::SubmitSm(p) => Some(p.tlvs()),
        Pdu::DeliverSm(p) => Some(p.tlvs()),
        Pdu::DataSm(p) => Some(p.tlvs()),
        _ => None,
    }
}

/// A USSD or SMS message as the channel sees it, whatever PDU carried it. Its `Debug` shows the
/// payload's length, not its content (a subscriber's answer may be a PIN).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub source: String,
    pub destination: String,
    pub service_type: String,
    pub esm_class: u8,
    pub data_coding: u8,
    /// short_message, or message_payload when present.
    pub payload: Vec<u8>,
    pub ussd_service_op: Option<u8>,
    pub its_session_info: Option<(u8, u8)>,
    pub user_message_reference: Option<u16>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("data_coding", &self.data_coding)
            .field("payload_len", &self.payload.len())
            .field("ussd_service_op", &self.ussd_service_op)
            .field("its_session_info", &self.its_session_info)
            .finish_non_exhaustive()
    }
}

/// A C-octet string's text, without its NUL.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The message a submit_sm, deliver_sm or data_sm carries.
pub fn message(command: &Command) -> Option<Message> {
    // The three PDUs name their common fields alike, in types of their own.
    macro_rules! common {
        ($p:expr, $short:expr) => {
            (
                c_string($p.source_addr.as_ref()),
                c_string($p.destination_addr.as_ref()),
                c_string($p.service_type.value().as_ref()),
                u8::from($p.esm_class),
                u8::from($p.data_coding),
                $short,
            )
        };
    }
    let (source, destination, service_type, esm_class, data_coding, short) = match command.pdu()? {
        Pdu::SubmitSm(p) => common!(p, p.short_message().as_ref().to_vec()),
        Pdu::DeliverSm(p) => common!(p, p.short_message().as_ref().to_vec()),
        Pdu::DataSm(p) => common!(p, Vec::new()),
        _ => return None,
    };
    let mut message = Message {
        source,
        destination,
        service_type,
        esm_class,
        data_coding,
        payload: short,
        ussd_service_op: None,
        its_session_info: None,
        user_message_reference: None,
    };
    for tlv in tlvs(command).unwrap_or_default() {
        match tlv.value() {
            Some(TlvValue::UssdServiceOp(op)) => message.ussd_service_op = Some(u8::from(*op)),
            Some(TlvValue::ItsSessionInfo(info)) => {
                message.its_session_info = Some((info.session_number, info.sequence_number))
            }
            Some(TlvValue::MessagePayload(payload)) => message.payload = payload.value.as_ref().to_vec(),
            Some(TlvValue::UserMessageReference(r)) => message.user_message_reference = Some(u16::from(*r)),
            _ => {}
        }
    }
    Some(message)
}

/// Which PDU carries a message out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Carrier {
    SubmitSm,
    DeliverSm,
    DataSm,
}

/// What to put in an outgoing message.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub carrier: Carrier,
    pub service_type: &'a str,
    pub source: &'a str,
    pub destination: &'a str,
    pub text: &'a str,
    pub ussd_service_op: Option<u8>,
    pub its_session_info: Option<(u8, u8)>,
    pub registered_delivery: bool,
}

/// Builds the command for an outgoing message: GSM 7-bit or UCS-2 as the text needs, in
/// short_message (message_payload for data_sm).
pub fn outgoing(message: &Outgoing<'_>, sequence: u32) -> Command {
    use rusmpp::types::{COctetString, OctetString};
    use rusmpp::values::{DataCoding, MessagePayload, RegisteredDelivery, ServiceType};
    let encoded = super::text::encode(message.text);
    let address = |a: &str| COctetString::<1, 21>::from_string(a.to_owned()).unwrap_or_default();
    let service_type =
        ServiceType::new(COctetString::from_string(message.service_type.to_owned()).unwrap_or_default());
    let data_coding = DataCoding::from(encoded.data_coding);
    let registered = if message.registered_delivery {
        RegisteredDelivery::from(1u8)
    } else {
        RegisteredDelivery::default()
    };
    let op = message.ussd_service_op.map(UssdServiceOp::from);
    let session = message.its_session_info.map(|(s, q)| ItsSessionInfo::new(s, q));
    let short = || OctetString::<0, 255>::from_slice(&encoded.bytes).unwrap_or_default();
    // submit_sm and deliver_sm are built alike, each with its own TLV type.
    macro_rules! short_message {
        ($pdu:ty, $tlv:ident) => {{
            let mut tlvs = Vec::new();
            tlvs.extend(op.map($tlv::UssdServiceOp));
            tlvs.extend(session.map($tlv::ItsSessionInfo));
            <$pdu>::builder()
                .service_type(service_type)
                .source_addr(address(message.source))
                .destination_addr(address(message.destination))
                .registered_delivery(registered)
                .data_coding(data_coding)
                .short_message(short())
                .tlvs(tlvs)
                .build()
                .into()
        }};
    }
    let pdu: Pdu = match message.carrier {
        Carrier::SubmitSm => {
            use rusmpp::tlvs::MessageSubmissionRequestTlvValue as V;
            short_message!(rusmpp::pdus::SubmitSm, V)
        }
        Carrier::DeliverSm => {
            use rusmpp::tlvs::MessageDeliveryRequestTlvValue as V;
            short_message!(rusmpp::pdus::DeliverSm, V)
        }
        Carrier::DataSm => {
            use rusmpp::tlvs::MessageSubmissionRequestTlvValue as V;
            let mut tlvs = vec![V::MessagePayload(MessagePayload::new(
                rusmpp::types::AnyOctetString::from_slice(&encoded.bytes),
            ))];
            tlvs.extend(op.map(V::UssdServiceOp));
            tlvs.extend(session.map(V::ItsSessionInfo));
            rusmpp::pdus::DataSm::builder()
                .service_type(service_type)
                .source_addr(address(message.source))
                .destination_addr(address(message.destination))
                .registered_delivery(registered)
                .data_coding(data_coding)
                .tlvs(tlvs)
                .build()
                .into()
        }
    };
    Command::new(CommandStatus::EsmeRok, sequence, pdu)
}

/// The fuzz target's body (`fuzz/fuzz_targets/smpp_pdu.rs`), here so that the tests replay the
/// fuzz seeds and random input through it too: frames are cut from `data` as a bind cuts them,
/// each goes through the TLV walk and rusmpp, a decoded message is read and re-encoded. Panics
/// if a decoded command does not re-encode to a frame of the same command; nothing else may.
#[doc(hidden)]
pub async fn exercise(data: &[u8]) {
    let mut input = data;
    for _ in 0..16 {
        let Ok(frame) = read_frame(&mut input, MAX_PDU).await else { return };
        match decode(&frame) {
            Ok(command) => {
                if let Some(message) = message(&command) {
                    let _ = super::text::decode(message.data_coding, &message.payload);
                }
                let bytes = encode(&command);
                let mut again = bytes.as_slice();
                match read_frame(&mut again, usize::MAX).await {
                    Ok(reframed) => assert_eq!(reframed.command_id, frame.command_id),
                    Err(error) => panic!("a decoded command does not re-encode: {error}"),
                }
            }
            Err(rejection) => {
                let _ = raw_response(rejection.answer, rejection.status, rejection.sequence);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
    }

    #[test]
    fn the_fuzz_seeds_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/smpp_pdu");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/smpp_pdu") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("seed");
            block_on(exercise(&bytes));
            count += 1;
        }
        assert!(count >= 5, "{count} seeds");
    }

    #[test]
    fn a_tlv_of_the_wrong_length_is_refused_where_rusmpp_accepts_it() {
        // submit_sm: service_type, addresses, the fixed fields, a 1-octet short_message, then
        // ussd_service_op declared 2 octets long.
        let mut body = b"USSD\0\x01\x01994501111111\0\0\0*150\0\0\0\0\0\0\0\0\0\0\x011".to_vec();
        body.extend_from_slice(&[0x05, 0x01, 0x00, 0x02, 0x01, 0x00]);
        assert_eq!(check_tlvs(CommandId::SubmitSm, &body), Err(CommandStatus::EsmeRinvtlvlen));
        let fixed = body.len() - 6;
        body.truncate(fixed);
        body.extend_from_slice(&[0x05, 0x01, 0x00, 0x01, 0x01]);
        assert_eq!(check_tlvs(CommandId::SubmitSm, &body), Ok(()));
        body.extend_from_slice(&[0x13, 0x83, 0x00, 0x02, 0x07]);
        assert_eq!(check_tlvs(CommandId::SubmitSm, &body), Err(CommandStatus::EsmeRinvtlvlen));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            block_on(exercise(&data));
        }

        #[test]
        fn a_valid_header_with_an_arbitrary_body_never_panics(
            id in prop::sample::select(vec![0x04u32, 0x05, 0x103, 0x09, 0x01, 0x02, 0x15, 0x06, 0x80000004, 0x80000005]),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&u32::try_from(16 + body.len()).unwrap_or(0).to_be_bytes());
            bytes.extend_from_slice(&id.to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
            bytes.extend_from_slice(&body);
            block_on(exercise(&bytes));
        }
    }
}
