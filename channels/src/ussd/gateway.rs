//! An operator's USSD gateway, simulated: binds to Qepik as a transceiver (server mode) and
//! carries subscribers' dialogues as submit_sm in, deliver_sm out, the way a real gateway does.
//! The terminal phone (`qepik-phone`), the load tool and the tests use it. Several dialogues run
//! at once on one bind, one per MSISDN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::pdu::{self, Carrier, Outgoing};

/// A screen Qepik sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayScreen {
    pub text: String,
    /// `ussd_service_op` 17: the dialogue is over.
    pub end: bool,
    pub its_session_info: Option<(u8, u8)>,
    pub data_coding: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the bind was refused: status {0:#x}")]
    BindRefused(u32),
    #[error("Qepik answered status {0:#x}")]
    Status(u32),
    #[error("no answer in time")]
    Timeout,
    #[error("the connection closed")]
    Closed,
}

type Waiters<K, V> = std::sync::Mutex<HashMap<K, oneshot::Sender<V>>>;

/// A bound gateway.
#[derive(Debug)]
pub struct Gateway {
    out: mpsc::Sender<Vec<u8>>,
    sequence: AtomicU32,
    responses: Waiters<u32, u32>,
    screens: Waiters<String, GatewayScreen>,
    /// SMS Qepik sent that no dialogue waited for: (MSISDN, text).
    pub sms: std::sync::Mutex<Vec<(String, String)>>,
    sessions: AtomicU8,
    pub service_code: String,
    timeout: Duration,
    /// The PDU subscribers' messages travel in: submit_sm when the gateway bound to Qepik,
    /// deliver_sm when Qepik bound to it (client mode).
    carrier: Carrier,
}

impl Gateway {
    /// Connects to Qepik's SMPP port and binds as `system_id`.
    pub async fn connect(
        address: SocketAddr,
        system_id: &str,
        password: &str,
        service_code: &str,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (gateway, mut reader) = Gateway::over(stream, service_code, Carrier::SubmitSm);
        // Bind.
        let bind = {
            use rusmpp::pdus::BindTransceiver;
            use rusmpp::types::COctetString;
            use rusmpp::values::InterfaceVersion;
            BindTransceiver::builder()
                .system_id(COctetString::from_string(system_id.to_owned()).unwrap_or_default())
                .password(COctetString::from_string(password.to_owned()).unwrap_or_default())
                .system_type(COctetString::from_string("USSDGW".to_owned()).unwrap_or_default())
                .interface_version(InterfaceVersion::Smpp3_4)
                .build()
        };
        let _ = gateway.out.send(pdu::encode(&Command::new(CommandStatus::EsmeRok, 1, bind))).await;
        let frame = tokio::time::timeout(gateway.timeout, pdu::read_frame(&mut reader, pdu::MAX_PDU))
            .await
            .map_err(|_| GatewayError::Timeout)?
            .map_err(|_| GatewayError::Closed)?;
        if frame.status != 0 {
            return Err(GatewayError::BindRefused(frame.status));
        }
        gateway.clone().read_loop(reader);
        Ok(gateway)
    }

