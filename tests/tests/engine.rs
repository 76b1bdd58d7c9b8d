//! The engine through its public handle, on real data directories.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use anyhow::Context;
use engine::clock::ManualClock;
use engine::ids::home_shard;
use engine::journal::JournalState;
use engine::views::Views;
use engine::{
    Account, AccountId, Engine, EngineConfig, Transfer, TransferFlags, TransferId, TransferResult,
    TransferState,
};
use qepik_tests::{ISSUANCE, block_on, join_all, open, slow, world};

#[test]
fn transfers_survive_a_restart_and_stay_balanced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let engine = open(dir.path(), 2)?;
        world(&engine, 10, 1000)?;
        let batch: Vec<Transfer> =
            (1..=9).map(|i| Transfer::new(u128::from(i), AccountId(i), AccountId(i + 1), 100)).collect();
        let results = engine.submit_blocking(batch)?;
        assert!(results.iter().all(|r| *r == TransferResult::Ok), "{results:?}");
        engine.shutdown();
    }
    let engine = open(dir.path(), 2)?;
    let accounts = block_on(engine.lookup_accounts(&[AccountId(1), AccountId(5), AccountId(10)]))?;
    let balances: Vec<i128> = accounts.iter().map(|a| a.map_or(-1, |a| a.balance_posted())).collect();
    assert_eq!(balances, [900, 1000, 1100]);
    let totals = engine.totals()?;
    assert!(totals.values().all(|t| t.balanced()), "{totals:?}");
    Ok(())
}

/// Enough transfers that the journal's zeroer runs: the last segment ends in zeros past the
/// last record when the engine stops; each restart reads them as the end of the log, cuts them
/// off, and appends after its last record; nothing is lost or read twice.
#[test]
fn a_journal_ending_in_zeros_written_ahead_restarts_whole() -> anyhow::Result<()> {
    const WALLETS: u64 = 50;
    let dir = tempfile::tempdir()?;
    let segment = |dir: &std::path::Path| -> anyhow::Result<(std::path::PathBuf, u64)> {
        let (_, path) = engine::journal::segments(&dir.join("journal"))?.pop().context("no segment")?;
        let len = std::fs::metadata(&path)?.len();
        Ok((path, len))
    };
    let mut id = 0_u128;
    let mut moved = vec![0_i128; usize::try_from(WALLETS)? + 1];
    let mut zeros_seen = false;
    for run in 0..3 {
        let engine = open(dir.path(), 2)?;
        if run == 0 {
            world(&engine, WALLETS, 1_000_000)?;
        }
        for (a, b) in [(1, 2), (3, 4)] {
            let balances = block_on(engine.lookup_accounts(&[AccountId(a), AccountId(b)]))?;
            let found: Vec<i128> = balances.iter().map(|x| x.map_or(-1, |x| x.balance_posted())).collect();
            let expected = [1_000_000 + moved[usize::try_from(a)?], 1_000_000 + moved[usize::try_from(b)?]];
            anyhow::ensure!(found == expected, "run {run}: {found:?} against {expected:?}");
        }
        // ~1.5 MiB of journal per run, in batches of 500.
        for _ in 0..24 {
            let batch: Vec<Transfer> = (0..500)
                .map(|n| {
                    id += 1;
                    let debit = 1 + n % WALLETS;
                    let credit = 1 + (n + 1) % WALLETS;
                    moved[usize::try_from(debit).unwrap_or(0)] -= 1;
                    moved[usize::try_from(credit).unwrap_or(0)] += 1;
                    Transfer::new(id, AccountId(debit), AccountId(credit), 1)
                })
                .collect();
            let results = engine.submit_blocking(batch)?;
            anyhow::ensure!(results.iter().all(|r| *r == TransferResult::Ok), "run {run}: {results:?}");
        }
        assert_balanced(&engine)?;
        let position = engine.journal().durable();
        engine.shutdown();
        let (path, len) = segment(dir.path())?;
        let start: u64 = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.parse().ok())
            .context("segment name")?;
        if len > position - start {
            zeros_seen = true;
            let bytes = std::fs::read(&path)?;
            anyhow::ensure!(
                bytes[usize::try_from(position - start)?..].iter().all(|byte| *byte == 0),
                "run {run}: bytes past the log's end are not zeros"
            );
        }
    }
    anyhow::ensure!(zeros_seen, "the zeroer never ran: the test no longer tests what it says");
    let engine = open(dir.path(), 2)?;
    let all: Vec<AccountId> = (1..=WALLETS).map(AccountId).collect();
    for (account, found) in all.iter().zip(block_on(engine.lookup_accounts(&all))?) {
        let expected = 1_000_000 + moved[usize::try_from(account.0)?];
        anyhow::ensure!(found.map(|a| a.balance_posted()) == Some(expected), "{account}: {found:?}");
    }
    let ids: Vec<engine::TransferId> = (1..=id).map(engine::TransferId).collect();
    let found = block_on(engine.lookup_transfers(&ids))?;
    anyhow::ensure!(found.iter().all(Option::is_some), "a transfer went missing");
    assert_balanced(&engine)?;
    Ok(())
}

