//! The journal's record format: the only place that knows rkyv. Domain types convert to and from
//! these wire structs here, so the ledger derives nothing about storage.

use rkyv::rancor;

use crate::account::{Account, AccountFlags, AccountKind};
use crate::ids::{AccountId, TransferId};
use crate::ledger::{Command, StoredTransfer, TransferState};
use crate::money::Currency;
use crate::transfer::{Transfer, TransferFlags, TransferResult};

/// Bumped whenever the layout below changes; a reader refuses versions it does not know.
/// Version 5 writes a batch's commands by kind with fee legs as siblings ([`WireBatch`]);
/// version 4 wrote every body whole ([`WireBatchV4`]), version 3 wrote one list of
/// [`WalCommand`]s, each as large as the largest kind; both are still read.
pub const FORMAT_VERSION: u8 = 5;
/// The layout before siblings ([`WireBatchV4`]), still read (journals are never rewritten).
pub const FORMAT_VERSION_V4: u8 = 4;
/// The layout before per-kind lists, still read.
pub const FORMAT_VERSION_V3: u8 = 3;
/// The layout of checkpoints ([`WalCheckpointHead`] and the frames after it), versioned apart
/// from the journal's records.
/// Version 3 (the journal's, which checkpoints shared until the done list became plain `u64`s)
/// is an older layout: recovery passes over such a checkpoint and replays the journal.
/// Version 4 held the final transfers inline, before done segments; also passed over.
/// Version 5 stored body hashes of two CRC32C passes (32 bits of information: see
/// `ledger::body_hash`); passed over, so that every stored hash is recomputed from the journal.
/// Version 6 held each shard's accounts as one rkyv vector inside a single frame
/// ([`WalCheckpointV6`]): still read. Version 7 writes a head frame and then the accounts in
/// frames of [`AccountChunks`], and done segments as a head and frames of raw entries, so that
/// neither is ever whole in memory twice.
pub const CHECKPOINT_VERSION: u8 = 8;
/// Layout 7: the wallets whole in the head frame (read, and upgraded on load).
pub const CHECKPOINT_VERSION_V7: u8 = 7;
pub const CHECKPOINT_VERSION_V4: u8 = 4;
pub const CHECKPOINT_VERSION_V5: u8 = 5;
pub const CHECKPOINT_VERSION_V6: u8 = 6;

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalTransfer {
    id: u128,
    debit: u64,
    credit: u64,
    amount: u64,
    pending_id: u128,
    user_data: u128,
    timeout_s: u32,
    code: u16,
    flags: u16,
    currency: u8,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalAccount {
    id: u64,
    kind: u16,
    flags: u16,
    currency: u8,
    debits_pending: u64,
    debits_posted: u64,
    credits_pending: u64,
    credits_posted: u64,
    timestamp: u64,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WalCommand {
    CreateAccount(WalAccount),
    Transfer(WalTransfer),
    Reserve(WalTransfer),
    Credit(WalTransfer),
    Finalize { id: u128, result: u8 },
    Forget { id: u128, body_hash: u64 },
    Expire(u128),
    ReserveLinked { transfer: WalTransfer, parent: u128 },
    Wallet(Box<crate::wallet::WalletCommand>),
}

impl WalCommand {
    /// The transfer body the command carries, if it carries one.
    fn body(&self) -> Option<&WalTransfer> {
        match self {
            WalCommand::Transfer(t)
            | WalCommand::Reserve(t)
            | WalCommand::Credit(t)
            | WalCommand::ReserveLinked { transfer: t, .. } => Some(t),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WalRecord {
    /// Opens every segment, so that any segment says which layout of shards it belongs to.
    Meta { shard_count: u16 },
    /// The commands one shard applied in one batch, with the batch's time (ns since the epoch).
    Batch { shard: u16, timestamp: u64, commands: Vec<WalCommand> },
}

/// A journal record as version 5 lays it out. A batch keeps each kind of command in a list of
/// its own, with one byte per command saying which list its fields come next from: a finalize
/// or forget takes 24 bytes instead of the 128 of the largest kind, which halves the journal
/// of a cross-shard transfer. A transfer that shares its debit account, currency, reference,
/// hold id and timeout with the transfer body before it in the batch (a fee leg after its
/// principal) is a *sibling*: 40 bytes of what differs instead of a whole body of 96.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireRecord {
    Meta { shard_count: u16 },
    Batch(WireBatch),
}

#[derive(Debug, Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireBatch {
    shard: u16,
    timestamp: u64,
    /// One of the `KIND_*` codes per command, in order.
    kinds: Vec<u8>,
    /// Transfer, Reserve, Credit and ReserveLinked bodies, in order.
    transfers: Vec<WalTransfer>,
    /// Finalize (id halves, result), Forget (id halves, body hash), Expire (id halves, 0) and
    /// ReserveLinked (parent id halves, 0), in order.
    steps: Vec<[u64; 3]>,
    accounts: Vec<WalAccount>,
    wallets: Vec<crate::wallet::WalletCommand>,
    /// What sibling transfers do not share with the body before them, in order.
    siblings: Vec<WireSibling>,
}

/// The fields of a sibling transfer that differ from the transfer body before it in its batch;
/// everything else (debit account, currency, pending id, user data, timeout) is that body's.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireSibling {
    id: [u64; 2],
    credit: u64,
    amount: u64,
    code: u16,
    flags: u16,
}

/// Version 4's record, read only: version 5 without the sibling list. Frozen, field for field,
/// as version 4 builds wrote it: never edit, even where it repeats [`WireBatch`].
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireRecordV4 {
    Meta { shard_count: u16 },
    Batch(WireBatchV4),
}

#[derive(Debug, Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireBatchV4 {
    shard: u16,
    timestamp: u64,
    kinds: Vec<u8>,
    transfers: Vec<WalTransfer>,
    steps: Vec<[u64; 3]>,
    accounts: Vec<WalAccount>,
    wallets: Vec<crate::wallet::WalletCommand>,
}

impl From<WireBatchV4> for WireBatch {
    fn from(old: WireBatchV4) -> WireBatch {
        let WireBatchV4 { shard, timestamp, kinds, transfers, steps, accounts, wallets } = old;
        WireBatch { shard, timestamp, kinds, transfers, steps, accounts, wallets, siblings: Vec::new() }
    }
}

const KIND_CREATE_ACCOUNT: u8 = 0;
const KIND_TRANSFER: u8 = 1;
const KIND_RESERVE: u8 = 2;
const KIND_CREDIT: u8 = 3;
const KIND_FINALIZE: u8 = 4;
const KIND_FORGET: u8 = 5;
const KIND_EXPIRE: u8 = 6;
const KIND_RESERVE_LINKED: u8 = 7;
const KIND_WALLET: u8 = 8;
/// A `Transfer` whose body is a sibling of the body before it.
const KIND_TRANSFER_SIBLING: u8 = 9;
/// A `ReserveLinked` whose body is a sibling of the body before it, and whose parent is that
/// body's transfer (a chain's fee leg held behind its crossing principal).
const KIND_RESERVE_LINKED_SIBLING: u8 = 10;

/// Whether `transfer` can be journaled as a sibling of `before`: it shares every field a
/// [`WireSibling`] leaves out.
fn is_sibling(transfer: &Transfer, before: &Transfer) -> bool {
    transfer.debit_account_id == before.debit_account_id
        && transfer.currency == before.currency
        && transfer.pending_id == before.pending_id
        && transfer.user_data == before.user_data
        && transfer.timeout_s == before.timeout_s
}

impl WireBatch {
    fn with_capacity(shard: u16, timestamp: u64, commands: usize) -> WireBatch {
        WireBatch {
            shard,
            timestamp,
            kinds: Vec::with_capacity(commands),
            transfers: Vec::with_capacity(commands),
            ..WireBatch::default()
        }
    }

    fn step(&mut self, kind: u8, id: u128, value: u64) {
        let [low, high] = crate::ids::halves(id);
        self.kinds.push(kind);
        self.steps.push([low, high, value]);
    }

    fn from_commands(shard: u16, timestamp: u64, commands: &[Command]) -> WireBatch {
        let mut batch = WireBatch::with_capacity(shard, timestamp, commands.len());
        batch.fill(commands);
        batch
    }

    /// Empties the batch (keeping its vectors' room) and fills it with `commands`.
    fn refill(&mut self, shard: u16, timestamp: u64, commands: &[Command]) {
        let WireBatch { kinds, transfers, steps, accounts, wallets, siblings, .. } = self;
        kinds.clear();
        transfers.clear();
        steps.clear();
        accounts.clear();
        wallets.clear();
        siblings.clear();
        (self.shard, self.timestamp) = (shard, timestamp);
        self.fill(commands);
    }

    fn fill(&mut self, commands: &[Command]) {
        let mut before: Option<&Transfer> = None;
        for command in commands {
            before = self.push(command, before).or(before);
        }
    }

    fn sibling(&mut self, kind: u8, t: &Transfer) {
        self.kinds.push(kind);
        self.siblings.push(WireSibling {
            id: crate::ids::halves(t.id.0),
            credit: t.credit_account_id.0,
            amount: t.amount,
            code: t.code,
            flags: t.flags.0,
        });
    }

    /// Appends `command`, as a sibling of `before` (the transfer body last written) where it is
    /// one. Returns the transfer body this command wrote, if any.
    fn push<'c>(&mut self, command: &'c Command, before: Option<&Transfer>) -> Option<&'c Transfer> {
        let sibling = |t: &Transfer| before.is_some_and(|before| is_sibling(t, before));
        match command {
            Command::Transfer(t) if sibling(t) => {
                self.sibling(KIND_TRANSFER_SIBLING, t);
                return Some(t);
            }
            Command::ReserveLinked { transfer, parent }
                if sibling(transfer) && before.is_some_and(|before| before.id == *parent) =>
            {
                self.sibling(KIND_RESERVE_LINKED_SIBLING, transfer);
                return Some(transfer);
            }
            _ => {}
        }
        match command {
            Command::CreateAccount(a) => {
                self.kinds.push(KIND_CREATE_ACCOUNT);
                self.accounts.push(a.into());
                None
            }
            Command::Transfer(t) | Command::Reserve(t) | Command::Credit(t) => {
                self.kinds.push(match command {
                    Command::Transfer(_) => KIND_TRANSFER,
                    Command::Reserve(_) => KIND_RESERVE,
                    _ => KIND_CREDIT,
                });
                self.transfers.push(t.into());
                Some(t)
            }
            Command::Finalize { id, result } => {
                self.step(KIND_FINALIZE, id.0, *result as u64);
                None
            }
            Command::Forget { id, body_hash } => {
                self.step(KIND_FORGET, id.0, *body_hash);
                None
            }
            Command::Expire(id) => {
                self.step(KIND_EXPIRE, id.0, 0);
                None
            }
            Command::ReserveLinked { transfer, parent } => {
                self.transfers.push(transfer.into());
                self.step(KIND_RESERVE_LINKED, parent.0, 0);
                Some(transfer)
            }
            Command::Wallet(command) => {
                self.kinds.push(KIND_WALLET);
                self.wallets.push((**command).clone());
                None
            }
        }
    }

    /// The commands in journal order, as the rest of the engine reads them. A kind byte this
    /// version does not know, or a list shorter than its kinds say, is an error.
    fn into_commands(self) -> Result<Vec<WalCommand>, DecodeRecordError> {
        let mut transfers = self.transfers.into_iter();
        let mut steps = self.steps.into_iter();
        let mut accounts = self.accounts.into_iter();
        let mut wallets = self.wallets.into_iter();
        let mut siblings = self.siblings.into_iter();
        let short = DecodeRecordError("command list");
        let mut commands = Vec::with_capacity(self.kinds.len());
        // Where the transfer body last read is in `commands`: what the next sibling shares.
        let mut before: Option<usize> = None;
        for kind in self.kinds {
            let mut step = || steps.next().ok_or(short.clone());
            let id = |[low, high, _]: [u64; 3]| crate::ids::from_halves([low, high]);
            let before_body = before.and_then(|index| commands.get(index)).and_then(WalCommand::body);
            let mut sibling = || -> Result<WalTransfer, DecodeRecordError> {
                let s = siblings.next().ok_or(short.clone())?;
                let before = before_body.ok_or(DecodeRecordError("sibling without a transfer before it"))?;
                Ok(WalTransfer {
                    id: crate::ids::from_halves(s.id),
                    credit: s.credit,
                    amount: s.amount,
                    code: s.code,
                    flags: s.flags,
                    ..before.clone()
                })
            };
            let command = match kind {
                KIND_CREATE_ACCOUNT => WalCommand::CreateAccount(accounts.next().ok_or(short.clone())?),
                KIND_TRANSFER => WalCommand::Transfer(transfers.next().ok_or(short.clone())?),
                KIND_RESERVE => WalCommand::Reserve(transfers.next().ok_or(short.clone())?),
                KIND_CREDIT => WalCommand::Credit(transfers.next().ok_or(short.clone())?),
                KIND_FINALIZE => {
                    let step = step()?;
                    let result = u8::try_from(step[2]).map_err(|_| DecodeRecordError("result"))?;
                    WalCommand::Finalize { id: id(step), result }
                }
                KIND_FORGET => {
                    let step = step()?;
                    WalCommand::Forget { id: id(step), body_hash: step[2] }
                }
                KIND_EXPIRE => WalCommand::Expire(id(step()?)),
                KIND_RESERVE_LINKED => {
                    let transfer = transfers.next().ok_or(short.clone())?;
                    WalCommand::ReserveLinked { transfer, parent: id(step()?) }
                }
                KIND_WALLET => WalCommand::Wallet(Box::new(wallets.next().ok_or(short.clone())?)),
                KIND_TRANSFER_SIBLING => WalCommand::Transfer(sibling()?),
                KIND_RESERVE_LINKED_SIBLING => {
                    let parent = before_body.map_or(0, |before| before.id);
                    WalCommand::ReserveLinked { transfer: sibling()?, parent }
                }
                _ => return Err(DecodeRecordError("command kind")),
            };
            if command.body().is_some() {
                before = Some(commands.len());
            }
            commands.push(command);
        }
        if transfers.next().is_some()
            || steps.next().is_some()
            || accounts.next().is_some()
            || wallets.next().is_some()
            || siblings.next().is_some()
        {
            return Err(DecodeRecordError("command list"));
        }
        Ok(commands)
    }
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalStoredTransfer {
    transfer: WalTransfer,
    timestamp: u64,
    state: u8,
    expires_at: u64,
    parent: u128,
}

