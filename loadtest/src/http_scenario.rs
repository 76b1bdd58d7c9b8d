//! `loadtest http`: durable agent cash-ins and customer P2P transfers against a running
//! `qepik serve --demo`, over keep-alive HTTP connections. Setup registers wallets through the
//! customer API, has the demo's staff identify them (the top tier, so that the run is not a test
//! of daily counts), and logs each in through the demo's simulated handset. The run is
//! closed-loop per connection, or paced to `--rate` (latency then counts from the intended send
//! time, so a stalled server is not hidden). At the end, conservation is checked through the
//! admin trial balance: debits equal credits, the agents' floats fell by exactly the cash-ins
//! the server accepted, and wallets, fee income and commissions rose by the same.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::wire;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// The demo.json the server wrote (credentials).
    #[arg(long, default_value = "qepik-data/demo.json")]
    credentials: PathBuf,
    /// How long the measured run lasts.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Requests a second to offer in total (default: as fast as the connections go).
    #[arg(long)]
    rate: Option<u64>,
    /// Concurrent connections (each with one request in flight).
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Wallets to register and use.
    #[arg(long, default_value_t = 2000)]
    wallets: usize,
    /// Share of requests (0–100) that are P2P transfers; the rest are agent cash-ins.
    #[arg(long, default_value_t = 50)]
    p2p_percent: u32,
    /// After a refusal (429/503) with `Retry-After`, wait that long before this connection's
    /// next request, as a well-behaved client does (off: the next request goes at once).
    #[arg(long)]
    honour_retry_after: bool,
}

const PIN: &str = "2580";

/// The demo's HTTP API and its credentials; `ussd` prepares its wallets through it too.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) credentials: Value,
}

impl Client {
    pub(crate) fn credential(&self, role: &str) -> anyhow::Result<(String, Vec<u8>)> {
        let all = self.credentials["credentials"].as_array().context("demo.json has no credentials")?;
        let c = all
            .iter()
            .find(|c| c["role"] == role)
            .with_context(|| format!("demo.json has no {role} credential"))?;
        let key = hex::decode(c["key"].as_str().context("key")?)?;
        Ok((c["key_id"].as_str().context("key_id")?.to_owned(), key))
    }

    pub(crate) fn signed(
        &self,
        credential: &(String, Vec<u8>),
        method: reqwest::Method,
        path: &str,
        body: String,
    ) -> reqwest::RequestBuilder {
        let (timestamp, signature) = signature(credential, method.as_str(), path, &body);
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("x-qepik-key", &credential.0)
            .header("x-qepik-timestamp", timestamp.to_string())
            .header("x-qepik-signature", signature)
            .body(body)
    }

    pub(crate) fn plain(&self, method: reqwest::Method, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).body(body.to_string())
    }
}

/// The request signature of an API key (`credential`: key id and key): the timestamp and the
/// HMAC over method, path, timestamp and the body's SHA-256.
fn signature(credential: &(String, Vec<u8>), method: &str, path: &str, body: &str) -> (u64, String) {
    let timestamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&credential.1).expect("HMAC takes any key length");
    let body_hash = hex::encode(Sha256::digest(body.as_bytes()));
    mac.update(format!("{method}\n{path}\n{timestamp}\n{body_hash}").as_bytes());
    (timestamp, hex::encode(mac.finalize().into_bytes()))
}

