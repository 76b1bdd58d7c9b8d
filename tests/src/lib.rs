//! Shared helpers for Qepik's end-to-end tests: opening engines on temporary data directories,
//! funding wallets, running the engine's futures without a runtime, and the workload of the crash
//! test (shared by the test and its child process, so that both derive a transfer from its id).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;

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

pub fn issuance() -> Account {
    Account::new(ISSUANCE, Currency::Azn, AccountKind::EMONEY_ISSUANCE, AccountFlags::empty())
}

/// Creates the issuance account and wallets `1..=wallets`, each funded with `amount`.
pub fn world(engine: &Engine, wallets: u64, amount: u64) -> anyhow::Result<()> {
    let mut accounts = vec![issuance()];
    accounts.extend((1..=wallets).map(wallet));
    let results = block_on(engine.create_accounts(accounts))?;
    anyhow::ensure!(results.iter().all(|r| *r == engine::CreateAccountResult::Ok), "create: {results:?}");
    if amount > 0 {
        let funding: Vec<Transfer> = (1..=wallets).map(|id| funding(id, amount)).collect();
        let results = engine.submit_blocking(funding)?;
        anyhow::ensure!(results.iter().all(|r| *r == TransferResult::Ok), "fund: {results:?}");
    }
    Ok(())
}

/// The transfer [`world`] funds `wallet` with: its id is the wallet's with bit 100 set.
pub fn funding(wallet: u64, amount: u64) -> Transfer {
    Transfer::new(u128::from(wallet) | FUNDING_BIT, ISSUANCE, AccountId(wallet), amount)
}

const FUNDING_BIT: u128 = 1 << 100;

pub use engine::reply::block_on;

/// Runs many futures at once on this thread and returns their outputs in order: how a test
/// keeps hundreds of submissions in flight without a runtime.
pub fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    block_on(std::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    }));
    outputs.into_iter().flatten().collect()
}

/// Whether the slow variants run (`QEPIK_SLOW_TESTS=1`).
pub fn slow() -> bool {
    std::env::var("QEPIK_SLOW_TESTS").is_ok_and(|value| value == "1")
}

/// The seed of a randomised test: `QEPIK_SEED` if set, else fresh. Printed, so that a failing
/// run can be repeated.
pub fn seed() -> u64 {
    let seed = std::env::var("QEPIK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("QEPIK_SEED={seed}");
    seed
}

/// SplitMix64: a fixed mixing function, so a transfer's body can be derived from its id alone.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The crash test's world: this many wallets, each funded once with [`CRASH_FUNDING`].
pub const CRASH_WALLETS: u64 = 200;
pub const CRASH_FUNDING: u64 = 10_000;
pub const CRASH_SHARDS: u16 = 4;

/// The id of the `counter`th transfer of `thread` in the crash child run `run` (`run` < 2^32, so
/// ids of different runs never collide, nor with the funding ids).
pub fn crash_id(run: u32, thread: u16, counter: u64) -> u128 {
    (u128::from(run) << 64) | (u128::from(thread) << 48) | u128::from(counter & ((1 << 48) - 1))
}

/// The body of the crash workload's transfer `id`: two different wallets and an amount, derived
/// from the id so that the test knows every body from the acknowledgements alone.
pub fn crash_transfer(id: u128) -> Transfer {
    let low = u64::try_from(id & u128::from(u64::MAX)).unwrap_or(0);
    let high = u64::try_from(id >> 64).unwrap_or(0);
    let h = mix(low ^ mix(high));
    let debit = 1 + h % CRASH_WALLETS;
    let mut credit = 1 + (h >> 16) % (CRASH_WALLETS - 1);
    if credit >= debit {
        credit += 1;
    }
    let amount = 1 + (h >> 32) % 6_000;
    Transfer::new(id, AccountId(debit), AccountId(credit), amount)
}

/// The body of any transfer the crash test's engine may hold: funding or workload.
pub fn crash_body(id: u128) -> Transfer {
    if id & FUNDING_BIT != 0 {
        funding(u64::try_from(id & !FUNDING_BIT).unwrap_or(0), CRASH_FUNDING)
    } else {
        crash_transfer(id)
    }
}
