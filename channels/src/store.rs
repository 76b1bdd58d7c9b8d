//! The server's own state in sled (`data_dir/server`): credentials, customer sessions, and the
//! live wallet rules with their change log ([`crate::settings`]); the responses of idempotent
//! requests in fjall (`data_dir/server/idempotency`), an LSM tree whose bloom filters answer the
//! lookup of a new key (every money-moving request makes one) without a walk of the tree, and
//! whose writes append to its journal instead of copying a sled leaf. None of it is money: the ledger's journal is the record of
//! money, and a lost idempotency record cannot cause a second posting (an operation's ledger id
//! derives from the caller and its key, and the ledger answers a repeated id with the first
//! result). Secrets are not stored: API keys and session tokens are kept as SHA-256 hashes.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("server store: {0}")]
    Sled(#[from] sled::Error),
    #[error("server store (idempotency records): {0}")]
    Records(#[from] fjall::Error),
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The request body's keyed SHA-256 (see [`crate::http::idempotency`]).
    pub body_sha256: [u8; 32],
    pub status: u16,
    pub body: String,
}

/// The layout of [`StoredResponse::encode`].
const RESPONSE_VERSION: u8 = 1;

impl StoredResponse {
    /// Version, status (big-endian), the body's tag, the body: 35 bytes and the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(35 + self.body.len());
        bytes.push(RESPONSE_VERSION);
        bytes.extend_from_slice(&self.status.to_be_bytes());
        bytes.extend_from_slice(&self.body_sha256);
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<StoredResponse, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("idempotency record: {what}"));
        let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != RESPONSE_VERSION {
            return Err(corrupt(&format!("unknown layout {version}")));
        }
        let (status, rest) = rest.split_first_chunk::<2>().ok_or_else(|| corrupt("truncated"))?;
        let (tag, body) = rest.split_first_chunk::<32>().ok_or_else(|| corrupt("truncated"))?;
        let body = std::str::from_utf8(body).map_err(|_| corrupt("the body is not UTF-8"))?;
        Ok(StoredResponse { body_sha256: *tag, status: u16::from_be_bytes(*status), body: body.to_owned() })
    }
}

/// How sled kept a response (JSON) until the records moved to fjall; read once, to move them.
#[derive(Deserialize)]
struct SledResponse {
    body_sha256: String,
    status: u16,
    body: String,
}

impl SledResponse {
    fn into_stored(self) -> Result<StoredResponse, StoreError> {
        let mut tag = [0_u8; 32];
        hex::decode_to_slice(&self.body_sha256, &mut tag)
            .map_err(|e| StoreError::Corrupt(format!("idempotency record tag: {e}")))?;
        Ok(StoredResponse { body_sha256: tag, status: self.status, body: self.body })
    }
}

/// Responses kept in memory (besides sled) for retries that come soon, as most do.
const RECENT_MAX: usize = 200_000;

/// The day keyspaces kept, newest first, and how many days a record is kept.
struct Days {
    kept: Vec<(u64, fjall::Keyspace)>,
    retention: u64,
}

/// Days an idempotency record is kept unless the configuration says otherwise.
pub const RETENTION_DAYS: u64 = 7;

const DAY_PREFIX: &str = "responses-";

fn today() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400)
}

/// Keyed by operation id (see [`crate::http::idempotency::operation_id`]).
#[derive(Debug, Default)]
struct Recent {
    map: rustc_hash::FxHashMap<u128, StoredResponse>,
    order: std::collections::VecDeque<u128>,
    /// Written to fjall by the next [`Store::flush_responses`], encoded.
    unwritten: Vec<(u128, Vec<u8>)>,
}