pub(crate) async fn json_of(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// Sums by account kind from the trial balance, in minor units.
pub(crate) async fn kinds(
    client: &Client,
    admin: &(String, Vec<u8>),
) -> anyhow::Result<(bool, std::collections::HashMap<String, i128>)> {
    let (status, trial) =
        json_of(client.signed(admin, reqwest::Method::GET, "/v1/admin/trial-balance", String::new())).await?;
    ensure!(status == 200, "trial balance: {status} {trial}");
    let mut sums = std::collections::HashMap::new();
    for line in trial["kinds"].as_array().context("kinds")? {
        let minor = |field: &str| line[field].as_str().and_then(|v| v.parse::<i128>().ok()).unwrap_or(0);
        let kind = line["kind"].as_str().unwrap_or_default().to_owned();
        *sums.entry(kind).or_insert(0) += minor("credits_posted") - minor("debits_posted");
    }
    Ok((trial["balanced"] == true, sums))
}

struct Wallet {
    msisdn: String,
    token: String,
}

async fn setup(client: &Client, count: usize) -> anyhow::Result<Vec<Wallet>> {
    let staff = client.credential("staff")?;
    fund_agent(client, "1000000.00").await?;
    let started = Instant::now();
    let numbers = distinct_numbers("+99455", count);
    let wallets: Vec<Wallet> = in_batches(&numbers, |msisdn| {
        let (client, staff) = (client.clone(), staff.clone());
        async move { enrol(&client, &staff, msisdn).await }
    })
    .await?
    .into_iter()
    .flatten()
    .collect();
    println!(
        "setup               {} wallets registered, identified and logged in in {:.1} s",
        wallets.len(),
        started.elapsed().as_secs_f64()
    );
    ensure!(wallets.len() >= 2, "fewer than two wallets could be set up");
    Ok(wallets)
}

/// `count` distinct random numbers under `prefix` (an operator code: `+99455`).
pub(crate) fn distinct_numbers(prefix: &str, count: usize) -> Vec<String> {
    let mut rng = rand::rng();
    let mut numbers = std::collections::HashSet::new();
    while numbers.len() < count {
        numbers.insert(format!("{prefix}{:07}", rng.random_range(0..10_000_000_u32)));
    }
    numbers.into_iter().collect()
}

/// Runs `each` over `numbers` 64 at a time (setup is not what is measured); the results in order.
pub(crate) async fn in_batches<T, F, Fut>(numbers: &[String], each: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut results = Vec::with_capacity(numbers.len());
    for chunk in numbers.chunks(64) {
        let tasks: Vec<_> = chunk.iter().map(|msisdn| tokio::spawn(each(msisdn.clone()))).collect();
        for task in tasks {
            results.push(task.await??);
        }
    }
    Ok(results)
}

/// Tops up the demo agent's float (e-money issued against a deposit) by `amount` (AZN).
pub(crate) async fn fund_agent(client: &Client, amount: &str) -> anyhow::Result<()> {
    let admin = client.credential("admin")?;
    let agent = client.credentials["credentials"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["role"] == "agent"))
        .and_then(|c| c["agent"].as_u64())
        .context("demo.json names no agent")?;
    let body = json!({ "amount": amount }).to_string();
    let request =
        client.signed(&admin, reqwest::Method::POST, &format!("/v1/admin/agents/{agent}/funding"), body);
    let (status, answer) =
        json_of(request.header("idempotency-key", format!("lt-float-{}", rand::random::<u64>()))).await?;
    ensure!(status == 200, "funding the agent: {status} {answer}");
    Ok(())
}

/// Registers `msisdn` with `pin` (an existing wallet is taken as it is), has the demo's staff
/// identify it (tier 2) and has the demo agent cash in `amount` (AZN).
pub(crate) async fn open_wallet(
    client: &Client,
    staff: &(String, Vec<u8>),
    msisdn: &str,
    pin: &str,
    amount: &str,
) -> anyhow::Result<()> {
    let (status, body) = json_of(client.plain(
        reqwest::Method::POST,
        "/v1/customer/register",
        json!({ "msisdn": msisdn, "pin": pin }),
    ))
    .await?;
    ensure!(status == 201 || status == 409, "register {msisdn}: {status} {body}");
    let identify = json!({
        "tier": 2, "document_type": "ID", "document_number": format!("LT{}", &msisdn[4..]),
        "first_name": "Load", "last_name": "Test", "birth_date": "1990-01-01"
    })
    .to_string();
    let path = format!("/v1/staff/wallets/{msisdn}/identify");
    let (status, body) = json_of(client.signed(staff, reqwest::Method::POST, &path, identify)).await?;
    ensure!(status == 200, "identify {msisdn}: {status} {body}");
    let agent = client.credential("agent")?;
    let funding = json!({ "msisdn": msisdn, "amount": amount }).to_string();
    let key = format!("lt-fund-{msisdn}-{}", rand::random::<u64>());
    let (status, body) = json_of(
        client
            .signed(&agent, reqwest::Method::POST, "/v1/agent/cash-in", funding)
            .header("idempotency-key", key),
    )
    .await?;
    ensure!(status == 200, "funding {msisdn}: {status} {body}");
    Ok(())
}

