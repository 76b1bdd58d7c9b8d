//! Where SMS go. Until the SMPP binds exist (the USSD issue), the only sink is the demo inbox: a
//! simulated handset per number that keeps the last messages in memory, readable through
//! `GET /v1/demo/sms/{msisdn}` on a `--demo` server, and by tests. Codes in messages never reach a
//! file or a log.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Messages kept per number.
const KEPT: usize = 20;

pub trait SmsSink: Send + Sync + std::fmt::Debug {
    /// Hands an SMS on. The outbox keeps a notification until its delivery says it was taken.
    fn send(&self, msisdn: u64, text: String) -> Delivery;
}

/// What became of an SMS handed to a sink.
#[derive(Debug)]
pub enum Delivery {
    /// Taken for good (the demo's handsets take every message at once).
    Taken,
    /// Answers `true` once the operator's SMSC accepted it (its `_resp` said ESME_ROK); `false`
    /// or a dropped sender: not taken, to be sent again.
    Pending(tokio::sync::oneshot::Receiver<bool>),
    /// Not taken: the queue to the SMSCs is full. Hand nothing more for now.
    Busy,
}

/// The simulated handsets of the demo.
#[derive(Debug, Default)]
pub struct DemoInbox {
    messages: Mutex<HashMap<u64, VecDeque<String>>>,
}

impl DemoInbox {
    /// The messages `msisdn` received, oldest first.
    pub fn messages(&self, msisdn: u64) -> Vec<String> {
        let messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        messages.get(&msisdn).map(|m| m.iter().cloned().collect()).unwrap_or_default()
    }
}

impl SmsSink for DemoInbox {
    fn send(&self, msisdn: u64, text: String) -> Delivery {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        let inbox = messages.entry(msisdn).or_default();
        inbox.push_back(text);
        if inbox.len() > KEPT {
            inbox.pop_front();
        }
        Delivery::Taken
    }
}
