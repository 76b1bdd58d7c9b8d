//! Views derived from the journal: the transfer index by id (fjall), each account's history with
//! its running posted balance (the history log and its pages, [`history`]; read through
//! [`crate::statement`]), and the notification outbox ([`crate::outbox`], its own files). Nothing
//! here holds the only copy of anything but the outbox's acknowledgements: the views restart
//! from a journal position after a crash, and [`reindex`] rebuilds them from the journal.
//!
//! One thread tails the journal (reading only what became durable since its last pass, in passes
//! of at least 256 KiB or 5 ms). A pass holds the write lock of the accounts' running states: it
//! updates them in place, appends its history lines to the log and its notifications to the
//! outbox, writes the transfer index and the pages to fjall in one batch, and only then lets
//! readers in. Every 30 s, and when the views stop, the tail saves a snapshot: its position, the
//! log's length, every running state, the cross-shard transfers in flight and the unresolved
//! holds. After a crash it restarts from the snapshot: the log is cut back to the snapshot's
//! length and the passes after it are applied again. That is harmless: transfer and page writes
//! are idempotent inserts of the same values, and records at or before the outbox's watermark
//! (its newest entry's position) enqueue nothing. If fjall lost writes the snapshot relies on
//! (its mark is older than the snapshot), the log is shorter than the snapshot says, or the
//! snapshot is damaged, the history is rebuilt from the start of the journal.
//!
//! A history line is keyed by account, booked time and line number. The line number counts the
//! account's lines in the order the views apply the journal; the booked time is the time of the
//! record that applied the line, raised where needed to the account's previous line's, so that
//! key order, time order and application order are one order and `balance_after` reads as a
//! running balance down a statement. Start reading at [`Trees::apply`].

mod history;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use history::{HistoryLog, PAGE_LINES, Running};

use crate::ids::{AccountId, TransferId};
use crate::journal::record::WalRecord;
use crate::journal::{self, JournalError, JournalState};
use crate::ledger::Command;
use crate::money::Currency;
use crate::outbox::{Frames, Notification, NotificationKey, Outbox, RecordNotices, Store};
use crate::transfer::{Transfer, TransferFlags};
use crate::wallet::WalletCommand;

/// The keys of [`Trees::marks`]: the journal position the views applied (as of the last
/// snapshot).
const APPLIED_KEY: &[u8] = b"applied";
/// Where earlier builds kept the outbox's watermark (now the newest entry of [`Store`]): read
/// once, when their outbox moves to the outbox's files.
const WATERMARK_KEY: &[u8] = b"outbox_watermark";
/// The fjall keyspace that held the outbox in earlier builds.
const FJALL_OUTBOX: &str = "outbox";
/// The directory of the outbox's files, in the views' directory.
const OUTBOX_DIR: &str = "outbox";
const FORMAT_KEY: &[u8] = b"format";
/// The position of the newest history snapshot whose pages and index entries fjall holds:
/// written and fsynced before the snapshot file, so a snapshot newer than it means fjall lost
/// writes.
const HISTORY_MARK_KEY: &[u8] = b"history_mark";
/// The fjall keyspace of the transfer index.
const TRANSFERS: &str = "transfers";
/// The layout of the trees. Views of another layout are rebuilt from the journal on open.
const FORMAT: u64 = 4;
/// The files of the sled store that held the outbox and the position in earlier builds: what
/// they hold moves to fjall once on open, then they are removed, `conf` last (its presence is
/// what says a move is due).
const SLED_FILES: [&str; 2] = ["db", "conf"];
/// Journal bytes one pass of the view thread reads at most.
const PASS_LEN_MAX: u64 = 4 * 1024 * 1024;
/// A pass waits for this much durable journal, or for [`PASS_WAIT`] since the last pass, so
/// that at a high rate each pass (one fjall batch, one log write, one publication of running
/// states) covers many group commits instead of one.
const PASS_LEN_MIN: u64 = 256 * 1024;
const PASS_WAIT: Duration = Duration::from_millis(5);
/// How often the tail saves a history snapshot while it applies, by default.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

/// Why the views could not be opened or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    /// The outbox's files could not be read or written.
    #[error("views outbox at {path}: {source}")]
    Outbox { path: PathBuf, source: std::io::Error },
    /// The sled store of an older release (outbox and position) could not be moved to fjall.
    #[error("views store at {path} (older release, being moved to fjall): {source}")]
    Sled { path: PathBuf, source: sled::Error },
    /// The index store (fjall) failed.
    #[error("views index at {path}: {source}")]
    Index { path: PathBuf, source: fjall::Error },
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The history log or its snapshot could not be read or written.
    #[error("views history at {path}: {source}")]
    History { path: PathBuf, source: std::io::Error },
}

/// Why a read of the views failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The index store (transfers, history pages, outbox) failed.
    #[error("views index: {0}")]
    Index(#[from] fjall::Error),
    /// The history log could not be read, or a line in it is damaged.
    #[error("views history: {0}")]
    History(#[from] std::io::Error),
    /// The journal could not be read where the transfer index points.
    #[error("views index: {0}")]
    Journal(#[from] JournalError),
    /// The transfer index points at a journal record that does not hold the transfer.
    #[error(
        "views index: transfer {0} is not in the journal record its entry names; `qepik reindex` rebuilds the index"
    )]
    Dangling(TransferId),
}

/// What a history line records, and so whether it moved the posted balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum LineKind {
    /// Posted at once: a plain transfer, or a member of a linked chain once its cross-shard
    /// transfer posted.
    Posted = 0,
    /// A hold placed: it sits in the pending columns; the posted balance is unchanged.
    Pending = 1,
    /// A hold posted, wholly or partly: the line's amount is what was posted.
    HoldPosted = 2,
    /// A hold voided: the line's amount is what was released; the posted balance is unchanged.
    HoldVoided = 3,
    /// A hold reached its timeout: as a void, and the line names the hold itself.
    HoldExpired = 4,
}

impl LineKind {
    /// The kind stored as `value`, if it is one.
    pub fn from_u8(value: u8) -> Option<LineKind> {
        Some(match value {
            0 => LineKind::Posted,
            1 => LineKind::Pending,
            2 => LineKind::HoldPosted,
            3 => LineKind::HoldVoided,
            4 => LineKind::HoldExpired,
            _ => return None,
        })
    }

    /// Whether a line of this kind moved the account's posted balance by its amount.
    pub fn moves_posted(self) -> bool {
        matches!(self, LineKind::Posted | LineKind::HoldPosted)
    }

    /// A stable machine name, as exports write it.
    pub fn name(self) -> &'static str {
        match self {
            LineKind::Posted => "posted",
            LineKind::Pending => "pending",
            LineKind::HoldPosted => "hold_posted",
            LineKind::HoldVoided => "hold_voided",
            LineKind::HoldExpired => "hold_expired",
        }
    }
}

/// Where a line sits in its account's history: its booked time, then its line number. Lines are
/// ordered by it, and a line appended later always sorts after every existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LinePosition {
    /// Nanoseconds since the epoch; never less than the account's previous line's.
    pub booked_at: u64,
    /// The line's number in the account's history, from 1, in application order.
    pub line: u64,
}

impl LinePosition {
    /// The first position of lines booked at `booked_at` or later.
    pub fn at(booked_at: u64) -> LinePosition {
        LinePosition { booked_at, line: 0 }
    }

    /// The first position after this one.
    pub fn next(self) -> LinePosition {
        LinePosition { booked_at: self.booked_at, line: self.line.saturating_add(1) }
    }
}

