//! `loadtest`: Qepik's load generator. Every flag has a default and every run is bounded in time.
//!
//! Scenarios:
//! - `engine`: the engine in-process with its durable journal and sled views; uniform random
//!   transfers between wallets, a share of them crediting one hot account. Prints a table, then
//!   as its last line one JSON object.

mod engine_scenario;

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Engine(args) => engine_scenario::run(args),
    }
}
