//! Qepik's channels: the HTTP API and the `qepik` server around the engine.
//!
//! Start with [`server::start`] (wiring and the supervision tree), then [`http`] (the routes,
//! authentication, idempotency, errors). [`config`] reads the TOML file and the environment;
//! [`demo`] seeds the demo world; [`store`] keeps credentials, sessions and idempotent
//! responses; [`settings`] the live tiers, tariffs and commissions administrators change; [`sms`] is where SMS go until the SMPP binds exist.

pub mod config;
pub mod demo;
pub mod emvco;
pub mod http;
pub mod server;
pub mod settings;
pub mod sms;
pub mod store;
pub mod tls;
pub mod ussd;

/// How long a statement waits for the views before answering with what they have.
const VIEWS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The views, once they have applied everything durable when this is called, or after
/// [`VIEWS_WAIT`] (they lag that much only under overload): so that a statement shows every
/// operation its reader was told about. `None` when the views are off.
pub(crate) async fn current_views(engine: &engine::Engine) -> Option<&engine::views::Views> {
    let views = engine.views()?;
    // The caller's last cross-shard transfer was answered at its credit; its finalize may still
    // be on its way to the journal.
    let _settled = tokio::time::timeout(VIEWS_WAIT, engine.settle()).await;
    let _lagging = tokio::time::timeout(VIEWS_WAIT, views.reached(engine.journal().durable())).await;
    Some(views)
}