/// One shard's state in a checkpoint of layout 7, but for its accounts: they follow the head
/// of the checkpoint in frames of their own ([`AccountChunks`], counted in
/// [`WalCheckpointHead::accounts`]).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalShardHead {
    /// The journal position after the last record of this shard that the state includes.
    pub position: u64,
    /// The time of the last batch applied (ns), so the shard's clock never runs backwards.
    pub timestamp: u64,
    /// Open holds and cross-shard transfers in flight, whole.
    pub transfers: Vec<WalStoredTransfer>,
    pub credits: Vec<(u128, u8, u64)>,
    pub policy: crate::wallet::Policy,
    pub wallets: Vec<crate::wallet::WalletState>,
    pub outflow: Vec<(u64, crate::wallet::Outflow)>,
}

/// The first frame of a checkpoint file (layout 8). Each shard's accounts follow it in chunk
/// frames, shard after shard, and then each shard's wallets (its head's `wallets` is empty).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalCheckpointHead {
    pub shard_count: u16,
    pub shards: Vec<WalShardHead>,
    /// Per shard, in order: how many accounts follow the head, in how many chunk frames. Set
    /// by the writer from the chunks it writes, the only place they are counted.
    pub accounts: Vec<(u64, u32)>,
    /// Per shard, in order: how many wallets follow the accounts, in how many chunk frames.
    pub wallets: Vec<(u64, u32)>,
    /// The done segments (their sequence numbers, oldest first) that together hold the final
    /// transfers of this state; recovery reads them in this order.
    pub segments: Vec<u64>,
}

/// The head frame of layout 7, read only: the wallets are whole in each shard's head. Frozen,
/// field for field, as layout 7 builds wrote it: never edit.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalCheckpointHeadV7 {
    pub shard_count: u16,
    pub shards: Vec<WalShardHead>,
    pub accounts: Vec<(u64, u32)>,
    pub segments: Vec<u64>,
}

