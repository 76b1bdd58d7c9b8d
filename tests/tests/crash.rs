//! Crash safety: a child process runs the engine under load and is killed with SIGKILL at a
//! random moment, several times over the same data directory. After each kill the engine is
//! reopened here and checked against what the child was told: an acknowledged transfer is never
//! lost, a refused one never appears, money is neither created nor destroyed.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use engine::journal::record::WalRecord;
use engine::journal::{JournalState, TailRepair};
use engine::ledger::Command as LedgerCommand;
use engine::views::Views;
use engine::{AccountId, TransferId, TransferResult, TransferState};
use qepik_tests::{
    CRASH_FUNDING, CRASH_SHARDS, CRASH_WALLETS, ISSUANCE, block_on, crash_body, open, seed, slow,
};
use rand::{Rng, SeedableRng};

/// What the child was told, over all runs.
#[derive(Debug, Default)]
struct Acks {
    ok: BTreeSet<u128>,
    /// Refused for want of funds, the only refusal this workload can get.
    refused: BTreeSet<u128>,
}

#[test]
fn acknowledged_transfers_survive_sigkill() -> anyhow::Result<()> {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cycles = if slow() { 25 } else { 5 };
    let dir = tempfile::tempdir()?;
    let mut acks = Acks::default();
    for cycle in 0..cycles {
        let run = u32::try_from(cycle + 1)?;
        // Mostly the kill lands in the workload; sometimes it may land in recovery or setup.
        let from_ready = rng.random_bool(0.8);
        let after = Duration::from_millis(rng.random_range(50..=400));
        let lines = run_and_kill(dir.path(), run, from_ready, after)
            .with_context(|| format!("seed {seed}, cycle {cycle}"))?;
        for line in &lines {
            let mut words = line.split(' ');
            if words.next() != Some("ack") {
                continue;
            }
            let id: u128 = words.next().context("ack without id")?.parse()?;
            let code = words.next().context("ack without code")?;
            let result = TransferResult::ALL
                .into_iter()
                .find(|r| r.code() == code)
                .with_context(|| format!("unknown result {code}"))?;
            match result {
                TransferResult::Ok => acks.ok.insert(id),
                TransferResult::ExceedsCredits => acks.refused.insert(id),
                other => anyhow::bail!("seed {seed}: transfer {id} answered {other}"),
            };
        }
        eprintln!(
            "cycle {cycle}: {} lines, {} ok and {} refused so far",
            lines.len(),
            acks.ok.len(),
            acks.refused.len()
        );
        verify(dir.path(), &acks).with_context(|| format!("seed {seed}, after cycle {cycle}"))?;
    }
    anyhow::ensure!(!acks.ok.is_empty(), "seed {seed}: no transfer was acknowledged in {cycles} runs");
    verify_reindex(dir.path(), &acks).with_context(|| format!("seed {seed}: reindex"))?;
    Ok(())
}

/// Runs the child on `dir` and kills it `after` it says ready (or after it starts). Returns the
/// complete lines it printed.
fn run_and_kill(dir: &Path, run: u32, from_ready: bool, after: Duration) -> anyhow::Result<Vec<String>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash-child"))
        .arg(dir)
        .arg(run.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn crash-child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut lines = Vec::new();
        let mut line = Vec::new();
        // Only whole lines count: one cut by the kill ("ack 12 o") has no newline.
        while stdout.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) && line.ends_with(b"\n") {
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if text == "ready" {
                let _gone = ready_tx.send(());
            }
            lines.push(text);
            line.clear();
        }
        lines
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _partial = stderr.read_to_string(&mut text);
        text
    });
    if from_ready {
        // Bounded so that a child that never gets ready still fails the test below.
        let _ready = ready_rx.recv_timeout(Duration::from_secs(60));
    }
    std::thread::sleep(after);
    // `Child::kill` is SIGKILL on Unix: no destructor, no flush, no shutdown runs in the child.
    child.kill().context("kill crash-child")?;
    let status = child.wait()?;
    let lines = reader.join().map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
    let errors = errors.join().map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    anyhow::ensure!(
        status.signal() == Some(libc::SIGKILL),
        "crash-child ended by itself ({status}) before the kill:\n{errors}"
    );
    Ok(lines)
}

