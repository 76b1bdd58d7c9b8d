//! `loadtest ussd`: whole USSD transfer sessions against a running `qepik serve --demo`, the
//! way operators' gateways carry them. The tool binds `--binds` times as the demo operator's
//! gateway ([`channels::ussd::gateway`], server mode: Qepik is the SMSC) and runs
//! `--concurrency` dialogues at once, spread over the binds. Each is a four-step session:
//!
//! 1. dial `*150*2*<to>#` (the send-money shortcut) → the amount prompt;
//! 2. answer `0.01` → the confirmation screen;
//! 3. answer `1` → the PIN prompt;
//! 4. answer the PIN → the "sent" screen, which ends the dialogue.
//!
//! Each step is one submit_sm → submit_sm_resp and one deliver_sm → deliver_sm_resp; the tool
//! counts that pair as one PDU round trip, so a complete session is 4 round trips. Latency is
//! per step: from sending the submit_sm to receiving the screen's deliver_sm.
//!
//! Setup registers, identifies (tier 2) and funds the wallets over HTTP, as `loadtest http`
//! does, with a PIN the tool knows. The gateway keys dialogues by MSISDN, so no two sessions in
//! flight share a sender: dialogue slot `i` sends from wallets `i`, `i + C`, `i + 2C`, … in
//! turn. At the end, the admin trial balance must still balance and the money the sessions
//! moved must have stayed among wallets and fee income.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use channels::ussd::gateway::{Dialogue, Gateway, GatewayError, GatewayScreen};
use channels::ussd::menu;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::http_scenario::{self, Client};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Qepik's SMPP port, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:2775")]
    target: String,
    /// The demo.json the server wrote (HTTP credentials, the demo operator's bind credentials).
    #[arg(long, default_value = "qepik-data/demo.json")]
    credentials: PathBuf,
    /// Qepik's HTTP API, HOST:PORT, for setup and the trial balance (default: the one demo.json
    /// names).
    #[arg(long)]
    http: Option<String>,
    /// Gateway binds (the demo operator allows 64).
    #[arg(long, default_value_t = 4)]
    binds: usize,
    /// How long the measured run lasts; sessions in progress at the end are finished.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Wallets to prepare (raised to twice the concurrency if lower).
    #[arg(long, default_value_t = 2000)]
    wallets: usize,
    /// Sessions in flight at once, over all binds.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

const PIN: &str = "2580";
const AMOUNT: &str = "0.01";
const AMOUNT_MINOR: u64 = 1;
/// Each wallet's funding; at the tier-2 daily count of 500 it outlasts any run.
const FUNDING: &str = "20.00";

/// What each step's screen must show, taken from the menus (the wallets' language is 0,
/// Azerbaijani) so that an edit of a text does not read as a failure.
#[derive(Debug)]
struct Expected {
    ask_amount: String,
    confirm: String,
    ask_pin: String,
    sent: String,
    /// Each refusal's code and the fixed part of its text.
    refusals: Vec<(String, String)>,
}

impl Expected {
    fn new() -> Expected {
        let texts = menu::texts(0);
        let part = |key: &str| fixed_part(texts.text.get(key).map_or(key, String::as_str));
        let mut refusals: Vec<(String, String)> =
            texts.errors.iter().map(|(code, text)| (code.clone(), fixed_part(text))).collect();
        refusals.extend(
            ["unavailable", "busy", "session_over", "invalid_amount", "invalid_pin", "invalid_choice"]
                .map(|key| (key.to_owned(), part(key))),
        );
        Expected {
            ask_amount: part("ask_amount"),
            confirm: part("confirm_send"),
            ask_pin: part("ask_pin"),
            sent: part("sent"),
            refusals,
        }
    }

    /// Why `screen` is not the one step `step` (1–4) should show, or `None` if it is.
    fn check(&self, step: usize, screen: &GatewayScreen) -> Option<String> {
        let (wanted, end) = match step {
            1 => (&self.ask_amount, false),
            2 => (&self.confirm, false),
            3 => (&self.ask_pin, false),
            _ => (&self.sent, true),
        };
        if screen.end == end && screen.text.contains(wanted.as_str()) {
            return None;
        }
        let what = self
            .refusals
            .iter()
            .find(|(_, part)| !part.is_empty() && screen.text.contains(part.as_str()))
            .map_or("unexpected screen", |(code, _)| code.as_str());
        Some(format!("step {step}: {what}"))
    }
}