/// One line of an account's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// When the ledger applied the transfer (ns since the epoch): for a cross-shard transfer
    /// its reserve on the debit shard, for an expiry the batch that expired the hold.
    pub timestamp: u64,
    /// When the views booked the line: the time of the journal record that applied it, raised
    /// to the account's previous line's if that was later. Statements are ordered and windowed
    /// by it.
    pub booked_at: u64,
    /// The line's number in the account's history, from 1, in the order the views applied them.
    pub line: u64,
    /// The transfer; for an expiry, the hold that expired.
    pub transfer_id: TransferId,
    /// The other side of the transfer.
    pub other_account: AccountId,
    /// Minor units: what was posted, held, or released, by [`LineKind`].
    pub amount: u64,
    /// True when the account was debited.
    pub debit: bool,
    /// The operation code; for the posting or voiding of a hold that has none, the hold's.
    pub code: u16,
    /// True for a hold placed ([`LineKind::Pending`]).
    pub pending: bool,
    /// What the line records.
    pub kind: LineKind,
    /// The operation reference (`Transfer::user_data`); for the posting or voiding of a hold
    /// that has none, the hold's.
    pub user_data: u128,
    /// The transfer's currency.
    pub currency: Currency,
    /// The account's posted balance after this line, in minor units: credits posted less debits
    /// posted, so positive for a funded wallet and negative for an account that issues money.
    /// Signed 128-bit, since a spread account's balance sums one `u64` pair per shard.
    pub balance_after: i128,
}

impl HistoryEntry {
    /// The line's place in its account's history.
    pub fn position(&self) -> LinePosition {
        LinePosition { booked_at: self.booked_at, line: self.line }
    }

    /// What the line did to the posted balance (minor units, signed).
    pub fn posted_change(&self) -> i128 {
        match (self.kind.moves_posted(), self.debit) {
            (false, _) => 0,
            (true, true) => -i128::from(self.amount),
            (true, false) => i128::from(self.amount),
        }
    }
}

/// Every account's running state; a pass holds the write lock while it applies.
type RunningStates = Arc<RwLock<FxHashMap<AccountId, Running>>>;

/// The views' stores: the history log (a file of lines), the outbox's files, and one fjall
/// database, an LSM tree, for the transfer index, the history pages and the marks.
#[derive(Clone)]
struct Trees {
    dir: PathBuf,
    index: fjall::Database,
    /// Transfer id → the journal positions before and after the record that holds it.
    transfers: fjall::Keyspace,
    /// One key per [`PAGE_LINES`] lines of an account: the account and the first line's
    /// position, to the log index of the last line and the page's length.
    pages: fjall::Keyspace,
    /// The position applied ([`APPLIED_KEY`]), the layout ([`FORMAT_KEY`]) and the history mark
    /// ([`HISTORY_MARK_KEY`]).
    marks: fjall::Keyspace,
    /// Transfer index entries on their way to [`Trees::transfers`].
    pending: PendingIndex,
    /// The pending entries sorted for an ingestion, kept allocated from one to the next: a
    /// buffer of 29 MB allocated afresh each time is mapped and zeroed afresh by the kernel
    /// (a tenth of the views thread, profiled).
    ingest_buffer: Arc<Mutex<TransferWrites>>,
    /// Notifications by [`NotificationKey`], until the sender acknowledges them.
    outbox: Arc<Store>,
    log: Arc<HistoryLog>,
    running: RunningStates,
}

impl std::fmt::Debug for Trees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trees").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// The history pages one pass writes, in key order.
type Writes = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;
/// The transfer index entries one pass writes, in journal order: id → the journal positions
/// before and after the record that holds the transfer.
type TransferWrites = Vec<(u128, [u8; 16])>;

/// Transfer index entries not yet in fjall, by id. An insert into fjall's memtable (a skip
/// list of hundreds of thousands of random ids) costs tens of cache misses; inserting into this
/// map costs one, and every [`INGEST_AT`] entries (and before each snapshot) they go to fjall
/// at once, sorted, as a new table (`Keyspace::start_ingestion`), past the memtable and
/// fjall's journal. Readers look here first, then in fjall.
type PendingIndex = Arc<RwLock<FxHashMap<u128, [u8; 16]>>>;

/// Pending transfer index entries that make the views write them to fjall: about 29 MiB of
/// map, one table of 29 MB, every 3 s at 300k transfers/s.
const INGEST_AT: usize = 900_000;

/// A transfer as the views found it in the journal: its body, when its record was applied,
/// and where that record lies (the positions before and after it). The transfer index keeps
/// only the two positions; a lookup reads the record again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    transfer: Transfer,
    at: u64,
    from: u64,
    to: u64,
}

/// What only the tail thread holds: where it is, and the cross-shard transfers in flight.
#[derive(Debug, Default)]
struct Tail {
    applied: u64,
    log_lines: u64,
    /// Reserves whose finalize is not applied yet.
    reserved: FxHashMap<u128, Found>,
    /// Members of linked chains by their cross-shard parent, in chain order.
    members: FxHashMap<u128, Vec<Found>>,
    /// Holds placed and not yet posted, voided or expired: their lines need the hold's body.
    holds: FxHashMap<u128, Transfer>,
    /// The buffers of the last pass, for the next.
    scratch: Scratch,
    /// The journal bytes a pass reads, kept for the next.
    journal_bytes: Vec<u8>,
}

/// Buffers a pass fills and hands back emptied: the next pass reuses them instead of growing
/// new ones, whose fresh pages the kernel would zero again on every pass.
#[derive(Debug, Default)]
struct Scratch {
    events: Vec<(u64, u64, Event)>,
    log: Vec<u8>,
    transfers: TransferWrites,
    outbox: Frames,
    notices: RecordNotices,
}

/// What a pass found in the journal, in journal order.
#[derive(Debug, Clone, Copy)]
enum Event {
    Transfer(Found),
    Expired(TransferId),
    Otp { msisdn: u64, nonce: u128, expires_at: u64 },
    Blocked { msisdn: u64, flag: u8 },
}