/// Registers, identifies (tier 2), funds and logs in one wallet; `None` if its OTP was
/// rate-limited.
async fn enrol(client: &Client, staff: &(String, Vec<u8>), msisdn: String) -> anyhow::Result<Option<Wallet>> {
    open_wallet(client, staff, &msisdn, PIN, "20.00").await?;
    let inbox_url = format!("{}/v1/demo/sms/{msisdn}", client.base);
    let messages = |inbox: &Value| inbox["messages"].as_array().map_or(0, Vec::len);
    let (_, before) = json_of(client.http.get(&inbox_url)).await?;
    let (status, _) =
        json_of(client.plain(reqwest::Method::POST, "/v1/customer/otp", json!({ "msisdn": msisdn }))).await?;
    if status == 429 {
        return Ok(None);
    }
    // With the views on, the SMS leaves through the outbox a moment after the commit.
    let mut code = String::new();
    for _ in 0..400 {
        let (_, inbox) = json_of(client.http.get(&inbox_url)).await?;
        let fresh = inbox["messages"]
            .as_array()
            .map(|m| m.iter().skip(messages(&before)).filter_map(Value::as_str).collect::<Vec<_>>());
        if let Some(text) = fresh.unwrap_or_default().into_iter().find(|m| m.contains("your code is")) {
            code = text.chars().filter(char::is_ascii_digit).collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(!code.is_empty(), "no SMS for {msisdn}: is the server running with --demo?");
    let (status, session) = json_of(client.plain(
        reqwest::Method::POST,
        "/v1/customer/sessions",
        json!({ "msisdn": msisdn, "otp": code }),
    ))
    .await?;
    ensure!(status == 201, "login {msisdn}: {status} {session}");
    Ok(Some(Wallet { msisdn, token: session["token"].as_str().unwrap_or_default().to_owned() }))
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    /// The first failed answers (status and body), for the report.
    first_errors: std::sync::Mutex<Vec<String>>,
    cash_in_minor: AtomicU64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.connections >= 1 && args.duration_s >= 1,
        "--connections and --duration-s must be at least 1"
    );
    ensure!(args.p2p_percent <= 100, "--p2p-percent is 0..=100");
    with_credentials(&args.credentials.clone(), |credentials| async move {
        let summary = drive(args, credentials).await?;
        ensure!(
            summary.ok > 0,
            "no request was accepted ({} refused, {} errors)",
            summary.rejected,
            summary.errors
        );
        Ok(())
    })
}

/// What a run counted.
#[derive(Debug)]
struct Summary {
    ok: u64,
    rejected: u64,
    errors: u64,
}

/// Reads the server's credentials (`demo.json`) and runs `scenario` with them on a runtime of
/// two workers, as every scenario against a running server does.
pub(crate) fn with_credentials<F, Fut>(path: &std::path::Path, scenario: F) -> anyhow::Result<()>
where
    F: FnOnce(Value) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let credentials: Value = serde_json::from_str(&text)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(scenario(credentials))
}

