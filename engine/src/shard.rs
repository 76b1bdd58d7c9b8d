//! A shard: one thread that owns one [`Ledger`] and handles every message for its accounts in
//! order, in batches. This is how each wallet behaves as an actor without a task per wallet.
//!
//! The loop: block for a message, drain up to `batch_len_max` more, apply them all with one
//! timestamp, encode the batch's commands as one journal frame, queue it for the group commit,
//! and only then forward the cross-shard steps it produced. Replies travel with the journal
//! batch and are released by the writer once the frame is durable.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::account::{Account, CreateAccountResult};
use crate::clock::Clock;
use crate::ids::{ShardId, TransferId};
use crate::journal::JournalBatch;
use crate::journal::frame;
use crate::journal::record::{self, FORMAT_VERSION, WalShardState};
use crate::ledger::{Command, Ledger, Outcome, TransferStatus};
use crate::reply::{Completion, Waiter};
use crate::transfer::{Transfer, TransferResult};
use crate::wallet::{Authority, Policy, WalletReply, WalletRequest};

/// A checkpoint's share of one shard: its state, and the final transfers it added since the
/// last capture (id halves and `Done` bits).
pub type ShardCapture = (ShardId, WalShardState, crate::ledger::DoneLog);

pub enum ShardMessage {
    Submit {
        transfers: Vec<Transfer>,
        waiters: Vec<Waiter>,
        /// Checked on this shard before the transfers, in the same step; a failure refuses all.
        authorization: Option<Authority>,
    },
    Wallet {
        request: WalletRequest,
        reply: oneshot::Sender<WalletReply>,
    },
    /// Many wallet requests at once (bulk registration), answered together.
    Wallets {
        requests: Vec<WalletRequest>,
        reply: oneshot::Sender<Vec<WalletReply>>,
    },
    /// Journals a new policy if it differs from the shard's.
    SetPolicy {
        policy: Box<Policy>,
        reply: oneshot::Sender<WalletReply>,
    },
    CreateAccounts {
        accounts: Vec<Account>,
        reply: oneshot::Sender<Vec<CreateAccountResult>>,
    },
    /// The credit step of a cross-shard transfer, from its debit shard. `members` wait for the
    /// answers of the other members of its linked chain, which the step decides: `Ok` if the
    /// credit is, `LinkedEventFailed` if not.
    Credit {
        transfer: Transfer,
        debit_shard: ShardId,
        waiter: Waiter,
        members: Vec<Waiter>,
    },
    /// The answer of a credit step, back to the debit shard.
    Finalize {
        id: TransferId,
        result: TransferResult,
        credit_shard: ShardId,
    },
    Forget {
        id: TransferId,
        body_hash: u64,
    },
    LookupAccounts {
        ids: Vec<crate::ids::AccountId>,
        reply: oneshot::Sender<Vec<Option<Account>>>,
    },
    LookupTransfers {
        ids: Vec<TransferId>,
        reply: oneshot::Sender<Vec<Option<TransferStatus>>>,
    },
    Checkpoint {
        reply: crossbeam_channel::Sender<ShardCapture>,
    },
    /// Per-currency sums of this shard's accounts.
    Totals {
        reply: oneshot::Sender<
            FxHashMap<(crate::money::Currency, crate::account::AccountKind), crate::ledger::Totals>,
        >,
    },
    Shutdown,
}

impl ShardMessage {
    /// How many journal commands the message can produce at most.
    fn weight(&self) -> usize {
        match self {
            ShardMessage::Submit { transfers, .. } => transfers.len(),
            ShardMessage::CreateAccounts { accounts, .. } => accounts.len(),
            // A registration journals the wallet and one account per currency.
            ShardMessage::Wallets { requests, .. } => {
                requests.len() * (1 + crate::money::Currency::ALL.len())
            }
            _ => 1,
        }
    }
}