/// Reopens the engine after a kill and checks it against the acknowledgements and its journal.
fn verify(dir: &Path, acks: &Acks) -> anyhow::Result<()> {
    let engine = open(dir, CRASH_SHARDS)?;
    eprintln!("recovery: {:?}", engine.recovery_report());
    let views_from = engine.views().map(|v| v.applied());
    eprintln!("views restart at journal position {views_from:?}");
    let ok: Vec<TransferId> = acks.ok.iter().map(|id| TransferId(*id)).collect();
    let found = block_on(engine.lookup_transfers(&ok))?;
    for (id, stored) in ok.iter().zip(&found) {
        let stored = stored.with_context(|| format!("acknowledged transfer {id} is lost"))?;
        anyhow::ensure!(stored.state == TransferState::Posted, "transfer {id} is {:?}", stored.state);
    }
    let refused: Vec<TransferId> = acks.refused.iter().map(|id| TransferId(*id)).collect();
    let found = block_on(engine.lookup_transfers(&refused))?;
    for (id, stored) in refused.iter().zip(&found) {
        anyhow::ensure!(stored.is_none(), "refused transfer {id} is stored: {stored:?}");
    }
    let totals = engine.totals()?;
    anyhow::ensure!(totals.values().all(|t| t.balanced()), "unbalanced: {totals:?}");

    let mut ids: Vec<AccountId> = (1..=CRASH_WALLETS).map(AccountId).collect();
    ids.push(ISSUANCE);
    let accounts = block_on(engine.lookup_accounts(&ids))?;

    // Views catch up on what the crash left behind.
    let views = engine.views().context("views are on")?;
    let durable = engine.journal().durable();
    anyhow::ensure!(views.wait_for(durable, Duration::from_secs(30)), "views stuck: {:?}", views.error());
    for id in &ok {
        // The ledger keeps only a final transfer's state; its body is in the views.
        let indexed = views.transfer(*id)?;
        if let Some((_, transfer, _)) = indexed {
            anyhow::ensure!(
                transfer == crash_body(id.0),
                "transfer {id} indexed with another body: {transfer:?}"
            );
        } else {
            let report = engine.recovery_report().clone();
            engine.shutdown();
            anyhow::bail!(
                "views lack acknowledged transfer {id}; views started at {views_from:?}, waited for {durable}, \
                 recovery {report:?}; journal: {:?}",
                trace(&dir.join("journal"), id.0)?
            );
        }
    }
    // Each account's history, whether the views restarted from a snapshot (cutting the history
    // log back to it) or rebuilt it, runs from line 1 without gaps to the ledger's balance.
    for (id, account) in ids.iter().zip(&accounts) {
        let posted = account.map_or(0, |a| a.balance_posted());
        let lines = views.history(*id, 0, usize::MAX)?;
        let mut balance = 0_i128;
        for (index, line) in lines.iter().enumerate() {
            anyhow::ensure!(line.line == u64::try_from(index)? + 1, "{id}: line {index} is {line:?}");
            balance += line.posted_change();
            anyhow::ensure!(line.balance_after == balance, "{id}: balance after line {}", line.line);
        }
        anyhow::ensure!(balance == posted, "{id}: history ends at {balance}, the ledger holds {posted}");
    }
    engine.shutdown();
    drop(engine);

    // The journal is the record: every acknowledged transfer posted exactly once, none refused,
    // and the balances are exactly what the journal's postings add up to.
    let postings = postings(&dir.join("journal"))?;
    if let Some((id, count)) = postings.iter().find(|(_, count)| **count > 1) {
        anyhow::bail!("transfer {id:x} posted {count} times");
    }
    for id in &acks.ok {
        anyhow::ensure!(postings.contains_key(id), "acknowledged transfer {id:x} never posted");
    }
    for id in &acks.refused {
        anyhow::ensure!(!postings.contains_key(id), "refused transfer {id:x} posted");
    }
    let mut expected: HashMap<AccountId, i128> = HashMap::new();
    for id in postings.keys() {
        let body = crash_body(*id);
        *expected.entry(body.debit_account_id).or_default() -= i128::from(body.amount);
        *expected.entry(body.credit_account_id).or_default() += i128::from(body.amount);
    }
    let mut wallets_total = 0_i128;
    for (id, account) in ids.iter().zip(&accounts) {
        let account = account.with_context(|| format!("account {id} is missing"))?;
        let balance = account.balance_posted();
        anyhow::ensure!(
            balance == expected.get(id).copied().unwrap_or(0),
            "account {id} holds {balance}, its postings say {:?}",
            expected.get(id)
        );
        anyhow::ensure!(account.debits_pending == 0 && account.credits_pending == 0, "{account:?}");
        if *id != ISSUANCE {
            anyhow::ensure!(balance >= 0, "wallet {id} is overdrawn: {balance}");
            wallets_total += balance;
        }
    }
    let funded = (1..=CRASH_WALLETS).filter(|w| postings.contains_key(&crash_body_id_of_funding(*w))).count();
    let issued = i128::from(CRASH_FUNDING) * i128::try_from(funded)?;
    let issuance = accounts.last().copied().flatten().map_or(0, |a| a.balance_posted());
    anyhow::ensure!(
        wallets_total == issued && issuance == -issued,
        "wallets {wallets_total}, issued {issued}"
    );
    Ok(())
}