/// The longest stretch of a template between its `{placeholders}`: every text filled from it
/// contains it.
fn fixed_part(template: &str) -> String {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        parts.push(&rest[..open]);
        rest = rest[open..].find('}').map_or("", |close| &rest[open + close + 1..]);
    }
    parts.push(rest);
    parts.into_iter().max_by_key(|p| p.chars().count()).unwrap_or_default().trim().to_owned()
}

/// The money amounts (`12.34`) in a screen, in minor units.
fn amounts_minor(text: &str) -> Vec<u64> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|word| {
            let word = word.trim_end_matches('.');
            let (units, cents) = word.split_once('.')?;
            if units.is_empty() || cents.len() != 2 {
                return None;
            }
            units.parse::<u64>().ok()?.checked_mul(100)?.checked_add(cents.parse::<u64>().ok()?)
        })
        .collect()
}

/// `+994551234567` → `0551234567`, the way a subscriber types a number.
fn local_number(msisdn: &str) -> String {
    msisdn.strip_prefix("+994").map_or_else(|| msisdn.to_owned(), |rest| format!("0{rest}"))
}

fn error_kind(step: usize, error: &GatewayError) -> String {
    let what = match error {
        GatewayError::Timeout => "timeout".to_owned(),
        GatewayError::Status(status) => format!("status {status:#x}"),
        GatewayError::Closed => "connection closed".to_owned(),
        GatewayError::BindRefused(status) => format!("bind refused {status:#x}"),
        GatewayError::Io(error) => format!("io {}", error.kind()),
    };
    format!("step {step}: {what}")
}

/// One dialogue slot's results.
struct Tally {
    histogram: Histogram<u64>,
    /// The same, per step (dial, amount, confirm, PIN): where the time goes.
    steps: [Histogram<u64>; 4],
    sessions: u64,
    round_trips: u64,
    fees_minor: u64,
    /// Failure kind → (count, the first screen text seen for it).
    failures: BTreeMap<String, (u64, String)>,
}

impl Tally {
    fn new() -> Tally {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        Tally {
            histogram: histogram(),
            steps: [histogram(), histogram(), histogram(), histogram()],
            sessions: 0,
            round_trips: 0,
            fees_minor: 0,
            failures: BTreeMap::new(),
        }
    }

    fn fail(&mut self, kind: String, text: &str) {
        let entry = self.failures.entry(kind).or_insert_with(|| (0, text.replace('\n', " | ")));
        entry.0 += 1;
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.histogram.add(other.histogram)?;
        for (mine, theirs) in self.steps.iter_mut().zip(other.steps) {
            mine.add(theirs)?;
        }
        self.sessions += other.sessions;
        self.round_trips += other.round_trips;
        self.fees_minor += other.fees_minor;
        for (kind, (count, text)) in other.failures {
            self.failures.entry(kind).or_insert((0, text)).0 += count;
        }
        Ok(())
    }
}

/// Step `n` (1–4: a dial or an answer), its latency recorded if the screen came.
async fn step<T>(
    tally: &mut Tally,
    n: usize,
    send: impl std::future::Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    let started = Instant::now();
    let screen = send.await?;
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
    tally.histogram.saturating_record(micros);
    tally.steps[n - 1].saturating_record(micros);
    tally.round_trips += 1;
    Ok(screen)
}

