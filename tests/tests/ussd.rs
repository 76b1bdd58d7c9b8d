//! USSD over SMPP end to end: the demo server in-process, a simulated operator gateway bound to
//! it over loopback. Transcripts (`tests/ussd/*.txt`: `> input`, `< screen line`, `= end`) run
//! whole dialogues; the other tests cover binds, malformed PDUs, windows, retransmissions,
//! dropped sessions and SMS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use channels::config::Config;
use channels::server::{Running, ServeOptions, start};
use channels::ussd::gateway::{Gateway, GatewayError};
use serde_json::Value;

pub struct UssdServer {
    pub running: Option<Running>,
    pub smpp: SocketAddr,
    pub demo: Value,
}

pub fn config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.server.shards = Some(2);
    config.server.views = true;
    config.server.secret = Some("22".repeat(32));
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.smpp.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

impl UssdServer {
    pub async fn start(dir: &Path) -> anyhow::Result<UssdServer> {
        UssdServer::start_with(config(dir)).await
    }

    pub async fn start_with(config: Config) -> anyhow::Result<UssdServer> {
        let demo_path = config.server.data_dir.join("demo.json");
        let running = start(config, ServeOptions { demo: true, metrics: false }).await?;
        let demo: Value = serde_json::from_str(&std::fs::read_to_string(demo_path)?)?;
        let smpp = running.smpp_addr.ok_or_else(|| anyhow::anyhow!("no SMPP port"))?;
        Ok(UssdServer { running: Some(running), smpp, demo })
    }

    pub fn operator(&self) -> (String, String) {
        let operator = &self.demo["smpp"]["operators"][0];
        (
            operator["system_id"].as_str().unwrap_or_default().to_owned(),
            operator["password"].as_str().unwrap_or_default().to_owned(),
        )
    }

    pub async fn gateway(&self) -> Result<Arc<Gateway>, GatewayError> {
        let (system_id, password) = self.operator();
        Gateway::connect(self.smpp, &system_id, &password, "*150#").await
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        Ok(())
    }

    fn balanced(&self) -> bool {
        let Some(running) = &self.running else { return false };
        running.state.engine.totals().map(|t| t.values().all(|c| c.balanced())).unwrap_or(false)
    }
}

/// Runs a transcript: `@ msisdn` starts a dialogue for that number with the next `>` line as the
/// dial; `>` lines are the subscriber's input; consecutive `<` lines are the expected screen, in
/// which `*` matches any run of characters; `= end` says the dialogue ended with that screen.
async fn run_transcript(gateway: &Arc<Gateway>, name: &str, transcript: &str) -> anyhow::Result<()> {
    let mut msisdn = String::new();
    let mut dialogue = None;
    let mut last: Option<channels::ussd::gateway::GatewayScreen> = None;
    let mut expected: Vec<String> = Vec::new();
    let check =
        |expected: &mut Vec<String>, last: &Option<channels::ussd::gateway::GatewayScreen>, line: usize| {
            if expected.is_empty() {
                return Ok(());
            }
            let want = expected.join("\n");
            expected.clear();
            let got = last.as_ref().map(|s| s.text.clone()).unwrap_or_default();
            anyhow::ensure!(wildcard(&want, &got), "{name}:{line}: expected\n{want}\n--- got\n{got}\n---");
            Ok(())
        };
    for (n, line) in transcript.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(number) = line.strip_prefix("@ ") {
            check(&mut expected, &last, line_no)?;
            msisdn = number.trim().to_owned();
            dialogue = None;
        } else if let Some(input) = line.strip_prefix("> ") {
            check(&mut expected, &last, line_no)?;
            let screen = match dialogue.as_mut() {
                None => {
                    let (d, screen) = gateway.dial(&msisdn, input).await?;
                    dialogue = Some(d);
                    screen
                }
                Some(d) => d.answer(input).await?,
            };
            last = Some(screen);
        } else if let Some(text) = line.strip_prefix("< ") {
            expected.push(text.to_owned());
        } else if line == "<" {
            expected.push(String::new());
        } else if line.trim() == "= end" {
            check(&mut expected, &last, line_no)?;
            anyhow::ensure!(
                last.as_ref().is_some_and(|s| s.end),
                "{name}:{line_no}: the dialogue did not end"
            );
            dialogue = None;
        } else {
            anyhow::bail!("{name}:{line_no}: cannot read {line:?}");
        }
    }
    check(&mut expected, &last, transcript.lines().count() + 1)
}

