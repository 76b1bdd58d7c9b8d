//! Wiring and supervision: the engine, the wallet domain, the server store, and a tree of ractor
//! actors around the listeners.
//!
//! ```text
//! qepik (Root)            restarts a failed child; on shutdown stops the children, then the engine
//! ├── http (HttpServer)   owns the listening socket and the axum server; drains on stop
//! ├── flusher (Flusher)   writes idempotent responses to the store every 20 ms, and at stop
//! ├── notifier (Notifier) drains the views' notification outbox to SMS (OTPs, money moved,
//! │                       blocks), acknowledging each after it is handed to the sender
//! └── webhooks (Webhooks) posts merchants' signed payment webhooks, retrying with backoff
//! ```
//!
//! The engine's shards and journal writer are threads of their own (`engine`), not actors: the
//! root owns their shutdown, which ends with the final group commit.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use engine::secret::ServerSecret;
use engine::{Domain, DomainConfig, Engine, EngineConfig};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::sms::{DemoInbox, SmsSink};
use crate::store::Store;

/// Options of `qepik serve` beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Seed the demo world on first start and serve the demo's simulated handsets.
    pub demo: bool,
    /// Install the global Prometheus recorder (once per process; tests leave it off).
    pub metrics: bool,
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Where operators' gateways bind (SMPP), if on.
    pub smpp_addr: Option<SocketAddr>,
    pub ussd: Arc<crate::ussd::Ussd>,
    pub state: Arc<AppState>,
    pub demo_inbox: Option<Arc<DemoInbox>>,
    root: ActorRef<RootMsg>,
    root_done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Graceful shutdown: stop accepting, let requests in progress finish, stop the engine
    /// (its final group commit), flush the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state.ready.store(false, Ordering::Release);
        let answer = ractor::call!(self.root, RootMsg::Shutdown);
        self.root.stop(None);
        let _ = self.root_done.await;
        answer.map_err(|e| anyhow::anyhow!("shutdown: {e}"))
    }
}