async fn drive(args: Args, credentials: Value) -> anyhow::Result<Summary> {
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(args.connections).tcp_nodelay(true).build()?;
    let client = Arc::new(Client { http, base: format!("http://{}", args.target), credentials });
    let admin = client.credential("admin")?;
    let agent = client.credential("agent")?;
    let wallets = Arc::new(setup(&client, args.wallets).await?);
    let (balanced_before, before) = kinds(&client, &admin).await?;
    ensure!(balanced_before, "the trial balance is not balanced before the run");

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_s);
    let interval =
        args.rate.map(|rate| Duration::from_secs_f64(args.connections as f64 / rate.max(1) as f64));
    let run_id: u64 = rand::random();
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let (wallets, counts, agent) = (wallets.clone(), counts.clone(), agent.clone());
        let (p2p_percent, honour_retry_after) = (args.p2p_percent, args.honour_retry_after);
        let mut link = wire::Link::new(&args.target);
        tasks.push(tokio::spawn(async move {
            let new = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            // Accepted, from the intended send time; accepted and refused, from the actual one.
            let (mut histogram, mut served, mut refused) = (new(), new(), new());
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut next = Instant::now();
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let intended = match interval {
                    Some(interval) => {
                        if next > Instant::now() {
                            tokio::time::sleep_until(next.into()).await;
                        }
                        let at = next;
                        next += interval;
                        at
                    }
                    None => Instant::now(),
                };
                n += 1;
                let key = format!("lt-{run_id:x}-{connection}-{n}");
                let cash_in = rng.random_range(0..100) >= p2p_percent;
                if cash_in {
                    let to = &wallets[rng.random_range(0..wallets.len())];
                    let body = format!(r#"{{"msisdn":"{}","amount":"0.10"}}"#, to.msisdn);
                    let path = "/v1/agent/cash-in";
                    let (timestamp, signature) = signature(&agent, "POST", path, &body);
                    let timestamp = timestamp.to_string();
                    link.post(
                        path,
                        &[
                            ("x-qepik-key", &agent.0),
                            ("x-qepik-timestamp", &timestamp),
                            ("x-qepik-signature", &signature),
                            ("idempotency-key", &key),
                        ],
                        body.as_bytes(),
                    );
                } else {
                    let from = rng.random_range(0..wallets.len());
                    let to = (from + 1 + rng.random_range(0..wallets.len() - 1)) % wallets.len();
                    let body = format!(r#"{{"to":"{}","amount":"0.01","pin":"{PIN}"}}"#, wallets[to].msisdn);
                    let bearer = format!("Bearer {}", wallets[from].token);
                    link.post(
                        "/v1/customer/transfers",
                        &[("authorization", &bearer), ("idempotency-key", &key)],
                        body.as_bytes(),
                    );
                }
                let sent = Instant::now();
                let wire::Answer { status, retry_after, body } = link.send().await.unwrap_or_default();
                let micros = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                let from_send = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                match status {
                    200 => {
                        histogram.saturating_record(micros);
                        served.saturating_record(from_send);
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                        if cash_in {
                            counts.cash_in_minor.fetch_add(10, Ordering::Relaxed);
                        }
                    }
                    429 | 503 => {
                        refused.saturating_record(from_send);
                        counts.rejected.fetch_add(1, Ordering::Relaxed);
                        // As a well-behaved client does: wait as long as the server asks.
                        if let (true, Some(seconds)) = (honour_retry_after, retry_after) {
                            let resume = Instant::now() + Duration::from_secs(seconds.min(10));
                            tokio::time::sleep_until(resume.min(deadline).into()).await;
                            next = next.max(Instant::now());
                        }
                    }
                    _ => {
                        if counts.errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            let what = match status {
                                0 => "no answer".to_owned(),
                                _ => format!("{status} {}", String::from_utf8_lossy(&body)),
                            };
                            counts.first_errors.lock().unwrap_or_else(|p| p.into_inner()).push(what);
                        }
                    }
                }
            }
            (histogram, served, refused)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut served, mut refused) = (histogram.clone(), histogram.clone());
    for task in tasks {
        let (h, s, r) = task.await?;
        histogram.add(h)?;
        served.add(s)?;
        refused.add(r)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (balanced, after) = kinds(&client, &admin).await?;
    let delta = |kind: &str| after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0);
    let cash_in = i128::from(counts.cash_in_minor.load(Ordering::Relaxed));
    // Floats of every kind fall by the cash-ins; the e-money lands in wallets, fee income and
    // commissions (commissions come out of fee income: their sum is what left the floats).
    let floats =
        delta("agent_float") + delta("kiosk_float") + delta("post_office_float") + delta("atm_network_float");
    let landed = delta("wallet") + delta("fee_income") + delta("agent_commission");
    let conserved = balanced && floats == -cash_in && landed == cash_in;
    let ok = counts.ok.load(Ordering::Relaxed);
    let rejected = counts.rejected.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    println!(
        "target              {} ({} connections{})",
        args.target,
        args.connections,
        args.rate.map_or(String::new(), |r| format!(", offered {r}/s"))
    );
    println!("requests            {ok} ok, {rejected} rejected (429/503), {errors} errors in {elapsed:.1} s");
    for error in counts.first_errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("  error             {error}");
    }
    println!(
        "throughput          {:.0} requests/s accepted, {:.0}/s sent",
        ok as f64 / elapsed,
        (ok + rejected + errors) as f64 / elapsed
    );
    println!(
        "latency (accepted)  p50 {} us, p99 {} us, p999 {} us, max {} us",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max()
    );
    println!(
        "from send           accepted p50 {} us, p99 {} us; refused p50 {} us, p99 {} us",
        served.value_at_quantile(0.5),
        served.value_at_quantile(0.99),
        refused.value_at_quantile(0.5),
        refused.value_at_quantile(0.99),
    );
    println!(
        "conservation        floats {floats}, landed {landed}, cash-ins {cash_in} (minor units), balanced {balanced}"
    );
    if !conserved {
        println!("NOT CONSERVED");
    }
    println!(
        "{}",
        json!({
            "scenario": "http",
            "requests_per_s": ok * 1000 / u64::try_from(started_ms(elapsed)).unwrap_or(1).max(1),
            "p50_us": histogram.value_at_quantile(0.5),
            "p99_us": histogram.value_at_quantile(0.99),
            "rejected": rejected,
            "sent_per_s": (ok + rejected + errors) * 1000 / u64::try_from(started_ms(elapsed)).unwrap_or(1).max(1),
            "accepted_p99_from_send_us": served.value_at_quantile(0.99),
            "rejected_p99_us": refused.value_at_quantile(0.99),
            "errors": errors,
            "conserved": conserved,
        })
    );
    if !conserved {
        bail!("money was created or lost");
    }
    Ok(Summary { ok, rejected, errors })
}