fn read_u64(keyspace: &fjall::Keyspace, key: &[u8]) -> Result<u64, fjall::Error> {
    Ok(keyspace.get(key)?.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
}

impl Trees {
    fn open(path: &Path) -> Result<Trees, ViewsError> {
        std::fs::create_dir_all(path)
            .map_err(|source| ViewsError::History { path: path.to_path_buf(), source })?;
        let log = HistoryLog::open(path)
            .map_err(|source| ViewsError::History { path: path.to_path_buf(), source })?;
        let outbox_path = path.join(OUTBOX_DIR);
        let outbox = Store::open(&outbox_path)
            .map_err(|source| ViewsError::Outbox { path: outbox_path.clone(), source })?;
        let index_path = path.join("index");
        let index_err = |source| ViewsError::Index { path: index_path.clone(), source };
        // No automatic journal writes: the views persist the index themselves before each
        // snapshot, and anything after the last one is applied again from the journal.
        // One worker: with more, fjall's first worker hands compactions back to the queue and
        // spins on it; on two cores that costs the engine a tenth of a core.
        let index = fjall::Database::builder(&index_path)
            .manual_journal_persist(true)
            .worker_threads(1)
            .cache_size(64 * 1024 * 1024)
            .open()
            .map_err(index_err)?;
        let keyspace =
            |name: &str| index.keyspace(name, fjall::KeyspaceCreateOptions::default).map_err(index_err);
        let mut trees = Trees {
            transfers: keyspace(TRANSFERS)?,
            pages: keyspace("pages")?,
            marks: keyspace("marks")?,
            pending: PendingIndex::default(),
            ingest_buffer: Arc::default(),
            outbox: Arc::new(outbox),
            index: index.clone(),
            dir: path.to_path_buf(),
            log: Arc::new(log),
            running: RunningStates::default(),
        };
        trees.move_from_sled()?;
        trees.move_outbox_from_fjall()?;
        trees.upgrade()?;
        Ok(trees)
    }

    /// Moves what an older release kept in sled: the outbox and its watermark to the outbox's
    /// files, the position and the layout to fjall; fsyncs both, then removes sled's files. A
    /// crash before the removal moves the same again at the next open (the outbox skips what it
    /// has); sled's files are not touched until everything they held is elsewhere.
    fn move_from_sled(&self) -> Result<(), ViewsError> {
        let path = &self.dir;
        if !path.join("conf").exists() {
            return Ok(());
        }
        let err = |source| ViewsError::Sled { path: path.clone(), source };
        let index_err = |source| ViewsError::Index { path: path.join("index"), source };
        let db = sled::Config::new().path(path).open().map_err(err)?;
        let outbox = db.open_tree("outbox").map_err(err)?;
        let meta = db.open_tree("meta").map_err(err)?;
        let mut frames = Frames::default();
        for entry in outbox.iter() {
            let (key, value) = entry.map_err(err)?;
            if let Some(key) = NotificationKey::from_bytes(&key) {
                frames.push_encoded(key, &value);
            }
        }
        let moved = frames.len();
        let watermark = meta
            .get(WATERMARK_KEY)
            .map_err(err)?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        self.store_outbox(&frames, watermark)?;
        let mut batch = self.index.batch();
        for key in [APPLIED_KEY, FORMAT_KEY] {
            if let Some(value) = meta.get(key).map_err(err)? {
                batch.insert(&self.marks, key, value.as_ref());
            }
        }
        batch.commit().map_err(index_err)?;
        self.index.persist(fjall::PersistMode::SyncAll).map_err(index_err)?;
        drop((outbox, meta, db));
        let io_err = |source| ViewsError::History { path: path.clone(), source };
        for entry in std::fs::read_dir(path).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == "blobs" {
                std::fs::remove_dir_all(entry.path()).map_err(io_err)?;
            } else if name.starts_with("snap.") {
                std::fs::remove_file(entry.path()).map_err(io_err)?;
            }
        }
        for name in SLED_FILES {
            match std::fs::remove_file(path.join(name)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io_err(error)),
                _ => {}
            }
        }
        tracing::info!(notifications = moved, "views: the outbox and the position moved from sled");
        Ok(())
    }

    /// Appends an earlier store's outbox entries and watermark to the outbox's files, and
    /// fsyncs them.
    fn store_outbox(&self, frames: &Frames, watermark: u64) -> Result<(), ViewsError> {
        let err = |source| ViewsError::Outbox { path: self.dir.join(OUTBOX_DIR), source };
        self.outbox.append(frames).map_err(err)?;
        self.outbox.raise_watermark(watermark).map_err(err)?;
        self.outbox.sync().map_err(err)
    }

    /// Moves the outbox an earlier build kept in fjall (entries and watermark) to the outbox's
    /// files, fsyncs them, then drops fjall's copy. A crash before the drop moves it again at
    /// the next open, and the files skip what they hold.
    fn move_outbox_from_fjall(&self) -> Result<(), ViewsError> {
        let index_err = |source| ViewsError::Index { path: self.dir.join("index"), source };
        let watermark = read_u64(&self.marks, WATERMARK_KEY).map_err(index_err)?;
        let exists = self.index.keyspace_exists(FJALL_OUTBOX);
        if !exists && watermark == 0 {
            return Ok(());
        }
        let keyspace = if exists {
            Some(
                self.index
                    .keyspace(FJALL_OUTBOX, fjall::KeyspaceCreateOptions::default)
                    .map_err(index_err)?,
            )
        } else {
            None
        };
        let mut frames = Frames::default();
        for entry in keyspace.iter().flat_map(|keyspace| keyspace.iter()) {
            let (key, value) = entry.into_inner().map_err(index_err)?;
            if let Some(key) = NotificationKey::from_bytes(&key) {
                frames.push_encoded(key, &value);
            }
        }
        self.store_outbox(&frames, watermark)?;
        if let Some(keyspace) = keyspace {
            self.index.delete_keyspace(keyspace).map_err(index_err)?;
        }
        self.marks.remove(WATERMARK_KEY).map_err(index_err)?;
        self.index.persist(fjall::PersistMode::SyncAll).map_err(index_err)?;
        tracing::info!(
            notifications = frames.len(),
            watermark,
            "views: the outbox moved from fjall to its files"
        );
        Ok(())
    }

    fn history_error(&self, source: std::io::Error) -> ViewsError {
        ViewsError::History { path: self.dir.clone(), source }
    }

    /// Where the tail restarts: the history snapshot if fjall and the log still hold what it relies on,
    /// else the start of the journal with the history cleared.
    fn recover(&self) -> Result<Tail, ViewsError> {
        let err = |source| ViewsError::Index { path: self.dir.join("index"), source };
        let mark = self
            .marks
            .get(HISTORY_MARK_KEY)
            .map_err(|source| ViewsError::Index { path: self.dir.join("index"), source })?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        let logged = self.log.lines().map_err(|e| self.history_error(e))?;
        let usable = match history::read_snapshot(&self.dir) {
            Ok(Some(snapshot)) if snapshot.tail.applied <= mark && snapshot.tail.log_lines <= logged => {
                Some(snapshot)
            }
            Ok(Some(snapshot)) => {
                tracing::warn!(
                    snapshot = snapshot.tail.applied,
                    mark,
                    lines = snapshot.tail.log_lines,
                    logged,
                    "views: the history snapshot is ahead of what the index or the log kept; rebuilding the history"
                );
                None
            }
            Ok(None) => None,
            Err(reason) => {
                tracing::warn!(%reason, "views: the history snapshot is unusable; rebuilding the history");
                None
            }
        };
        let Some(snapshot) = usable else {
            self.clear_history().map_err(err)?;
            return Ok(Tail::default());
        };
        self.log.truncate(snapshot.tail.log_lines).map_err(|e| self.history_error(e))?;
        *self.running.write().unwrap_or_else(|p| p.into_inner()) = snapshot.running;
        Ok(snapshot.tail)
    }

    /// Empties the history: pages, log, running states and snapshot.
    fn clear_history(&self) -> Result<(), fjall::Error> {
        self.pages.clear()?;
        self.marks.remove(HISTORY_MARK_KEY)?;
        history::remove_snapshot(&self.dir)?;
        self.log.truncate(0)?;
        self.running.write().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// Saves the tail's state: the index with its mark first (fsynced), then the log's lines,
    /// then the snapshot file.
    fn snapshot(&self, tail: &Tail) -> Result<(), fjall::Error> {
        self.ingest()?;
        let mut batch = self.index.batch();
        batch.insert(&self.marks, APPLIED_KEY, tail.applied.to_be_bytes());
        batch.insert(&self.marks, HISTORY_MARK_KEY, tail.applied.to_be_bytes());
        batch.commit()?;
        self.index.persist(fjall::PersistMode::SyncAll)?;
        self.log.sync()?;
        // After a power cut the outbox holds at least what the records up to the snapshot
        // enqueued; what it lost after them, the records applied again enqueue again.
        self.outbox.sync()?;
        let running = self.running.read().unwrap_or_else(|p| p.into_inner());
        Ok(history::write_snapshot(&self.dir, tail, &running)?)
    }

    /// Views written in an older layout are cleared to be rebuilt from the journal; what they
    /// had applied becomes the outbox watermark, so the rebuild notifies nobody of old news.
    fn upgrade(&mut self) -> Result<(), ViewsError> {
        let path = self.dir.join("index");
        let index_err = |source| ViewsError::Index { path: path.clone(), source };
        if read_u64(&self.marks, FORMAT_KEY).map_err(index_err)? == FORMAT {
            return Ok(());
        }
        let applied = self.applied().map_err(index_err)?;
        if applied > 0 {
            self.clear_derived().map_err(index_err)?;
            self.store_outbox(&Frames::default(), applied)?;
        }
        self.marks.insert(FORMAT_KEY, FORMAT.to_be_bytes()).map_err(index_err)?;
        self.index.persist(fjall::PersistMode::SyncAll).map_err(index_err)
    }

    /// Clears everything [`reindex`] rebuilds: all but the outbox and its watermark.
    /// Takes `&mut self`: it replaces the transfer index, so no other handle on these stores may
    /// exist yet.
    fn clear_derived(&mut self) -> Result<(), fjall::Error> {
        self.pending.write().unwrap_or_else(|p| p.into_inner()).clear();
        // The transfer index is replaced, not cleared: fjall journals a clear but not an
        // ingested table, so a clear replayed from fjall's journal at the next open would remove
        // the tables ingested after it.
        self.index.delete_keyspace(self.transfers.clone())?;
        self.transfers = self.index.keyspace(TRANSFERS, fjall::KeyspaceCreateOptions::default)?;
        self.clear_history()?;
        self.marks.remove(APPLIED_KEY)?;
        Ok(())
    }

    fn applied(&self) -> Result<u64, fjall::Error> {
        read_u64(&self.marks, APPLIED_KEY)
    }

    fn watermark(&self) -> u64 {
        self.outbox.watermark()
    }

    /// Applies records and then records `position` as applied. Returns how many notifications
    /// the pass enqueued.
    fn apply(
        &self,
        records: &[(u64, WalRecord)],
        position: u64,
        tail: &mut Tail,
    ) -> Result<usize, fjall::Error> {
        // (record end, record time, event)
        let mut scratch = std::mem::take(&mut tail.scratch);
        let mut events = std::mem::take(&mut scratch.events);
        events.clear();
        let mut record_start = tail.applied;
        for (record_end, record) in records {
            let from = std::mem::replace(&mut record_start, *record_end);
            let WalRecord::Batch { timestamp, commands, .. } = record else {
                continue;
            };
            let (end, at) = (*record_end, *timestamp);
            let found = |transfer: Transfer| Found { transfer, at, from, to: end };
            for command in commands {
                let Ok(command) = Command::try_from(command) else {
                    continue;
                };
                match command {
                    Command::Transfer(transfer) => events.push((end, at, Event::Transfer(found(transfer)))),
                    Command::Reserve(t) => {
                        tail.reserved.insert(t.id.0, found(t));
                    }
                    Command::ReserveLinked { transfer, parent } => {
                        tail.members.entry(parent.0).or_default().push(found(transfer));
                    }
                    Command::Finalize { id, result } => {
                        let found = tail.reserved.remove(&id.0);
                        let chain = tail.members.remove(&id.0).unwrap_or_default();
                        if result.is_ok() {
                            for reserved in found.into_iter().chain(chain) {
                                events.push((end, at, Event::Transfer(reserved)));
                            }
                        }
                    }
                    Command::Expire(id) => events.push((end, at, Event::Expired(id))),
                    Command::Wallet(command) => match *command {
                        WalletCommand::OtpIssued { msisdn, nonce, expires_at, .. } => {
                            events.push((end, at, Event::Otp { msisdn, nonce, expires_at }));
                        }
                        WalletCommand::Block { msisdn, flag, .. } => {
                            events.push((end, at, Event::Blocked { msisdn, flag }));
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }

        let watermark = self.watermark();
        // The pass changes running states in place, holding the lock until everything they
        // point at (lines, pages) is written: readers see the states before the pass or after.
        let mut running = self.running.write().unwrap_or_else(|p| p.into_inner());
        let mut pass = Pass::new(&mut running, &mut tail.holds, tail.log_lines, watermark, scratch);
        for chunk in events.chunks(TOUCH_AHEAD) {
            pass.touch(chunk);
            for (record_end, record_at, event) in chunk {
                pass.event(*record_end, *record_at, *event);
            }
        }
        let mut written = pass.finish();
        // The lines first: a page below, or a running state once the lock is released, may point
        // at any of them.
        self.log.write_at(tail.log_lines, &written.log)?;
        let pending = {
            let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
            pending.extend(written.transfers.drain(..));
            pending.len()
        };
        // The notifications: the newest one's position is the watermark, so a crash after this
        // append applies these records again without enqueueing them again.
        self.outbox.append(&written.outbox)?;
        let enqueued = written.outbox.len();
        let mut batch = self.index.batch();
        for (key, value) in written.pages {
            batch.insert(&self.pages, key, value);
        }
        batch.commit()?;
        drop(running);
        tail.log_lines += written.lines;
        tail.applied = position;
        events.clear();
        written.log.clear();
        written.outbox.clear();
        tail.scratch = Scratch {
            events,
            log: written.log,
            transfers: written.transfers,
            outbox: written.outbox,
            notices: written.notices,
        };
        if pending >= INGEST_AT {
            self.ingest()?;
        }
        Ok(enqueued)
    }

    /// Where the record that holds transfer `id` lies in the journal (the positions before and
    /// after it), if the index has the transfer.
    fn transfer_record(&self, id: TransferId) -> Result<Option<(u64, u64)>, ReadError> {
        // The pending entries first: an entry leaves them only once it is in fjall.
        let pending = self.pending.read().unwrap_or_else(|p| p.into_inner()).get(&id.0).copied();
        let value: [u8; 16] = match pending {
            Some(value) => value,
            None => match self.transfers.get(id.0.to_be_bytes())? {
                Some(value) => value.as_ref().try_into().map_err(|_| ReadError::Dangling(id))?,
                None => return Ok(None),
            },
        };
        // Big-endian: the first position is the high half.
        let [to, from] = crate::ids::halves(u128::from_be_bytes(value));
        Ok(Some((from, to)))
    }

    /// Writes the pending transfer index entries to fjall as one sorted table (fsynced with
    /// fjall's version before it returns), then forgets them. Readers find each entry in the
    /// map until the table is in place, and in fjall after.
    fn ingest(&self) -> Result<(), fjall::Error> {
        let mut entries = self.ingest_buffer.lock().unwrap_or_else(|p| p.into_inner());
        entries.clear();
        entries.extend(
            self.pending.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, value)| (*id, *value)),
        );
        if entries.is_empty() {
            return Ok(());
        }
        // Unique ids (map keys), so strictly ascending, as ingestion requires.
        entries.sort_unstable_by_key(|(id, _)| *id);
        let mut ingestion = self.transfers.start_ingestion()?;
        for (id, value) in entries.drain(..) {
            ingestion.write(id.to_be_bytes(), value)?;
        }
        ingestion.finish()?;
        self.pending.write().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }
}

/// What one pass writes.
struct Written {
    transfers: TransferWrites,
    /// Empty: handed back for the next pass.
    notices: RecordNotices,
    pages: Writes,
    /// Notifications by key, in key order.
    outbox: Frames,
    /// Encoded history lines, to append at the log's end.
    log: Vec<u8>,
    lines: u64,
}

/// One pass over a run of events: lines, running balances and notifications.
struct Pass<'a> {
    /// Every account's running state ([`Trees::running`], locked for the pass).
    running: &'a mut FxHashMap<AccountId, Running>,
    transfers: TransferWrites,
    pages: Writes,
    outbox: Frames,
    log: Vec<u8>,
    /// The log index of the pass's first line, and how many it wrote.
    log_first: u64,
    lines: u64,
    /// Holds not yet resolved ([`Tail::holds`]).
    holds: &'a mut FxHashMap<u128, Transfer>,
    watermark: u64,
    /// The journal record whose events are being applied, and its notifications so far.
    record: u64,
    notices: RecordNotices,
}

/// Events whose running states a pass looks up together before applying them.
const TOUCH_AHEAD: usize = 32;

impl<'a> Pass<'a> {
    /// Looks up the running states `events` will change, so that their cache misses (a map of
    /// a million accounts) overlap instead of coming one after another as the events apply.
    fn touch(&self, events: &[(u64, u64, Event)]) {
        let mut sink = 0;
        for (_, _, event) in events {
            if let Event::Transfer(found) = event {
                for account in [found.transfer.debit_account_id, found.transfer.credit_account_id] {
                    sink ^= self.running.get(&account).map_or(0, |running| running.lines);
                }
            }
        }
        std::hint::black_box(sink);
    }

    fn new(
        running: &'a mut FxHashMap<AccountId, Running>,
        holds: &'a mut FxHashMap<u128, Transfer>,
        log_first: u64,
        watermark: u64,
        scratch: Scratch,
    ) -> Pass<'a> {
        let Scratch { mut log, mut transfers, mut outbox, notices, .. } = scratch;
        log.clear();
        transfers.clear();
        outbox.clear();
        Pass {
            running,
            transfers,
            pages: Writes::new(),
            outbox,
            log,
            log_first,
            lines: 0,
            holds,
            watermark,
            record: 0,
            notices,
        }
    }

    /// Whether the record being applied is past the watermark: only then does it notify.
    fn notifying(&self) -> bool {
        self.record > self.watermark
    }

    fn event(&mut self, record_end: u64, record_at: u64, event: Event) {
        if record_end != self.record {
            self.flush_notices();
            self.record = record_end;
        }
        match event {
            Event::Transfer(found) => self.transfer(&found, record_at),
            Event::Expired(id) => self.expired(id, record_at),
            Event::Otp { msisdn, nonce, expires_at } => {
                if self.notifying() {
                    self.notices.push(Notification::Otp { msisdn, nonce, expires_at });
                }
            }
            Event::Blocked { msisdn, flag } => {
                if self.notifying() {
                    self.notices.push(Notification::Blocked { msisdn, flag, at: record_at });
                }
            }
        }
    }

    fn transfer(&mut self, found: &Found, record_at: u64) {
        let (t, at) = (&found.transfer, found.at);
        let mut value = [0_u8; 16];
        value[..8].copy_from_slice(&found.from.to_be_bytes());
        value[8..].copy_from_slice(&found.to.to_be_bytes());
        self.transfers.push((t.id.0, value));
        if t.flags.contains(TransferFlags::PENDING) {
            self.holds.insert(t.id.0, *t);
            return self.lines(t, LineKind::Pending, t.amount, 0, at, record_at);
        }
        let post = t.flags.contains(TransferFlags::POST_PENDING);
        if !post && !t.flags.contains(TransferFlags::VOID_PENDING) {
            return self.lines(t, LineKind::Posted, t.amount, t.amount, at, record_at);
        }
        // As the ledger resolves it: a post of 0 posts all of the hold, a void releases all.
        let held = self.holds.remove(&t.pending_id.0);
        let amount = match (&held, post && t.amount != 0) {
            (_, true) => t.amount,
            (Some(held), false) => held.amount,
            (None, false) => {
                tracing::warn!(id = %t.id, hold = %t.pending_id, "views: the resolved hold is not indexed");
                t.amount
            }
        };
        let line = Transfer {
            user_data: if t.user_data == 0 { held.map_or(0, |h| h.user_data) } else { t.user_data },
            code: if t.code == 0 { held.map_or(0, |h| h.code) } else { t.code },
            ..*t
        };
        let (kind, moved) = if post { (LineKind::HoldPosted, amount) } else { (LineKind::HoldVoided, 0) };
        self.lines(&line, kind, amount, moved, at, record_at)
    }

    fn expired(&mut self, id: TransferId, record_at: u64) {
        let Some(held) = self.holds.remove(&id.0) else {
            tracing::warn!(%id, "views: the expired hold is not indexed");
            return;
        };
        self.lines(&held, LineKind::HoldExpired, held.amount, 0, record_at, record_at)
    }

    /// The two lines of a transfer: `amount` as the lines show it, `moved` what was posted.
    fn lines(&mut self, t: &Transfer, kind: LineKind, amount: u64, moved: u64, at: u64, record_at: u64) {
        // The credit's line follows the debit's in the log and shares its body.
        for (account, debit) in [(t.debit_account_id, true), (t.credit_account_id, false)] {
            let mut entry = HistoryEntry {
                timestamp: at,
                booked_at: record_at,
                line: 0,
                transfer_id: t.id,
                other_account: if debit { t.credit_account_id } else { t.debit_account_id },
                amount,
                debit,
                code: t.code,
                pending: kind == LineKind::Pending,
                kind,
                user_data: t.user_data,
                currency: t.currency,
                balance_after: 0,
            };
            let change = if debit { -i128::from(moved) } else { i128::from(moved) };
            self.book(account, &mut entry, change, !debit);
        }
    }

    /// Numbers, dates and balances a line on `account`, and writes it.
    /// A `sibling` is written as the second line of the transfer whose first line was booked
    /// just before it ([`history::encode_sibling`]).
    fn book(&mut self, account: AccountId, entry: &mut HistoryEntry, change: i128, sibling: bool) {
        let running = self.running.entry(account).or_default();
        running.booked_at = running.booked_at.max(entry.booked_at);
        running.lines = running.lines.saturating_add(1);
        // Cannot saturate: every sub-account's columns are u64.
        running.balance = running.balance.saturating_add(change);
        entry.booked_at = running.booked_at;
        entry.line = running.lines;
        entry.balance_after = running.balance;
        if running.open_lines() == 1 {
            running.open_from = entry.booked_at;
        }
        let index = self.log_first + self.lines;
        if sibling {
            history::encode_sibling(&mut self.log, running.last, account, entry);
            self.lines += 1;
        } else {
            history::encode_line(&mut self.log, running.last, account, entry);
            self.lines += history::FULL_SLOTS;
        }
        running.last = index + 1;
        if running.open_lines() == PAGE_LINES {
            let first = LinePosition { booked_at: running.open_from, line: running.sealed + 1 };
            self.pages.insert(
                history_key(account, first).to_vec(),
                history::encode_page(running.last, PAGE_LINES).to_vec(),
            );
            running.sealed = running.lines;
        }
        if entry.kind.moves_posted()
            && self.notifying()
            && let Some(msisdn) = account.wallet_msisdn()
        {
            self.notices.money(msisdn, account, entry);
        }
    }

    fn flush_notices(&mut self) {
        for (index, notification) in self.notices.take().into_iter().enumerate() {
            let key =
                NotificationKey { position: self.record, index: u32::try_from(index).unwrap_or(u32::MAX) };
            self.outbox.push(key, &notification);
        }
    }

    fn finish(mut self) -> Written {
        self.flush_notices();
        Written {
            transfers: self.transfers,
            notices: self.notices,
            pages: self.pages,
            outbox: self.outbox,
            log: self.log,
            lines: self.lines,
        }
    }
}

