//! The engine against a reference model (sled's model tests): proptest generates operations over
//! a few wallets and transfer ids (creating wallets, funding, plain transfers, holds with
//! timeouts, partial posts, voids, linked pairs, clock steps and restarts with or without a
//! checkpoint), runs each on a real engine in a temporary directory and on a plain map model,
//! and compares every result, every balance and every stored transfer after every step.
//!
//! The model follows the check order of `TransferResult` and the shard layout: a hold, post or
//! void whose accounts live on two shards is `CrossShardMustBePlain`, and so is a linked chain
//! whose members live on more than one shard other than through one plain crossing transfer.
//! A chain that crosses through one plain transfer is modelled as the engine runs it: the other
//! members held, the crossing one reserved, all posted or released on the credit shard's
//! answer. One thing it does not model: the engine looks a
//! transfer id up only on the shard that executes the transfer, so reusing an id for a
//! transfer routed to another shard is not detected there. Operations that would do that are
//! skipped on both sides.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use engine::clock::ManualClock;
use engine::ids::{Route, home_shard, route};
use engine::{
    AccountId, CreateAccountResult, Engine, EngineConfig, Transfer, TransferFlags, TransferId,
    TransferResult, TransferState,
};
use proptest::prelude::*;
use qepik_tests::{ISSUANCE, block_on, issuance, slow, wallet};

const SHARDS: u16 = 2;
/// Wallets are 1..=WALLETS; index 0 stands for the issuance account.
const WALLETS: u64 = 8;
/// Wallets `1..=WALLETS_FUNDED` exist with `FUNDING` each from the start; the others wait for
/// `CreateWallet`. Amounts run up to 300, so overdrafts happen.
const WALLETS_FUNDED: u64 = 7;
const FUNDING: u64 = 400;
const TRANSFER_IDS: u128 = 24;
const START_NS: u64 = 1_700_000_000_000_000_000;
const NS_PER_S: u64 = 1_000_000_000;

/// Two accounts, by index (0 is the issuance account): any two, or two that live on one shard
/// (the shard picked by `shard`, or the linked chain's shard for the second leg of a pair), so
/// that holds and chains often stay on one shard and get past `CrossShardMustBePlain`.
#[derive(Debug, Clone, Copy)]
enum Pair {
    Any(u64, u64),
    OneShard { shard: prop::sample::Index, from: prop::sample::Index, to: prop::sample::Index },
}

/// The hold a post or void names: one the model knows (by index), or any id.
#[derive(Debug, Clone, Copy)]
enum Target {
    Hold(prop::sample::Index),
    Id(u128),
}

/// One leg of a linked pair: a plain transfer or a hold without timeout.
#[derive(Debug, Clone, Copy)]
struct Leg {
    id: u128,
    pair: Pair,
    amount: u64,
    hold: bool,
}

#[derive(Debug, Clone)]
enum Op {
    CreateWallet(u64),
    Fund {
        id: u128,
        wallet: u64,
        amount: u64,
    },
    Transfer {
        id: u128,
        pair: Pair,
        amount: u64,
    },
    Hold {
        id: u128,
        pair: Pair,
        amount: u64,
        timeout_s: u32,
    },
    /// Posts the target with `amount` (0 = all). The accounts are the hold's unless given.
    PostPending {
        id: u128,
        target: Target,
        amount: u64,
        accounts: Option<Pair>,
    },
    VoidPending {
        id: u128,
        target: Target,
        accounts: Option<Pair>,
    },
    LinkedPair(Leg, Leg),
    AdvanceClock(u64),
    Restart {
        checkpoint: bool,
    },
}

fn account(index: u64) -> AccountId {
    if index == 0 { ISSUANCE } else { AccountId(index) }
}

fn transfer_id() -> impl Strategy<Value = u128> {
    1..=TRANSFER_IDS
}

fn any_account() -> impl Strategy<Value = u64> {
    0..=WALLETS
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0_u64), 15 => 1..=300_u64]
}

fn pair() -> impl Strategy<Value = Pair> {
    prop_oneof![
        1 => (any_account(), any_account()).prop_map(|(from, to)| Pair::Any(from, to)),
        2 => any::<(prop::sample::Index, prop::sample::Index, prop::sample::Index)>()
            .prop_map(|(shard, from, to)| Pair::OneShard { shard, from, to }),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => any::<prop::sample::Index>().prop_map(Target::Hold),
        1 => transfer_id().prop_map(Target::Id),
    ]
}

