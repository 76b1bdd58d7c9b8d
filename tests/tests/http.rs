//! The `qepik` server end to end: started in-process on a port the OS picks, on a temporary data
//! directory seeded with the demo world, driven over real HTTP. Authentication, idempotency
//! (1000 concurrent identical requests post once), input errors naming their field, the customer
//! login and transfer, cash codes redeemed by the ATM network, staff operations, a restart with
//! state and idempotency keys intact, and the trial balance at the end of every test. The helpers
//! ([`Server`]) serve the other server-level modules too.

use std::path::Path;
use std::sync::Arc;

use channels::config::Config;
use channels::http::auth::{now_s, signature};
use channels::server::{Running, ServeOptions, start};
use serde_json::{Value, json};

/// A running demo server and what demo.json says about it.
pub(crate) struct Server {
    running: Option<Running>,
    base: String,
    demo: Value,
    client: reqwest::Client,
}

pub(crate) fn config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.server.shards = Some(2);
    config.server.views = false;
    config.server.secret = Some("11".repeat(32));
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.smpp.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    // A busy test machine must not shrink the admission limit under the bursts some tests fire;
    // `an_overloaded_server_refuses_at_once_and_moves_nothing_for_the_refused` tests admission.
    config.http.queue_target_ms = 600_000;
    config
}

impl Server {
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Server> {
        Server::start_with(config(dir)).await
    }

