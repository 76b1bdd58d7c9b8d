//! `loadtest`: Qepik's load generator. Every flag has a default and every run is bounded in time.
//!
//! Scenarios:
//! - `engine`: the engine in-process with its durable journal and sled views; uniform random
//!   transfers between wallets, a share of them crediting one hot account. Prints a table, then
//!   as its last line one JSON object.
//! - `recover`: opens an existing data directory (say, one left by `engine --data-dir`) and
//!   times recovery: checkpoint load, journal replay, invariant check.
//! - `http`: a running `qepik serve --demo` over HTTP: durable agent cash-ins and customer P2P
//!   transfers; conservation checked through the admin trial balance at the end.
//! - `ussd`: a running `qepik serve --demo` over SMPP, bound as the demo operator's gateways:
//!   whole four-step USSD transfer sessions (dial the send shortcut, amount, confirm, PIN).
//!   Reports sessions/s, PDU round trips/s (one submit_sm/resp plus one deliver_sm/resp per
//!   step counts as one round trip, so 4 a session), per-step latency and failures by kind;
//!   conservation checked through the admin trial balance at the end.

mod engine_scenario;
mod http_scenario;
mod ussd_scenario;
mod wire;

use clap::{Parser, Subcommand};

/// mimalloc, as in `qepik`: on a shared machine the load tool's allocations take CPU from the
/// server it measures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "loadtest", about = "Qepik's load generator", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Drive the engine in-process with the durable journal.
    Engine(engine_scenario::Args),
    /// Open an existing data directory and report how long recovery took.
    Recover(engine_scenario::RecoverArgs),
    /// Drive a running `qepik serve --demo` over HTTP: agent cash-ins and customer P2P.
    Http(http_scenario::Args),
    /// Drive a running `qepik serve --demo` over SMPP as operator gateways: four-step USSD
    /// transfer sessions (4 PDU round trips each).
    Ussd(ussd_scenario::Args),
}

fn main() -> anyhow::Result<()> {
    // The in-process engine's own log (checkpoints, views) goes to stderr, apart from the
    // table and the JSON line on stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,engine=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // As `qepik` does (engine::memory): the figures are the server's.
    if let Err(error) = engine::memory::disable_transparent_huge_pages() {
        eprintln!("loadtest: could not turn transparent huge pages off: {error}");
    }
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Engine(args) => engine_scenario::run(args),
        Scenario::Recover(args) => engine_scenario::recover(args),
        Scenario::Http(args) => http_scenario::run(args),
        Scenario::Ussd(args) => ussd_scenario::run(args),
    }
}
