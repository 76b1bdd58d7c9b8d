//! The Qepik engine: a sharded double-entry ledger with a durable journal.
//!
//! Start with [`Engine`] (the handle every channel uses), then [`ledger::Ledger`] (the sans-IO
//! state machine of one shard), then [`journal`] (the write-ahead log and its group commit).
//! Money is [`money::Amount`]: integer minor units, never floats.
//!
//! Architecture invariant: nothing in [`ledger`], [`money`], [`account`], [`transfer`] or [`ids`]
//! does IO, reads a clock or spawns a thread; the shells ([`shard`], [`engine`], [`journal`],
//! [`views`], [`checkpoint`]) do.

pub mod account;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod domain;
mod engine;
pub mod ids;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod memory;
pub mod money;
pub mod msisdn;
pub mod outbox;
pub mod reply;
pub mod secret;
pub mod shard;
pub mod statement;
pub mod tariff;
pub mod transfer;
pub mod views;
pub mod wallet;

pub use account::{Account, AccountFlags, AccountKind, CreateAccountResult};
pub use domain::{Domain, DomainConfig, OpError, Rules};
pub use engine::{Engine, EngineConfig, EngineError, RecoveryReport};
pub use ids::{AccountId, ShardId, TransferId};
pub use ledger::{Ledger, StoredTransfer, Totals, TransferState, TransferStatus};
pub use money::{Amount, Currency};
pub use transfer::{Transfer, TransferFlags, TransferResult};