fn history_key(account: AccountId, position: LinePosition) -> [u8; 24] {
    let mut key = [0_u8; 24];
    key[..8].copy_from_slice(&account.0.to_be_bytes());
    key[8..16].copy_from_slice(&position.booked_at.to_be_bytes());
    key[16..].copy_from_slice(&position.line.to_be_bytes());
    key
}

const HISTORY_VALUE_LEN: usize = 77;

fn encode_history(e: &HistoryEntry) -> [u8; HISTORY_VALUE_LEN] {
    let mut value = [0_u8; HISTORY_VALUE_LEN];
    value[..16].copy_from_slice(&e.transfer_id.0.to_be_bytes());
    value[16..24].copy_from_slice(&e.timestamp.to_be_bytes());
    value[24..32].copy_from_slice(&e.other_account.0.to_be_bytes());
    value[32..40].copy_from_slice(&e.amount.to_be_bytes());
    value[40..56].copy_from_slice(&e.user_data.to_be_bytes());
    value[56..72].copy_from_slice(&e.balance_after.to_be_bytes());
    value[72..74].copy_from_slice(&e.code.to_be_bytes());
    value[74] = u8::from(e.debit);
    value[75] = e.kind as u8;
    value[76] = e.currency as u8;
    value
}

fn decode_history(key: &[u8], value: &[u8]) -> Option<HistoryEntry> {
    let u64_at = |b: &[u8], i: usize| b.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
    let u128_at = |b: &[u8], i: usize| b.get(i..i + 16)?.try_into().ok().map(u128::from_be_bytes);
    let kind = LineKind::from_u8(*value.get(75)?)?;
    Some(HistoryEntry {
        timestamp: u64_at(value, 16)?,
        booked_at: u64_at(key, 8)?,
        line: u64_at(key, 16)?,
        transfer_id: TransferId(u128_at(value, 0)?),
        other_account: AccountId(u64_at(value, 24)?),
        amount: u64_at(value, 32)?,
        debit: *value.get(74)? == 1,
        code: u16::from_be_bytes(value.get(72..74)?.try_into().ok()?),
        pending: kind == LineKind::Pending,
        kind,
        user_data: u128_at(value, 40)?,
        currency: Currency::from_u8(*value.get(76)?)?,
        balance_after: i128::from_be_bytes(value.get(56..72)?.try_into().ok()?),
    })
}

