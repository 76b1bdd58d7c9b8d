//! The server's configuration: one TOML file, every key optional, environment variables over
//! it. With no file and no variables, `qepik serve` runs on the embedded defaults: data in
//! `./qepik-data`, HTTP on 127.0.0.1:8080.
//!
//! The file's `[server]` and `[http]` sections are read here; `[wallet]`, `[[tariffs]]` and
//! `[[commissions]]` belong to the engine's wallet settings (`engine::config`). Unknown keys are
//! errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variables that override the file, with the key each one sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("QEPIK_DATA_DIR", "server.data_dir"),
    ("QEPIK_SHARDS", "server.shards"),
    ("QEPIK_SECRET", "server.secret (hex, 32+ bytes)"),
    ("QEPIK_VIEWS", "server.views (true/false)"),
    ("QEPIK_HTTP_LISTEN", "http.listen"),
    ("QEPIK_HTTP_MAX_IN_FLIGHT", "http.max_in_flight"),
    ("QEPIK_HTTP_QUEUE_TARGET_MS", "http.queue_target_ms"),
    ("QEPIK_HTTP_IDEMPOTENCY_RETENTION_DAYS", "http.idempotency_retention_days"),
    ("QEPIK_HTTP_RATE_PER_S", "http.rate_per_s"),
    ("QEPIK_HTTP_TLS_CERT", "http.tls.cert_file (with QEPIK_HTTP_TLS_KEY)"),
    ("QEPIK_HTTP_TLS_KEY", "http.tls.key_file"),
    ("QEPIK_HTTP_TLS_CLIENT_CA", "http.tls.client_ca_file"),
    ("QEPIK_SMPP_LISTEN", "smpp.listen (or \"off\")"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Toml(String),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Holds the journal, checkpoints, views and the server's own store.
    pub data_dir: PathBuf,
    /// Ledger shards (default: one per core). Fixed for a data directory once created.
    pub shards: Option<u16>,
    /// The server secret in hex (PIN tags, codes, API keys). Prefer `QEPIK_SECRET`. When absent,
    /// a development secret is generated into `data_dir/secret` (see the README).
    pub secret: Option<String>,
    /// A checkpoint after this many journal bytes.
    pub checkpoint_every_mb: u64,
    /// Whether to run the views (statements, transfer index, notifications).
    pub views: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            data_dir: PathBuf::from("qepik-data"),
            shards: None,
            secret: None,
            checkpoint_every_mb: 256,
            views: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub listen: SocketAddr,
    /// API requests served at once at most; beyond the current limit, an immediate 503
    /// `overloaded`. The limit adapts below this bound (see `queue_target_ms`).
    pub max_in_flight: usize,
    /// When more than half the API requests of a 100 ms window took longer than this, a queue
    /// has formed and the in-flight limit shrinks; keep it above the disk's fsync latency.
    pub queue_target_ms: u64,
    /// Requests a second each caller may make (token bucket, burst of one second's worth).
    pub rate_per_s: u32,
    /// A signed request's timestamp may be this far from the server's clock.
    pub signature_window_s: u64,
    pub max_body_bytes: usize,
    /// Customer session lifetime; refresh tokens live `refresh_ttl_s`.
    pub session_ttl_s: u64,
    pub refresh_ttl_s: u64,
    /// Serve HTTPS (and require client certificates, if a client CA is given).
    pub tls: Option<crate::tls::TlsSection>,
    /// Days an idempotent request's response is kept for retries (at least; whole days are
    /// dropped together). A retry after that runs again under the same ledger id, which the
    /// ledger answers with its first result: it never posts twice.
    pub idempotency_retention_days: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_in_flight: 512,
            queue_target_ms: 10,
            rate_per_s: 20_000,
            signature_window_s: 300,
            max_body_bytes: 64 * 1024,
            session_ttl_s: 15 * 60,
            refresh_ttl_s: 7 * 24 * 3600,
            idempotency_retention_days: 7,
            tls: None,
        }
    }
}

/// Who connects whom for an operator's USSD traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmppMode {
    /// The operator's gateway binds to Qepik: subscribers' messages arrive as submit_sm (or
    /// data_sm), Qepik answers with deliver_sm.
    Server,
    /// Qepik binds to the operator's gateway (`connect`): messages arrive as deliver_sm, Qepik
    /// answers with submit_sm; reconnects with backoff.
    Client,
}

/// Where an operator puts the USSD session reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionReference {
    ItsSessionInfo,
    UserMessageReference,
    None,
}