/// Two wallets of `1..=wallets` homed on different shards.
fn cross_shard_pair(wallets: u64, shards: u16) -> anyhow::Result<(AccountId, AccountId)> {
    let a = AccountId(1);
    let b = (2..=wallets)
        .map(AccountId)
        .find(|b| home_shard(*b, shards) != home_shard(a, shards))
        .context("all wallets on one shard")?;
    Ok((a, b))
}

/// Two wallets of `1..=wallets` homed on the same shard.
fn same_shard_pair(wallets: u64, shards: u16) -> anyhow::Result<(AccountId, AccountId)> {
    let a = AccountId(1);
    let b = (2..=wallets)
        .map(AccountId)
        .find(|b| home_shard(*b, shards) == home_shard(a, shards))
        .context("no two wallets on one shard")?;
    Ok((a, b))
}

fn balance(engine: &Engine, id: AccountId) -> anyhow::Result<Account> {
    block_on(engine.lookup_accounts(&[id]))?.pop().flatten().with_context(|| format!("no account {id}"))
}

fn assert_balanced(engine: &Engine) -> anyhow::Result<()> {
    let totals = engine.totals()?;
    anyhow::ensure!(totals.values().all(|t| t.balanced()), "unbalanced: {totals:?}");
    Ok(())
}

