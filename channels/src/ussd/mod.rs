//! USSD over SMPP: operators' gateways bind to Qepik (server mode) or Qepik binds to them
//! (client mode); subscribers' `*150#` dialogues run as session actors over the wallet; SMS
//! (OTPs, notifications) go out over the same binds.
//!
//! - [`pdu`]: framing, TLV checks, decoding through rusmpp, builders.
//! - [`link`]: one bind, both roles: bind state, window, throughput, enquire_link, unbind.
//! - [`session`]: the session actors and their registry.
//! - [`flow`]: the dialogues (register, balance, transfer, cash-out code, mini statement,
//!   change PIN, language, last operation).
//! - [`menu`], [`text`]: the screens in three languages; GSM 7-bit or UCS-2.
//! - [`SmppSms`]: the SMS sender over the binds.

pub mod flow;
pub mod gateway;
pub mod link;
pub mod menu;
pub mod pdu;
pub mod session;
pub mod text;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusmpp::CommandStatus;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{OperatorSection, SmppMode, SmppSection};
use crate::http::AppState;
use link::Link;

/// An SMS for the binds: the number, the text, and who hears whether the SMSC took it.
type QueuedSms = (u64, String, oneshot::Sender<bool>);

/// The binds that are up, by id.
#[derive(Debug, Default)]
pub struct Links {
    map: std::sync::RwLock<HashMap<u64, Arc<Link>>>,
    turn: AtomicU64,
}

impl Links {
    pub fn add(&self, link: Arc<Link>) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).insert(link.id, link);
    }

    pub fn remove(&self, id: u64) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    pub fn count(&self, operator: &str) -> usize {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|l| l.operator.name == operator)
            .count()
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A bind that can carry an SMS to `msisdn` now, if any: one of the operator whose
    /// `sms_prefixes` match the number longest, else any (round robin among them).
    fn for_sms(&self, msisdn: u64) -> Option<Arc<Link>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let digits = msisdn.to_string();
        let claim = |link: &Link| {
            link.operator
                .sms_prefixes
                .iter()
                .filter(|p| digits.starts_with(p.as_str()))
                .map(String::len)
                .max()
        };
        let ready: Vec<(&Arc<Link>, usize)> =
            map.values().filter(|l| l.can_send()).map(|l| (l, claim(l).unwrap_or(0))).collect();
        let best = ready.iter().map(|(_, claim)| *claim).max()?;
        let mut ready: Vec<&Arc<Link>> =
            ready.into_iter().filter(|(_, claim)| *claim == best).map(|(l, _)| l).collect();
        ready.sort_by_key(|l| l.id);
        let start = usize::try_from(self.turn.fetch_add(1, Ordering::Relaxed) % 1024).unwrap_or(0);
        (0..ready.len()).map(|i| ready[(start + i) % ready.len()]).find(|l| l.take_outbound()).cloned()
    }
}

/// The USSD channel's shared state.
pub struct Ussd {
    pub app: Arc<AppState>,
    pub config: SmppSection,
    pub service_code: Arc<str>,
    pub sessions: session::Sessions,
    pub links: Links,
    /// Set to true when the server stops: binds unbind and close.
    pub stop: watch::Sender<bool>,
    /// Session actors are linked to it (the SMPP actor of the supervision tree).
    pub supervisor: std::sync::Mutex<Option<ractor::ActorCell>>,
    /// SMS waiting for a bind.
    sms: std::sync::Mutex<Option<mpsc::Receiver<QueuedSms>>>,
    sms_tx: mpsc::Sender<QueuedSms>,
    pub delivered: AtomicU64,
}

impl std::fmt::Debug for Ussd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ussd").field("links", &self.links.len()).finish_non_exhaustive()
    }
}

impl Ussd {
    pub fn new(app: Arc<AppState>, config: SmppSection) -> Arc<Ussd> {
        let (sms_tx, sms_rx) = mpsc::channel(100_000);
        Arc::new(Ussd {
            service_code: Arc::from(config.service_code.as_str()),
            app,
            config,
            sessions: Default::default(),
            links: Default::default(),
            stop: watch::channel(false).0,
            supervisor: Default::default(),
            sms: std::sync::Mutex::new(Some(sms_rx)),
            sms_tx,
            delivered: AtomicU64::new(0),
        })
    }

