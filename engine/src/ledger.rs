//! The ledger of one shard: accounts, transfers and holds, with no IO, no clock and no threads.
//!
//! [`Ledger`] is a deterministic state machine. The shard thread feeds it batches together with
//! the batch's time; every state change it makes is also emitted as a [`Command`] into a log that
//! the journal makes durable, and [`Ledger::replay`] applies those commands again at recovery to
//! reach the same state. Start reading at [`Ledger::submit`].
//!
//! Cross-shard transfers take three steps, each a command journaled by the shard that owns the
//! account it touches: [`Command::Reserve`] on the debit shard (a pending debit),
//! [`Command::Credit`] on the credit shard (the credit posted, or refused), then
//! [`Command::Finalize`] on the debit shard (pending debit posted or released) and
//! [`Command::Forget`] on the credit shard. Recovery finishes any transfer caught between steps
//! with [`resolve_in_flight`].

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use crate::account::{Account, AccountFlags, CreateAccountResult};
use crate::ids::{AccountId, Route, ShardId, TransferId, route};
use crate::money::Currency;
use crate::transfer::{Transfer, TransferFlags, TransferResult};

const NS_PER_S: u64 = 1_000_000_000;

/// Where a stored transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransferState {
    /// Applied at once (a plain transfer, or the posting or voiding transfer of a hold).
    Posted = 0,
    /// A hold, still open.
    Pending = 1,
    PendingPosted = 2,
    PendingVoided = 3,
    PendingExpired = 4,
    /// A cross-shard transfer reserved on its debit shard, waiting for its credit step.
    Reserved = 5,
}

impl TransferState {
    pub fn from_u8(value: u8) -> Option<TransferState> {
        Some(match value {
            0 => TransferState::Posted,
            1 => TransferState::Pending,
            2 => TransferState::PendingPosted,
            3 => TransferState::PendingVoided,
            4 => TransferState::PendingExpired,
            5 => TransferState::Reserved,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredTransfer {
    pub transfer: Transfer,
    /// Nanoseconds since the Unix epoch of the batch that applied it.
    pub timestamp: u64,
    pub state: TransferState,
    /// For holds with a timeout: when the hold voids itself (ns); 0 otherwise.
    pub expires_at: u64,
}

/// What a lookup finds of an accepted transfer: its state, and while it is an open hold or in
/// flight between shards, its stored body. Final transfers' bodies are in the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferStatus {
    pub state: TransferState,
    pub open: Option<StoredTransfer>,
}

/// A state change of one shard, as journaled. Replaying a shard's commands in order from an
/// empty (or checkpointed) ledger rebuilds its state exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    CreateAccount(Account),
    /// A transfer applied within this shard (plain, pending, post or void; linked chains appear
    /// as consecutive commands, all of which succeeded).
    Transfer(Transfer),
    /// The debit step of a cross-shard transfer.
    Reserve(Transfer),
    /// The credit step of a cross-shard transfer; its outcome is recomputed on replay.
    Credit(Transfer),
    /// The end of a cross-shard transfer on its debit shard: `Ok` posts, any other code voids.
    Finalize {
        id: TransferId,
        result: TransferResult,
    },
    /// The credit shard drops its record of a finished cross-shard transfer (only if the body
    /// hash matches: another transfer reusing the id must not erase this one's record).
    Forget {
        id: TransferId,
        body_hash: u64,
    },
    /// A hold reached its timeout.
    Expire(TransferId),
}

/// What became of one submitted transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done(TransferResult),
    /// Reserved here; the credit step runs on `credit_shard`, and the answer comes from there.
    Forward {
        credit_shard: ShardId,
    },
    /// A duplicate of a cross-shard transfer still in flight: answer when it finishes.
    Wait,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("replayed {what} {id} did not apply as journaled: {result}")]
    Diverged { what: &'static str, id: String, result: String },
}

/// Per-currency sums over accounts: the double-entry check compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub debits_posted: u128,
    pub credits_posted: u128,
    pub debits_pending: u128,
    pub credits_pending: u128,
}

impl Totals {
    pub fn add(&mut self, account: &Account) {
        self.debits_posted += u128::from(account.debits_posted);
        self.credits_posted += u128::from(account.credits_posted);
        self.debits_pending += u128::from(account.debits_pending);
        self.credits_pending += u128::from(account.credits_pending);
    }
    pub fn merge(&mut self, other: &Totals) {
        self.debits_posted += other.debits_posted;
        self.credits_posted += other.credits_posted;
        self.debits_pending += other.debits_pending;
        self.credits_pending += other.credits_pending;
    }
    pub fn balanced(&self) -> bool {
        self.debits_posted == self.credits_posted && self.debits_pending == self.credits_pending
    }
}