/// The views' copy of a transfer: its fields (81 bytes) and the time it was applied (8).
const TRANSFER_VALUE_LEN: usize = 89;

/// A compact fixed layout for the views' copy of a transfer (the journal keeps the original).
fn encode_transfer(t: &Transfer, at: u64) -> [u8; TRANSFER_VALUE_LEN] {
    let mut out = [0_u8; TRANSFER_VALUE_LEN];
    out[0..16].copy_from_slice(&t.id.0.to_be_bytes());
    out[16..24].copy_from_slice(&t.debit_account_id.0.to_be_bytes());
    out[24..32].copy_from_slice(&t.credit_account_id.0.to_be_bytes());
    out[32..40].copy_from_slice(&t.amount.to_be_bytes());
    out[40..56].copy_from_slice(&t.pending_id.0.to_be_bytes());
    out[56..72].copy_from_slice(&t.user_data.to_be_bytes());
    out[72..76].copy_from_slice(&t.timeout_s.to_be_bytes());
    out[76..78].copy_from_slice(&t.code.to_be_bytes());
    out[78..80].copy_from_slice(&t.flags.0.to_be_bytes());
    out[80] = t.currency as u8;
    out[81..89].copy_from_slice(&at.to_be_bytes());
    out
}

fn decode_transfer(bytes: &[u8]) -> Option<(Transfer, u64)> {
    let u128_at = |i: usize| bytes.get(i..i + 16)?.try_into().ok().map(u128::from_be_bytes);
    let u64_at = |i: usize| bytes.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
    let u16_at = |i: usize| bytes.get(i..i + 2)?.try_into().ok().map(u16::from_be_bytes);
    let transfer = Transfer {
        id: TransferId(u128_at(0)?),
        debit_account_id: AccountId(u64_at(16)?),
        credit_account_id: AccountId(u64_at(24)?),
        amount: u64_at(32)?,
        pending_id: TransferId(u128_at(40)?),
        user_data: u128_at(56)?,
        timeout_s: u32::from_be_bytes(bytes.get(72..76)?.try_into().ok()?),
        code: u16_at(76)?,
        flags: TransferFlags(u16_at(78)?),
        currency: crate::money::Currency::from_u8(*bytes.get(80)?)?,
    };
    Some((transfer, u64_at(81)?))
}

