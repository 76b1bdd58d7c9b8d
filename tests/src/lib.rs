//! Shared helpers for Qepik's end-to-end tests: opening engines on temporary data directories
//! and funding wallets.

use std::path::Path;

use engine::{
    Account, AccountFlags, AccountId, AccountKind, Currency, Engine, EngineConfig, Transfer, TransferResult,
};

/// The spread e-money issuance account every test world funds wallets from.
pub const ISSUANCE: AccountId = AccountId::spread(1);

pub fn open(dir: &Path, shards: u16) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new(dir);
    config.shard_count = shards;
    Ok(Engine::open(config)?)
}

pub fn wallet(id: u64) -> Account {
    Account::new(
        AccountId(id),
        Currency::Azn,
        AccountKind::WALLET,
        AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
    )
}

/// Creates the issuance account and wallets `1..=wallets`, each funded with `amount`.
pub fn world(engine: &Engine, wallets: u64, amount: u64) -> anyhow::Result<()> {
    let mut accounts =
        vec![Account::new(ISSUANCE, Currency::Azn, AccountKind::EMONEY_ISSUANCE, AccountFlags::empty())];
    accounts.extend((1..=wallets).map(wallet));
    let results = block_on(engine.create_accounts(accounts))?;
    anyhow::ensure!(results.iter().all(|r| *r == engine::CreateAccountResult::Ok), "create: {results:?}");
    if amount > 0 {
        let funding: Vec<Transfer> = (1..=wallets)
            .map(|id| Transfer::new(u128::from(id) | (1 << 100), ISSUANCE, AccountId(id), amount))
            .collect();
        let results = engine.submit_blocking(funding)?;
        anyhow::ensure!(results.iter().all(|r| *r == TransferResult::Ok), "fund: {results:?}");
    }
    Ok(())
}

/// Runs a future to completion on this thread; the engine's futures need no runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}
