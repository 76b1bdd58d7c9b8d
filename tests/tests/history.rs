//! The views' history store on real data directories: accounts with several pages of lines,
//! read forwards, backwards and from both ends at once, in time windows; restarts from the
//! snapshot; a lost index store and a damaged history log.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::clock::ManualClock;
use engine::views::{HistoryEntry, LinePosition, Views};
use engine::{AccountId, Engine, EngineConfig, Transfer, TransferResult};
use qepik_tests::world;

/// Wallets in the ring; each round moves money from every wallet to the next.
const WALLETS: u64 = 4;

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new(dir);
    config.shard_count = 2;
    config.views = true;
    config.clock = clock.clone();
    Ok(Engine::open(config)?)
}

/// `rounds` rounds of one batch each, the clock one second further each time, so that an
/// account gets two lines a round (one debit, one credit), on both shards.
fn rounds(
    engine: &Engine,
    clock: &ManualClock,
    first_id: u128,
    rounds: u64,
) -> anyhow::Result<Vec<Transfer>> {
    let mut all = Vec::new();
    for round in 0..rounds {
        clock.advance_s(1);
        let batch: Vec<Transfer> = (1..=WALLETS)
            .map(|w| {
                let id = first_id + u128::from(round * WALLETS + w);
                Transfer::new(id, AccountId(w), AccountId(w % WALLETS + 1), 1 + (round * 7 + w) % 50)
            })
            .collect();
        let results = engine.submit_blocking(batch.clone())?;
        anyhow::ensure!(results.iter().all(|r| *r == TransferResult::Ok), "{results:?}");
        all.extend(batch);
    }
    Ok(all)
}

fn caught_up(engine: &Engine) -> anyhow::Result<&Views> {
    let views = engine.views().context("views are on")?;
    // The last cross-shard transfers were answered at their credits; their finalizes first.
    qepik_tests::block_on(engine.settle())?;
    anyhow::ensure!(
        views.wait_for(engine.journal().durable(), Duration::from_secs(30)),
        "views behind: {:?}",
        views.error()
    );
    Ok(views)
}

fn history(views: &Views, account: AccountId) -> anyhow::Result<Vec<HistoryEntry>> {
    Ok(views.history(account, 0, usize::MAX)?)
}

/// Numbered from 1 without gaps, strictly ordered, each balance the one before plus the line's
/// change, ending at the ledger's posted balance; and each transfer of the account once.
fn check(
    engine: &Engine,
    views: &Views,
    account: AccountId,
    transfers: &[Transfer],
) -> anyhow::Result<Vec<HistoryEntry>> {
    let lines = history(views, account)?;
    let mut balance = 0_i128;
    for (index, line) in lines.iter().enumerate() {
        anyhow::ensure!(line.line == u64::try_from(index)? + 1, "{account}: line {index} is {line:?}");
        balance += line.posted_change();
        anyhow::ensure!(line.balance_after == balance, "{account}: balance at line {}", line.line);
    }
    anyhow::ensure!(lines.windows(2).all(|w| w[0].position() < w[1].position()), "{account}: order");
    let ledger =
        qepik_tests::block_on(engine.lookup_accounts(&[account]))?.pop().flatten().context("no account")?;
    anyhow::ensure!(balance == ledger.balance_posted(), "{account}: {balance} against the ledger's");
    let ids: Vec<u128> = lines.iter().map(|l| l.transfer_id.0).collect();
    let expected: BTreeSet<u128> = transfers
        .iter()
        .filter(|t| t.debit_account_id == account || t.credit_account_id == account)
        .map(|t| t.id.0)
        .collect();
    let found: BTreeSet<u128> = ids.iter().copied().collect();
    anyhow::ensure!(found.is_superset(&expected), "{account}: transfers");
    anyhow::ensure!(ids.len() == expected.len() + 1, "{account}: the funding line and each transfer once");
    Ok(lines)
}

#[test]
fn pages_are_read_forwards_backwards_and_in_windows() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let engine = open(dir.path(), &clock)?;
    world(&engine, WALLETS, 1_000_000)?;
    let transfers = rounds(&engine, &clock, 1_000, 150)?;
    let views = caught_up(&engine)?;
    let me = AccountId(1);
    let all = check(&engine, views, me, &transfers)?;
    anyhow::ensure!(all.len() > 4 * 64, "{} lines: several pages", all.len());

    // From any line on, including both sides of each page boundary.
    for k in [0, 1, 62, 63, 64, 65, 127, 128, 129, 200, all.len() - 1] {
        let from: Vec<HistoryEntry> =
            views.lines(me, all[k].position(), u64::MAX).collect::<Result<_, _>>()?;
        anyhow::ensure!(from == all[k..], "from line {k}");
    }
    // Newest first, as the mini statement reads.
    let newest: Vec<HistoryEntry> =
        views.lines(me, LinePosition::at(0), u64::MAX).rev().take(5).collect::<Result<_, _>>()?;
    anyhow::ensure!(newest.iter().eq(all.iter().rev().take(5)), "newest five");
    let backwards: Vec<HistoryEntry> =
        views.lines(me, LinePosition::at(0), u64::MAX).rev().collect::<Result<_, _>>()?;
    anyhow::ensure!(backwards.iter().eq(all.iter().rev()), "all, newest first");
    // From both ends at once: every line once, the two ends meeting in the middle.
    let mut lines = views.lines(me, all[10].position(), u64::MAX);
    let (mut front, mut back) = (Vec::new(), Vec::new());
    for step in 0.. {
        let next = if step % 3 == 0 { lines.next_back() } else { lines.next() };
        match next {
            Some(line) if step % 3 == 0 => back.push(line?),
            Some(line) => front.push(line?),
            None => break,
        }
    }
    back.reverse();
    front.extend(back);
    anyhow::ensure!(front == all[10..], "both ends");
    // Time windows: booked in [from, to).
    for (a, b) in [(0, 1), (5, 70), (64, 65), (100, all.len() - 1), (3, 3)] {
        let (from, to) = (all[a].booked_at, all[b].booked_at);
        let window: Vec<HistoryEntry> =
            views.lines(me, LinePosition::at(from), to).collect::<Result<_, _>>()?;
        let expected: Vec<HistoryEntry> =
            all.iter().filter(|l| l.booked_at >= from && l.booked_at < to).copied().collect();
        anyhow::ensure!(window == expected, "window {a}..{b}");
        let tail: Vec<HistoryEntry> =
            views.lines(me, LinePosition::at(from), to).rev().take(3).collect::<Result<_, _>>()?;
        anyhow::ensure!(tail.iter().eq(expected.iter().rev().take(3)), "window {a}..{b} newest first");
    }
    // Every transfer is found by id, as submitted.
    for transfer in transfers.iter().step_by(37) {
        let (_, found, _) =
            views.transfer(transfer.id)?.with_context(|| format!("{} not indexed", transfer.id))?;
        anyhow::ensure!(found == *transfer, "{found:?}");
    }
    engine.shutdown();
    Ok(())
}

