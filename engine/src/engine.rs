//! The [`Engine`] handle: the only way money moves. It opens (recovers) the data directory,
//! starts the shard threads and the journal writer, routes submissions to shards, and answers
//! lookups. Clone it freely; the engine stops when the last clone is dropped or on [`Engine::shutdown`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded, unbounded};
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::account::{Account, CreateAccountResult};
use crate::checkpoint::{self, CheckpointError};
use crate::clock::{Clock, SystemClock};
use crate::ids::{AccountId, ShardId, TransferId, home_shard, route};
use crate::journal::record::{self, WalCheckpoint, WalDoneSegment, WalRecord};
use crate::journal::{self, JournalBatch, JournalError, JournalState, TailRepair, WriterConfig};
use crate::ledger::{Command, Ledger, ReplayError, Totals, TransferStatus, resolve_in_flight};
use crate::limits;
use crate::money::Currency;
use crate::reply::{Completion, Gather, Waiter};
use crate::shard::{Shard, ShardCapture, ShardMessage, ShardStats, encode_batch};
use crate::transfer::{Transfer, TransferResult};
use crate::views::{Views, ViewsError};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Holds `journal/`, `checkpoints/` and `views/`.
    pub data_dir: PathBuf,
    pub shard_count: u16,
    /// Messages one shard drains into one batch at most.
    pub batch_len_max: usize,
    pub segment_len_max: u64,
    /// Bytes one group commit writes at most.
    pub group_len_max: usize,
    /// Whether to run the views (the transfer index, account history, notification outbox).
    pub views: bool,
    /// How often the views save the snapshot they restart from after a crash.
    pub views_snapshot_every: std::time::Duration,
    /// A checkpoint is written once the journal has grown this much since the last one
    /// (0: only when asked), bounding how much recovery replays.
    pub checkpoint_every_bytes: u64,
    /// How fast a checkpoint's files are written (bytes/s): slow enough to leave the disk to
    /// the journal's syncs. Lifted at shutdown.
    pub checkpoint_write_bytes_per_s: u64,
    pub clock: Arc<dyn Clock>,
}

impl EngineConfig {
    /// Defaults for `data_dir`: one shard per core, views on, the system clock.
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineConfig {
            data_dir: data_dir.into(),
            shard_count: u16::try_from(cores.clamp(1, limits::SHARD_COUNT_MAX)).unwrap_or(1),
            batch_len_max: limits::SHARD_BATCH_LEN_MAX,
            segment_len_max: limits::SEGMENT_LEN_MAX,
            group_len_max: limits::GROUP_LEN_MAX,
            views: true,
            views_snapshot_every: crate::views::SNAPSHOT_EVERY,
            checkpoint_every_bytes: limits::CHECKPOINT_EVERY_BYTES,
            checkpoint_write_bytes_per_s: limits::CHECKPOINT_WRITE_BYTES_PER_S,
            clock: Arc::new(SystemClock),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Views(#[from] ViewsError),
    #[error("journal replay failed at position {position}: {source}")]
    Replay { position: u64, source: ReplayError },
    #[error("journal record at position {position} is invalid: {reason}")]
    InvalidRecord { position: u64, reason: String },
    #[error("double-entry invariant broken for {currency}: {totals:?}")]
    Unbalanced { currency: Currency, totals: Totals },
    #[error("configuration error: {0}")]
    Config(String),
    #[error("the engine has stopped (journal failure or shutdown)")]
    Stopped,
    #[error("a submission holds {len} transfers; at most {max} are accepted")]
    SubmissionTooLarge { len: usize, max: usize },
    #[error("data directory {0} is in use by another engine")]
    Locked(PathBuf),
}

/// What recovery found and did, for logs and the load tool.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub checkpoint_loaded: bool,
    pub records_replayed: u64,
    pub commands_replayed: u64,
    pub torn_bytes: u64,
    pub in_flight_resolved: usize,
    pub journal_position: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Sender<ShardMessage>>,
    clock: Arc<dyn Clock>,
    shard_count: u16,
    journal: Arc<JournalState>,
    stats: Vec<Arc<ShardStats>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    writer: Mutex<Option<JoinHandle<Result<(), JournalError>>>>,
    views: Option<Views>,
    checkpoint_dir: PathBuf,
    stopped: AtomicBool,
    recovery: RecoveryReport,
    /// An exclusive lock on `data_dir/LOCK`, released at shutdown: two engines appending to one
    /// journal would corrupt it.
    lock: Mutex<Option<std::fs::File>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    /// Where the chain of done segments stands; held through a whole checkpoint, so that
    /// checkpoints are taken one at a time.
    chain: Mutex<Chain>,
    checkpoint_write_bytes_per_s: u64,
}

/// The done segments the newest checkpoint lists, and the final transfers the shards have
/// handed over since that a failed checkpoint could not write (the next one writes them).
#[derive(Debug)]
struct Chain {
    segments: Vec<u64>,
    pending: Vec<crate::ledger::DoneLog>,
}

#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens the data directory: loads the latest checkpoint, replays the journal after it,
    /// finishes transfers caught in flight, verifies that debits equal credits, then starts.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        let started = std::time::Instant::now();
        if config.shard_count == 0 || usize::from(config.shard_count) > limits::SHARD_COUNT_MAX {
            return Err(EngineError::Config(format!("shard count must be 1..={}", limits::SHARD_COUNT_MAX)));
        }
        let lock = lock_data_dir(&config.data_dir)?;
        let journal_dir = config.data_dir.join("journal");
        let checkpoint_dir = config.data_dir.join("checkpoints");
        let (mut ledgers, mut report, last_now, segments) = recover(&config, &journal_dir, &checkpoint_dir)?;