/// What the ledger remembers of a transfer that has reached its final state: a 64-bit hash of
/// its body (for idempotent retries) with the state in the low three bits. 16 + 8 bytes a
/// transfer instead of ~150 keeps ten million of them in a few hundred MiB; the body itself is
/// in the journal and the sled transfer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done(u64);

impl Done {
    pub fn new(body_hash: u64, state: TransferState) -> Done {
        Done((body_hash & !7) | state as u64)
    }
    pub fn from_bits(bits: u64) -> Option<Done> {
        TransferState::from_u8(u8::try_from(bits & 7).ok()?).map(|_| Done(bits))
    }
    pub fn bits(self) -> u64 {
        self.0
    }
    pub fn state(self) -> TransferState {
        TransferState::from_u8(u8::try_from(self.0 & 7).unwrap_or(0)).unwrap_or(TransferState::Posted)
    }
    fn matches(self, transfer: &Transfer) -> bool {
        self.0 & !7 == body_hash(transfer) & !7
    }
}

/// A stable 64-bit hash of a transfer's body: two CRC32C passes with different seeds over a
/// fixed little-endian layout. Stable across releases, since checkpoints store it.
pub fn body_hash(t: &Transfer) -> u64 {
    let mut bytes = [0_u8; 81];
    bytes[0..16].copy_from_slice(&t.id.0.to_le_bytes());
    bytes[16..24].copy_from_slice(&t.debit_account_id.0.to_le_bytes());
    bytes[24..32].copy_from_slice(&t.credit_account_id.0.to_le_bytes());
    bytes[32..40].copy_from_slice(&t.amount.to_le_bytes());
    bytes[40..56].copy_from_slice(&t.pending_id.0.to_le_bytes());
    bytes[56..72].copy_from_slice(&t.user_data.to_le_bytes());
    bytes[72..76].copy_from_slice(&t.timeout_s.to_le_bytes());
    bytes[76..78].copy_from_slice(&t.code.to_le_bytes());
    bytes[78..80].copy_from_slice(&t.flags.0.to_le_bytes());
    bytes[80] = t.currency as u8;
    let low = crc32c::crc32c(&bytes);
    let high = crc32c::crc32c_append(0x9E37_79B9, &bytes);
    (u64::from(high) << 32) | u64::from(low)
}

/// Undo records of a linked chain, so that a failing member rolls back the members before it.
enum Undo {
    Account(Account),
    Open(TransferId, Option<StoredTransfer>),
    Done(TransferId),
    ExpiryAdded(u64, TransferId),
    ExpiryRemoved(u64, TransferId),
}

#[derive(Debug)]
pub struct Ledger {
    shard: ShardId,
    shard_count: u16,
    accounts: FxHashMap<AccountId, Account>,
    /// Transfers not yet final: open holds and cross-shard transfers in flight, with their bodies.
    open: FxHashMap<TransferId, StoredTransfer>,
    /// Transfers in a final state, compactly.
    done: FxHashMap<TransferId, Done>,
    expiries: BTreeSet<(u64, TransferId)>,
    /// Credit steps of cross-shard transfers this shard applied (or refused), until forgotten.
    /// Keyed by id, with the body hash: a transfer reusing the id with another body must not be
    /// answered with this one's result.
    credits: FxHashMap<TransferId, (TransferResult, u64)>,
}

impl Ledger {
    pub fn new(shard: ShardId, shard_count: u16) -> Ledger {
        Ledger {
            shard,
            shard_count,
            accounts: FxHashMap::default(),
            open: FxHashMap::default(),
            done: FxHashMap::default(),
            expiries: BTreeSet::new(),
            credits: FxHashMap::default(),
        }
    }