/// An account's lines in a range, oldest first (from [`Views::lines`]), read lazily page by
/// page from both ends.
pub struct Lines {
    log: Arc<HistoryLog>,
    account: AccountId,
    start: LinePosition,
    to_ns: u64,
    /// The account's pages that may hold lines of the window, in order.
    pages: fjall::Iter,
    /// Pages whose first line is past this were sealed after the read began: the open lines
    /// below hold those lines.
    sealed: u64,
    /// The lines after the last page, as of the read's start: (last line's log index + 1,
    /// count). Taken by whichever end reaches it first.
    open: Option<(u64, u64)>,
    front: VecDeque<HistoryEntry>,
    back: VecDeque<HistoryEntry>,
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines").field("account", &self.account).finish_non_exhaustive()
    }
}

impl Lines {
    fn keeps(&self, line: &HistoryEntry) -> bool {
        line.position() >= self.start && line.booked_at < self.to_ns
    }

    fn open_lines(&mut self) -> Option<Result<Vec<HistoryEntry>, ReadError>> {
        let (last, count) = self.open.take()?;
        Some(self.log.chain(self.account, last, count).map_err(ReadError::from))
    }

    /// The lines of one page, read from the log, if the pages entry is one this read counts.
    fn page(&self, entry: fjall::Guard) -> Result<Vec<HistoryEntry>, ReadError> {
        let (key, value) = entry.into_inner()?;
        let first_line = key.get(16..24).and_then(|b| b.try_into().ok()).map_or(u64::MAX, u64::from_be_bytes);
        if first_line > self.sealed {
            return Ok(Vec::new());
        }
        // A page that cannot be read is an error, as a damaged line is: skipping it would drop
        // its lines from a statement without a word.
        let Some((last, count)) = history::decode_page(&value) else {
            return Err(ReadError::History(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "history page of account {} is undecodable; `qepik reindex` rebuilds it",
                    self.account
                ),
            )));
        };
        Ok(self.log.chain(self.account, last, count)?)
    }
}

