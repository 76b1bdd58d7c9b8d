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

use crate::account::{Account, AccountFlags, AccountKind, CreateAccountResult};
use crate::ids::{AccountId, Route, ShardId, TransferId, route};
use crate::money::Currency;
use crate::transfer::{Transfer, TransferFlags, TransferResult};
use crate::wallet::{
    self, Authorization, Evidence, LimitHit, OtpSide, Outflow, Policy, Tag, WalletAccountView, WalletCommand,
    WalletCore, WalletRefusal, WalletReply, WalletRequest, WalletState, WalletView,
};
use parted::Parted;
use table::Entry;

const NS_PER_S: u64 = 1_000_000_000;

/// Transfers of a batch whose state [`Ledger::touch`] looks up together before they apply.
const TOUCH_AHEAD: usize = 16;

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
    /// For a member of a linked chain in flight to another shard: the chain's cross-shard
    /// transfer, whose finalize posts or voids this one too. Zero otherwise.
    pub parent: TransferId,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateAccount(Account),
    /// A transfer applied within this shard (plain, pending, post or void; linked chains appear
    /// as consecutive commands, all of which succeeded).
    Transfer(Transfer),
    /// The debit step of a cross-shard transfer.
    Reserve(Transfer),
    /// A member of a linked chain whose cross-shard transfer is `parent`: held (both pending
    /// columns) until the parent's finalize posts or voids the whole chain.
    ReserveLinked {
        transfer: Transfer,
        parent: TransferId,
    },
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
    /// A change of wallet state or policy.
    Wallet(Box<WalletCommand>),
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
    /// A member of a linked chain whose cross-shard transfer `parent` is in flight: `Ok` if the
    /// parent posts, `LinkedEventFailed` if it is voided.
    Linked {
        parent: TransferId,
    },
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
/// in the journal, found through the views' transfer index.
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

/// The final transfers, and the ones added since the last checkpoint took them.
///
/// Final transfers are never forgotten and only ever added (or moved to a later final state),
/// so a checkpoint need not copy the millions already in earlier checkpoints: it takes the
/// entries added since (`Ledger::take_added_done`, no copying) and writes them as one more done segment.
/// The only removal is a linked chain's undo, of an entry the same batch added.
#[derive(Debug, Default)]
pub(crate) struct DoneTable {
    map: Parted<parted::DoneSlot>,
    /// Id halves and bits, in the order added: a later entry for an id supersedes an earlier.
    added: DoneLog,
}

/// Final transfers in the order added (id halves and `Done` bits), in chunks of
/// [`DONE_LOG_CHUNK`]: millions pile up between checkpoints, and one growing vector would copy
/// all of them at each doubling, on the shard's thread.
pub type DoneLog = Vec<Vec<[u64; 3]>>;
const DONE_LOG_CHUNK: usize = 1 << 16;

impl DoneTable {
    fn get(&self, id: &TransferId) -> Option<Done> {
        self.map.get_done(id)
    }

    fn insert(&mut self, id: TransferId, done: Done) {
        self.map.insert_done(id, done);
        let [low, high] = crate::ids::halves(id.0);
        match self.added.last_mut() {
            Some(chunk) if chunk.len() < DONE_LOG_CHUNK => chunk.push([low, high, done.bits()]),
            _ => {
                let mut chunk = Vec::with_capacity(DONE_LOG_CHUNK);
                chunk.push([low, high, done.bits()]);
                self.added.push(chunk);
            }
        }
    }

