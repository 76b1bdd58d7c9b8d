//! Qepik's end-to-end tests, one binary (matklad's advice: one link step, shared helpers).
//! Slow variants run with `QEPIK_SLOW_TESTS=1`; randomised tests print their `QEPIK_SEED`.
//!
//! - `engine`: the engine through its public handle: transfers, idempotency under concurrency,
//!   overdraft races across shards, hold expiry with a manual clock, restart, the views, and
//!   regression tests for the bugs the other modules found.
//! - `http`: the `qepik` server in-process on an OS-chosen port, over real HTTP: authentication,
//!   idempotency, input errors, customer, ATM, staff and admin flows, a restart.
//! - `admin_settings`: administrators change tiers, tariffs and commissions over HTTP: in force
//!   for the next operation, kept across restarts, overridden only by an edited configuration
//!   file; refusals for other roles and bad input.
//! - `history`: the views' history store: several pages per account read forwards, backwards,
//!   from both ends and in time windows; restarts from the snapshot; a lost index, a damaged
//!   snapshot and a damaged log line.
//! - `model`: proptest operations on the engine and on a plain map model, restarts included.
//! - `crash`: a child process killed with SIGKILL under load, five times over one directory;
//!   what it was told must hold after each recovery.
//! - `torn_tail`: journals cut at every offset of their last records, and bit flips: a torn tail
//!   is cut off, damage before valid records refuses to open.
//! - `cash`: cash-by-code (hold, redemption, guessing, expiry, cancel, restart) and reversals.
//! - `wallet`: the wallet domain on a real engine: fees, limits, PINs, OTPs, restarts, secrets.
//! - `statements`: statements from the views: running balances against the ledger (holds, expiry,
//!   cross-shard chains), stable paging under appends, CSV and JSON exports, spending by
//!   category, restarts and reindex; the notification outbox (OTPs, money notices, blocks,
//!   acknowledgements across restarts, nothing re-sent by a reindex).

mod admin_settings;
mod cash;
mod crash;
mod engine;
mod history;
mod http;
mod model;
mod statements;
mod torn_tail;
mod ussd;
mod wallet;
