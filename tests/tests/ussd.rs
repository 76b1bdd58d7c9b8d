//! USSD over SMPP end to end: the demo server in-process, a simulated operator gateway bound to
//! it over loopback. Transcripts (`tests/ussd/*.txt`: `> input`, `< screen line`, `= end`) run
//! whole dialogues; the other tests cover binds, malformed PDUs, windows, retransmissions,
//! dropped sessions and SMS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use channels::config::Config;
use channels::server::{Running, ServeOptions, start};
use channels::ussd::gateway::{Gateway, GatewayError};
use serde_json::Value;

pub struct UssdServer {
    pub running: Option<Running>,
    pub smpp: SocketAddr,
    pub demo: Value,
}

pub fn config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.server.shards = Some(2);
    config.server.views = true;
    config.server.secret = Some("22".repeat(32));
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.smpp.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

impl UssdServer {
    pub async fn start(dir: &Path) -> anyhow::Result<UssdServer> {
        UssdServer::start_with(config(dir)).await
    }

    pub async fn start_with(config: Config) -> anyhow::Result<UssdServer> {
        let demo_path = config.server.data_dir.join("demo.json");
        let running = start(config, ServeOptions { demo: true, metrics: false }).await?;
        let demo: Value = serde_json::from_str(&std::fs::read_to_string(demo_path)?)?;
        let smpp = running.smpp_addr.ok_or_else(|| anyhow::anyhow!("no SMPP port"))?;
        Ok(UssdServer { running: Some(running), smpp, demo })
    }

    pub fn operator(&self) -> (String, String) {
        let operator = &self.demo["smpp"]["operators"][0];
        (
            operator["system_id"].as_str().unwrap_or_default().to_owned(),
            operator["password"].as_str().unwrap_or_default().to_owned(),
        )
    }

    pub async fn gateway(&self) -> Result<Arc<Gateway>, GatewayError> {
        let (system_id, password) = self.operator();
        Gateway::connect(self.smpp, &system_id, &password, "*150#").await
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        Ok(())
    }

    fn balanced(&self) -> bool {
        let Some(running) = &self.running else { return false };
        running.state.engine.totals().map(|t| t.values().all(|c| c.balanced())).unwrap_or(false)
    }
}

/// Runs a transcript: `@ msisdn` starts a dialogue for that number with the next `>` line as the
/// dial; `>` lines are the subscriber's input; consecutive `<` lines are the expected screen, in
/// which `*` matches any run of characters; `= end` says the dialogue ended with that screen.
async fn run_transcript(gateway: &Arc<Gateway>, name: &str, transcript: &str) -> anyhow::Result<()> {
    let mut msisdn = String::new();
    let mut dialogue = None;
    let mut last: Option<channels::ussd::gateway::GatewayScreen> = None;
    let mut expected: Vec<String> = Vec::new();
    let check =
        |expected: &mut Vec<String>, last: &Option<channels::ussd::gateway::GatewayScreen>, line: usize| {
            if expected.is_empty() {
                return Ok(());
            }
            let want = expected.join("\n");
            expected.clear();
            let got = last.as_ref().map(|s| s.text.clone()).unwrap_or_default();
            anyhow::ensure!(wildcard(&want, &got), "{name}:{line}: expected\n{want}\n--- got\n{got}\n---");
            Ok(())
        };
    for (n, line) in transcript.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(number) = line.strip_prefix("@ ") {
            check(&mut expected, &last, line_no)?;
            msisdn = number.trim().to_owned();
            dialogue = None;
        } else if let Some(input) = line.strip_prefix("> ") {
            check(&mut expected, &last, line_no)?;
            let screen = match dialogue.as_mut() {
                None => {
                    let (d, screen) = gateway.dial(&msisdn, input).await?;
                    dialogue = Some(d);
                    screen
                }
                Some(d) => d.answer(input).await?,
            };
            last = Some(screen);
        } else if let Some(text) = line.strip_prefix("< ") {
            expected.push(text.to_owned());
        } else if line == "<" {
            expected.push(String::new());
        } else if line.trim() == "= end" {
            check(&mut expected, &last, line_no)?;
            anyhow::ensure!(
                last.as_ref().is_some_and(|s| s.end),
                "{name}:{line_no}: the dialogue did not end"
            );
            dialogue = None;
        } else {
            anyhow::bail!("{name}:{line_no}: cannot read {line:?}");
        }
    }
    check(&mut expected, &last, transcript.lines().count() + 1)
}

/// `*` in `pattern` matches any run of characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(parts[0]) else { return false };
    for (i, part) in parts.iter().enumerate().skip(1) {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = UssdServer::start(dir.path()).await?;
    let gateway = server.gateway().await?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("ussd");
    let mut names: Vec<_> = std::fs::read_dir(&fixtures)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "no transcripts in {}", fixtures.display());
    for path in names {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&path)?;
        run_transcript(&gateway, &name, &text).await?;
    }
    assert!(server.balanced());
    server.stop().await
}
