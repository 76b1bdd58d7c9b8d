//! The journal's record format: the only place that knows rkyv. Domain types convert to and from
//! these wire structs here, so the ledger derives nothing about storage.

use rkyv::rancor;

use crate::account::{Account, AccountFlags, AccountKind};
use crate::ids::{AccountId, TransferId};
use crate::ledger::{Command, StoredTransfer, TransferState};
use crate::money::Currency;
use crate::transfer::{Transfer, TransferFlags, TransferResult};

/// Bumped whenever the layout below changes; a reader refuses versions it does not know.
pub const FORMAT_VERSION: u8 = 3;
/// The layout of checkpoints ([`WalCheckpoint`]), versioned apart from the journal's records.
/// Version 3 (the journal's, which checkpoints shared until the done list became plain `u64`s)
/// is an older layout: recovery passes over such a checkpoint and replays the journal.
pub const CHECKPOINT_VERSION: u8 = 4;

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

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WalRecord {
    /// Opens every segment, so that any segment says which layout of shards it belongs to.
    Meta { shard_count: u16 },
    /// The commands one shard applied in one batch, with the batch's time (ns since the epoch).
    Batch { shard: u16, timestamp: u64, commands: Vec<WalCommand> },
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalStoredTransfer {
    transfer: WalTransfer,
    timestamp: u64,
    state: u8,
    expires_at: u64,
    parent: u128,
}

/// One shard's whole state in a checkpoint.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalShardState {
    /// The journal position after the last record of this shard that the state includes.
    pub position: u64,
    /// The time of the last batch applied (ns), so the shard's clock never runs backwards.
    pub timestamp: u64,
    pub accounts: Vec<WalAccount>,
    /// Open holds and cross-shard transfers in flight, whole.
    pub transfers: Vec<WalStoredTransfer>,
    /// Final transfers: the id's low and high halves and the `ledger::Done` bits (body hash
    /// and state). Plain `u64`s, without the padding of a `(u128, u64)`, so that rkyv copies
    /// the millions of them in one piece instead of one by one.
    pub done: Vec<[u64; 3]>,
    pub credits: Vec<(u128, u8, u64)>,
    pub policy: crate::wallet::Policy,
    pub wallets: Vec<crate::wallet::WalletState>,
    pub outflow: Vec<(u64, crate::wallet::Outflow)>,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalCheckpoint {
    pub shard_count: u16,
    pub shards: Vec<WalShardState>,
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

/// Serialises a checkpoint into a buffer sized for it up front: grown by doubling, a buffer of
/// hundreds of megabytes is copied and page-faulted again at every step.
pub fn encode_checkpoint(checkpoint: &WalCheckpoint) -> Result<rkyv::util::AlignedVec, rancor::Error> {
    use std::mem::size_of;
    let len: usize = checkpoint
        .shards
        .iter()
        .map(|state| {
            state.accounts.len() * size_of::<ArchivedWalAccount>()
                + state.transfers.len() * size_of::<ArchivedWalStoredTransfer>()
                + state.done.len() * size_of::<rkyv::Archived<[u64; 3]>>()
                + state.credits.len() * size_of::<rkyv::Archived<(u128, u8, u64)>>()
                + state.wallets.len() * size_of::<rkyv::Archived<crate::wallet::WalletState>>()
                + state.outflow.len() * size_of::<rkyv::Archived<(u64, crate::wallet::Outflow)>>()
        })
        .sum();
    // Room for the policy, the headers and what the estimate misses.
    let buffer = rkyv::util::AlignedVec::with_capacity(len + len / 64 + 1024 * 1024);
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(checkpoint, buffer)
}

/// Validates and deserialises a record from bytes (copied to an aligned buffer first).
pub fn decode_record(bytes: &[u8]) -> Result<WalRecord, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalRecord, rancor::Error>(&aligned)
}

pub fn decode_checkpoint(bytes: &[u8]) -> Result<WalCheckpoint, rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<WalCheckpoint, rancor::Error>(&aligned)
}

impl WalShardState {
    pub fn capture(ledger: &crate::ledger::Ledger, timestamp: u64) -> WalShardState {
        WalShardState {
            position: 0,
            timestamp,
            accounts: ledger.accounts().map(WalAccount::from).collect(),
            transfers: ledger.open_transfers().map(WalStoredTransfer::from).collect(),
            done: ledger
                .done_transfers()
                .map(|(id, done)| {
                    let [low, high] = crate::ids::halves(id.0);
                    [low, high, done.bits()]
                })
                .collect(),
            credits: ledger.credit_steps().map(|(id, (result, hash))| (id.0, *result as u8, *hash)).collect(),
            policy: ledger.policy().clone(),
            wallets: ledger.wallets().cloned().collect(),
            outflow: ledger.outflows().map(|(id, outflow)| (id.0, *outflow)).collect(),
        }
    }

    pub fn restore_into(&self, ledger: &mut crate::ledger::Ledger) -> Result<(), DecodeRecordError> {
        let accounts = self.accounts.iter().map(Account::try_from).collect::<Result<Vec<_>, _>>()?;
        let transfers = self.transfers.iter().map(StoredTransfer::try_from).collect::<Result<Vec<_>, _>>()?;
        let credits = self
            .credits
            .iter()
            .map(|(id, result, hash)| {
                TransferResult::from_u8(*result)
                    .map(|result| (TransferId(*id), (result, *hash)))
                    .ok_or(DecodeRecordError("result"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let done = self
            .done
            .iter()
            .map(|[low, high, bits]| {
                crate::ledger::Done::from_bits(*bits)
                    .map(|done| (TransferId(crate::ids::from_halves([*low, *high])), done))
                    .ok_or(DecodeRecordError("state"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ledger.restore(accounts, transfers, done, credits);
        let outflow = self.outflow.iter().map(|(id, outflow)| (AccountId(*id), *outflow)).collect();
        ledger.restore_wallets(self.policy.clone(), self.wallets.clone(), outflow);
        Ok(())
    }
}