use rand::SeedableRng;

/// Whole milliseconds of `seconds`.
fn started_ms(seconds: f64) -> u128 {
    Duration::from_secs_f64(seconds).as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run against a real demo server on loopback: wallets set up through the API,
    /// cash-ins and P2P transfers on the tool's own connections, conservation checked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_against_a_demo_server_moves_money_and_conserves_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut config = channels::config::Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        config.server.shards = Some(2);
        config.server.views = false;
        config.server.secret = Some("22".repeat(32));
        config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.smpp.listen = None;
        let options = channels::server::ServeOptions { demo: true, metrics: false };
        let running = channels::server::start(config, options).await?;
        let credentials: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("demo.json"))?)?;
        let args = Args {
            target: running.addr.to_string(),
            credentials: dir.path().join("demo.json"),
            duration_s: 1,
            // Paced, so that no wallet meets its tier's daily count (the server refuses the
            // rest with 422 `limit_daily_count`, which the tool counts as errors).
            rate: Some(200),
            connections: 4,
            wallets: 20,
            p2p_percent: 50,
            honour_retry_after: true,
        };
        let summary = drive(args, credentials).await?;
        running.shutdown().await?;
        assert!(summary.ok > 100, "{summary:?}");
        assert_eq!((summary.errors, summary.rejected), (0, 0), "{summary:?}");
        Ok(())
    }
}