impl std::fmt::Debug for ShardMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ShardMessage::Submit { .. } => "Submit",
            ShardMessage::Wallet { .. } => "Wallet",
            ShardMessage::Wallets { .. } => "Wallets",
            ShardMessage::SetPolicy { .. } => "SetPolicy",
            ShardMessage::CreateAccounts { .. } => "CreateAccounts",
            ShardMessage::Credit { .. } => "Credit",
            ShardMessage::Finalize { .. } => "Finalize",
            ShardMessage::Forget { .. } => "Forget",
            ShardMessage::LookupAccounts { .. } => "LookupAccounts",
            ShardMessage::LookupTransfers { .. } => "LookupTransfers",
            ShardMessage::Checkpoint { .. } => "Checkpoint",
            ShardMessage::Totals { .. } => "Totals",
            ShardMessage::Shutdown => "Shutdown",
        };
        f.write_str(name)
    }
}

/// Queue depth, batch sizes: read by metrics and the load tool.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub messages: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
pub struct Shard {
    pub ledger: Ledger,
    pub inbox: Receiver<ShardMessage>,
    pub peers: Vec<Sender<ShardMessage>>,
    pub journal: Sender<JournalBatch<Vec<Completion>>>,
    pub clock: std::sync::Arc<dyn Clock>,
    pub batch_len_max: usize,
    pub last_now: u64,
    pub stats: std::sync::Arc<ShardStats>,
}

/// Messages to other shards, sent only after this batch's frame is queued for the journal, so
/// that a step on another shard is never journaled before the step that caused it.
enum Forward {
    Credit(ShardId, Transfer, Waiter, Vec<Waiter>),
    Finalize(ShardId, TransferId, TransferResult),
    Forget(ShardId, TransferId, u64),
}