impl Iterator for Lines {
    type Item = Result<HistoryEntry, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(line) = self.front.pop_front() {
                if line.booked_at >= self.to_ns {
                    self.front.clear();
                    self.back.clear();
                    self.open = None;
                    return None;
                }
                if self.keeps(&line) {
                    return Some(Ok(line));
                }
                continue;
            }
            let lines = match self.pages.next() {
                Some(entry) => self.page(entry),
                None => match self.open_lines() {
                    Some(lines) => lines,
                    None => {
                        let line = self.back.pop_front()?;
                        self.front.push_back(line);
                        continue;
                    }
                },
            };
            match lines {
                Ok(lines) => self.front.extend(lines),
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

/// Newest first, for the last lines of a window (the USSD mini statement).
impl DoubleEndedIterator for Lines {
    fn next_back(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(line) = self.back.pop_back() {
                if line.position() < self.start {
                    self.front.clear();
                    self.back.clear();
                    return None;
                }
                if self.keeps(&line) {
                    return Some(Ok(line));
                }
                continue;
            }
            let lines = match self.open_lines() {
                Some(lines) => lines,
                None => match self.pages.next_back() {
                    Some(entry) => self.page(entry),
                    None => {
                        let line = self.front.pop_back()?;
                        self.back.push_front(line);
                        continue;
                    }
                },
            };
            match lines {
                Ok(lines) => self.back.extend(lines),
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

/// The running views: a tail thread and read access.
#[derive(Debug)]
pub struct Views {
    trees: Trees,
    journal_dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    error: Arc<Mutex<Option<String>>>,
    /// The position applied. The tail thread holds the sender: once it stops, waiting ends.
    progress: tokio::sync::watch::Receiver<u64>,
    /// Notifications enqueued since open: readers of the outbox wait on it.
    enqueued: tokio::sync::watch::Receiver<u64>,
}

impl Views {
    /// Opens the views and starts tailing the journal from the position they last applied.
    pub fn open(path: &Path, journal_dir: &Path, journal: Arc<JournalState>) -> Result<Views, ViewsError> {
        Views::open_with(path, journal_dir, journal, SNAPSHOT_EVERY)
    }

    /// As [`Views::open`], saving a snapshot every `snapshot_every` while the tail applies.
    pub fn open_with(
        path: &Path,
        journal_dir: &Path,
        journal: Arc<JournalState>,
        snapshot_every: Duration,
    ) -> Result<Views, ViewsError> {
        let trees = Trees::open(path)?;
        let mut state = trees.recover()?;
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let (progress_tx, progress) = tokio::sync::watch::channel(state.applied);
        let (enqueued_tx, enqueued) = tokio::sync::watch::channel(0);
        let thread = {
            let (trees, stop, error) = (trees.clone(), stop.clone(), error.clone());
            let journal_dir = journal_dir.to_path_buf();
            std::thread::Builder::new()
                .name("qepik-views".into())
                .spawn(move || {
                    // The senders drop when this thread ends, which ends every wait on them.
                    let signals = Signals { progress: progress_tx, enqueued: enqueued_tx };
                    if let Err(message) =
                        tail(&trees, &mut state, &journal_dir, &journal, &stop, &signals, snapshot_every)
                    {
                        tracing::error!(%message, "views stopped");
                        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    }
                })
                .map_err(|source| ViewsError::History { path: path.to_path_buf(), source })?
        };
        Ok(Views {
            trees,
            journal_dir: journal_dir.to_path_buf(),
            stop,
            thread: Mutex::new(Some(thread)),
            error,
            progress,
            enqueued,
        })
    }

    /// The journal position the views have applied up to.
    pub fn applied(&self) -> u64 {
        *self.progress.borrow()
    }

    /// Why the tail thread stopped, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The transfer, if the view has it: the position after the journal record that holds its
    /// body (for a cross-shard transfer, its reserve's), the body, and that record's time.
    pub fn transfer(&self, id: TransferId) -> Result<Option<(u64, Transfer, u64)>, ReadError> {
        let Some((from, to)) = self.trees.transfer_record(id)? else {
            return Ok(None);
        };
        // The record that holds the transfer: a plain transfer's, or its reserve's.
        let (records, _) = journal::read_range(&self.journal_dir, from, to)?;
        for (end, record) in records {
            let WalRecord::Batch { timestamp, commands, .. } = record else {
                continue;
            };
            for command in &commands {
                let transfer = match Command::try_from(command) {
                    Ok(
                        Command::Transfer(t)
                        | Command::Reserve(t)
                        | Command::ReserveLinked { transfer: t, .. },
                    ) => t,
                    _ => continue,
                };
                if transfer.id == id {
                    return Ok(Some((end, transfer, timestamp)));
                }
            }
        }
        Err(ReadError::Dangling(id))
    }

    /// An account's history booked from `from_ns` on, oldest first, at most `limit` lines.
    pub fn history(
        &self,
        account: AccountId,
        from_ns: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, ReadError> {
        self.lines(account, LinePosition::at(from_ns), u64::MAX).take(limit).collect()
    }

    /// An account's lines from `start` (inclusive) to those booked at `to_ns` (exclusive),
    /// oldest first, read lazily: [`crate::statement`] pages and exports through it. The read
    /// sees the account as the views had applied it when the read began.
    pub fn lines(&self, account: AccountId, start: LinePosition, to_ns: u64) -> Lines {
        let running = self.running(account);
        let start_key = history_key(account, start);
        let end = history_key(account, LinePosition::at(to_ns));
        // The page holding `start` begins at or before it.
        let from = match self
            .trees
            .pages
            .range(history_key(account, LinePosition::default())..=start_key)
            .next_back()
        {
            Some(guard) => match guard.key() {
                Ok(key) => key.to_vec(),
                Err(_) => start_key.to_vec(),
            },
            None => start_key.to_vec(),
        };
        let pages = if from.as_slice() < end.as_slice() {
            self.trees.pages.range(from.as_slice()..end.as_slice())
        } else {
            self.trees.pages.range(end.as_slice()..end.as_slice())
        };
        Lines {
            log: self.trees.log.clone(),
            account,
            start,
            to_ns,
            pages,
            sealed: running.sealed,
            open: (running.open_lines() > 0).then_some((running.last, running.open_lines())),
            front: VecDeque::new(),
            back: VecDeque::new(),
        }
    }

    fn running(&self, account: AccountId) -> Running {
        self.trees
            .running
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&account)
            .copied()
            .unwrap_or_default()
    }

    /// The account's posted balance as of [`Views::applied`] (credits less debits, minor
    /// units), and how many lines its history has.
    pub fn balance(&self, account: AccountId) -> (i128, u64) {
        let running = self.running(account);
        (running.balance, running.lines)
    }

    /// The notification outbox, for the sender that drains it.
    pub fn outbox(&self) -> Outbox {
        Outbox::new(self.trees.outbox.clone(), self.enqueued.clone())
    }

    /// Waits until the views have applied the journal up to `position`, or have stopped: how a
    /// reader sees its own writes (pass the journal's durable position from after the write).
    /// Returns whether the views got there.
    pub async fn reached(&self, position: u64) -> bool {
        let mut progress = self.progress.clone();
        progress.wait_for(|applied| *applied >= position).await.is_ok()
    }

    /// Blocks until the views have applied the journal up to `position`, or `timeout` passes.
    /// Returns whether they got there.
    pub fn wait_for(&self, position: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.applied() < position {
            if std::time::Instant::now() >= deadline || self.error().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops the tail thread (which saves a snapshot) and flushes the stores. The views resume
    /// from the snapshot next time.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _panicked = thread.join();
        }
        let _persisted = self.trees.index.persist(fjall::PersistMode::SyncAll);
        let _synced = self.trees.outbox.sync();
    }
}

/// How the tail tells others what it did: the position applied and the notifications enqueued.
struct Signals {
    progress: tokio::sync::watch::Sender<u64>,
    enqueued: tokio::sync::watch::Sender<u64>,
}

fn tail(
    trees: &Trees,
    state: &mut Tail,
    journal_dir: &Path,
    journal: &JournalState,
    stop: &AtomicBool,
    signals: &Signals,
    snapshot_every: Duration,
) -> Result<(), String> {
    let mut saved = (Instant::now(), state.applied);
    let mut last_pass = Instant::now();
    loop {
        // Stopping does not wait for the views to catch up: they resume from their snapshot.
        if stop.load(Ordering::Acquire) {
            if state.applied > saved.1 {
                trees.snapshot(state).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        if state.applied > saved.1 && saved.0.elapsed() >= snapshot_every {
            trees.snapshot(state).map_err(|e| e.to_string())?;
            saved = (Instant::now(), state.applied);
        }
        let from = state.applied;
        let durable = journal.durable();
        if durable <= from {
            if journal.failed() {
                return Ok(());
            }
            journal.wait_past(from, Duration::from_millis(50));
            continue;
        }
        let since = last_pass.elapsed();
        if durable - from < PASS_LEN_MIN && since < PASS_WAIT {
            std::thread::sleep(PASS_WAIT - since);
            continue;
        }
        last_pass = Instant::now();
        let count = catch_up_step(trees, journal_dir, durable, state)?;
        signals.progress.send_replace(state.applied);
        if count > 0 {
            let count = u64::try_from(count).unwrap_or(u64::MAX);
            signals.enqueued.send_modify(|total| *total = total.saturating_add(count));
        }
    }
}

/// Applies one pass from the tail's position towards `durable`: at most about
/// [`PASS_LEN_MAX`] bytes of whole records. Returns the notifications enqueued.
fn catch_up_step(trees: &Trees, journal_dir: &Path, durable: u64, tail: &mut Tail) -> Result<usize, String> {
    let from = tail.applied;
    let window_end = durable.min(from.saturating_add(PASS_LEN_MAX));
    let buffer = &mut tail.journal_bytes;
    let (mut records, mut reached) =
        journal::read_range_with(journal_dir, from, window_end, buffer).map_err(|e| e.to_string())?;
    if reached == from {
        // One record larger than the window: read up to the durable end instead.
        (records, reached) =
            journal::read_range_with(journal_dir, from, durable, buffer).map_err(|e| e.to_string())?;
    }
    trees.apply(&records, reached, tail).map_err(|e| e.to_string())
}

/// Rebuilds the views from the journal: clears them and applies every durable record. The
/// engine must not be running on this data directory.
///
/// The outbox and its watermark are kept: notifications still waiting stay, and records at or
/// before the watermark enqueue nothing again, so a rebuild never re-sends what was delivered.
/// (Deleting the `views` directory instead loses both.)
pub fn reindex(data_dir: &Path) -> Result<u64, ViewsError> {
    let path = data_dir.join("views");
    let journal_dir = data_dir.join("journal");
    let mut trees = Trees::open(&path)?;
    let err = |source| ViewsError::Index { path: path.join("index"), source };
    trees.clear_derived().map_err(err)?;
    let end = journal::scan::<JournalError>(&journal_dir, 0, journal::TailRepair::ReportOnly, |_, _| Ok(()))?;
    let mut tail = Tail::default();
    while tail.applied < end.position {
        let position = tail.applied;
        catch_up_step(&trees, &journal_dir, end.position, &mut tail).map_err(|reason| {
            ViewsError::Journal(JournalError::Corrupt {
                segment: journal_dir.clone(),
                offset: position,
                reason,
            })
        })?;
        if tail.applied == position {
            break;
        }
    }
    trees.snapshot(&tail).map_err(err)?;
    Ok(tail.applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: LineKind) -> HistoryEntry {
        HistoryEntry {
            timestamp: 5,
            booked_at: 7,
            line: 3,
            transfer_id: TransferId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
            other_account: AccountId::spread(9),
            amount: 12_345,
            debit: true,
            code: 100,
            pending: kind == LineKind::Pending,
            kind,
            user_data: u128::MAX - 1,
            currency: Currency::Usd,
            balance_after: -42,
        }
    }

    fn positions(from: u64, to: u64) -> [u8; 16] {
        let mut value = [0_u8; 16];
        value[..8].copy_from_slice(&from.to_be_bytes());
        value[8..].copy_from_slice(&to.to_be_bytes());
        value
    }

    #[test]
    fn pending_index_entries_reach_fjall_sorted_and_stay_readable() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let trees = Trees::open(dir.path())?;
        // Ids out of order, spread over the whole range, one written twice (the later wins).
        let ids: Vec<u128> =
            (1..=500_u128).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)).collect();
        {
            let mut pending = trees.pending.write().expect("lock");
            pending.extend(ids.iter().enumerate().map(|(i, id)| (*id, positions(i as u64, i as u64 + 1))));
            pending.extend([(ids[7], positions(70, 71))]);
        }
        let expect = |i: usize| if i == 7 { (70, 71) } else { (i as u64, i as u64 + 1) };
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(trees.transfer_record(TransferId(*id))?, Some(expect(i)), "pending {i}");
        }
        trees.ingest()?;
        assert!(trees.pending.read().expect("lock").is_empty());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(trees.transfer_record(TransferId(*id))?, Some(expect(i)), "ingested {i}");
        }
        assert_eq!(trees.transfer_record(TransferId(12345))?, None);
        // A second table naming an id again: the newer entry wins, in the map and in fjall.
        trees.pending.write().expect("lock").insert(ids[3], positions(30, 31));
        assert_eq!(trees.transfer_record(TransferId(ids[3]))?, Some((30, 31)));
        trees.ingest()?;
        assert_eq!(trees.transfer_record(TransferId(ids[3]))?, Some((30, 31)));
        assert_eq!(trees.transfer_record(TransferId(ids[4]))?, Some((4, 5)));
        // Nothing pending: nothing written.
        trees.ingest()?;
        // Reopened, the ingested tables are there; `reindex` clears them with the pending ones.
        drop(trees);
        let mut trees = Trees::open(dir.path())?;
        assert_eq!(trees.transfer_record(TransferId(ids[9]))?, Some((9, 10)));
        trees.pending.write().expect("lock").insert(1, positions(1, 2));
        trees.clear_derived()?;
        assert_eq!(trees.transfer_record(TransferId(ids[9]))?, None);
        assert_eq!(trees.transfer_record(TransferId(1))?, None);
        // What is written after a clear is read back, before and after reopening.
        trees.pending.write().expect("lock").insert(ids[9], positions(90, 91));
        trees.ingest()?;
        assert_eq!(trees.transfer_record(TransferId(ids[9]))?, Some((90, 91)));
        drop(trees);
        let trees = Trees::open(dir.path())?;
        assert_eq!(trees.transfer_record(TransferId(ids[9]))?, Some((90, 91)));
        Ok(())
    }

    #[test]
    fn an_older_builds_sled_outbox_and_position_move_out_of_sled() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let keys: Vec<[u8; 12]> =
            (1..=3_u64).map(|i| NotificationKey { position: i * 100, index: 0 }.to_bytes()).collect();
        let otp = Notification::Otp { msisdn: 994_501_234_567, nonce: 7, expires_at: 9 }.encode();
        {
            let db = sled::Config::new().path(dir.path()).open()?;
            let outbox = db.open_tree("outbox")?;
            for key in &keys {
                outbox.insert(key, otp.as_slice())?;
            }
            let meta = db.open_tree("meta")?;
            meta.insert(APPLIED_KEY, &300_u64.to_be_bytes())?;
            meta.insert(WATERMARK_KEY, &300_u64.to_be_bytes())?;
            meta.insert(FORMAT_KEY, &FORMAT.to_be_bytes())?;
            db.flush()?;
        }
        // sled lets go of its lock from its own threads, a moment after the last handle drops.
        let mut opened = Trees::open(dir.path());
        for _ in 0..100 {
            match &opened {
                Err(ViewsError::Sled { .. }) => {
                    std::thread::sleep(Duration::from_millis(20));
                    opened = Trees::open(dir.path());
                }
                _ => break,
            }
        }
        let trees = opened?;
        assert_eq!((trees.applied()?, trees.watermark()), (300, 300));
        assert_eq!(read_u64(&trees.marks, FORMAT_KEY)?, FORMAT);
        let (_tx, rx) = tokio::sync::watch::channel(0);
        let outbox = Outbox::new(trees.outbox.clone(), rx);
        let moved = outbox.oldest(10)?;
        assert_eq!(moved.iter().map(|(key, _)| key.to_bytes()).collect::<Vec<_>>(), keys);
        assert!(moved.iter().all(|(_, n)| matches!(n, Notification::Otp { nonce: 7, .. })));
        for name in SLED_FILES {
            assert!(!dir.path().join(name).exists(), "{name} is left");
        }
        // Acknowledged entries stay gone after a reopen; the rest stay, and nothing moves twice.
        outbox.ack(&[moved[0].0])?;
        assert_eq!(outbox.oldest(10)?.len(), 2);
        drop((outbox, trees));
        let trees = Trees::open(dir.path())?;
        let (_tx, rx) = tokio::sync::watch::channel(0);
        let outbox = Outbox::new(trees.outbox.clone(), rx);
        assert_eq!(outbox.oldest(10)?.iter().map(|(key, _)| key.to_bytes()).collect::<Vec<_>>(), keys[1..]);
        Ok(())
    }

    #[test]
    fn an_older_builds_fjall_outbox_moves_to_the_outbox_files() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let otp = |nonce| Notification::Otp { msisdn: 994_501_234_567, nonce, expires_at: 9 };
        {
            // The views as the last build left them: the outbox in fjall, with its watermark
            // past the newest entry (records after it notified nobody).
            let index = fjall::Database::builder(dir.path().join("index")).open()?;
            let outbox = index.keyspace(FJALL_OUTBOX, fjall::KeyspaceCreateOptions::default)?;
            let marks = index.keyspace("marks", fjall::KeyspaceCreateOptions::default)?;
            for position in [100_u64, 200] {
                outbox.insert(
                    NotificationKey { position, index: 0 }.to_bytes(),
                    otp(u128::from(position)).encode(),
                )?;
            }
            marks.insert(WATERMARK_KEY, 250_u64.to_be_bytes())?;
            marks.insert(FORMAT_KEY, FORMAT.to_be_bytes())?;
            index.persist(fjall::PersistMode::SyncAll)?;
        }
        let trees = Trees::open(dir.path())?;
        assert_eq!(trees.watermark(), 250);
        assert!(!trees.index.keyspace_exists(FJALL_OUTBOX));
        assert_eq!(read_u64(&trees.marks, WATERMARK_KEY)?, 0);
        let (_tx, rx) = tokio::sync::watch::channel(0);
        let outbox = Outbox::new(trees.outbox.clone(), rx);
        let moved = outbox.oldest(10)?;
        assert_eq!(
            moved,
            [
                (NotificationKey { position: 100, index: 0 }, otp(100)),
                (NotificationKey { position: 200, index: 0 }, otp(200))
            ]
        );
        outbox.ack(&[moved[0].0])?;
        drop((outbox, trees));
        // Moved once: a reopen finds the files as they were left.
        let trees = Trees::open(dir.path())?;
        let (_tx, rx) = tokio::sync::watch::channel(0);
        let outbox = Outbox::new(trees.outbox.clone(), rx);
        assert_eq!((outbox.oldest(10)?.len(), trees.watermark()), (1, 250));
        Ok(())
    }