/// Submits `transfers` from `threads` threads at once, each keeping all of its share in flight.
/// Returns the answers in the order of `transfers`.
fn submit_all_at_once(
    engine: &Engine,
    transfers: Vec<Transfer>,
    threads: usize,
) -> anyhow::Result<Vec<TransferResult>> {
    let barrier = Arc::new(Barrier::new(threads));
    let chunk = transfers.len().div_ceil(threads);
    let handles: Vec<_> = transfers
        .chunks(chunk)
        .map(|share| {
            let (engine, barrier, share) = (engine.clone(), barrier.clone(), share.to_vec());
            std::thread::spawn(move || {
                let futures: Vec<_> = share.into_iter().map(|t| engine.submit(vec![t])).collect();
                barrier.wait();
                join_all(futures)
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        for answer in handle.join().map_err(|_| anyhow::anyhow!("a submitter panicked"))? {
            results.extend(answer?);
        }
    }
    Ok(results)
}

/// How many times the racing tests race: once, or many times with `QEPIK_SLOW_TESTS=1`.
fn rounds() -> u64 {
    if slow() { 20 } else { 1 }
}

#[test]
fn one_cross_shard_transfer_submitted_a_thousand_times_at_once_posts_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(dir.path(), 2)?;
    world(&engine, 10, 1_000)?;
    let (a, b) = cross_shard_pair(10, 2)?;
    let rounds = rounds();
    let transfers: Vec<Transfer> =
        (0..rounds).map(|round| Transfer::new(77 + u128::from(round), a, b, 10)).collect();
    let check = |engine: &Engine, done: u64| -> anyhow::Result<()> {
        let moved = i128::from(done * 10);
        let (debit, credit) = (balance(engine, a)?, balance(engine, b)?);
        anyhow::ensure!(debit.balance_posted() == 1_000 - moved && debit.debits_pending == 0, "{debit:?}");
        anyhow::ensure!(credit.balance_posted() == 1_000 + moved, "{credit:?}");
        let ids: Vec<TransferId> = transfers.iter().take(usize::try_from(done)?).map(|t| t.id).collect();
        for (transfer, stored) in transfers.iter().zip(block_on(engine.lookup_transfers(&ids))?) {
            let stored = stored.with_context(|| format!("{} not stored", transfer.id))?;
            anyhow::ensure!(stored.state == TransferState::Posted && stored.open.is_none(), "{stored:?}");
        }
        assert_balanced(engine)
    };
    for (round, transfer) in (1..).zip(&transfers) {
        let results = submit_all_at_once(&engine, vec![*transfer; 1_000], 4)?;
        anyhow::ensure!(results.len() == 1_000 && results.iter().all(|r| r.is_ok()), "{results:?}");
        check(&engine, round)?;
    }
    // And once more after a restart: the duplicates left no second posting in the journal.
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 2)?;
    check(&engine, rounds)?;
    anyhow::ensure!(engine.submit_blocking(transfers.clone())? == vec![TransferResult::Ok; transfers.len()]);
    check(&engine, rounds)
}

#[test]
fn a_thousand_racing_debits_of_one_wallet_only_one_wins() -> anyhow::Result<()> {
    const SHARDS: u16 = 4;
    let dir = tempfile::tempdir()?;
    let engine = open(dir.path(), SHARDS)?;
    world(&engine, 40, 0)?;
    let payer = AccountId(1);
    let payees: Vec<AccountId> = (2..=40).map(AccountId).collect();
    let shards: std::collections::BTreeSet<u16> = payees.iter().map(|p| home_shard(*p, SHARDS).0).collect();
    anyhow::ensure!(shards.len() == usize::from(SHARDS), "payees cover shards {shards:?} only");
    let mut received = vec![0_i128; payees.len()];
    for round in 0..rounds() {
        let funding = Transfer::new(1 + u128::from(round), ISSUANCE, payer, 100);
        anyhow::ensure!(engine.submit_blocking(vec![funding])? == [TransferResult::Ok]);
        let debits: Vec<Transfer> = (0..1_000_u16)
            .map(|i| {
                let payee = payees[(usize::from(i) + usize::try_from(round).unwrap_or(0)) % payees.len()];
                Transfer::new(1_000_000 + u128::from(round) * 1_000 + u128::from(i), payer, payee, 100)
            })
            .collect();
        let results = submit_all_at_once(&engine, debits.clone(), 4)?;
        let winners: Vec<usize> = (0..debits.len()).filter(|i| results[*i].is_ok()).collect();
        let refused = results.iter().filter(|r| **r == TransferResult::ExceedsCredits).count();
        anyhow::ensure!(winners.len() == 1 && refused == 999, "round {round}: {results:?}");
        let winner =
            payees.iter().position(|p| *p == debits[winners[0]].credit_account_id).context("payee")?;
        received[winner] += 100;
        let account = balance(&engine, payer)?;
        anyhow::ensure!(account.balance_posted() == 0 && account.debits_pending == 0, "{account:?}");
        for (payee, expected) in payees.iter().zip(&received) {
            let account = balance(&engine, *payee)?;
            anyhow::ensure!(account.balance_posted() == *expected, "round {round}: {account:?}");
        }
        assert_balanced(&engine)?;
    }
    Ok(())
}

fn hold(id: u128, debit: AccountId, credit: AccountId, amount: u64, timeout_s: u32) -> Transfer {
    Transfer { flags: TransferFlags::PENDING, timeout_s, ..Transfer::new(id, debit, credit, amount) }
}

fn post(id: u128, pending: &Transfer, amount: u64) -> Transfer {
    Transfer {
        flags: TransferFlags::POST_PENDING,
        pending_id: pending.id,
        ..Transfer::new(id, pending.debit_account_id, pending.credit_account_id, amount)
    }
}

fn manual_config(dir: &std::path::Path, clock: &Arc<ManualClock>, shards: u16, views: bool) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = shards;
    config.views = views;
    config.clock = clock.clone();
    config
}

