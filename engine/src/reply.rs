//! Replies: how an answer reaches the caller once the journal says its records are durable.
//!
//! A submission of many transfers may be answered by several shards (and, for a cross-shard
//! transfer, by the credit shard rather than the one it was sent to). [`Gather`] collects the
//! answers; each [`Waiter`] fills one slot, and the last one sends the whole vector.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::account::{Account, CreateAccountResult};
use crate::ids::ShardId;
use crate::journal::record::WalShardState;
use crate::ledger::TransferStatus;
use crate::transfer::TransferResult;

#[derive(Debug)]
pub struct Gather {
    results: Mutex<Vec<TransferResult>>,
    remaining: AtomicUsize,
    reply: Mutex<Option<oneshot::Sender<Vec<TransferResult>>>>,
}

impl Gather {
    pub fn new(len: usize) -> (Arc<Gather>, oneshot::Receiver<Vec<TransferResult>>) {
        let (tx, rx) = oneshot::channel();
        let gather = Arc::new(Gather {
            results: Mutex::new(vec![TransferResult::Ok; len]),
            remaining: AtomicUsize::new(len),
            reply: Mutex::new(Some(tx)),
        });
        if len == 0 {
            gather.send();
        }
        (gather, rx)
    }

    fn send(&self) {
        let results = std::mem::take(&mut *lock(&self.results));
        if let Some(tx) = lock(&self.reply).take() {
            let _receiver_gone = tx.send(results);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// One slot of a [`Gather`].
#[derive(Debug)]
pub struct Waiter {
    pub gather: Arc<Gather>,
    pub index: u32,
}

impl Waiter {
    pub fn complete(self, result: TransferResult) {
        lock(&self.gather.results)[self.index as usize] = result;
        if self.gather.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gather.send();
        }
    }
}

/// What the journal writer runs once a shard batch is durable.
#[derive(Debug)]
pub enum Completion {
    Results(Vec<(Waiter, TransferResult)>),
    Accounts(oneshot::Sender<Vec<CreateAccountResult>>, Vec<CreateAccountResult>),
    AccountLookup(oneshot::Sender<Vec<Option<Account>>>, Vec<Option<Account>>),
    Transfers(oneshot::Sender<Vec<Option<TransferStatus>>>, Vec<Option<TransferStatus>>),
    /// A checkpoint's state of one shard, and the final transfers it added since the last.
    Checkpoint(
        crossbeam_channel::Sender<crate::shard::ShardCapture>,
        ShardId,
        Box<WalShardState>,
        crate::ledger::DoneLog,
    ),
    Totals(
        oneshot::Sender<
            rustc_hash::FxHashMap<
                (crate::money::Currency, crate::account::AccountKind),
                crate::ledger::Totals,
            >,
        >,
        rustc_hash::FxHashMap<(crate::money::Currency, crate::account::AccountKind), crate::ledger::Totals>,
    ),
    /// Recovery waits on this for its own records to be durable.
    Signal(crossbeam_channel::Sender<u64>),
    Wallet(oneshot::Sender<crate::wallet::WalletReply>, crate::wallet::WalletReply),
    Wallets(oneshot::Sender<Vec<crate::wallet::WalletReply>>, Vec<crate::wallet::WalletReply>),
}

impl Completion {
    /// Runs the completion. `position` is the journal position after the batch it rode in.
    pub fn run(self, position: u64) {
        match self {
            Completion::Results(results) => {
                for (waiter, result) in results {
                    waiter.complete(result);
                }
            }
            Completion::Accounts(reply, results) => {
                let _gone = reply.send(results);
            }
            Completion::AccountLookup(reply, found) => {
                let _gone = reply.send(found);
            }
            Completion::Transfers(reply, found) => {
                let _gone = reply.send(found);
            }
            Completion::Checkpoint(reply, shard, mut state, done) => {
                state.head.position = position;
                let _gone = reply.send((shard, *state, done));
            }
            Completion::Totals(reply, totals) => {
                let _gone = reply.send(totals);
            }
            Completion::Signal(reply) => {
                let _gone = reply.send(position);
            }
            Completion::Wallet(reply, answer) => {
                let _gone = reply.send(answer);
            }
            Completion::Wallets(reply, answers) => {
                let _gone = reply.send(answers);
            }
        }
    }
}

/// Runs one of the engine's futures to completion on a plain thread (the load tool, tests,
/// command-line helpers): they need no runtime, only a waker that unparks the thread.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}