fn leg() -> impl Strategy<Value = Leg> {
    (transfer_id(), pair(), amount(), proptest::bool::weighted(0.3))
        .prop_map(|(id, pair, amount, hold)| Leg { id, pair, amount, hold })
}

/// Mostly `None` (a post or void names its hold's accounts); sometimes others.
fn other_accounts() -> impl Strategy<Value = Option<Pair>> {
    proptest::option::weighted(0.15, pair())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1..=WALLETS).prop_map(Op::CreateWallet),
        2 => (transfer_id(), 1..=WALLETS, 1..=1_000_u64)
            .prop_map(|(id, wallet, amount)| Op::Fund { id, wallet, amount }),
        6 => (transfer_id(), pair(), amount()).prop_map(|(id, pair, amount)| Op::Transfer { id, pair, amount }),
        4 => (transfer_id(), pair(), amount(), prop::sample::select(vec![0_u32, 10, 30, 60]))
            .prop_map(|(id, pair, amount, timeout_s)| Op::Hold { id, pair, amount, timeout_s }),
        3 => (transfer_id(), target(), prop_oneof![Just(0_u64), 1..=200_u64], other_accounts())
            .prop_map(|(id, target, amount, accounts)| Op::PostPending { id, target, amount, accounts }),
        2 => (transfer_id(), target(), other_accounts())
            .prop_map(|(id, target, accounts)| Op::VoidPending { id, target, accounts }),
        3 => (leg(), leg()).prop_map(|(first, second)| Op::LinkedPair(first, second)),
        1 => prop::sample::select(vec![5_u64, 20, 45]).prop_map(Op::AdvanceClock),
        1 => any::<bool>().prop_map(|checkpoint| Op::Restart { checkpoint }),
    ]
}