impl Shard {
    pub fn run(mut self) {
        let shard = self.ledger.shard();
        let mut batch = Vec::with_capacity(self.batch_len_max);
        let mut log: Vec<Command> = Vec::new();
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut forwards: Vec<Forward> = Vec::new();
        // Waiters on a cross-shard transfer in flight: retries of it (`false`), and the other
        // members of its linked chain (`true`), who hear `Ok` or `LinkedEventFailed`.
        let mut in_flight: FxHashMap<TransferId, Vec<(Waiter, bool)>> = FxHashMap::default();
        let mut frames = Vec::new();
        let mut encoder = record::BatchEncoder::default();
        let mut running = true;
        while running {
            let first = match self.ledger.next_expiry() {
                Some(at) => {
                    let wait = at.saturating_sub(self.clock.now_ns());
                    match self.inbox.recv_timeout(Duration::from_nanos(wait.max(1_000_000))) {
                        Ok(message) => Some(message),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match self.inbox.recv() {
                    Ok(message) => Some(message),
                    Err(_) => break,
                },
            };
            // Bounded by messages and by transfers, so one batch's frame stays far below the
            // journal's record size limit.
            let mut weight = first.as_ref().map_or(0, ShardMessage::weight);
            batch.extend(first);
            while batch.len() < self.batch_len_max && weight < crate::limits::SHARD_BATCH_TRANSFERS_MAX {
                match self.inbox.try_recv() {
                    Ok(message) => {
                        weight += message.weight();
                        batch.push(message);
                    }
                    Err(_) => break,
                }
            }
            let now = self.clock.now_ns().max(self.last_now);
            self.last_now = now;
            let mut completions: Vec<Completion> = Vec::new();
            let mut credits_applied = 0_i32;
            let mut checkpoints = Vec::new();
            self.ledger.expire(now, &mut log);
            self.stats.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stats.messages.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut messages = batch.drain(..);
            let mut ahead = 0;
            loop {
                if ahead == 0 {
                    let rest = messages.as_slice();
                    touch_steps(&self.ledger, &rest[..rest.len().min(STEPS_AHEAD)]);
                    ahead = STEPS_AHEAD;
                }
                ahead -= 1;
                let Some(message) = messages.next() else {
                    break;
                };
                match message {
                    ShardMessage::Submit { transfers, waiters, authorization } => {
                        outcomes.clear();
                        let authorized = match &authorization {
                            Some(Authority::Customer(auth)) => {
                                self.ledger.authorize(auth, &transfers, now, &mut log)
                            }
                            Some(Authority::Staff(actor)) => {
                                self.ledger.authorize_staff(*actor, &transfers, now, &mut log);
                                Ok(())
                            }
                            None => Ok(()),
                        };
                        if let Err(result) = authorized {
                            let refused = waiters.into_iter().map(|waiter| (waiter, result)).collect();
                            completions.push(Completion::Results(refused));
                            continue;
                        }
                        self.ledger.submit(&transfers, now, &mut outcomes, &mut log);
                        let mut done = Vec::new();
                        let forwarded = forwards.len();
                        let mut linked = Vec::new();
                        for ((transfer, waiter), outcome) in
                            transfers.iter().zip(waiters).zip(outcomes.iter())
                        {
                            match *outcome {
                                Outcome::Done(result) => done.push((waiter, result)),
                                Outcome::Forward { credit_shard } => forwards.push(Forward::Credit(
                                    credit_shard,
                                    *transfer,
                                    waiter,
                                    Vec::new(),
                                )),
                                Outcome::Wait => {
                                    in_flight.entry(transfer.id).or_default().push((waiter, false))
                                }
                                Outcome::Linked { parent } => linked.push((parent, waiter)),
                            }
                        }
                        // A chain that crossed in this submission is answered by its credit step,
                        // which decides every member (its reserves are in this batch, durable no
                        // later than the credit). A retry of a chain already in flight waits here
                        // for the finalize.
                        if !linked.is_empty() {
                            let crossing: FxHashMap<TransferId, usize> = forwards[forwarded..]
                                .iter()
                                .enumerate()
                                .filter_map(|(index, forward)| match forward {
                                    Forward::Credit(_, transfer, ..) => {
                                        Some((transfer.id, forwarded + index))
                                    }
                                    _ => None,
                                })
                                .collect();
                            for (parent, waiter) in linked {
                                match crossing.get(&parent).map(|index| &mut forwards[*index]) {
                                    Some(Forward::Credit(_, _, _, members)) => members.push(waiter),
                                    _ => in_flight.entry(parent).or_default().push((waiter, true)),
                                }
                            }
                        }
                        if !done.is_empty() {
                            completions.push(Completion::Results(done));
                        }
                    }
                    ShardMessage::CreateAccounts { accounts, reply } => {
                        let results = accounts
                            .into_iter()
                            .map(|account| self.ledger.create_account(account, now, &mut log))
                            .collect();
                        completions.push(Completion::Accounts(reply, results));
                    }
                    ShardMessage::Credit { transfer, debit_shard, waiter, members } => {
                        credits_applied += 1;
                        let result = self.ledger.credit(&transfer, &mut log);
                        let member_result = if result.is_ok() {
                            TransferResult::Ok
                        } else {
                            TransferResult::LinkedEventFailed
                        };
                        let mut answers = Vec::with_capacity(1 + members.len());
                        answers.push((waiter, result));
                        answers.extend(members.into_iter().map(|member| (member, member_result)));
                        completions.push(Completion::Results(answers));
                        forwards.push(Forward::Finalize(debit_shard, transfer.id, result));
                    }
                    ShardMessage::Finalize { id, result, credit_shard } => {
                        if let Some(body_hash) = self.ledger.finalize_hash(id, result, &mut log) {
                            forwards.push(Forward::Forget(credit_shard, id, body_hash));
                        }
                        if let Some(waiters) = in_flight.remove(&id) {
                            let member_result = if result.is_ok() {
                                TransferResult::Ok
                            } else {
                                TransferResult::LinkedEventFailed
                            };
                            completions.push(Completion::Results(
                                waiters
                                    .into_iter()
                                    .map(|(w, member)| (w, if member { member_result } else { result }))
                                    .collect(),
                            ));
                        }
                    }
                    ShardMessage::Forget { id, body_hash } => self.ledger.forget(id, body_hash, &mut log),
                    ShardMessage::LookupAccounts { ids, reply } => {
                        let found = ids.iter().map(|id| self.ledger.account(*id).copied()).collect();
                        completions.push(Completion::AccountLookup(reply, found));
                    }
                    ShardMessage::LookupTransfers { ids, reply } => {
                        let found = ids.iter().map(|id| self.ledger.transfer_status(*id)).collect();
                        completions.push(Completion::Transfers(reply, found));
                    }
                    ShardMessage::Wallet { request, reply } => {
                        let answer = self.ledger.wallet_request(request, now, &mut log);
                        completions.push(Completion::Wallet(reply, answer));
                    }
                    ShardMessage::Wallets { requests, reply } => {
                        let answers = requests
                            .into_iter()
                            .map(|request| self.ledger.wallet_request(request, now, &mut log))
                            .collect();
                        completions.push(Completion::Wallets(reply, answers));
                    }
                    ShardMessage::SetPolicy { policy, reply } => {
                        self.ledger.set_policy(*policy, now, &mut log);
                        completions.push(Completion::Wallet(reply, WalletReply::Done));
                    }
                    ShardMessage::Checkpoint { reply } => checkpoints.push(reply),
                    ShardMessage::Totals { reply } => {
                        completions.push(Completion::Totals(reply, self.ledger.totals_by_kind()));
                    }
                    ShardMessage::Shutdown => running = false,
                }
            }
            frames.clear();
            if !log.is_empty() {
                encode_batch(&mut encoder, shard, now, &log, &mut frames);
                log.clear();
            }
            // A checkpoint captures the state after this batch; the position it covers is known
            // once the journal has taken the batch, so it rides in the batch's completion.
            for reply in checkpoints {
                let (state, done) = WalShardState::capture(&mut self.ledger, now);
                completions.push(Completion::Checkpoint(reply, shard, Box::new(state), done));
            }
            if !frames.is_empty() || !completions.is_empty() {
                let credits_forwarded = forwards.iter().filter(|f| matches!(f, Forward::Credit(..))).count();
                let credits_forwarded = i32::try_from(credits_forwarded).unwrap_or(i32::MAX);
                let batch = JournalBatch {
                    frames: std::mem::take(&mut frames),
                    completion: completions,
                    credits_due: credits_forwarded - credits_applied,
                };
                if self.journal.send(batch).is_err() {
                    tracing::error!(shard = shard.0, "journal is gone; shard stops");
                    break;
                }
            }
            for forward in forwards.drain(..) {
                let _ignored = match forward {
                    Forward::Credit(to, transfer, waiter, members) => self.peers[usize::from(to.0)]
                        .send(ShardMessage::Credit { transfer, debit_shard: shard, waiter, members }),
                    Forward::Finalize(to, id, result) => self.peers[usize::from(to.0)]
                        .send(ShardMessage::Finalize { id, result, credit_shard: shard }),
                    Forward::Forget(to, id, body_hash) => {
                        self.peers[usize::from(to.0)].send(ShardMessage::Forget { id, body_hash })
                    }
                };
            }
        }
    }
}

/// Cross-shard steps whose state [`touch_steps`] looks up together before they apply.
const STEPS_AHEAD: usize = 32;

/// Looks up what the credit and finalize steps among `messages` will use, so that their cache
/// misses overlap (a submission's transfers are touched by [`Ledger::submit`] itself).
fn touch_steps(ledger: &Ledger, messages: &[ShardMessage]) {
    let mut sink = 0;
    for message in messages {
        sink ^= match message {
            ShardMessage::Credit { transfer, .. } => ledger.touch_credit(transfer),
            ShardMessage::Finalize { id, .. } => ledger.touch_finalize(*id),
            _ => 0,
        };
    }
    std::hint::black_box(sink);
}

/// Encodes one shard batch as one journal frame appended to `out`, through `encoder`'s
/// buffers (kept by a shard between its batches); `out` grows once, to the frame's size.
pub fn encode_batch(
    encoder: &mut record::BatchEncoder,
    shard: ShardId,
    timestamp: u64,
    commands: &[Command],
    out: &mut Vec<u8>,
) {
    match encoder.encode(shard.0, timestamp, commands) {
        Ok(bytes) => {
            out.reserve(frame::HEADER_LEN + 1 + bytes.len());
            frame::write_frame(out, FORMAT_VERSION, bytes);
        }
        Err(error) => {
            // Only allocation failure gets here; losing the batch silently would be worse.
            panic!("cannot encode a journal record: {error}");
        }
    }
}
