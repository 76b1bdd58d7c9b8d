//! USSD sessions: one ractor actor per live session, keyed by bind, MSISDN and the operator's
//! session reference, with an idle timeout and a bounded total. The actor owns the session's
//! [`Flow`], answers each of the subscriber's messages with one screen, and answers a
//! retransmitted message (the same PDU sequence number again) with the screen it already sent,
//! without acting twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use engine::msisdn::Msisdn;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rusmpp::CommandId;

use super::Ussd;
use super::flow::{Flow, Screen};
use super::link::{self, Link};
use super::pdu::Message;

/// The USSD operation codes (`ussd_service_op`).
pub const PSSR_INDICATION: u8 = 1;
pub const USSR_REQUEST: u8 = 2;
pub const PSSR_RESPONSE: u8 = 17;
pub const USSR_CONFIRM: u8 = 18;

/// A subscriber's message, as the bind hands it to the sessions. Its `Debug` leaves out the
/// text: it may be a PIN.
pub struct Inbound {
    pub link: Arc<Link>,
    /// The request's command (its answer is the matching `_resp`).
    pub request: CommandId,
    pub sequence: u32,
    pub op: u8,
    pub text: String,
    pub msisdn: Msisdn,
    pub message: Message,
    pub reference: Option<u32>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("link", &self.link.id)
            .field("sequence", &self.sequence)
            .field("op", &self.op)
            .field("msisdn", &self.msisdn.get())
            .finish_non_exhaustive()
    }
}

impl Inbound {
    fn is_dial(&self) -> bool {
        self.op == PSSR_INDICATION
    }

    /// Answers the request and sends `screen` back on the same bind.
    async fn reply(&self, screen: &Screen) {
        let answer = super::pdu::response_id(self.request).unwrap_or(CommandId::DeliverSmResp);
        self.link.respond(link::ok_response(answer, self.sequence, "")).await;
        self.link.answered();
        let service_type = self.link.operator.service_type.clone();
        let outgoing =
            link::screen_message(&self.link, &self.message, &screen.text, screen.end, &service_type);
        self.link.send_message(outgoing, false).await;
        metrics::counter!("qepik_ussd_screens_total", "end" => if screen.end { "true" } else { "false" })
            .increment(1);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub link: u64,
    pub msisdn: u64,
    pub reference: Option<u32>,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: std::sync::Mutex<HashMap<SessionKey, ActorRef<SessionMsg>>>,
    live: AtomicUsize,
}

impl Sessions {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Hands `inbound` to its session, starting one for a dial.
    pub async fn route(&self, ussd: &Arc<Ussd>, inbound: Inbound) {
        let key =
            SessionKey { link: inbound.link.id, msisdn: inbound.msisdn.get(), reference: inbound.reference };
        let existing = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        if let Some(actor) = existing {
            match actor.cast(SessionMsg::Input(Box::new(inbound))) {
                Ok(()) => return,
                Err(ractor::MessagingErr::SendErr(SessionMsg::Input(inbound))) => {
                    // The session ended meanwhile.
                    self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    return self.start(ussd, key, *inbound).await;
                }
                Err(_) => return,
            }
        }
        self.start(ussd, key, inbound).await;
    }

    async fn start(&self, ussd: &Arc<Ussd>, key: SessionKey, inbound: Inbound) {
        if !inbound.is_dial() {
            // An answer for a session that is over (timed out, or ended): say so, act on nothing.
            let language = ussd.app.store.ussd_language(inbound.msisdn.get()).unwrap_or(0);
            let text =
                super::menu::texts(language).fill("session_over", &[("service", &ussd.config.service_code)]);
            inbound.reply(&Screen { text, end: true }).await;
            return;
        }
        if self.live() >= ussd.config.max_sessions {
            metrics::counter!("qepik_ussd_busy_total").increment(1);
            let text = super::menu::texts(0).fill("busy", &[]);
            inbound.reply(&Screen { text, end: true }).await;
            return;
        }
        let supervisor = ussd.supervisor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let arguments = (ussd.clone(), key.clone());
        let spawned = match supervisor {
            Some(supervisor) => Actor::spawn_linked(None, SessionActor, arguments, supervisor).await,
            None => Actor::spawn(None, SessionActor, arguments).await,
        };
        match spawned {
            Ok((actor, _)) => {
                self.live.fetch_add(1, Ordering::AcqRel);
                self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(key, actor.clone());
                let _ = actor.cast(SessionMsg::Input(Box::new(inbound)));
            }
            Err(error) => {
                tracing::error!(%error, "ussd: cannot start a session");
                let text = super::menu::texts(0).fill("unavailable", &[]);
                inbound.reply(&Screen { text, end: true }).await;
            }
        }
    }

    fn ended(&self, key: &SessionKey, actor: &ActorRef<SessionMsg>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|a| a.get_id() == actor.get_id()) {
            map.remove(key);
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

pub enum SessionMsg {
    Input(Box<Inbound>),
    Idle(u64),
}

impl std::fmt::Debug for SessionMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionMsg::Input(_) => f.write_str("Input"),
            SessionMsg::Idle(g) => write!(f, "Idle({g})"),
        }
    }
}

struct SessionActor;

#[derive(Debug)]
pub struct SessionState {
    ussd: Arc<Ussd>,
    key: SessionKey,
    flow: Option<Flow>,
    last: Option<(u32, Screen)>,
    generation: u64,
    /// The pending idle timeout: one per live session, replaced at each input.
    idle: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SessionMsg>>>>,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = (Arc<Ussd>, SessionKey);

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        (ussd, key): Self::Arguments,
    ) -> Result<SessionState, ActorProcessingErr> {
        Ok(SessionState { ussd, key, flow: None, last: None, generation: 0, idle: None })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        message: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionMsg::Idle(generation) => {
                if generation == state.generation {
                    metrics::counter!("qepik_ussd_sessions_timed_out_total").increment(1);
                    myself.stop(Some("idle".into()));
                }
            }
            SessionMsg::Input(inbound) => {
                let ussd = state.ussd.clone();
                // A retransmission: the same screen again, nothing done twice.
                if let Some((sequence, screen)) = &state.last
                    && *sequence == inbound.sequence
                {
                    metrics::counter!("qepik_ussd_retransmissions_total").increment(1);
                    inbound.reply(screen).await;
                    return Ok(());
                }
                let screen = match (&mut state.flow, inbound.is_dial()) {
                    (Some(flow), false) => flow.answer(&inbound.text).await,
                    _ => {
                        let (flow, screen) = Flow::dial(
                            ussd.app.clone(),
                            ussd.service_code.clone(),
                            inbound.msisdn,
                            &inbound.text,
                        )
                        .await;
                        state.flow = Some(flow);
                        metrics::counter!("qepik_ussd_sessions_total").increment(1);
                        screen
                    }
                };
                inbound.reply(&screen).await;
                state.last = Some((inbound.sequence, screen.clone()));
                if screen.end {
                    myself.stop(None);
                } else {
                    state.generation += 1;
                    let generation = state.generation;
                    let idle = Duration::from_secs(ussd.config.session_idle_s);
                    if let Some(previous) = state.idle.take() {
                        previous.abort();
                    }
                    state.idle = Some(myself.send_after(idle, move || SessionMsg::Idle(generation)));
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(idle) = state.idle.take() {
            idle.abort();
        }
        state.ussd.sessions.ended(&state.key, &myself);
        Ok(())
    }
}
