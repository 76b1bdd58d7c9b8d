//! `qepik-phone`: a USSD phone in the terminal. It binds to a running `qepik serve --demo` as
//! the demo operator's gateway ([`channels::ussd::gateway`]) and carries one subscriber's
//! dialogues: the first line typed dials (`*150#`, or a shortcut such as `*150*2*0501234567#`),
//! each later line answers the screen shown, and after a screen that ends the dialogue the next
//! line dials again. `q` quits. SMS that Qepik sends to the number are printed as they come.
//!
//! `printf '*150#\n1\n1111\n' | qepik-phone --msisdn +994501111111` runs a scripted dialogue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use channels::ussd::gateway::{Dialogue, Gateway, GatewayScreen};
use clap::Parser;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "qepik-phone", version, about = "A USSD phone in the terminal, over Qepik's SMPP port")]
struct Cli {
    /// The demo.json the server wrote (the demo operator's bind credentials).
    #[arg(long, default_value = "qepik-data/demo.json")]
    credentials: PathBuf,
    /// The subscriber's number.
    #[arg(long)]
    msisdn: String,
    /// Qepik's SMPP port, HOST:PORT (default: the one demo.json names).
    #[arg(long)]
    smpp: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let demo: Value = serde_json::from_str(
        &std::fs::read_to_string(&cli.credentials)
            .with_context(|| format!("reading {}", cli.credentials.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cli.credentials.display()))?;
    let smpp = &demo["smpp"];
    let operator = &smpp["operators"][0];
    let system_id = operator["system_id"].as_str().context("demo.json names no SMPP operator")?;
    let password = operator["password"].as_str().context("demo.json: the operator has no password")?;
    let service_code = smpp["service_code"].as_str().unwrap_or("*150#");
    let address = match &cli.smpp {
        Some(address) => address.as_str(),
        None => smpp["address"].as_str().context("demo.json names no SMPP address; give --smpp")?,
    };
    let address: SocketAddr = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to nothing"))?;
    let gateway = Gateway::connect(address, system_id, password, service_code)
        .await
        .with_context(|| format!("binding to {address} as {system_id}"))?;
    println!("[bound to {address} as {system_id}; dial {service_code}, q quits]");

    // The keypad: stdin read on its own thread (the crate's tokio has no io-std).
    let (keys, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if keys.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut dialogue: Option<Dialogue> = None;
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        if line == "q" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        println!("> {line}");
        let screen = match dialogue.as_mut() {
            Some(dialogue) => dialogue.answer(line).await,
            None => gateway.dial(&cli.msisdn, line).await.map(|(started, screen)| {
                dialogue = Some(started);
                screen
            }),
        };
        match screen {
            Ok(screen) => {
                show(&screen);
                if screen.end {
                    dialogue = None;
                }
            }
            Err(error) => {
                println!("[error: {error}; the next line dials]");
                dialogue = None;
            }
        }
        print_sms(&gateway, &cli.msisdn);
    }
    // SMS that the last operation caused leave a moment after its screen.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    print_sms(&gateway, &cli.msisdn);
    Ok(())
}

fn show(screen: &GatewayScreen) {
    println!("{}", screen.text);
    if screen.end {
        println!("[session ended]");
    }
}

/// Prints, and forgets, the SMS that came for `msisdn` (and drops those for other numbers).
fn print_sms(gateway: &Arc<Gateway>, msisdn: &str) {
    let digits: String = msisdn.chars().filter(char::is_ascii_digit).collect();
    let mut inbox = gateway.sms.lock().unwrap_or_else(|p| p.into_inner());
    for (to, text) in inbox.drain(..) {
        if to.chars().filter(char::is_ascii_digit).collect::<String>() == digits {
            println!("[sms] {text}");
        }
    }
}
