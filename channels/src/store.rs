//! The server's own state in sled (`data_dir/server`): credentials, customer sessions and the
//! responses of idempotent requests. None of it is money: the ledger's journal is the record of
//! money, and a lost idempotency record cannot cause a second posting (an operation's ledger id
//! derives from the caller and its key, and the ledger answers a repeated id with the first
//! result). Secrets are not stored: API keys and session tokens are kept as SHA-256 hashes.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("server store: {0}")]
    Sled(#[from] sled::Error),
    #[error("server store record is corrupt: {0}")]
    Corrupt(String),
}

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An agent, kiosk or terminal: cash-in, cash-out, its float, its reports.
    Agent,
    /// An ATM network: redeems cash codes.
    Atm,
    /// Post-office staff: wallets, identification, cash-in/out at their post office, reversals.
    Staff,
    /// Administrators: agents, credentials, tiers, tariffs, the trial balance.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Atm => "atm",
            Role::Staff => "staff",
            Role::Admin => "admin",
        }
    }
}

/// An API credential. The caller holds the key (derived from the server secret and `key_id`);
/// the store holds its hash, to tell a revoked or rotated key from a valid one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub key_id: String,
    pub role: Role,
    /// The agent (agents, ATM networks, and staff: their post office) the caller acts for.
    pub agent: u64,
    /// The staff member's id (staff only), journaled with what they do.
    pub staff: u64,
    pub key_sha256: String,
    pub created_at_s: u64,
    pub revoked: bool,
}

/// A customer session: the token's hash is the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub msisdn: u64,
    pub expires_at_s: u64,
    /// Set on refresh tokens: the session they renew.
    pub refresh: bool,
}

/// The response of a finished idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub body_sha256: String,
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    credentials: sled::Tree,
    sessions: sled::Tree,
    idempotency: sled::Tree,
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(path).cache_capacity(64 * 1024 * 1024).open()?;
        Ok(Store {
            credentials: db.open_tree("credentials")?,
            sessions: db.open_tree("sessions")?,
            idempotency: db.open_tree("idempotency")?,
            db,
        })
    }

    pub fn credential(&self, key_id: &str) -> Result<Option<Credential>, StoreError> {
        self.credentials.get(key_id.as_bytes())?.map(|v| decode(&v)).transpose()
    }

    pub fn put_credential(&self, credential: &Credential) -> Result<(), StoreError> {
        self.credentials.insert(credential.key_id.as_bytes(), encode(credential)?)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        self.credentials.iter().values().map(|v| decode(&v?)).collect()
    }

    pub fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError> {
        self.sessions.get(token_sha256.as_bytes())?.map(|v| decode(&v)).transpose()
    }

    pub fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError> {
        self.sessions.insert(token_sha256.as_bytes(), encode(session)?)?;
        Ok(())
    }

    pub fn remove_session(&self, token_sha256: &str) -> Result<bool, StoreError> {
        Ok(self.sessions.remove(token_sha256.as_bytes())?.is_some())
    }

    pub fn response(&self, key: &[u8]) -> Result<Option<StoredResponse>, StoreError> {
        self.idempotency.get(key)?.map(|v| decode(&v)).transpose()
    }

    pub fn put_response(&self, key: &[u8], response: &StoredResponse) -> Result<(), StoreError> {
        self.idempotency.insert(key, encode(response)?)?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}
