//! One SMPP bind: the connection's reader loop (framing, bind state, window, throughput,
//! enquire_link, unbind) and its writer task. The same code runs both sides of a bind: as the
//! message centre (server mode, an operator's gateway bound to Qepik) or as the ESME (client
//! mode, Qepik bound to the gateway).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::pdu::{self, Carrier, Frame, FrameError, Message};
use super::{Ussd, session::Inbound};
use crate::config::{OperatorSection, SessionReference, SmppMode};

/// Which end of the bind Qepik is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The message centre: the gateway bound to us.
    Smsc,
    /// The ESME: we bound to the gateway.
    Esme,
}

/// How the bind was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    Transmitter,
    Receiver,
    Transceiver,
}

struct Pending {
    sent: Instant,
    _permit: OwnedSemaphorePermit,
    waiter: Option<oneshot::Sender<Command>>,
}

/// A token bucket of `rate` a second, one second's burst.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket { rate: f64::from(rate), tokens: f64::from(rate), at: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A live bind, shared by its reader loop, the session actors answering on it and the SMS
/// sender.
pub struct Link {
    pub id: u64,
    pub operator: Arc<OperatorSection>,
    pub role: Role,
    pub peer: SocketAddr,
    pub kind: BindKind,
    out: mpsc::Sender<Vec<u8>>,
    sequence: AtomicU32,
    pending: std::sync::Mutex<HashMap<u32, Pending>>,
    window: Arc<Semaphore>,
    /// The peer's requests Qepik has not answered yet.
    in_flight: AtomicUsize,
    inbound_rate: std::sync::Mutex<Bucket>,
    outbound_rate: std::sync::Mutex<Bucket>,
    closed: AtomicBool,
    last_heard: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("id", &self.id).field("operator", &self.operator.name).finish()
    }
}

impl Link {
    /// Whether Qepik may send messages on this bind.
    pub fn can_send(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        matches!(
            (self.role, self.kind),
            (_, BindKind::Transceiver)
                | (Role::Smsc, BindKind::Receiver)
                | (Role::Esme, BindKind::Transmitter)
        )
    }

    /// The PDU that carries Qepik's messages on this bind.
    pub fn carrier(&self) -> Carrier {
        self.operator.outbound.unwrap_or(match self.role {
            Role::Smsc => Carrier::DeliverSm,
            Role::Esme => Carrier::SubmitSm,
        })
    }

    fn next_sequence(&self) -> u32 {
        // 1..=0x7FFFFFFF, as SMPP wants.
        (self.sequence.fetch_add(1, Ordering::Relaxed) % 0x7FFF_FFFF) + 1
    }

    async fn write(&self, bytes: Vec<u8>) {
        let _ = self.out.send(bytes).await;
    }

    /// Answers a request of the peer.
    pub async fn respond(&self, command: Command) {
        self.write(pdu::encode(&command)).await;
    }

    /// A request of the peer is answered: its window slot frees.
    pub fn answered(&self) {
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Sends a request in Qepik's window (waiting for a slot); the response, if `wait`, comes
    /// through the returned receiver.
    pub async fn request(&self, pdu: Pdu, wait: bool) -> Option<oneshot::Receiver<Command>> {
        let permit = self.window.clone().acquire_owned().await.ok()?;
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let sequence = self.next_sequence();
        let (waiter, receiver) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sequence, Pending { sent: Instant::now(), _permit: permit, waiter });
        let command = Command::new(CommandStatus::EsmeRok, sequence, pdu);
        self.write(pdu::encode(&command)).await;
        receiver
    }

    /// Sends an outgoing message (a USSD screen or an SMS) in the bind's carrier.
    pub async fn send_message(
        &self,
        message: pdu::Outgoing<'_>,
        wait: bool,
    ) -> Option<oneshot::Receiver<Command>> {
        let command = pdu::outgoing(&message, 0);
        let pdu = command.pdu()?.clone();
        self.request(pdu, wait).await
    }

    /// Takes one SMS slot of the bind's throughput.
    pub fn take_outbound(&self) -> bool {
        self.outbound_rate.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.window.close();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Frees the window slots of requests unanswered for longer than `timeout`.
    fn expire(&self, timeout: Duration) {
        let now = Instant::now();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, p| now.duration_since(p.sent) < timeout);
    }
}