    fn over(
        stream: tokio::net::TcpStream,
        service_code: &str,
        carrier: Carrier,
    ) -> (Arc<Gateway>, BufReader<tokio::net::tcp::OwnedReadHalf>) {
        let (read, mut write) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(4096);
        tokio::spawn(async move {
            while let Some(bytes) = out_rx.recv().await {
                // An empty write is [`Gateway::close`], wherever it falls in a batch: what was
                // queued before it goes out, then the connection is shut.
                let mut batch = bytes;
                let mut close = batch.is_empty();
                while !close && let Ok(more) = out_rx.try_recv() {
                    close = more.is_empty();
                    batch.extend_from_slice(&more);
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
                if close {
                    let _ = write.shutdown().await;
                    return;
                }
            }
        });
        let gateway = Arc::new(Gateway {
            out,
            sequence: AtomicU32::new(1),
            responses: Default::default(),
            screens: Default::default(),
            sms: Default::default(),
            sessions: AtomicU8::new(0),
            service_code: service_code.to_owned(),
            timeout: Duration::from_secs(10),
            carrier,
        });
        (gateway, BufReader::new(read))
    }

    fn read_loop(self: Arc<Self>, mut reader: BufReader<tokio::net::tcp::OwnedReadHalf>) {
        tokio::spawn(async move {
            while let Ok(frame) = pdu::read_frame(&mut reader, pdu::MAX_PDU).await {
                self.incoming(frame).await;
            }
            // Dropping the waiters fails the dialogues in progress.
            self.responses.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.screens.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
    }

    /// Client mode's gateway: listens on `listener` for Qepik's bind as `system_id`, accepts
    /// it, and carries subscribers' messages as deliver_sm (Qepik answers with submit_sm).
    pub async fn accept(
        listener: &tokio::net::TcpListener,
        system_id: &str,
        password: &str,
        service_code: &str,
    ) -> Result<Arc<Gateway>, GatewayError> {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (gateway, mut reader) = Gateway::over(stream, service_code, Carrier::DeliverSm);
            let frame = tokio::time::timeout(gateway.timeout, pdu::read_frame(&mut reader, pdu::MAX_PDU))
                .await
                .map_err(|_| GatewayError::Timeout)?
                .map_err(|_| GatewayError::Closed)?;
            let Ok(command) = pdu::decode(&frame) else { continue };
            let Some(Pdu::BindTransceiver(bind)) = command.pdu() else { continue };
            let ok = pdu::c_string(bind.system_id.as_ref()) == system_id
                && pdu::c_string(bind.password.as_ref()) == password;
            let status = if ok { CommandStatus::EsmeRok } else { CommandStatus::EsmeRinvpaswd };
            let resp = rusmpp::pdus::BindTransceiverResp::new(
                rusmpp::types::COctetString::from_string("opgw".to_owned()).unwrap_or_default(),
                None,
            );
            let _ = gateway.out.send(pdu::encode(&Command::new(status, frame.sequence, resp))).await;
            if ok {
                gateway.clone().read_loop(reader);
                return Ok(gateway);
            }
        }
    }

    async fn incoming(&self, frame: pdu::Frame) {
        let Ok(command) = pdu::decode(&frame) else {
            return;
        };
        let sequence = command.sequence_number();
        match command.id() {
            CommandId::SubmitSmResp
            | CommandId::DeliverSmResp
            | CommandId::DataSmResp
            | CommandId::GenericNack => {
                if let Some(waiter) =
                    self.responses.lock().unwrap_or_else(|p| p.into_inner()).remove(&sequence)
                {
                    let _ = waiter.send(frame.status);
                }
            }
            CommandId::DeliverSm | CommandId::SubmitSm | CommandId::DataSm => {
                let answer = pdu::response_id(command.id()).unwrap_or(CommandId::DeliverSmResp);
                let resp = super::link::ok_response(answer, sequence, "gw");
                let _ = self.out.send(pdu::encode(&resp)).await;
                let Some(message) = pdu::message(&command) else { return };
                let text = super::text::decode(message.data_coding, &message.payload).unwrap_or_default();
                let waiter =
                    self.screens.lock().unwrap_or_else(|p| p.into_inner()).remove(&message.destination);
                match (waiter, message.ussd_service_op) {
                    (Some(waiter), Some(op)) => {
                        let _ = waiter.send(GatewayScreen {
                            text,
                            end: op == super::session::PSSR_RESPONSE,
                            its_session_info: message.its_session_info,
                            data_coding: message.data_coding,
                        });
                    }
                    (waiter, _) => {
                        if let Some(waiter) = waiter {
                            self.screens
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(message.destination.clone(), waiter);
                        }
                        self.sms.lock().unwrap_or_else(|p| p.into_inner()).push((message.destination, text));
                    }
                }
            }
            CommandId::EnquireLink => {
                let resp = Command::new(CommandStatus::EsmeRok, sequence, Pdu::EnquireLinkResp);
                let _ = self.out.send(pdu::encode(&resp)).await;
            }
            CommandId::Unbind => {
                let resp = Command::new(CommandStatus::EsmeRok, sequence, Pdu::UnbindResp);
                let _ = self.out.send(pdu::encode(&resp)).await;
            }
            _ => {}
        }
    }

    /// Sends one subscriber message and waits for Qepik's screen. `op` is 1 for a dial, 18 for an
    /// answer.
    pub async fn send(
        &self,
        msisdn: &str,
        text: &str,
        op: u8,
        its_session_info: Option<(u8, u8)>,
    ) -> Result<GatewayScreen, GatewayError> {
        let sequence = self.next_sequence();
        self.send_as(sequence, msisdn, text, op, its_session_info).await
    }

    /// A fresh sequence number.
    pub fn next_sequence(&self) -> u32 {
        self.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// [`Gateway::send`] with a given sequence number: the same number again is a
    /// retransmission.
    pub async fn send_as(
        &self,
        sequence: u32,
        msisdn: &str,
        text: &str,
        op: u8,
        its_session_info: Option<(u8, u8)>,
    ) -> Result<GatewayScreen, GatewayError> {
        let (screen_tx, screen_rx) = oneshot::channel();
        self.screens.lock().unwrap_or_else(|p| p.into_inner()).insert(msisdn.to_owned(), screen_tx);
        let (resp_tx, resp_rx) = oneshot::channel();
        self.responses.lock().unwrap_or_else(|p| p.into_inner()).insert(sequence, resp_tx);
        let command = pdu::outgoing(
            &Outgoing {
                carrier: self.carrier,
                service_type: "USSD",
                source: msisdn,
                destination: self.service_code.trim_end_matches('#'),
                text,
                ussd_service_op: Some(op),
                its_session_info,
                registered_delivery: false,
            },
            sequence,
        );
        self.out.send(pdu::encode(&command)).await.map_err(|_| GatewayError::Closed)?;
        let status = tokio::time::timeout(self.timeout, resp_rx)
            .await
            .map_err(|_| GatewayError::Timeout)?
            .map_err(|_| GatewayError::Closed)?;
        if status != 0 {
            self.screens.lock().unwrap_or_else(|p| p.into_inner()).remove(msisdn);
            return Err(GatewayError::Status(status));
        }
        tokio::time::timeout(self.timeout, screen_rx)
            .await
            .map_err(|_| GatewayError::Timeout)?
            .map_err(|_| GatewayError::Closed)
    }

    /// Starts a dialogue for `msisdn` by dialling `dialled` (the service code, or a shortcut).
    pub async fn dial(
        self: &Arc<Self>,
        msisdn: &str,
        dialled: &str,
    ) -> Result<(Dialogue, GatewayScreen), GatewayError> {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let screen = self.send(msisdn, dialled, super::session::PSSR_INDICATION, Some((session, 0))).await?;
        let dialogue = Dialogue {
            gateway: self.clone(),
            msisdn: msisdn.to_owned(),
            session,
            sequence: screen.its_session_info.map_or(2, |(_, s)| s & 0xFE),
        };
        Ok((dialogue, screen))
    }

    /// Closes the connection (without unbinding: a dropped link).
    pub async fn close(&self) {
        let _ = self.out.send(Vec::new()).await;
    }

    /// A raw PDU, for tests of malformed input.
    pub async fn send_raw(&self, bytes: Vec<u8>) {
        let _ = self.out.send(bytes).await;
    }
}

/// A dialogue in progress.
#[derive(Debug)]
pub struct Dialogue {
    gateway: Arc<Gateway>,
    pub msisdn: String,
    session: u8,
    sequence: u8,
}

impl Dialogue {
    /// The subscriber's answer to the last screen.
    pub async fn answer(&mut self, text: &str) -> Result<GatewayScreen, GatewayError> {
        self.sequence = self.sequence.wrapping_add(2) & 0xFE;
        let info = Some((self.session, self.sequence));
        let screen = self.gateway.send(&self.msisdn, text, super::session::USSR_CONFIRM, info).await?;
        if let Some((_, s)) = screen.its_session_info {
            self.sequence = s & 0xFE;
        }
        Ok(screen)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A close queued behind other writes still shuts the connection once they are out: the
    /// client-mode test relies on it to make Qepik bind again.
    #[tokio::test]
    async fn a_close_queued_behind_writes_still_closes() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (mut peer, _) = listener.accept().await?;
        let (gateway, _reader) = Gateway::over(client, "*150#", Carrier::DeliverSm);
        // On this one-thread runtime the writer task runs only once both are queued.
        gateway.send_raw(b"first".to_vec()).await;
        gateway.send_raw(b"second".to_vec()).await;
        gateway.close().await;
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut seen))
            .await
            .map_err(|_| std::io::Error::other("the connection stayed open"))??;
        assert_eq!(seen, b"firstsecond");
        Ok(())
    }
}