#[test]
fn holds_expire_on_the_manual_clock_and_stay_expired_across_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let engine = Engine::open(manual_config(dir.path(), &clock, 2, false))?;
    world(&engine, 10, 1_000)?;
    let (a, b) = same_shard_pair(10, 2)?;
    let early = hold(10, a, b, 400, 30);
    let forever = hold(11, a, b, 50, 0);
    anyhow::ensure!(engine.submit_blocking(vec![early, forever])? == [TransferResult::Ok; 2]);
    anyhow::ensure!(balance(&engine, a)?.debits_pending == 450);

    // Not a moment early: at 29 s a partial post of another 30 s hold still works.
    let partial = hold(12, a, b, 100, 30);
    anyhow::ensure!(engine.submit_blocking(vec![partial])? == [TransferResult::Ok]);
    clock.advance_s(29);
    anyhow::ensure!(engine.submit_blocking(vec![post(13, &partial, 60)])? == [TransferResult::Ok]);

    // Past 30 s: the lookup is the shard's next message, and the shard expires holds first.
    clock.advance_s(2);
    let account = balance(&engine, a)?;
    anyhow::ensure!(account.debits_pending == 50 && account.balance_posted() == 1_000 - 60, "{account:?}");
    anyhow::ensure!(balance(&engine, b)?.credits_pending == 50);
    let stored = block_on(engine.lookup_transfers(&[early.id]))?.pop().flatten().context("hold lost")?;
    anyhow::ensure!(stored.state == TransferState::PendingExpired, "{stored:?}");
    anyhow::ensure!(
        engine.submit_blocking(vec![post(14, &early, 0)])? == [TransferResult::PendingTransferExpired]
    );

    // A hold that passes its timeout while the engine is down expires when it comes back.
    let offline = hold(15, a, b, 200, 30);
    anyhow::ensure!(engine.submit_blocking(vec![offline])? == [TransferResult::Ok]);
    engine.checkpoint()?;
    engine.shutdown();
    drop(engine);
    clock.advance_s(31);
    let engine = Engine::open(manual_config(dir.path(), &clock, 2, false))?;
    anyhow::ensure!(
        engine.submit_blocking(vec![post(16, &offline, 0)])? == [TransferResult::PendingTransferExpired]
    );
    anyhow::ensure!(
        engine.submit_blocking(vec![post(14, &early, 0)])? == [TransferResult::PendingTransferExpired]
    );
    let stored = block_on(engine.lookup_transfers(&[early.id, forever.id, offline.id]))?;
    let states: Vec<Option<TransferState>> = stored.iter().map(|s| s.map(|s| s.state)).collect();
    anyhow::ensure!(
        states
            == [
                Some(TransferState::PendingExpired),
                Some(TransferState::Pending),
                Some(TransferState::PendingExpired)
            ],
        "{states:?}"
    );
    let account = balance(&engine, a)?;
    anyhow::ensure!(
        account.debits_pending == 50 && account.balance_available() == 1_000 - 60 - 50,
        "{account:?}"
    );
    anyhow::ensure!(engine.submit_blocking(vec![post(17, &forever, 0)])? == [TransferResult::Ok]);
    anyhow::ensure!(balance(&engine, a)?.balance_posted() == 1_000 - 60 - 50);
    assert_balanced(&engine)
}

/// Each checkpoint writes only the final transfers since the one before (a done segment) and
/// lists all of them: after restarts, transfers of every segment are still known by id.
#[test]
fn final_transfers_of_every_checkpoint_are_known_after_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (same, cross) = (same_shard_pair(10, 2)?, cross_shard_pair(10, 2)?);
    let round = |n: u128| -> Vec<Transfer> {
        vec![Transfer::new(n * 10 + 1, same.0, same.1, 5), Transfer::new(n * 10 + 2, cross.0, cross.1, 7)]
    };
    let submitted = |rounds: u128| (1..=rounds).flat_map(round).collect::<Vec<_>>();
    let check = |engine: &Engine, rounds: u128| -> anyhow::Result<()> {
        let all = submitted(rounds);
        // Another body under a known id is refused: the id is remembered, whichever segment.
        let changed: Vec<Transfer> = all.iter().map(|t| Transfer { amount: t.amount + 1, ..*t }).collect();
        let refused = engine.submit_blocking(changed)?;
        anyhow::ensure!(refused.iter().all(|r| *r == TransferResult::ExistsWithDifferentBody), "{refused:?}");
        // The same body is answered as before and moves nothing again.
        let retried = engine.submit_blocking(all)?;
        anyhow::ensure!(retried.iter().all(|r| *r == TransferResult::Ok), "{retried:?}");
        let moved = i128::try_from(rounds)?;
        anyhow::ensure!(balance(engine, same.1)?.balance_posted() == 1_000 + 5 * moved);
        anyhow::ensure!(balance(engine, cross.1)?.balance_posted() == 1_000 + 7 * moved);
        assert_balanced(engine)
    };
    let engine = open(dir.path(), 2)?;
    world(&engine, 10, 1_000)?;
    for n in 1..=3 {
        anyhow::ensure!(engine.submit_blocking(round(n))? == [TransferResult::Ok; 2]);
        engine.checkpoint()?;
    }
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 2)?;
    anyhow::ensure!(engine.recovery_report().checkpoint_loaded);
    check(&engine, 3)?;
    // The chain goes on from a recovered engine: one more round, replayed and then checkpointed.
    anyhow::ensure!(engine.submit_blocking(round(4))? == [TransferResult::Ok; 2]);
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 2)?;
    engine.checkpoint()?;
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 2)?;
    check(&engine, 4)?;
    let segments = std::fs::read_dir(dir.path().join("checkpoints"))?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".qds"))
        .count();
    anyhow::ensure!(segments == 4, "{segments} done segments");
    engine.shutdown();
    Ok(())
}