    #[test]
    fn a_damaged_index_entry_is_an_error_not_a_position() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let trees = Trees::open(dir.path())?;
        trees.transfers.insert(5_u128.to_be_bytes(), [1_u8; 9])?;
        assert!(matches!(trees.transfer_record(TransferId(5)), Err(ReadError::Dangling(TransferId(5)))));
        Ok(())
    }

    #[test]
    fn history_lines_round_trip_and_sort_by_time_then_line() {
        for kind in [
            LineKind::Posted,
            LineKind::Pending,
            LineKind::HoldPosted,
            LineKind::HoldVoided,
            LineKind::HoldExpired,
        ] {
            let line = entry(kind);
            let key = history_key(AccountId(77), line.position());
            assert_eq!(decode_history(&key, &encode_history(&line)), Some(line));
            assert_eq!(LineKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(LineKind::from_u8(5), None);
        let a = history_key(AccountId(1), LinePosition { booked_at: 7, line: 9 });
        let b = history_key(AccountId(1), LinePosition { booked_at: 8, line: 1 });
        let c = history_key(AccountId(1), LinePosition { booked_at: 8, line: 2 });
        assert!(a < b && b < c);
        assert!(c < history_key(AccountId(2), LinePosition::default()));
        assert!(history_key(AccountId(1), LinePosition { booked_at: 7, line: 9 }.next()) > a);
    }

    #[test]
    fn only_posted_lines_move_the_balance() {
        assert_eq!(entry(LineKind::Posted).posted_change(), -12_345);
        assert_eq!(entry(LineKind::HoldPosted).posted_change(), -12_345);
        assert_eq!(HistoryEntry { debit: false, ..entry(LineKind::Posted) }.posted_change(), 12_345);
        for kind in [LineKind::Pending, LineKind::HoldVoided, LineKind::HoldExpired] {
            assert_eq!(entry(kind).posted_change(), 0);
        }
    }
}