static LINK_IDS: AtomicU64 = AtomicU64::new(1);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Serves one connection until it closes. `operator` is known in client mode (we bound), and
/// found from the bind PDU in server mode.
pub async fn run<S>(
    ussd: Arc<Ussd>,
    stream: S,
    peer: SocketAddr,
    role: Role,
    client: Option<Arc<OperatorSection>>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(4096);
    let writer = tokio::spawn(async move {
        let mut write = tokio::io::BufWriter::new(write);
        while let Some(bytes) = out_rx.recv().await {
            if write.write_all(&bytes).await.is_err() {
                return;
            }
            while let Ok(more) = out_rx.try_recv() {
                if write.write_all(&more).await.is_err() {
                    return;
                }
            }
            if write.flush().await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut state = Conn { ussd: ussd.clone(), peer, role, out: out_tx.clone(), link: None, client };
    if let Some(operator) = state.client.clone() {
        // Client mode: bind first.
        if !state.bind_out(&mut reader, operator).await {
            drop(state);
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    }
    let enquire = Duration::from_secs(ussd.config.enquire_link_s);
    let timeout = Duration::from_secs(ussd.config.response_timeout_s);
    let mut stop = ussd.stop.subscribe();
    loop {
        let frame = tokio::select! {
            frame = pdu::read_frame(&mut reader, pdu::MAX_PDU) => frame,
            _ = tokio::time::sleep(enquire) => {
                if let Some(link) = &state.link {
                    link.expire(timeout);
                    let silent = now_ms().saturating_sub(link.last_heard.load(Ordering::Relaxed));
                    if silent > 3 * u64::try_from(enquire.as_millis()).unwrap_or(u64::MAX / 4) {
                        tracing::info!(operator = %link.operator.name, "smpp: peer silent; closing the bind");
                        break;
                    }
                    let link = link.clone();
                    tokio::spawn(async move { link.request(Pdu::EnquireLink, false).await });
                } else {
                    // Connected but never bound within the interval.
                    break;
                }
                continue;
            }
            _ = stop.changed() => {
                if let Some(link) = &state.link {
                    let link = link.clone();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async move {
                        if let Some(rx) = link.request(Pdu::Unbind, true).await {
                            let _ = rx.await;
                        }
                    }).await;
                }
                break;
            }
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(FrameError::BadLength { length, sequence }) => {
                tracing::warn!(%peer, length, "smpp: bad command_length; closing");
                let nack = pdu::raw_response(CommandId::GenericNack, CommandStatus::EsmeRinvcmdlen, sequence);
                let _ = out_tx.send(nack).await;
                break;
            }
            Err(FrameError::Closed) => break,
            Err(FrameError::Io(error)) => {
                tracing::debug!(%peer, %error, "smpp: read failed");
                break;
            }
        };
        if let Some(link) = &state.link {
            link.last_heard.store(now_ms(), Ordering::Relaxed);
        }
        if !state.handle(frame).await {
            break;
        }
    }
    if let Some(link) = state.link.take() {
        link.close();
        ussd.links.remove(link.id);
        tracing::info!(operator = %link.operator.name, %peer, "smpp: bind closed");
    }
    drop(state);
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

struct Conn {
    ussd: Arc<Ussd>,
    peer: SocketAddr,
    role: Role,
    out: mpsc::Sender<Vec<u8>>,
    link: Option<Arc<Link>>,
    client: Option<Arc<OperatorSection>>,
}

fn bind_resp(id: CommandId, system_id: &str) -> Pdu {
    use rusmpp::pdus::{BindReceiverResp, BindTransceiverResp, BindTransmitterResp};
    use rusmpp::types::COctetString;
    let system_id = COctetString::from_string(system_id.to_owned()).unwrap_or_default();
    match id {
        CommandId::BindReceiver => BindReceiverResp::new(system_id, None).into(),
        CommandId::BindTransmitter => BindTransmitterResp::new(system_id, None).into(),
        _ => BindTransceiverResp::new(system_id, None).into(),
    }
}

fn c_str(bytes: &[u8]) -> String {
    pdu::c_string(bytes)
}

impl Conn {
    fn new_link(&mut self, operator: Arc<OperatorSection>, kind: BindKind) -> Arc<Link> {
        let link = Arc::new(Link {
            id: LINK_IDS.fetch_add(1, Ordering::Relaxed),
            peer: self.peer,
            role: self.role,
            kind,
            out: self.out.clone(),
            sequence: AtomicU32::new(0),
            pending: Default::default(),
            window: Arc::new(Semaphore::new(operator.window)),
            in_flight: AtomicUsize::new(0),
            inbound_rate: std::sync::Mutex::new(Bucket::new(operator.throughput_per_s)),
            outbound_rate: std::sync::Mutex::new(Bucket::new(operator.throughput_per_s)),
            closed: AtomicBool::new(false),
            last_heard: AtomicU64::new(now_ms()),
            operator,
        });
        self.link = Some(link.clone());
        link
    }

    /// Client mode: sends bind_transceiver and waits for its answer.
    async fn bind_out<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        operator: Arc<OperatorSection>,
    ) -> bool {
        use rusmpp::pdus::BindTransceiver;
        use rusmpp::types::COctetString;
        use rusmpp::values::InterfaceVersion;
        let bind = BindTransceiver::builder()
            .system_id(COctetString::from_string(operator.system_id.to_owned()).unwrap_or_default())
            .password(COctetString::from_string(operator.password.to_owned()).unwrap_or_default())
            .system_type(COctetString::from_string(operator.service_type.to_owned()).unwrap_or_default())
            .interface_version(InterfaceVersion::Smpp3_4)
            .build();
        let command = Command::new(CommandStatus::EsmeRok, 1, bind);
        if self.out.send(pdu::encode(&command)).await.is_err() {
            return false;
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(self.ussd.config.response_timeout_s),
            pdu::read_frame(reader, pdu::MAX_PDU),
        )
        .await;
        match answer {
            Ok(Ok(frame))
                if frame.command_id == u32::from(CommandId::BindTransceiverResp) && frame.status == 0 =>
            {
                let link = self.new_link(operator.clone(), BindKind::Transceiver);
                // The bind took sequence number 1.
                link.sequence.store(1, Ordering::Relaxed);
                self.ussd.links.add(link);
                tracing::info!(operator = %operator.name, peer = %self.peer, "smpp: bound to the operator's gateway");
                true
            }
            Ok(Ok(frame)) => {
                tracing::warn!(operator = %operator.name, status = frame.status, "smpp: the gateway refused our bind");
                false
            }
            _ => {
                tracing::warn!(operator = %operator.name, "smpp: no answer to our bind");
                false
            }
        }
    }

    async fn send(&self, command: Command) {
        let _ = self.out.send(pdu::encode(&command)).await;
    }

    async fn reject(&self, answer: CommandId, status: CommandStatus, sequence: u32) {
        let _ = self.out.send(pdu::raw_response(answer, status, sequence)).await;
    }

    /// Handles one frame; false closes the connection.
    async fn handle(&mut self, frame: Frame) -> bool {
        let command = match pdu::decode(&frame) {
            Ok(command) => command,
            Err(rejection) => {
                metrics::counter!("qepik_smpp_rejected_total", "status" => format!("{:?}", rejection.status))
                    .increment(1);
                self.reject(rejection.answer, rejection.status, rejection.sequence).await;
                return true;
            }
        };
        let id = command.id();
        let sequence = command.sequence_number();
        if u32::from(id) & 0x8000_0000 != 0 {
            if let Some(link) = &self.link {
                let pending = link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&sequence);
                if let Some(Pending { waiter: Some(waiter), .. }) = pending {
                    let _ = waiter.send(command);
                }
            }
            return true;
        }
        match id {
            CommandId::EnquireLink => {
                self.send(Command::new(CommandStatus::EsmeRok, sequence, Pdu::EnquireLinkResp)).await;
                true
            }
            CommandId::Unbind => {
                self.send(Command::new(CommandStatus::EsmeRok, sequence, Pdu::UnbindResp)).await;
                false
            }
            CommandId::BindTransmitter | CommandId::BindReceiver | CommandId::BindTransceiver => {
                self.bind_in(&command).await
            }
            CommandId::SubmitSm | CommandId::DeliverSm | CommandId::DataSm => {
                self.message(command).await;
                true
            }
            _ => {
                let answer = pdu::response_id(id).unwrap_or(CommandId::GenericNack);
                let status = if self.link.is_none() {
                    CommandStatus::EsmeRinvbndsts
                } else {
                    CommandStatus::EsmeRinvcmdid
                };
                self.reject(answer, status, sequence).await;
                true
            }
        }
    }

    /// Server mode: a gateway binds.
    async fn bind_in(&mut self, command: &Command) -> bool {
        let id = command.id();
        let sequence = command.sequence_number();
        let answer = pdu::response_id(id).unwrap_or(CommandId::GenericNack);
        if self.link.is_some() {
            self.reject(answer, CommandStatus::EsmeRalybnd, sequence).await;
            return true;
        }
        if self.role == Role::Esme {
            self.reject(answer, CommandStatus::EsmeRinvcmdid, sequence).await;
            return true;
        }
        let (system_id, password, kind) = match command.pdu() {
            Some(Pdu::BindTransmitter(b)) => {
                (c_str(b.system_id.as_ref()), c_str(b.password.as_ref()), BindKind::Transmitter)
            }
            Some(Pdu::BindReceiver(b)) => {
                (c_str(b.system_id.as_ref()), c_str(b.password.as_ref()), BindKind::Receiver)
            }
            Some(Pdu::BindTransceiver(b)) => {
                (c_str(b.system_id.as_ref()), c_str(b.password.as_ref()), BindKind::Transceiver)
            }
            _ => return false,
        };
        let outcome = self.ussd.authenticate(&system_id, &password, self.peer.ip());
        let operator = match outcome {
            Ok(operator) => operator,
            Err(status) => {
                metrics::counter!("qepik_smpp_bind_refused_total").increment(1);
                tracing::warn!(peer = %self.peer, status = ?status, "smpp: bind refused");
                self.reject(answer, status, sequence).await;
                // A refused bind closes the connection: guessing costs a reconnect.
                return false;
            }
        };
        if self.ussd.links.count(&operator.name) >= operator.max_binds {
            tracing::warn!(operator = %operator.name, "smpp: bind refused, max_binds reached");
            self.reject(answer, CommandStatus::EsmeRbindfail, sequence).await;
            return false;
        }
        let link = self.new_link(operator.clone(), kind);
        self.ussd.links.add(link);
        self.send(Command::new(CommandStatus::EsmeRok, sequence, bind_resp(id, "qepik"))).await;
        tracing::info!(operator = %operator.name, peer = %self.peer, ?kind, "smpp: gateway bound");
        true
    }

    /// A submit_sm, deliver_sm or data_sm from the peer.
    async fn message(&mut self, command: Command) {
        let id = command.id();
        let sequence = command.sequence_number();
        let answer = pdu::response_id(id).unwrap_or(CommandId::GenericNack);
        let Some(link) = self.link.clone() else {
            self.reject(answer, CommandStatus::EsmeRinvbndsts, sequence).await;
            return;
        };
        // Which messages the peer may send us, by role and bind.
        let allowed = matches!(
            (self.role, id, link.kind),
            (
                Role::Smsc,
                CommandId::SubmitSm | CommandId::DataSm,
                BindKind::Transmitter | BindKind::Transceiver,
            ) | (
                Role::Esme,
                CommandId::DeliverSm | CommandId::DataSm,
                BindKind::Receiver | BindKind::Transceiver,
            )
        );
        if !allowed {
            self.reject(answer, CommandStatus::EsmeRinvbndsts, sequence).await;
            return;
        }
        if !link.inbound_rate.lock().unwrap_or_else(|p| p.into_inner()).take() {
            metrics::counter!("qepik_smpp_throttled_total", "reason" => "rate").increment(1);
            self.reject(answer, CommandStatus::EsmeRthrottled, sequence).await;
            return;
        }
        if link.in_flight.fetch_add(1, Ordering::AcqRel) >= link.operator.window {
            link.answered();
            metrics::counter!("qepik_smpp_throttled_total", "reason" => "window").increment(1);
            self.reject(answer, CommandStatus::EsmeRthrottled, sequence).await;
            return;
        }
        let Some(message) = pdu::message(&command) else {
            link.answered();
            self.reject(answer, CommandStatus::EsmeRsyserr, sequence).await;
            return;
        };
        // A delivery receipt for an SMS of ours.
        if message.esm_class & 0x3C == 0x04 {
            link.answered();
            self.ussd.receipt(&message);
            self.send_ok(answer, sequence).await;
            return;
        }
        let Some(op) = message.ussd_service_op else {
            // A plain SMS to Qepik: accepted and logged; there is no SMS menu.
            link.answered();
            tracing::debug!("smpp: a mobile-originated SMS without ussd_service_op, ignored");
            self.send_ok(answer, sequence).await;
            return;
        };
        let text = match super::text::decode(message.data_coding, &message.payload) {
            Ok(text) => text,
            Err(_) => {
                link.answered();
                self.reject(answer, CommandStatus::EsmeRinvdcs, sequence).await;
                return;
            }
        };
        let Ok(msisdn) = self.ussd.app.domain.msisdn(&message.source) else {
            link.answered();
            self.reject(answer, CommandStatus::EsmeRinvsrcadr, sequence).await;
            return;
        };
        let reference = match link.operator.session_reference {
            SessionReference::ItsSessionInfo => message.its_session_info.map(|(s, _)| u32::from(s)),
            SessionReference::UserMessageReference => message.user_message_reference.map(u32::from),
            SessionReference::None => None,
        };
        let inbound =
            Inbound { link: link.clone(), request: id, sequence, op, text, msisdn, message, reference };
        self.ussd.sessions.route(&self.ussd, inbound).await;
    }

    async fn send_ok(&self, answer: CommandId, sequence: u32) {
        self.send(ok_response(answer, sequence, "")).await;
    }
}

/// The OK answer to a message request, with `message_id`.
pub fn ok_response(answer: CommandId, sequence: u32, message_id: &str) -> Command {
    use rusmpp::pdus::{DataSmResp, DeliverSmResp, SubmitSmResp};
    use rusmpp::types::COctetString;
    let message_id = COctetString::from_string(message_id.to_owned()).unwrap_or_default();
    let pdu: Pdu = match answer {
        CommandId::SubmitSmResp => SubmitSmResp::new(message_id, Vec::new()).into(),
        CommandId::DataSmResp => DataSmResp::new(message_id, Vec::new()).into(),
        _ => DeliverSmResp::new(message_id, Vec::new()).into(),
    };
    Command::new(CommandStatus::EsmeRok, sequence, pdu)
}

/// The USSD reply to the subscriber message `message` arrived in.
pub fn screen_message<'a>(
    link: &Link,
    message: &'a Message,
    text: &'a str,
    end: bool,
    service_type: &'a str,
) -> pdu::Outgoing<'a> {
    let its_session_info = message.its_session_info.map(|(session, sequence)| {
        let next = ((sequence >> 1).wrapping_add(1)) << 1;
        (session, next | u8::from(end))
    });
    pdu::Outgoing {
        carrier: link.carrier(),
        service_type,
        source: &message.destination,
        destination: &message.source,
        text,
        ussd_service_op: Some(if end { super::session::PSSR_RESPONSE } else { super::session::USSR_REQUEST }),
        its_session_info,
        registered_delivery: false,
    }
}

/// Client mode: keeps a bind to the operator's gateway, reconnecting with backoff (1 s doubling
/// to 60 s), until the server stops.
pub async fn keep_bound(ussd: Arc<Ussd>, operator: Arc<OperatorSection>) {
    let Some(address) = operator.connect else { return };
    debug_assert_eq!(operator.mode, SmppMode::Client);
    let mut backoff = Duration::from_secs(1);
    let mut stop = ussd.stop.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let started = Instant::now();
                run(ussd.clone(), stream, address, Role::Esme, Some(operator.clone())).await;
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
            }
            Err(error) => tracing::warn!(operator = %operator.name, %error, "smpp: cannot reach the gateway"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}
