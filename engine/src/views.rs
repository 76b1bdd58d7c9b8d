//! Views in sled, derived from the journal: the transfer index by id, each account's history
//! with its running posted balance (read through [`crate::statement`]), and the notification
//! outbox ([`crate::outbox`]). sled never holds the only copy of anything but the outbox's
//! acknowledgements: every view records the journal position it has applied, catches up from
//! there after a crash, and [`reindex`] rebuilds it from the journal.
//!
//! One thread tails the journal (reading only what became durable since its last pass) and
//! writes each pass as one sled batch per tree, then the position. Re-applying a pass after a
//! crash is harmless: the transfer and history writes are idempotent inserts, and every tree a
//! pass reads or counts with (`in_flight`, the running balances in `running`, the `outbox` and its
//! watermark) commits in one transaction with the position.
//!
//! A history line is keyed by account, booked time and line number. The line number counts the
//! account's lines in the order the views apply the journal; the booked time is the time of the
//! record that applied the line, raised where needed to the account's previous line's, so that
//! key order, time order and application order are one order and `balance_after` reads as a
//! running balance down a statement. Start reading at [`Trees::apply`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::ids::{AccountId, TransferId};
use crate::journal::record::WalRecord;
use crate::journal::{self, JournalError, JournalState};
use crate::ledger::Command;
use crate::money::Currency;
use crate::outbox::{Notification, NotificationKey, Outbox, RecordNotices};
use crate::transfer::{Transfer, TransferFlags};
use crate::wallet::WalletCommand;

const APPLIED_KEY: &[u8] = b"applied";
/// The journal position up to which notifications were enqueued. [`reindex`] keeps it, so that a
/// rebuild enqueues nothing that was already enqueued (and perhaps delivered).
const WATERMARK_KEY: &[u8] = b"outbox_watermark";
const FORMAT_KEY: &[u8] = b"format";
/// The layout of the trees. Views of another layout are rebuilt from the journal on open.
const FORMAT: u64 = 2;
/// Journal bytes one pass of the view thread reads at most.
const PASS_LEN_MAX: u64 = 4 * 1024 * 1024;
/// Accounts whose running balances the tail thread keeps in memory at most. Past it the cache is
/// emptied after a pass and refills from the `running` tree as accounts come back.
const RUNNING_CACHE_LEN_MAX: usize = 1 << 20;

/// Why the views could not be opened or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    /// sled failed.
    #[error("views store at {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
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

/// An account's running state in the views: posted balance, lines so far, last booked time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Running {
    balance: i128,
    lines: u64,
    booked_at: u64,
}

impl Running {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0_u8; 32];
        out[..16].copy_from_slice(&self.balance.to_be_bytes());
        out[16..24].copy_from_slice(&self.lines.to_be_bytes());
        out[24..].copy_from_slice(&self.booked_at.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Running> {
        Some(Running {
            balance: i128::from_be_bytes(bytes.get(..16)?.try_into().ok()?),
            lines: u64::from_be_bytes(bytes.get(16..24)?.try_into().ok()?),
            booked_at: u64::from_be_bytes(bytes.get(24..32)?.try_into().ok()?),
        })
    }
}

/// The tail thread's copy of the running states it last committed, so that a pass does not read
/// every account it touches from sled.
#[derive(Debug, Default)]
struct RunningCache(FxHashMap<AccountId, Running>);

#[derive(Debug, Clone)]
struct Trees {
    db: sled::Db,
    transfers: sled::Tree,
    history: sled::Tree,
    in_flight: sled::Tree,
    running: sled::Tree,
    outbox: sled::Tree,
    meta: sled::Tree,
}