/// A checkpoint that cannot be written keeps the final transfers the shards handed it: the next
/// one writes them, and they are still known after a restart.
#[test]
fn final_transfers_of_a_failed_checkpoint_go_into_the_next() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = cross_shard_pair(10, 2)?;
    let first = vec![Transfer::new(501, a, b, 3), Transfer::new(502, b, a, 2)];
    let second = vec![Transfer::new(503, a, b, 4)];
    let engine = open(dir.path(), 2)?;
    world(&engine, 10, 1_000)?;
    anyhow::ensure!(engine.submit_blocking(first.clone())? == [TransferResult::Ok; 2]);
    // A file where the checkpoint directory should be: the write fails after the capture.
    let checkpoints = dir.path().join("checkpoints");
    let _gone = std::fs::remove_dir_all(&checkpoints);
    std::fs::write(&checkpoints, b"not a directory")?;
    anyhow::ensure!(engine.checkpoint().is_err(), "a checkpoint was written into a file");
    std::fs::remove_file(&checkpoints)?;
    anyhow::ensure!(engine.submit_blocking(second.clone())? == [TransferResult::Ok]);
    engine.checkpoint()?;
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 2)?;
    anyhow::ensure!(engine.recovery_report().checkpoint_loaded);
    let all: Vec<Transfer> = first.iter().chain(&second).copied().collect();
    let changed: Vec<Transfer> = all.iter().map(|t| Transfer { amount: t.amount + 1, ..*t }).collect();
    let refused = engine.submit_blocking(changed)?;
    anyhow::ensure!(refused.iter().all(|r| *r == TransferResult::ExistsWithDifferentBody), "{refused:?}");
    anyhow::ensure!(balance(&engine, b)?.balance_posted() == 1_000 + 3 - 2 + 4);
    assert_balanced(&engine)?;
    engine.shutdown();
    Ok(())
}

