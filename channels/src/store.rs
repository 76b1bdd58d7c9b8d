//! The server's own state in sled (`data_dir/server`): credentials, customer sessions, the
//! responses of idempotent requests, and the live wallet rules with their change log
//! ([`crate::settings`]). None of it is money: the ledger's journal is the record of
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// A merchant: dynamic QR payment requests and their status.
    Merchant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Atm => "atm",
            Role::Staff => "staff",
            Role::Admin => "admin",
            Role::Merchant => "merchant",
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

/// A merchant: where its payment notifications go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    pub merchant: u64,
    pub name: String,
    pub city: String,
    /// Where signed payment webhooks are posted, if anywhere.
    pub webhook_url: Option<String>,
}

/// A dynamic QR payment request and, once paid, who paid it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    pub request: String,
    pub merchant: u64,
    pub amount: u64,
    pub reference: String,
    pub expires_at_s: u64,
    pub paid: Option<Paid>,
    /// Who is paying it and until when: one payer at a time (see [`Store::claim`]).
    #[serde(default)]
    pub claim: Option<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paid {
    pub msisdn: String,
    pub operation: String,
    pub at_s: u64,
}

/// A webhook waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub merchant: u64,
    pub url: String,
    pub body: String,
    pub attempts: u32,
    pub next_at_s: u64,
}

/// The response of a finished idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub body_sha256: String,
    pub status: u16,
    pub body: String,
}

/// Responses kept in memory (besides sled) for retries that come soon, as most do.
const RECENT_MAX: usize = 200_000;

#[derive(Debug, Default)]
struct Recent {
    map: std::collections::HashMap<Vec<u8>, StoredResponse>,
    order: std::collections::VecDeque<Vec<u8>>,
    /// Written to sled by the next [`Store::flush_responses`].
    unwritten: Vec<(Vec<u8>, StoredResponse)>,
}