/// One mobile operator's SMPP link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSection {
    pub name: String,
    /// The system_id the gateway binds with (server mode) or Qepik binds with (client mode).
    pub system_id: String,
    pub password: String,
    /// Source IP addresses a bind may come from; empty: any.
    #[serde(default)]
    pub allowed_addresses: Vec<std::net::IpAddr>,
    #[serde(default = "defaults::max_binds")]
    pub max_binds: usize,
    /// Requests the peer may have unanswered on one bind; one more gets ESME_RTHROTTLED. Also
    /// the number of Qepik's own unanswered requests per bind.
    #[serde(default = "defaults::window")]
    pub window: usize,
    /// Requests a second the peer may send on one bind (and SMS a second Qepik sends on it).
    #[serde(default = "defaults::throughput")]
    pub throughput_per_s: u32,
    #[serde(default = "defaults::mode")]
    pub mode: SmppMode,
    /// Client mode: the gateway's address.
    #[serde(default)]
    pub connect: Option<SocketAddr>,
    /// The PDU Qepik sends screens and SMS in (default: deliver_sm in server mode, submit_sm in
    /// client mode).
    #[serde(default)]
    pub outbound: Option<crate::ussd::pdu::Carrier>,
    #[serde(default = "defaults::session_reference")]
    pub session_reference: SessionReference,
    #[serde(default = "defaults::service_type")]
    pub service_type: String,
    /// The sender of SMS (notifications, OTPs).
    #[serde(default = "defaults::sms_source")]
    pub sms_source: String,
    /// The subscribers this operator serves, as E.164 digit prefixes (`"99450"`, `"99451"`):
    /// their SMS go over this operator's binds while one can carry them. An SMS whose number no
    /// ready operator claims goes over any bind.
    #[serde(default)]
    pub sms_prefixes: Vec<String>,
}