    /// Undoes an insert of the running batch: it is among the last added.
    fn remove(&mut self, id: &TransferId) {
        self.map.remove_done(id);
        let halves = crate::ids::halves(id.0);
        for chunk in self.added.iter_mut().rev() {
            if let Some(at) = chunk.iter().rposition(|entry| entry[..2] == halves) {
                chunk.remove(at);
                return;
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn reserve(&mut self, additional: usize) {
        self.map.reserve(additional);
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (TransferId, Done)> {
        self.map.iter_done()
    }
}

/// A stable 64-bit hash of a transfer's body: xxh3 (64 bits) over a fixed little-endian layout.
/// Stable across releases, since checkpoints store it.
///
/// Until checkpoint layout 6 it was two CRC32C passes with different seeds. CRC is affine, so
/// for inputs of one length the two passes differ by a constant: 32 bits of information, and a
/// body with the same hash as another is easy to construct. Checkpoints of that layout are
/// passed over at recovery, which replays the journal and so recomputes every stored hash.
pub fn body_hash(t: &Transfer) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&body_layout(t))
}

/// The bytes [`body_hash`] hashes: every field of the transfer, little-endian, in order.
fn body_layout(t: &Transfer) -> [u8; 81] {
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
    bytes
}

/// Undo records of a linked chain, so that a failing member rolls back the members before it.
#[derive(Debug)]
enum Undo {
    Account(Account),
    Open(TransferId, Option<StoredTransfer>),
    Done(TransferId),
    ExpiryAdded(u64, TransferId),
    ExpiryRemoved(u64, TransferId),
    Outflow(AccountId, Option<Outflow>),
}

/// An account in its table slot: one cache line, so that a lookup found in its home slot
/// costs one line and [`Table::prefetch`] fetches all of it.
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
struct AccountSlot(Account);

impl Entry for AccountSlot {
    type Key = AccountId;
    const FREE: AccountSlot = AccountSlot(Account {
        id: AccountId(0),
        currency: Currency::Azn,
        kind: AccountKind(0),
        flags: AccountFlags(0),
        debits_pending: 0,
        debits_posted: 0,
        credits_pending: 0,
        credits_posted: 0,
        timestamp: 0,
    });
    fn key(&self) -> AccountId {
        self.0.id
    }
    fn is_free_key(key: AccountId) -> bool {
        key.is_zero()
    }
    fn hash(key: AccountId, [a, b]: [u64; 2]) -> u64 {
        table::fold(key.0 ^ a, b)
    }
}

impl Parted<AccountSlot> {
    fn account(&self, id: AccountId) -> Option<&Account> {
        self.get(id).map(|slot| &slot.0)
    }

    fn account_mut(&mut self, id: AccountId) -> Option<&mut Account> {
        self.get_mut(id).map(|slot| &mut slot.0)
    }
}

#[derive(Debug)]
pub struct Ledger {
    shard: ShardId,
    shard_count: u16,
    accounts: Parted<AccountSlot>,
    /// Transfers not yet final: open holds and cross-shard transfers in flight, with their bodies.
    open: FxHashMap<TransferId, StoredTransfer>,
    /// Transfers in a final state, compactly.
    done: DoneTable,
    expiries: BTreeSet<(u64, TransferId)>,
    /// Credit steps of cross-shard transfers this shard applied (or refused), until forgotten.
    /// Keyed by id, with the body hash: a transfer reusing the id with another body must not be
    /// answered with this one's result.
    credits: FxHashMap<TransferId, (TransferResult, u64)>,
    /// Cross-shard transfers of linked chains in flight, with their chain's other members.
    linked: FxHashMap<TransferId, Vec<TransferId>>,
    /// Wallet records of the MSISDNs whose accounts live here.
    wallets: FxHashMap<u64, WalletCore>,
    /// The OTP state of the wallets that were ever sent an OTP (see [`WalletCore`]).
    otps: FxHashMap<u64, OtpSide>,
    /// What a transfer needs of a wallet account, in one small entry: the tier and flags of its
    /// wallet (mirrored from the record) and its outflow counters. Made at the account's first
    /// debit under the policy.
    hot: FxHashMap<AccountId, Hot>,
    policy: Policy,
    /// Per currency, the lowest maximum balance of any tier: a credit that leaves a wallet under
    /// it needs no look at the wallet's tier.
    min_max_balance: Vec<(Currency, u64)>,
    /// The day and month of the last batch time asked about: a batch asks once per transfer.
    windows: (u64, wallet::Windows),
    /// A chain's undo records and commands, kept between chains so that none allocates.
    chain_undo: Vec<Undo>,
    chain_applied: Vec<Command>,
}

impl Ledger {
    pub fn new(shard: ShardId, shard_count: u16) -> Ledger {
        Ledger {
            shard,
            shard_count,
            accounts: Parted::default(),
            open: FxHashMap::default(),
            done: DoneTable::default(),
            expiries: BTreeSet::new(),
            credits: FxHashMap::default(),
            linked: FxHashMap::default(),
            wallets: FxHashMap::default(),
            otps: FxHashMap::default(),
            hot: FxHashMap::default(),
            policy: Policy::default(),
            min_max_balance: min_max_balance(&Policy::default()),
            windows: (u64::MAX, wallet::Windows { day: 0, month: 0 }),
            chain_undo: Vec::new(),
            chain_applied: Vec::new(),
        }
    }

    /// The policy's day and month at `now`, cached for the batch.
    fn windows(&mut self, now: u64) -> wallet::Windows {
        if self.windows.0 != now {
            self.windows = (now, self.policy.windows(now));
        }
        self.windows.1
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
        self.accounts.account(id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.iter().map(|slot| &slot.0)
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

    /// The final transfers added since the last call (id halves and `Done` bits, in order),
    /// for a checkpoint's done segment. Moves them out: the shard copies nothing.
    pub fn take_added_done(&mut self) -> DoneLog {
        std::mem::take(&mut self.done.added)
    }

    /// Adds final transfers from a checkpoint's done segments, in the order they were written
    /// (already in a segment, so not added to the done log again). Stops at the first entry
    /// that failed to decode and returns its error.
    pub fn restore_done<E>(
        &mut self,
        entries: impl IntoIterator<Item = Result<(TransferId, Done), E>>,
    ) -> Result<(), E> {
        for entry in entries {
            let (id, done) = entry?;
            self.done.map.insert_done(id, done);
        }
        Ok(())
    }

    pub fn transfer_count(&self) -> usize {
        self.open.len() + self.done.len()
    }

    pub fn credit_steps(&self) -> impl Iterator<Item = (&TransferId, &(TransferResult, u64))> {
        self.credits.iter()
    }

    pub fn totals(&self) -> FxHashMap<Currency, Totals> {
        let mut totals: FxHashMap<Currency, Totals> = FxHashMap::default();
        for AccountSlot(account) in self.accounts.iter() {
            totals.entry(account.currency).or_default().add(account);
        }
        totals
    }

    /// Sums per currency and account kind: the trial balance's lines.
    pub fn totals_by_kind(&self) -> FxHashMap<(Currency, AccountKind), Totals> {
        let mut totals: FxHashMap<(Currency, AccountKind), Totals> = FxHashMap::default();
        for AccountSlot(account) in self.accounts.iter() {
            totals.entry((account.currency, account.kind)).or_default().add(account);
        }
        totals
    }

    /// Restores state from a checkpoint. The caller hands over whole tables.
    pub fn restore(
        &mut self,
        account_count: usize,
        accounts: impl IntoIterator<Item = Account>,
        open: Vec<StoredTransfer>,
        credits: Vec<(TransferId, (TransferResult, u64))>,
    ) {
        let mut table = Parted::default();
        table.reserve(account_count);
        for account in accounts {
            table.insert(AccountSlot(account));
        }
        self.accounts = table;
        self.expiries = open
            .iter()
            .filter(|t| t.state == TransferState::Pending && t.expires_at != 0)
            .map(|t| (t.expires_at, t.transfer.id))
            .collect();
        self.linked.clear();
        for t in open.iter().filter(|t| t.parent.0 != 0) {
            self.linked.entry(t.parent).or_default().push(t.transfer.id);
        }
        self.open = open.into_iter().map(|t| (t.transfer.id, t)).collect();
        self.done = DoneTable::default();
        self.credits = credits.into_iter().collect();
    }

    /// Restores the wallet tables of a checkpoint: `count` wallets are expected (a room hint).
    pub fn restore_wallets(
        &mut self,
        policy: Policy,
        count: usize,
        wallets: impl IntoIterator<Item = WalletState>,
        outflow: Vec<(AccountId, Outflow)>,
    ) {
        self.min_max_balance = min_max_balance(&policy);
        self.policy = policy;
        self.windows.0 = u64::MAX;
        self.wallets = FxHashMap::default();
        self.otps = FxHashMap::default();
        self.wallets.reserve(count);
        for wallet in wallets {
            let msisdn = wallet.msisdn;
            let (core, side) = WalletCore::split(wallet);
            self.wallets.insert(msisdn, core);
            // A wallet listed twice (damage) is its later copy, whole.
            match side {
                Some(side) => self.otps.insert(msisdn, side),
                None => self.otps.remove(&msisdn),
            };
        }
        self.hot = outflow
            .into_iter()
            .filter_map(|(id, outflow)| {
                let wallet = self.wallets.get(&id.wallet_msisdn()?)?;
                Some((id, Hot { tier: wallet.tier, flags: wallet.flags, outflow }))
            })
            .collect();
        let wallet_accounts: Vec<AccountId> =
            self.accounts.iter().map(|slot| slot.0.id).filter(|id| id.wallet_msisdn().is_some()).collect();
        for id in wallet_accounts {
            self.make_hot(id);
        }
    }

    /// Gives a wallet account its entry in the transfer path (tier, flags, zero counters) when
    /// the account is made, so that no debit has to look up the wallet record or grow the map.
    fn make_hot(&mut self, id: AccountId) {
        let Some(wallet) = id.wallet_msisdn().and_then(|msisdn| self.wallets.get(&msisdn)) else {
            return;
        };
        let (tier, flags) = (wallet.tier, wallet.flags);
        self.hot.entry(id).or_insert(Hot { tier, flags, outflow: Outflow::default() });
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn wallet(&self, msisdn: u64) -> Option<WalletState> {
        self.wallets.get(&msisdn).map(|core| core.state(msisdn, self.otps.get(&msisdn)))
    }

    /// Every wallet, whole (each put together from its core and OTP side).
    pub fn wallets(&self) -> impl Iterator<Item = WalletState> + '_ {
        self.wallets.iter().map(|(msisdn, core)| core.state(*msisdn, self.otps.get(msisdn)))
    }

    /// The outflow counters that have counted something (an untouched wallet's are implied).
    pub fn outflows(&self) -> impl Iterator<Item = (&AccountId, &Outflow)> {
        self.hot
            .iter()
            .filter(|(_, hot)| hot.outflow != Outflow::default())
            .map(|(id, hot)| (id, &hot.outflow))
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
        if let Some(existing) = self.accounts.account(account.id) {
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
        self.accounts.insert(AccountSlot(account));
        self.make_hot(account.id);
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
        let mut touched = 0;
        while index < batch.len() {
            // Keep the next TOUCH_AHEAD transfers' lines on their way.
            let ahead = (index + TOUCH_AHEAD).min(batch.len());
            if touched < ahead {
                self.touch(&batch[touched..ahead]);
                touched = ahead;
            }
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

    /// Starts fetching the accounts, outflow counters and id slots `transfers` will use, so that
    /// their cache misses (tables of millions) overlap instead of coming one after another as
    /// each transfer applies. Changes nothing.
    fn touch(&self, transfers: &[Transfer]) {
        let mut sink = 0_u64;
        for transfer in transfers {
            sink ^= self.touch_account(transfer.debit_account_id);
            sink ^= self.touch_account(transfer.credit_account_id);
            self.done.map.prefetch(transfer.id);
        }
        std::hint::black_box(sink);
    }

    /// Prefetches an account and, under the policy, looks up its wallet's outflow counters (a
    /// hashbrown map: no address to prefetch); returns a value of what it read, for the
    /// caller's sink.
    fn touch_account(&self, id: AccountId) -> u64 {
        self.accounts.prefetch(id);
        if !self.hot.is_empty() && id.wallet_msisdn().is_some() {
            return self.hot.get(&id).map_or(0, |hot| u64::from(hot.tier));
        }
        0
    }

    /// What [`Ledger::touch`] does for a credit step arriving from another shard. Returns a
    /// value of what it read, for the caller's sink.
    pub fn touch_credit(&self, transfer: &Transfer) -> u64 {
        self.touch_account(transfer.credit_account_id)
    }

    /// What [`Ledger::touch`] does for a finalize step: the reserve's debit account and the
    /// slot its final state goes to.
    pub fn touch_finalize(&self, id: TransferId) -> u64 {
        let Some(stored) = self.open.get(&id) else {
            return 0;
        };
        self.accounts.prefetch(stored.transfer.debit_account_id);
        self.done.map.prefetch(id);
        stored.timestamp
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
                let result = self.apply_local(transfer, now, None, None);
                if result.is_ok() {
                    log.push(Command::Transfer(*transfer));
                }
                Outcome::Done(result)
            }
            Route::Cross { credit, .. } => {
                let result = self.reserve(transfer, now, None);
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
        // A retry of a chain still in flight waits for it, member by member.
        if let Some(Outcome::Wait | Outcome::Linked { .. }) = self.existing(&chain[0]) {
            outcomes.extend(
                chain.iter().map(|t| {
                    self.existing(t).unwrap_or(Outcome::Done(TransferResult::ExistsWithDifferentBody))
                }),
            );
            return;
        }
        // The one member, if any, that credits an account on another shard.
        let remote = chain.iter().position(|t| {
            t.flags.is_plain() && self.is_here(t.debit_account_id) && !self.is_here(t.credit_account_id)
        });
        // A retry of a chain that crossed and finished: its crossing transfer is final here, and
        // must not be forwarded again (the credit shard forgot it, and would credit twice).
        if let Some(index) = remote
            && validate(&chain[index]).is_ok()
            && let Some(Outcome::Done(_)) = self.existing(&chain[index])
        {
            outcomes.extend(chain.iter().map(|t| match self.existing(t) {
                Some(Outcome::Done(result)) => Outcome::Done(result),
                _ => Outcome::Done(TransferResult::ExistsWithDifferentBody),
            }));
            return;
        }
        let parent = remote.map(|index| chain[index].id);
        let mut undo = std::mem::take(&mut self.chain_undo);
        let mut applied = std::mem::take(&mut self.chain_applied);
        undo.clear();
        applied.clear();
        let mut failed: Option<(usize, TransferResult)> = None;
        for (position, transfer) in chain.iter().enumerate() {
            let role = match (remote, parent) {
                (Some(index), _) if index == position => Role::Remote,
                (_, Some(parent)) => Role::Member(parent),
                _ => Role::Local,
            };
            let result = self.chain_member(transfer, role, now, &mut undo, &mut applied);
            if !result.is_ok() {
                failed = Some((position, result));
                break;
            }
        }
        match failed {
            None => {
                log.append(&mut applied);
                match (remote, parent) {
                    (Some(index), Some(parent)) => {
                        let credit_shard =
                            crate::ids::home_shard(chain[index].credit_account_id, self.shard_count);
                        self.linked
                            .insert(parent, chain.iter().filter(|t| t.id != parent).map(|t| t.id).collect());
                        outcomes.extend(chain.iter().map(|t| {
                            if t.id == parent {
                                Outcome::Forward { credit_shard }
                            } else {
                                Outcome::Linked { parent }
                            }
                        }));
                    }
                    _ => outcomes.extend(chain.iter().map(|_| Outcome::Done(TransferResult::Ok))),
                }
            }
            Some((failed_at, result)) => {
                self.rollback(&mut undo);
                outcomes.extend((0..chain.len()).map(|position| {
                    Outcome::Done(if position == failed_at {
                        result
                    } else {
                        TransferResult::LinkedEventFailed
                    })
                }));
            }
        }
        undo.clear();
        self.chain_undo = undo;
        self.chain_applied = applied;
    }

    fn is_here(&self, account: AccountId) -> bool {
        account.is_spread() || crate::ids::home_shard(account, self.shard_count) == self.shard
    }

    /// The answer for a transfer whose id this shard accepted before, if it did.
    fn existing(&self, transfer: &Transfer) -> Option<Outcome> {
        if let Some(open) = self.open.get(&transfer.id) {
            return Some(match (open.transfer == *transfer, open.state) {
                (true, TransferState::Reserved) if open.parent.0 != 0 => {
                    Outcome::Linked { parent: open.parent }
                }
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
        role: Role,
        now: u64,
        undo: &mut Vec<Undo>,
        applied: &mut Vec<Command>,
    ) -> TransferResult {
        if let Err(result) = validate(transfer) {
            return result;
        }
        // The whole chain runs on the shard of its first member, so every member's accounts
        // must live here, except the credit account of the one plain member that crosses, and
        // then every member must be plain. Checked before the id, in `TransferResult` order.
        let local = self.is_here(transfer.debit_account_id) && self.is_here(transfer.credit_account_id);
        let allowed = match role {
            Role::Local => local,
            Role::Member(_) => local && transfer.flags.is_plain(),
            Role::Remote => true,
        };
        if !allowed {
            return TransferResult::CrossShardMustBePlain;
        }
        match self.existing(transfer) {
            Some(Outcome::Done(result)) => return result,
            Some(_) => return TransferResult::ExistsWithDifferentBody,
            None => {}
        }
        let result = match role {
            Role::Local => self.apply_local(transfer, now, Some(undo), None),
            Role::Member(parent) => self.apply_local(transfer, now, Some(undo), Some(parent)),
            Role::Remote => self.reserve(transfer, now, Some(undo)),
        };
        if result.is_ok() {
            applied.push(match role {
                Role::Local => Command::Transfer(*transfer),
                Role::Member(parent) => Command::ReserveLinked { transfer: *transfer, parent },
                Role::Remote => Command::Reserve(*transfer),
            });
        }
        result
    }

    fn rollback(&mut self, undo: &mut Vec<Undo>) {
        for step in undo.drain(..).rev() {
            match step {
                Undo::Account(account) => {
                    self.accounts.insert(AccountSlot(account));
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
                Undo::Outflow(account, previous) => {
                    if let Some(hot) = self.hot.get_mut(&account) {
                        hot.outflow = previous.unwrap_or_default();
                    }
                }
            }
        }
    }

    /// A transfer whose accounts both live here. Checks everything, then changes state; on any
    /// refusal nothing changed. With a `parent`, the transfer is a member of a linked chain in
    /// flight to another shard: held in both pending columns until the parent's finalize.
    fn apply_local(
        &mut self,
        transfer: &Transfer,
        now: u64,
        undo: Option<&mut Vec<Undo>>,
        parent: Option<TransferId>,
    ) -> TransferResult {
        if transfer.flags.contains(TransferFlags::POST_PENDING)
            || transfer.flags.contains(TransferFlags::VOID_PENDING)
        {
            return self.resolve_pending(transfer, now, undo);
        }
        // Replay reaches here without `validate`; equal keys would make the lookup below panic.
        if transfer.debit_account_id == transfer.credit_account_id {
            return TransferResult::AccountsMustBeDifferent;
        }
        let windows = self.windows(now);
        let [debit, credit] =
            self.accounts.get_disjoint_mut([transfer.debit_account_id, transfer.credit_account_id]);
        let [debit, credit] = [debit.map(|slot| &mut slot.0), credit.map(|slot| &mut slot.0)];
        let Some(debit) = debit else {
            return TransferResult::DebitAccountNotFound;
        };
        let Some(credit) = credit else {
            return TransferResult::CreditAccountNotFound;
        };
        if debit.currency != transfer.currency || credit.currency != transfer.currency {
            return TransferResult::CurrencyMismatch;
        }
        let pending = transfer.flags.contains(TransferFlags::PENDING) || parent.is_some();
        if let Err(result) = check_debit(debit, transfer.amount, pending) {
            return result;
        }
        if let Err(result) = check_credit(credit, transfer.amount, pending) {
            return result;
        }
        // A chain member is posted by its parent's finalize: its posted columns need room too.
        if parent.is_some()
            && (debit.debits_posted.checked_add(transfer.amount).is_none()
                || credit.credits_posted.checked_add(transfer.amount).is_none())
        {
            return TransferResult::OverflowsDebits;
        }
        let outflow = match wallet_debit(&self.policy, &self.wallets, &mut self.hot, debit, transfer, windows)
        {
            Ok(outflow) => outflow,
            Err(result) => return result,
        };
        if let Err(result) =
            wallet_credit(&self.policy, &self.min_max_balance, &self.wallets, &self.hot, credit, transfer)
        {
            return result;
        }
        let expires_at = if transfer.flags.contains(TransferFlags::PENDING) && transfer.timeout_s != 0 {
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
            if outflow.is_some() {
                undo.push(Undo::Outflow(debit.id, self.hot.get(&debit.id).map(|hot| hot.outflow)));
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
        if let Some(outflow) = outflow
            && let Some(hot) = self.hot.get_mut(&debit.id)
        {
            hot.outflow = outflow;
        }
        if pending {
            if expires_at != 0 {
                self.expiries.insert((expires_at, transfer.id));
            }
            let state = if parent.is_some() { TransferState::Reserved } else { TransferState::Pending };
            self.open.insert(
                transfer.id,
                StoredTransfer {
                    transfer: *transfer,
                    timestamp: now,
                    state,
                    expires_at,
                    parent: parent.unwrap_or(TransferId(0)),
                },
            );
        } else {
            self.done.insert(transfer.id, Done::new(body_hash(transfer), TransferState::Posted));
        }
        TransferResult::Ok
    }

    /// Gives back the outflow a held or reserved debit counted, when it is voided, expired or
    /// (for `amount` less than held) partly posted.
    fn release_outflow(&mut self, held: &StoredTransfer, amount: u64, operation: bool) {
        let t = &held.transfer;
        if t.debit_account_id.wallet_msisdn().is_none() || wallet::exempt(t.code) {
            return;
        }
        let counted_at = self.policy.windows(held.timestamp);
        if let Some(hot) = self.hot.get_mut(&t.debit_account_id) {
            hot.outflow.release(counted_at, amount, operation && wallet::counts_as_operation(t.code));
        }
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
            self.accounts.account(held.debit_account_id).copied(),
            self.accounts.account(held.credit_account_id).copied(),
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
            undo.push(Undo::Outflow(
                held.debit_account_id,
                self.hot.get(&held.debit_account_id).map(|hot| hot.outflow),
            ));
        }
        if !post {
            self.release_outflow(&hold, held.amount, true);
        } else if amount < held.amount {
            self.release_outflow(&hold, held.amount - amount, false);
        }
        self.accounts.insert(AccountSlot(new_debit));
        self.accounts.insert(AccountSlot(new_credit));
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
    fn reserve(&mut self, transfer: &Transfer, now: u64, undo: Option<&mut Vec<Undo>>) -> TransferResult {
        let windows = self.windows(now);
        let Some(debit) = self.accounts.account_mut(transfer.debit_account_id) else {
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
        let outflow = match wallet_debit(&self.policy, &self.wallets, &mut self.hot, debit, transfer, windows)
        {
            Ok(outflow) => outflow,
            Err(result) => return result,
        };
        if let Some(undo) = undo {
            undo.push(Undo::Account(*debit));
            undo.push(Undo::Open(transfer.id, None));
            undo.push(Undo::Outflow(debit.id, self.hot.get(&debit.id).map(|hot| hot.outflow)));
        }
        debit.debits_pending += transfer.amount;
        if let Some(outflow) = outflow
            && let Some(hot) = self.hot.get_mut(&transfer.debit_account_id)
        {
            hot.outflow = outflow;
        }
        self.open.insert(
            transfer.id,
            StoredTransfer {
                transfer: *transfer,
                timestamp: now,
                state: TransferState::Reserved,
                expires_at: 0,
                parent: TransferId(0),
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
        let Some(credit) = self.accounts.account_mut(transfer.credit_account_id) else {
            return TransferResult::CreditAccountNotFound;
        };
        if credit.currency != transfer.currency {
            return TransferResult::CurrencyMismatch;
        }
        if let Err(result) = check_credit(credit, transfer.amount, false) {
            return result;
        }
        if let Err(result) =
            wallet_credit(&self.policy, &self.min_max_balance, &self.wallets, &self.hot, credit, transfer)
        {
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
        if stored.state != TransferState::Reserved || stored.parent.0 != 0 {
            return None;
        }
        let amount = stored.transfer.amount;
        let debit = self.accounts.account_mut(stored.transfer.debit_account_id)?;
        // The reserve checked that both columns have room; checked again rather than trusted.
        debit.debits_pending = debit.debits_pending.checked_sub(amount)?;
        let hash = body_hash(&stored.transfer);
        if result.is_ok() {
            debit.debits_posted = debit.debits_posted.checked_add(amount)?;
            self.done.insert(id, Done::new(hash, TransferState::Posted));
        } else {
            self.release_outflow(&stored, amount, true);
        }
        // Refused transfers are not stored: the id is free for a retry, as with any refusal.
        self.open.remove(&id);
        for member in self.linked.remove(&id).unwrap_or_default() {
            self.finish_member(member, result.is_ok());
        }
        log.push(Command::Finalize { id, result });
        Some(hash)
    }

    /// Posts or releases a member of a linked chain whose cross-shard transfer finished.
    fn finish_member(&mut self, id: TransferId, post: bool) {
        let Some(stored) = self.open.remove(&id) else {
            return;
        };
        let t = stored.transfer;
        for (account, debit) in [(t.debit_account_id, true), (t.credit_account_id, false)] {
            if let Some(account) = self.accounts.account_mut(account) {
                let (pending, posted) = if debit {
                    (&mut account.debits_pending, &mut account.debits_posted)
                } else {
                    (&mut account.credits_pending, &mut account.credits_posted)
                };
                // The member's apply checked both columns; saturating keeps a bug from panicking.
                *pending = pending.saturating_sub(t.amount);
                if post {
                    *posted = posted.saturating_add(t.amount);
                }
            }
        }
        if post {
            self.done.insert(id, Done::new(body_hash(&t), TransferState::Posted));
        } else {
            self.release_outflow(&stored, t.amount, true);
        }
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
        self.release_outflow(&stored, held.amount, true);
        if let Some(debit) = self.accounts.account_mut(held.debit_account_id) {
            debit.debits_pending -= held.amount;
        }
        if let Some(credit) = self.accounts.account_mut(held.credit_account_id) {
            credit.credits_pending -= held.amount;
        }
        self.expiries.remove(&(stored.expires_at, id));
        self.open.remove(&id);
        self.done.insert(id, Done::new(body_hash(&held), TransferState::PendingExpired));
        true
    }

    /// Checks a submission's authorization on the wallet's shard, before its transfers, in the
    /// same step: the PIN (a wrong one is counted, and blocks the wallet at the policy's limit),
    /// the OTP (used up if right), and the step-up rule. The evidence is journaled.
    pub fn authorize(
        &mut self,
        auth: &Authorization,
        batch: &[Transfer],
        now: u64,
        log: &mut Vec<Command>,
    ) -> Result<(), TransferResult> {
        let Some(wallet) = self.wallets.get(&auth.msisdn) else {
            return Err(TransferResult::AuthWalletNotFound);
        };
        if wallet.blocked() {
            return Err(TransferResult::AuthWalletBlocked);
        }
        let mut methods = 0;
        if let Some(pin) = auth.pin {
            match self.check_pin(auth.msisdn, &pin, now, log) {
                Ok(()) => methods |= Evidence::PIN,
                Err(WalletRefusal::PinNotSet) => return Err(TransferResult::PinNotSet),
                Err(WalletRefusal::Blocked) => return Err(TransferResult::AuthWalletBlocked),
                Err(_) => return Err(TransferResult::PinInvalid),
            }
        }
        if let Some(otp) = auth.otp {
            match self.check_otp(auth.msisdn, &otp, now, log) {
                Ok(()) => methods |= Evidence::OTP,
                Err(_) => return Err(TransferResult::OtpInvalid),
            }
        }
        let largest = batch
            .iter()
            .filter(|t| t.debit_account_id.wallet_msisdn() == Some(auth.msisdn))
            .filter(|t| wallet::counts_as_operation(t.code))
            .map(|t| t.amount)
            .max()
            .unwrap_or(0);
        if largest > auth.step_up_above && methods & Evidence::OTP == 0 {
            return Err(TransferResult::StepUpRequired);
        }
        if methods != 0
            && let Some(first) = batch.first()
        {
            let evidence =
                Evidence { msisdn: auth.msisdn, transfer: first.id.0, methods, channel: auth.channel };
            self.record(WalletCommand::Evidence(evidence), now, log);
        }
        Ok(())
    }

    /// Applies a wallet command and journals it: the live path, so that replay (which applies
    /// the same command) reaches the same state.
    fn record(&mut self, command: WalletCommand, now: u64, log: &mut Vec<Command>) {
        self.apply_wallet(&command, now);
        log.push(Command::Wallet(Box::new(command)));
    }

    fn check_pin(
        &mut self,
        msisdn: u64,
        pin: &Tag,
        now: u64,
        log: &mut Vec<Command>,
    ) -> Result<(), WalletRefusal> {
        let wallet = self.wallets.get(&msisdn).ok_or(WalletRefusal::NotFound)?;
        if wallet.blocked() {
            return Err(WalletRefusal::Blocked);
        }
        let stored = wallet.pin.ok_or(WalletRefusal::PinNotSet)?;
        if stored.ct_eq(pin) {
            if wallet.pin_failures > 0 {
                self.record(WalletCommand::PinReset { msisdn }, now, log);
            }
            return Ok(());
        }
        let failures = wallet.pin_failures.saturating_add(1);
        self.record(WalletCommand::PinFailed { msisdn }, now, log);
        Err(WalletRefusal::PinInvalid { remaining: self.policy.pin_attempts_max.saturating_sub(failures) })
    }

    fn check_otp(
        &mut self,
        msisdn: u64,
        otp: &Tag,
        now: u64,
        log: &mut Vec<Command>,
    ) -> Result<(), WalletRefusal> {
        if !self.wallets.contains_key(&msisdn) {
            return Err(WalletRefusal::NotFound);
        }
        let live = self.otps.get(&msisdn).and_then(|side| side.otp).ok_or(WalletRefusal::OtpNotIssued)?;
        if now >= live.expires_at {
            return Err(WalletRefusal::OtpExpired);
        }
        if live.tag.ct_eq(otp) {
            self.record(WalletCommand::OtpUsed { msisdn }, now, log);
            return Ok(());
        }
        let attempts = live.attempts.saturating_add(1);
        self.record(WalletCommand::OtpFailed { msisdn }, now, log);
        Err(WalletRefusal::OtpInvalid { remaining: self.policy.otp_attempts_max.saturating_sub(attempts) })
    }

    /// Answers a live wallet request; every change is journaled through `log`.
    pub fn wallet_request(
        &mut self,
        request: WalletRequest,
        now: u64,
        log: &mut Vec<Command>,
    ) -> WalletReply {
        match self.wallet_request_inner(request, now, log) {
            Ok(reply) => reply,
            Err(refusal) => WalletReply::Refused(refusal),
        }
    }

    fn wallet_request_inner(
        &mut self,
        request: WalletRequest,
        now: u64,
        log: &mut Vec<Command>,
    ) -> Result<WalletReply, WalletRefusal> {
        let msisdn = request.msisdn();
        if let WalletRequest::Register { currencies, tier, pin, language, actor, .. } = request {
            if self.wallets.contains_key(&msisdn) {
                return Err(WalletRefusal::Exists);
            }
            self.policy.tier(tier).ok_or(WalletRefusal::UnknownTier)?;
            self.record(WalletCommand::Register { msisdn, tier, pin, language, actor }, now, log);
            for currency in currencies {
                let account = Account::new(
                    AccountId::wallet(msisdn, currency),
                    currency,
                    AccountKind::WALLET,
                    AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                );
                // `Exists` (an account made before its wallet record) is fine: same fields.
                let _ = self.create_account(account, now, log);
            }
            return Ok(WalletReply::Done);
        }
        let wallet = self.wallets.get(&msisdn).ok_or(WalletRefusal::NotFound)?;
        match request {
            WalletRequest::Register { .. } => Err(WalletRefusal::Exists),
            WalletRequest::Identify { tier, profile, actor, .. } => {
                self.policy.tier(tier).ok_or(WalletRefusal::UnknownTier)?;
                self.record(WalletCommand::Profile { msisdn, profile, actor }, now, log);
                self.record(WalletCommand::SetTier { msisdn, tier, actor }, now, log);
                Ok(WalletReply::Done)
            }
            WalletRequest::UpdateProfile { profile, actor, .. } => {
                self.record(WalletCommand::Profile { msisdn, profile, actor }, now, log);
                Ok(WalletReply::Done)
            }
            WalletRequest::SetPin { old, new, actor, .. } => {
                let staff = actor.kind == wallet::Actor::STAFF;
                if !staff && wallet.pin.is_some() {
                    match old {
                        Some(old) => self.check_pin(msisdn, &old, now, log)?,
                        None => return Err(WalletRefusal::PinInvalid { remaining: 0 }),
                    }
                } else if !staff && wallet.blocked() {
                    return Err(WalletRefusal::Blocked);
                }
                self.record(WalletCommand::SetPin { msisdn, pin: new, actor }, now, log);
                Ok(WalletReply::Done)
            }
            WalletRequest::VerifyPin { pin, .. } => {
                self.check_pin(msisdn, &pin, now, log)?;
                Ok(WalletReply::Done)
            }
            WalletRequest::Block { actor, .. } => {
                if wallet.flags & WalletState::STAFF_BLOCKED == 0 {
                    let flag = WalletState::STAFF_BLOCKED;
                    self.record(WalletCommand::Block { msisdn, flag, actor }, now, log);
                }
                Ok(WalletReply::Done)
            }
            WalletRequest::Unblock { actor, .. } => {
                if wallet.flags != 0 || wallet.pin_failures != 0 {
                    self.record(WalletCommand::Unblock { msisdn, actor }, now, log);
                }
                Ok(WalletReply::Done)
            }
            WalletRequest::SetLanguage { language, .. } => {
                if wallet.language != language {
                    self.record(WalletCommand::SetLanguage { msisdn, language }, now, log);
                }
                Ok(WalletReply::Done)
            }
            WalletRequest::IssueOtp { nonce, tag, ttl_s, .. } => {
                let window = u64::from(self.policy.otp_send_window_s) * NS_PER_S;
                let sent = self.otps.get(&msisdn).map_or(&[][..], |side| &side.sent[..]);
                let recent: Vec<u64> = sent.iter().copied().filter(|at| at + window > now).collect();
                if recent.len() >= usize::from(self.policy.otp_sends_max) {
                    let oldest = recent.first().copied().unwrap_or(now);
                    let wait_ns = (oldest + window).saturating_sub(now);
                    let retry_after_s = u32::try_from(wait_ns.div_ceil(NS_PER_S)).unwrap_or(u32::MAX);
                    return Err(WalletRefusal::OtpRateLimited { retry_after_s });
                }
                let expires_at = now.saturating_add(u64::from(ttl_s) * NS_PER_S);
                self.record(WalletCommand::OtpIssued { msisdn, nonce, tag, expires_at }, now, log);
                Ok(WalletReply::Done)
            }
            WalletRequest::VerifyOtp { tag, .. } => {
                self.check_otp(msisdn, &tag, now, log)?;
                Ok(WalletReply::Done)
            }
            WalletRequest::Get { .. } => Ok(WalletReply::Found(Box::new(self.wallet_view(msisdn, now)?))),
            WalletRequest::ResolveCode { hold, amount, cancel, resolve, then, .. } => {
                if !cancel && wallet.flags & WalletState::STAFF_BLOCKED != 0 {
                    return Err(WalletRefusal::Blocked);
                }
                let held = self.open.get(&hold).map(|open| (open.transfer, open.state, open.expires_at));
                let chain = match held {
                    Some((t, TransferState::Pending, expires_at))
                        if t.debit_account_id.wallet_msisdn() == Some(msisdn)
                            && t.code == wallet::codes::CASH_CODE
                            && (cancel || t.amount == amount) =>
                    {
                        if expires_at != 0 && now >= expires_at {
                            return Err(WalletRefusal::CodeExpired);
                        }
                        self.code_chain(&t, cancel, &resolve, then)
                    }
                    _ => {
                        // A retried resolution answers as the first did, without counting.
                        let resolved_as =
                            if cancel { TransferState::PendingVoided } else { TransferState::PendingPosted };
                        if let Some(done) = self.done.get(&resolve.id) {
                            let same = self.done.get(&hold).is_some_and(|h| h.state() == resolved_as)
                                && done.state() == TransferState::Posted;
                            return Ok(WalletReply::Transfers(vec![if same {
                                TransferResult::Ok
                            } else {
                                TransferResult::ExistsWithDifferentBody
                            }]));
                        }
                        // A right code, too late: not a guess.
                        if self.done.get(&hold).is_some_and(|h| h.state() == TransferState::PendingExpired) {
                            return Err(WalletRefusal::CodeExpired);
                        }
                        return Err(self.code_failed(msisdn, now, log));
                    }
                };
                let local =
                    |t: &Transfer| self.is_here(t.debit_account_id) && self.is_here(t.credit_account_id);
                if !chain.iter().all(local) {
                    return Err(WalletRefusal::NotLocal);
                }
                let mut outcomes = Vec::with_capacity(chain.len());
                self.submit(&chain, now, &mut outcomes, log);
                let results = outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        Outcome::Done(result) => result,
                        // Unreachable with every account local; never an `Ok` that did not happen.
                        _ => TransferResult::LinkedEventFailed,
                    })
                    .collect();
                Ok(WalletReply::Transfers(results))
            }
        }
    }

    /// The chain that resolves cash-code hold `held`: its post (or void), the post (or void)
    /// of its fee hold if it has one, then `then` (on a post only).
    fn code_chain(
        &self,
        held: &Transfer,
        cancel: bool,
        resolve: &Transfer,
        then: Option<Transfer>,
    ) -> Vec<Transfer> {
        let flags = if cancel { TransferFlags::VOID_PENDING } else { TransferFlags::POST_PENDING };
        let resolution = |hold: &Transfer, id: TransferId, code: u16| Transfer {
            id,
            debit_account_id: hold.debit_account_id,
            credit_account_id: hold.credit_account_id,
            amount: if cancel { 0 } else { hold.amount },
            currency: hold.currency,
            pending_id: hold.id,
            user_data: resolve.user_data,
            timeout_s: 0,
            code,
            flags,
        };
        let mut chain = vec![resolution(held, resolve.id, resolve.code)];
        let fee = self
            .open
            .get(&wallet::leg_id(held.id.0, wallet::CODE_FEE_LEG))
            .filter(|fee| fee.state == TransferState::Pending)
            .filter(|fee| fee.transfer.debit_account_id == held.debit_account_id);
        if let Some(fee) = fee {
            let id = wallet::leg_id(resolve.id.0, wallet::CODE_FEE_LEG);
            chain.push(resolution(&fee.transfer, id, fee.transfer.code));
        }
        if !cancel && let Some(then) = then {
            chain.push(then);
        }
        let last = chain.len() - 1;
        for t in &mut chain[..last] {
            t.flags = t.flags.union(TransferFlags::LINKED);
        }
        chain
    }

    /// Counts a wrong cash-code guess; at the policy's limit every live code of the wallet is
    /// cancelled (its holds voided, the money back in the wallet).
    fn code_failed(&mut self, msisdn: u64, now: u64, log: &mut Vec<Command>) -> WalletRefusal {
        self.record(WalletCommand::CodeFailed { msisdn }, now, log);
        let failures = self.wallets.get(&msisdn).map_or(0, |w| w.code_failures);
        let max = self.policy.code_attempts_max;
        if failures < max {
            return WalletRefusal::CodeInvalid { remaining: max - failures };
        }
        let holds: Vec<Transfer> = self
            .open
            .values()
            .filter(|open| open.state == TransferState::Pending)
            .map(|open| open.transfer)
            .filter(|t| {
                t.code == wallet::codes::CASH_CODE && t.debit_account_id.wallet_msisdn() == Some(msisdn)
            })
            .collect();
        let mut outcomes = Vec::new();
        for hold in holds {
            let fee = wallet::leg_id(hold.id.0, wallet::CODE_FEE_LEG);
            for pending in [hold.id, fee] {
                let Some(open) = self.open.get(&pending).filter(|o| o.state == TransferState::Pending) else {
                    continue;
                };
                let void = Transfer {
                    id: wallet::leg_id(pending.0, wallet::CODE_CANCEL_LEG),
                    amount: 0,
                    pending_id: pending,
                    timeout_s: 0,
                    flags: TransferFlags::VOID_PENDING,
                    ..open.transfer
                };
                self.submit(&[void], now, &mut outcomes, log);
            }
        }
        self.record(WalletCommand::CodesCancelled { msisdn }, now, log);
        WalletRefusal::CodeInvalid { remaining: 0 }
    }

    /// Journals that staff authorised a submission (a reversal), before its transfers.
    pub fn authorize_staff(
        &mut self,
        actor: wallet::Actor,
        batch: &[Transfer],
        now: u64,
        log: &mut Vec<Command>,
    ) {
        if let Some(first) = batch.first() {
            self.record(WalletCommand::StaffAuthorized { actor, transfer: first.id.0 }, now, log);
        }
    }

    /// A wallet with its accounts, limits and current counters.
    pub fn wallet_view(&self, msisdn: u64, now: u64) -> Result<WalletView, WalletRefusal> {
        let state = self.wallet(msisdn).ok_or(WalletRefusal::NotFound)?;
        let windows = self.policy.windows(now);
        let accounts = Currency::ALL
            .iter()
            .filter_map(|currency| {
                let account = *self.accounts.account(AccountId::wallet(msisdn, *currency))?;
                Some(WalletAccountView {
                    account,
                    limits: self.policy.limits(state.tier, *currency),
                    outflow: self
                        .hot
                        .get(&account.id)
                        .map(|h| h.outflow)
                        .unwrap_or_default()
                        .current(windows),
                })
            })
            .collect();
        Ok(WalletView { state, accounts })
    }

    /// Replaces the policy (journaled), if it differs.
    pub fn set_policy(&mut self, policy: Policy, now: u64, log: &mut Vec<Command>) {
        if self.policy != policy {
            self.record(WalletCommand::SetPolicy(Box::new(policy)), now, log);
        }
    }

    /// The effect of one wallet command, live and at replay alike.
    fn apply_wallet(&mut self, command: &WalletCommand, now: u64) {
        if let WalletCommand::SetPolicy(policy) = command {
            self.policy = (**policy).clone();
            self.min_max_balance = min_max_balance(&self.policy);
            self.windows.0 = u64::MAX;
            return;
        }
        if let WalletCommand::Register { msisdn, tier, pin, language, .. } = command {
            self.wallets.insert(
                *msisdn,
                WalletCore {
                    pin: *pin,
                    created_at: now,
                    tier: *tier,
                    flags: 0,
                    language: *language,
                    pin_failures: 0,
                    code_failures: 0,
                },
            );
            self.otps.remove(msisdn);
            // Accounts made before their wallet record get their entry now.
            for currency in Currency::ALL {
                let id = AccountId::wallet(*msisdn, currency);
                if self.accounts.contains_key(id) {
                    self.make_hot(id);
                }
            }
            return;
        }
        let Some(msisdn) = command.msisdn() else {
            return;
        };
        let Some(wallet) = self.wallets.get_mut(&msisdn) else {
            return;
        };
        match command {
            WalletCommand::SetTier { tier, .. } => wallet.tier = *tier,
            WalletCommand::SetPin { pin, .. } => {
                wallet.pin = Some(*pin);
                wallet.pin_failures = 0;
            }
            WalletCommand::PinFailed { .. } => {
                wallet.pin_failures = wallet.pin_failures.saturating_add(1);
                if wallet.pin_failures >= self.policy.pin_attempts_max {
                    wallet.flags |= WalletState::PIN_BLOCKED;
                }
            }
            WalletCommand::PinReset { .. } => wallet.pin_failures = 0,
            WalletCommand::Block { flag, .. } => wallet.flags |= *flag,
            WalletCommand::Unblock { .. } => {
                wallet.flags = 0;
                wallet.pin_failures = 0;
            }
            WalletCommand::SetLanguage { language, .. } => wallet.language = *language,
            WalletCommand::OtpIssued { tag, expires_at, .. } => {
                let side = self.otps.entry(msisdn).or_default();
                side.otp = Some(wallet::OtpState { tag: *tag, expires_at: *expires_at, attempts: 0 });
                side.sent.push(now);
                let keep = usize::from(self.policy.otp_sends_max.max(1));
                if side.sent.len() > keep {
                    let excess = side.sent.len() - keep;
                    side.sent.drain(..excess);
                }
            }
            WalletCommand::OtpFailed { .. } => {
                if let Some(side) = self.otps.get_mut(&msisdn)
                    && let Some(otp) = &mut side.otp
                {
                    otp.attempts = otp.attempts.saturating_add(1);
                    if otp.attempts >= self.policy.otp_attempts_max {
                        side.otp = None;
                    }
                }
            }
            WalletCommand::OtpUsed { .. } => {
                if let Some(side) = self.otps.get_mut(&msisdn) {
                    side.otp = None;
                }
            }
            WalletCommand::CodeFailed { .. } => wallet.code_failures = wallet.code_failures.saturating_add(1),
            WalletCommand::CodesCancelled { .. } => wallet.code_failures = 0,
            WalletCommand::Profile { .. }
            | WalletCommand::Evidence(_)
            | WalletCommand::StaffAuthorized { .. }
            | WalletCommand::Register { .. }
            | WalletCommand::SetPolicy(_) => {}
        }
        let (tier, flags) = (wallet.tier, wallet.flags);
        if matches!(
            command,
            WalletCommand::SetTier { .. }
                | WalletCommand::PinFailed { .. }
                | WalletCommand::Block { .. }
                | WalletCommand::Unblock { .. }
        ) {
            self.mirror(msisdn, tier, flags);
        }
    }

    /// Copies a wallet's tier and flags to its accounts' entries in the transfer path, and its
    /// staff block to its accounts' `BLOCKED` flag (so that a credit needs no wallet lookup).
    fn mirror(&mut self, msisdn: u64, tier: u8, flags: u8) {
        for currency in Currency::ALL {
            let id = AccountId::wallet(msisdn, currency);
            if let Some(hot) = self.hot.get_mut(&id) {
                hot.tier = tier;
                hot.flags = flags;
            }
            if let Some(account) = self.accounts.account_mut(id) {
                account.flags = if flags & WalletState::STAFF_BLOCKED != 0 {
                    account.flags.union(AccountFlags::BLOCKED)
                } else {
                    AccountFlags(account.flags.0 & !AccountFlags::BLOCKED.0)
                };
            }
        }
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
                    let result = self.apply_local(transfer, now, None, None);
                    if !result.is_ok() {
                        return Err(diverged("transfer", transfer.id, result));
                    }
                }
                Command::ReserveLinked { transfer, parent } => {
                    if self.existing(transfer).is_some() {
                        return Err(diverged("linked reserve", transfer.id, "id already applied"));
                    }
                    let result = self.apply_local(transfer, now, None, Some(*parent));
                    if !result.is_ok() {
                        return Err(diverged("linked reserve", transfer.id, result));
                    }
                    self.linked.entry(*parent).or_default().push(transfer.id);
                }
                Command::Wallet(command) => self.apply_wallet(command, now),
                Command::Reserve(transfer) => {
                    if self.existing(transfer).is_some() {
                        return Err(diverged("reserve", transfer.id, "id already applied"));
                    }
                    let result = self.reserve(transfer, now, None);
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
                Command::Forget { id, .. } => {
                    // Journaled only when its hash matched the record it dropped, which replay
                    // has rebuilt: drop it by id. (The hash of a forget an older build wrote
                    // is of the CRC kind, and would match nothing recomputed now.)
                    self.credits.remove(id);
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
        // A wallet's accounts carry its staff block.
        return Err(if debit.id.wallet_msisdn().is_some() {
            TransferResult::DebitWalletBlocked
        } else {
            TransferResult::DebitAccountBlocked
        });
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
        return Err(if credit.id.wallet_msisdn().is_some() {
            TransferResult::CreditWalletBlocked
        } else {
            TransferResult::CreditAccountBlocked
        });
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

/// The wallet policy for a debit: the debit wallet's counters with this leg added, or the
/// refusal. `None`: not a wallet, or a leg exempt from limits.
fn wallet_debit(
    policy: &Policy,
    wallets: &FxHashMap<u64, WalletCore>,
    hot: &mut FxHashMap<AccountId, Hot>,
    debit: &Account,
    transfer: &Transfer,
    windows: wallet::Windows,
) -> Result<Option<Outflow>, TransferResult> {
    let Some(msisdn) = debit.id.wallet_msisdn() else {
        return Ok(None);
    };
    if wallet::exempt(transfer.code) {
        return Ok(None);
    }
    let entry = match hot.entry(debit.id) {
        std::collections::hash_map::Entry::Occupied(entry) => *entry.get(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            // A wallet account without a wallet record was made by hand: no policy to apply.
            let Some(wallet) = wallets.get(&msisdn) else {
                return Ok(None);
            };
            *entry.insert(Hot { tier: wallet.tier, flags: wallet.flags, outflow: Outflow::default() })
        }
    };
    if entry.flags & (WalletState::PIN_BLOCKED | WalletState::STAFF_BLOCKED) != 0 {
        return Err(TransferResult::DebitWalletBlocked);
    }
    let limits = policy.limits(entry.tier, transfer.currency);
    entry
        .outflow
        .add(windows, &limits, transfer.amount, wallet::counts_as_operation(transfer.code))
        .map(Some)
        .map_err(limit_result)
}

/// The wallet policy for a credit: the tier's maximum balance. (A staff block is on the
/// account's own flags, checked before.) A credit that leaves the wallet under every tier's
/// maximum needs no look at its tier.
fn wallet_credit(
    policy: &Policy,
    min_max_balance: &[(Currency, u64)],
    wallets: &FxHashMap<u64, WalletCore>,
    hot: &FxHashMap<AccountId, Hot>,
    credit: &Account,
    transfer: &Transfer,
) -> Result<(), TransferResult> {
    let Some(msisdn) = credit.id.wallet_msisdn() else {
        return Ok(());
    };
    if wallet::exempt(transfer.code) {
        return Ok(());
    }
    let held =
        u128::from(credit.credits_posted) + u128::from(credit.credits_pending) + u128::from(transfer.amount);
    let balance = held.saturating_sub(u128::from(credit.debits_posted));
    let floor = min_max_balance.iter().find(|(c, _)| *c == transfer.currency).map_or(u64::MAX, |(_, m)| *m);
    if balance <= u128::from(floor) {
        return Ok(());
    }
    let tier = match hot.get(&credit.id) {
        Some(hot) => hot.tier,
        None => match wallets.get(&msisdn) {
            Some(wallet) => wallet.tier,
            None => return Ok(()),
        },
    };
    let limits = policy.limits(tier, transfer.currency);
    if balance > u128::from(limits.max_balance) {
        return Err(TransferResult::LimitMaxBalance);
    }
    Ok(())
}

/// Per currency, the lowest maximum balance of the policy's tiers, which bounds every wallet (a
/// wallet whose tier is not in the policy gets the strictest limits: `Policy::limits`).
fn min_max_balance(policy: &Policy) -> Vec<(Currency, u64)> {
    Currency::ALL
        .iter()
        .map(|c| (*c, policy.tiers.iter().map(|t| t.limits(*c).max_balance).min().unwrap_or(u64::MAX)))
        .collect()
}

/// A wallet account's entry in the transfer path (see `Ledger::hot`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hot {
    tier: u8,
    flags: u8,
    outflow: Outflow,
}

fn limit_result(hit: LimitHit) -> TransferResult {
    match hit {
        LimitHit::PerOperation => TransferResult::LimitPerOperation,
        LimitHit::DailyAmount => TransferResult::LimitDailyAmount,
        LimitHit::DailyCount => TransferResult::LimitDailyCount,
        LimitHit::MonthlyAmount => TransferResult::LimitMonthlyAmount,
        LimitHit::MonthlyCount => TransferResult::LimitMonthlyCount,
        LimitHit::MaxBalance => TransferResult::LimitMaxBalance,
    }
}

/// What a member of a linked chain is to the chain.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Both accounts here, in a chain that stays here.
    Local,
    /// Both accounts here, in a chain whose transfer `parent` crosses to another shard.
    Member(TransferId),
    /// The chain's one transfer to a credit account on another shard.
    Remote,
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
                .filter(|t| t.state == TransferState::Reserved && t.parent.0 == 0)
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

mod parted;
mod table;
#[cfg(test)]
mod tests;
