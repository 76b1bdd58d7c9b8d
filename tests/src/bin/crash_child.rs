//! The child process of the crash test (`tests/tests/crash.rs`): opens the engine on a data
//! directory, makes sure the crash world exists (wallets created and funded, idempotently), says
//! `ready`, then submits random transfers from several threads until it is killed, printing
//! `ack <id> <result_code>` and flushing after each answer it receives. It checkpoints often,
//! so that recovery after some kills starts from a checkpoint taken under load.
//!
//! Usage: `crash-child <data-dir> <run>`; `run` (below 2^32) keeps transfer ids of different
//! runs on the same directory apart.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::{CreateAccountResult, Engine, EngineConfig, TransferResult};
use qepik_tests::{
    CRASH_FUNDING, CRASH_SHARDS, CRASH_WALLETS, block_on, crash_id, crash_transfer, funding, issuance, wallet,
};
use rand::{Rng, SeedableRng};

const THREADS: u16 = 4;
/// The child normally dies by SIGKILL long before; this bounds an orphan's life.
const LIFETIME_MAX: Duration = Duration::from_secs(60);
const CHECKPOINT_EVERY_BYTES: u64 = 256 * 1024;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: crash-child <data-dir> <run>";
    let dir = PathBuf::from(args.next().context(usage)?);
    let run: u32 = args.next().context(usage)?.parse().context(usage)?;
    let mut config = EngineConfig::new(&dir);
    config.shard_count = CRASH_SHARDS;
    // Checkpoints under load, so that some kills land after one and recovery starts from it.
    config.checkpoint_every_bytes = CHECKPOINT_EVERY_BYTES;
    // Snapshots of the views every few hundred milliseconds, so that kills land after one and
    // recovery cuts the history log back and applies the passes after it again.
    config.views_snapshot_every = std::time::Duration::from_millis(300);
    let engine = Engine::open(config).context("open")?;

    let mut accounts = vec![issuance()];
    accounts.extend((1..=CRASH_WALLETS).map(wallet));
    let results = block_on(engine.create_accounts(accounts))?;
    anyhow::ensure!(
        results.iter().all(|r| matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists)),
        "create: {results:?}"
    );
    let results = engine.submit_blocking((1..=CRASH_WALLETS).map(|w| funding(w, CRASH_FUNDING)).collect())?;
    anyhow::ensure!(results.iter().all(|r| *r == TransferResult::Ok), "fund: {results:?}");
    say("ready\n")?;

    let deadline = Instant::now() + LIFETIME_MAX;
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let engine = engine.clone();
            std::thread::spawn(move || work(&engine, run, thread, deadline))
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    engine.shutdown();
    Ok(())
}

fn work(engine: &Engine, run: u32, thread: u16, deadline: Instant) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(run) << 16 | u64::from(thread));
    let mut counter = 0_u64;
    let mut out = String::new();
    while Instant::now() < deadline {
        let ids: Vec<u128> = (0..rng.random_range(1..=4))
            .map(|_| {
                counter += 1;
                crash_id(run, thread, counter)
            })
            .collect();
        let results = engine.submit_blocking(ids.iter().map(|id| crash_transfer(*id)).collect())?;
        out.clear();
        for (id, result) in ids.iter().zip(results) {
            out.push_str(&format!("ack {id} {}\n", result.code()));
        }
        say(&out)?;
    }
    Ok(())
}

/// One write per call, then a flush: the parent must see every line it is told about before the
/// kill, and a line is never split across writes (pipe writes this small are atomic).
fn say(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