/// The store. Reads of credentials and sessions are served from memory (written through to
/// sled); idempotent responses are written behind, in batches (see [`Store::put_response`]).
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    credentials: sled::Tree,
    sessions: sled::Tree,
    idempotency: sled::Tree,
    merchants: sled::Tree,
    requests: sled::Tree,
    webhooks: sled::Tree,
    /// USSD: the language of numbers without a wallet (`lang:` + MSISDN), and the outcome of each
    /// subscriber's last money-moving operation (`last:` + MSISDN).
    ussd: sled::Tree,
    /// `live`: the wallet rules in force ([`crate::settings::StoredRules`]).
    settings: sled::Tree,
    /// Every change of the rules, keyed by a growing id: who, when, what.
    settings_changes: sled::Tree,
    credential_cache: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, Credential>>>,
    session_cache: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, Session>>>,
    recent: std::sync::Arc<std::sync::Mutex<Recent>>,
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
        let credentials = db.open_tree("credentials")?;
        let mut cache = std::collections::HashMap::new();
        for value in credentials.iter().values() {
            let credential: Credential = decode(&value?)?;
            cache.insert(credential.key_id.clone(), credential);
        }
        Ok(Store {
            credentials,
            sessions: db.open_tree("sessions")?,
            idempotency: db.open_tree("idempotency")?,
            merchants: db.open_tree("merchants")?,
            requests: db.open_tree("payment_requests")?,
            webhooks: db.open_tree("webhooks")?,
            ussd: db.open_tree("ussd")?,
            settings: db.open_tree("settings")?,
            settings_changes: db.open_tree("settings_changes")?,
            db,
            credential_cache: std::sync::Arc::new(std::sync::RwLock::new(cache)),
            session_cache: Default::default(),
            recent: Default::default(),
        })
    }

    fn ussd_key(kind: &str, msisdn: u64) -> Vec<u8> {
        let mut key = kind.as_bytes().to_vec();
        key.extend_from_slice(&msisdn.to_be_bytes());
        key
    }

    pub fn ussd_language(&self, msisdn: u64) -> Option<u8> {
        let value = self.ussd.get(Self::ussd_key("lang:", msisdn)).ok()??;
        value.first().copied()
    }

    pub fn put_ussd_language(&self, msisdn: u64, language: u8) -> Result<(), StoreError> {
        self.ussd.insert(Self::ussd_key("lang:", msisdn), &[language])?;
        Ok(())
    }

    pub fn ussd_last(&self, msisdn: u64) -> Result<Option<crate::ussd::flow::LastOperation>, StoreError> {
        self.ussd.get(Self::ussd_key("last:", msisdn))?.map(|v| decode(&v)).transpose()
    }

    pub fn put_ussd_last(
        &self,
        msisdn: u64,
        last: &crate::ussd::flow::LastOperation,
    ) -> Result<(), StoreError> {
        self.ussd.insert(Self::ussd_key("last:", msisdn), encode(last)?)?;
        Ok(())
    }

    pub fn credential(&self, key_id: &str) -> Result<Option<Credential>, StoreError> {
        Ok(self.credential_cache.read().unwrap_or_else(|p| p.into_inner()).get(key_id).cloned())
    }

    pub fn put_credential(&self, credential: &Credential) -> Result<(), StoreError> {
        self.credentials.insert(credential.key_id.as_bytes(), encode(credential)?)?;
        self.db.flush()?;
        let mut cache = self.credential_cache.write().unwrap_or_else(|p| p.into_inner());
        cache.insert(credential.key_id.clone(), credential.clone());
        Ok(())
    }

    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        Ok(self.credential_cache.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect())
    }

    pub fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError> {
        if let Some(session) = self.session_cache.read().unwrap_or_else(|p| p.into_inner()).get(token_sha256)
        {
            return Ok(Some(session.clone()));
        }
        let Some(session) =
            self.sessions.get(token_sha256.as_bytes())?.map(|v| decode::<Session>(&v)).transpose()?
        else {
            return Ok(None);
        };
        self.session_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token_sha256.to_owned(), session.clone());
        Ok(Some(session))
    }

    pub fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError> {
        self.sessions.insert(token_sha256.as_bytes(), encode(session)?)?;
        self.session_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token_sha256.to_owned(), session.clone());
        Ok(())
    }

    pub fn remove_session(&self, token_sha256: &str) -> Result<bool, StoreError> {
        let cached =
            self.session_cache.write().unwrap_or_else(|p| p.into_inner()).remove(token_sha256).is_some();
        Ok(self.sessions.remove(token_sha256.as_bytes())?.is_some() || cached)
    }

    pub fn response(&self, key: &[u8]) -> Result<Option<StoredResponse>, StoreError> {
        if let Some(stored) = self.recent.lock().unwrap_or_else(|p| p.into_inner()).map.get(key) {
            return Ok(Some(stored.clone()));
        }
        self.idempotency.get(key)?.map(|v| decode(&v)).transpose()
    }

    /// Records a response: in memory at once, in sled at the next [`Store::flush_responses`]
    /// (the server flushes every few milliseconds and at shutdown). A crash can lose the last
    /// few milliseconds of records; a retry then runs again under the same ledger id, which the
    /// ledger answers with its first result, so nothing posts twice.
    pub fn put_response(&self, key: &[u8], response: &StoredResponse) -> Result<(), StoreError> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.unwritten.push((key.to_vec(), response.clone()));
        if recent.map.insert(key.to_vec(), response.clone()).is_none() {
            recent.order.push_back(key.to_vec());
        }
        Ok(())
    }

    /// Writes the responses recorded since the last call as one sled batch, then lets the oldest
    /// ones leave memory.
    pub fn flush_responses(&self) -> Result<usize, StoreError> {
        let unwritten = std::mem::take(&mut self.recent.lock().unwrap_or_else(|p| p.into_inner()).unwritten);
        if unwritten.is_empty() {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        for (key, response) in &unwritten {
            batch.insert(key.as_slice(), encode(response)?);
        }
        self.idempotency.apply_batch(batch)?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent.order.len() > RECENT_MAX {
            if let Some(old) = recent.order.pop_front() {
                recent.map.remove(&old);
            }
        }
        Ok(unwritten.len())
    }

    pub fn merchant(&self, merchant: u64) -> Result<Option<Merchant>, StoreError> {
        self.merchants.get(merchant.to_be_bytes())?.map(|v| decode(&v)).transpose()
    }

    pub fn put_merchant(&self, merchant: &Merchant) -> Result<(), StoreError> {
        self.merchants.insert(merchant.merchant.to_be_bytes(), encode(merchant)?)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn payment_request(&self, request: &str) -> Result<Option<PaymentRequest>, StoreError> {
        self.requests.get(request.as_bytes())?.map(|v| decode(&v)).transpose()
    }

    pub fn put_payment_request(&self, request: &PaymentRequest) -> Result<(), StoreError> {
        self.requests.insert(request.request.as_bytes(), encode(request)?)?;
        Ok(())
    }

    /// Claims a request for `payer` for `ttl_s`: `Ok(true)` if it is theirs to pay (unclaimed,
    /// claimed by them, or a claim that lapsed), `Ok(false)` if another payer holds it or paid it.
    /// The ledger checks a transfer id only on the payer's shard, so this claim is what keeps two
    /// payers of one request from both paying it.
    pub fn claim(&self, request: &str, payer: &str, now_s: u64, ttl_s: u64) -> Result<bool, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let outcome = self.requests.transaction(|requests| {
            let Some(bytes) = requests.get(request.as_bytes())? else {
                return Ok(false);
            };
            let mut record: PaymentRequest = serde_json::from_slice(&bytes)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            if let Some(paid) = &record.paid {
                return Ok(paid.msisdn == payer);
            }
            match &record.claim {
                Some((holder, until)) if holder != payer && *until > now_s => return Ok(false),
                _ => {}
            }
            record.claim = Some((payer.to_owned(), now_s + ttl_s));
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            requests.insert(request.as_bytes(), bytes)?;
            Ok(true)
        });
        match outcome {
            Ok(mine) => Ok(mine),
            Err(TransactionError::Abort(reason)) => Err(StoreError::Corrupt(reason)),
            Err(TransactionError::Storage(error)) => Err(error.into()),
        }
    }

    /// Records a request as paid and queues its webhook, in one sled transaction, unless it was
    /// already recorded as paid (then nothing changes and `false` is returned).
    pub fn mark_paid(&self, request: &str, paid: Paid, webhook: Option<Webhook>) -> Result<bool, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        let id = self.db.generate_id()?;
        let outcome = (&self.requests, &self.webhooks).transaction(|(requests, webhooks)| {
            let Some(bytes) = requests.get(request.as_bytes())? else {
                return Ok(false);
            };
            let mut record: PaymentRequest = serde_json::from_slice(&bytes)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            if record.paid.is_some() {
                return Ok(false);
            }
            record.paid = Some(paid.clone());
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            requests.insert(request.as_bytes(), bytes)?;
            if let Some(webhook) = &webhook {
                let bytes = serde_json::to_vec(webhook)
                    .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                webhooks.insert(&id.to_be_bytes(), bytes)?;
            }
            Ok(true)
        });
        match outcome {
            Ok(done) => Ok(done),
            Err(TransactionError::Abort(reason)) => Err(StoreError::Corrupt(reason)),
            Err(TransactionError::Storage(error)) => Err(error.into()),
        }
    }

    /// Webhooks due at `now_s`, oldest first, at most `n`.
    pub fn due_webhooks(&self, now_s: u64, n: usize) -> Result<Vec<(sled::IVec, Webhook)>, StoreError> {
        let mut due = Vec::new();
        for entry in self.webhooks.iter() {
            let (key, value) = entry?;
            let webhook: Webhook = decode(&value)?;
            if webhook.next_at_s <= now_s {
                due.push((key, webhook));
                if due.len() >= n {
                    break;
                }
            }
        }
        Ok(due)
    }

    /// A webhook delivered (`None`: removed) or to retry later.
    pub fn settle_webhook(&self, key: &[u8], retry: Option<&Webhook>) -> Result<(), StoreError> {
        match retry {
            Some(webhook) => self.webhooks.insert(key, encode(webhook)?).map(drop)?,
            None => self.webhooks.remove(key).map(drop)?,
        }
        Ok(())
    }

    /// The live wallet rules, if any were recorded.
    pub fn rules(&self) -> Result<Option<crate::settings::StoredRules>, StoreError> {
        self.settings.get(b"live")?.map(|v| decode(&v)).transpose()
    }

    /// Records new live rules and the change that made them, together, durably.
    pub fn put_rules(
        &self,
        rules: &crate::settings::StoredRules,
        change: &crate::settings::SettingsChange,
    ) -> Result<(), StoreError> {
        use sled::transaction::{TransactionError, Transactional};
        let id = self.db.generate_id()?;
        let (rules, change) = (encode(rules)?, encode(change)?);
        let outcome = (&self.settings, &self.settings_changes).transaction(|(settings, changes)| {
            settings.insert(b"live".as_slice(), rules.as_slice())?;
            changes.insert(&id.to_be_bytes(), change.as_slice())?;
            Ok::<(), sled::transaction::ConflictableTransactionError<String>>(())
        });
        match outcome {
            Ok(()) => {}
            Err(TransactionError::Abort(reason)) => return Err(StoreError::Corrupt(reason)),
            Err(TransactionError::Storage(error)) => return Err(error.into()),
        }
        self.db.flush()?;
        Ok(())
    }

    /// The last `n` changes of the wallet rules, newest first.
    pub fn settings_changes(&self, n: usize) -> Result<Vec<crate::settings::SettingsChange>, StoreError> {
        self.settings_changes.iter().rev().take(n).map(|entry| decode(&entry?.1)).collect()
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_responses()?;
        self.db.flush()?;
        Ok(())
    }
}