/// The accounts of a pair; `shard` overrides the pair's own choice of shard.
fn accounts_of(pair: Pair, shard: Option<u16>) -> (AccountId, AccountId) {
    match pair {
        Pair::Any(from, to) => (account(from), account(to)),
        Pair::OneShard { shard: pick, from, to } => {
            let shard = shard.unwrap_or_else(|| u16::try_from(pick.index(usize::from(SHARDS))).unwrap_or(0));
            let here: Vec<AccountId> = (0..=WALLETS).map(account).filter(|a| lives_on(*a, shard)).collect();
            let from = *from.get(&here);
            let others: Vec<AccountId> = here.into_iter().filter(|a| *a != from).collect();
            if others.is_empty() { (from, from) } else { (from, *to.get(&others)) }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Balance {
    debits_pending: u64,
    debits_posted: u64,
    credits_pending: u64,
    credits_posted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    transfer: Transfer,
    state: TransferState,
    /// The shard that stores it: the one that executed it.
    shard: u16,
    expires_at: u64,
}

/// The model cannot say what the engine does with this operation (see the module docs).
#[derive(Debug)]
struct Unmodelled;

#[derive(Debug, Clone)]
struct Model {
    now: u64,
    accounts: BTreeMap<AccountId, Balance>,
    transfers: HashMap<u128, Record>,
}

fn shard_of(account: AccountId) -> u16 {
    home_shard(account, SHARDS).0
}

/// Whether `account` has a (sub-)account on `shard`.
fn lives_on(account: AccountId, shard: u16) -> bool {
    account.is_spread() || shard_of(account) == shard
}

/// The stateless checks, in the order of `TransferResult`.
fn validate(t: &Transfer) -> Result<(), TransferResult> {
    use TransferResult as R;
    let flags = t.flags;
    let kinds = [TransferFlags::PENDING, TransferFlags::POST_PENDING, TransferFlags::VOID_PENDING];
    let resolves = flags.contains(TransferFlags::POST_PENDING) || flags.contains(TransferFlags::VOID_PENDING);
    if t.id.0 == 0 {
        return Err(R::IdMustNotBeZero);
    }
    if !flags.is_known() {
        return Err(R::UnknownFlags);
    }
    if kinds.iter().filter(|kind| flags.contains(**kind)).count() > 1 {
        return Err(R::FlagsAreMutuallyExclusive);
    }
    if !resolves && t.pending_id.0 != 0 {
        return Err(R::PendingIdMustBeZero);
    }
    if resolves && t.pending_id.0 == 0 {
        return Err(R::PendingIdMustNotBeZero);
    }
    if resolves && t.pending_id == t.id {
        return Err(R::PendingIdMustBeDifferent);
    }
    if !flags.contains(TransferFlags::PENDING) && t.timeout_s != 0 {
        return Err(R::TimeoutReservedForPendingTransfer);
    }
    if t.debit_account_id == t.credit_account_id {
        return Err(R::AccountsMustBeDifferent);
    }
    if t.debit_account_id.0 == 0 || t.credit_account_id.0 == 0 {
        return Err(R::AccountIdMustNotBeZero);
    }
    if !resolves && t.amount == 0 {
        return Err(R::AmountMustNotBeZero);
    }
    Ok(())
}

/// The results of a chain refused at `position`.
fn refused(len: usize, position: usize, result: TransferResult) -> Vec<TransferResult> {
    (0..len).map(|p| if p == position { result } else { TransferResult::LinkedEventFailed }).collect()
}

impl Model {
    fn new() -> Model {
        let mut accounts = BTreeMap::new();
        accounts.insert(ISSUANCE, Balance::default());
        Model { now: START_NS, accounts, transfers: HashMap::new() }
    }

    fn create_wallet(&mut self, id: u64) -> CreateAccountResult {
        if self.accounts.contains_key(&AccountId(id)) {
            return CreateAccountResult::Exists;
        }
        self.accounts.insert(AccountId(id), Balance::default());
        CreateAccountResult::Ok
    }

    /// Voids every hold whose timeout has passed, as each shard does before its next batch.
    fn expire(&mut self) {
        let now = self.now;
        let mut expired = Vec::new();
        for record in self.transfers.values_mut() {
            if record.state == TransferState::Pending && record.expires_at != 0 && record.expires_at <= now {
                record.state = TransferState::PendingExpired;
                expired.push(record.transfer);
            }
        }
        for held in expired {
            self.balance(held.debit_account_id).debits_pending -= held.amount;
            self.balance(held.credit_account_id).credits_pending -= held.amount;
        }
    }

    fn balance(&mut self, id: AccountId) -> &mut Balance {
        self.accounts.entry(id).or_default()
    }

    /// A submission of one transfer, or of a linked chain (all but the last flagged `LINKED`).
    fn submit(&mut self, batch: &[Transfer]) -> Result<Vec<TransferResult>, Unmodelled> {
        let [first, ..] = batch else { return Ok(Vec::new()) };
        let coordinator = route(first.debit_account_id, first.credit_account_id, SHARDS).coordinator().0;
        if batch.len() == 1 {
            return Ok(vec![self.single(first, coordinator)?]);
        }
        // A chain may leave its shard through its first plain crossing transfer: the other
        // members are held until the credit shard answers, then posted or released together.
        let crossing = |t: &Transfer| {
            t.flags.is_plain()
                && lives_on(t.debit_account_id, coordinator)
                && !lives_on(t.credit_account_id, coordinator)
        };
        if let Some(remote) = batch.iter().position(crossing) {
            return self.crossing_chain(batch, remote, coordinator);
        }
        let mut after = self.clone();
        for (position, transfer) in batch.iter().enumerate() {
            let result = after.chain_member(transfer, coordinator)?;
            if !result.is_ok() {
                return Ok((0..batch.len())
                    .map(|p| if p == position { result } else { TransferResult::LinkedEventFailed })
                    .collect());
            }
        }
        *self = after;
        Ok(vec![TransferResult::Ok; batch.len()])
    }

    /// A linked chain whose member `remote` credits another shard (see `submit`).
    fn crossing_chain(
        &mut self,
        batch: &[Transfer],
        remote: usize,
        shard: u16,
    ) -> Result<Vec<TransferResult>, Unmodelled> {
        // A retry of a chain that crossed: every member answers from what its id has.
        if validate(&batch[remote]).is_ok() && self.existing(&batch[remote], shard)?.is_some() {
            return batch
                .iter()
                .map(|t| Ok(self.existing(t, shard)?.unwrap_or(TransferResult::ExistsWithDifferentBody)))
                .collect();
        }
        let mut after = self.clone();
        let mut held = Vec::new();
        for (position, t) in batch.iter().enumerate() {
            let earlier: Vec<u128> = held.iter().map(|h: &Transfer| h.id.0).collect();
            let result = if position == remote {
                after.reserve_member(t, shard, &earlier)?
            } else {
                after.held_member(t, shard, &earlier)?
            };
            if !result.is_ok() {
                return Ok(refused(batch.len(), position, result));
            }
            held.push(*t);
        }
        // The credit shard's answer.
        let crossing = batch[remote];
        if !after.accounts.contains_key(&crossing.credit_account_id) {
            return Ok(refused(batch.len(), remote, TransferResult::CreditAccountNotFound));
        }
        // Posted together: each member's held amounts move to the posted columns.
        for t in held {
            let debit = after.balance(t.debit_account_id);
            debit.debits_pending -= t.amount;
            debit.debits_posted += t.amount;
            let credit_pending = t.id != crossing.id;
            let credit = after.balance(t.credit_account_id);
            if credit_pending {
                credit.credits_pending -= t.amount;
            }
            credit.credits_posted += t.amount;
            let record = Record { transfer: t, state: TransferState::Posted, shard, expires_at: 0 };
            after.transfers.insert(t.id.0, record);
        }
        *self = after;
        Ok(vec![TransferResult::Ok; batch.len()])
    }

    /// A member of a crossing chain other than the crossing one: local and plain, held in both
    /// pending columns.
    /// An id an earlier member of the chain took is open (held or reserved) on the shard: the
    /// engine answers `ExistsWithDifferentBody` whatever the body.
    fn held_member(
        &mut self,
        t: &Transfer,
        shard: u16,
        earlier: &[u128],
    ) -> Result<TransferResult, Unmodelled> {
        if let Err(result) = validate(t) {
            return Ok(result);
        }
        if !lives_on(t.debit_account_id, shard)
            || !lives_on(t.credit_account_id, shard)
            || !t.flags.is_plain()
        {
            return Ok(TransferResult::CrossShardMustBePlain);
        }
        if earlier.contains(&t.id.0) {
            return Ok(TransferResult::ExistsWithDifferentBody);
        }
        if let Some(result) = self.existing(t, shard)? {
            return Ok(result);
        }
        if !self.accounts.contains_key(&t.debit_account_id) {
            return Ok(TransferResult::DebitAccountNotFound);
        }
        if !self.accounts.contains_key(&t.credit_account_id) {
            return Ok(TransferResult::CreditAccountNotFound);
        }
        if let Err(result) = self.check_debit(t.debit_account_id, t.amount) {
            return Ok(result);
        }
        self.balance(t.debit_account_id).debits_pending += t.amount;
        self.balance(t.credit_account_id).credits_pending += t.amount;
        Ok(TransferResult::Ok)
    }

    /// The crossing member: reserved on its debit shard (a pending debit).
    fn reserve_member(
        &mut self,
        t: &Transfer,
        shard: u16,
        earlier: &[u128],
    ) -> Result<TransferResult, Unmodelled> {
        if let Err(result) = validate(t) {
            return Ok(result);
        }
        if earlier.contains(&t.id.0) {
            return Ok(TransferResult::ExistsWithDifferentBody);
        }
        if let Some(result) = self.existing(t, shard)? {
            return Ok(result);
        }
        if !self.accounts.contains_key(&t.debit_account_id) {
            return Ok(TransferResult::DebitAccountNotFound);
        }
        if let Err(result) = self.check_debit(t.debit_account_id, t.amount) {
            return Ok(result);
        }
        self.balance(t.debit_account_id).debits_pending += t.amount;
        Ok(TransferResult::Ok)
    }

    /// The id's earlier use, as seen from `shard`.
    fn existing(&self, t: &Transfer, shard: u16) -> Result<Option<TransferResult>, Unmodelled> {
        match self.transfers.get(&t.id.0) {
            None => Ok(None),
            Some(record) if record.shard != shard => Err(Unmodelled),
            Some(record) if record.transfer == *t => Ok(Some(TransferResult::Ok)),
            Some(_) => Ok(Some(TransferResult::ExistsWithDifferentBody)),
        }
    }

    fn single(&mut self, t: &Transfer, shard: u16) -> Result<TransferResult, Unmodelled> {
        if let Err(result) = validate(t) {
            return Ok(result);
        }
        let route = route(t.debit_account_id, t.credit_account_id, SHARDS);
        let cross = matches!(route, Route::Cross { .. });
        if cross && !t.flags.is_plain() {
            return Ok(TransferResult::CrossShardMustBePlain);
        }
        if let Some(result) = self.existing(t, shard)? {
            return Ok(result);
        }
        if cross { Ok(self.cross(t, shard)) } else { self.local(t, shard) }
    }

    fn chain_member(&mut self, t: &Transfer, shard: u16) -> Result<TransferResult, Unmodelled> {
        if let Err(result) = validate(t) {
            return Ok(result);
        }
        if !lives_on(t.debit_account_id, shard) || !lives_on(t.credit_account_id, shard) {
            return Ok(TransferResult::CrossShardMustBePlain);
        }
        if let Some(result) = self.existing(t, shard)? {
            return Ok(result);
        }
        self.local(t, shard)
    }

    /// Debit checks of a wallet (issuance has no limit and these amounts never overflow).
    fn check_debit(&self, id: AccountId, amount: u64) -> Result<(), TransferResult> {
        let b = self.accounts.get(&id).copied().unwrap_or_default();
        if id != ISSUANCE
            && u128::from(b.debits_posted) + u128::from(b.debits_pending) + u128::from(amount)
                > u128::from(b.credits_posted)
        {
            return Err(TransferResult::ExceedsCredits);
        }
        Ok(())
    }

    /// A plain transfer between shards: reserve on the debit shard, credit on the other.
    fn cross(&mut self, t: &Transfer, shard: u16) -> TransferResult {
        if !self.accounts.contains_key(&t.debit_account_id) {
            return TransferResult::DebitAccountNotFound;
        }
        if let Err(result) = self.check_debit(t.debit_account_id, t.amount) {
            return result;
        }
        if !self.accounts.contains_key(&t.credit_account_id) {
            return TransferResult::CreditAccountNotFound;
        }
        self.post(t, shard);
        TransferResult::Ok
    }

    fn post(&mut self, t: &Transfer, shard: u16) {
        self.balance(t.debit_account_id).debits_posted += t.amount;
        self.balance(t.credit_account_id).credits_posted += t.amount;
        let record = Record { transfer: *t, state: TransferState::Posted, shard, expires_at: 0 };
        self.transfers.insert(t.id.0, record);
    }

    fn local(&mut self, t: &Transfer, shard: u16) -> Result<TransferResult, Unmodelled> {
        if t.flags.contains(TransferFlags::POST_PENDING) || t.flags.contains(TransferFlags::VOID_PENDING) {
            return self.resolve(t, shard);
        }
        if !self.accounts.contains_key(&t.debit_account_id) {
            return Ok(TransferResult::DebitAccountNotFound);
        }
        if !self.accounts.contains_key(&t.credit_account_id) {
            return Ok(TransferResult::CreditAccountNotFound);
        }
        if let Err(result) = self.check_debit(t.debit_account_id, t.amount) {
            return Ok(result);
        }
        if !t.flags.contains(TransferFlags::PENDING) {
            self.post(t, shard);
            return Ok(TransferResult::Ok);
        }
        self.balance(t.debit_account_id).debits_pending += t.amount;
        self.balance(t.credit_account_id).credits_pending += t.amount;
        let expires_at = if t.timeout_s == 0 { 0 } else { self.now + u64::from(t.timeout_s) * NS_PER_S };
        let record = Record { transfer: *t, state: TransferState::Pending, shard, expires_at };
        self.transfers.insert(t.id.0, record);
        Ok(TransferResult::Ok)
    }

    fn resolve(&mut self, t: &Transfer, shard: u16) -> Result<TransferResult, Unmodelled> {
        use TransferResult as R;
        let Some(hold) = self.transfers.get(&t.pending_id.0).copied() else {
            return Ok(R::PendingTransferNotFound);
        };
        if hold.shard != shard {
            return Err(Unmodelled);
        }
        let held = hold.transfer;
        // Only holds are ever `Pending`; anything else `Posted` is not a hold.
        match hold.state {
            TransferState::Pending => {}
            TransferState::PendingPosted => return Ok(R::PendingTransferAlreadyPosted),
            TransferState::PendingVoided => return Ok(R::PendingTransferAlreadyVoided),
            TransferState::PendingExpired => return Ok(R::PendingTransferExpired),
            TransferState::Posted | TransferState::Reserved => return Ok(R::PendingTransferNotPending),
        }
        if held.debit_account_id != t.debit_account_id || held.credit_account_id != t.credit_account_id {
            return Ok(R::PendingTransferHasDifferentAccounts);
        }
        let post = t.flags.contains(TransferFlags::POST_PENDING);
        let amount = if post && t.amount != 0 { t.amount } else { held.amount };
        if amount > held.amount {
            return Ok(R::ExceedsPendingTransferAmount);
        }
        let debit = self.balance(held.debit_account_id);
        debit.debits_pending -= held.amount;
        if post {
            debit.debits_posted += amount;
        }
        let credit = self.balance(held.credit_account_id);
        credit.credits_pending -= held.amount;
        if post {
            credit.credits_posted += amount;
        }
        let state = if post { TransferState::PendingPosted } else { TransferState::PendingVoided };
        self.transfers.insert(held.id.0, Record { state, ..hold });
        let record = Record { transfer: *t, state: TransferState::Posted, shard, expires_at: 0 };
        self.transfers.insert(t.id.0, record);
        Ok(R::Ok)
    }

    /// The hold a post or void names, and the accounts it uses: the hold's, unless the
    /// operation picked others.
    fn resolve_target(&self, target: Target, accounts: Option<Pair>) -> (u128, (AccountId, AccountId)) {
        let pending_id = match target {
            Target::Id(id) => id,
            Target::Hold(index) => {
                let mut holds: Vec<u128> = self
                    .transfers
                    .values()
                    .filter(|r| r.transfer.flags.contains(TransferFlags::PENDING))
                    .map(|r| r.transfer.id.0)
                    .collect();
                holds.sort_unstable();
                if holds.is_empty() { 1 } else { *index.get(&holds) }
            }
        };
        let accounts = match (accounts, self.transfers.get(&pending_id)) {
            (Some(pair), _) => accounts_of(pair, None),
            (None, Some(record)) => (record.transfer.debit_account_id, record.transfer.credit_account_id),
            // A pair on one shard, so that the answer is about the hold, not the shards.
            (None, None) => (ISSUANCE, AccountId(1)),
        };
        (pending_id, accounts)
    }
}

fn resolving(
    id: u128,
    pending_id: u128,
    accounts: (AccountId, AccountId),
    amount: u64,
    flag: TransferFlags,
) -> Transfer {
    Transfer {
        pending_id: TransferId(pending_id),
        flags: flag,
        ..Transfer::new(id, accounts.0, accounts.1, amount)
    }
}

fn leg_transfer(leg: &Leg, shard: Option<u16>, linked: bool) -> Transfer {
    let mut flags = if leg.hold { TransferFlags::PENDING } else { TransferFlags::empty() };
    if linked {
        flags = flags.union(TransferFlags::LINKED);
    }
    let (from, to) = accounts_of(leg.pair, shard);
    Transfer { flags, ..Transfer::new(leg.id, from, to, leg.amount) }
}

/// The transfers an operation submits, or `None` for operations that submit nothing.
fn batch_of(op: &Op, model: &Model) -> Option<Vec<Transfer>> {
    Some(match *op {
        Op::Fund { id, wallet, amount } => vec![Transfer::new(id, ISSUANCE, AccountId(wallet), amount)],
        Op::Transfer { id, pair, amount } => {
            let (from, to) = accounts_of(pair, None);
            vec![Transfer::new(id, from, to, amount)]
        }
        Op::Hold { id, pair, amount, timeout_s } => {
            let (from, to) = accounts_of(pair, None);
            vec![Transfer { flags: TransferFlags::PENDING, timeout_s, ..Transfer::new(id, from, to, amount) }]
        }
        Op::PostPending { id, target, amount, accounts } => {
            let (pending_id, accounts) = model.resolve_target(target, accounts);
            vec![resolving(id, pending_id, accounts, amount, TransferFlags::POST_PENDING)]
        }
        Op::VoidPending { id, target, accounts } => {
            let (pending_id, accounts) = model.resolve_target(target, accounts);
            vec![resolving(id, pending_id, accounts, 0, TransferFlags::VOID_PENDING)]
        }
        Op::LinkedPair(first, second) => {
            let first = leg_transfer(&first, None, true);
            let shard = route(first.debit_account_id, first.credit_account_id, SHARDS).coordinator().0;
            vec![first, leg_transfer(&second, Some(shard), false)]
        }
        Op::CreateWallet(_) | Op::AdvanceClock(_) | Op::Restart { .. } => return None,
    })
}

fn config(dir: &std::path::Path, clock: &Arc<ManualClock>) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = SHARDS;
    config.views = false;
    config.clock = clock.clone();
    config
}

/// Every balance and every stored transfer of the engine equals the model's, and debits equal
/// credits.
fn compare(engine: &Engine, model: &Model) -> anyhow::Result<()> {
    let ids: Vec<AccountId> = std::iter::once(ISSUANCE).chain((1..=WALLETS).map(AccountId)).collect();
    let accounts = block_on(engine.lookup_accounts(&ids))?;
    for (id, found) in ids.iter().zip(accounts) {
        let found = found.map(|a| Balance {
            debits_pending: a.debits_pending,
            debits_posted: a.debits_posted,
            credits_pending: a.credits_pending,
            credits_posted: a.credits_posted,
        });
        let expected = model.accounts.get(id).copied();
        anyhow::ensure!(found == expected, "account {id}: engine {found:?}, model {expected:?}");
    }
    let ids: Vec<TransferId> = (1..=TRANSFER_IDS).map(TransferId).collect();
    let transfers = block_on(engine.lookup_transfers(&ids))?;
    for (id, found) in ids.iter().zip(transfers) {
        // An open hold comes with its body; a final transfer only with its state.
        let found = found.map(|s| (s.state, s.open.map(|open| (open.transfer, open.state, open.expires_at))));
        let expected = model.transfers.get(&id.0).map(|r| {
            let open = (r.state == TransferState::Pending).then_some((r.transfer, r.state, r.expires_at));
            (r.state, open)
        });
        anyhow::ensure!(found == expected, "transfer {}: engine {found:?}, model {expected:?}", id.0);
    }
    let totals = engine.totals()?;
    anyhow::ensure!(totals.values().all(|t| t.balanced()), "unbalanced: {totals:?}");
    Ok(())
}

/// Runs the operations on an engine and on the model.
fn run(ops: &[Op]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(START_NS));
    let mut engine = Engine::open(config(dir.path(), &clock))?;
    // A starting world, so that most operations find funded wallets.
    let mut model = Model::new();
    let mut accounts = vec![issuance()];
    accounts.extend((1..=WALLETS_FUNDED).map(wallet));
    let created = block_on(engine.create_accounts(accounts))?;
    anyhow::ensure!(created.iter().all(|r| *r == CreateAccountResult::Ok), "{created:?}");
    let funding: Vec<Transfer> = (1..=WALLETS_FUNDED).map(|w| qepik_tests::funding(w, FUNDING)).collect();
    for transfer in &funding {
        model.create_wallet(transfer.credit_account_id.0);
        model.post(transfer, shard_of(transfer.credit_account_id));
    }
    let funded = engine.submit_blocking(funding)?;
    anyhow::ensure!(funded.iter().all(|r| r.is_ok()), "{funded:?}");
    for (step, op) in ops.iter().enumerate() {
        let context = || format!("step {step}: {op:?}");
        match *op {
            Op::CreateWallet(id) => {
                let expected = model.create_wallet(id);
                let found = block_on(engine.create_accounts(vec![wallet(id)]))?;
                anyhow::ensure!(found == [expected], "{}: engine {found:?}, model {expected:?}", context());
            }
            Op::AdvanceClock(seconds) => {
                clock.advance_s(seconds);
                model.now += seconds * NS_PER_S;
                model.expire();
            }
            Op::Restart { checkpoint } => {
                if checkpoint {
                    engine.checkpoint()?;
                }
                engine.shutdown();
                drop(engine);
                engine = Engine::open(config(dir.path(), &clock))?;
            }
            _ => {
                let batch = batch_of(op, &model).unwrap_or_default();
                let Ok(expected) = model.submit(&batch) else {
                    continue;
                };
                let found = engine.submit_blocking(batch.clone())?;
                anyhow::ensure!(
                    found == expected,
                    "{}: {batch:?}\nengine {found:?}, model {expected:?}",
                    context()
                );
            }
        }
        compare(&engine, &model).map_err(|error| anyhow::anyhow!("{}: {error}", context()))?;
    }
    engine.shutdown();
    drop(engine);
    let engine = Engine::open(config(dir.path(), &clock))?;
    compare(&engine, &model).map_err(|error| anyhow::anyhow!("after the final restart: {error}"))?;
    engine.shutdown();
    Ok(())
}

fn cases() -> u32 {
    if slow() { 1_024 } else { 64 }
}

fn ops_len_max() -> usize {
    if slow() { 150 } else { 60 }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(ops in prop::collection::vec(op(), 1..=ops_len_max())) {
        run(&ops).map_err(|error| TestCaseError::fail(format!("{error:#}")))?;
    }
}