        let state = JournalState::new(report.journal_position);
        let (journal_tx, journal_rx) =
            bounded::<JournalBatch<Vec<Completion>>>(limits::JOURNAL_QUEUE_LEN_MAX);
        let writer = journal::spawn_writer(
            WriterConfig {
                dir: journal_dir.clone(),
                shard_count: config.shard_count,
                segment_len_max: config.segment_len_max,
                group_len_max: config.group_len_max,
                linger: journal::LINGER_MAX,
            },
            report.journal_position,
            journal_rx,
            state.clone(),
            |position, completions: Vec<Completion>| {
                for completion in completions {
                    completion.run(position);
                }
            },
        )?;

        // Recovery's own decisions are journaled before anything else runs. Debits equal
        // credits only once they are made: a cross-shard transfer caught between its credit and
        // its finalize has its credit posted and its debit still pending.
        let (finalizes, forgets) = resolve_in_flight(&mut ledgers);
        check_balanced(&ledgers)?;
        report.in_flight_resolved = finalizes.iter().chain(&forgets).map(Vec::len).sum();
        // Every finalize is durable before any forget is written.
        for phase in [finalizes, forgets] {
            let (signal_tx, signal_rx) = bounded(phase.len());
            let mut waiting = 0;
            let mut encoder = crate::journal::record::BatchEncoder::default();
            for (shard, log) in phase.iter().enumerate() {
                if log.is_empty() {
                    continue;
                }
                let mut frames = Vec::new();
                encode_batch(&mut encoder, shard_id(shard), last_now[shard], log, &mut frames);
                journal_tx
                    .send(JournalBatch {
                        frames,
                        completion: vec![Completion::Signal(signal_tx.clone())],
                        credits_due: 0,
                    })
                    .map_err(|_| EngineError::Stopped)?;
                waiting += 1;
            }
            // With our sender gone, a writer that dies drops the rest and the wait ends.
            drop(signal_tx);
            for _ in 0..waiting {
                signal_rx.recv().map_err(|_| EngineError::Stopped)?;
            }
        }