#[test]
fn views_list_history_in_time_order_and_reindex_rebuilds_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let engine = Engine::open(manual_config(dir.path(), &clock, 2, true))?;
    world(&engine, 6, 1_000)?;
    let me = AccountId(1);
    let (_, near) = same_shard_pair(6, 2)?;
    let (_, far) = cross_shard_pair(6, 2)?;
    // Local and cross-shard, both directions, a refusal of each kind that never reaches the
    // views, and a hold with its partial post. One second apart, so time order is known.
    let steps: Vec<(Transfer, TransferResult)> = vec![
        (Transfer::new(101, me, near, 10), TransferResult::Ok),
        (Transfer::new(102, far, me, 20), TransferResult::Ok),
        (Transfer::new(103, me, far, 5_000), TransferResult::ExceedsCredits),
        (Transfer::new(104, me, far, 30), TransferResult::Ok),
        (Transfer::new(105, me, AccountId(99), 1), TransferResult::CreditAccountNotFound),
        (hold(106, near, me, 40, 0), TransferResult::Ok),
        (post(107, &hold(106, near, me, 40, 0), 25), TransferResult::Ok),
        (Transfer::new(108, near, me, 50), TransferResult::Ok),
    ];
    for (transfer, expected) in &steps {
        clock.advance_s(1);
        let found = engine.submit_blocking(vec![*transfer])?;
        anyhow::ensure!(found == [*expected], "{transfer:?}: {found:?}");
    }
    let posted: Vec<Transfer> = steps.iter().filter(|(_, r)| r.is_ok()).map(|(t, _)| *t).collect();
    let views = engine.views().context("views are on")?;
    block_on(engine.settle())?;
    anyhow::ensure!(
        views.wait_for(engine.journal().durable(), Duration::from_secs(10)),
        "{:?}",
        views.error()
    );

    let history = views.history(me, 0, 100)?;
    // The funding line comes first; then this account's lines in submission order.
    let lines: Vec<(u128, AccountId, u64, bool)> =
        history.iter().map(|l| (l.transfer_id.0, l.other_account, l.amount, l.debit)).collect();
    let expected: Vec<(u128, AccountId, u64, bool)> = std::iter::once(qepik_tests::funding(1, 1_000))
        .chain(posted.iter().copied())
        .map(|t| {
            let debit = t.debit_account_id == me;
            (t.id.0, if debit { t.credit_account_id } else { t.debit_account_id }, t.amount, debit)
        })
        .collect();
    anyhow::ensure!(lines == expected, "history {lines:?}\nexpected {expected:?}");
    // Ordered by where each line was booked (a cross-shard line is booked at its finalize, later
    // than the ledger applied its reserve).
    anyhow::ensure!(history.windows(2).all(|w| w[0].position() < w[1].position()), "{history:?}");
    anyhow::ensure!(
        history[1..]
            .iter()
            .map(|l| l.pending)
            .eq(posted.iter().map(|t| t.flags.contains(TransferFlags::PENDING)))
    );
    // `from_ns` (a booked time) and `limit` cut the same list.
    let from = views.history(me, history[3].booked_at, 100)?;
    let booked_with = history.iter().take_while(|l| l.booked_at < history[3].booked_at).count();
    anyhow::ensure!(from == history[booked_with..], "{from:?}");
    anyhow::ensure!(views.history(me, 0, 2)? == history[..2]);
    for transfer in &posted {
        let (position, found, _) =
            views.transfer(transfer.id)?.with_context(|| format!("{} not indexed", transfer.id))?;
        anyhow::ensure!(
            found == *transfer && position <= engine.journal().durable(),
            "{found:?} at {position}"
        );
    }
    for (refused, _) in steps.iter().filter(|(_, r)| !r.is_ok()) {
        anyhow::ensure!(views.transfer(refused.id)?.is_none(), "refused {} is indexed", refused.id);
    }
    let histories: Vec<_> =
        [me, near, far].iter().map(|a| views.history(*a, 0, 100)).collect::<Result<_, _>>()?;
    engine.shutdown();
    drop(engine);

    // From scratch: the rebuilt views hold exactly the same, and only what the reindex wrote (the
    // views are opened with nothing durable, so their tail thread reads nothing).
    std::fs::remove_dir_all(dir.path().join("views"))?;
    let reached = engine::views::reindex(dir.path())?;
    let views = Views::open(&dir.path().join("views"), &dir.path().join("journal"), JournalState::new(0))?;
    anyhow::ensure!(views.applied() == reached);
    let rebuilt: Vec<_> =
        [me, near, far].iter().map(|a| views.history(*a, 0, 100)).collect::<Result<_, _>>()?;
    anyhow::ensure!(rebuilt == histories, "rebuilt {rebuilt:?}\nbefore {histories:?}");
    for transfer in &posted {
        anyhow::ensure!(
            views.transfer(transfer.id)?.is_some_and(|(_, t, _)| t == *transfer),
            "{}",
            transfer.id
        );
    }
    views.stop();
    Ok(())
}

/// Regression: a hold between shards whose id was used before answered `ExistsWithDifferentBody`
/// although `CrossShardMustBePlain` comes first in `TransferResult` (found by `model`).
#[test]
fn a_cross_shard_hold_is_refused_for_its_shards_before_its_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(dir.path(), 2)?;
    world(&engine, 10, 1_000)?;
    let (a, b) = cross_shard_pair(10, 2)?;
    let (_, near) = same_shard_pair(10, 2)?;
    anyhow::ensure!(engine.submit_blocking(vec![Transfer::new(5, a, near, 1)])? == [TransferResult::Ok]);
    let results = engine.submit_blocking(vec![hold(5, a, b, 1, 0)])?;
    anyhow::ensure!(results == [TransferResult::CrossShardMustBePlain], "{results:?}");
    Ok(())
}