impl WalCheckpointHeadV7 {
    /// The same head in layout 8: no wallet chunks follow (the wallets stay in the heads).
    pub fn upgrade(self) -> WalCheckpointHead {
        let WalCheckpointHeadV7 { shard_count, shards, accounts, segments } = self;
        let wallets = vec![(0, 0); shards.len()];
        WalCheckpointHead { shard_count, shards, accounts, wallets, segments }
    }
}

/// One shard's whole state: as captured, and as a checkpoint is read back.
#[derive(Debug, Clone)]
pub struct WalShardState {
    pub head: WalShardHead,
    pub accounts: AccountChunks,
    /// The wallets, in chunks (layout 8); older layouts keep them whole in `head.wallets`.
    pub wallets: WalletChunks,
}

/// A checkpoint in memory: what [`crate::checkpoint::write`] writes and `load_latest` reads.
#[derive(Debug, Clone)]
pub struct WalCheckpoint {
    pub shard_count: u16,
    pub shards: Vec<WalShardState>,
    pub segments: Vec<u64>,
}

/// A shard's accounts in a compact encoding: per account, LEB128 varints of its id, kind,
/// flags, currency, four balances and its age at the capture (`timestamp` of the capture minus
/// the account's), back to back, in chunks of at most [`AccountChunks::CHUNK_LEN`] bytes.
///
/// Why not rkyv: an archived account takes 64 bytes, and a checkpoint of 10M accounts held both
/// a copy of every account and its encoding (1.2 GB beside the 1 GiB table). Balances in minor
/// units and ids are mostly small numbers: an account takes ~20 bytes here, captured straight
/// from the ledger's table, and each chunk is one frame of the checkpoint file.
pub type AccountChunks = Chunks<Accounts>;

/// Items of a checkpoint encoded back to back, in chunks of at most [`Chunks::CHUNK_LEN`] bytes
/// (one frame of the file each, and one allocation while capturing); an item never straddles
/// two chunks. `K` says what the items are ([`Accounts`], [`Wallets`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunks<K> {
    chunks: Vec<Vec<u8>>,
    count: u64,
    kind: std::marker::PhantomData<K>,
}

/// What kind of items a [`Chunks`] holds.
pub trait ChunkItem {
    /// The fewest bytes one item takes: a bound on what a recorded count may reserve, should
    /// the count be wrong.
    const ENCODED_LEN_MIN: usize;
}

/// Accounts: nine varints each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounts;

impl ChunkItem for Accounts {
    const ENCODED_LEN_MIN: usize = 9;
}

/// The most bytes one account takes: nine varints of at most ten bytes.
const ACCOUNT_ENCODED_LEN_MAX: usize = 90;

impl<K: ChunkItem> Chunks<K> {
    /// A chunk's size: one frame of a checkpoint file, and one allocation while capturing.
    pub const CHUNK_LEN: usize = 1 << 20;

    /// Appends one encoded item, in a new chunk if the last has no room for it.
    fn append(&mut self, item: &[u8]) {
        let needs_chunk = self
            .chunks
            .last()
            .is_none_or(|chunk| !chunk.is_empty() && chunk.len() + item.len() > Self::CHUNK_LEN);
        if needs_chunk {
            self.chunks.push(Vec::with_capacity(Self::CHUNK_LEN));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.extend_from_slice(item);
        }
        self.count += 1;
    }

    /// Items encoded so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn chunks(&self) -> &[Vec<u8>] {
        &self.chunks
    }

    /// The most items the chunks can hold: a bound on what a recorded count may reserve.
    pub fn count_max(&self) -> u64 {
        let bytes: usize = self.chunks.iter().map(Vec::len).sum();
        u64::try_from(bytes / K::ENCODED_LEN_MIN).unwrap_or(u64::MAX)
    }

    /// Moves the chunks out (to write them, each dropped once written).
    pub fn take_chunks(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.chunks)
    }

    /// Chunks read back from a checkpoint file, holding `count` items between them (checked as
    /// they are decoded).
    pub fn from_chunks(chunks: Vec<Vec<u8>>, count: u64) -> Self {
        Chunks { chunks, count, kind: std::marker::PhantomData }
    }
}

impl AccountChunks {
    /// Appends `account`, whose age is counted back from `now` (the capture's timestamp).
    pub fn push(&mut self, account: &Account, now: u64) {
        use integer_encoding::VarInt;
        let mut scratch = [0_u8; ACCOUNT_ENCODED_LEN_MAX];
        let mut len = 0;
        for value in [
            account.id.0,
            u64::from(account.kind.0),
            u64::from(account.flags.0),
            u64::from(account.currency as u8),
            account.debits_pending,
            account.debits_posted,
            account.credits_pending,
            account.credits_posted,
            // Wrapping, so that an account stamped after `now` (a clock set back) still
            // round-trips exactly.
            now.wrapping_sub(account.timestamp),
        ] {
            len += value.encode_var(&mut scratch[len..]);
        }
        self.append(&scratch[..len]);
    }

    /// Decodes the accounts, consuming the chunks one by one; `now` is the capture's
    /// timestamp. Every malformed byte is an error, never a panic; so is a count that differs
    /// from the one recorded.
    pub fn into_accounts(self, now: u64) -> impl Iterator<Item = Result<Account, DecodeRecordError>> {
        decode_chunks(self.chunks, self.count, "account count", move |bytes, at| {
            decode_account(bytes, at, now)
        })
    }
}

/// Decodes the items of `chunks` one at a time with `decode`, consuming the chunks one by one;
/// stops at the first error, and ends with `count_error` if the chunks held other than
/// `expected` items.
fn decode_chunks<T>(
    chunks: Vec<Vec<u8>>,
    expected: u64,
    count_error: &'static str,
    mut decode: impl FnMut(&[u8], &mut usize) -> Result<T, DecodeRecordError>,
) -> impl Iterator<Item = Result<T, DecodeRecordError>> {
    let mut decoded = 0_u64;
    let mut done = false;
    let mut chunks = chunks.into_iter();
    let mut current: Vec<u8> = Vec::new();
    let mut at = 0_usize;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while at >= current.len() {
            match chunks.next() {
                Some(next) => {
                    current = next;
                    at = 0;
                }
                None => {
                    done = true;
                    return (decoded != expected).then_some(Err(DecodeRecordError(count_error)));
                }
            }
        }
        let result = decode(&current, &mut at);
        match &result {
            Ok(_) => decoded += 1,
            Err(_) => done = true,
        }
        Some(result)
    })
}

fn decode_account(bytes: &[u8], at: &mut usize, now: u64) -> Result<Account, DecodeRecordError> {
    use integer_encoding::VarInt;
    let mut next = |what: &'static str| -> Result<u64, DecodeRecordError> {
        let rest = bytes.get(*at..).ok_or(DecodeRecordError(what))?;
        let (value, len) = u64::decode_var(rest).ok_or(DecodeRecordError(what))?;
        *at += len;
        Ok(value)
    };
    let id = next("account id")?;
    let kind = u16::try_from(next("account kind")?).map_err(|_| DecodeRecordError("account kind"))?;
    let flags = u16::try_from(next("account flags")?).map_err(|_| DecodeRecordError("account flags"))?;
    let currency = u8::try_from(next("currency")?)
        .ok()
        .and_then(Currency::from_u8)
        .ok_or(DecodeRecordError("currency"))?;
    Ok(Account {
        id: AccountId(id),
        currency,
        kind: AccountKind(kind),
        flags: AccountFlags(flags),
        debits_pending: next("balance")?,
        debits_posted: next("balance")?,
        credits_pending: next("balance")?,
        credits_posted: next("balance")?,
        timestamp: now.wrapping_sub(next("account timestamp")?),
    })
}

/// A shard's wallets in a compact encoding, in chunks of at most [`AccountChunks::CHUNK_LEN`]
/// bytes: per wallet, LEB128 varints of its MSISDN and creation time, its five one-byte fields,
/// a byte saying whether a PIN tag and a live OTP follow, those, and the OTP send times. A
/// wallet with a PIN and no OTP takes ~50 bytes. Captured straight from the ledger's tables, so
/// that a checkpoint no longer holds a copy of every wallet (136 bytes each) and its rkyv
/// encoding at once: for 10M wallets that was ~2.3 GB while the checkpoint was written.
pub type WalletChunks = Chunks<Wallets>;

/// Wallets: see [`WalletChunks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wallets;

impl ChunkItem for Wallets {
    /// Two varints, five bytes and the presence byte.
    const ENCODED_LEN_MIN: usize = 8;
}

