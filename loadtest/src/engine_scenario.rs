//! The `engine` scenario: the engine in-process, durable, with its views running.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use engine::{
    Account, AccountFlags, AccountId, AccountKind, CreateAccountResult, Currency, Engine, EngineConfig,
    Transfer, TransferResult,
};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

/// Funds every wallet; large enough that random transfers almost never run a wallet dry.
const FUNDING_MINOR: u64 = 10_000_000;
const ISSUANCE: AccountId = engine::domain::system::EMONEY_ISSUANCE;
/// The hot account: a spread system account (say, a biller's settlement account).
const HOT: AccountId = AccountId::spread(10);
const SETUP_BATCH: usize = 8_190;
/// Wallet `i`'s number under `--policy full`: +994 50 000 00 00 + i.
const MSISDN_BASE: u64 = 994_500_000_000;

/// What the engine checks on each transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyMode {
    /// Plain ledger transfers between accounts without wallet records.
    None,
    /// MSISDN wallets with tier limits checked on every debit and credit, and every P2P a linked
    /// chain of the principal and a fee to fee income (two transfers an operation).
    Full,
}

impl PolicyMode {
    fn wallet(self, i: u64) -> AccountId {
        match self {
            PolicyMode::None => AccountId(i),
            PolicyMode::Full => AccountId::wallet(MSISDN_BASE + i, Currency::Azn),
        }
    }
}

/// Limits that a random workload does not reach (the checks run; they rarely refuse), in one
/// tier, and the P2P tariff: 0.10 AZN + 0.5 %, at least 0.20, at most 5 AZN.
fn load_policy() -> engine::wallet::Policy {
    let mut policy = engine::wallet::Policy::default();
    let limits = engine::wallet::Limits {
        max_balance: 100_000_000,
        max_per_operation: 1_000_000,
        daily_amount: 10_000_000,
        daily_count: 10_000,
        monthly_amount: 100_000_000,
        monthly_count: 100_000,
    };
    policy.tiers = vec![engine::wallet::Tier {
        code: 0,
        name: "load".into(),
        limits: vec![(Currency::Azn as u8, limits)],
    }];
    policy
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Wallets to create and fund before the run.
    #[arg(long, default_value_t = 1_000_000)]
    accounts: u64,
    /// How long the measured run lasts.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Threads submitting transfers, each waiting for its batch's answer before the next.
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// Transfers per submission (a client-side batch, as kiosks and gateways send them).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Ledger shards (default: one per core).
    #[arg(long)]
    shards: Option<u16>,
    /// Share of transfers (0–100) that credit one single hot account.
    #[arg(long, default_value_t = 0)]
    hot_percent: u8,
    /// Data directory (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run without the sled views (to measure their cost).
    #[arg(long)]
    no_views: bool,
    /// How long to wait at the end for the views to catch up before estimating from their rate.
    #[arg(long, default_value_t = 20)]
    views_wait_s: u64,
    /// After the run, reopen the engine and time the recovery (journal replay).
    #[arg(long)]
    measure_recovery: bool,
    /// Journal growth (MiB) between automatic checkpoints; 0 turns them off for the run, to
    /// measure what they cost (default: the engine's, 1 GiB).
    #[arg(long)]
    checkpoint_every_mib: Option<u64>,
    /// Seed of the random workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `none`: plain transfers; `full`: wallet policy (tier limits, a fee leg on every P2P).
    #[arg(long, value_enum, default_value_t = PolicyMode::None)]
    policy: PolicyMode,
    /// Acknowledge the views' notifications as they are enqueued (as an SMS sender that keeps
    /// up would), instead of letting them pile up in the outbox for the run. Only `--policy
    /// full` makes notifications (plain accounts have no wallets to notify).
    #[arg(long)]
    drain_outbox: bool,
    /// Print one row a second of the run: transfers, p50, p99 and the slowest answer, the
    /// journal's fdatasyncs and their mean, how far the views are behind; to see when a stall
    /// happened (a checkpoint, a flush) and where, rather than only that it did.
    #[arg(long)]
    timeline: bool,
}

struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
}

