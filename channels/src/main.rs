//! `qepik`: the server and its offline tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use channels::config::Config;

/// mimalloc: the server allocates per request (bodies, JSON, futures) on many threads, where
/// glibc's malloc showed as a fifth of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use channels::server::{self, ServeOptions};

#[derive(Debug, Parser)]
#[command(name = "qepik", version, about = "Qepik, the transaction engine of a mobile e-wallet")]
struct Cli {
    /// The TOML configuration file (default: none; every key has a default, and QEPIK_*
    /// environment variables override the file: QEPIK_DATA_DIR, QEPIK_SHARDS, QEPIK_SECRET, QEPIK_VIEWS,
    /// QEPIK_HTTP_LISTEN, QEPIK_HTTP_MAX_IN_FLIGHT, QEPIK_HTTP_QUEUE_TARGET_MS, QEPIK_HTTP_RATE_PER_S).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: the engine, the HTTP API (127.0.0.1:8080 by default). Stops gracefully
    /// on SIGTERM or Ctrl-C: stops accepting, finishes requests in progress, writes the final
    /// group commit, exits 0.
    Serve {
        /// On first start, seed a demo world (agents, an ATM network, a post office with staff,
        /// funded wallets, tariffs) and write every credential to DATA_DIR/demo.json.
        #[arg(long)]
        demo: bool,
    },
    /// Verify the data directory offline: replay the journal, finish transfers caught in
    /// flight, check that debits equal credits. The server must not be running.
    Check,
    /// Rebuild the sled views (transfer index, histories) from the journal. The server must
    /// not be running.
    Reindex,
    /// Issue or revoke API credentials (the server must not be running; while it runs, use
    /// the admin API).
    Credential {
        #[command(subcommand)]
        action: CredentialAction,
    },
    /// Print the headers that sign a request, for curl: `curl $(qepik sign ...) ...`.
    Sign {
        /// The credential's key id.
        #[arg(long)]
        key_id: String,
        /// The credential's key (hex).
        #[arg(long)]
        key: String,
        /// GET, POST, PUT or DELETE.
        method: String,
        /// The path with its query, as sent (`/v1/agent/float`).
        path: String,
        /// The exact body sent (default: empty).
        #[arg(default_value = "")]
        body: String,
    },
    /// Create an agent's float and commission accounts (the server must not be running).
    Agent {
        /// The agent's number.
        agent: u64,
        /// agent, kiosk, post_office or atm_network.
        kind: String,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialAction {
    /// Issue a key; it is printed once and stored only as a hash.
    Issue {
        /// agent, atm, staff or admin.
        role: String,
        /// The agent it acts for (agents, ATM networks; staff: their post office).
        #[arg(long, default_value_t = 0)]
        agent: u64,
        /// The staff member's id (staff).
        #[arg(long, default_value_t = 0)]
        staff: u64,
    },
    /// Revoke a key by its id.
    Revoke { key_id: String },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            // fjall's LSM tree reports each table it writes at info: that is its own business.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lsm_tree=warn,fjall=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = engine::memory::disable_transparent_huge_pages() {
        tracing::warn!(%error, "could not turn transparent huge pages off; running with them");
    }
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qepik: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve { demo } => runtime.block_on(serve(config, demo)),
        Command::Check => check(&config),
        Command::Reindex => {
            let position = engine::views::reindex(&config.server.data_dir)?;
            println!("views rebuilt up to journal position {position}");
            Ok(())
        }
        Command::Credential { action } => runtime.block_on(credential(config, action)),
        Command::Agent { agent, kind } => runtime.block_on(create_agent(config, agent, &kind)),
        Command::Sign { key_id, key, method, path, body } => {
            let key = hex::decode(key.trim()).context("--key must be hex")?;
            let timestamp = channels::http::auth::now_s();
            let signature = channels::http::auth::signature(
                &key,
                &method.to_ascii_uppercase(),
                &path,
                timestamp,
                body.as_bytes(),
            );
            println!(
                "-H X-Qepik-Key:{key_id} -H X-Qepik-Timestamp:{timestamp} -H X-Qepik-Signature:{signature}"
            );
            Ok(())
        }
    }
}

async fn serve(config: Config, demo: bool) -> anyhow::Result<()> {
    let running = server::start(config, ServeOptions { demo, metrics: true }).await?;
    if demo {
        let path = running.state.config.server.data_dir.join("demo.json");
        eprintln!("qepik: serving http://{} (demo credentials in {})", running.addr, path.display());
    } else {
        eprintln!("qepik: serving http://{}", running.addr);
    }
    shutdown_signal().await;
    eprintln!("qepik: shutting down");
    running.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn check(config: &Config) -> anyhow::Result<()> {
    let mut engine_config = engine::EngineConfig::new(&config.server.data_dir);
    if let Some(shards) = config.server.shards {
        engine_config.shard_count = shards;
    }
    engine_config.views = false;
    engine_config.checkpoint_every_bytes = 0;
    let engine = engine::Engine::open(engine_config).context("opening the data directory")?;
    let report = engine.recovery_report().clone();
    let totals = engine.totals()?;
    engine.shutdown();
    println!(
        "journal position {}, {} records replayed ({} commands), checkpoint {}, {} in flight resolved, {} torn bytes cut, {} ms",
        report.journal_position,
        report.records_replayed,
        report.commands_replayed,
        if report.checkpoint_loaded { "loaded" } else { "none" },
        report.in_flight_resolved,
        report.torn_bytes,
        report.elapsed_ms
    );
    let mut balanced = true;
    for (currency, t) in &totals {
        println!(
            "{currency}: debits posted {} credits posted {} debits pending {} credits pending {} {}",
            t.debits_posted,
            t.credits_posted,
            t.debits_pending,
            t.credits_pending,
            if t.balanced() { "balanced" } else { "UNBALANCED" }
        );
        balanced &= t.balanced();
    }
    anyhow::ensure!(balanced, "debits and credits differ");
    println!("ok");
    Ok(())
}

async fn credential(config: Config, action: CredentialAction) -> anyhow::Result<()> {
    let state = offline_state(config).await?;
    match action {
        CredentialAction::Issue { role, agent, staff } => {
            let role: channels::store::Role = serde_json::from_value(serde_json::Value::String(role.clone()))
                .map_err(|_| anyhow::anyhow!("unknown role {role:?}: agent, atm, staff or admin"))?;
            let (credential, key) = channels::http::admin::issue(&state, role, agent, staff)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            println!(
                "{}",
                serde_json::json!({ "key_id": credential.key_id, "key": key, "role": role, "agent": agent, "staff": staff })
            );
        }
        CredentialAction::Revoke { key_id } => {
            let mut credential =
                state.store.credential(&key_id)?.with_context(|| format!("no credential {key_id}"))?;
            credential.revoked = true;
            state.store.put_credential(&credential)?;
            println!("revoked {key_id}");
        }
    }
    state.engine.shutdown();
    Ok(())
}

async fn create_agent(config: Config, agent: u64, kind: &str) -> anyhow::Result<()> {
    let kind =
        channels::http::admin::agent_kind(kind).context("kind: agent, kiosk, post_office or atm_network")?;
    let state = offline_state(config).await?;
    state.domain.create_agent(agent, kind).await?;
    state.engine.shutdown();
    println!("agent {agent} created");
    Ok(())
}

/// The server's state without its listener, for the offline tools.
async fn offline_state(mut config: Config) -> anyhow::Result<std::sync::Arc<channels::http::AppState>> {
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.views = false;
    server::open_state(config, ServeOptions::default()).await
}