/// `*` in `pattern` matches any run of characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(parts[0]) else { return false };
    for (i, part) in parts.iter().enumerate().skip(1) {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let gateway = server.gateway().await?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("ussd");
    let mut names: Vec<_> = std::fs::read_dir(&fixtures)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "no transcripts in {}", fixtures.display());
    for path in names {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&path)?;
        run_transcript(&gateway, &name, &text).await?;
    }
    assert!(server.balanced());
    server.stop().await
}

mod raw {
    //! A bare SMPP connection for malformed input.
    use std::net::SocketAddr;

    use channels::ussd::pdu::{self, Frame};
    use rusmpp::{Command, CommandStatus};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    pub struct Raw {
        pub stream: TcpStream,
    }

    impl Raw {
        pub async fn connect(at: SocketAddr) -> anyhow::Result<Raw> {
            Ok(Raw { stream: TcpStream::connect(at).await? })
        }

        pub async fn bind(at: SocketAddr, system_id: &str, password: &str) -> anyhow::Result<(Raw, Frame)> {
            let mut raw = Raw::connect(at).await?;
            let frame = raw.round_trip(bind_pdu(system_id, password, 1)).await?;
            Ok((raw, frame))
        }

        pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
            self.stream.write_all(bytes).await?;
            Ok(())
        }

        pub async fn read(&mut self) -> anyhow::Result<Frame> {
            let frame = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                pdu::read_frame(&mut self.stream, pdu::MAX_PDU),
            )
            .await??;
            Ok(frame)
        }

        pub async fn round_trip(&mut self, bytes: Vec<u8>) -> anyhow::Result<Frame> {
            self.send(&bytes).await?;
            self.read().await
        }

        /// Whether the server closed the connection.
        pub async fn closed(&mut self) -> bool {
            matches!(
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    pdu::read_frame(&mut self.stream, pdu::MAX_PDU)
                )
                .await,
                Ok(Err(pdu::FrameError::Closed | pdu::FrameError::Io(_)))
            )
        }
    }

    pub fn bind_pdu(system_id: &str, password: &str, sequence: u32) -> Vec<u8> {
        use rusmpp::pdus::BindTransceiver;
        use rusmpp::types::COctetString;
        let bind = BindTransceiver::builder()
            .system_id(COctetString::from_string(system_id.to_owned()).unwrap_or_default())
            .password(COctetString::from_string(password.to_owned()).unwrap_or_default())
            .build();
        pdu::encode(&Command::new(CommandStatus::EsmeRok, sequence, bind))
    }

    /// A subscriber's dial as a gateway sends it.
    pub fn dial(msisdn: &str, text: &str, sequence: u32) -> Vec<u8> {
        let command = pdu::outgoing(
            &pdu::Outgoing {
                carrier: pdu::Carrier::SubmitSm,
                service_type: "USSD",
                source: msisdn,
                destination: "*150",
                text,
                ussd_service_op: Some(1),
                its_session_info: Some((9, 0)),
                registered_delivery: false,
            },
            sequence,
        );
        pdu::encode(&command)
    }
}