        let views = if config.views {
            Some(Views::open_with(
                &config.data_dir.join("views"),
                &journal_dir,
                state.clone(),
                config.views_snapshot_every,
            )?)
        } else {
            None
        };

        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..config.shard_count).map(|_| unbounded::<ShardMessage>()).unzip();
        let mut threads = Vec::new();
        let mut stats = Vec::new();
        for (index, (ledger, inbox)) in ledgers.into_iter().zip(receivers).enumerate() {
            let shard_stats = Arc::new(ShardStats::default());
            stats.push(shard_stats.clone());
            let shard = Shard {
                ledger,
                inbox,
                peers: senders.clone(),
                journal: journal_tx.clone(),
                clock: config.clock.clone(),
                batch_len_max: config.batch_len_max,
                last_now: last_now[index],
                stats: shard_stats,
            };
            let journal_state = state.clone();
            let handle = std::thread::Builder::new()
                .name(format!("qepik-shard-{index}"))
                .spawn(move || {
                    // A panicking shard is a broken invariant: stop the whole engine rather than
                    // run on with one shard gone and other shards' steps waiting on it.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run()));
                    if outcome.is_err() {
                        tracing::error!(shard = index, "shard panicked; the engine stops");
                        journal_state.mark_failed();
                    }
                })
                .map_err(|error| EngineError::Config(format!("cannot start a shard thread: {error}")))?;
            threads.push(handle);
        }
        drop(journal_tx);
        report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(?report, "engine open");
        let checkpoint_from = report.journal_position;
        let engine = Engine {
            inner: Arc::new(Inner {
                shards: senders,
                clock: config.clock.clone(),
                shard_count: config.shard_count,
                journal: state,
                stats,
                threads: Mutex::new(threads),
                writer: Mutex::new(Some(writer)),
                views,
                checkpoint_dir,
                stopped: AtomicBool::new(false),
                recovery: report,
                lock: Mutex::new(Some(lock)),
                checkpointer: Mutex::new(None),
                chain: Mutex::new(Chain {
                    segments,
                    pending: vec![Vec::new(); usize::from(config.shard_count)],
                }),
                checkpoint_write_bytes_per_s: config.checkpoint_write_bytes_per_s,
            }),
        };
        if config.checkpoint_every_bytes > 0 {
            let handle = spawn_checkpointer(
                Arc::downgrade(&engine.inner),
                checkpoint_from,
                config.checkpoint_every_bytes,
            )?;
            *engine.inner.checkpointer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        }
        Ok(engine)
    }

    pub fn shard_count(&self) -> u16 {
        self.inner.shard_count
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    pub fn journal(&self) -> &JournalState {
        &self.inner.journal
    }

    pub fn views(&self) -> Option<&Views> {
        self.inner.views.as_ref()
    }

    /// Messages and batches handled per shard so far: (batches, messages).
    pub fn shard_stats(&self) -> Vec<(u64, u64)> {
        self.inner
            .stats
            .iter()
            .map(|s| (s.batches.load(Ordering::Relaxed), s.messages.load(Ordering::Relaxed)))
            .collect()
    }

    /// Messages waiting in each shard's inbox.
    pub fn shard_queue_depths(&self) -> Vec<usize> {
        self.inner.shards.iter().map(|s| s.len()).collect()
    }

    fn send(&self, shard: ShardId, message: ShardMessage) -> Result<(), EngineError> {
        if self.inner.journal.failed() {
            return Err(EngineError::Stopped);
        }
        self.inner.shards[usize::from(shard.0)].send(message).map_err(|_| EngineError::Stopped)
    }

    /// Creates accounts; a spread account is created on every shard. One result per account.
    pub async fn create_accounts(
        &self,
        accounts: Vec<Account>,
    ) -> Result<Vec<CreateAccountResult>, EngineError> {
        let pending = self.fan_out(
            &accounts,
            |a| a.id,
            |accounts, reply| ShardMessage::CreateAccounts { accounts, reply },
        )?;
        let mut results = vec![CreateAccountResult::Ok; accounts.len()];
        for (indexes, rx) in pending {
            let answers = rx.await.map_err(|_| EngineError::Stopped)?;
            for (index, answer) in indexes.into_iter().zip(answers) {
                // A spread account answers from every shard; the worst answer wins.
                if answer != CreateAccountResult::Ok {
                    results[index] = answer;
                }
            }
        }
        Ok(results)
    }

    /// Sends each item to the shard that owns its account (a spread account's item to every
    /// shard). Returns, per shard asked, the indexes of its items and the receiver of its answers.
    #[allow(clippy::type_complexity)]
    fn fan_out<T: Copy, R>(
        &self,
        items: &[T],
        account: impl Fn(&T) -> AccountId,
        message: impl Fn(Vec<T>, oneshot::Sender<Vec<R>>) -> ShardMessage,
    ) -> Result<Vec<(Vec<usize>, oneshot::Receiver<Vec<R>>)>, EngineError> {
        let n = self.inner.shard_count;
        let mut per_shard: Vec<(Vec<usize>, Vec<T>)> = (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        for (index, item) in items.iter().enumerate() {
            let id = account(item);
            let shards = if id.is_spread() {
                0..usize::from(n)
            } else {
                let home = usize::from(home_shard(id, n).0);
                home..home + 1
            };
            for shard in shards {
                per_shard[shard].0.push(index);
                per_shard[shard].1.push(*item);
            }
        }
        let mut pending = Vec::new();
        for (shard, (indexes, items)) in per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.send(shard_id(shard), message(items, tx))?;
            pending.push((indexes, rx));
        }
        Ok(pending)
    }

    /// Submits transfers; one result per transfer, each given only once its records are durable.
    /// A linked chain goes whole to the shard of its first transfer.
    pub async fn submit(&self, transfers: Vec<Transfer>) -> Result<Vec<TransferResult>, EngineError> {
        let rx = self.submit_inner(transfers)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// [`Engine::submit`] for callers on plain threads (the load tool, tests).
    pub fn submit_blocking(&self, transfers: Vec<Transfer>) -> Result<Vec<TransferResult>, EngineError> {
        let rx = self.submit_inner(transfers)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)
    }

    fn submit_inner(
        &self,
        transfers: Vec<Transfer>,
    ) -> Result<oneshot::Receiver<Vec<TransferResult>>, EngineError> {
        if transfers.len() > limits::SUBMIT_LEN_MAX {
            return Err(EngineError::SubmissionTooLarge {
                len: transfers.len(),
                max: limits::SUBMIT_LEN_MAX,
            });
        }
        let (gather, rx) = Gather::new(transfers.len());
        let n = self.inner.shard_count;
        if n == 1 {
            let waiters = (0..transfers.len())
                .map(|index| Waiter {
                    gather: gather.clone(),
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                })
                .collect();
            self.send(ShardId(0), ShardMessage::Submit { transfers, waiters, authorization: None })?;
            return Ok(rx);
        }
        let mut per_shard: Vec<(Vec<Transfer>, Vec<Waiter>)> =
            (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        let mut chain_shard: Option<ShardId> = None;
        for (index, transfer) in transfers.into_iter().enumerate() {
            let shard = chain_shard.unwrap_or_else(|| {
                route(transfer.debit_account_id, transfer.credit_account_id, n).coordinator()
            });
            chain_shard = transfer.flags.contains(crate::transfer::TransferFlags::LINKED).then_some(shard);
            let slot = &mut per_shard[usize::from(shard.0)];
            slot.0.push(transfer);
            slot.1.push(Waiter { gather: gather.clone(), index: u32::try_from(index).unwrap_or(u32::MAX) });
        }
        for (shard, (transfers, waiters)) in per_shard.into_iter().enumerate() {
            if !transfers.is_empty() {
                self.send(shard_id(shard), ShardMessage::Submit { transfers, waiters, authorization: None })?;
            }
        }
        Ok(rx)
    }

    /// Submits the transfers of one customer operation to the shard of wallet `msisdn`, which
    /// first checks `authorization` (PIN, OTP, step-up) and then applies them in the same step.
    /// The first transfer must debit an account of that shard (the wallet, usually).
    pub async fn submit_authorized(
        &self,
        authorization: crate::wallet::Authorization,
        transfers: Vec<Transfer>,
    ) -> Result<Vec<TransferResult>, EngineError> {
        if transfers.len() > limits::SUBMIT_LEN_MAX {
            return Err(EngineError::SubmissionTooLarge {
                len: transfers.len(),
                max: limits::SUBMIT_LEN_MAX,
            });
        }
        let (gather, rx) = Gather::new(transfers.len());
        let waiters = (0..transfers.len())
            .map(|index| Waiter { gather: gather.clone(), index: u32::try_from(index).unwrap_or(u32::MAX) })
            .collect();
        let shard = crate::ids::wallet_shard(authorization.msisdn, self.inner.shard_count);
        let authorization = Some(crate::wallet::Authority::Customer(authorization));
        self.send(shard, ShardMessage::Submit { transfers, waiters, authorization })?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Submits one operation that staff authorised (a reversal): the staff member is journaled
    /// with the transfers, in the same record. All of them go to the shard of the first, as one
    /// chain would.
    pub async fn submit_as_staff(
        &self,
        actor: crate::wallet::Actor,
        transfers: Vec<Transfer>,
    ) -> Result<Vec<TransferResult>, EngineError> {
        if transfers.len() > limits::SUBMIT_LEN_MAX {
            return Err(EngineError::SubmissionTooLarge {
                len: transfers.len(),
                max: limits::SUBMIT_LEN_MAX,
            });
        }
        let Some(first) = transfers.first() else {
            return Ok(Vec::new());
        };
        let n = self.inner.shard_count;
        let shard = route(first.debit_account_id, first.credit_account_id, n).coordinator();
        let (gather, rx) = Gather::new(transfers.len());
        let waiters = (0..transfers.len())
            .map(|index| Waiter { gather: gather.clone(), index: u32::try_from(index).unwrap_or(u32::MAX) })
            .collect();
        let authorization = Some(crate::wallet::Authority::Staff(actor));
        self.send(shard, ShardMessage::Submit { transfers, waiters, authorization })?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// The engine's clock, in nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> u64 {
        self.inner.clock.now_ns()
    }

    /// Sends a request about one wallet to its shard; changes are journaled before the answer.
    pub async fn wallet_request(
        &self,
        request: crate::wallet::WalletRequest,
    ) -> Result<crate::wallet::WalletReply, EngineError> {
        let (tx, rx) = oneshot::channel();
        let shard = crate::ids::wallet_shard(request.msisdn(), self.inner.shard_count);
        self.send(shard, ShardMessage::Wallet { request, reply: tx })?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Many wallet requests at once (bulk registration, a migration): one message per shard.
    /// Answers in the order asked.
    pub async fn wallet_requests(
        &self,
        requests: Vec<crate::wallet::WalletRequest>,
    ) -> Result<Vec<crate::wallet::WalletReply>, EngineError> {
        let max = limits::SUBMIT_LEN_MAX / (1 + Currency::ALL.len());
        if requests.len() > max {
            return Err(EngineError::SubmissionTooLarge { len: requests.len(), max });
        }
        let n = self.inner.shard_count;
        let len = requests.len();
        let mut per_shard: Vec<(Vec<usize>, Vec<crate::wallet::WalletRequest>)> =
            (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        for (index, request) in requests.into_iter().enumerate() {
            let slot = &mut per_shard[usize::from(crate::ids::wallet_shard(request.msisdn(), n).0)];
            slot.0.push(index);
            slot.1.push(request);
        }
        let mut pending = Vec::new();
        for (shard, (indexes, requests)) in per_shard.into_iter().enumerate() {
            if requests.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.send(shard_id(shard), ShardMessage::Wallets { requests, reply: tx })?;
            pending.push((indexes, rx));
        }
        let mut answers = vec![crate::wallet::WalletReply::Done; len];
        for (indexes, rx) in pending {
            for (index, answer) in indexes.into_iter().zip(rx.await.map_err(|_| EngineError::Stopped)?) {
                answers[index] = answer;
            }
        }
        Ok(answers)
    }

    /// Makes `policy` every shard's policy, journaling it where it differs.
    pub async fn set_policy(&self, policy: crate::wallet::Policy) -> Result<(), EngineError> {
        let mut pending = Vec::new();
        for shard in 0..self.inner.shard_count {
            let (tx, rx) = oneshot::channel();
            self.send(
                ShardId(shard),
                ShardMessage::SetPolicy { policy: Box::new(policy.clone()), reply: tx },
            )?;
            pending.push(rx);
        }
        for rx in pending {
            rx.await.map_err(|_| EngineError::Stopped)?;
        }
        Ok(())
    }

    /// The accounts with these ids (a spread account summed over its shards), as of the last
    /// durable batch of each shard.
    pub async fn lookup_accounts(&self, ids: &[AccountId]) -> Result<Vec<Option<Account>>, EngineError> {
        let pending =
            self.fan_out(ids, |id| *id, |ids, reply| ShardMessage::LookupAccounts { ids, reply })?;
        let mut found: Vec<Option<Account>> = vec![None; ids.len()];
        for (indexes, rx) in pending {
            let answers = rx.await.map_err(|_| EngineError::Stopped)?;
            for (index, answer) in indexes.into_iter().zip(answers) {
                match (&mut found[index], answer) {
                    (Some(sum), Some(part)) => sum.absorb(&part),
                    (slot @ None, Some(part)) => *slot = Some(part),
                    (_, None) => {}
                }
            }
        }
        Ok(found)
    }

    /// Returns once every step already queued at any shard is durable: each shard answers an
    /// empty lookup after the batch that holds the steps before it. A cross-shard transfer is
    /// answered when its credit is durable, while its finalize (the debit's posting, queued at
    /// the debit shard before the answer left) may still be on its way; a reader that waits for
    /// the views to reach [`JournalState::durable`] after `settle` sees the transfers it was
    /// answered for whole, on both sides.
    pub async fn settle(&self) -> Result<(), EngineError> {
        let mut pending = Vec::new();
        for shard in 0..self.inner.shard_count {
            let (tx, rx) = oneshot::channel();
            self.send(ShardId(shard), ShardMessage::LookupAccounts { ids: Vec::new(), reply: tx })?;
            pending.push(rx);
        }
        for rx in pending {
            rx.await.map_err(|_| EngineError::Stopped)?;
        }
        Ok(())
    }

    /// Where the transfers with these ids stand (with the body while a hold is open). Each is
    /// looked up on every shard, since a transfer's id says nothing of where it lives. The body
    /// of a final transfer is in the views' transfer index.
    pub async fn lookup_transfers(
        &self,
        ids: &[TransferId],
    ) -> Result<Vec<Option<TransferStatus>>, EngineError> {
        let mut found: Vec<Option<TransferStatus>> = vec![None; ids.len()];
        let mut pending = Vec::new();
        for shard in 0..self.inner.shard_count {
            let (tx, rx) = oneshot::channel();
            self.send(ShardId(shard), ShardMessage::LookupTransfers { ids: ids.to_vec(), reply: tx })?;
            pending.push(rx);
        }
        for rx in pending {
            let answers = rx.await.map_err(|_| EngineError::Stopped)?;
            for (slot, answer) in found.iter_mut().zip(answers) {
                if slot.is_none() {
                    *slot = answer;
                }
            }
        }
        Ok(found)
    }

    /// Sums of all accounts per currency: the double-entry check. Exact once no cross-shard
    /// transfer is in flight (during one, the debit is pending while the credit is posted).
    /// Blocking: from async code, call it through `spawn_blocking`.
    pub fn totals(&self) -> Result<FxHashMap<Currency, Totals>, EngineError> {
        let mut totals: FxHashMap<Currency, Totals> = FxHashMap::default();
        for ((currency, _), sums) in self.totals_by_kind()? {
            totals.entry(currency).or_default().merge(&sums);
        }
        Ok(totals)
    }

    /// Sums per currency and account kind (the trial balance). Blocking, like [`Engine::totals`].
    pub fn totals_by_kind(
        &self,
    ) -> Result<FxHashMap<(Currency, crate::account::AccountKind), Totals>, EngineError> {
        // Each shard sums its own accounts; only the sums cross threads.
        let mut pending = Vec::new();
        for shard in 0..self.inner.shard_count {
            let (tx, rx) = oneshot::channel();
            self.send(ShardId(shard), ShardMessage::Totals { reply: tx })?;
            pending.push(rx);
        }
        let mut totals: FxHashMap<(Currency, crate::account::AccountKind), Totals> = FxHashMap::default();
        for rx in pending {
            let part = crate::reply::block_on(rx).map_err(|_| EngineError::Stopped)?;
            for (key, sums) in part {
                totals.entry(key).or_default().merge(&sums);
            }
        }
        Ok(totals)
    }

    fn capture(&self) -> Result<Vec<ShardCapture>, EngineError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for shard in 0..self.inner.shard_count {
            self.send(ShardId(shard), ShardMessage::Checkpoint { reply: tx.clone() })?;
        }
        drop(tx);
        let mut states = Vec::new();
        // The shards answer within one batch each; waiting here briefly blocks the caller only.
        while let Ok(part) = rx.recv() {
            states.push(part);
        }
        if states.len() != usize::from(self.inner.shard_count) {
            return Err(EngineError::Stopped);
        }
        states.sort_by_key(|(shard, _, _)| *shard);
        Ok(states)
    }

    /// Writes a checkpoint of every shard; recovery then replays only the journal after it.
    /// Blocks for as long as the shards take to copy their state (the final transfers they
    /// only hand over) and the files take to write.
    pub fn checkpoint(&self) -> Result<PathBuf, EngineError> {
        let mut chain = self.inner.chain.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let captured = self.capture()?;
        let captured_ms = started.elapsed().as_millis();
        let mut shards = Vec::with_capacity(captured.len());
        for ((_, state, done), pending) in captured.into_iter().zip(chain.pending.iter_mut()) {
            pending.extend(done);
            shards.push(state);
        }
        let mut checkpoint =
            WalCheckpoint { shard_count: self.inner.shard_count, shards, segments: chain.segments.clone() };
        let empty = vec![Vec::new(); usize::from(self.inner.shard_count)];
        let mut segment =
            WalDoneSegment { sequence: 0, shards: std::mem::replace(&mut chain.pending, empty) };
        let pace = checkpoint::Pace {
            bytes_per_s: self.inner.checkpoint_write_bytes_per_s,
            hurry: &self.inner.stopped,
        };
        match checkpoint::write(&self.inner.checkpoint_dir, &mut checkpoint, &mut segment, Some(pace)) {
            Ok(path) => {
                chain.segments = checkpoint.segments;
                let final_transfers: usize = segment.shards.iter().flatten().map(Vec::len).sum();
                tracing::info!(
                    path = %path.display(),
                    captured_ms,
                    total_ms = started.elapsed().as_millis(),
                    segments = chain.segments.len(),
                    final_transfers,
                    "checkpoint written"
                );
                Ok(path)
            }
            Err(error) => {
                chain.pending = segment.shards;
                Err(error.into())
            }
        }
    }

    /// Stops the shards, lets the journal writer finish its last group commit, and waits.
    pub fn shutdown(&self) {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // The checkpointer sees `stopped` within one tick; a checkpoint under way ends first.
        if let Some(checkpointer) = self.inner.checkpointer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _panicked = checkpointer.join();
        }
        for shard in &self.inner.shards {
            let _stopped_already = shard.send(ShardMessage::Shutdown);
        }
        let threads = std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _panicked = thread.join();
        }
        if let Some(writer) = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            match writer.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "journal writer failed"),
                Err(_) => tracing::error!("journal writer panicked"),
            }
        }
        if let Some(views) = &self.inner.views {
            views.stop();
        }
        self.inner.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            for shard in &self.shards {
                let _stopped_already = shard.send(ShardMessage::Shutdown);
            }
            for thread in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner())) {
                let _panicked = thread.join();
            }
            if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _result = writer.join();
            }
            if let Some(views) = &self.views {
                views.stop();
            }
        }
    }
}