/// One four-step transfer session from `from` to `to`.
async fn session(
    gateway: &Arc<Gateway>,
    expected: &Expected,
    dial_prefix: &str,
    from: &str,
    to: &str,
    tally: &mut Tally,
) {
    let dialled = format!("{dial_prefix}*2*{}#", local_number(to));
    let mut dialogue: Dialogue = match step(tally, 1, gateway.dial(from, &dialled)).await {
        Ok((dialogue, screen)) => {
            if let Some(kind) = expected.check(1, &screen) {
                return tally.fail(kind, &screen.text);
            }
            dialogue
        }
        Err(error) => return tally.fail(error_kind(1, &error), ""),
    };
    for (n, answer) in [(2, AMOUNT), (3, "1"), (4, PIN)] {
        match step(tally, n, dialogue.answer(answer)).await {
            Ok(screen) => {
                if let Some(kind) = expected.check(n, &screen) {
                    return tally.fail(kind, &screen.text);
                }
                if n == 4 {
                    // The screen names the amount and the fee; the fee is the rest.
                    let total: u64 = amounts_minor(&screen.text).iter().sum();
                    tally.fees_minor += total.saturating_sub(AMOUNT_MINOR);
                    tally.sessions += 1;
                }
            }
            Err(error) => return tally.fail(error_kind(n, &error), ""),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.binds >= 1 && args.concurrency >= 1 && args.duration_s >= 1,
        "--binds, --concurrency and --duration-s must be at least 1"
    );
    http_scenario::with_credentials(&args.credentials.clone(), |credentials| drive(args, credentials))
}

async fn drive(args: Args, credentials: Value) -> anyhow::Result<()> {
    let smpp = &credentials["smpp"];
    ensure!(smpp.is_object(), "demo.json has no smpp section: does the server listen for SMPP?");
    let operator = &smpp["operators"][0];
    let system_id = operator["system_id"].as_str().context("demo.json: smpp.operators[0].system_id")?;
    let password = operator["password"].as_str().context("demo.json: smpp.operators[0].password")?;
    let service_code = smpp["service_code"].as_str().unwrap_or("*150#").to_owned();
    let max_binds = operator["max_binds"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        u64::try_from(args.binds).unwrap_or(u64::MAX) <= max_binds,
        "--binds {} is more than the operator's max_binds {max_binds}",
        args.binds
    );
    let base = match &args.http {
        Some(http) => format!("http://{http}"),
        None => credentials["http"].as_str().context("demo.json names no http address")?.to_owned(),
    };
    let target: SocketAddr = tokio::net::lookup_host(&args.target)
        .await?
        .next()
        .with_context(|| format!("{} resolves to nothing", args.target))?;

    // Bind first: SMS that setup causes (notifications) go out over the binds, and are better
    // delivered before the measured run than during it.
    let mut gateways = Vec::with_capacity(args.binds);
    for _ in 0..args.binds {
        let gateway = Gateway::connect(target, system_id, password, &service_code)
            .await
            .with_context(|| format!("binding to {target} as {system_id}"))?;
        gateways.push(gateway);
    }
    let sms = Arc::new(AtomicU64::new(0));
    let drain = {
        let (gateways, sms) = (gateways.clone(), sms.clone());
        tokio::spawn(async move {
            loop {
                for gateway in &gateways {
                    let mut inbox = gateway.sms.lock().unwrap_or_else(|p| p.into_inner());
                    sms.fetch_add(u64::try_from(inbox.len()).unwrap_or(0), Ordering::Relaxed);
                    inbox.clear();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let http = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true).build()?;
    let client = Client { http, base, credentials: credentials.clone() };
    let admin = client.credential("admin")?;
    let count = args.wallets.max(args.concurrency.saturating_mul(2));
    let wallets = Arc::new(prepare(&client, count).await?);
    // Let the SMS of setup drain.
    let mut seen = sms.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sms.load(Ordering::Relaxed);
        if now == seen {
            break;
        }
        seen = now;
    }
    let sms_before = sms.load(Ordering::Relaxed);
    let (balanced_before, before) = http_scenario::kinds(&client, &admin).await?;
    ensure!(balanced_before, "the trial balance is not balanced before the run");

    let expected = Arc::new(Expected::new());
    let dial_prefix: Arc<str> = Arc::from(service_code.trim_end_matches('#'));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_s);
    let mut tasks = Vec::with_capacity(args.concurrency);
    for slot in 0..args.concurrency {
        let gateway = gateways[slot % gateways.len()].clone();
        let (wallets, expected, dial_prefix) = (wallets.clone(), expected.clone(), dial_prefix.clone());
        let concurrency = args.concurrency;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut from = slot;
            while Instant::now() < deadline {
                let to = (from + 1 + rng.random_range(0..wallets.len() - 1)) % wallets.len();
                session(&gateway, &expected, &dial_prefix, &wallets[from], &wallets[to], &mut tally).await;
                from += concurrency;
                if from >= wallets.len() {
                    from = slot;
                }
            }
            tally
        }));
    }
    let mut tally = Tally::new();
    for task in tasks {
        tally.merge(task.await?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sms_during = sms.load(Ordering::Relaxed) - sms_before;
    drain.abort();

    let (balanced, after) = http_scenario::kinds(&client, &admin).await?;
    let delta = |kind: &str| after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0);
    // Transfers between wallets create and destroy nothing: what left wallets is the fees,
    // which landed in fee income (and commissions, paid out of it).
    let wallets_delta = delta("wallet");
    let fees_delta = delta("fee_income") + delta("agent_commission");
    let conserved = balanced && wallets_delta + fees_delta == 0;
    let fees = i128::from(tally.fees_minor);
    let fees_match = fees_delta == fees;
    let failed: u64 = tally.failures.values().map(|(count, _)| count).sum();
    let sessions_per_s = tally.sessions as f64 / elapsed;
    let round_trips_per_s = tally.round_trips as f64 / elapsed;
    let h = &tally.histogram;

    println!(
        "target              {} ({} binds, {} sessions in flight, {} wallets)",
        args.target,
        args.binds,
        args.concurrency,
        wallets.len()
    );
    println!("sessions            {} complete, {failed} failed in {elapsed:.1} s", tally.sessions);
    println!(
        "throughput          {sessions_per_s:.0} sessions/s, {round_trips_per_s:.0} PDU round trips/s (4 a session)"
    );
    println!(
        "step latency        p50 {} us, p99 {} us, p999 {} us, max {} us",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    for (name, h) in ["dial", "amount", "confirm", "PIN"].iter().zip(&tally.steps) {
        println!(
            "  {name:<8}          p50 {} us, p99 {} us, max {} us",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    println!("sms over the binds  {sms_during} during the run (not counted above)");
    for (kind, (count, text)) in &tally.failures {
        println!(
            "failure             {count} × {kind}{}",
            if text.is_empty() { String::new() } else { format!(": {text:?}") }
        );
    }
    println!(
        "conservation        wallets {wallets_delta}, fees {fees_delta} (minor units), balanced {balanced}; \
         fees on the sent screens {fees} ({})",
        if fees_match { "match" } else { "differ: a session's last screen was lost?" }
    );
    let moved = tally.sessions * AMOUNT_MINOR;
    println!("money moved         {}.{:02} AZN between wallets", moved / 100, moved % 100);
    if !conserved {
        println!("NOT CONSERVED");
    }
    println!(
        "{}",
        json!({
            "scenario": "ussd",
            "binds": args.binds,
            "concurrency": args.concurrency,
            "sessions": tally.sessions,
            "sessions_per_s": (sessions_per_s * 10.0).round() / 10.0,
            "pdu_round_trips_per_s": (round_trips_per_s * 10.0).round() / 10.0,
            "p50_step_us": h.value_at_quantile(0.5),
            "p99_step_us": h.value_at_quantile(0.99),
            "max_step_us": h.max(),
            "failed": failed,
            "conserved": conserved,
        })
    );
    if !conserved {
        bail!("money was created or lost");
    }
    Ok(())
}

/// Registers, identifies and funds `count` wallets with [`PIN`]; their numbers.
async fn prepare(client: &Client, count: usize) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let funding: u64 = FUNDING.split('.').next().and_then(|units| units.parse().ok()).unwrap_or(20);
    let float = u64::try_from(count).unwrap_or(u64::MAX).saturating_mul(funding).saturating_add(1000);
    http_scenario::fund_agent(client, &format!("{float}.00")).await?;
    let staff = client.credential("staff")?;
    let numbers = http_scenario::distinct_numbers("+99470", count);
    http_scenario::in_batches(&numbers, |msisdn| {
        let (client, staff) = (client.clone(), staff.clone());
        async move { http_scenario::open_wallet(&client, &staff, &msisdn, PIN, FUNDING).await }
    })
    .await?;
    println!(
        "setup               {} wallets registered, identified and funded in {:.1} s",
        numbers.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_parts_and_amounts() {
        assert_eq!(
            fixed_part("{to} nömrəsinə {amount} göndərildi. Komissiya {fee}."),
            "göndərildi. Komissiya"
        );
        assert_eq!(fixed_part("Məbləğ (AZN)"), "Məbləğ (AZN)");
        assert_eq!(
            amounts_minor("+994551234567 nömrəsinə 0.01 AZN göndərildi. Komissiya 0.10 AZN."),
            [1, 10]
        );
        assert_eq!(local_number("+994551234567"), "0551234567");
    }
}