    pub fn with_capacity(shard: ShardId, shard_count: u16, accounts: usize, transfers: usize) -> Self {
        let mut ledger = Ledger::new(shard, shard_count);
        ledger.accounts.reserve(accounts);
        ledger.done.reserve(transfers);
        ledger
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    /// Where a transfer stands, if this shard has accepted it.
    pub fn transfer_state(&self, id: TransferId) -> Option<TransferState> {
        match self.open.get(&id) {
            Some(open) => Some(open.state),
            None => self.done.get(&id).map(|done| done.state()),
        }
    }

    pub fn transfer_status(&self, id: TransferId) -> Option<TransferStatus> {
        let open = self.open.get(&id).copied();
        Some(TransferStatus { state: self.transfer_state(id)?, open })
    }

    /// An open hold or a cross-shard transfer in flight, with its body.
    pub fn open_transfer(&self, id: TransferId) -> Option<&StoredTransfer> {
        self.open.get(&id)
    }

    pub fn open_transfers(&self) -> impl Iterator<Item = &StoredTransfer> {
        self.open.values()
    }

    pub fn done_transfers(&self) -> impl Iterator<Item = (&TransferId, &Done)> {
        self.done.iter()
    }

    pub fn transfer_count(&self) -> usize {
        self.open.len() + self.done.len()
    }

    pub fn credit_steps(&self) -> impl Iterator<Item = (&TransferId, &(TransferResult, u64))> {
        self.credits.iter()
    }

    pub fn totals(&self) -> FxHashMap<Currency, Totals> {
        let mut totals: FxHashMap<Currency, Totals> = FxHashMap::default();
        for account in self.accounts.values() {
            totals.entry(account.currency).or_default().add(account);
        }
        totals
    }

    /// Restores state from a checkpoint. The caller hands over whole tables.
    pub fn restore(
        &mut self,
        accounts: Vec<Account>,
        open: Vec<StoredTransfer>,
        done: Vec<(TransferId, Done)>,
        credits: Vec<(TransferId, (TransferResult, u64))>,
    ) {
        self.accounts = accounts.into_iter().map(|a| (a.id, a)).collect();
        self.expiries = open
            .iter()
            .filter(|t| t.state == TransferState::Pending && t.expires_at != 0)
            .map(|t| (t.expires_at, t.transfer.id))
            .collect();
        self.open = open.into_iter().map(|t| (t.transfer.id, t)).collect();
        self.done = done.into_iter().collect();
        self.credits = credits.into_iter().collect();
    }

    pub fn create_account(
        &mut self,
        mut account: Account,
        now: u64,
        log: &mut Vec<Command>,
    ) -> CreateAccountResult {
        if account.id.is_zero() {
            return CreateAccountResult::IdMustNotBeZero;
        }
        if !account.flags.is_known() {
            return CreateAccountResult::UnknownFlags;
        }
        if account.flags.contains(
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS.union(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS),
        ) {
            return CreateAccountResult::FlagsAreMutuallyExclusive;
        }
        if account.id.is_spread()
            && (account.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
                || account.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS))
        {
            return CreateAccountResult::SpreadAccountCannotLimitBalance;
        }
        if let Some(existing) = self.accounts.get(&account.id) {
            let same = existing.currency == account.currency
                && existing.kind == account.kind
                && existing.flags == account.flags;
            return if same {
                CreateAccountResult::Exists
            } else {
                CreateAccountResult::ExistsWithDifferentFields
            };
        }
        account.debits_pending = 0;
        account.debits_posted = 0;
        account.credits_pending = 0;
        account.credits_posted = 0;
        account.timestamp = now;
        self.accounts.insert(account.id, account);
        log.push(Command::CreateAccount(account));
        CreateAccountResult::Ok
    }

    /// Applies a batch of transfers submitted to this shard, in order. One outcome per transfer
    /// is appended to `outcomes`; every change is appended to `log`.
    pub fn submit(
        &mut self,
        batch: &[Transfer],
        now: u64,
        outcomes: &mut Vec<Outcome>,
        log: &mut Vec<Command>,
    ) {
        let mut index = 0;
        while index < batch.len() {
            let transfer = &batch[index];
            if !transfer.flags.contains(TransferFlags::LINKED) {
                outcomes.push(self.submit_one(transfer, now, log));
                index += 1;
                continue;
            }
            let chain_end = batch[index..]
                .iter()
                .position(|t| !t.flags.contains(TransferFlags::LINKED))
                .map(|offset| index + offset);
            match chain_end {
                None => {
                    let open = batch.len() - index;
                    outcomes.extend(
                        std::iter::repeat_n(TransferResult::LinkedEventChainOpen, open).map(Outcome::Done),
                    );
                    index = batch.len();
                }
                Some(end) => {
                    self.submit_chain(&batch[index..=end], now, outcomes, log);
                    index = end + 1;
                }
            }
        }
    }