/// What a pass found in the journal, in journal order.
enum Event {
    Transfer { transfer: Transfer, at: u64 },
    Expired(TransferId),
    Otp { msisdn: u64, nonce: u128, expires_at: u64 },
    Blocked { msisdn: u64, flag: u8 },
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree.get(key)?.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
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
        let trees = Trees {
            transfers: db.open_tree("transfers").map_err(err)?,
            history: db.open_tree("history").map_err(err)?,
            in_flight: db.open_tree("in_flight").map_err(err)?,
            running: db.open_tree("running").map_err(err)?,
            outbox: db.open_tree("outbox").map_err(err)?,
            meta: db.open_tree("meta").map_err(err)?,
            db,
        };
        trees.upgrade().map_err(err)?;
        Ok(trees)
    }

    /// Views written in an older layout are cleared to be rebuilt from the journal; what they
    /// had applied becomes the outbox watermark, so the rebuild notifies nobody of old news.
    fn upgrade(&self) -> Result<(), sled::Error> {
        if read_u64(&self.meta, FORMAT_KEY)? == FORMAT {
            return Ok(());
        }
        let applied = self.applied()?;
        if applied > 0 {
            self.clear_derived()?;
            let watermark = self.watermark()?.max(applied);
            self.meta.insert(WATERMARK_KEY, &watermark.to_be_bytes())?;
        }
        self.meta.insert(FORMAT_KEY, &FORMAT.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Clears everything [`reindex`] rebuilds: all but the outbox and its watermark.
    fn clear_derived(&self) -> Result<(), sled::Error> {
        for tree in [&self.transfers, &self.history, &self.in_flight, &self.running] {
            tree.clear()?;
        }
        self.meta.remove(APPLIED_KEY)?;
        Ok(())
    }

    fn applied(&self) -> Result<u64, sled::Error> {
        read_u64(&self.meta, APPLIED_KEY)
    }

    fn watermark(&self) -> Result<u64, sled::Error> {
        read_u64(&self.meta, WATERMARK_KEY)
    }

    /// Applies records and then records `position` as applied. Returns how many notifications
    /// the pass enqueued.
    fn apply(
        &self,
        records: &[(u64, WalRecord)],
        position: u64,
        cache: &mut RunningCache,
    ) -> Result<usize, sled::Error> {
        let mut in_flight = sled::Batch::default();
        // Reserves read in this pass: their finalize often follows in the same pass, before the
        // `in_flight` batch reaches the tree.
        let mut reserved: FxHashMap<u128, (Transfer, u64)> = FxHashMap::default();
        // Members of linked chains whose cross-shard transfer (the key) is in flight, in chain
        // order.
        let mut members: FxHashMap<u128, Vec<(Transfer, u64)>> = FxHashMap::default();
        // (record end, record time, event)
        let mut events: Vec<(u64, u64, Event)> = Vec::new();
        for (record_end, record) in records {
            let WalRecord::Batch { timestamp, commands, .. } = record else {
                continue;
            };
            let (end, at) = (*record_end, *timestamp);
            for command in commands {
                let Ok(command) = Command::try_from(command) else {
                    continue;
                };
                match command {
                    Command::Transfer(transfer) => events.push((end, at, Event::Transfer { transfer, at })),
                    Command::Reserve(t) => {
                        reserved.insert(t.id.0, (t, at));
                    }
                    Command::ReserveLinked { transfer, parent } => {
                        members.entry(parent.0).or_default().push((transfer, at));
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
                        // The chain's other members, read in this pass or parked by an earlier
                        // one (all members of a chain come in one record, so never both).
                        let mut chain = members.remove(&id.0).unwrap_or_default();
                        for entry in self.in_flight.scan_prefix(member_prefix(id.0)) {
                            let (key, value) = entry?;
                            in_flight.remove(key);
                            chain.extend(decode_transfer(&value));
                        }
                        if result.is_ok() {
                            for (transfer, reserved_at) in found.into_iter().chain(chain) {
                                events.push((end, at, Event::Transfer { transfer, at: reserved_at }));
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
        for (id, (t, at)) in reserved {
            in_flight.insert(&id.to_be_bytes(), encode_transfer(&t, at).to_vec());
        }
        for (parent, chain) in members {
            for (index, (t, at)) in chain.into_iter().enumerate() {
                in_flight.insert(member_key(parent, index).to_vec(), encode_transfer(&t, at).to_vec());
            }
        }

        let watermark = self.watermark()?;
        let mut pass = Pass::new(self, cache, watermark);
        for (record_end, record_at, event) in events {
            pass.event(record_end, record_at, event)?;
        }
        let written = pass.finish();
        self.transfers.apply_batch(written.transfers)?;
        self.history.apply_batch(written.history)?;
        // A pass reads `in_flight` (a finalize looks up its reserve) and `running` (the balances
        // it adds to), and enqueues only past the watermark, so re-applying it is harmless only if
        // those are still as they were before the pass: their changes, the outbox entries and the
        // position commit in one transaction, which sled recovers whole or not at all.
        use sled::transaction::Transactional;
        let watermark = watermark.max(position);
        (&self.in_flight, &self.running, &self.outbox, &self.meta)
            .transaction(|(in_flight_tx, running_tx, outbox_tx, meta_tx)| {
                in_flight_tx.apply_batch(&in_flight)?;
                running_tx.apply_batch(&written.running)?;
                outbox_tx.apply_batch(&written.outbox)?;
                meta_tx.insert(APPLIED_KEY, &position.to_be_bytes())?;
                meta_tx.insert(WATERMARK_KEY, &watermark.to_be_bytes())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|error| match error {
                sled::transaction::TransactionError::Storage(error) => error,
                sled::transaction::TransactionError::Abort(()) => {
                    sled::Error::ReportableBug("the views transaction aborted".into())
                }
            })?;
        if cache.0.len() > RUNNING_CACHE_LEN_MAX {
            cache.0.clear();
        }
        Ok(written.enqueued)
    }
}

/// What one pass writes.
struct Written {
    transfers: sled::Batch,
    history: sled::Batch,
    running: sled::Batch,
    outbox: sled::Batch,
    enqueued: usize,
}

/// One pass over a run of events: lines, running balances and notifications.
struct Pass<'a> {
    trees: &'a Trees,
    cache: &'a mut RunningCache,
    dirty: FxHashSet<AccountId>,
    transfers: sled::Batch,
    history: sled::Batch,
    outbox: sled::Batch,
    enqueued: usize,
    /// Holds placed in this pass, which their post, void or expiry may follow before the
    /// `transfers` batch reaches the tree.
    holds: FxHashMap<u128, Transfer>,
    watermark: u64,
    /// The journal record whose events are being applied, and its notifications so far.
    record: u64,
    notices: RecordNotices,
}

impl<'a> Pass<'a> {
    fn new(trees: &'a Trees, cache: &'a mut RunningCache, watermark: u64) -> Pass<'a> {
        Pass {
            trees,
            cache,
            dirty: FxHashSet::default(),
            transfers: sled::Batch::default(),
            history: sled::Batch::default(),
            outbox: sled::Batch::default(),
            enqueued: 0,
            holds: FxHashMap::default(),
            watermark,
            record: 0,
            notices: RecordNotices::default(),
        }
    }

    /// Whether the record being applied is past the watermark: only then does it notify.
    fn notifying(&self) -> bool {
        self.record > self.watermark
    }

    fn event(&mut self, record_end: u64, record_at: u64, event: Event) -> Result<(), sled::Error> {
        if record_end != self.record {
            self.flush_notices();
            self.record = record_end;
        }
        match event {
            Event::Transfer { transfer, at } => self.transfer(&transfer, at, record_at)?,
            Event::Expired(id) => self.expired(id, record_at)?,
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
        Ok(())
    }

    fn transfer(&mut self, t: &Transfer, at: u64, record_at: u64) -> Result<(), sled::Error> {
        let mut value = Vec::with_capacity(8 + TRANSFER_VALUE_LEN);
        value.extend_from_slice(&self.record.to_be_bytes());
        value.extend_from_slice(&encode_transfer(t, at));
        self.transfers.insert(&t.id.0.to_be_bytes(), value);
        if t.flags.contains(TransferFlags::PENDING) {
            self.holds.insert(t.id.0, *t);
            return self.lines(t, LineKind::Pending, t.amount, 0, at, record_at);
        }
        let post = t.flags.contains(TransferFlags::POST_PENDING);
        if !post && !t.flags.contains(TransferFlags::VOID_PENDING) {
            return self.lines(t, LineKind::Posted, t.amount, t.amount, at, record_at);
        }
        // As the ledger resolves it: a post of 0 posts all of the hold, a void releases all.
        let held = self.held(t.pending_id)?;
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

    fn expired(&mut self, id: TransferId, record_at: u64) -> Result<(), sled::Error> {
        let Some(held) = self.held(id)? else {
            tracing::warn!(%id, "views: the expired hold is not indexed");
            return Ok(());
        };
        self.lines(&held, LineKind::HoldExpired, held.amount, 0, record_at, record_at)
    }

    /// A hold's body: placed in this pass, or indexed by an earlier one.
    fn held(&self, id: TransferId) -> Result<Option<Transfer>, sled::Error> {
        if let Some(held) = self.holds.get(&id.0) {
            return Ok(Some(*held));
        }
        Ok(self
            .trees
            .transfers
            .get(id.0.to_be_bytes())?
            .and_then(|value| decode_transfer(value.get(8..)?))
            .map(|(t, _)| t))
    }

    /// The two lines of a transfer: `amount` as the lines show it, `moved` what was posted.
    fn lines(
        &mut self,
        t: &Transfer,
        kind: LineKind,
        amount: u64,
        moved: u64,
        at: u64,
        record_at: u64,
    ) -> Result<(), sled::Error> {
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
            self.book(account, &mut entry, change)?;
        }
        Ok(())
    }

    /// Numbers, dates and balances a line on `account`, and writes it.
    fn book(
        &mut self,
        account: AccountId,
        entry: &mut HistoryEntry,
        change: i128,
    ) -> Result<(), sled::Error> {
        let mut running = match self.cache.0.get(&account) {
            Some(running) => *running,
            None => self
                .trees
                .running
                .get(account.0.to_be_bytes())?
                .and_then(|value| Running::decode(&value))
                .unwrap_or_default(),
        };
        running.booked_at = running.booked_at.max(entry.booked_at);
        running.lines = running.lines.saturating_add(1);
        // Cannot saturate: every sub-account's columns are u64.
        running.balance = running.balance.saturating_add(change);
        entry.booked_at = running.booked_at;
        entry.line = running.lines;
        entry.balance_after = running.balance;
        self.history.insert(&history_key(account, entry.position()), encode_history(entry).to_vec());
        self.cache.0.insert(account, running);
        self.dirty.insert(account);
        if entry.kind.moves_posted()
            && self.notifying()
            && let Some(msisdn) = account.wallet_msisdn()
        {
            self.notices.money(msisdn, account, entry);
        }
        Ok(())
    }

    fn flush_notices(&mut self) {
        for (index, notification) in self.notices.take().into_iter().enumerate() {
            let key =
                NotificationKey { position: self.record, index: u32::try_from(index).unwrap_or(u32::MAX) };
            self.outbox.insert(&key.to_bytes(), notification.encode());
            self.enqueued += 1;
        }
    }

    fn finish(mut self) -> Written {
        self.flush_notices();
        let mut running = sled::Batch::default();
        for account in &self.dirty {
            if let Some(state) = self.cache.0.get(account) {
                running.insert(&account.0.to_be_bytes(), state.encode().to_vec());
            }
        }
        Written {
            transfers: self.transfers,
            history: self.history,
            running,
            outbox: self.outbox,
            enqueued: self.enqueued,
        }
    }
}

/// Members of a chain in flight are parked in `in_flight` under `m`, their parent's id, then
/// their place in the chain, so that the parent's finalize finds them in chain order with one
/// prefix scan.
fn member_prefix(parent: u128) -> [u8; 17] {
    let mut key = [0_u8; 17];
    key[0] = b'm';
    key[1..].copy_from_slice(&parent.to_be_bytes());
    key
}

fn member_key(parent: u128, index: usize) -> [u8; 21] {
    let mut key = [0_u8; 21];
    key[..17].copy_from_slice(&member_prefix(parent));
    key[17..].copy_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes());
    key
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

/// An account's lines in a range, oldest first (from [`Views::lines`]).
pub struct Lines {
    range: sled::Iter,
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines").finish_non_exhaustive()
    }
}

impl Iterator for Lines {
    type Item = Result<HistoryEntry, sled::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.range.next()? {
                Err(error) => return Some(Err(error)),
                Ok((key, value)) => {
                    if let Some(entry) = decode_history(&key, &value) {
                        return Some(Ok(entry));
                    }
                    tracing::warn!("views: an undecodable history line is skipped");
                }
            }
        }
    }
}

/// Newest first, for the last lines of a window (the USSD mini statement).
impl DoubleEndedIterator for Lines {
    fn next_back(&mut self) -> Option<Self::Item> {
        loop {
            match self.range.next_back()? {
                Err(error) => return Some(Err(error)),
                Ok((key, value)) => {
                    if let Some(entry) = decode_history(&key, &value) {
                        return Some(Ok(entry));
                    }
                    tracing::warn!("views: an undecodable history line is skipped");
                }
            }
        }
    }
}

/// The running views: a tail thread and read access.
#[derive(Debug)]
pub struct Views {
    trees: Trees,
    applied: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    error: Arc<Mutex<Option<String>>>,
    /// Notifications enqueued since open: readers of the outbox wait on it.
    enqueued: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Views {
    /// Opens the views and starts tailing the journal from the position they last applied.
    pub fn open(path: &Path, journal_dir: &Path, journal: Arc<JournalState>) -> Result<Views, ViewsError> {
        let trees = Trees::open(path)?;
        let sled_err = |source| ViewsError::Sled { path: path.to_path_buf(), source };
        let applied = Arc::new(AtomicU64::new(trees.applied().map_err(sled_err)?));
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let enqueued = Arc::new(tokio::sync::watch::Sender::new(0));
        let thread = {
            let (trees, applied, stop, error) = (trees.clone(), applied.clone(), stop.clone(), error.clone());
            let enqueued = enqueued.clone();
            let journal_dir = journal_dir.to_path_buf();
            std::thread::Builder::new()
                .name("qepik-views".into())
                .spawn(move || {
                    if let Err(message) = tail(&trees, &journal_dir, &journal, &applied, &stop, &enqueued) {
                        tracing::error!(%message, "views stopped");
                        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    }
                })
                .map_err(|e| ViewsError::Sled { path: path.to_path_buf(), source: sled::Error::Io(e) })?
        };
        Ok(Views { trees, applied, stop, thread: Mutex::new(Some(thread)), error, enqueued })
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

    /// An account's history booked from `from_ns` on, oldest first, at most `limit` lines.
    pub fn history(
        &self,
        account: AccountId,
        from_ns: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, sled::Error> {
        self.lines(account, LinePosition::at(from_ns), u64::MAX).take(limit).collect()
    }

    /// An account's lines from `start` (inclusive) to those booked at `to_ns` (exclusive),
    /// oldest first, read lazily: [`crate::statement`] pages and exports through it.
    pub fn lines(&self, account: AccountId, start: LinePosition, to_ns: u64) -> Lines {
        let start = history_key(account, start);
        let end = history_key(account, LinePosition::at(to_ns));
        let range = if start < end {
            self.trees.history.range(start.to_vec()..end.to_vec())
        } else {
            self.trees.history.range(start.to_vec()..start.to_vec())
        };
        Lines { range }
    }

    /// The account's posted balance as of [`Views::applied`] (credits less debits, minor
    /// units), and how many lines its history has.
    pub fn balance(&self, account: AccountId) -> Result<(i128, u64), sled::Error> {
        let running = self
            .trees
            .running
            .get(account.0.to_be_bytes())?
            .and_then(|value| Running::decode(&value))
            .unwrap_or_default();
        Ok((running.balance, running.lines))
    }

    /// The notification outbox, for the sender that drains it.
    pub fn outbox(&self) -> Outbox {
        Outbox::new(self.trees.outbox.clone(), self.enqueued.subscribe())
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

    /// Stops the tail thread and flushes sled. The views resume from their position next time.
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
    enqueued: &tokio::sync::watch::Sender<u64>,
) -> Result<(), String> {
    let mut cache = RunningCache::default();
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
        let (to, count) = catch_up_step(trees, journal_dir, from, durable, &mut cache)?;
        applied.store(to, Ordering::Release);
        if count > 0 {
            let count = u64::try_from(count).unwrap_or(u64::MAX);
            enqueued.send_modify(|total| *total = total.saturating_add(count));
        }
    }
}

/// Applies one pass from `from` towards `durable`: at most about [`PASS_LEN_MAX`] bytes of
/// whole records. Returns the position reached and the notifications enqueued.
fn catch_up_step(
    trees: &Trees,
    journal_dir: &Path,
    from: u64,
    durable: u64,
    cache: &mut RunningCache,
) -> Result<(u64, usize), String> {
    let window_end = durable.min(from.saturating_add(PASS_LEN_MAX));
    let (mut records, mut reached) =
        journal::read_range(journal_dir, from, window_end).map_err(|e| e.to_string())?;
    if reached == from {
        // One record larger than the window: read up to the durable end instead.
        (records, reached) = journal::read_range(journal_dir, from, durable).map_err(|e| e.to_string())?;
    }
    let enqueued = trees.apply(&records, reached, cache).map_err(|e| e.to_string())?;
    Ok((reached, enqueued))
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
    let trees = Trees::open(&path)?;
    let err = |source| ViewsError::Sled { path: path.clone(), source };
    trees.clear_derived().map_err(err)?;
    let end = journal::scan::<JournalError>(&journal_dir, 0, journal::TailRepair::ReportOnly, |_, _| Ok(()))?;
    let mut position = 0;
    let mut cache = RunningCache::default();
    while position < end.position {
        let (reached, _) =
            catch_up_step(&trees, &journal_dir, position, end.position, &mut cache).map_err(|reason| {
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

    #[test]
    fn running_state_round_trips() {
        let running = Running { balance: -5, lines: 9, booked_at: 11 };
        assert_eq!(Running::decode(&running.encode()), Some(running));
        assert_eq!(Running::decode(&[0; 31]), None);
    }
}