    /// The operator a gateway binds as, or the status that refuses it. The password is compared
    /// in constant time; an unknown system_id and a wrong password answer differently, as SMPP
    /// specifies, but both close the connection.
    pub fn authenticate(
        &self,
        system_id: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<Arc<OperatorSection>, CommandStatus> {
        let operator = self
            .config
            .operators
            .iter()
            .find(|o| o.mode == SmppMode::Server && o.system_id == system_id)
            .ok_or(CommandStatus::EsmeRinvsysid)?;
        if !bool::from(operator.password.as_bytes().ct_eq(password.as_bytes())) {
            return Err(CommandStatus::EsmeRinvpaswd);
        }
        if !operator.allowed_addresses.is_empty() && !operator.allowed_addresses.contains(&from) {
            return Err(CommandStatus::EsmeRbindfail);
        }
        Ok(Arc::new(operator.clone()))
    }

    /// A delivery receipt for one of our SMS.
    fn receipt(&self, message: &pdu::Message) {
        let text = String::from_utf8_lossy(&message.payload);
        let state =
            text.split_whitespace().find_map(|w| w.strip_prefix("stat:")).unwrap_or("UNKNOWN").to_owned();
        if state == "DELIVRD" {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("qepik_sms_receipts_total", "state" => state).increment(1);
    }

    /// Queues an SMS for the binds; `taken` hears whether the SMSC accepted it.
    pub fn queue_sms(&self, msisdn: u64, text: String, taken: oneshot::Sender<bool>) -> bool {
        self.sms_tx.try_send((msisdn, text, taken)).is_ok()
    }

    /// Sends queued SMS over the binds, throttled per bind, until the server stops. An SMS
    /// waits while no bind can carry it.
    pub async fn send_sms(self: Arc<Self>) {
        let Some(mut queue) = self.sms.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut stop = self.stop.subscribe();
        loop {
            let (msisdn, text, taken) = tokio::select! {
                next = queue.recv() => match next { Some(next) => next, None => return },
                _ = stop.changed() => return,
            };
            let link = loop {
                if let Some(link) = self.links.for_sms(msisdn) {
                    break link;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    _ = stop.changed() => return,
                }
            };
            let destination = msisdn.to_string();
            let outgoing = pdu::Outgoing {
                carrier: link.carrier(),
                service_type: "",
                source: &link.operator.sms_source,
                destination: &destination,
                text: &text,
                ussd_service_op: None,
                its_session_info: None,
                registered_delivery: true,
            };
            let answer = link.send_message(outgoing, true).await;
            metrics::counter!("qepik_sms_sent_total").increment(1);
            // The answer frees nothing here (the window slot goes with the bind's pending
            // request); it only tells the outbox whether to keep the notification.
            tokio::spawn(async move {
                let accepted = match answer {
                    Some(answer) => answer.await.is_ok_and(|resp| resp.status() == CommandStatus::EsmeRok),
                    None => false,
                };
                let _ = taken.send(accepted);
            });
        }
    }
}

/// The SMS sink of a server with SMPP: every SMS is queued for the operator binds (and, on a
/// demo server, also kept in the demo's simulated handsets).
#[derive(Debug)]
pub struct SmppSms {
    pub ussd: std::sync::OnceLock<std::sync::Weak<Ussd>>,
    pub demo: Option<Arc<crate::sms::DemoInbox>>,
    /// When "the queue is full" was last logged.
    pub busy_log: LogEvery,
}

/// Lets a repeated warning through once per interval.
#[derive(Debug)]
pub struct LogEvery {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl LogEvery {
    pub fn new(every: std::time::Duration) -> LogEvery {
        LogEvery { every, last: std::sync::Mutex::new(None) }
    }

    /// Whether to log now; if so, the next time is one interval away.
    pub fn ready(&self, now: std::time::Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

impl crate::sms::SmsSink for SmppSms {
    fn send(&self, msisdn: u64, text: String) -> crate::sms::Delivery {
        let demo_copy = self.demo.as_ref().map(|_| text.clone());
        let (taken, delivery) = oneshot::channel();
        let delivery = match self.ussd.get().and_then(std::sync::Weak::upgrade) {
            Some(ussd) => {
                if !ussd.queue_sms(msisdn, text, taken) {
                    // Once a round at most (the notifier stops handing on `Busy`), and logged once
                    // a minute at most: an SMSC outage must not flood the log. The demo handset
                    // sees the SMS when it is queued, later, not once per attempt.
                    metrics::counter!("qepik_sms_busy_total").increment(1);
                    if self.busy_log.ready(std::time::Instant::now()) {
                        tracing::warn!(
                            "sms: the queue to the binds is full; notifications wait in the outbox \
                             (qepik_sms_busy_total counts the rounds)"
                        );
                    }
                    return crate::sms::Delivery::Busy;
                }
                crate::sms::Delivery::Pending(delivery)
            }
            // Not started yet: the outbox keeps it for the next round.
            None => crate::sms::Delivery::Pending(delivery),
        };
        if let (Some(demo), Some(text)) = (&self.demo, demo_copy) {
            crate::sms::SmsSink::send(demo.as_ref(), msisdn, text);
        }
        delivery
    }
}

/// Accepts gateways' connections on `listener` until the server stops.
pub async fn accept(ussd: Arc<Ussd>, listener: tokio::net::TcpListener) {
    let mut stop = ussd.stop.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "smpp: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(link::run(ussd.clone(), stream, peer, link::Role::Smsc, None));
    }
}

#[cfg(test)]
mod log_every_tests {
    #[test]
    fn a_repeated_warning_passes_once_an_interval() {
        let start = std::time::Instant::now();
        let log = super::LogEvery::new(std::time::Duration::from_secs(60));
        assert!(log.ready(start));
        assert!(!log.ready(start + std::time::Duration::from_secs(59)));
        assert!(log.ready(start + std::time::Duration::from_secs(60)));
        assert!(!log.ready(start + std::time::Duration::from_secs(61)));
    }
}