    fn submit_one(&mut self, transfer: &Transfer, now: u64, log: &mut Vec<Command>) -> Outcome {
        if let Err(result) = validate(transfer) {
            return Outcome::Done(result);
        }
        let route = route(transfer.debit_account_id, transfer.credit_account_id, self.shard_count);
        // Stateless like `validate`, so checked before the id, in `TransferResult` order.
        if matches!(route, Route::Cross { .. }) && !transfer.flags.is_plain() {
            return Outcome::Done(TransferResult::CrossShardMustBePlain);
        }
        if let Some(existing) = self.existing(transfer) {
            return existing;
        }
        match route {
            Route::Local(_) => {
                let result = self.apply_local(transfer, now, None);
                if result.is_ok() {
                    log.push(Command::Transfer(*transfer));
                }
                Outcome::Done(result)
            }
            Route::Cross { credit, .. } => {
                let result = self.reserve(transfer, now);
                if result.is_ok() {
                    log.push(Command::Reserve(*transfer));
                    Outcome::Forward { credit_shard: credit }
                } else {
                    Outcome::Done(result)
                }
            }
        }
    }

    fn submit_chain(
        &mut self,
        chain: &[Transfer],
        now: u64,
        outcomes: &mut Vec<Outcome>,
        log: &mut Vec<Command>,
    ) {
        let mut undo = Vec::new();
        let mut failed: Option<(usize, TransferResult)> = None;
        let mut applied = Vec::with_capacity(chain.len());
        for (position, transfer) in chain.iter().enumerate() {
            let result = self.chain_member(transfer, now, &mut undo, &mut applied);
            if !result.is_ok() {
                failed = Some((position, result));
                break;
            }
        }
        match failed {
            None => {
                log.extend(applied.into_iter().map(Command::Transfer));
                outcomes.extend(chain.iter().map(|_| Outcome::Done(TransferResult::Ok)));
            }
            Some((failed_at, result)) => {
                self.rollback(undo);
                outcomes.extend((0..chain.len()).map(|position| {
                    Outcome::Done(if position == failed_at {
                        result
                    } else {
                        TransferResult::LinkedEventFailed
                    })
                }));
            }
        }
    }

    /// The answer for a transfer whose id this shard accepted before, if it did.
    fn existing(&self, transfer: &Transfer) -> Option<Outcome> {
        if let Some(open) = self.open.get(&transfer.id) {
            return Some(match (open.transfer == *transfer, open.state) {
                (true, TransferState::Reserved) => Outcome::Wait,
                (true, _) => Outcome::Done(TransferResult::Ok),
                (false, _) => Outcome::Done(TransferResult::ExistsWithDifferentBody),
            });
        }
        let done = self.done.get(&transfer.id)?;
        Some(Outcome::Done(if done.matches(transfer) {
            TransferResult::Ok
        } else {
            TransferResult::ExistsWithDifferentBody
        }))
    }