#[test]
fn the_history_restarts_from_its_snapshot_and_rebuilds_what_it_cannot_trust() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let accounts: Vec<AccountId> = (1..=WALLETS).map(AccountId).collect();
    let read_all = |engine: &Engine| -> anyhow::Result<Vec<Vec<HistoryEntry>>> {
        let views = caught_up(engine)?;
        accounts.iter().map(|a| history(views, *a)).collect()
    };

    let engine = open(dir.path(), &clock)?;
    world(&engine, WALLETS, 1_000_000)?;
    let mut transfers = rounds(&engine, &clock, 1_000, 100)?;
    let before = read_all(&engine)?;
    engine.shutdown();
    drop(engine);
    let snapshot = dir.path().join("views").join("history.snapshot");
    anyhow::ensure!(snapshot.exists(), "a clean stop saves a snapshot");

    // A clean restart: the same lines, and new ones numbered on from them.
    let older = std::fs::read(&snapshot)?;
    let engine = open(dir.path(), &clock)?;
    anyhow::ensure!(read_all(&engine)? == before, "after a restart");
    transfers.extend(rounds(&engine, &clock, 10_000, 40)?);
    let views = caught_up(&engine)?;
    let mut after = Vec::new();
    for account in &accounts {
        after.push(check(&engine, views, *account, &transfers)?);
    }
    engine.shutdown();
    drop(engine);

    // As after a crash: the snapshot is an older one, while the log, the pages and the index
    // went on past it. The log is cut back to the snapshot and the passes after it are applied
    // again: the same history, each line once.
    std::fs::write(&snapshot, &older)?;
    let engine = open(dir.path(), &clock)?;
    anyhow::ensure!(read_all(&engine)? == after, "after going back to an older snapshot");
    let views = caught_up(&engine)?;
    for account in &accounts {
        check(&engine, views, *account, &transfers)?;
    }
    engine.shutdown();
    drop(engine);

    // The index store lost (its mark with it): the snapshot is not trusted and the history is
    // rebuilt from the journal, the same.
    std::fs::remove_dir_all(dir.path().join("views").join("index"))?;
    let engine = open(dir.path(), &clock)?;
    anyhow::ensure!(read_all(&engine)? == after, "rebuilt after losing the index");
    let views = caught_up(&engine)?;
    for transfer in transfers.iter().step_by(29) {
        anyhow::ensure!(
            views.transfer(transfer.id)?.is_some_and(|(_, t, _)| t == *transfer),
            "{}",
            transfer.id
        );
    }
    engine.shutdown();
    drop(engine);

    // A damaged snapshot: rebuilt as well.
    let mut bytes = std::fs::read(&snapshot)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&snapshot, &bytes)?;
    let engine = open(dir.path(), &clock)?;
    anyhow::ensure!(read_all(&engine)? == after, "rebuilt after a damaged snapshot");
    engine.shutdown();
    drop(engine);

    // A damaged line: reads that reach it fail with an error naming the cure, nothing panics,
    // and a reindex rebuilds the same history. (The bytes are in a transfer's first line,
    // which its second line, on the other account, is completed from: both sides fail.)
    let log = dir.path().join("views").join("history.log");
    let mut bytes = std::fs::read(&log)?;
    for byte in &mut bytes[64 * 40 + 40..64 * 40 + 48] {
        *byte ^= 0xff;
    }
    std::fs::write(&log, &bytes)?;
    let engine = open(dir.path(), &clock)?;
    let views = caught_up(&engine)?;
    let failed: Vec<String> = accounts
        .iter()
        .filter_map(|a| views.history(*a, 0, usize::MAX).err())
        .map(|e| e.to_string())
        .collect();
    anyhow::ensure!(failed.len() == 2 && failed.iter().all(|e| e.contains("reindex")), "{failed:?}");
    engine.shutdown();
    drop(engine);
    engine::views::reindex(dir.path())?;
    let engine = open(dir.path(), &clock)?;
    anyhow::ensure!(read_all(&engine)? == after, "after the reindex");
    engine.shutdown();
    Ok(())
}