const WALLET_HAS_PIN: u8 = 1;
const WALLET_HAS_OTP: u8 = 2;

impl WalletChunks {
    /// Appends `wallet`.
    pub fn push(&mut self, wallet: &crate::wallet::WalletState, scratch: &mut Vec<u8>) {
        use integer_encoding::VarInt;
        scratch.clear();
        let varint = |value: u64, out: &mut Vec<u8>| {
            let mut bytes = [0_u8; 10];
            let len = value.encode_var(&mut bytes);
            out.extend_from_slice(&bytes[..len]);
        };
        varint(wallet.msisdn, scratch);
        varint(wallet.created_at, scratch);
        scratch.extend_from_slice(&[
            wallet.tier,
            wallet.flags,
            wallet.language,
            wallet.pin_failures,
            wallet.code_failures,
        ]);
        let present = if wallet.pin.is_some() { WALLET_HAS_PIN } else { 0 }
            | if wallet.otp.is_some() { WALLET_HAS_OTP } else { 0 };
        scratch.push(present);
        if let Some(pin) = &wallet.pin {
            scratch.extend_from_slice(&pin.0);
        }
        if let Some(otp) = &wallet.otp {
            scratch.extend_from_slice(&otp.tag.0);
            varint(otp.expires_at, scratch);
            scratch.push(otp.attempts);
        }
        varint(wallet.otp_sent.len() as u64, scratch);
        for at in &wallet.otp_sent {
            varint(*at, scratch);
        }
        self.append(scratch);
    }

    /// Decodes the wallets, consuming the chunks one by one. Every malformed byte is an error,
    /// never a panic; so is a count that differs from the one recorded.
    pub fn into_wallets(self) -> impl Iterator<Item = Result<crate::wallet::WalletState, DecodeRecordError>> {
        decode_chunks(self.chunks, self.count, "wallet count", decode_wallet)
    }
}

fn decode_wallet(bytes: &[u8], at: &mut usize) -> Result<crate::wallet::WalletState, DecodeRecordError> {
    use crate::wallet::{OtpState, Tag, WalletState};
    use integer_encoding::VarInt;
    fn varint(bytes: &[u8], at: &mut usize, what: &'static str) -> Result<u64, DecodeRecordError> {
        let rest = bytes.get(*at..).ok_or(DecodeRecordError(what))?;
        let (value, len) = u64::decode_var(rest).ok_or(DecodeRecordError(what))?;
        *at += len;
        Ok(value)
    }
    fn take<'a>(
        bytes: &'a [u8],
        at: &mut usize,
        len: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeRecordError> {
        let end = at.checked_add(len).ok_or(DecodeRecordError(what))?;
        let taken = bytes.get(*at..end).ok_or(DecodeRecordError(what))?;
        *at = end;
        Ok(taken)
    }
    let tag = |bytes: &[u8], at: &mut usize, what| -> Result<Tag, DecodeRecordError> {
        let raw = take(bytes, at, 32, what)?;
        let mut tag = [0_u8; 32];
        tag.copy_from_slice(raw);
        Ok(Tag(tag))
    };
    let msisdn = varint(bytes, at, "wallet msisdn")?;
    let created_at = varint(bytes, at, "wallet creation time")?;
    let fields = take(bytes, at, 6, "wallet fields")?;
    let (tier, flags, language, pin_failures, code_failures, present) =
        (fields[0], fields[1], fields[2], fields[3], fields[4], fields[5]);
    if present & !(WALLET_HAS_PIN | WALLET_HAS_OTP) != 0 {
        return Err(DecodeRecordError("wallet presence byte"));
    }
    let pin = if present & WALLET_HAS_PIN != 0 { Some(tag(bytes, at, "wallet PIN tag")?) } else { None };
    let otp = if present & WALLET_HAS_OTP != 0 {
        let otp_tag = tag(bytes, at, "wallet OTP tag")?;
        let expires_at = varint(bytes, at, "wallet OTP expiry")?;
        let attempts = take(bytes, at, 1, "wallet OTP attempts")?[0];
        Some(OtpState { tag: otp_tag, expires_at, attempts })
    } else {
        None
    };
    let sends = varint(bytes, at, "wallet OTP sends")?;
    // Each send takes a byte at least: a count beyond the bytes left is damage, not a reason to
    // reserve memory.
    let left = bytes.len().saturating_sub(*at);
    let sends =
        usize::try_from(sends).ok().filter(|n| *n <= left).ok_or(DecodeRecordError("wallet OTP sends"))?;
    let mut otp_sent = Vec::with_capacity(sends);
    for _ in 0..sends {
        otp_sent.push(varint(bytes, at, "wallet OTP send time")?);
    }
    Ok(WalletState {
        msisdn,
        tier,
        flags,
        language,
        pin,
        pin_failures,
        created_at,
        otp,
        otp_sent,
        code_failures,
    })
}

/// Version 6's shard state, read only (a checkpoint of one rkyv frame). Frozen, field for
/// field, as version 6 builds wrote it: never edit.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalShardStateV6 {
    pub position: u64,
    pub timestamp: u64,
    pub accounts: Vec<WalAccount>,
    pub transfers: Vec<WalStoredTransfer>,
    pub credits: Vec<(u128, u8, u64)>,
    pub policy: crate::wallet::Policy,
    pub wallets: Vec<crate::wallet::WalletState>,
    pub outflow: Vec<(u64, crate::wallet::Outflow)>,
}

/// Version 6's checkpoint, read only.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalCheckpointV6 {
    pub shard_count: u16,
    pub shards: Vec<WalShardStateV6>,
    pub segments: Vec<u64>,
}

impl WalCheckpointV6 {
    /// The same state in the current in-memory form.
    pub fn upgrade(self) -> Result<WalCheckpoint, DecodeRecordError> {
        let mut shards = Vec::with_capacity(self.shards.len());
        for old in self.shards {
            let mut accounts = AccountChunks::default();
            for account in &old.accounts {
                accounts.push(&Account::try_from(account)?, old.timestamp);
            }
            let head = WalShardHead {
                position: old.position,
                timestamp: old.timestamp,
                transfers: old.transfers,
                credits: old.credits,
                policy: old.policy,
                wallets: old.wallets,
                outflow: old.outflow,
            };
            shards.push(WalShardState { head, accounts, wallets: WalletChunks::default() });
        }
        Ok(WalCheckpoint { shard_count: self.shard_count, shards, segments: self.segments })
    }
}

/// One checkpoint's share of the final transfers: those each shard added since the checkpoint
/// before. Written once, next to the checkpoints, and read back by every later checkpoint that
/// lists it, so no checkpoint copies the final transfers of another.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalDoneSegment {
    pub sequence: u64,
    /// Per shard, in chunks: the id's low and high halves and the `ledger::Done` bits (body
    /// hash and state), in the order added. Plain `u64`s, without the padding of a `(u128,
    /// u64)`, so that rkyv copies the millions of them a chunk at a time, not one by one.
    pub shards: Vec<crate::ledger::DoneLog>,
}

/// The first frame of a done segment file (layout 7): then, for each shard in order, as many
/// frames as `chunks` says, each holding entries of the done log as 24 little-endian bytes
/// (id low half, id high half, `Done` bits), in the order added.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalDoneSegmentHead {
    pub sequence: u64,
    pub chunks: Vec<u32>,
}

/// One done entry's size in a done segment's chunk frame.
pub const DONE_ENTRY_LEN: usize = 24;

/// Appends `entries` to `out` as a done segment's chunk frame payload.
pub fn encode_done_chunk(entries: &[[u64; 3]], out: &mut Vec<u8>) {
    out.reserve(entries.len() * DONE_ENTRY_LEN);
    for entry in entries {
        for half in entry {
            out.extend_from_slice(&half.to_le_bytes());
        }
    }
}

/// The entries of a done segment's chunk frame payload, or an error if its length is not a
/// whole number of entries.
pub fn decode_done_chunk(payload: &[u8]) -> Result<Vec<[u64; 3]>, DecodeRecordError> {
    if !payload.len().is_multiple_of(DONE_ENTRY_LEN) {
        return Err(DecodeRecordError("done chunk length"));
    }
    let word = |bytes: &[u8]| {
        let mut le = [0_u8; 8];
        le.copy_from_slice(bytes);
        u64::from_le_bytes(le)
    };
    Ok(payload
        .chunks_exact(DONE_ENTRY_LEN)
        .map(|entry| [word(&entry[0..8]), word(&entry[8..16]), word(&entry[16..24])])
        .collect())
}