    fn chain_member(
        &mut self,
        transfer: &Transfer,
        now: u64,
        undo: &mut Vec<Undo>,
        applied: &mut Vec<Transfer>,
    ) -> TransferResult {
        if let Err(result) = validate(transfer) {
            return result;
        }
        // The whole chain runs on the shard of its first member, so every member's accounts
        // must live here; checked before the id, in `TransferResult` order.
        let here = |account: AccountId| {
            account.is_spread() || crate::ids::home_shard(account, self.shard_count) == self.shard
        };
        if !here(transfer.debit_account_id) || !here(transfer.credit_account_id) {
            return TransferResult::CrossShardMustBePlain;
        }
        match self.existing(transfer) {
            Some(Outcome::Done(result)) => return result,
            Some(_) => return TransferResult::ExistsWithDifferentBody,
            None => {}
        }
        let result = self.apply_local(transfer, now, Some(undo));
        if result.is_ok() {
            applied.push(*transfer);
        }
        result
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Account(account) => {
                    self.accounts.insert(account.id, account);
                }
                Undo::Open(id, Some(previous)) => {
                    self.open.insert(id, previous);
                }
                Undo::Open(id, None) => {
                    self.open.remove(&id);
                }
                Undo::Done(id) => {
                    self.done.remove(&id);
                }
                Undo::ExpiryAdded(at, id) => {
                    self.expiries.remove(&(at, id));
                }
                Undo::ExpiryRemoved(at, id) => {
                    self.expiries.insert((at, id));
                }
            }
        }
    }

    /// A transfer whose accounts both live here. Checks everything, then changes state; on any
    /// refusal nothing changed.
    fn apply_local(&mut self, transfer: &Transfer, now: u64, undo: Option<&mut Vec<Undo>>) -> TransferResult {
        if transfer.flags.contains(TransferFlags::POST_PENDING)
            || transfer.flags.contains(TransferFlags::VOID_PENDING)
        {
            return self.resolve_pending(transfer, now, undo);
        }
        // Replay reaches here without `validate`; equal keys would make the lookup below panic.
        if transfer.debit_account_id == transfer.credit_account_id {
            return TransferResult::AccountsMustBeDifferent;
        }
        let [debit, credit] =
            self.accounts.get_disjoint_mut([&transfer.debit_account_id, &transfer.credit_account_id]);
        let Some(debit) = debit else {
            return TransferResult::DebitAccountNotFound;
        };
        let Some(credit) = credit else {
            return TransferResult::CreditAccountNotFound;
        };
        if debit.currency != transfer.currency || credit.currency != transfer.currency {
            return TransferResult::CurrencyMismatch;
        }
        let pending = transfer.flags.contains(TransferFlags::PENDING);
        if let Err(result) = check_debit(debit, transfer.amount, pending) {
            return result;
        }
        if let Err(result) = check_credit(credit, transfer.amount, pending) {
            return result;
        }
        let expires_at = if pending && transfer.timeout_s != 0 {
            match u64::from(transfer.timeout_s).checked_mul(NS_PER_S).and_then(|ns| ns.checked_add(now)) {
                Some(at) => at,
                None => return TransferResult::OverflowsTimeout,
            }
        } else {
            0
        };
        if let Some(undo) = undo {
            undo.push(Undo::Account(*debit));
            undo.push(Undo::Account(*credit));
            undo.push(if pending { Undo::Open(transfer.id, None) } else { Undo::Done(transfer.id) });
            if expires_at != 0 {
                undo.push(Undo::ExpiryAdded(expires_at, transfer.id));
            }
        }
        // Checked above: neither column overflows.
        if pending {
            debit.debits_pending += transfer.amount;
            credit.credits_pending += transfer.amount;
        } else {
            debit.debits_posted += transfer.amount;
            credit.credits_posted += transfer.amount;
        }
        if pending {
            if expires_at != 0 {
                self.expiries.insert((expires_at, transfer.id));
            }
            let state = TransferState::Pending;
            self.open.insert(
                transfer.id,
                StoredTransfer { transfer: *transfer, timestamp: now, state, expires_at },
            );
        } else {
            self.done.insert(transfer.id, Done::new(body_hash(transfer), TransferState::Posted));
        }
        TransferResult::Ok
    }

    fn resolve_pending(
        &mut self,
        transfer: &Transfer,
        now: u64,
        undo: Option<&mut Vec<Undo>>,
    ) -> TransferResult {
        // A resolved hold is remembered compactly: its state answers, its body is gone.
        let hold = match self.open.get(&transfer.pending_id).copied() {
            Some(hold) if hold.state == TransferState::Pending => hold,
            Some(_) => return TransferResult::PendingTransferNotPending,
            None => {
                return match self.done.get(&transfer.pending_id).map(|done| done.state()) {
                    None => TransferResult::PendingTransferNotFound,
                    Some(TransferState::PendingPosted) => TransferResult::PendingTransferAlreadyPosted,
                    Some(TransferState::PendingVoided) => TransferResult::PendingTransferAlreadyVoided,
                    Some(TransferState::PendingExpired) => TransferResult::PendingTransferExpired,
                    Some(_) => TransferResult::PendingTransferNotPending,
                };
            }
        };
        if hold.expires_at != 0 && now >= hold.expires_at {
            return TransferResult::PendingTransferExpired;
        }
        let held = hold.transfer;
        if held.debit_account_id != transfer.debit_account_id
            || held.credit_account_id != transfer.credit_account_id
        {
            return TransferResult::PendingTransferHasDifferentAccounts;
        }
        if held.currency != transfer.currency {
            return TransferResult::PendingTransferHasDifferentCurrency;
        }
        let post = transfer.flags.contains(TransferFlags::POST_PENDING);
        let amount = if post && transfer.amount != 0 { transfer.amount } else { held.amount };
        if amount > held.amount {
            return TransferResult::ExceedsPendingTransferAmount;
        }
        let (Some(debit), Some(credit)) = (
            self.accounts.get(&held.debit_account_id).copied(),
            self.accounts.get(&held.credit_account_id).copied(),
        ) else {
            return TransferResult::DebitAccountNotFound;
        };
        let (mut new_debit, mut new_credit) = (debit, credit);
        new_debit.debits_pending -= held.amount;
        new_credit.credits_pending -= held.amount;
        if post {
            let Some(debits) = new_debit.debits_posted.checked_add(amount) else {
                return TransferResult::OverflowsDebits;
            };
            let Some(credits) = new_credit.credits_posted.checked_add(amount) else {
                return TransferResult::OverflowsCredits;
            };
            new_debit.debits_posted = debits;
            new_credit.credits_posted = credits;
        }
        if let Some(undo) = undo {
            undo.push(Undo::Account(debit));
            undo.push(Undo::Account(credit));
            undo.push(Undo::Open(held.id, Some(hold)));
            undo.push(Undo::Done(held.id));
            undo.push(Undo::Done(transfer.id));
            if hold.expires_at != 0 {
                undo.push(Undo::ExpiryRemoved(hold.expires_at, held.id));
            }
        }
        self.accounts.insert(new_debit.id, new_debit);
        self.accounts.insert(new_credit.id, new_credit);
        if hold.expires_at != 0 {
            self.expiries.remove(&(hold.expires_at, held.id));
        }
        let state = if post { TransferState::PendingPosted } else { TransferState::PendingVoided };
        self.open.remove(&held.id);
        self.done.insert(held.id, Done::new(body_hash(&held), state));
        self.done.insert(transfer.id, Done::new(body_hash(transfer), TransferState::Posted));
        TransferResult::Ok
    }

    /// The debit step of a cross-shard transfer: the amount becomes a pending debit.
    fn reserve(&mut self, transfer: &Transfer, now: u64) -> TransferResult {
        let Some(debit) = self.accounts.get_mut(&transfer.debit_account_id) else {
            return TransferResult::DebitAccountNotFound;
        };
        if debit.currency != transfer.currency {
            return TransferResult::CurrencyMismatch;
        }
        if let Err(result) = check_debit(debit, transfer.amount, true) {
            return result;
        }
        // The finalize will add the amount to the posted column too.
        if debit.debits_posted.checked_add(transfer.amount).is_none() {
            return TransferResult::OverflowsDebits;
        }
        debit.debits_pending += transfer.amount;
        self.open.insert(
            transfer.id,
            StoredTransfer {
                transfer: *transfer,
                timestamp: now,
                state: TransferState::Reserved,
                expires_at: 0,
            },
        );
        TransferResult::Ok
    }

    /// The credit step of a cross-shard transfer, run on the credit account's shard. Idempotent:
    /// a repeated step returns the first answer.
    pub fn credit(&mut self, transfer: &Transfer, log: &mut Vec<Command>) -> TransferResult {
        let hash = body_hash(transfer);
        if let Some((result, recorded)) = self.credits.get(&transfer.id) {
            return if *recorded == hash { *result } else { TransferResult::ExistsWithDifferentBody };
        }
        let result = self.apply_credit(transfer);
        self.credits.insert(transfer.id, (result, hash));
        log.push(Command::Credit(*transfer));
        result
    }

    fn apply_credit(&mut self, transfer: &Transfer) -> TransferResult {
        let Some(credit) = self.accounts.get_mut(&transfer.credit_account_id) else {
            return TransferResult::CreditAccountNotFound;
        };
        if credit.currency != transfer.currency {
            return TransferResult::CurrencyMismatch;
        }
        if let Err(result) = check_credit(credit, transfer.amount, false) {
            return result;
        }
        credit.credits_posted += transfer.amount;
        TransferResult::Ok
    }

    /// Ends a cross-shard transfer on its debit shard. Returns `false` if it was not in flight
    /// (a repeated finalize changes nothing).
    pub fn finalize(&mut self, id: TransferId, result: TransferResult, log: &mut Vec<Command>) -> bool {
        self.finalize_hash(id, result, log).is_some()
    }

    /// [`Ledger::finalize`], returning the finalized body's hash (which `forget` needs).
    pub fn finalize_hash(
        &mut self,
        id: TransferId,
        result: TransferResult,
        log: &mut Vec<Command>,
    ) -> Option<u64> {
        let stored = self.open.get(&id).copied()?;
        if stored.state != TransferState::Reserved {
            return None;
        }
        let amount = stored.transfer.amount;
        let debit = self.accounts.get_mut(&stored.transfer.debit_account_id)?;
        // The reserve checked that both columns have room; checked again rather than trusted.
        debit.debits_pending = debit.debits_pending.checked_sub(amount)?;
        let hash = body_hash(&stored.transfer);
        if result.is_ok() {
            debit.debits_posted = debit.debits_posted.checked_add(amount)?;
            self.done.insert(id, Done::new(hash, TransferState::Posted));
        }
        // Refused transfers are not stored: the id is free for a retry, as with any refusal.
        self.open.remove(&id);
        log.push(Command::Finalize { id, result });
        Some(hash)
    }

    pub fn forget(&mut self, id: TransferId, body_hash: u64, log: &mut Vec<Command>) {
        if self.credits.get(&id).is_some_and(|(_, recorded)| *recorded == body_hash) {
            self.credits.remove(&id);
            log.push(Command::Forget { id, body_hash });
        }
    }

    /// Voids every hold whose timeout has passed at `now`. Returns how many expired.
    pub fn expire(&mut self, now: u64, log: &mut Vec<Command>) -> usize {
        let mut count = 0;
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            if self.expire_one(id) {
                log.push(Command::Expire(id));
                count += 1;
            }
        }
        count
    }

    /// The earliest time a hold expires, for the shard's idle timer.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|(at, _)| *at)
    }

    fn expire_one(&mut self, id: TransferId) -> bool {
        let Some(stored) = self.open.get(&id).copied() else {
            return false;
        };
        if stored.state != TransferState::Pending {
            return false;
        }
        let held = stored.transfer;
        if let Some(debit) = self.accounts.get_mut(&held.debit_account_id) {
            debit.debits_pending -= held.amount;
        }
        if let Some(credit) = self.accounts.get_mut(&held.credit_account_id) {
            credit.credits_pending -= held.amount;
        }
        self.expiries.remove(&(stored.expires_at, id));
        self.open.remove(&id);
        self.done.insert(id, Done::new(body_hash(&held), TransferState::PendingExpired));
        true
    }

    /// Applies journaled commands again, at recovery. Each must have the effect it had the first
    /// time; anything else means the journal and the code disagree, and recovery stops.
    pub fn replay(&mut self, commands: &[Command], now: u64) -> Result<(), ReplayError> {
        let mut sink = Vec::new();
        for command in commands {
            sink.clear();
            match command {
                Command::CreateAccount(account) => {
                    let result = self.create_account(*account, account.timestamp, &mut sink);
                    if result != CreateAccountResult::Ok {
                        return Err(diverged("account", account.id, format!("{result:?}")));
                    }
                }
                Command::Transfer(transfer) => {
                    // A record applied twice would post twice: ids are checked as when live.
                    if self.existing(transfer).is_some() {
                        return Err(diverged("transfer", transfer.id, "id already applied"));
                    }
                    let result = self.apply_local(transfer, now, None);
                    if !result.is_ok() {
                        return Err(diverged("transfer", transfer.id, result));
                    }
                }
                Command::Reserve(transfer) => {
                    if self.existing(transfer).is_some() {
                        return Err(diverged("reserve", transfer.id, "id already applied"));
                    }
                    let result = self.reserve(transfer, now);
                    if !result.is_ok() {
                        return Err(diverged("reserve", transfer.id, result));
                    }
                }
                Command::Credit(transfer) => {
                    let result = self.apply_credit(transfer);
                    self.credits.insert(transfer.id, (result, body_hash(transfer)));
                }
                Command::Finalize { id, result } => {
                    if !self.finalize(*id, *result, &mut sink) {
                        return Err(diverged("finalize", *id, result));
                    }
                }
                Command::Forget { id, body_hash } => {
                    if self.credits.get(id).is_some_and(|(_, recorded)| recorded == body_hash) {
                        self.credits.remove(id);
                    }
                }
                Command::Expire(id) => {
                    if !self.expire_one(*id) {
                        return Err(diverged("expire", *id, "not pending"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn diverged(what: &'static str, id: impl std::fmt::Display, result: impl std::fmt::Display) -> ReplayError {
    ReplayError::Diverged { what, id: id.to_string(), result: result.to_string() }
}

/// The checks that need no state, in the order of [`TransferResult`].
fn validate(transfer: &Transfer) -> Result<(), TransferResult> {
    let flags = transfer.flags;
    if transfer.id.0 == 0 {
        return Err(TransferResult::IdMustNotBeZero);
    }
    if !flags.is_known() {
        return Err(TransferResult::UnknownFlags);
    }
    let kinds = [TransferFlags::PENDING, TransferFlags::POST_PENDING, TransferFlags::VOID_PENDING]
        .iter()
        .filter(|kind| flags.contains(**kind))
        .count();
    if kinds > 1 {
        return Err(TransferResult::FlagsAreMutuallyExclusive);
    }
    let resolves = flags.contains(TransferFlags::POST_PENDING) || flags.contains(TransferFlags::VOID_PENDING);
    if !resolves && transfer.pending_id.0 != 0 {
        return Err(TransferResult::PendingIdMustBeZero);
    }
    if resolves && transfer.pending_id.0 == 0 {
        return Err(TransferResult::PendingIdMustNotBeZero);
    }
    if resolves && transfer.pending_id == transfer.id {
        return Err(TransferResult::PendingIdMustBeDifferent);
    }
    if !flags.contains(TransferFlags::PENDING) && transfer.timeout_s != 0 {
        return Err(TransferResult::TimeoutReservedForPendingTransfer);
    }
    if transfer.debit_account_id == transfer.credit_account_id {
        return Err(TransferResult::AccountsMustBeDifferent);
    }
    if transfer.debit_account_id.is_zero() || transfer.credit_account_id.is_zero() {
        return Err(TransferResult::AccountIdMustNotBeZero);
    }
    if !resolves && transfer.amount == 0 {
        return Err(TransferResult::AmountMustNotBeZero);
    }
    Ok(())
}

fn check_debit(debit: &Account, amount: u64, pending: bool) -> Result<(), TransferResult> {
    if debit.flags.contains(AccountFlags::CLOSED) {
        return Err(TransferResult::DebitAccountClosed);
    }
    if debit.flags.contains(AccountFlags::BLOCKED) {
        return Err(TransferResult::DebitAccountBlocked);
    }
    let column = if pending { debit.debits_pending } else { debit.debits_posted };
    if column.checked_add(amount).is_none() {
        return Err(TransferResult::OverflowsDebits);
    }
    let debits = u128::from(debit.debits_posted) + u128::from(debit.debits_pending) + u128::from(amount);
    if debit.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
        && debits > u128::from(debit.credits_posted)
    {
        return Err(TransferResult::ExceedsCredits);
    }
    Ok(())
}

fn check_credit(credit: &Account, amount: u64, pending: bool) -> Result<(), TransferResult> {
    if credit.flags.contains(AccountFlags::CLOSED) {
        return Err(TransferResult::CreditAccountClosed);
    }
    if credit.flags.contains(AccountFlags::BLOCKED) {
        return Err(TransferResult::CreditAccountBlocked);
    }
    let column = if pending { credit.credits_pending } else { credit.credits_posted };
    if column.checked_add(amount).is_none() {
        return Err(TransferResult::OverflowsCredits);
    }
    let credits = u128::from(credit.credits_posted) + u128::from(credit.credits_pending) + u128::from(amount);
    if credit.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
        && credits > u128::from(credit.debits_posted)
    {
        return Err(TransferResult::ExceedsDebits);
    }
    Ok(())
}

/// Finishes every cross-shard transfer caught in flight, across all shards' ledgers, after
/// replay. A reserve whose credit step is on record (for the same body) finishes with that
/// step's answer; a reserve with no credit step on record is voided (no answer for it ever
/// left). Then every credit record is forgotten. Returns the commands applied, per shard, in
/// two phases: every finalize must be durable before any forget is, or a crash between them
/// would leave a reserve whose credit was forgotten.
pub fn resolve_in_flight(ledgers: &mut [Ledger]) -> (Vec<Vec<Command>>, Vec<Vec<Command>>) {
    let shard_count = u16::try_from(ledgers.len()).unwrap_or(u16::MAX);
    let mut finalizes: Vec<Vec<Command>> = vec![Vec::new(); ledgers.len()];
    let mut forgets: Vec<Vec<Command>> = vec![Vec::new(); ledgers.len()];
    let reserved: Vec<(usize, Transfer)> = ledgers
        .iter()
        .enumerate()
        .flat_map(|(shard, ledger)| {
            ledger
                .open
                .values()
                .filter(|t| t.state == TransferState::Reserved)
                .map(move |t| (shard, t.transfer))
        })
        .collect();
    for (shard, transfer) in reserved {
        let credit_shard = usize::from(crate::ids::home_shard(transfer.credit_account_id, shard_count).0);
        let hash = body_hash(&transfer);
        let result = ledgers
            .get(credit_shard)
            .and_then(|ledger| ledger.credits.get(&transfer.id))
            .filter(|(_, recorded)| *recorded == hash)
            .map_or(TransferResult::Interrupted, |(result, _)| *result);
        ledgers[shard].finalize(transfer.id, result, &mut finalizes[shard]);
    }
    for (shard, ledger) in ledgers.iter_mut().enumerate() {
        let records: Vec<(TransferId, u64)> =
            ledger.credits.iter().map(|(id, (_, hash))| (*id, *hash)).collect();
        for (id, hash) in records {
            ledger.forget(id, hash, &mut forgets[shard]);
        }
    }
    (finalizes, forgets)
}

#[cfg(test)]
mod tests;
