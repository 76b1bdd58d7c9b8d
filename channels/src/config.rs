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
    ("QEPIK_HTTP_RATE_PER_S", "http.rate_per_s"),
    ("QEPIK_HTTP_TLS_CERT", "http.tls.cert_file (with QEPIK_HTTP_TLS_KEY)"),
    ("QEPIK_HTTP_TLS_KEY", "http.tls.key_file"),
    ("QEPIK_HTTP_TLS_CLIENT_CA", "http.tls.client_ca_file"),
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
    /// Whether to run the sled views (statements, transfer index).
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
    /// Requests being served at once; beyond it, requests get an immediate 429 (`overloaded`).
    pub max_in_flight: usize,
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
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_in_flight: 512,
            rate_per_s: 20_000,
            signature_window_s: 300,
            max_body_bytes: 64 * 1024,
            session_ttl_s: 15 * 60,
            refresh_ttl_s: 7 * 24 * 3600,
            tls: None,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerSection,
    pub http: HttpSection,
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
        let config = Config { server: file.server, http: file.http, wallet_toml };
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
        if let Some(v) = get("QEPIK_HTTP_RATE_PER_S") {
            self.http.rate_per_s = parse("QEPIK_HTTP_RATE_PER_S", &v)?;
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
        if self.http.rate_per_s == 0 {
            return invalid("http.rate_per_s", "must be at least 1");
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if self.http.session_ttl_s == 0 || self.http.refresh_ttl_s < self.http.session_ttl_s {
            return invalid("http.session_ttl_s", "must be positive and not above http.refresh_ttl_s");
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
        let error = Config::parse("[server]\nshards = 0\n").expect_err("zero shards");
        assert!(error.to_string().contains("server.shards"), "{error}");
        assert!(Config::parse("[server").is_err());
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