fn crash_body_id_of_funding(wallet: u64) -> u128 {
    qepik_tests::funding(wallet, CRASH_FUNDING).id.0
}

/// How many times each transfer id was posted according to the journal: a local transfer by its
/// `Transfer` command, a cross-shard one by a successful `Finalize`.
fn postings(journal: &Path) -> anyhow::Result<HashMap<u128, u32>> {
    let mut count: HashMap<u128, u32> = HashMap::new();
    engine::journal::scan::<anyhow::Error>(journal, 0, TailRepair::ReportOnly, |_, record| {
        if let WalRecord::Batch { commands, .. } = record {
            for command in &commands {
                match LedgerCommand::try_from(command)? {
                    LedgerCommand::Transfer(t) => *count.entry(t.id.0).or_default() += 1,
                    LedgerCommand::Finalize { id, result: TransferResult::Ok } => {
                        *count.entry(id.0).or_default() += 1;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    })?;
    Ok(count)
}

/// Where the journal mentions transfer `id`: (record end, shard, command).
fn trace(journal: &Path, id: u128) -> anyhow::Result<Vec<(u64, u16, String)>> {
    let mut found = Vec::new();
    engine::journal::scan::<anyhow::Error>(journal, 0, TailRepair::ReportOnly, |position, record| {
        if let WalRecord::Batch { shard, commands, .. } = record {
            for command in &commands {
                let command = LedgerCommand::try_from(command)?;
                let mentions = match command {
                    LedgerCommand::Transfer(t)
                    | LedgerCommand::Reserve(t)
                    | LedgerCommand::Credit(t)
                    | LedgerCommand::ReserveLinked { transfer: t, .. } => t.id.0 == id,
                    LedgerCommand::Finalize { id: other, .. }
                    | LedgerCommand::Forget { id: other, .. }
                    | LedgerCommand::Expire(other) => other.0 == id,
                    LedgerCommand::CreateAccount(_) | LedgerCommand::Wallet(_) => false,
                };
                if mentions {
                    found.push((position, shard, format!("{command:?}")));
                }
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// sled releases its file lock from its flusher thread, a moment after the last handle to the
/// database is dropped: an open right after may find the lock still held (seen once in CI).
fn retry_lock<T, E: std::fmt::Display + Send + Sync + 'static>(
    mut open: impl FnMut() -> Result<T, E>,
) -> anyhow::Result<T> {
    for _ in 0..50 {
        match open() {
            Err(error) if error.to_string().contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other.map_err(|e| anyhow::anyhow!("{e}")),
        }
    }
    open().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Rebuilds the views from the journal alone and checks that acknowledged transfers have both
/// their history lines. The views are opened with a durable position of 0 so that their tail
/// thread reads nothing: whatever they hold comes from the reindex.
fn verify_reindex(dir: &Path, acks: &Acks) -> anyhow::Result<()> {
    let reached = retry_lock(|| engine::views::reindex(dir))?;
    anyhow::ensure!(reached > 0, "reindex applied nothing");
    let views = retry_lock(|| Views::open(&dir.join("views"), &dir.join("journal"), JournalState::new(0)))?;
    anyhow::ensure!(views.applied() == reached, "applied {} after reindex to {reached}", views.applied());
    for id in acks.ok.iter().step_by(acks.ok.len().div_ceil(20)) {
        let body = crash_body(*id);
        let (_, transfer, at) =
            views.transfer(TransferId(*id))?.with_context(|| format!("{id:x} not indexed"))?;
        anyhow::ensure!(transfer == body, "{id:x} indexed as {transfer:?}");
        for (account, debit) in [(body.debit_account_id, true), (body.credit_account_id, false)] {
            let lines = views.history(account, at, usize::MAX)?;
            anyhow::ensure!(
                lines.iter().any(|line| line.transfer_id.0 == *id
                    && line.debit == debit
                    && line.amount == body.amount
                    && line.timestamp == at),
                "history of {account} lacks {id:x}: {lines:?}"
            );
        }
    }
    views.stop();
    Ok(())
}