const SUBMIT_SM_RESP: u32 = 0x8000_0004;
const GENERIC_NACK: u32 = 0x8000_0000;
const BIND_TRANSCEIVER_RESP: u32 = 0x8000_0009;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_are_authenticated_and_stateful() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let (system_id, password) = server.operator();
    // A wrong password, an unknown system_id: refused, and the connection closed.
    let (mut raw, frame) = raw::Raw::bind(server.smpp, &system_id, "wrong").await?;
    assert_eq!((frame.command_id, frame.status), (BIND_TRANSCEIVER_RESP, 0x0E));
    assert!(raw.closed().await);
    let (mut raw, frame) = raw::Raw::bind(server.smpp, "nobody", &password).await?;
    assert_eq!((frame.command_id, frame.status), (BIND_TRANSCEIVER_RESP, 0x0F));
    assert!(raw.closed().await);
    // A message before binding: ESME_RINVBNDSTS.
    let mut raw = raw::Raw::connect(server.smpp).await?;
    let frame = raw.round_trip(raw::dial("994501111111", "*150#", 7)).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (SUBMIT_SM_RESP, 0x04, 7));
    // Bound; a second bind on the same connection: ESME_RALYBND.
    let frame = raw.round_trip(raw::bind_pdu(&system_id, &password, 8)).await?;
    assert_eq!(frame.status, 0);
    let frame = raw.round_trip(raw::bind_pdu(&system_id, &password, 9)).await?;
    assert_eq!((frame.command_id, frame.status), (BIND_TRANSCEIVER_RESP, 0x05));
    // enquire_link answered; unbind answered and the connection closed.
    let frame = raw
        .round_trip(channels::ussd::pdu::raw_response(
            rusmpp::CommandId::EnquireLink,
            rusmpp::CommandStatus::EsmeRok,
            10,
        ))
        .await?;
    assert_eq!((frame.command_id, frame.sequence), (0x8000_0015, 10));
    let frame = raw
        .round_trip(channels::ussd::pdu::raw_response(
            rusmpp::CommandId::Unbind,
            rusmpp::CommandStatus::EsmeRok,
            11,
        ))
        .await?;
    assert_eq!((frame.command_id, frame.sequence), (0x8000_0006, 11));
    assert!(raw.closed().await);
    server.stop().await
}

/// A valid dial with its ussd_service_op TLV's length field set to `declared`, and `extra`
/// octets after it.
fn with_bad_tlv(declared: u16, extra: &[u8], sequence: u32) -> Vec<u8> {
    let mut bytes = raw::dial("994501111111", "*150#", sequence);
    let at = bytes.windows(4).position(|w| w == [0x05, 0x01, 0x00, 0x01]).unwrap_or(0);
    bytes[at + 2..at + 4].copy_from_slice(&declared.to_be_bytes());
    bytes.extend_from_slice(extra);
    let length = u32::try_from(bytes.len()).unwrap_or(0);
    bytes[..4].copy_from_slice(&length.to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pdus_get_the_right_status_and_harm_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let (system_id, password) = server.operator();
    let (mut raw, frame) = raw::Raw::bind(server.smpp, &system_id, &password).await?;
    assert_eq!(frame.status, 0);
    // An unknown command: generic_nack ESME_RINVCMDID; the connection stays.
    let unknown = [0, 0, 0, 16, 0, 0, 0x09, 0x99, 0, 0, 0, 0, 0, 0, 0, 21];
    let frame = raw.round_trip(unknown.to_vec()).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (GENERIC_NACK, 0x03, 21));
    // A TLV longer than its type (ussd_service_op is one octet): ESME_RINVTLVLEN.
    let frame = raw.round_trip(with_bad_tlv(2, &[], 22)).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (SUBMIT_SM_RESP, 0xC2, 22));
    // A TLV running past the end of the PDU: ESME_RINVTLVLEN.
    let frame = raw.round_trip(with_bad_tlv(1, &[0x13, 0x83, 0x00, 0x40, 0x01], 23)).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (SUBMIT_SM_RESP, 0xC2, 23));
    // A submit_sm whose body does not parse: generic_nack ESME_RINVCMDLEN; the connection stays.
    let mut garbage = vec![0, 0, 0, 24, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 24];
    garbage.extend_from_slice(&[0xFF; 8]);
    let frame = raw.round_trip(garbage).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (SUBMIT_SM_RESP, 0x02, 24));
    let frame = raw.round_trip(raw::dial("994501111111", "*150#", 25)).await?;
    assert_eq!((frame.command_id, frame.status, frame.sequence), (SUBMIT_SM_RESP, 0, 25));
    // command_length below 16: generic_nack, then the connection closes (it cannot be re-framed).
    raw.send(&[0, 0, 0, 8, 0, 0, 0, 0x15, 0, 0, 0, 0, 0, 0, 0, 26]).await?;
    let mut nack = None;
    while let Ok(frame) = raw.read().await {
        if frame.command_id == GENERIC_NACK {
            nack = Some(frame);
            break;
        }
    }
    assert_eq!(nack.map(|f| f.status), Some(0x02));
    assert!(raw.closed().await);
    // A huge command_length, and garbage bytes (an HTTP request): the same.
    for junk in [
        vec![0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 27],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ] {
        let (mut raw, _) = raw::Raw::bind(server.smpp, &system_id, &password).await?;
        let frame = raw.round_trip(junk).await?;
        assert_eq!((frame.command_id, frame.status), (GENERIC_NACK, 0x02));
        assert!(raw.closed().await);
    }
    // The server is unharmed: a whole dialogue still works.
    let gateway = server.gateway().await?;
    let (_, screen) = gateway.dial("+994552222222", "*150*1*2222#").await?;
    assert!(screen.end && screen.text.starts_with("Balans"), "{screen:?}");
    assert!(server.balanced());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_the_window_is_throttled() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path());
    let mut operator =
        channels::demo::smpp_operator(&engine::secret::ServerSecret::from_hex(&"22".repeat(32))?);
    operator.window = 1;
    config.smpp.operators.push(operator.clone());
    let mut server = UssdServer::start_with(config).await?;
    let (mut raw, frame) = raw::Raw::bind(server.smpp, &operator.system_id, &operator.password).await?;
    assert_eq!(frame.status, 0);
    // Three dials in one write: the first is being answered (a wallet lookup) when the others
    // arrive.
    let mut burst = raw::dial("994501111111", "*150#", 31);
    burst.extend(raw::dial("994552222222", "*150#", 32));
    burst.extend(raw::dial("994703333333", "*150#", 33));
    raw.send(&burst).await?;
    let mut statuses = std::collections::BTreeMap::new();
    while statuses.len() < 3 {
        let frame = raw.read().await?;
        if frame.command_id == SUBMIT_SM_RESP {
            statuses.insert(frame.sequence, frame.status);
        }
    }
    assert_eq!(statuses[&31], 0, "{statuses:?}");
    assert!(statuses.values().any(|&s| s == 0x58), "ESME_RTHROTTLED expected: {statuses:?}");
    server.stop().await
}