/// A record that decoded but holds a value this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {0} in a journal record")]
pub struct DecodeRecordError(pub &'static str);

impl From<&Transfer> for WalTransfer {
    fn from(t: &Transfer) -> Self {
        WalTransfer {
            id: t.id.0,
            debit: t.debit_account_id.0,
            credit: t.credit_account_id.0,
            amount: t.amount,
            pending_id: t.pending_id.0,
            user_data: t.user_data,
            timeout_s: t.timeout_s,
            code: t.code,
            flags: t.flags.0,
            currency: t.currency as u8,
        }
    }
}

impl TryFrom<&WalTransfer> for Transfer {
    type Error = DecodeRecordError;
    fn try_from(t: &WalTransfer) -> Result<Self, Self::Error> {
        Ok(Transfer {
            id: TransferId(t.id),
            debit_account_id: AccountId(t.debit),
            credit_account_id: AccountId(t.credit),
            amount: t.amount,
            currency: Currency::from_u8(t.currency).ok_or(DecodeRecordError("currency"))?,
            pending_id: TransferId(t.pending_id),
            user_data: t.user_data,
            timeout_s: t.timeout_s,
            code: t.code,
            flags: TransferFlags(t.flags),
        })
    }
}

impl From<&Account> for WalAccount {
    fn from(a: &Account) -> Self {
        WalAccount {
            id: a.id.0,
            kind: a.kind.0,
            flags: a.flags.0,
            currency: a.currency as u8,
            debits_pending: a.debits_pending,
            debits_posted: a.debits_posted,
            credits_pending: a.credits_pending,
            credits_posted: a.credits_posted,
            timestamp: a.timestamp,
        }
    }
}

impl TryFrom<&WalAccount> for Account {
    type Error = DecodeRecordError;
    fn try_from(a: &WalAccount) -> Result<Self, Self::Error> {
        Ok(Account {
            id: AccountId(a.id),
            currency: Currency::from_u8(a.currency).ok_or(DecodeRecordError("currency"))?,
            kind: AccountKind(a.kind),
            flags: AccountFlags(a.flags),
            debits_pending: a.debits_pending,
            debits_posted: a.debits_posted,
            credits_pending: a.credits_pending,
            credits_posted: a.credits_posted,
            timestamp: a.timestamp,
        })
    }
}

impl From<&Command> for WalCommand {
    fn from(command: &Command) -> Self {
        match command {
            Command::CreateAccount(a) => WalCommand::CreateAccount(a.into()),
            Command::Transfer(t) => WalCommand::Transfer(t.into()),
            Command::Reserve(t) => WalCommand::Reserve(t.into()),
            Command::Credit(t) => WalCommand::Credit(t.into()),
            Command::Finalize { id, result } => WalCommand::Finalize { id: id.0, result: *result as u8 },
            Command::Forget { id, body_hash } => WalCommand::Forget { id: id.0, body_hash: *body_hash },
            Command::Expire(id) => WalCommand::Expire(id.0),
            Command::ReserveLinked { transfer, parent } => {
                WalCommand::ReserveLinked { transfer: transfer.into(), parent: parent.0 }
            }
            Command::Wallet(command) => WalCommand::Wallet(command.clone()),
        }
    }
}

impl TryFrom<&WalCommand> for Command {
    type Error = DecodeRecordError;
    fn try_from(command: &WalCommand) -> Result<Self, Self::Error> {
        Ok(match command {
            WalCommand::CreateAccount(a) => Command::CreateAccount(a.try_into()?),
            WalCommand::Transfer(t) => Command::Transfer(t.try_into()?),
            WalCommand::Reserve(t) => Command::Reserve(t.try_into()?),
            WalCommand::Credit(t) => Command::Credit(t.try_into()?),
            WalCommand::Finalize { id, result } => Command::Finalize {
                id: TransferId(*id),
                result: TransferResult::from_u8(*result).ok_or(DecodeRecordError("result"))?,
            },
            WalCommand::Forget { id, body_hash } => {
                Command::Forget { id: TransferId(*id), body_hash: *body_hash }
            }
            WalCommand::Expire(id) => Command::Expire(TransferId(*id)),
            WalCommand::ReserveLinked { transfer, parent } => {
                Command::ReserveLinked { transfer: transfer.try_into()?, parent: TransferId(*parent) }
            }
            WalCommand::Wallet(command) => Command::Wallet(command.clone()),
        })
    }
}

impl From<&StoredTransfer> for WalStoredTransfer {
    fn from(s: &StoredTransfer) -> Self {
        WalStoredTransfer {
            transfer: (&s.transfer).into(),
            timestamp: s.timestamp,
            state: s.state as u8,
            expires_at: s.expires_at,
            parent: s.parent.0,
        }
    }
}

impl TryFrom<&WalStoredTransfer> for StoredTransfer {
    type Error = DecodeRecordError;
    fn try_from(s: &WalStoredTransfer) -> Result<Self, Self::Error> {
        Ok(StoredTransfer {
            transfer: (&s.transfer).try_into()?,
            timestamp: s.timestamp,
            state: TransferState::from_u8(s.state).ok_or(DecodeRecordError("state"))?,
            expires_at: s.expires_at,
            parent: TransferId(s.parent),
        })
    }
}

/// Serialises a value to bytes. rkyv's serialiser only fails on allocation, which aborts anyway.
pub fn encode<T>(value: &T) -> Result<rkyv::util::AlignedVec, rancor::Error>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rancor::Error>(value)
}

/// Serialises a checkpoint's head frame.
pub fn encode_checkpoint_head(head: &WalCheckpointHead) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(head)
}

pub fn decode_checkpoint_head(bytes: &[u8]) -> Result<WalCheckpointHead, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalCheckpointHead, rancor::Error>(&aligned)
}

/// Decodes the head frame of a layout-7 checkpoint.
pub fn decode_checkpoint_head_v7(bytes: &[u8]) -> Result<WalCheckpointHeadV7, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalCheckpointHeadV7, rancor::Error>(&aligned)
}

/// Encodes a layout-7 head (tests write old checkpoints with it).
pub fn encode_checkpoint_head_v7(
    head: &WalCheckpointHeadV7,
) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(head)
}

/// Why a journal record's bytes (whose frame checked out) do not make a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("{0}")]
    Layout(#[from] rancor::Error),
    #[error(transparent)]
    Value(#[from] DecodeRecordError),
}

/// Serialises a record in the current layout ([`FORMAT_VERSION`]).
pub fn encode_record(record: &WalRecord) -> Result<rkyv::util::AlignedVec, RecordError> {
    Ok(match record {
        WalRecord::Meta { shard_count } => encode(&WireRecord::Meta { shard_count: *shard_count })?,
        WalRecord::Batch { shard, timestamp, commands } => {
            let commands = commands.iter().map(Command::try_from).collect::<Result<Vec<_>, _>>()?;
            encode_batch(*shard, *timestamp, &commands)?
        }
    })
}

/// Serialises shard batches in the current layout like [`encode_batch`], through buffers kept
/// between batches: a shard encodes hundreds of batches a second, and fresh vectors for each
/// (grown by doubling, their pages new to the process) cost it more than the encoding.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    batch: WireBatch,
    bytes: rkyv::util::AlignedVec,
}

impl BatchEncoder {
    /// The record's bytes, valid until the next call.
    pub fn encode(
        &mut self,
        shard: u16,
        timestamp: u64,
        commands: &[Command],
    ) -> Result<&[u8], rancor::Error> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.refill(shard, timestamp, commands);
        let record = WireRecord::Batch(batch);
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        let encoded = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&record, bytes);
        if let WireRecord::Batch(batch) = record {
            self.batch = batch;
        }
        self.bytes = encoded?;
        Ok(&self.bytes)
    }
}

/// Serialises one shard batch of commands in the current layout, straight from the ledger's
/// commands.
pub fn encode_batch(
    shard: u16,
    timestamp: u64,
    commands: &[Command],
) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    encode(&WireRecord::Batch(WireBatch::from_commands(shard, timestamp, commands)))
}