/// The store. Reads of credentials and sessions are served from memory (written through to
/// sled); idempotent responses are written behind, in batches (see [`Store::put_response`]).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    credentials: sled::Tree,
    sessions: sled::Tree,
    /// The idempotency records' database, one keyspace per UTC day written (`responses-DAY`,
    /// days since 1970): operation id (16 bytes, big-endian; a SHA-256 of the caller and the
    /// key) → response.
    records: fjall::Database,
    days: std::sync::Arc<std::sync::RwLock<Days>>,
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
    /// [`Store::open_with`] keeping idempotency records [`RETENTION_DAYS`] days.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, RETENTION_DAYS)
    }

    /// Opens the store at `path`, keeping idempotency records `retention_days` (at least 1).
    pub fn open_with(path: &Path, retention_days: u64) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(path).cache_capacity(64 * 1024 * 1024).open()?;
        let credentials = db.open_tree("credentials")?;
        let mut cache = std::collections::HashMap::new();
        for value in credentials.iter().values() {
            let credential: Credential = decode(&value?)?;
            cache.insert(credential.key_id.clone(), credential);
        }
        // The journal reaches the OS at every flush (`PersistMode::Buffer`, every 20 ms) and the
        // disk at shutdown: a crash of the machine can lose the last records, which costs a
        // retry its stored answer, not a second posting (see the module's note). One worker, as
        // for the views' index: more spin against each other on two cores.
        let records = fjall::Database::builder(path.join("idempotency"))
            .manual_journal_persist(true)
            .worker_threads(1)
            .cache_size(32 * 1024 * 1024)
            .open()?;
        let mut kept = Vec::new();
        for name in records.list_keyspace_names() {
            if let Some(day) = name.strip_prefix(DAY_PREFIX).and_then(|d| d.parse::<u64>().ok()) {
                kept.push((day, day_keyspace(&records, day)?));
            }
        }
        kept.sort_by_key(|(day, _)| std::cmp::Reverse(*day));
        let days = Days { kept, retention: retention_days.max(1) };
        let days = std::sync::Arc::new(std::sync::RwLock::new(days));
        move_sled_responses(&db, &records, &days, today())?;
        Ok(Store {
            credentials,
            sessions: db.open_tree("sessions")?,
            records,
            days,
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

    /// The response recorded for operation `op`.
    pub fn response(&self, op: u128) -> Result<Option<StoredResponse>, StoreError> {
        if let Some(stored) = self.recent.lock().unwrap_or_else(|p| p.into_inner()).map.get(&op) {
            return Ok(Some(stored.clone()));
        }
        let days = self.days.read().unwrap_or_else(|p| p.into_inner());
        for (_, keyspace) in &days.kept {
            if let Some(value) = keyspace.get(op.to_be_bytes())? {
                return StoredResponse::decode(&value).map(Some);
            }
        }
        Ok(None)
    }

    /// Records a response: in memory at once, in fjall at the next [`Store::flush_responses`]
    /// (the server flushes every few milliseconds and at shutdown). A crash can lose the last
    /// few milliseconds of records; a retry then runs again under the same ledger id, which the
    /// ledger answers with its first result, so nothing posts twice.
    pub fn put_response(&self, op: u128, response: &StoredResponse) -> Result<(), StoreError> {
        let encoded = response.encode();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.unwritten.push((op, encoded));
        if recent.map.insert(op, response.clone()).is_none() {
            recent.order.push_back(op);
        }
        Ok(())
    }

    /// Writes the responses recorded since the last call as one fjall batch and hands its
    /// journal to the OS, then lets the oldest ones leave memory.
    pub fn flush_responses(&self) -> Result<usize, StoreError> {
        self.flush_responses_on(today())
    }

    /// [`Store::flush_responses`] into day `today`'s keyspace, first dropping the days past
    /// the retention.
    fn flush_responses_on(&self, today: u64) -> Result<usize, StoreError> {
        let keyspace = enter_day(&self.records, &self.days, today)?;
        let unwritten = std::mem::take(&mut self.recent.lock().unwrap_or_else(|p| p.into_inner()).unwritten);
        if unwritten.is_empty() {
            return Ok(0);
        }
        let written = unwritten.len();
        let mut batch = self.records.batch();
        for (op, response) in unwritten {
            batch.insert(&keyspace, op.to_be_bytes(), response);
        }
        batch.commit()?;
        self.records.persist(fjall::PersistMode::Buffer)?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent.order.len() > RECENT_MAX {
            if let Some(old) = recent.order.pop_front() {
                recent.map.remove(&old);
            }
        }
        Ok(written)
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
        self.records.persist(fjall::PersistMode::SyncAll)?;
        self.db.flush()?;
        Ok(())
    }
}

/// Day `day`'s keyspace, created if new. A small memtable: the records of the last 200,000
/// requests are answered from `recent`, so fjall is asked mostly for keys it does not have,
/// which its bloom filters answer; a large memtable would make every such miss a long
/// skiplist search.
fn day_keyspace(records: &fjall::Database, day: u64) -> Result<fjall::Keyspace, StoreError> {
    Ok(records.keyspace(&format!("{DAY_PREFIX}{day}"), || {
        fjall::KeyspaceCreateOptions::default().max_memtable_size(8 * 1024 * 1024)
    })?)
}

/// The keyspace to write on `today`: opens it the first time, and drops the days older than
/// the retention (a record written on day D is kept through day D + retention).
fn enter_day(
    records: &fjall::Database,
    days: &std::sync::RwLock<Days>,
    today: u64,
) -> Result<fjall::Keyspace, StoreError> {
    {
        let days = days.read().unwrap_or_else(|p| p.into_inner());
        if let Some((day, keyspace)) = days.kept.first()
            && *day >= today
        {
            return Ok(keyspace.clone());
        }
    }
    let mut days = days.write().unwrap_or_else(|p| p.into_inner());
    if days.kept.first().is_none_or(|(day, _)| *day < today) {
        days.kept.insert(0, (today, day_keyspace(records, today)?));
    }
    let oldest_kept = today.saturating_sub(days.retention);
    while let Some((day, _)) = days.kept.last()
        && *day < oldest_kept
    {
        if let Some((day, keyspace)) = days.kept.pop() {
            records.delete_keyspace(keyspace)?;
            tracing::info!(day, "server store: idempotency records of a day past the retention dropped");
        }
    }
    days.kept
        .first()
        .map(|(_, keyspace)| keyspace.clone())
        .ok_or_else(|| StoreError::Corrupt("no day keyspace".into()))
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Moves the idempotency records an older build kept in sled's `idempotency` tree into fjall,
/// then drops the tree. Done in batches and made durable before the tree goes, so a crash
/// midway moves them again on the next start (the same keys and values: harmless).
fn move_sled_responses(
    db: &sled::Db,
    records: &fjall::Database,
    days: &std::sync::RwLock<Days>,
    today: u64,
) -> Result<(), StoreError> {
    const OLD_TREE: &str = "idempotency";
    if !db.tree_names().iter().any(|name| name.as_ref() == OLD_TREE.as_bytes()) {
        return Ok(());
    }
    // sled kept no dates: the records count as today's.
    let keyspace = enter_day(records, days, today)?;
    let responses = &keyspace;
    let old = db.open_tree(OLD_TREE)?;
    let mut moved = 0_u64;
    let mut batch = records.batch();
    for entry in old.iter() {
        let (key, value) = entry?;
        // sled's key was the caller, a NUL and the Idempotency-Key; neither holds a NUL.
        let Some((caller, idempotency_key)) = std::str::from_utf8(&key).ok().and_then(|k| k.split_once('\0'))
        else {
            return Err(StoreError::Corrupt("idempotency record key: not a caller, NUL and key".into()));
        };
        let op = crate::http::idempotency::operation_id(caller, idempotency_key);
        let stored = decode::<SledResponse>(&value)?.into_stored()?;
        batch.insert(responses, op.to_be_bytes(), stored.encode());
        moved += 1;
        if moved.is_multiple_of(10_000) {
            std::mem::replace(&mut batch, records.batch()).commit()?;
        }
    }
    batch.commit()?;
    records.persist(fjall::PersistMode::SyncAll)?;
    drop(old);
    db.drop_tree(OLD_TREE)?;
    db.flush()?;
    if moved > 0 {
        tracing::info!(moved, "server store: idempotency records moved from sled to fjall");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store, waiting out sled's lock while the threads of a store just dropped
    /// wind down (sled releases its file lock from a background thread, a moment after the drop).
    fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
        for _ in 0..100 {
            match sled::open(path) {
                Err(sled::Error::Io(error)) if error.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                result => return Ok(result?),
            }
        }
        Ok(sled::open(path)?)
    }

    fn reopen(path: &Path, retention_days: u64) -> Result<Store, StoreError> {
        let mut tries = 0;
        loop {
            match Store::open_with(path, retention_days) {
                Err(StoreError::Sled(sled::Error::Io(error)))
                    if error.to_string().contains("could not acquire lock") && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                result => return result,
            }
        }
    }

    fn response(body: &str) -> StoredResponse {
        StoredResponse { body_sha256: [7; 32], status: 201, body: body.to_owned() }
    }

    #[test]
    fn a_response_encodes_and_decodes() {
        let stored = response(r#"{"transfer":"ab","fee":"0.50"}"#);
        assert_eq!(StoredResponse::decode(&stored.encode()).ok(), Some(stored.clone()));
        let encoded = stored.encode();
        assert!(StoredResponse::decode(&[]).is_err());
        assert!(StoredResponse::decode(&encoded[..20]).is_err(), "a truncated record");
        let mut other = encoded.clone();
        other[0] = 9;
        assert!(StoredResponse::decode(&other).is_err(), "an unknown layout");
        let mut bad = encoded;
        bad.push(0xff);
        assert!(StoredResponse::decode(&bad).is_err(), "a body that is not UTF-8");
    }

    #[test]
    fn responses_survive_a_reopen_from_memory_or_from_fjall() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (flushed, unflushed) = (11_u128, 12_u128);
        {
            let store = reopen(dir.path(), RETENTION_DAYS)?;
            store.put_response(flushed, &response("one"))?;
            assert_eq!(store.flush_responses()?, 1);
            assert_eq!(store.response(flushed)?, Some(response("one")));
            store.put_response(unflushed, &response("two"))?;
            assert_eq!(store.response(unflushed)?, Some(response("two")), "answered from memory");
            // Shutdown writes what is still in memory.
            store.flush()?;
        }
        let store = reopen(dir.path(), RETENTION_DAYS)?;
        assert_eq!(store.response(flushed)?, Some(response("one")));
        assert_eq!(store.response(unflushed)?, Some(response("two")));
        assert_eq!(store.response(13)?, None);
        Ok(())
    }

    #[test]
    fn records_are_kept_for_the_retention_then_dropped_whole_days_at_a_time() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let day = 20_000;
        {
            let store = reopen(dir.path(), 2)?;
            store.put_response(1, &response("day 0"))?;
            store.flush_responses_on(day)?;
            store.put_response(2, &response("day 1"))?;
            store.flush_responses_on(day + 1)?;
            // Not `flush`: it writes on the real today, which would drop these days at once.
            store.records.persist(fjall::PersistMode::SyncAll)?;
        }
        // Reopened, out of the recent map: both from fjall, the older day searched too.
        let store = reopen(dir.path(), 2)?;
        assert_eq!(store.response(1)?, Some(response("day 0")));
        assert_eq!(store.response(2)?, Some(response("day 1")));
        // Day + 2: day 0 is still within two days.
        store.flush_responses_on(day + 2)?;
        assert_eq!(store.response(1)?, Some(response("day 0")));
        // Day + 3: day 0 is past them and goes; day 1 stays.
        store.flush_responses_on(day + 3)?;
        store.recent.lock().unwrap_or_else(|p| p.into_inner()).map.clear();
        assert_eq!(store.response(1)?, None);
        assert_eq!(store.response(2)?, Some(response("day 1")));
        drop(store);
        let store = reopen(dir.path(), 2)?;
        assert_eq!(store.response(1)?, None, "the dropped day stays dropped");
        assert_eq!(store.days.read().unwrap_or_else(|p| p.into_inner()).kept.len(), 3);
        Ok(())
    }

    #[test]
    fn records_an_older_build_kept_in_sled_move_to_fjall() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tag = [0xab_u8; 32];
        {
            let db = sled::open(dir.path())?;
            let old = db.open_tree("idempotency")?;
            for n in 0..25_000_u32 {
                let value = serde_json::json!({"body_sha256": hex::encode(tag), "status": 200, "body": format!("{{\"n\":{n}}}")});
                old.insert(format!("agent-1\0key-{n}").as_bytes(), value.to_string().as_bytes())?;
            }
            db.flush()?;
        }
        {
            let store = reopen(dir.path(), RETENTION_DAYS)?;
            let op = crate::http::idempotency::operation_id("agent-1", "key-24999");
            let moved = store.response(op)?.ok_or_else(|| StoreError::Corrupt("not moved".into()))?;
            assert_eq!((moved.status, moved.body_sha256, moved.body.as_str()), (200, tag, r#"{"n":24999}"#));
            assert!(
                !store.db.tree_names().iter().any(|name| name.as_ref() == b"idempotency"),
                "the sled tree is dropped"
            );
        }
        // Opened again, nothing is left to move and the records stay.
        let store = reopen(dir.path(), RETENTION_DAYS)?;
        let op = crate::http::idempotency::operation_id("agent-1", "key-0");
        assert_eq!(store.response(op)?.map(|s| s.body), Some(r#"{"n":0}"#.to_owned()));
        Ok(())
    }

    #[test]
    fn a_corrupt_sled_record_stops_the_move_with_an_error_and_loses_nothing() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        {
            let db = sled::open(dir.path())?;
            db.open_tree("idempotency")?.insert(b"agent-1\0k".as_slice(), b"not json".as_slice())?;
            db.flush()?;
        }
        let Err(StoreError::Corrupt(reason)) = reopen(dir.path(), RETENTION_DAYS) else {
            panic!("a corrupt record must refuse the open");
        };
        assert!(reason.contains("expected"), "{reason}");
        let db = open_sled(dir.path())?;
        assert_eq!(db.open_tree("idempotency")?.len(), 1, "the old record is still there");
        Ok(())
    }
}