async fn balance(server: &UssdServer, msisdn: &str) -> anyhow::Result<i128> {
    let running = server.running.as_ref().ok_or_else(|| anyhow::anyhow!("stopped"))?;
    let domain = &running.state.domain;
    let view = domain.wallet(domain.msisdn(msisdn)?).await?;
    Ok(view.accounts[0].account.balance_posted())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_pin_step_moves_money_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let gateway = server.gateway().await?;
    let before = balance(&server, "+994501111111").await?;
    let (mut dialogue, _) = gateway.dial("994501111111", "*150*2*0552222222*3#").await?;
    let screen = dialogue.answer("1").await?;
    assert!(screen.text.contains("PIN"), "{screen:?}");
    let sequence = gateway.next_sequence();
    let first = gateway.send_as(sequence, "994501111111", "1111", 18, Some((0, 6))).await?;
    let again = gateway.send_as(sequence, "994501111111", "1111", 18, Some((0, 6))).await;
    assert!(first.end && first.text.contains("göndərildi"), "{first:?}");
    // The retransmission gets the same screen (or, if the session had already closed, a
    // "session over" screen); either way the money moved once.
    if let Ok(again) = again {
        assert!(again.text == first.text || again.text.contains("Sessiya bitib"), "{again:?}");
    }
    let fee = before - balance(&server, "+994501111111").await? - 300;
    assert!((0..100).contains(&fee), "moved once: fee {fee}");
    assert!(server.balanced());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_moves_nothing_and_sms_go_over_the_binds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path());
    config.smpp.session_idle_s = 1;
    let mut server = UssdServer::start_with(config).await?;
    let gateway = server.gateway().await?;
    let before = balance(&server, "+994501111111").await?;
    let (mut dialogue, _) = gateway.dial("994501111111", "*150*2*0552222222*4#").await?;
    dialogue.answer("1").await?;
    // The subscriber walks away at the PIN prompt; the session times out.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let late = dialogue.answer("1111").await?;
    assert!(late.end && late.text.contains("Sessiya bitib"), "{late:?}");
    assert_eq!(balance(&server, "+994501111111").await?, before);
    // A completed transfer: both parties' notifications come over the bind, after the commit.
    let (mut dialogue, _) = gateway.dial("994501111111", "*150*2*0552222222*4#").await?;
    dialogue.answer("1").await?;
    let done = dialogue.answer("1111").await?;
    assert!(done.end && done.text.contains("göndərildi"), "{done:?}");
    eventually(|| told(&gateway, "994552222222", "received 4.00")).await;
    // The notifications of the demo's cash-ins, written to the outbox before any bind existed,
    // went out over the bind once it was up.
    assert!(told(&gateway, "994552222222", "received"), "{:?}", sms(&gateway));
    // On redial, the last operation is there.
    let (_, last) = gateway.dial("994501111111", "*150*7#").await?;
    assert!(last.text.contains("+994552222222"), "{last:?}");
    server.stop().await
}