/// Regression: a linked chain runs on its first member's shard; a member whose accounts live on
/// another shard answered `DebitAccountNotFound` (or `ExistsWithDifferentBody`) instead of
/// `CrossShardMustBePlain` (found by `model`).
#[test]
fn a_linked_chain_across_shards_is_cross_shard_must_be_plain() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(dir.path(), 2)?;
    world(&engine, 10, 1_000)?;
    let (a, b) = cross_shard_pair(10, 2)?;
    let first = Transfer { flags: TransferFlags::LINKED, ..Transfer::new(6, ISSUANCE, a, 10) };
    let second = Transfer::new(7, b, ISSUANCE, 10);
    let results = engine.submit_blocking(vec![first, second])?;
    anyhow::ensure!(
        results == [TransferResult::LinkedEventFailed, TransferResult::CrossShardMustBePlain],
        "{results:?}"
    );
    anyhow::ensure!(balance(&engine, a)?.balance_posted() == 1_000);
    Ok(())
}

/// Regression: recovery checked debits against credits before finishing cross-shard transfers
/// caught in flight, so a crash between a credit step and its finalize (the credit posted, the
/// debit still pending) left a data directory the engine refused to open (found by `crash`).
#[test]
fn recovery_finishes_a_transfer_caught_between_its_credit_and_its_finalize() -> anyhow::Result<()> {
    caught_between_credit_and_finalize(false)
}

/// The same journal written in the previous record layout (version 3, every command as large
/// as the largest): it still recovers, takes new records in the current layout after the old
/// ones, and recovers again.
#[test]
fn a_journal_of_the_previous_layout_recovers_and_grows() -> anyhow::Result<()> {
    caught_between_credit_and_finalize(true)
}

fn caught_between_credit_and_finalize(old_layout: bool) -> anyhow::Result<()> {
    use engine::ShardId;
    use engine::journal::frame::write_frame;
    use engine::journal::record::{
        FORMAT_VERSION, FORMAT_VERSION_V3, WalCommand, WalRecord, encode, encode_record,
    };
    use engine::ledger::Command;

    let dir = tempfile::tempdir()?;
    let (a, b) = cross_shard_pair(10, 2)?;
    let (shard_a, shard_b) = (home_shard(a, 2), home_shard(b, 2));
    let now = 1_700_000_000_000_000_000;
    let created = |account: Account| Account { timestamp: now, ..account };
    let fund_a = qepik_tests::funding(a.0, 1_000);
    let transfer = Transfer::new(9, a, b, 300);
    let mut bytes = Vec::new();
    let write = |bytes: &mut Vec<u8>, record: WalRecord| -> anyhow::Result<()> {
        if old_layout {
            write_frame(bytes, FORMAT_VERSION_V3, &encode(&record)?);
        } else {
            write_frame(bytes, FORMAT_VERSION, &encode_record(&record)?);
        }
        Ok(())
    };
    let batch = |shard: ShardId, timestamp: u64, commands: &[Command]| WalRecord::Batch {
        shard: shard.0,
        timestamp,
        commands: commands.iter().map(WalCommand::from).collect(),
    };
    write(&mut bytes, WalRecord::Meta { shard_count: 2 })?;
    for shard in [ShardId(0), ShardId(1)] {
        let mut commands = vec![Command::CreateAccount(created(qepik_tests::issuance()))];
        for wallet in [a, b].into_iter().filter(|w| home_shard(*w, 2) == shard) {
            commands.push(Command::CreateAccount(created(qepik_tests::wallet(wallet.0))));
        }
        write(&mut bytes, batch(shard, now, &commands))?;
    }
    write(&mut bytes, batch(shard_a, now, &[Command::Transfer(fund_a)]))?;
    write(&mut bytes, batch(shard_a, now + 1, &[Command::Reserve(transfer)]))?;
    write(&mut bytes, batch(shard_b, now + 2, &[Command::Credit(transfer)]))?;
    std::fs::create_dir_all(dir.path().join("journal"))?;
    std::fs::write(dir.path().join("journal").join(format!("{:020}.wal", 0)), &bytes)?;

    let engine = open(dir.path(), 2)?;
    anyhow::ensure!(engine.recovery_report().in_flight_resolved > 0, "{:?}", engine.recovery_report());
    let (debit, credit) = (balance(&engine, a)?, balance(&engine, b)?);
    anyhow::ensure!(debit.balance_posted() == 700 && debit.debits_pending == 0, "{debit:?}");
    anyhow::ensure!(credit.balance_posted() == 300, "{credit:?}");
    let status = block_on(engine.lookup_transfers(&[transfer.id]))?.pop().flatten().context("lost")?;
    anyhow::ensure!(status.state == TransferState::Posted, "{status:?}");
    anyhow::ensure!(engine.submit_blocking(vec![transfer])? == [TransferResult::Ok]);
    let more = Transfer::new(10, a, b, 50);
    anyhow::ensure!(engine.submit_blocking(vec![more])? == [TransferResult::Ok]);
    assert_balanced(&engine)?;
    drop(engine);

    let engine = open(dir.path(), 2)?;
    let (debit, credit) = (balance(&engine, a)?, balance(&engine, b)?);
    anyhow::ensure!(debit.balance_posted() == 650 && credit.balance_posted() == 350, "{debit:?} {credit:?}");
    anyhow::ensure!(engine.submit_blocking(vec![more])? == [TransferResult::Ok], "a retry after restart");
    assert_balanced(&engine)
}