/// What one submitter measured: over the whole run, and second by second of it.
struct Measured {
    latency: Histogram<u64>,
    seconds: Vec<Histogram<u64>>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.accounts >= 2, "--accounts must be at least 2");
    ensure!(args.hot_percent <= 100, "--hot-percent must be 0..=100");
    ensure!(args.batch >= 1 && args.batch <= engine::limits::SUBMIT_LEN_MAX, "--batch must be 1..=8190");
    ensure!(args.submitters >= 1, "--submitters must be at least 1");
    ensure!(
        args.policy == PolicyMode::None || args.batch * 2 <= engine::limits::SUBMIT_LEN_MAX,
        "--policy full sends two transfers an operation: --batch must be 1..=4095"
    );
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("qepik-loadtest-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut config = EngineConfig::new(&data_dir);
    if let Some(shards) = args.shards {
        config.shard_count = shards;
    }
    config.views = !args.no_views;
    if let Some(mib) = args.checkpoint_every_mib {
        config.checkpoint_every_bytes = mib.saturating_mul(1024 * 1024);
    }
    let shards = config.shard_count;
    let engine = Engine::open(config.clone()).context("opening the engine")?;

    let setup_started = Instant::now();
    let domain = match args.policy {
        PolicyMode::None => None,
        PolicyMode::Full => Some(open_domain(&engine)?),
    };
    setup(&engine, domain.as_ref(), args.accounts)?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    let position_before = engine.journal().durable();
    // Let the views index the setup before the measured run, within the same bound.
    if let Some(views) = engine.views() {
        views.wait_for(position_before, Duration::from_secs(args.views_wait_s));
    }
    eprintln!("setup: {} wallets funded in {setup_s:.1} s", args.accounts);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally { ok: AtomicU64::new(0), refused: AtomicU64::new(0) });
    let drainer = match engine.views() {
        Some(views) if args.drain_outbox => Some(spawn_drainer(views.outbox(), stop.clone())?),
        _ => None,
    };
    let started = Instant::now();
    // The journal's fdatasyncs and the views' progress, sampled each second for the timeline.
    let sampler = args.timeline.then(|| {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = started + Duration::from_secs(1);
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += Duration::from_secs(1);
                let journal = engine.journal();
                let behind =
                    engine.views().map_or(0, |views| journal.durable().saturating_sub(views.applied()));
                samples.push((
                    journal.syncs.load(Ordering::Relaxed),
                    journal.sync_ns_total.load(Ordering::Relaxed),
                    behind,
                ));
            }
            samples
        })
    });
    let workers: Vec<_> = (0..args.submitters)
        .map(|worker| {
            let (engine, stop, tally) = (engine.clone(), stop.clone(), tally.clone());
            let (accounts, batch, hot_percent) = (args.accounts, args.batch, args.hot_percent);
            let timeline = args.timeline;
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(worker as u64);
            let domain = domain.clone();
            std::thread::spawn(move || {
                let load = Load { accounts, batch_len: batch, hot_percent, domain, started, timeline };
                submitter(&engine, &stop, &tally, worker, seed, &load)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(args.duration_s));
    stop.store(true, Ordering::Release);
    let mut latency = histogram()?;
    let mut seconds: Vec<Histogram<u64>> = Vec::new();
    for worker in workers {
        let measured = worker.join().map_err(|_| anyhow::anyhow!("a submitter panicked"))??;
        latency.add(&measured.latency)?;
        for (second, part) in measured.seconds.iter().enumerate() {
            if seconds.len() <= second {
                seconds.push(histogram()?);
            }
            seconds[second].add(part)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let samples = match sampler {
        Some(sampler) => sampler.join().map_err(|_| anyhow::anyhow!("the timeline sampler panicked"))?,
        None => Vec::new(),
    };
    let drained = match drainer {
        Some(drainer) => Some(drainer.join().map_err(|_| anyhow::anyhow!("the outbox drainer panicked"))??),
        None => None,
    };
    let ok = tally.ok.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    let per_s = (ok + refused) as f64 / elapsed;
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
    let transfers_per_s =
        u64::try_from(u128::from(ok + refused) * 1_000_000 / u128::from(elapsed_us)).unwrap_or(u64::MAX);

    // Views: how far behind the journal they are at the end, and how fast they catch up.
    let journal_end = engine.journal().durable();
    // The wait is bounded: past it, the catch-up rate measured so far gives an estimate.
    let views_report = engine.views().map(|views| {
        let applied_at_end = views.applied();
        let behind = journal_end.saturating_sub(applied_at_end);
        let catch_up = Instant::now();
        let caught = views.wait_for(journal_end, Duration::from_secs(args.views_wait_s));
        let waited_s = catch_up.elapsed().as_secs_f64();
        let done = views.applied().saturating_sub(applied_at_end);
        let rate_bytes_per_s = if waited_s > 0.0 { done as f64 / waited_s } else { 0.0 };
        let catch_up_s = if caught {
            waited_s
        } else if rate_bytes_per_s > 0.0 {
            behind as f64 / rate_bytes_per_s
        } else {
            f64::INFINITY
        };
        (behind, catch_up_s, caught, views.error(), rate_bytes_per_s)
    });

    let conserved = conserved(&engine, args.policy, args.accounts)?;
    let rss_mib = rss_mib();
    let journal_mib = (journal_end - position_before) as f64 / 1_048_576.0;
    let syncs = engine.journal().syncs.load(Ordering::Relaxed);
    let sync_ns = engine.journal().sync_ns_total.load(Ordering::Relaxed);
    let stats = engine.shard_stats();

    println!(
        "scenario            engine (durable journal, {shards} shards, views {})",
        if args.no_views { "off" } else { "on" }
    );
    println!("wallets             {}", args.accounts);
    println!("submitters x batch  {} x {}", args.submitters, args.batch);
    println!("hot account share   {} %", args.hot_percent);
    println!("policy              {:?}", args.policy);
    println!("duration            {elapsed:.2} s");
    let unit = if args.policy == PolicyMode::Full { "operations (P2P + fee chains)" } else { "transfers" };
    println!("{unit:<19} {} ok, {} refused", ok, refused);
    println!("throughput          {per_s:.0} {unit}/s");
    println!(
        "latency (per transfer, submit to durable answer)  p50 {} us  p99 {} us  p99.9 {} us  max {} us",
        latency.value_at_quantile(0.50),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
    println!(
        "journal             {journal_mib:.1} MiB, {syncs} fdatasyncs, mean {:.0} us each",
        if syncs > 0 { sync_ns as f64 / syncs as f64 / 1000.0 } else { 0.0 }
    );
    for (shard, (batches, messages)) in stats.iter().enumerate() {
        println!("shard {shard}             {batches} batches, {messages} messages");
    }
    if let Some((behind, catch_up_s, caught, error, rate)) = &views_report {
        println!(
            "views               {:.1} MiB behind the journal at the end; {} {catch_up_s:.1} s (catch-up {:.1} MiB/s){}",
            *behind as f64 / 1_048_576.0,
            if *caught { "caught up in" } else { "would catch up in about" },
            rate / 1_048_576.0,
            error.as_deref().map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
    if let Some(drained) = drained {
        println!("outbox              {drained} notifications acknowledged during the run");
    }
    println!("rss                 {rss_mib} MiB");
    println!("conserved           {conserved}");
    if args.timeline {
        println!(
            "second  transfers  p50_us  p99_us  max_us  syncs  sync_us  views_behind_kib  (by the second each batch was answered)"
        );
        let mut before = (0, 0);
        for (second, part) in seconds.iter().enumerate() {
            let (syncs, sync_us, behind) = match samples.get(second) {
                Some(&(syncs, ns, behind)) => {
                    let (count, ns_in) = (syncs - before.0, ns - before.1);
                    before = (syncs, ns);
                    (count, ns_in.checked_div(count).unwrap_or(0) / 1_000, behind / 1024)
                }
                None => (0, 0, 0),
            };
            println!(
                "{second:>6}  {:>9}  {:>6}  {:>6}  {:>6}  {syncs:>5}  {sync_us:>7}  {behind:>16}",
                part.len(),
                part.value_at_quantile(0.50),
                part.value_at_quantile(0.99),
                part.max()
            );
        }
    }

    // Stop the engine (a checkpoint under way, the shards, the writer, the views and fjall's
    // workers) before a temporary data directory is removed under it.
    engine.shutdown();
    let mut recovery_ms = None;
    if args.measure_recovery {
        drop(engine);
        let mut config = config;
        config.views = false;
        let reopened = Instant::now();
        let engine = Engine::open(config)?;
        let ms = reopened.elapsed().as_millis();
        let report = engine.recovery_report().clone();
        println!(
            "recovery            {ms} ms: {} records, {} commands replayed, checkpoint {}",
            report.records_replayed, report.commands_replayed, report.checkpoint_loaded
        );
        recovery_ms = Some(ms);
        engine.shutdown();
    }

    let mut json = serde_json::json!({
        "scenario": "engine",
        "transfers_per_s": transfers_per_s,
        "policy": format!("{:?}", args.policy).to_lowercase(),
        "p50_us": latency.value_at_quantile(0.50),
        "p99_us": latency.value_at_quantile(0.99),
        "p999_us": latency.value_at_quantile(0.999),
        "conserved": conserved,
    });
    if let Some((behind, catch_up_s, caught, _, _)) = views_report {
        json["views_behind_bytes"] = behind.into();
        json["views_catch_up_s"] = serde_json::json!((catch_up_s * 10.0).round() / 10.0);
        json["views_caught_up"] = caught.into();
    }
    if let Some(ms) = recovery_ms {
        json["recovery_ms"] = serde_json::json!(u64::try_from(ms).unwrap_or(u64::MAX));
    }
    println!("{json}");
    ensure!(conserved, "conservation check failed");
    Ok(())
}

/// Acknowledges the outbox's entries as they come until `stop`; returns how many.
fn spawn_drainer(
    outbox: engine::outbox::Outbox,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<u64>>> {
    Ok(std::thread::Builder::new().name("outbox-drain".into()).spawn(move || {
        let mut drained = 0_u64;
        while !stop.load(Ordering::Acquire) {
            let keys: Vec<_> = outbox.oldest(4_096)?.into_iter().map(|(key, _)| key).collect();
            if keys.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            outbox.ack(&keys)?;
            drained += keys.len() as u64;
        }
        Ok(drained)
    })?)
}

fn open_domain(engine: &Engine) -> anyhow::Result<engine::Domain> {
    let secret = engine::secret::ServerSecret::generate();
    let mut config = engine::DomainConfig::new(Arc::new(secret));
    config.policy = load_policy();
    config.tariffs.set(
        engine::wallet::codes::P2P,
        engine::tariff::Tariff { fixed: 10, percent_bps: 50, min: 20, max: 500 },
    )?;
    Ok(block_on(engine::Domain::open(engine.clone(), config))?)
}

fn setup(engine: &Engine, domain: Option<&engine::Domain>, wallets: u64) -> anyhow::Result<()> {
    let system = vec![
        Account::new(ISSUANCE, Currency::Azn, AccountKind::EMONEY_ISSUANCE, AccountFlags::empty()),
        Account::new(HOT, Currency::Azn, AccountKind::BILLER_SETTLEMENT, AccountFlags::empty()),
    ];
    let results = block_on(engine.create_accounts(system))?;
    ensure!(
        results.iter().all(|r| matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists)),
        "{results:?}"
    );
    let mode = if domain.is_some() { PolicyMode::Full } else { PolicyMode::None };
    // Wallet registrations journal a record and an account each: fewer per message.
    let step = if domain.is_some() { 2_000 } else { SETUP_BATCH as u64 };
    let mut next = 1;
    while next <= wallets {
        let end = (next + step).min(wallets + 1);
        if domain.is_some() {
            let requests = (next..end)
                .map(|i| engine::wallet::WalletRequest::Register {
                    msisdn: MSISDN_BASE + i,
                    currencies: vec![Currency::Azn],
                    tier: 0,
                    pin: None,
                    language: 0,
                    actor: engine::wallet::Actor::system(),
                })
                .collect();
            let answers = block_on(engine.wallet_requests(requests))?;
            ensure!(
                answers.iter().all(|a| matches!(
                    a,
                    engine::wallet::WalletReply::Done
                        | engine::wallet::WalletReply::Refused(engine::wallet::WalletRefusal::Exists)
                )),
                "registration failed: {:?}",
                answers.iter().find(|a| **a != engine::wallet::WalletReply::Done)
            );
        } else {
            let accounts: Vec<Account> = (next..end)
                .map(|id| {
                    Account::new(
                        AccountId(id),
                        Currency::Azn,
                        AccountKind::WALLET,
                        AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                    )
                })
                .collect();
            let results = block_on(engine.create_accounts(accounts))?;
            ensure!(
                results.iter().all(|r| matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists)),
                "{results:?}"
            );
        }
        let funding: Vec<Transfer> = (next..end)
            .map(|id| {
                let mut t = Transfer::new(u128::from(id) << 64, ISSUANCE, mode.wallet(id), FUNDING_MINOR);
                t.code = engine::wallet::codes::ISSUANCE;
                t
            })
            .collect();
        let results = engine.submit_blocking(funding)?;
        ensure!(
            results.iter().all(|r| r.is_ok()),
            "funding failed: {:?}",
            results.iter().find(|r| !r.is_ok())
        );
        next = end;
    }
    Ok(())
}

/// What one submitter sends.
struct Load {
    accounts: u64,
    batch_len: usize,
    hot_percent: u8,
    domain: Option<engine::Domain>,
    /// When the measured run began: the timeline's second zero.
    started: Instant,
    /// Whether to keep a histogram for each second as well (`--timeline`).
    timeline: bool,
}

fn submitter(
    engine: &Engine,
    stop: &AtomicBool,
    tally: &Tally,
    worker: usize,
    seed: u64,
    load: &Load,
) -> anyhow::Result<Measured> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut latency = histogram()?;
    let mut seconds = Vec::new();
    // Ids: the worker in the high bits and a counter below, so no two transfers share one.
    let mut counter: u128 = 0;
    let base = (u128::from(seed) << 80) | ((worker as u128 + 1) << 64);
    let accounts = load.accounts;
    let mode = if load.domain.is_some() { PolicyMode::Full } else { PolicyMode::None };
    let mut batch = Vec::with_capacity(load.batch_len * 2);
    // Where each operation's transfers start in the batch.
    let mut starts = Vec::with_capacity(load.batch_len);
    while !stop.load(Ordering::Acquire) {
        batch.clear();
        starts.clear();
        for _ in 0..load.batch_len {
            counter += 1;
            let debit = rng.random_range(1..=accounts);
            let credit = if rng.random_range(0..100) < load.hot_percent {
                HOT
            } else {
                let mut credit = rng.random_range(1..=accounts);
                if credit == debit {
                    credit = debit % accounts + 1;
                }
                mode.wallet(credit)
            };
            let amount = rng.random_range(1..=100);
            starts.push(batch.len());
            let (op, debit) = (base | counter, mode.wallet(debit));
            match &load.domain {
                None => batch.push(Transfer::new(op, debit, credit, amount)),
                Some(domain) => {
                    let code = engine::wallet::codes::P2P;
                    batch.extend(domain.payment_chain(op, debit, credit, amount, code)?.0);
                }
            }
        }
        let sent = Instant::now();
        let results = engine.submit_blocking(std::mem::take(&mut batch))?;
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
        latency.record_n(micros, starts.len() as u64)?;
        if load.timeline {
            let second = usize::try_from(load.started.elapsed().as_secs()).unwrap_or(usize::MAX);
            while seconds.len() <= second {
                seconds.push(histogram()?);
            }
            seconds[second].record_n(micros, starts.len() as u64)?;
        }
        // An operation is ok when its first transfer is (a chain commits whole).
        let ok = starts.iter().filter(|start| results[**start] == TransferResult::Ok).count() as u64;
        tally.ok.fetch_add(ok, Ordering::Relaxed);
        tally.refused.fetch_add(starts.len() as u64 - ok, Ordering::Relaxed);
        batch = Vec::with_capacity(load.batch_len * 2);
    }
    Ok(Measured { latency, seconds })
}

/// Nothing created or destroyed: debits equal credits per currency, no wallet below zero, and
/// wallets plus the hot account plus fee income hold exactly what issuance put in.
fn conserved(engine: &Engine, mode: PolicyMode, wallets: u64) -> anyhow::Result<bool> {
    let totals = engine.totals()?;
    let balanced = totals.values().all(|t| t.balanced());
    let mut held: i128 = 0;
    let mut negative = false;
    let mut next = 1;
    while next <= wallets {
        let end = (next + 65_536).min(wallets + 1);
        let ids: Vec<AccountId> = (next..end).map(|i| mode.wallet(i)).collect();
        for account in block_on(engine.lookup_accounts(&ids))?.into_iter().flatten() {
            negative |= account.balance_posted() < 0 || account.debits_pending != 0;
            held += account.balance_posted();
        }
        next = end;
    }
    let system = block_on(engine.lookup_accounts(&[HOT, ISSUANCE, engine::domain::system::FEE_INCOME]))?;
    let hot = system[0].map_or(0, |a| a.balance_posted());
    let issued = system[1].map_or(0, |a| -a.balance_posted());
    let fees = system[2].map_or(0, |a| a.balance_posted());
    Ok(balanced
        && !negative
        && held + hot + fees == issued
        && issued == i128::from(wallets) * i128::from(FUNDING_MINOR))
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

use engine::reply::block_on;

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The data directory to recover.
    #[arg(long)]
    data_dir: PathBuf,
    /// Shards the directory was written with (default: one per core).
    #[arg(long)]
    shards: Option<u16>,
}

pub fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    let mut config = EngineConfig::new(&args.data_dir);
    if let Some(shards) = args.shards {
        config.shard_count = shards;
    }
    config.views = false;
    let started = Instant::now();
    let engine = Engine::open(config)?;
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let report = engine.recovery_report().clone();
    println!(
        "recovery            {ms} ms: {} records, {} commands replayed, checkpoint {}, {} torn bytes, {} in-flight steps resolved",
        report.records_replayed,
        report.commands_replayed,
        report.checkpoint_loaded,
        report.torn_bytes,
        report.in_flight_resolved
    );
    println!("rss                 {} MiB", rss_mib());
    engine.shutdown();
    println!(
        "{}",
        serde_json::json!({"scenario": "recover", "recovery_ms": ms, "commands": report.commands_replayed, "records": report.records_replayed})
    );
    Ok(())
}