/// Writes a checkpoint whenever the journal has grown by `every` bytes. Holds only a weak
/// reference, so it never keeps the engine alive; it ends when the engine stops.
fn spawn_checkpointer(
    inner: std::sync::Weak<Inner>,
    mut last: u64,
    every: u64,
) -> Result<JoinHandle<()>, EngineError> {
    std::thread::Builder::new()
        .name("qepik-checkpoint".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let Some(inner) = inner.upgrade() else { return };
                if inner.stopped.load(Ordering::Acquire) || inner.journal.failed() {
                    return;
                }
                let durable = inner.journal.durable();
                if durable.saturating_sub(last) < every {
                    continue;
                }
                let engine = Engine { inner };
                match engine.checkpoint() {
                    Ok(_) => last = durable,
                    Err(error) => {
                        // Every attempt copies every shard's state: wait before the next one.
                        tracing::error!(%error, "checkpoint failed; retrying after the journal grows again");
                        last = durable;
                    }
                }
            }
        })
        .map_err(|error| EngineError::Config(format!("cannot start the checkpoint thread: {error}")))
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, EngineError> {
    let io =
        |error: std::io::Error| EngineError::Config(format!("data directory {}: {error}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(io)?;
    // A lock just released can still be held for a moment by a child process that another
    // thread of this process is starting: between fork and exec the child shares the lock's
    // open file. So a held lock is asked again for a short while before it counts as another
    // engine's (seen in the tests, which restart engines while others spawn servers).
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(EngineError::Locked(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
        }
    }
}

/// How long a held data-directory lock is retried before the directory counts as in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

fn shard_id(index: usize) -> ShardId {
    ShardId(u16::try_from(index).unwrap_or(u16::MAX))
}

fn check_balanced(ledgers: &[Ledger]) -> Result<(), EngineError> {
    let mut totals: FxHashMap<Currency, Totals> = FxHashMap::default();
    for ledger in ledgers {
        for (currency, part) in ledger.totals() {
            totals.entry(currency).or_default().merge(&part);
        }
    }
    for (currency, totals) in totals {
        if !totals.balanced() {
            return Err(EngineError::Unbalanced { currency, totals });
        }
    }
    Ok(())
}

/// What recovery hands to the engine it opens: the ledgers, the report, each shard's last batch
/// time, and the done segments the loaded checkpoint listed.
type Recovered = (Vec<Ledger>, RecoveryReport, Vec<u64>, Vec<u64>);

/// Loads the checkpoint and its done segments, and replays the journal.
fn recover(
    config: &EngineConfig,
    journal_dir: &Path,
    checkpoint_dir: &Path,
) -> Result<Recovered, EngineError> {
    let n = config.shard_count;
    let mut report = RecoveryReport::default();
    let mut ledgers: Vec<Ledger> = (0..n).map(|s| Ledger::new(ShardId(s), n)).collect();
    let mut positions = vec![0_u64; usize::from(n)];
    let mut last_now = vec![0_u64; usize::from(n)];
    let mut segments = Vec::new();
    if let Some(checkpoint) = checkpoint::load_latest(checkpoint_dir)? {
        if checkpoint.shard_count != n {
            return Err(
                JournalError::ShardCountMismatch { found: checkpoint.shard_count, expected: n }.into()
            );
        }
        if checkpoint.shards.len() != usize::from(n) {
            return Err(CheckpointError::Corrupt {
                path: checkpoint_dir.to_path_buf(),
                reason: format!("{} shard states for {n} shards", checkpoint.shards.len()),
            }
            .into());
        }
        let WalCheckpoint { shards, segments: listed, .. } = checkpoint;
        for (index, state) in shards.into_iter().enumerate() {
            let (position, timestamp) = (state.head.position, state.head.timestamp);
            state
                .restore_into(&mut ledgers[index])
                .map_err(|error| EngineError::InvalidRecord { position, reason: error.to_string() })?;
            positions[index] = position;
            last_now[index] = timestamp;
        }
        for &sequence in &listed {
            checkpoint::load_segment(checkpoint_dir, sequence, n, |shard, chunk| {
                let ledger = ledgers.get_mut(shard).ok_or_else(|| format!("shard {shard} out of range"))?;
                ledger
                    .restore_done(record::done_entries(chunk))
                    .map_err(|error| format!("done segment {sequence}: {error}"))
            })?;
        }
        segments = listed;
        report.checkpoint_loaded = true;
    }
    let from = positions.iter().copied().min().unwrap_or(0);
    // The scan decodes on this thread; each shard replays on its own thread, fed in journal
    // order through a bounded channel, so recovery uses every core.
    type Replayed = Result<(Ledger, u64, u64, u64), EngineError>;
    let (end, replayed) = std::thread::scope(|scope| {
        let mut feeds = Vec::new();
        let mut workers = Vec::new();
        for (index, mut ledger) in std::mem::take(&mut ledgers).into_iter().enumerate() {
            let (tx, rx) = bounded::<(u64, u64, Vec<Command>)>(256);
            feeds.push(tx);
            let mut last = last_now[index];
            workers.push(scope.spawn(move || -> Replayed {
                let (mut records, mut commands_replayed) = (0_u64, 0_u64);
                for (position, timestamp, commands) in rx {
                    ledger
                        .replay(&commands, timestamp)
                        .map_err(|source| EngineError::Replay { position, source })?;
                    last = last.max(timestamp);
                    records += 1;
                    commands_replayed += commands.len() as u64;
                }
                Ok((ledger, last, records, commands_replayed))
            }));
        }
        let end =
            journal::scan::<EngineError>(journal_dir, from, TailRepair::Truncate, |position, record| {
                match record {
                    WalRecord::Meta { shard_count } => {
                        if shard_count != n {
                            return Err(
                                JournalError::ShardCountMismatch { found: shard_count, expected: n }.into()
                            );
                        }
                    }
                    WalRecord::Batch { shard, timestamp, commands } => {
                        let index = usize::from(shard);
                        let Some(feed) = feeds.get(index) else {
                            return Err(EngineError::InvalidRecord {
                                position,
                                reason: format!("shard {shard} out of range"),
                            });
                        };
                        if position <= positions[index] {
                            return Ok(());
                        }
                        let commands =
                            commands.iter().map(Command::try_from).collect::<Result<Vec<_>, _>>().map_err(
                                |error| EngineError::InvalidRecord { position, reason: error.to_string() },
                            )?;
                        // A closed feed means that shard's replay failed; its error is reported below.
                        let _failed = feed.send((position, timestamp, commands));
                    }
                }
                Ok(())
            });
        drop(feeds);
        let replayed: Vec<Replayed> = workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| Err(EngineError::Config("a replay thread panicked".into())))
            })
            .collect();
        (end, replayed)
    });
    for (index, result) in replayed.into_iter().enumerate() {
        let (ledger, last, records, commands) = result?;
        ledgers.push(ledger);
        last_now[index] = last;
        report.records_replayed += records;
        report.commands_replayed += commands;
    }
    let end = end?;
    report.torn_bytes = end.torn_bytes;
    report.journal_position = end.position;
    Ok((ledgers, report, last_now, segments))
}
