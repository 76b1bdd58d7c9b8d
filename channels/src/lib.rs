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