mod defaults {
    pub fn max_binds() -> usize {
        8
    }
    pub fn window() -> usize {
        64
    }
    pub fn throughput() -> u32 {
        5_000
    }
    pub fn mode() -> super::SmppMode {
        super::SmppMode::Server
    }
    pub fn session_reference() -> super::SessionReference {
        super::SessionReference::ItsSessionInfo
    }
    pub fn service_type() -> String {
        "USSD".into()
    }
    pub fn sms_source() -> String {
        "Qepik".into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmppSection {
    /// Where operators' gateways bind (server mode); `None` (`listen = "off"` or
    /// QEPIK_SMPP_LISTEN=off) opens no port.
    #[serde(deserialize_with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// The code subscribers dial.
    pub service_code: String,
    /// A USSD session with no input for this long is dropped.
    pub session_idle_s: u64,
    /// Live sessions at most; a dial beyond gets a "busy" screen.
    pub max_sessions: usize,
    /// Qepik sends enquire_link after this long without traffic on a bind.
    pub enquire_link_s: u64,
    /// A request of Qepik's unanswered this long is given up (its window slot freed).
    pub response_timeout_s: u64,
    #[serde(rename = "operator")]
    pub operators: Vec<OperatorSection>,
}

fn listen_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

impl Default for SmppSection {
    fn default() -> Self {
        SmppSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 2775))),
            service_code: "*150#".into(),
            session_idle_s: 120,
            max_sessions: 200_000,
            enquire_link_s: 30,
            response_timeout_s: 10,
            operators: Vec::new(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerSection,
    pub http: HttpSection,
    pub smpp: SmppSection,
    /// The `[wallet]`, `[[tariffs]]` and `[[commissions]]` part of the file, as TOML text for
    /// the engine's wallet settings.
    pub wallet_toml: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    smpp: SmppSection,
}

/// Keys of the file that belong to the wallet settings.
const WALLET_KEYS: [&str; 3] = ["wallet", "tariffs", "commissions"];

impl Config {
    /// Reads `path` (if given), then applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?,
            None => String::new(),
        };
        let mut config = Config::parse(&text)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Parses the file's text (no environment).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| ConfigError::Toml(e.to_string()))?;
        let mut wallet = toml::Table::new();
        for key in WALLET_KEYS {
            if let Some(value) = table.remove(key) {
                wallet.insert(key.to_owned(), value);
            }
        }
        let file: ServerFile = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Toml(e.to_string()))?;
        let wallet_toml = toml::to_string(&wallet).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let config = Config { server: file.server, http: file.http, smpp: file.smpp, wallet_toml };
        config.validate()?;
        Ok(config)
    }

    /// Applies the variables of [`ENV_OVERRIDES`] that `get` returns.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value
                .trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::Invalid { key: name.to_owned(), reason: e.to_string() })
        }
        if let Some(v) = get("QEPIK_DATA_DIR") {
            self.server.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("QEPIK_SHARDS") {
            self.server.shards = Some(parse("QEPIK_SHARDS", &v)?);
        }
        if let Some(v) = get("QEPIK_SECRET") {
            self.server.secret = Some(v);
        }
        if let Some(v) = get("QEPIK_VIEWS") {
            self.server.views = parse("QEPIK_VIEWS", &v)?;
        }
        if let Some(v) = get("QEPIK_HTTP_LISTEN") {
            self.http.listen = parse("QEPIK_HTTP_LISTEN", &v)?;
        }
        if let Some(v) = get("QEPIK_HTTP_MAX_IN_FLIGHT") {
            self.http.max_in_flight = parse("QEPIK_HTTP_MAX_IN_FLIGHT", &v)?;
        }
        if let Some(v) = get("QEPIK_HTTP_QUEUE_TARGET_MS") {
            self.http.queue_target_ms = parse("QEPIK_HTTP_QUEUE_TARGET_MS", &v)?;
        }
        if let Some(v) = get("QEPIK_HTTP_IDEMPOTENCY_RETENTION_DAYS") {
            self.http.idempotency_retention_days = parse("QEPIK_HTTP_IDEMPOTENCY_RETENTION_DAYS", &v)?;
        }
        if let Some(v) = get("QEPIK_HTTP_RATE_PER_S") {
            self.http.rate_per_s = parse("QEPIK_HTTP_RATE_PER_S", &v)?;
        }
        if let Some(v) = get("QEPIK_SMPP_LISTEN") {
            self.smpp.listen = if v.trim() == "off" { None } else { Some(parse("QEPIK_SMPP_LISTEN", &v)?) };
        }
        match (get("QEPIK_HTTP_TLS_CERT"), get("QEPIK_HTTP_TLS_KEY")) {
            (Some(cert), Some(key)) => {
                self.http.tls = Some(crate::tls::TlsSection {
                    cert_file: PathBuf::from(cert),
                    key_file: PathBuf::from(key),
                    client_ca_file: get("QEPIK_HTTP_TLS_CLIENT_CA").map(PathBuf::from),
                });
            }
            (None, None) => {}
            _ => {
                return Err(ConfigError::Invalid {
                    key: "QEPIK_HTTP_TLS_CERT".into(),
                    reason: "set both QEPIK_HTTP_TLS_CERT and QEPIK_HTTP_TLS_KEY".into(),
                });
            }
        }
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.server.shards == Some(0)
            || self.server.shards.is_some_and(|n| usize::from(n) > engine::limits::SHARD_COUNT_MAX)
        {
            return invalid("server.shards", "must be 1..=64");
        }
        if self.http.max_in_flight == 0 {
            return invalid("http.max_in_flight", "must be at least 1");
        }
        if self.http.queue_target_ms == 0 {
            return invalid("http.queue_target_ms", "must be at least 1");
        }
        if self.http.rate_per_s == 0 {
            return invalid("http.rate_per_s", "must be at least 1");
        }
        if !(1..=366).contains(&self.http.idempotency_retention_days) {
            return invalid("http.idempotency_retention_days", "must be 1..=366");
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if self.http.session_ttl_s == 0 || self.http.refresh_ttl_s < self.http.session_ttl_s {
            return invalid("http.session_ttl_s", "must be positive and not above http.refresh_ttl_s");
        }
        if !self.smpp.service_code.starts_with('*') || !self.smpp.service_code.ends_with('#') {
            return invalid("smpp.service_code", "must look like *150#");
        }
        if self.smpp.session_idle_s == 0 || self.smpp.max_sessions == 0 || self.smpp.enquire_link_s == 0 {
            return invalid("smpp", "session_idle_s, max_sessions and enquire_link_s must be positive");
        }
        for (i, operator) in self.smpp.operators.iter().enumerate() {
            let key = |field: &str| format!("smpp.operator[{i}].{field}");
            if operator.system_id.is_empty() || operator.system_id.len() > 15 {
                return Err(ConfigError::Invalid {
                    key: key("system_id"),
                    reason: "1 to 15 characters".into(),
                });
            }
            if operator.password.len() > 8 {
                return Err(ConfigError::Invalid {
                    key: key("password"),
                    reason: "at most 8 characters".into(),
                });
            }
            if operator.window == 0 || operator.max_binds == 0 || operator.throughput_per_s == 0 {
                return Err(ConfigError::Invalid {
                    key: key("window"),
                    reason: "window, max_binds and throughput_per_s must be positive".into(),
                });
            }
            if let Some(bad) = operator
                .sms_prefixes
                .iter()
                .find(|p| p.is_empty() || p.len() > 15 || !p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(ConfigError::Invalid {
                    key: key("sms_prefixes"),
                    reason: format!("{bad:?} is not 1 to 15 digits of an E.164 number"),
                });
            }
            if operator.mode == SmppMode::Client && operator.connect.is_none() {
                return Err(ConfigError::Invalid {
                    key: key("connect"),
                    reason: "client mode needs an address".into(),
                });
            }
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return invalid("server.data_dir", "must not be empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_configures_the_wallet_domain() {
        let text = include_str!("../../qepik.example.toml");
        let config = Config::parse(&format!("[http]\nlisten = \"127.0.0.1:9000\"\n{text}")).expect("example");
        let secret = std::sync::Arc::new(engine::secret::ServerSecret::generate());
        let domain = crate::server::domain_config(&config, secret).expect("wallet settings");
        assert_eq!(domain.policy, engine::wallet::Policy::default());
        let bad = Config::parse("[wallet]\notp_ttl_s = 0\n").expect("the server part parses");
        let secret = std::sync::Arc::new(engine::secret::ServerSecret::generate());
        let error = crate::server::domain_config(&bad, secret).expect_err("a zero OTP lifetime");
        assert!(error.to_string().contains("wallet.otp_ttl_s"), "{error}");
    }

    #[test]
    fn empty_is_the_defaults() {
        let config = Config::parse("").expect("defaults");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.data_dir, PathBuf::from("qepik-data"));
        assert!(config.wallet_toml.trim().is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let error = Config::parse("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").expect_err("unknown key");
        assert!(error.to_string().contains("lisen"), "{error}");
        let error = Config::parse("[http]\nlisten = \"nowhere\"\n").expect_err("bad address");
        assert!(error.to_string().contains("listen"), "{error}");
        let error = Config::parse("[http]\nidempotency_retention_days = 0\n").expect_err("no retention");
        assert!(error.to_string().contains("http.idempotency_retention_days"), "{error}");
        let error = Config::parse("[server]\nshards = 0\n").expect_err("zero shards");
        assert!(error.to_string().contains("server.shards"), "{error}");
        assert!(Config::parse("[server").is_err());
        let operator = |prefixes: &str| {
            format!(
                "[[smpp.operator]]\nname = \"a\"\nsystem_id = \"a\"\npassword = \"p\"\nsms_prefixes = {prefixes}\n"
            )
        };
        let config = Config::parse(&operator(r#"["99450", "99451"]"#)).expect("digit prefixes");
        assert_eq!(config.smpp.operators[0].sms_prefixes, ["99450", "99451"]);
        for bad in [r#"["99a5"]"#, r#"[""]"#, r#"["9945012345678901"]"#] {
            let error = Config::parse(&operator(bad)).expect_err(bad);
            assert!(error.to_string().contains("smpp.operator[0].sms_prefixes"), "{error}");
        }
        let error = Config::parse("[http]\nqueue_target_ms = 0\n").expect_err("zero target");
        assert!(error.to_string().contains("http.queue_target_ms"), "{error}");
    }

    #[test]
    fn wallet_sections_pass_through_and_env_overrides() {
        let mut config = Config::parse("[wallet]\notp_ttl_s = 120\n[http]\nrate_per_s = 5\n").expect("parse");
        assert!(config.wallet_toml.contains("otp_ttl_s = 120"));
        assert_eq!(config.http.rate_per_s, 5);
        config
            .apply_env(|name| match name {
                "QEPIK_HTTP_LISTEN" => Some("0.0.0.0:9090".into()),
                "QEPIK_DATA_DIR" => Some("/tmp/q".into()),
                _ => None,
            })
            .expect("env");
        assert_eq!(config.http.listen.port(), 9090);
        assert_eq!(config.server.data_dir, PathBuf::from("/tmp/q"));
        let error =
            config.apply_env(|name| (name == "QEPIK_SHARDS").then(|| "many".into())).expect_err("bad");
        assert!(error.to_string().contains("QEPIK_SHARDS"));
    }
}