    pub(crate) async fn start_with(config: Config) -> anyhow::Result<Server> {
        let demo_path = config.server.data_dir.join("demo.json");
        let running = start(config, ServeOptions { demo: true, metrics: false }).await?;
        let demo: Value = serde_json::from_str(&std::fs::read_to_string(demo_path)?)?;
        let base = format!("http://{}", running.addr);
        Ok(Server { running: Some(running), base, demo, client: reqwest::Client::new() })
    }

    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        Ok(())
    }

    /// The demo credential of `role` (the first, for agents).
    pub(crate) fn credential(&self, role: &str) -> (String, Vec<u8>) {
        let credentials = self.demo["credentials"].as_array().cloned().unwrap_or_default();
        let c = credentials.iter().find(|c| c["role"] == role).cloned().unwrap_or(Value::Null);
        let key = hex::decode(c["key"].as_str().unwrap_or_default()).unwrap_or_default();
        (c["key_id"].as_str().unwrap_or_default().to_owned(), key)
    }

    /// A signed request as `role`; `key` is the Idempotency-Key, if any.
    pub(crate) async fn signed(
        &self,
        role: &str,
        method: &str,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let credential = self.credential(role);
        self.signed_as(&credential, method, path, body, key).await
    }

    /// A signed request with a given credential.
    pub(crate) async fn signed_as(
        &self,
        credential: &(String, Vec<u8>),
        method: &str,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let (key_id, secret) = credential.clone();
        let timestamp = now_s();
        let sig = signature(&secret, method, path, timestamp, body.as_bytes());
        let mut request = self
            .client
            .request(method.parse().unwrap_or(reqwest::Method::GET), format!("{}{path}", self.base))
            .header("x-qepik-key", key_id)
            .header("x-qepik-timestamp", timestamp.to_string())
            .header("x-qepik-signature", sig)
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        send(request).await
    }

    pub(crate) async fn customer(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method.parse().unwrap_or(reqwest::Method::GET), format!("{}{path}", self.base))
            .body(if body.is_null() { String::new() } else { body.to_string() });
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        send(request).await
    }

    /// Logs a demo customer in through the OTP sent to their simulated handset.
    pub(crate) async fn login(&self, msisdn: &str) -> anyhow::Result<String> {
        let before = self.sms(msisdn).await.len();
        let (status, _) =
            self.customer("POST", "/v1/customer/otp", None, json!({ "msisdn": msisdn }), None).await;
        anyhow::ensure!(status == 202, "otp: {status}");
        // With the views on, the SMS goes out through the outbox, a moment after the commit.
        let mut code = String::new();
        for _ in 0..200 {
            let messages = self.sms(msisdn).await;
            if let Some(text) = messages.iter().skip(before).find(|m| m.contains("your code is")) {
                code = text.chars().filter(char::is_ascii_digit).collect();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let (status, session) = self
            .customer("POST", "/v1/customer/sessions", None, json!({ "msisdn": msisdn, "otp": code }), None)
            .await;
        anyhow::ensure!(status == 201, "login: {status} {session}");
        Ok(session["token"].as_str().unwrap_or_default().to_owned())
    }

    /// The messages a demo handset received.
    async fn sms(&self, msisdn: &str) -> Vec<String> {
        let (_, inbox) =
            self.customer("GET", &format!("/v1/demo/sms/{msisdn}"), None, Value::Null, None).await;
        inbox["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    async fn float(&self) -> String {
        let (_, float) = self.signed("agent", "GET", "/v1/agent/float", "", None).await;
        float["balance"].as_str().unwrap_or_default().to_owned()
    }

    pub(crate) async fn assert_balanced(&self) {
        let (status, trial) = self.signed("admin", "GET", "/v1/admin/trial-balance", "", None).await;
        assert_eq!(status, 200, "{trial}");
        assert_eq!(trial["balanced"], true, "{trial}");
    }
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
        Err(error) => (0, Value::String(error.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cash_in_once_per_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let before = server.float().await;
    let body = r#"{"msisdn":"+994 70 333 33 33","amount":"20.00"}"#;
    let (status, first) = server.signed("agent", "POST", "/v1/agent/cash-in", body, Some("ci-1")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["amount"].as_str(), first["reference"].as_str()), (Some("20.00"), Some("ci-1")));
    let (status, again) = server.signed("agent", "POST", "/v1/agent/cash-in", body, Some("ci-1")).await;
    assert_eq!((status, &again), (200, &first));
    let other = r#"{"msisdn":"+994 70 333 33 33","amount":"21.00"}"#;
    let (status, reused) = server.signed("agent", "POST", "/v1/agent/cash-in", other, Some("ci-1")).await;
    assert_eq!((status, reused["error"]["code"].as_str()), (422, Some("idempotency_key_reused")));
    let (status, op) = server.signed("agent", "GET", "/v1/agent/operations/ci-1", "", None).await;
    assert_eq!((status, op["ledger_state"].as_str()), (200, Some("posted")), "{op}");
    let after = server.float().await;
    assert_ne!(before, after);

    // 1000 concurrent identical requests: one posting.
    let server_ref = Arc::new(server);
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let server = server_ref.clone();
        tasks.push(tokio::spawn(async move {
            server
                .signed(
                    "agent",
                    "POST",
                    "/v1/agent/cash-in",
                    r#"{"msisdn":"0552222222","amount":"1.00"}"#,
                    Some("burst"),
                )
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await?);
    }
    let first = answers[0].1.clone();
    assert!(
        answers.iter().all(|(status, body)| *status == 200 && *body == first),
        "{:?}",
        answers.iter().find(|a| a.1 != first)
    );
    let (_, wallet) = server_ref.signed("staff", "GET", "/v1/staff/wallets/0552222222", "", None).await;
    // 100.00 from the demo's cash-in, plus exactly one 1.00.
    assert_eq!(wallet["accounts"][0]["balance"].as_str(), Some("101.00"), "{wallet}");
    server_ref.assert_balanced().await;
    let mut server = Arc::try_unwrap(server_ref).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_fails_without_detail() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let url = format!("{}/v1/agent/float", server.base);
    let (status, body) = send(server.client.get(&url)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthenticated")));
    let (key_id, key) = server.credential("agent");
    // A stale timestamp, a wrong signature, an unknown key: the same answer.
    let stale = now_s() - 3600;
    let cases = [
        (key_id.clone(), stale, signature(&key, "GET", "/v1/agent/float", stale, b"")),
        (key_id.clone(), now_s(), signature(&key, "GET", "/v1/agent/floaT", now_s(), b"")),
        ("agent_0000".to_owned(), now_s(), signature(&key, "GET", "/v1/agent/float", now_s(), b"")),
    ];
    for (id, ts, sig) in cases {
        let request = server
            .client
            .get(&url)
            .header("x-qepik-key", id)
            .header("x-qepik-timestamp", ts.to_string())
            .header("x-qepik-signature", sig);
        let (status, body) = send(request).await;
        assert_eq!(status, 401);
        assert_eq!(
            body,
            json!({ "error": { "code": "unauthenticated", "message": "authentication failed" } })
        );
    }
    // The wrong role.
    let (status, body) = server.signed("agent", "GET", "/v1/admin/trial-balance", "", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));
    // A revoked key.
    let path = format!("/v1/admin/credentials/{key_id}");
    let (status, _) = server.signed("admin", "DELETE", &path, "", None).await;
    assert_eq!(status, 204);
    let (status, _) = server.signed("agent", "GET", "/v1/agent/float", "", None).await;
    assert_eq!(status, 401);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let cases = [
        ("{", 400, "malformed_json", None),
        (r#"{"msisdn":"0703333333","amount":"1.00","tip":1}"#, 422, "invalid_field", Some("tip")),
        (r#"{"msisdn":"0703333333","amount":1}"#, 422, "invalid_field", Some("amount")),
        (r#"{"msisdn":"12345","amount":"1.00"}"#, 422, "msisdn_unknown_country", Some("msisdn")),
        (r#"{"msisdn":"050123","amount":"1.00"}"#, 422, "msisdn_wrong_length", Some("msisdn")),
        (r#"{"msisdn":"0703333333","amount":"1.001"}"#, 422, "invalid_amount", Some("amount")),
        (r#"{"msisdn":"0703333333","amount":"-1"}"#, 422, "invalid_amount", Some("amount")),
        (r#"{"msisdn":"0703333333","amount":"0"}"#, 422, "invalid_amount", Some("amount")),
        (r#"{"msisdn":"0703333333"}"#, 422, "invalid_field", None),
    ];
    for (n, (body, status, code, field)) in cases.iter().enumerate() {
        let key = format!("bad-{n}");
        let (got, answer) = server.signed("agent", "POST", "/v1/agent/cash-in", body, Some(&key)).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (*status, Some(*code)), "{body}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"].as_str(), Some(*field), "{body}: {answer}");
        }
    }
    let (status, answer) = server
        .signed("agent", "POST", "/v1/agent/cash-in", r#"{"msisdn":"0703333333","amount":"1.00"}"#, None)
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("idempotency_key_required")));
    let (status, _) = server.signed("agent", "GET", "/v1/no/such/route", "", None).await;
    assert_eq!(status, 404);
    server.assert_balanced().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_log_in_send_money_and_take_cash_at_an_atm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let token = server.login("+994501111111").await?;
    let transfer = json!({ "to": "0552222222", "amount": "10.00", "pin": "1111" });
    let (status, receipt) =
        server.customer("POST", "/v1/customer/transfers", Some(&token), transfer.clone(), Some("t-1")).await;
    assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.10")), "{receipt}");
    let wrong_pin = json!({ "to": "0552222222", "amount": "10.00", "pin": "9999" });
    let (status, refused) =
        server.customer("POST", "/v1/customer/transfers", Some(&token), wrong_pin, Some("t-2")).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("pin_invalid")), "{refused}");
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(balance["accounts"][0]["balance"].as_str(), Some("489.90"), "{balance}");

    // A cash code, redeemed by the ATM network; a retry of the issue shows the same code.
    let ask = json!({ "amount": "40.00", "pin": "1111" });
    let (status, code) =
        server.customer("POST", "/v1/customer/cash-codes", Some(&token), ask.clone(), Some("cc-1")).await;
    assert_eq!(status, 201, "{code}");
    let (_, again) =
        server.customer("POST", "/v1/customer/cash-codes", Some(&token), ask, Some("cc-1")).await;
    assert_eq!(again["code"], code["code"]);
    let redeem = json!({ "msisdn": "+994501111111", "code": code["code"], "amount": "40.00", "device": 77 })
        .to_string();
    let (status, paid) = server.signed("atm", "POST", "/v1/atm/redemptions", &redeem, Some("atm-1")).await;
    assert_eq!((status, paid["commission"].as_str()), (200, Some("0.20")), "{paid}");
    let (status, twice) = server.signed("atm", "POST", "/v1/atm/redemptions", &redeem, Some("atm-2")).await;
    assert_eq!((status, twice["error"]["code"].as_str()), (422, Some("code_invalid")), "{twice}");
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(balance["accounts"][0]["balance"].as_str(), Some("449.40"), "{balance}");

    // Refresh, then revoke.
    let (_, _) =
        server.customer("POST", "/v1/customer/otp", None, json!({ "msisdn": "+994552222222" }), None).await;
    let (status, _) = server
        .customer(
            "POST",
            "/v1/customer/sessions",
            None,
            json!({ "msisdn": "+994552222222", "otp": "000000" }),
            None,
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) =
        server.customer("DELETE", "/v1/customer/sessions", Some(&token), Value::Null, None).await;
    assert_eq!(status, 204);
    let (status, _) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(status, 401);
    server.assert_balanced().await;
    server.stop().await
}

/// With no SMSC bound, every notification handed to the binds waits for them; a fresh OTP must
/// still reach the handset instead of waiting behind them (the notifier once read the outbox
/// from its oldest entry, 4,096 at a time, and skipped those in flight: past 4,096 waiting,
/// nothing new was ever handed, and no customer could log in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otp_is_not_stuck_behind_notifications_no_smsc_has_taken() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.server.views = true;
    let server = Arc::new(Server::start_with(cfg).await?);
    // 64 × 70 = 4,480 cash-ins, one notification each, none of them taken: no gateway binds.
    let mut tasks = Vec::new();
    for lane in 0..64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..70 {
                let key = format!("backlog-{lane}-{i}");
                let body = r#"{"msisdn":"0552222222","amount":"0.01"}"#;
                let (status, answer) =
                    server.signed("agent", "POST", "/v1/agent/cash-in", body, Some(&key)).await;
                anyhow::ensure!(status == 200, "cash-in {key}: {status} {answer}");
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let token = server.login("0703333333").await?;
    assert!(!token.is_empty());
    server.assert_balanced().await;
    let mut server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_identify_unblock_and_reverse() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.server.views = true;
    let mut server = Server::start_with(cfg).await?;
    let identify = r#"{"tier":1,"document_type":"ID","document_number":"AZE7654321","first_name":"Leyla","last_name":"Aliyeva","birth_date":"1988-02-29"}"#;
    let (status, wallet) =
        server.signed("staff", "POST", "/v1/staff/wallets/0552222222/identify", identify, None).await;
    assert_eq!((status, wallet["tier"].as_u64()), (200, Some(1)), "{wallet}");
    let (status, refused) =
        server.signed("staff", "POST", "/v1/staff/wallets/0552222222/identify", r#"{"tier":1}"#, None).await;
    assert_eq!(status, 422, "{refused}");
    // Three wrong PINs at a terminal block the wallet; staff unblock it.
    for n in 0..3 {
        let body = r#"{"msisdn":"0703333333","amount":"5.00","pin":"0000"}"#;
        server.signed("agent", "POST", "/v1/agent/cash-out", body, Some(&format!("co-{n}"))).await;
    }
    let (_, wallet) = server.signed("staff", "GET", "/v1/staff/wallets/0703333333", "", None).await;
    assert_eq!(wallet["blocked"], true, "{wallet}");
    let (status, _) = server.signed("staff", "POST", "/v1/staff/wallets/0703333333/unblock", "", None).await;
    assert_eq!(status, 200);
    let body = r#"{"msisdn":"0703333333","amount":"5.00","pin":"3333"}"#;
    let (status, cashed) = server.signed("staff", "POST", "/v1/staff/cash-out", body, Some("co-ok")).await;
    assert_eq!(status, 200, "{cashed}");
    // Staff reverse it (once the views have indexed it).
    let reversal = json!({ "operation": cashed["operation"] }).to_string();
    let mut answer = (0, Value::Null);
    for attempt in 0..100 {
        answer = server
            .signed("staff", "POST", "/v1/staff/reversals", &reversal, Some(&format!("rev-{attempt}")))
            .await;
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    let (_, wallet) = server.signed("staff", "GET", "/v1/staff/wallets/0703333333", "", None).await;
    assert_eq!(wallet["accounts"][0]["balance"].as_str(), Some("50.00"), "{wallet}");

    // The statement: the demo's cash-in, the cash-out and its fee, the reversal; paged two at a
    // time, every line once, ending where the ledger stands.
    let mut lines = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let path = match &cursor {
            Some(c) => format!("/v1/staff/wallets/0703333333/statement?limit=2&cursor={c}"),
            None => "/v1/staff/wallets/0703333333/statement?limit=2".to_owned(),
        };
        let (status, page) = server.signed("staff", "GET", &path, "", None).await;
        assert_eq!(status, 200, "{page}");
        lines.extend(page["lines"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert!(lines.len() >= 4, "{lines:?}");
    assert_eq!(lines.last().and_then(|l| l["balance_after"].as_str()), Some("50.00"), "{lines:?}");
    let (status, csv) =
        server.signed("staff", "GET", "/v1/staff/wallets/0703333333/export?format=csv", "", None).await;
    assert_eq!(status, 200);
    assert!(csv.as_str().is_some_and(|text| text.lines().count() >= 4), "{csv}");
    let (status, bad) = server
        .signed("staff", "GET", "/v1/staff/wallets/0703333333/statement?cursor=garbage", "", None)
        .await;
    assert_eq!((status, bad["error"]["code"].as_str()), (422, Some("invalid_cursor")));
    let (status, report) = server.signed("staff", "GET", "/v1/agent/report", "", None).await;
    assert_eq!(status, 200, "{report}");
    assert!(report["operations"].as_u64().is_some_and(|n| n >= 2), "{report}");
    // The customer was told of the cash-out, after it committed.
    let mut told = false;
    for _ in 0..200 {
        if server.sms("0703333333").await.iter().any(|m| m.contains("cash-out 5.00 AZN")) {
            told = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(told, "{:?}", server.sms("0703333333").await);
    server.assert_balanced().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_money_sessions_and_keys() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let token = server.login("+994501111111").await?;
    let transfer = json!({ "to": "0703333333", "amount": "7.00", "pin": "1111" });
    let (status, first) =
        server.customer("POST", "/v1/customer/transfers", Some(&token), transfer.clone(), Some("r-1")).await;
    assert_eq!(status, 200, "{first}");
    let demo = server.demo.clone();
    server.stop().await?;
    let mut server = Server::start(dir.path()).await?;
    assert_eq!(server.demo, demo, "the demo world is seeded once");
    let (status, again) =
        server.customer("POST", "/v1/customer/transfers", Some(&token), transfer, Some("r-1")).await;
    assert_eq!((status, &again), (200, &first));
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(balance["accounts"][0]["balance"].as_str(), Some("492.90"), "{balance}");
    server.assert_balanced().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_route_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    for (method, path) in channels::http::ROUTES {
        let path = path
            .replace("{reference}", "x")
            .replace("{msisdn}", "0501111111")
            .replace("{agent}", "1001")
            .replace("{key_id}", "x")
            .replace("{code}", "1")
            .replace("{operation}", "p2p");
        let request = server.client.request(method.parse()?, format!("{}{path}", server.base));
        let (status, body) = send(request).await;
        let unrouted = status == 404 && body["error"]["message"] == "no such route";
        assert!(!unrouted && status != 405, "{method} {path}: {status} {body}");
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let (status, document) = send(server.client.get(format!("{}/openapi.json", server.base))).await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "{}", document["openapi"]);
    for (method, path) in channels::http::ROUTES {
        let operation = &document["paths"][path][method.to_ascii_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not in /openapi.json");
    }
    let documented: usize = document["paths"]
        .as_object()
        .map_or(0, |paths| paths.values().map(|p| p.as_object().map_or(0, |o| o.len())).sum());
    assert_eq!(
        documented,
        channels::http::ROUTES.len(),
        "the document lists routes the server does not serve"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merchants_are_paid_once_by_qr_and_told_by_a_signed_webhook() -> anyhow::Result<()> {
    use hmac::Mac;
    // The merchant's webhook receiver: a real server on loopback.
    let received: Arc<std::sync::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let sink = received.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let header = |name: &str| {
                    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
                };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push((
                    header("x-qepik-timestamp"),
                    header("x-qepik-signature"),
                    body,
                ));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let create =
        json!({ "merchant": 6001, "name": "Chai Evi", "city": "Baku", "webhook_url": hook }).to_string();
    let (status, merchant) = server.signed("admin", "POST", "/v1/admin/merchants", &create, None).await;
    assert_eq!(status, 201, "{merchant}");
    let credential = (
        merchant["key_id"].as_str().unwrap_or_default().to_owned(),
        hex::decode(merchant["key"].as_str().unwrap_or_default())?,
    );
    let webhook_key = hex::decode(merchant["webhook_key"].as_str().unwrap_or_default())?;
    let (status, qr) = server
        .signed_as(&credential, "POST", "/v1/merchant/qr", r#"{"amount":"8.40","reference":"table-4"}"#, None)
        .await;
    assert_eq!(status, 201, "{qr}");
    let payload = qr["payload"].as_str().unwrap_or_default().to_owned();
    assert!(payload.starts_with("000201010212") && payload.contains("5303944"), "{payload}");
    let status_path = format!("/v1/merchant/payments/{}", qr["request"].as_str().unwrap_or_default());
    let (_, open) = server.signed_as(&credential, "GET", &status_path, "", None).await;
    assert_eq!(open["status"], "open");

    let token = server.login("+994501111111").await?;
    let mut tampered = payload.clone();
    tampered.replace_range(tampered.len() - 1.., if payload.ends_with('0') { "1" } else { "0" });
    let (status, refused) = server
        .customer(
            "POST",
            "/v1/customer/qr-payments",
            Some(&token),
            json!({ "payload": tampered, "pin": "1111" }),
            Some("qr-0"),
        )
        .await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("invalid_qr")), "{refused}");
    let pay = json!({ "payload": payload, "pin": "1111" });
    let (status, paid) =
        server.customer("POST", "/v1/customer/qr-payments", Some(&token), pay.clone(), Some("qr-1")).await;
    assert_eq!((status, paid["merchant_reference"].as_str()), (200, Some("table-4")), "{paid}");
    // The same customer again, under another key: the same payment, not a second one.
    let (status, _) =
        server.customer("POST", "/v1/customer/qr-payments", Some(&token), pay.clone(), Some("qr-2")).await;
    assert_eq!(status, 200);
    // Someone else cannot pay it again.
    let other = server.login("+994552222222").await?;
    let pay_other = json!({ "payload": payload, "pin": "2222" });
    let (status, conflict) =
        server.customer("POST", "/v1/customer/qr-payments", Some(&other), pay_other, Some("qr-3")).await;
    assert_eq!(status, 409, "{conflict}");
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(balance["accounts"][0]["balance"].as_str(), Some("491.60"), "{balance}");
    let (_, done) = server.signed_as(&credential, "GET", &status_path, "", None).await;
    assert_eq!(done["status"], "paid", "{done}");

    // The webhook arrives once, signed with the merchant's webhook key.
    let mut hooks = Vec::new();
    for _ in 0..200 {
        hooks = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !hooks.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    let (timestamp, signature, body) = &hooks[0];
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&webhook_key)?;
    mac.update(format!("{timestamp}\n{body}").as_bytes());
    assert_eq!(&hex::encode(mac.finalize().into_bytes()), signature);
    let event: Value = serde_json::from_str(body)?;
    assert_eq!((event["event"].as_str(), event["amount"].as_str()), (Some("payment.paid"), Some("8.40")));

    // A partial refund: a new transfer back, the payment stays.
    let refund = json!({ "request": qr["request"], "amount": "3.00" }).to_string();
    let (status, refunded) =
        server.signed_as(&credential, "POST", "/v1/merchant/refunds", &refund, Some("rf-1")).await;
    assert_eq!(status, 200, "{refunded}");
    let too_much = json!({ "request": qr["request"], "amount": "9.00" }).to_string();
    let (status, _) =
        server.signed_as(&credential, "POST", "/v1/merchant/refunds", &too_much, Some("rf-2")).await;
    assert_eq!(status, 422);
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(&token), Value::Null, None).await;
    assert_eq!(balance["accounts"][0]["balance"].as_str(), Some("494.60"), "{balance}");
    server.assert_balanced().await;
    server.stop().await
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn certificates(
    dir: &Path,
) -> anyhow::Result<(
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    rcgen::Certificate,
    rcgen::KeyPair,
    String,
    String,
)> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()])?;
    server_params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;
    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key)?;
    let (cert, key, ca_file) = (dir.join("server.pem"), dir.join("server.key"), dir.join("ca.pem"));
    std::fs::write(&cert, server.pem())?;
    std::fs::write(&key, server_key.serialize_pem())?;
    std::fs::write(&ca_file, ca.pem())?;
    Ok((cert, key, ca_file, ca, ca_key, client.pem(), client_key.serialize_pem()))
}

/// `GET /health` over TLS, presenting `client` (certificate and key PEM) if given.
async fn tls_health(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes())?],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key, ca_file, ca, _, client_cert, client_key) = certificates(dir.path())?;
    let mut cfg = config(&dir.path().join("data"));
    cfg.http.tls =
        Some(channels::tls::TlsSection { cert_file: cert, key_file: key, client_ca_file: Some(ca_file) });
    let running = start(cfg, ServeOptions { demo: true, metrics: false }).await?;
    let answer = tls_health(running.addr, &ca.pem(), Some((&client_cert, &client_key))).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"status":"ok"}"#), "{answer}");
    // Without a client certificate the handshake (or the first read) fails: no answer.
    let refused = tls_health(running.addr, &ca.pem(), None).await;
    assert!(refused.as_ref().map_or(true, |a| !a.contains("200")), "{refused:?}");
    // Plain HTTP on a TLS port gets nothing either.
    let plain = send(reqwest::Client::new().get(format!("http://{}/health", running.addr))).await;
    assert_ne!(plain.0, 200);
    running.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_limits_answer_with_what_remains() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let (status, settings) = server.signed("admin", "GET", "/v1/admin/wallet-settings", "", None).await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["tiers"][0]["limits"][0]["max_balance"].as_str(), Some("300.00"), "{settings}");
    // The demo's tier-0 wallet holds 100.00; 250.00 more would pass its 300.00 maximum.
    let body = r#"{"msisdn":"0552222222","amount":"250.00"}"#;
    let (status, refused) = server.signed("agent", "POST", "/v1/agent/cash-in", body, Some("limit-1")).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("limit_max_balance")), "{refused}");
    assert!(
        refused["error"]["message"].as_str().is_some_and(|m| m.contains("200.00 AZN remaining")),
        "{refused}"
    );
    let body = r#"{"msisdn":"0552222222","amount":"200.00"}"#;
    let (status, done) = server.signed("agent", "POST", "/v1/agent/cash-in", body, Some("limit-2")).await;
    assert_eq!(status, 200, "{done}");
    server.assert_balanced().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_server_refuses_at_once_and_moves_nothing_for_the_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = config(dir.path());
    config.http.max_in_flight = 4;
    let server = Arc::new(Server::start_with(config).await?);
    let before = server.float().await;
    let amount = |text: &str| -> i64 {
        let minor: String = text.chars().filter(char::is_ascii_digit).collect();
        minor.parse().unwrap_or(i64::MIN)
    };
    // Bursts of 64 cash-ins at 4 slots, until one burst has been refused in part (the first,
    // all but always).
    let (mut posted, mut refused) = (0_i64, 0_usize);
    for burst in 0..5 {
        let mut tasks = Vec::new();
        for n in 0..64 {
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (key_id, secret) = server.credential("agent");
                let body = r#"{"msisdn":"0552222222","amount":"0.01"}"#;
                let timestamp = now_s();
                let sig = signature(&secret, "POST", "/v1/agent/cash-in", timestamp, body.as_bytes());
                let response = client
                    .post(format!("{}/v1/agent/cash-in", server.base))
                    .header("x-qepik-key", key_id)
                    .header("x-qepik-timestamp", timestamp.to_string())
                    .header("x-qepik-signature", sig)
                    .header("idempotency-key", format!("overload-{burst}-{n}"))
                    .body(body)
                    .send()
                    .await?;
                let retry_after = response.headers().get("retry-after").cloned();
                let status = response.status().as_u16();
                let body: Value = serde_json::from_str(&response.text().await?)?;
                anyhow::Ok((status, body, retry_after))
            }));
        }
        for task in tasks {
            let (status, body, retry_after) = task.await??;
            match status {
                200 => posted += 1,
                503 => {
                    assert_eq!(body["error"]["code"].as_str(), Some("overloaded"), "{body}");
                    assert_eq!(retry_after.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
                    refused += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no burst of 64 at 4 slots was refused in part");
    assert!(posted > 0, "every request was refused");
    // Operations stay reachable however busy the API is.
    let health = server.client.get(format!("{}/health", server.base)).send().await?;
    assert_eq!(health.status().as_u16(), 200);
    // Exactly the admitted cash-ins left the float: a refused one did nothing.
    assert_eq!(amount(&before) - amount(&server.float().await), posted);
    server.assert_balanced().await;
    let mut server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop().await
}
