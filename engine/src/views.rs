//! Views in sled, derived from the journal: the transfer index by id and each account's history
//! ordered by time for range scans. sled never holds the only copy of anything: every view
//! records the journal position it has applied, catches up from there after a crash, and
//! [`reindex`] rebuilds it from the journal.
//!
//! One thread tails the journal (reading only what became durable since its last pass) and
//! writes each pass as one sled batch per tree, then the position. Re-applying a pass after a
//! crash is harmless: the transfer and history writes are idempotent inserts, and the one tree a
//! pass reads, `in_flight`, commits in one transaction with the position.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ids::{AccountId, TransferId};
use crate::journal::record::WalRecord;
use crate::journal::{self, JournalError, JournalState};
use crate::ledger::Command;
use crate::transfer::{Transfer, TransferFlags};

const APPLIED_KEY: &[u8] = b"applied";
/// Journal bytes one pass of the view thread reads at most.
const PASS_LEN_MAX: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    #[error("views store at {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// One line of an account's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timestamp: u64,
    pub transfer_id: TransferId,
    pub other_account: AccountId,
    pub amount: u64,
    /// True when the account was debited.
    pub debit: bool,
    pub code: u16,
    pub pending: bool,
}

#[derive(Debug, Clone)]
struct Trees {
    db: sled::Db,
    transfers: sled::Tree,
    history: sled::Tree,
    in_flight: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    fn open(path: &Path) -> Result<Trees, ViewsError> {
        let err = |source| ViewsError::Sled { path: path.to_path_buf(), source };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(256 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(err)?;
        Ok(Trees {
            transfers: db.open_tree("transfers").map_err(err)?,
            history: db.open_tree("history").map_err(err)?,
            in_flight: db.open_tree("in_flight").map_err(err)?,
            meta: db.open_tree("meta").map_err(err)?,
            db,
        })
    }

    fn applied(&self) -> Result<u64, sled::Error> {
        Ok(self.meta.get(APPLIED_KEY)?.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
    }

    /// Applies records and then records `position` as applied.
    fn apply(&self, records: &[(u64, WalRecord)], position: u64) -> Result<(), sled::Error> {
        let mut transfers = sled::Batch::default();
        let mut history = sled::Batch::default();
        let mut in_flight = sled::Batch::default();
        // Reserves read in this pass: their finalize often follows in the same pass, before the
        // `in_flight` batch reaches the tree.
        let mut reserved: rustc_hash::FxHashMap<u128, (Transfer, u64)> = rustc_hash::FxHashMap::default();
        // Members of linked chains whose cross-shard transfer (the key) is in flight.
        let mut members: rustc_hash::FxHashMap<u128, Vec<(Transfer, u64)>> = rustc_hash::FxHashMap::default();
        let mut posted = Vec::new();
        for (record_end, record) in records {
            let WalRecord::Batch { timestamp, commands, .. } = record else {
                continue;
            };
            for command in commands {
                let Ok(command) = Command::try_from(command) else {
                    continue;
                };
                match command {
                    Command::Transfer(t) => posted.push((t, *timestamp, *record_end)),
                    Command::Reserve(t) => {
                        reserved.insert(t.id.0, (t, *timestamp));
                    }
                    Command::ReserveLinked { transfer, parent } => {
                        members.entry(parent.0).or_default().push((transfer, *timestamp));
                    }
                    Command::Finalize { id, result } => {
                        // Almost every reserve is finalized within the pass that read it; only
                        // the others touch the `in_flight` tree, which keeps its writes few.
                        let found = match reserved.remove(&id.0) {
                            Some(found) => Some(found),
                            None => {
                                in_flight.remove(&id.0.to_be_bytes());
                                self.in_flight.get(id.0.to_be_bytes())?.as_deref().and_then(decode_transfer)
                            }
                        };
                        // The chain's other members, read in this pass or parked by an earlier one.
                        let mut chain = members.remove(&id.0).unwrap_or_default();
                        for entry in self.in_flight.scan_prefix(member_prefix(id.0)) {
                            let (key, value) = entry?;
                            in_flight.remove(key);
                            chain.extend(decode_transfer(&value));
                        }
                        if result.is_ok() {
                            posted.extend(found.into_iter().chain(chain).map(|(t, at)| (t, at, *record_end)));
                        }
                    }
                    _ => {}
                }
            }
        }
        for (id, (t, at)) in reserved {
            in_flight.insert(&id.to_be_bytes(), encode_transfer(&t, at).to_vec());
        }
        for (parent, chain) in members {
            for (t, at) in chain {
                let mut key = member_prefix(parent).to_vec();
                key.extend_from_slice(&t.id.0.to_be_bytes());
                in_flight.insert(key, encode_transfer(&t, at).to_vec());
            }
        }
        for (t, at, record_end) in posted {
            let mut value = Vec::with_capacity(8 + TRANSFER_VALUE_LEN);
            value.extend_from_slice(&record_end.to_be_bytes());
            value.extend_from_slice(&encode_transfer(&t, at));
            transfers.insert(&t.id.0.to_be_bytes(), value);
            let pending = t.flags.contains(TransferFlags::PENDING);
            history.insert(
                &history_key(t.debit_account_id, at, t.id),
                history_value(&t, true, pending).to_vec(),
            );
            history.insert(
                &history_key(t.credit_account_id, at, t.id),
                history_value(&t, false, pending).to_vec(),
            );
        }
        self.transfers.apply_batch(transfers)?;
        self.history.apply_batch(history)?;
        // A pass reads `in_flight` (a finalize looks up its reserve), so re-applying it is
        // harmless only if `in_flight` is still as it was before the pass: its changes and the
        // position commit in one transaction, which sled recovers whole or not at all.
        use sled::transaction::Transactional;
        (&self.in_flight, &self.meta)
            .transaction(|(in_flight_tx, meta_tx)| {
                in_flight_tx.apply_batch(&in_flight)?;
                meta_tx.insert(APPLIED_KEY, &position.to_be_bytes())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|error| match error {
                sled::transaction::TransactionError::Storage(error) => error,
                sled::transaction::TransactionError::Abort(()) => {
                    sled::Error::ReportableBug("the views transaction aborted".into())
                }
            })?;
        Ok(())
    }
}

/// Members of a chain in flight are parked in `in_flight` under `m`, their parent's id, then
/// their own, so that the parent's finalize finds them with one prefix scan.
fn member_prefix(parent: u128) -> [u8; 17] {
    let mut key = [0_u8; 17];
    key[0] = b'm';
    key[1..].copy_from_slice(&parent.to_be_bytes());
    key
}

fn history_key(account: AccountId, at: u64, id: TransferId) -> [u8; 32] {
    let mut key = [0_u8; 32];
    key[..8].copy_from_slice(&account.0.to_be_bytes());
    key[8..16].copy_from_slice(&at.to_be_bytes());
    key[16..].copy_from_slice(&id.0.to_be_bytes());
    key
}

fn history_value(t: &Transfer, debit: bool, pending: bool) -> [u8; 21] {
    let mut value = [0_u8; 21];
    let other = if debit { t.credit_account_id } else { t.debit_account_id };
    value[..8].copy_from_slice(&other.0.to_be_bytes());
    value[8..16].copy_from_slice(&t.amount.to_be_bytes());
    value[16..18].copy_from_slice(&t.code.to_be_bytes());
    value[18] = u8::from(debit);
    value[19] = u8::from(pending);
    value[20] = t.currency as u8;
    value
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

/// The running views: a tail thread and read access.
#[derive(Debug)]
pub struct Views {
    trees: Trees,
    applied: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Views {
    /// Opens the views and starts tailing the journal from the position they last applied.
    pub fn open(path: &Path, journal_dir: &Path, journal: Arc<JournalState>) -> Result<Views, ViewsError> {
        let trees = Trees::open(path)?;
        let sled_err = |source| ViewsError::Sled { path: path.to_path_buf(), source };
        let applied = Arc::new(AtomicU64::new(trees.applied().map_err(sled_err)?));
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let thread = {
            let (trees, applied, stop, error) = (trees.clone(), applied.clone(), stop.clone(), error.clone());
            let journal_dir = journal_dir.to_path_buf();
            std::thread::Builder::new()
                .name("qepik-views".into())
                .spawn(move || {
                    if let Err(message) = tail(&trees, &journal_dir, &journal, &applied, &stop) {
                        tracing::error!(%message, "views stopped");
                        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    }
                })
                .map_err(|e| ViewsError::Sled { path: path.to_path_buf(), source: sled::Error::Io(e) })?
        };
        Ok(Views { trees, applied, stop, thread: Mutex::new(Some(thread)), error })
    }

    /// The journal position the views have applied up to.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Why the tail thread stopped, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the transfer is journaled (the position after its record), if the view has it.
    pub fn transfer(&self, id: TransferId) -> Result<Option<(u64, Transfer, u64)>, sled::Error> {
        Ok(self.trees.transfers.get(id.0.to_be_bytes())?.and_then(|value| {
            let position = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
            let (transfer, at) = decode_transfer(value.get(8..)?)?;
            Some((position, transfer, at))
        }))
    }

    /// An account's history from `from_ns` on, oldest first, at most `limit` lines.
    pub fn history(
        &self,
        account: AccountId,
        from_ns: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, sled::Error> {
        let start = history_key(account, from_ns, TransferId(0));
        let end = history_key(AccountId(account.0.wrapping_add(1)), 0, TransferId(0));
        let range = if account.0 == u64::MAX {
            self.trees.history.range(start.to_vec()..)
        } else {
            self.trees.history.range(start.to_vec()..end.to_vec())
        };
        let mut lines = Vec::new();
        for item in range.take(limit) {
            let (key, value) = item?;
            let (Some(at), Some(id), Some(other), Some(amount), Some(code)) = (
                key.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
                key.get(16..32).and_then(|b| b.try_into().ok()).map(u128::from_be_bytes),
                value.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
                value.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
                value.get(16..18).and_then(|b| b.try_into().ok()).map(u16::from_be_bytes),
            ) else {
                continue;
            };
            lines.push(HistoryEntry {
                timestamp: at,
                transfer_id: TransferId(id),
                other_account: AccountId(other),
                amount,
                debit: value.get(18) == Some(&1),
                code,
                pending: value.get(19) == Some(&1),
            });
        }
        Ok(lines)
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

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _panicked = thread.join();
        }
        let _flushed = self.trees.db.flush();
    }
}

fn tail(
    trees: &Trees,
    journal_dir: &Path,
    journal: &JournalState,
    applied: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), String> {
    loop {
        // Stopping does not wait for the views to catch up: they resume from their position.
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let from = applied.load(Ordering::Acquire);
        let durable = journal.durable();
        if durable <= from {
            if journal.failed() {
                return Ok(());
            }
            journal.wait_past(from, Duration::from_millis(50));
            continue;
        }
        let to = catch_up_step(trees, journal_dir, from, durable)?;
        applied.store(to, Ordering::Release);
    }
}

/// Applies one pass from `from` towards `durable`: at most about [`PASS_LEN_MAX`] bytes of
/// whole records. Returns the position reached.
fn catch_up_step(trees: &Trees, journal_dir: &Path, from: u64, durable: u64) -> Result<u64, String> {
    let window_end = durable.min(from.saturating_add(PASS_LEN_MAX));
    let (mut records, mut reached) =
        journal::read_range(journal_dir, from, window_end).map_err(|e| e.to_string())?;
    if reached == from {
        // One record larger than the window: read up to the durable end instead.
        (records, reached) = journal::read_range(journal_dir, from, durable).map_err(|e| e.to_string())?;
    }
    trees.apply(&records, reached).map_err(|e| e.to_string())?;
    Ok(reached)
}

/// Rebuilds the views from the journal: clears them and applies every durable record. The
/// engine must not be running on this data directory.
pub fn reindex(data_dir: &Path) -> Result<u64, ViewsError> {
    let path = data_dir.join("views");
    let journal_dir = data_dir.join("journal");
    let trees = Trees::open(&path)?;
    let err = |source| ViewsError::Sled { path: path.clone(), source };
    for tree in [&trees.transfers, &trees.history, &trees.in_flight, &trees.meta] {
        tree.clear().map_err(err)?;
    }
    let end = journal::scan::<JournalError>(&journal_dir, 0, journal::TailRepair::ReportOnly, |_, _| Ok(()))?;
    let mut position = 0;
    while position < end.position {
        let reached = catch_up_step(&trees, &journal_dir, position, end.position).map_err(|reason| {
            ViewsError::Journal(JournalError::Corrupt {
                segment: journal_dir.clone(),
                offset: position,
                reason,
            })
        })?;
        if reached == position {
            break;
        }
        position = reached;
    }
    trees.db.flush().map_err(err)?;
    Ok(position)
}