/// Validates and deserialises a record of layout `version` from bytes (copied to an aligned
/// buffer first: one per thread, kept between records, so that a tail decoding megabytes a
/// pass does not take fresh memory for each record).
pub fn decode_record(version: u8, bytes: &[u8]) -> Result<WalRecord, RecordError> {
    /// A buffer this large is let go after use rather than kept for the thread.
    const KEEP_AT_MOST: usize = 64 << 20;
    thread_local! {
        static ALIGNED: std::cell::RefCell<rkyv::util::AlignedVec<16>> =
            std::cell::RefCell::new(rkyv::util::AlignedVec::new());
    }
    ALIGNED.with(|cell| {
        let mut aligned = cell.borrow_mut();
        aligned.clear();
        aligned.extend_from_slice(bytes);
        let decoded = decode_aligned(version, &aligned);
        if aligned.capacity() > KEEP_AT_MOST {
            *aligned = rkyv::util::AlignedVec::new();
        }
        decoded
    })
}

fn decode_aligned(version: u8, aligned: &rkyv::util::AlignedVec<16>) -> Result<WalRecord, RecordError> {
    match version {
        FORMAT_VERSION => Ok(match rkyv::from_bytes::<WireRecord, rancor::Error>(aligned)? {
            WireRecord::Meta { shard_count } => WalRecord::Meta { shard_count },
            WireRecord::Batch(batch) => {
                let (shard, timestamp) = (batch.shard, batch.timestamp);
                WalRecord::Batch { shard, timestamp, commands: batch.into_commands()? }
            }
        }),
        FORMAT_VERSION_V4 => Ok(match rkyv::from_bytes::<WireRecordV4, rancor::Error>(aligned)? {
            WireRecordV4::Meta { shard_count } => WalRecord::Meta { shard_count },
            WireRecordV4::Batch(batch) => {
                // Siblings came with version 5: a version 4 record naming one is damaged.
                if batch.kinds.iter().any(|kind| *kind > KIND_WALLET) {
                    return Err(DecodeRecordError("command kind").into());
                }
                let (shard, timestamp) = (batch.shard, batch.timestamp);
                WalRecord::Batch { shard, timestamp, commands: WireBatch::from(batch).into_commands()? }
            }
        }),
        FORMAT_VERSION_V3 => Ok(rkyv::from_bytes::<WalRecord, rancor::Error>(aligned)?),
        other => Err(RecordError::Version(other)),
    }
}

/// Decodes a checkpoint of layout 6 (one rkyv frame).
pub fn decode_checkpoint_v6(bytes: &[u8]) -> Result<WalCheckpointV6, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalCheckpointV6, rancor::Error>(&aligned)
}

pub fn encode_done_segment_head(head: &WalDoneSegmentHead) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(head)
}

pub fn decode_done_segment_head(bytes: &[u8]) -> Result<WalDoneSegmentHead, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalDoneSegmentHead, rancor::Error>(&aligned)
}

/// Serialises a done segment in layout 6 (one rkyv frame): only tests write it now, to check
/// that such segments are still read.
pub fn encode_done_segment_v6(segment: &WalDoneSegment) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(segment)
}

/// Serialises a checkpoint in layout 6 (one rkyv frame), for the same tests.
pub fn encode_checkpoint_v6(checkpoint: &WalCheckpointV6) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(checkpoint)
}

/// Decodes a done segment of layout 6 (one rkyv frame).
pub fn decode_done_segment(bytes: &[u8]) -> Result<WalDoneSegment, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalDoneSegment, rancor::Error>(&aligned)
}

/// Final transfers of one chunk of a done segment's shard, checked.
pub fn done_entries(
    chunk: &[[u64; 3]],
) -> impl Iterator<Item = Result<(TransferId, crate::ledger::Done), DecodeRecordError>> + '_ {
    chunk.iter().map(|[low, high, bits]| {
        crate::ledger::Done::from_bits(*bits)
            .map(|done| (TransferId(crate::ids::from_halves([*low, *high])), done))
            .ok_or(DecodeRecordError("state"))
    })
}

impl WalShardState {
    /// The shard's state, and the final transfers added since the last capture (which it
    /// moves out of the ledger, so the next capture starts a new segment). The accounts are
    /// encoded straight from the ledger's table ([`AccountChunks`]), never copied whole.
    pub fn capture(
        ledger: &mut crate::ledger::Ledger,
        timestamp: u64,
    ) -> (WalShardState, crate::ledger::DoneLog) {
        let done = ledger.take_added_done();
        let mut accounts = AccountChunks::default();
        for account in ledger.accounts() {
            accounts.push(account, timestamp);
        }
        let mut wallets = WalletChunks::default();
        let mut scratch = Vec::new();
        for wallet in ledger.wallets() {
            wallets.push(&wallet, &mut scratch);
        }
        let head = WalShardHead {
            position: 0,
            timestamp,
            transfers: ledger.open_transfers().map(WalStoredTransfer::from).collect(),
            credits: ledger.credit_steps().map(|(id, (result, hash))| (id.0, *result as u8, *hash)).collect(),
            policy: ledger.policy().clone(),
            wallets: Vec::new(),
            outflow: ledger.outflows().map(|(id, outflow)| (id.0, *outflow)).collect(),
        };
        (WalShardState { head, accounts, wallets }, done)
    }