/// The server secret: configured, or (development only) generated into the data directory.
fn secret(config: &Config) -> anyhow::Result<ServerSecret> {
    if let Some(hex) = &config.server.secret {
        return ServerSecret::from_hex(hex.trim()).map_err(|e| anyhow::anyhow!("server.secret: {e}"));
    }
    let path = config.server.data_dir.join("secret");
    if let Ok(hex) = std::fs::read_to_string(&path) {
        return ServerSecret::from_hex(hex.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    tracing::warn!(path = %path.display(), "no server secret configured: generated a development secret; set QEPIK_SECRET in production");
    let secret = ServerSecret::generate();
    write_private(&path, secret.to_hex().as_bytes())?;
    Ok(secret)
}

/// Writes a file only its owner may read.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// The wallet domain's configuration from the file's wallet sections.
pub fn domain_config(config: &Config, secret: Arc<ServerSecret>) -> anyhow::Result<DomainConfig> {
    let mut domain = DomainConfig::new(secret);
    let settings =
        engine::config::WalletSettings::from_toml(&config.wallet_toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    settings.apply_to(&mut domain);
    Ok(domain)
}

/// Opens the data directory: the engine (recovery), the wallet domain, the server store.
pub async fn open_state(config: Config, options: ServeOptions) -> anyhow::Result<Arc<AppState>> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = Arc::new(secret(&config)?);
    let mut engine_config = EngineConfig::new(&data_dir);
    if let Some(shards) = config.server.shards {
        engine_config.shard_count = shards;
    }
    engine_config.views = config.server.views;
    engine_config.checkpoint_every_bytes = config.server.checkpoint_every_mb.saturating_mul(1 << 20);
    let mut domain_config = domain_config(&config, secret.clone())?;
    if options.demo {
        crate::demo::default_tariffs(&mut domain_config)?;
    }
    let store = Store::open_with(&data_dir.join("server"), config.http.idempotency_retention_days)?;
    // The file's tiers, tariffs and commissions, or the live ones administrators changed since
    // (`settings::reconcile` says which win).
    let file_rules = engine::Rules {
        policy: domain_config.policy.clone(),
        tariffs: domain_config.tariffs.clone(),
        commissions: domain_config.commissions.clone(),
    };
    let live = crate::settings::reconcile(&store, file_rules)?;
    domain_config.policy = live.policy;
    domain_config.tariffs = live.tariffs;
    domain_config.commissions = live.commissions;
    let engine = tokio::task::spawn_blocking(move || Engine::open(engine_config)).await??;
    let domain = match Domain::open(engine.clone(), domain_config).await {
        Ok(domain) => domain,
        Err(error) => {
            engine.shutdown();
            return Err(error.into());
        }
    };
    let metrics = if options.metrics {
        Some(
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("metrics recorder")?,
        )
    } else {
        None
    };
    let demo_inbox = options.demo.then(|| Arc::new(DemoInbox::default()));
    let smpp_on = config.smpp.listen.is_some() || !config.smpp.operators.is_empty();
    let smpp_sms = smpp_on.then(|| {
        Arc::new(crate::ussd::SmppSms {
            ussd: Default::default(),
            demo: demo_inbox.clone(),
            busy_log: crate::ussd::LogEvery::new(std::time::Duration::from_secs(60)),
        })
    });
    let sms: Arc<dyn SmsSink> = match (&smpp_sms, &demo_inbox) {
        (Some(smpp), _) => smpp.clone(),
        (None, Some(inbox)) => inbox.clone(),
        (None, None) => Arc::new(DemoInbox::default()),
    };
    let admission = crate::http::admission::Admission::new(
        config.http.max_in_flight,
        std::time::Duration::from_millis(config.http.queue_target_ms),
        std::time::Instant::now(),
    );
    Ok(Arc::new(AppState {
        admission,
        config,
        engine,
        domain,
        store,
        secret,
        rate: Default::default(),
        in_flight: Default::default(),
        metrics,
        ready: std::sync::atomic::AtomicBool::new(false),
        sms,
        demo_inbox,
        smpp_sms,
        request_metrics: Default::default(),
    }))
}

/// Opens everything and starts serving on `config.http.listen` (port 0: one the OS picks).
pub async fn start(config: Config, options: ServeOptions) -> anyhow::Result<Running> {
    let listen = config.http.listen;
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let smpp_listener = match config.smpp.listen {
        Some(at) => Some(TcpListener::bind(at).await.with_context(|| format!("binding SMPP on {at}"))?),
        None => None,
    };
    let smpp_addr = smpp_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let state = open_state(config, options.clone()).await?;
    let mut smpp = state.config.smpp.clone();
    if options.demo && smpp.operators.is_empty() {
        smpp.operators.push(crate::demo::smpp_operator(&state.secret));
    }
    let ussd = crate::ussd::Ussd::new(state.clone(), smpp);
    if let Some(sink) = &state.smpp_sms {
        let _ = sink.ussd.set(Arc::downgrade(&ussd));
    }
    if options.demo
        && let Err(error) = crate::demo::seed(&state, addr, smpp_addr, &ussd.config).await
    {
        state.engine.shutdown();
        return Err(error);
    }
    let (root, root_done) = Actor::spawn(
        Some(format!("qepik@{addr}")),
        Root,
        (state.clone(), listener, ussd.clone(), smpp_listener),
    )
    .await?;
    state.ready.store(true, Ordering::Release);
    tracing::info!(%addr, smpp = ?smpp_addr, data_dir = %state.config.server.data_dir.display(), "qepik serving");
    let demo_inbox = state.demo_inbox.clone();
    Ok(Running { addr, smpp_addr, ussd, state, demo_inbox, root, root_done })
}

/// Spawns child `name` of the server at `addr`, linked to the root (which restarts it).
async fn spawn_child<A: Actor>(
    name: &str,
    addr: SocketAddr,
    actor: A,
    arguments: A::Arguments,
    root: ractor::ActorCell,
) -> Result<ActorRef<A::Msg>, ActorProcessingErr> {
    let (child, _) = Actor::spawn_linked(Some(format!("{name}@{addr}")), actor, arguments, root).await?;
    Ok(child)
}

pub enum RootMsg {
    Shutdown(RpcReplyPort<()>),
}

impl std::fmt::Debug for RootMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shutdown")
    }
}

struct Root;