/// The SMS a gateway received, as (number, text).
fn sms(gateway: &Gateway) -> Vec<(String, String)> {
    gateway.sms.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Whether `gateway` received an SMS to `to` whose text contains `what`.
fn told(gateway: &Gateway, to: &str, what: &str) -> bool {
    sms(gateway).iter().any(|(number, text)| number == to && text.contains(what))
}

/// Waits up to 5 s for `done`; says whether it came.
async fn eventually(done: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    done()
}

/// Starts a server again on `dir` right after a stop, retrying while the stores of the stopped
/// one still hold their file locks (sled releases them from its own threads a moment later).
async fn start_again(dir: &Path) -> anyhow::Result<UssdServer> {
    let mut tries = 0;
    loop {
        match UssdServer::start(dir).await {
            Ok(server) => return Ok(server),
            Err(error) if tries < 100 && format!("{error:#}").contains("could not acquire lock") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_handed_to_the_binds_but_not_taken_by_an_smsc_survive_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    // The demo's cash-ins notified their wallets. No bind is up: once the notice has been handed
    // to the SMS queue (the demo handset sees it then), it waits there for a bind.
    let payee = 994_552_222_222_u64;
    let handed = |server: &UssdServer| {
        server
            .running
            .as_ref()
            .and_then(|r| r.demo_inbox.as_ref())
            .is_some_and(|inbox| inbox.messages(payee).iter().any(|m| m.contains("received 100.00")))
    };
    assert!(eventually(|| handed(&server)).await, "the notice never reached the SMS queue");
    // The server stops with the SMS still queued in memory; the outbox must still hold it.
    server.stop().await?;
    let mut server = start_again(dir.path()).await?;
    let gateway = server.gateway().await?;
    assert!(eventually(|| told(&gateway, "994552222222", "received 100.00")).await, "{:?}", sms(&gateway));
    // Taken by the SMSC now: acknowledged, so a third start sends it no more.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.stop().await?;
    let mut server = start_again(dir.path()).await?;
    let gateway = server.gateway().await?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!told(&gateway, "994552222222", "received 100.00"), "{:?}", sms(&gateway));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_go_over_the_binds_of_the_operator_whose_prefixes_claim_the_number() -> anyhow::Result<()> {
    use channels::config::{OperatorSection, SessionReference, SmppMode};
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path());
    // Operator A serves +994 50 (the payer below), operator B +994 55 (the payee).
    for (name, system_id, prefix) in [("operator-a", "op-a", "99450"), ("operator-b", "op-b", "99455")] {
        config.smpp.operators.push(OperatorSection {
            name: name.into(),
            system_id: system_id.into(),
            password: "secret".into(),
            allowed_addresses: Vec::new(),
            max_binds: 2,
            window: 64,
            throughput_per_s: 1000,
            mode: SmppMode::Server,
            connect: None,
            outbound: None,
            session_reference: SessionReference::ItsSessionInfo,
            service_type: "USSD".into(),
            sms_source: "Qepik".into(),
            sms_prefixes: vec![prefix.into()],
        });
    }
    let mut server = UssdServer::start_with(config).await?;
    let operator_a = Gateway::connect(server.smpp, "op-a", "secret", "*150#").await?;
    let operator_b = Gateway::connect(server.smpp, "op-b", "secret", "*150#").await?;
    // A transfer dialled through operator A from +994 50 to +994 55: each party is told over
    // their own operator's bind.
    let (mut dialogue, _) = operator_a.dial("994501111111", "*150*2*0552222222*4#").await?;
    dialogue.answer("1").await?;
    let done = dialogue.answer("1111").await?;
    assert!(done.end && done.text.contains("göndərildi"), "{done:?}");
    eventually(|| {
        told(&operator_b, "994552222222", "received 4.00") && told(&operator_a, "994501111111", "sent 4.00")
    })
    .await;
    assert!(told(&operator_b, "994552222222", "received 4.00"), "{:?}", sms(&operator_b));
    assert!(told(&operator_a, "994501111111", "sent 4.00"), "{:?}", sms(&operator_a));
    // Neither notice went over the other operator's bind.
    assert!(!told(&operator_a, "994552222222", "4.00"), "{:?}", sms(&operator_a));
    assert!(!told(&operator_b, "994501111111", "4.00"), "{:?}", sms(&operator_b));
    // And back, dialled through operator B (notices in the other order: a bind chosen by turns
    // would now get them wrong).
    let (mut dialogue, _) = operator_b.dial("994552222222", "*150*2*0501111111*3#").await?;
    dialogue.answer("1").await?;
    let done = dialogue.answer("2222").await?;
    assert!(done.end && done.text.contains("göndərildi"), "{done:?}");
    eventually(|| {
        told(&operator_b, "994552222222", "sent 3.00") && told(&operator_a, "994501111111", "received 3.00")
    })
    .await;
    assert!(told(&operator_b, "994552222222", "sent 3.00"), "{:?}", sms(&operator_b));
    assert!(told(&operator_a, "994501111111", "received 3.00"), "{:?}", sms(&operator_a));
    assert!(!told(&operator_a, "994552222222", "3.00") && !told(&operator_b, "994501111111", "3.00"));
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_binds_to_the_gateway_and_rebinds_after_a_drop() -> anyhow::Result<()> {
    use channels::config::{OperatorSection, SessionReference, SmppMode};
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = config(dir.path());
    config.smpp.listen = None;
    config.smpp.operators.push(OperatorSection {
        name: "operator-b".into(),
        system_id: "qepik".into(),
        password: "secret1".into(),
        allowed_addresses: Vec::new(),
        max_binds: 1,
        window: 16,
        throughput_per_s: 1000,
        mode: SmppMode::Client,
        connect: Some(listener.local_addr()?),
        outbound: None,
        session_reference: SessionReference::ItsSessionInfo,
        service_type: "USSD".into(),
        sms_source: "Qepik".into(),
        sms_prefixes: Vec::new(),
    });
    let demo_path = dir.path().join("demo.json");
    let running = start(config, ServeOptions { demo: true, metrics: false }).await?;
    assert!(running.smpp_addr.is_none() && demo_path.exists());
    // Qepik binds to the gateway; the subscriber's messages go as deliver_sm, the screens come
    // back as submit_sm.
    let gateway = Gateway::accept(&listener, "qepik", "secret1", "*150#").await?;
    let (_, screen) = gateway.dial("994552222222", "*150*1*2222#").await?;
    assert!(screen.end && screen.text.starts_with("Balans: 100.00 AZN"), "{screen:?}");
    // The gateway drops the connection; Qepik binds again (after its backoff).
    gateway.close().await;
    // Generous: the backoff is 1 s, but a loaded CI machine may run many tests at once.
    let gateway = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        Gateway::accept(&listener, "qepik", "secret1", "*150#"),
    )
    .await??;
    let (mut dialogue, screen) = gateway.dial("994552222222", "*150#").await?;
    assert!(screen.text.starts_with("Qepik\n1 Balans"), "{screen:?}");
    let screen = dialogue.answer("1").await?;
    assert!(screen.text.contains("PIN"), "{screen:?}");
    running.shutdown().await
}

/// python-smpplib, an SMPP client written by others, completes a USSD session. Skipped (with a
/// note) when smpplib is not installed, unless `QEPIK_INTEROP=1` (`.ci/run` installs it and sets
/// that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smpplib_completes_a_ussd_session() -> anyhow::Result<()> {
    let required = std::env::var("QEPIK_INTEROP").is_ok_and(|v| v == "1");
    let present = std::process::Command::new("python3")
        .args(["-c", "import smpplib"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        anyhow::ensure!(!required, "QEPIK_INTEROP=1 but python3 cannot import smpplib");
        eprintln!("skipped: python3 -m pip install smpplib==2.2.4 to run it");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let (system_id, password) = server.operator();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/smpplib_ussd.py");
    let port = server.smpp.port().to_string();
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port, &system_id, &password, "994552222222", "2222"])
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("USSD session completed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(server.balanced());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialects_data_sm_both_ways_and_delivery_receipts() -> anyhow::Result<()> {
    use channels::ussd::pdu::{Carrier, Outgoing, outgoing};
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path());
    let mut operator =
        channels::demo::smpp_operator(&engine::secret::ServerSecret::from_hex(&"22".repeat(32))?);
    operator.outbound = Some(Carrier::DataSm);
    config.smpp.operators.push(operator.clone());
    let mut server = UssdServer::start_with(config).await?;
    let (mut raw, frame) = raw::Raw::bind(server.smpp, &operator.system_id, &operator.password).await?;
    assert_eq!(frame.status, 0);
    // A dial in a data_sm: answered with data_sm_resp, the screen comes back as a data_sm with
    // its text in message_payload.
    let dial = outgoing(
        &Outgoing {
            carrier: Carrier::DataSm,
            service_type: "USSD",
            source: "994552222222",
            destination: "*150",
            text: "*150*1#",
            ussd_service_op: Some(1),
            its_session_info: Some((3, 0)),
            registered_delivery: false,
        },
        41,
    );
    raw.send(&channels::ussd::pdu::encode(&dial)).await?;
    let mut screen = None;
    while screen.is_none() {
        let frame = raw.read().await?;
        match frame.command_id {
            0x8000_0103 => assert_eq!((frame.status, frame.sequence), (0, 41)),
            0x0000_0103 => {
                let command = channels::ussd::pdu::decode(&frame).map_err(|r| anyhow::anyhow!("{r:?}"))?;
                let message =
                    channels::ussd::pdu::message(&command).ok_or_else(|| anyhow::anyhow!("no message"))?;
                if message.ussd_service_op.is_some() {
                    screen = Some(message);
                }
            }
            _ => {}
        }
    }
    let screen = screen.ok_or_else(|| anyhow::anyhow!("no screen"))?;
    let text = channels::ussd::text::decode(screen.data_coding, &screen.payload)?;
    assert_eq!((screen.ussd_service_op, screen.its_session_info), (Some(2), Some((3, 2))));
    assert_eq!(text, "PIN-i daxil edin");
    // A delivery receipt for an SMS of ours: accepted and counted.
    let mut receipt = outgoing(
        &Outgoing {
            carrier: Carrier::SubmitSm,
            service_type: "",
            source: "994552222222",
            destination: "Qepik",
            text: "id:7 sub:001 dlvrd:001 submit date:2611231200 done date:2611231200 stat:DELIVRD err:000",
            ussd_service_op: None,
            its_session_info: None,
            registered_delivery: false,
        },
        42,
    );
    if let Some(rusmpp::Pdu::SubmitSm(sm)) = receipt.pdu().cloned() {
        let mut sm = sm;
        sm.esm_class = rusmpp::values::EsmClass::from(0x04u8);
        receipt.set_pdu(sm);
    }
    raw.send(&channels::ussd::pdu::encode(&receipt)).await?;
    loop {
        let frame = raw.read().await?;
        if frame.command_id == SUBMIT_SM_RESP && frame.sequence == 42 {
            assert_eq!(frame.status, 0);
            break;
        }
    }
    let delivered =
        server.running.as_ref().map(|r| r.ussd.delivered.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(delivered, Some(1));
    server.stop().await
}