    /// Restores this state into `ledger`, decoding the accounts chunk by chunk (each chunk
    /// freed once decoded).
    pub fn restore_into(self, ledger: &mut crate::ledger::Ledger) -> Result<(), DecodeRecordError> {
        let WalShardState { head, accounts, wallets } = self;
        let transfers = head.transfers.iter().map(StoredTransfer::try_from).collect::<Result<Vec<_>, _>>()?;
        let credits = head
            .credits
            .iter()
            .map(|(id, result, hash)| {
                TransferResult::from_u8(*result)
                    .map(|result| (TransferId(*id), (result, *hash)))
                    .ok_or(DecodeRecordError("result"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut failure = None;
        let count = usize::try_from(accounts.count().min(accounts.count_max()))
            .map_err(|_| DecodeRecordError("account count"))?;
        let decoded = accounts.into_accounts(head.timestamp).map_while(|account| match account {
            Ok(account) => Some(account),
            Err(error) => {
                failure = Some(error);
                None
            }
        });
        ledger.restore(count, decoded, transfers, credits);
        if let Some(error) = failure {
            return Err(error);
        }
        let outflow = head.outflow.iter().map(|(id, outflow)| (AccountId(*id), *outflow)).collect();
        let count = usize::try_from(wallets.count().min(wallets.count_max()))
            .map_err(|_| DecodeRecordError("wallet count"))?
            + head.wallets.len();
        let mut failure = None;
        // Older layouts keep the wallets whole in the head; layout 8 in chunks.
        let decoded =
            head.wallets.into_iter().map(Ok).chain(wallets.into_wallets()).map_while(|wallet| match wallet {
                Ok(wallet) => Some(wallet),
                Err(error) => {
                    failure = Some(error);
                    None
                }
            });
        ledger.restore_wallets(head.policy, count, decoded, outflow);
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::{Actor, WalletCommand};

    /// One command of every kind, with ids whose two halves both matter.
    fn every_kind() -> Vec<Command> {
        let big = (7_u128 << 64) | 9;
        let transfer = Transfer::new(big, AccountId(3), AccountId(4), 250);
        vec![
            Command::CreateAccount(Account::new(
                AccountId(3),
                Currency::Azn,
                AccountKind::WALLET,
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            )),
            Command::Transfer(transfer),
            Command::Reserve(Transfer { id: TransferId(big + 1), ..transfer }),
            Command::Credit(Transfer { id: TransferId(big + 2), ..transfer }),
            Command::Finalize { id: TransferId(big + 1), result: TransferResult::ExceedsCredits },
            Command::Forget { id: TransferId(big + 2), body_hash: u64::MAX - 5 },
            Command::Expire(TransferId(big + 3)),
            Command::ReserveLinked {
                transfer: Transfer { id: TransferId(big + 4), ..transfer },
                parent: TransferId(big + 1),
            },
            Command::Wallet(Box::new(WalletCommand::SetTier {
                msisdn: 994_501_234_567,
                tier: 2,
                actor: Actor::staff(12),
            })),
            Command::Finalize { id: TransferId(1), result: TransferResult::Ok },
            // A chain's fee legs after their principals: siblings, local and held.
            Command::Transfer(Transfer { id: TransferId(big + 5), user_data: big, ..transfer }),
            Command::Transfer(Transfer {
                id: TransferId(big + 6),
                credit_account_id: AccountId::spread(4),
                amount: 7,
                code: 9,
                flags: crate::transfer::TransferFlags::LINKED,
                user_data: big,
                ..transfer
            }),
            Command::Reserve(Transfer { id: TransferId(big + 7), ..transfer }),
            Command::ReserveLinked {
                transfer: Transfer { id: TransferId(big + 8), amount: 3, ..transfer },
                parent: TransferId(big + 7),
            },
            // Same debit but another reference: a whole body.
            Command::Transfer(Transfer { id: TransferId(big + 9), user_data: 1, ..transfer }),
        ]
    }

    /// The record `commands` made in version 4's layout, as an older build wrote it.
    fn version_4(commands: &[Command]) -> rkyv::util::AlignedVec {
        let WireBatch { shard, timestamp, kinds, transfers, steps, accounts, wallets, .. } = {
            // Version 4 had no siblings: every body whole.
            let mut batch = WireBatch::with_capacity(0, 7, commands.len());
            for command in commands {
                batch.push(command, None);
            }
            batch
        };
        let old = WireBatchV4 { shard, timestamp, kinds, transfers, steps, accounts, wallets };
        encode(&WireRecordV4::Batch(old)).expect("encode")
    }

    fn commands(record: WalRecord) -> Vec<Command> {
        let WalRecord::Batch { commands, .. } = record else {
            panic!("expected a batch, got {record:?}");
        };
        commands.iter().map(|command| Command::try_from(command).expect("a valid command")).collect()
    }

    #[test]
    fn every_command_kind_round_trips_in_order() {
        let written = every_kind();
        let bytes = encode_batch(1, 42, &written).expect("encode");
        let read = decode_record(FORMAT_VERSION, &bytes).expect("decode");
        assert!(matches!(read, WalRecord::Batch { shard: 1, timestamp: 42, .. }));
        assert_eq!(commands(read), written);
    }

    /// One encoder reused for a batch of every kind, a smaller one, and the first again: each
    /// encodes to what a fresh encoding gives, with nothing of the batch before it left over.
    #[test]
    fn a_reused_encoder_writes_what_a_fresh_one_does() {
        let every = every_kind();
        let few = vec![Command::Transfer(Transfer::new(77, AccountId(1), AccountId(2), 5))];
        let mut encoder = BatchEncoder::default();
        for (shard, timestamp, batch) in [(1, 42, &every), (0, 7, &few), (1, 43, &every)] {
            let reused = encoder.encode(shard, timestamp, batch).expect("encode").to_vec();
            let fresh = encode_batch(shard, timestamp, batch).expect("encode");
            assert_eq!(reused, fresh.as_slice());
            let read = decode_record(FORMAT_VERSION, &reused).expect("decode");
            assert_eq!(&commands(read), batch);
        }
    }

    #[test]
    fn a_version_3_record_is_still_read() {
        let written = every_kind();
        let old = WalRecord::Batch {
            shard: 0,
            timestamp: 7,
            commands: written.iter().map(WalCommand::from).collect(),
        };
        let bytes = encode(&old).expect("encode");
        assert_eq!(commands(decode_record(FORMAT_VERSION_V3, &bytes).expect("decode")), written);
        // A version this build does not know is refused by number.
        assert!(matches!(decode_record(FORMAT_VERSION + 1, &bytes), Err(RecordError::Version(6))));
    }

    #[test]
    fn a_version_4_record_is_still_read() {
        let written = every_kind();
        let read = decode_record(FORMAT_VERSION_V4, &version_4(&written)).expect("decode");
        assert!(matches!(read, WalRecord::Batch { shard: 0, timestamp: 7, .. }));
        assert_eq!(commands(read), written);
    }

    #[test]
    fn a_chain_with_its_fee_leg_journals_in_under_three_quarters_of_the_old_layout() {
        // Chain n: its principal and fee leg share chain n's reference, as the domain's do.
        let principal =
            |n: u128| Transfer { user_data: n, ..Transfer::new(2 * n, AccountId(3), AccountId(4), 250) };
        let fee = |n: u128| Transfer {
            id: TransferId(2 * n + 1),
            credit_account_id: AccountId::spread(4),
            amount: 2,
            ..principal(n)
        };
        let local = |count: usize| -> Vec<Command> {
            (1..=count as u128)
                .flat_map(|n| [Command::Transfer(principal(n)), Command::Transfer(fee(n))])
                .collect()
        };
        let held = |count: usize| -> Vec<Command> {
            (1..=count as u128)
                .flat_map(|n| {
                    [
                        Command::Reserve(principal(n)),
                        Command::ReserveLinked { transfer: fee(n), parent: principal(n).id },
                    ]
                })
                .collect()
        };
        for chains in [&local as &dyn Fn(usize) -> Vec<Command>, &held] {
            let new = |count| encode_batch(0, 1, &chains(count)).expect("encode").len();
            let old = |count| version_4(&chains(count)).len();
            let (old_each, new_each) = ((old(101) - old(1)) / 100, (new(101) - new(1)) / 100);
            // A whole body is 96 bytes; a chain of two was 2 × 96 (+ 24 for the held leg's parent).
            assert!(new_each * 4 < old_each * 3, "{new_each} bytes a chain against {old_each}");
            assert_eq!(
                commands(
                    decode_record(FORMAT_VERSION, &encode_batch(0, 1, &chains(3)).expect("encode"))
                        .expect("decode")
                ),
                chains(3)
            );
        }
    }

    #[test]
    fn a_cross_shard_transfer_journals_in_under_three_fifths_of_the_old_layout() {
        let transfer = Transfer::new(5, AccountId(3), AccountId(4), 250);
        let id = transfer.id;
        let steps = [
            Command::Reserve(transfer),
            Command::Credit(transfer),
            Command::Finalize { id, result: TransferResult::Ok },
            Command::Forget { id, body_hash: 11 },
        ];
        let batch =
            |count: usize| -> Vec<Command> { steps.iter().cycle().take(count * 4).cloned().collect() };
        let old = |count: usize| {
            let record = WalRecord::Batch {
                shard: 0,
                timestamp: 1,
                commands: batch(count).iter().map(WalCommand::from).collect(),
            };
            encode(&record).expect("encode").len()
        };
        let new = |count: usize| encode_batch(0, 1, &batch(count)).expect("encode").len();
        // Per transfer, without the record's fixed part.
        let (old_each, new_each) = ((old(101) - old(1)) / 100, (new(101) - new(1)) / 100);
        assert!(new_each * 5 < old_each * 3, "{new_each} bytes a transfer against {old_each}");
    }

    fn any_account() -> impl proptest::strategy::Strategy<Value = Account> {
        use proptest::prelude::*;
        (
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            0_usize..Currency::ALL.len(),
            any::<[u64; 4]>(),
            any::<u64>(),
        )
            .prop_map(|(id, kind, flags, currency, [dp, dq, cp, cq], timestamp)| Account {
                id: AccountId(id),
                currency: Currency::ALL[currency],
                kind: AccountKind(kind),
                flags: AccountFlags(flags),
                debits_pending: dp,
                debits_posted: dq,
                credits_pending: cp,
                credits_posted: cq,
                timestamp,
            })
    }

    proptest::proptest! {
        /// Any accounts, encoded compactly at any capture time, decode to themselves.
        #[test]
        fn account_chunks_round_trip(
            accounts in proptest::collection::vec(any_account(), 0..200),
            now in proptest::prelude::any::<u64>(),
        ) {
            let mut chunks = AccountChunks::default();
            for account in &accounts {
                chunks.push(account, now);
            }
            proptest::prop_assert_eq!(chunks.count(), accounts.len() as u64);
            let decoded: Result<Vec<Account>, _> = chunks.into_accounts(now).collect();
            proptest::prop_assert_eq!(decoded, Ok(accounts));
        }

        /// Changed bytes in a chunk give accounts or an error, never a panic; a chunk cut short
        /// is an error (the count no longer matches).
        #[test]
        fn changed_account_chunks_never_panic(
            accounts in proptest::collection::vec(any_account(), 1..20),
            flips in proptest::collection::vec((0_usize..4096, 1_u8..=255), 0..8),
            cut in 1_usize..64,
        ) {
            let mut chunks = AccountChunks::default();
            for account in &accounts {
                chunks.push(account, 7);
            }
            let whole = chunks.chunks()[0].clone();
            let mut bytes = whole.clone();
            for (at, mask) in flips {
                let len = bytes.len();
                bytes[at % len] ^= mask;
            }
            let _any: Vec<_> = AccountChunks::from_chunks(vec![bytes], chunks.count()).into_accounts(7).collect();
            // The undamaged chunk cut short: a field cut in two, or whole accounts missing.
            let mut bytes = whole;
            bytes.truncate(bytes.len().saturating_sub(cut));
            let shorter: Result<Vec<Account>, _> =
                AccountChunks::from_chunks(vec![bytes], chunks.count()).into_accounts(7).collect();
            proptest::prop_assert!(shorter.is_err());
        }
    }

    fn any_wallet() -> impl proptest::strategy::Strategy<Value = crate::wallet::WalletState> {
        use crate::wallet::{OtpState, Tag, WalletState};
        use proptest::prelude::*;
        (
            any::<u64>(),
            any::<[u8; 5]>(),
            proptest::option::of(any::<[u8; 32]>()),
            any::<u64>(),
            proptest::option::of((any::<[u8; 32]>(), any::<u64>(), any::<u8>())),
            proptest::collection::vec(any::<u64>(), 0..6),
        )
            .prop_map(
                |(
                    msisdn,
                    [tier, flags, language, pin_failures, code_failures],
                    pin,
                    created_at,
                    otp,
                    otp_sent,
                )| {
                    WalletState {
                        msisdn,
                        tier,
                        flags,
                        language,
                        pin: pin.map(Tag),
                        pin_failures,
                        created_at,
                        otp: otp.map(|(tag, expires_at, attempts)| OtpState {
                            tag: Tag(tag),
                            expires_at,
                            attempts,
                        }),
                        otp_sent,
                        code_failures,
                    }
                },
            )
    }

    proptest::proptest! {
        /// Any wallets, encoded compactly, decode to themselves.
        #[test]
        fn wallet_chunks_round_trip(wallets in proptest::collection::vec(any_wallet(), 0..100)) {
            let mut chunks = WalletChunks::default();
            let mut scratch = Vec::new();
            for wallet in &wallets {
                chunks.push(wallet, &mut scratch);
            }
            proptest::prop_assert_eq!(chunks.count(), wallets.len() as u64);
            let decoded: Result<Vec<_>, _> = chunks.into_wallets().collect();
            proptest::prop_assert_eq!(decoded, Ok(wallets));
        }

        /// Changed bytes give wallets or an error, never a panic; a chunk cut short is an error.
        #[test]
        fn changed_wallet_chunks_never_panic(
            wallets in proptest::collection::vec(any_wallet(), 1..20),
            flips in proptest::collection::vec((0_usize..8192, 1_u8..=255), 0..8),
            cut in 1_usize..64,
        ) {
            let mut chunks = WalletChunks::default();
            let mut scratch = Vec::new();
            for wallet in &wallets {
                chunks.push(wallet, &mut scratch);
            }
            let whole = chunks.chunks()[0].clone();
            let mut bytes = whole.clone();
            for (at, mask) in flips {
                let len = bytes.len();
                bytes[at % len] ^= mask;
            }
            let _any: Vec<_> = WalletChunks::from_chunks(vec![bytes], chunks.count()).into_wallets().collect();
            let mut bytes = whole;
            bytes.truncate(bytes.len().saturating_sub(cut));
            let shorter: Result<Vec<_>, _> =
                WalletChunks::from_chunks(vec![bytes], chunks.count()).into_wallets().collect();
            proptest::prop_assert!(shorter.is_err());
        }
    }

    /// A wallet with a PIN and no OTP takes ~50 bytes, not the 136 of its whole record; many
    /// fill several chunks, each under its size.
    #[test]
    fn wallets_take_a_few_bytes_and_fill_chunks() {
        use crate::wallet::{Tag, WalletState};
        let mut chunks = WalletChunks::default();
        let mut scratch = Vec::new();
        for n in 0..30_000_u64 {
            let wallet = WalletState {
                msisdn: 994_500_000_000 + n,
                tier: 1,
                flags: 0,
                language: 0,
                pin: Some(Tag([n.to_le_bytes()[0]; 32])),
                pin_failures: 0,
                created_at: 1_765_000_000_000_000_000 + n,
                otp: None,
                otp_sent: Vec::new(),
                code_failures: 0,
            };
            chunks.push(&wallet, &mut scratch);
        }
        let bytes: usize = chunks.chunks().iter().map(Vec::len).sum();
        assert!(bytes < 30_000 * 56, "{bytes} bytes for 30k wallets");
        assert!(chunks.chunks().len() > 1, "30k wallets fill more than one chunk");
        assert!(chunks.chunks().iter().all(|chunk| chunk.len() <= AccountChunks::CHUNK_LEN));
        assert_eq!(chunks.into_wallets().filter(Result::is_ok).count(), 30_000);
    }

    /// Ten million accounts take ~20 bytes each, not 64; chunks stay under their size.
    #[test]
    fn accounts_take_a_few_bytes_and_fill_chunks() {
        let mut chunks = AccountChunks::default();
        let now = 1_765_000_000_000_000_000;
        for id in 1..=100_000_u64 {
            let mut account =
                Account::new(AccountId(id * 97), Currency::Azn, AccountKind::WALLET, AccountFlags::empty());
            account.credits_posted = 1_000_000 + id;
            account.debits_posted = id * 13;
            account.timestamp = now - 30_000_000_000 + id * 1000;
            chunks.push(&account, now);
        }
        let bytes: usize = chunks.chunks().iter().map(Vec::len).sum();
        assert!(bytes < 100_000 * 24, "{bytes} bytes for 100k accounts");
        assert!(chunks.chunks().len() > 1, "100k accounts fill more than one chunk");
        assert!(chunks.chunks().iter().all(|chunk| chunk.len() <= AccountChunks::CHUNK_LEN));
        let decoded = chunks.into_accounts(now).filter(Result::is_ok).count();
        assert_eq!(decoded, 100_000);
    }

    proptest::proptest! {
        /// Bytes changed anywhere in a record (the frame's checksum passed, say, by chance) give
        /// a record or an error, never a panic.
        #[test]
        fn changed_bytes_never_panic(flips in proptest::collection::vec((0_usize..4096, 1_u8..=255), 1..8)) {
            let mut bytes = encode_batch(1, 42, &every_kind()).expect("encode").to_vec();
            for (at, mask) in flips {
                let len = bytes.len();
                bytes[at % len] ^= mask;
            }
            if let Ok(WalRecord::Batch { commands, .. }) = decode_record(FORMAT_VERSION, &bytes) {
                for command in &commands {
                    let _checked = Command::try_from(command);
                }
            }
        }
    }

    #[test]
    fn a_damaged_command_list_is_an_error() {
        let damaged = |edit: &dyn Fn(&mut WireBatch)| {
            let mut batch = WireBatch::from_commands(0, 1, &every_kind());
            edit(&mut batch);
            let bytes = encode(&WireRecord::Batch(batch)).expect("encode");
            decode_record(FORMAT_VERSION, &bytes)
        };
        assert!(damaged(&|_| {}).is_ok());
        assert!(matches!(
            damaged(&|b| b.kinds.push(200)),
            Err(RecordError::Value(DecodeRecordError("command kind")))
        ));
        assert!(matches!(damaged(&|b| b.kinds.push(KIND_FINALIZE)), Err(RecordError::Value(_))));
        assert!(matches!(
            damaged(&|b| {
                b.transfers.pop();
            }),
            Err(RecordError::Value(_))
        ));
        assert!(matches!(damaged(&|b| b.steps.push([0, 0, 0])), Err(RecordError::Value(_))));
        assert!(matches!(damaged(&|b| b.steps[0][2] = 300), Err(RecordError::Value(_))));
        assert!(matches!(
            damaged(&|b| {
                b.siblings.pop();
            }),
            Err(RecordError::Value(_))
        ));
        // A sibling with no transfer body before it has nothing to share.
        assert!(matches!(
            damaged(&|b| b.kinds.insert(0, KIND_TRANSFER_SIBLING)),
            Err(RecordError::Value(DecodeRecordError("sibling without a transfer before it")))
        ));
        assert!(decode_record(FORMAT_VERSION, &[0_u8; 3]).is_err());
    }
}