struct RootState {
    app: Arc<AppState>,
    addr: SocketAddr,
    http: Option<ActorRef<HttpMsg>>,
    flusher: Option<ActorRef<FlusherMsg>>,
    notifier: Option<ActorRef<NotifierMsg>>,
    webhooks: Option<ActorRef<WebhooksMsg>>,
    smpp: Option<ActorRef<SmppMsg>>,
    ussd: Arc<crate::ussd::Ussd>,
    smpp_addr: Option<SocketAddr>,
    stopping: bool,
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = (Arc<AppState>, TcpListener, Arc<crate::ussd::Ussd>, Option<TcpListener>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (app, listener, ussd, smpp_listener): Self::Arguments,
    ) -> Result<RootState, ActorProcessingErr> {
        let addr = listener.local_addr()?;
        let smpp_addr = smpp_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let cell = myself.get_cell();
        let http =
            spawn_child("http", addr, HttpServer, (app.clone(), Some(listener), addr), cell.clone()).await?;
        let flusher = spawn_child("flusher", addr, Flusher, app.clone(), cell.clone()).await?;
        let notifier = match app.engine.views() {
            Some(_) => Some(spawn_child("notifier", addr, Notifier, app.clone(), cell.clone()).await?),
            None => None,
        };
        let webhooks = spawn_child("webhooks", addr, Webhooks, app.clone(), cell.clone()).await?;
        let smpp = spawn_child("smpp", addr, Smpp, (ussd.clone(), smpp_listener, smpp_addr), cell).await?;
        Ok(RootState {
            app,
            addr,
            http: Some(http),
            flusher: Some(flusher),
            notifier,
            webhooks: Some(webhooks),
            smpp: Some(smpp),
            ussd,
            smpp_addr,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootMsg::Shutdown(reply) => {
                state.stopping = true;
                if let Some(http) = state.http.take() {
                    // Stops accepting and waits for the requests in progress.
                    http.stop_and_wait(None, None).await?;
                }
                if let Some(smpp) = state.smpp.take() {
                    // Unbinds every bind; sessions end with their binds.
                    smpp.stop_and_wait(None, None).await?;
                }
                if let Some(flusher) = state.flusher.take() {
                    flusher.stop_and_wait(None, None).await?;
                }
                if let Some(notifier) = state.notifier.take() {
                    notifier.stop_and_wait(None, None).await?;
                }
                if let Some(webhooks) = state.webhooks.take() {
                    webhooks.stop_and_wait(None, None).await?;
                }
                let app = state.app.clone();
                tokio::task::spawn_blocking(move || {
                    app.engine.shutdown();
                    if let Err(error) = app.store.flush() {
                        tracing::error!(%error, "flushing the server store");
                    }
                })
                .await?;
                tracing::info!("qepik stopped");
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match &event {
            SupervisionEvent::ActorFailed(cell, error) if !state.stopping => {
                tracing::error!(actor = ?cell.get_name(), %error, "child failed; restarting it");
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if !state.stopping => {
                tracing::error!(actor = ?cell.get_name(), ?reason, "child stopped; restarting it");
            }
            _ => {}
        }
        let ended = match &event {
            SupervisionEvent::ActorFailed(cell, _) | SupervisionEvent::ActorTerminated(cell, _, _) => {
                Some(cell.get_id())
            }
            _ => None,
        };
        if let Some(id) = ended
            && !state.stopping
        {
            let (app, addr, cell) = (state.app.clone(), state.addr, myself.get_cell());
            if state.http.as_ref().is_some_and(|h| h.get_id() == id) {
                state.http = Some(spawn_child("http", addr, HttpServer, (app, None, addr), cell).await?);
            } else if state.webhooks.as_ref().is_some_and(|w| w.get_id() == id) {
                state.webhooks = Some(spawn_child("webhooks", addr, Webhooks, app, cell).await?);
            } else if state.notifier.as_ref().is_some_and(|n| n.get_id() == id) {
                state.notifier = Some(spawn_child("notifier", addr, Notifier, app, cell).await?);
            } else if state.smpp.as_ref().is_some_and(|s| s.get_id() == id) {
                let arguments = (state.ussd.clone(), None, state.smpp_addr);
                state.smpp = Some(spawn_child("smpp", addr, Smpp, arguments, cell).await?);
            } else if state.flusher.as_ref().is_some_and(|f| f.get_id() == id) {
                state.flusher = Some(spawn_child("flusher", addr, Flusher, app, cell).await?);
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum WebhooksMsg {
    Tick,
}

/// Delivers queued webhooks every 200 ms; a failed delivery is retried after 2^attempts
/// seconds, ten times, then dropped with an error in the log.
struct Webhooks;

const WEBHOOK_ATTEMPTS_MAX: u32 = 10;

impl Actor for Webhooks {
    type Msg = WebhooksMsg;
    type State = (Arc<AppState>, reqwest::Client);
    type Arguments = Arc<AppState>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        app: Arc<AppState>,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(std::time::Duration::from_millis(200), || WebhooksMsg::Tick);
        let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build()?;
        Ok((app, client))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        _message: WebhooksMsg,
        (app, client): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        use hmac::Mac;
        let now = crate::http::auth::now_s();
        for (key, mut webhook) in app.store.due_webhooks(now, 64)? {
            let signing = crate::http::merchant::webhook_key(&app.secret, webhook.merchant);
            let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&signing)?;
            mac.update(format!("{now}\n{}", webhook.body).as_bytes());
            let signature = hex::encode(mac.finalize().into_bytes());
            let sent = client
                .post(&webhook.url)
                .header("content-type", "application/json")
                .header("x-qepik-timestamp", now.to_string())
                .header("x-qepik-signature", signature)
                .body(webhook.body.clone())
                .send()
                .await;
            let delivered = matches!(&sent, Ok(response) if response.status().is_success());
            if delivered {
                app.store.settle_webhook(&key, None)?;
            } else if webhook.attempts + 1 >= WEBHOOK_ATTEMPTS_MAX {
                tracing::error!(merchant = webhook.merchant, url = %webhook.url, "webhook dropped after {WEBHOOK_ATTEMPTS_MAX} attempts");
                app.store.settle_webhook(&key, None)?;
            } else {
                webhook.attempts += 1;
                webhook.next_at_s = now + (1 << webhook.attempts.min(12));
                app.store.settle_webhook(&key, Some(&webhook))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum NotifierMsg {
    Tick,
}

/// Drains the notification outbox every 50 ms.
struct Notifier;

/// The notifier's state: the server, the notifications handed to the SMS binds whose answer has
/// not come yet (not handed again meanwhile), those to hand again, and where new ones start.
struct NotifierState {
    app: Arc<AppState>,
    pending: Vec<(engine::outbox::NotificationKey, tokio::sync::oneshot::Receiver<bool>)>,
    /// Refused or lost by the binds: handed again after the new ones.
    retry: std::collections::BTreeSet<engine::outbox::NotificationKey>,
    /// The first key not yet read from the outbox (`None`: the outbox's oldest entry).
    next: Option<engine::outbox::NotificationKey>,
}

impl Actor for Notifier {
    type Msg = NotifierMsg;
    type State = NotifierState;
    type Arguments = Arc<AppState>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        app: Arc<AppState>,
    ) -> Result<NotifierState, ActorProcessingErr> {
        myself.send_interval(std::time::Duration::from_millis(50), || NotifierMsg::Tick);
        Ok(NotifierState { app, pending: Vec::new(), retry: Default::default(), next: None })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        _message: NotifierMsg,
        state: &mut NotifierState,
    ) -> Result<(), ActorProcessingErr> {
        // What the SMSCs answered since the last round: taken ones are acknowledged, refused
        // or lost ones are handed again below.
        let mut taken = Vec::new();
        let mut retry = std::mem::take(&mut state.retry);
        state.pending.retain_mut(|(key, answer)| match answer.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
            Ok(true) => {
                taken.push(*key);
                false
            }
            Ok(false) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                retry.insert(*key);
                false
            }
        });
        let app = state.app.clone();
        let next = state.next;
        let round = tokio::task::spawn_blocking(move || drain_outbox(&app, &taken, retry, next)).await??;
        state.pending.extend(round.pending);
        state.retry = round.retry;
        state.next = round.next;
        Ok(())
    }
}

/// Notifications looked at in one round, oldest first.
const OUTBOX_ROUND: usize = 4_096;

/// What one round of the notifier leaves for the next.
struct Round {
    /// Handed to the binds, their answer still to come.
    pending: Vec<(engine::outbox::NotificationKey, tokio::sync::oneshot::Receiver<bool>)>,
    /// To hand again in a later round (no room in this one).
    retry: std::collections::BTreeSet<engine::outbox::NotificationKey>,
    next: Option<engine::outbox::NotificationKey>,
}

/// Acknowledges `taken` (what the SMSCs accepted since the last round), then hands the SMS sink
/// up to [`OUTBOX_ROUND`] notifications: first those the outbox received since the last round
/// (from `next` on), then those the binds refused or lost (`retry`), oldest first; acknowledges
/// what the sink took for good and returns the rest (acknowledged when the SMSC accepts them,
/// handed again in a later round if it does not). New ones go first, so that while the binds
/// cannot take anything (no SMSC bound, or one that refuses) a fresh OTP still reaches the sink
/// instead of waiting behind every message already handed: the outbox is read from where the
/// last round stopped, not from its oldest entry. Delivery is at least once: a crash, or an SMSC
/// answer lost, between the send and the acknowledgement sends that message again; a crash
/// before the SMSC took it loses nothing.
fn drain_outbox(
    app: &AppState,
    taken: &[engine::outbox::NotificationKey],
    mut retry: std::collections::BTreeSet<engine::outbox::NotificationKey>,
    next: Option<engine::outbox::NotificationKey>,
) -> Result<Round, ActorProcessingErr> {
    let Some(views) = app.engine.views() else {
        return Ok(Round { pending: Vec::new(), retry, next });
    };
    let outbox = views.outbox();
    outbox.ack(taken)?;
    let fresh = outbox.oldest_from(next, OUTBOX_ROUND)?;
    let mut next = fresh.last().map(|(key, _)| key.next()).or(next);
    let mut entries: Vec<_> =
        fresh.into_iter().map(|(key, notification)| (key, notification, false)).collect();
    while entries.len() < OUTBOX_ROUND {
        let Some(key) = retry.pop_first() else { break };
        if let Some(notification) = outbox.get(key)? {
            entries.push((key, notification, true));
        }
    }
    let now = app.engine.now_ns();
    let mut done = Vec::new();
    let mut pending = Vec::new();
    let mut busy = false;
    for (key, notification, again) in entries {
        // Once the queue to the SMSCs is full, the rest waits for a later round: a new one is
        // read again from the outbox (so that a long outage holds nothing in memory), one handed
        // before goes back to the retries.
        if busy {
            if again {
                retry.insert(key);
            }
            continue;
        }
        let Some(text) = notification_text(app, &notification).filter(|_| !notification.expired(now)) else {
            done.push(key);
            continue;
        };
        match app.sms.send(notification.msisdn(), text) {
            crate::sms::Delivery::Taken => done.push(key),
            crate::sms::Delivery::Pending(delivery) => pending.push((key, delivery)),
            crate::sms::Delivery::Busy => {
                busy = true;
                if again {
                    retry.insert(key);
                } else {
                    next = Some(key);
                }
            }
        }
    }
    outbox.ack(&done)?;
    Ok(Round { pending, retry, next })
}

/// The SMS for a notification (English until the menus of the USSD issue bring three languages).
fn notification_text(app: &AppState, notification: &engine::outbox::Notification) -> Option<String> {
    use engine::outbox::{MoneyKind, Notification};
    let plan = &app.domain.config().plan;
    let amount = |minor: i128| engine::statement::decimal(minor, engine::Currency::Azn).unwrap_or_default();
    Some(match notification {
        Notification::Otp { msisdn, nonce, .. } => {
            let msisdn = engine::msisdn::Msisdn::from_u64(*msisdn, plan).ok()?;
            let code = app.domain.otp_for_delivery(msisdn, *nonce);
            format!("Qepik: your code is {}. Do not share it.", code.expose())
        }
        Notification::Money(notice) => {
            let other = match notice
                .counterparty
                .wallet_msisdn()
                .and_then(|m| engine::msisdn::Msisdn::from_u64(m, plan).ok())
            {
                Some(msisdn) => msisdn.to_string(),
                None => engine::statement::account_name(notice.counterparty),
            };
            let fee = if notice.fee > 0 {
                format!(", fee {} AZN", amount(i128::from(notice.fee)))
            } else {
                String::new()
            };
            let balance = amount(notice.balance_after);
            match notice.kind {
                MoneyKind::Sent => format!(
                    "Qepik: you sent {} AZN to {other}{fee}. Balance {balance} AZN.",
                    amount(i128::from(notice.amount))
                ),
                MoneyKind::Received => format!(
                    "Qepik: you received {} AZN from {other}. Balance {balance} AZN.",
                    amount(i128::from(notice.amount))
                ),
                MoneyKind::CashedOut => format!(
                    "Qepik: cash-out {} AZN{fee}. Balance {balance} AZN.",
                    amount(i128::from(notice.amount))
                ),
            }
        }
        Notification::Blocked { .. } => {
            "Qepik: your wallet is blocked. Visit a post office with your ID to unblock it.".to_owned()
        }
    })
}

#[derive(Debug)]
pub enum FlusherMsg {
    Tick,
}

struct Flusher;

impl Actor for Flusher {
    type Msg = FlusherMsg;
    type State = Arc<AppState>;
    type Arguments = Arc<AppState>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        app: Arc<AppState>,
    ) -> Result<Arc<AppState>, ActorProcessingErr> {
        myself.send_interval(std::time::Duration::from_millis(20), || FlusherMsg::Tick);
        Ok(app)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        _message: FlusherMsg,
        app: &mut Arc<AppState>,
    ) -> Result<(), ActorProcessingErr> {
        let store = app.store.clone();
        tokio::task::spawn_blocking(move || store.flush_responses()).await??;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        app: &mut Arc<AppState>,
    ) -> Result<(), ActorProcessingErr> {
        let store = app.store.clone();
        tokio::task::spawn_blocking(move || store.flush_responses()).await??;
        Ok(())
    }
}

#[derive(Debug)]
pub enum SmppMsg {}

/// The SMPP side: accepts operators' gateways (server mode), keeps Qepik's binds to gateways
/// (client mode), sends queued SMS, and supervises the USSD session actors.
struct Smpp;

struct SmppState {
    ussd: Arc<crate::ussd::Ussd>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for Smpp {
    type Msg = SmppMsg;
    type State = SmppState;
    type Arguments = (Arc<crate::ussd::Ussd>, Option<TcpListener>, Option<SocketAddr>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (ussd, listener, addr): Self::Arguments,
    ) -> Result<SmppState, ActorProcessingErr> {
        ussd.stop.send_replace(false);
        *ussd.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(myself.get_cell());
        let listener = match (listener, addr) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await?),
            (None, None) => None,
        };
        let mut tasks = Vec::new();
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(crate::ussd::accept(ussd.clone(), listener)));
        }
        for operator in &ussd.config.operators {
            if operator.mode == crate::config::SmppMode::Client {
                let operator = Arc::new(operator.clone());
                tasks.push(tokio::spawn(crate::ussd::link::keep_bound(ussd.clone(), operator)));
            }
        }
        tasks.push(tokio::spawn(ussd.clone().send_sms()));
        Ok(SmppState { ussd, tasks })
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut SmppState,
    ) -> Result<(), ActorProcessingErr> {
        // A session actor that failed is gone: its subscriber redials. Nothing else to do.
        if let SupervisionEvent::ActorFailed(_, error) = &event {
            tracing::error!(%error, "ussd: a session failed");
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut SmppState,
    ) -> Result<(), ActorProcessingErr> {
        state.ussd.stop.send_replace(true);
        for task in state.tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum HttpMsg {}

struct HttpServer;

struct HttpState {
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Actor for HttpServer {
    type Msg = HttpMsg;
    type State = HttpState;
    type Arguments = (Arc<AppState>, Option<TcpListener>, SocketAddr);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (app, listener, addr): Self::Arguments,
    ) -> Result<HttpState, ActorProcessingErr> {
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind(addr).await?,
        };
        let (shutdown, mut signal) = watch::channel(false);
        let stop_seen = shutdown.subscribe();
        let tls = app.config.http.tls.as_ref().map(crate::tls::server_config).transpose()?;
        let router = http::router(app);
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = signal.wait_for(|stop| *stop).await;
            };
            let served = match tls {
                Some(config) => match crate::tls::TlsListener::new(listener, config) {
                    Ok(listener) => axum::serve(listener, router).with_graceful_shutdown(stop).await,
                    Err(error) => Err(error),
                },
                None => axum::serve(listener, router).with_graceful_shutdown(stop).await,
            };
            // The server ended by itself (not by our signal): the actor fails, and is restarted.
            if !*stop_seen.borrow() {
                myself.stop(Some("the HTTP server ended".into()));
            }
            served
        });
        Ok(HttpState { shutdown, task: Some(task) })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut HttpState,
    ) -> Result<(), ActorProcessingErr> {
        state.shutdown.send_replace(true);
        if let Some(task) = state.task.take() {
            task.await??;
        }
        Ok(())
    }
}