/// A linked chain that leaves its shard through one transfer posts every member together, the
/// views index every member (the held ones once the crossing transfer finalizes), and a
/// voided chain leaves nothing indexed.
#[test]
fn a_chain_crossing_shards_is_indexed_whole_by_the_views() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open(dir.path(), 2)?;
    world(&engine, 20, 1_000)?;
    let (a, b) = cross_shard_pair(20, 2)?;
    let linked = |t: Transfer| Transfer { flags: TransferFlags::LINKED, ..t };
    // The second leg credits the spread issuance account, local to the payer's shard.
    let chain = vec![linked(Transfer::new(501, a, b, 300)), Transfer::new(502, a, ISSUANCE, 7)];
    assert_eq!(engine.submit_blocking(chain.clone())?, [TransferResult::Ok, TransferResult::Ok]);
    // Overdrawn by its second leg: refused whole.
    let refused = vec![linked(Transfer::new(503, a, b, 600)), Transfer::new(504, a, ISSUANCE, 200)];
    assert_eq!(
        engine.submit_blocking(refused.clone())?,
        [TransferResult::LinkedEventFailed, TransferResult::ExceedsCredits]
    );
    assert_eq!(balance(&engine, a)?.balance_posted(), 1_000 - 307);
    assert_eq!(balance(&engine, b)?.balance_posted(), 1_300);
    assert!(engine.totals()?.values().all(|t| t.balanced()));
    let views = engine.views().context("views are on")?;
    block_on(engine.settle())?;
    anyhow::ensure!(
        views.wait_for(engine.journal().durable(), Duration::from_secs(10)),
        "{:?}",
        views.error()
    );
    for transfer in &chain {
        let indexed = views.transfer(transfer.id)?.with_context(|| format!("{} not indexed", transfer.id))?;
        assert_eq!(indexed.1, *transfer);
    }
    for transfer in &refused {
        assert!(views.transfer(transfer.id)?.is_none(), "refused {} is indexed", transfer.id);
    }
    let lines: Vec<u128> = views.history(a, 0, 100)?.iter().map(|l| l.transfer_id.0).collect();
    assert!(lines.contains(&501) && lines.contains(&502), "{lines:?}");
    Ok(())
}

/// A data directory in use by a running engine is refused to a second one, and free again once
/// the first shuts down.
#[test]
fn a_data_directory_opens_in_one_engine_at_a_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let first = open(dir.path(), 2)?;
    match open(dir.path(), 2) {
        Err(error) => anyhow::ensure!(error.to_string().contains("in use by another engine"), "{error}"),
        Ok(_) => anyhow::bail!("a second engine opened a directory in use"),
    }
    // The views' stores close when the engine is dropped, not at `shutdown`.
    first.shutdown();
    drop(first);
    let again = open(dir.path(), 2)?;
    again.shutdown();
    Ok(())
}
