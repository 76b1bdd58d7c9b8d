//! Administrators change tiers, tariffs and commissions over HTTP on the real server: the next
//! operation meets the change, it survives restarts with the configuration file unchanged, a
//! changed file wins over it, and only administrators may make it, with bad input named.

use serde_json::{Value, json};

use super::http::{Server, config};

const PAYER: &str = "+994501111111";

/// A P2P transfer of `amount` from the demo's tier-1 wallet: (status, receipt or error).
async fn transfer(server: &Server, token: &str, amount: &str, key: &str) -> (u16, Value) {
    let body = json!({ "to": "0703333333", "amount": amount, "pin": "1111" });
    server.customer("POST", "/v1/customer/transfers", Some(token), body, Some(key)).await
}

async fn balance(server: &Server, token: &str) -> String {
    let (_, balance) = server.customer("GET", "/v1/customer/balance", Some(token), Value::Null, None).await;
    balance["accounts"][0]["balance"].as_str().unwrap_or_default().to_owned()
}

async fn settings(server: &Server) -> Value {
    let (status, settings) = server.signed("admin", "GET", "/v1/admin/wallet-settings", "", None).await;
    assert_eq!(status, 200, "{settings}");
    settings
}

fn p2p_tariff(settings: &Value) -> Value {
    let tariffs = settings["tariffs"].as_array().cloned().unwrap_or_default();
    tariffs.into_iter().find(|t| t["operation"] == "p2p").unwrap_or(Value::Null)
}

/// The demo's tier 1 ("identified") with `max_per_operation`.
fn identified(max_per_operation: &str) -> String {
    json!({
        "name": "identified",
        "limits": [{
            "currency": "AZN",
            "max_balance": "5000.00",
            "max_per_operation": max_per_operation,
            "daily_amount": "5000.00",
            "daily_count": 100,
            "monthly_amount": "30000.00",
            "monthly_count": "unlimited",
        }],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_change_fees_and_limits_at_once_and_for_good() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let token = server.login(PAYER).await?;

    // Only administrators, and bad input named.
    let fee = r#"{"fixed":"0.25","percent_bps":0}"#;
    let (status, _) = server.signed("agent", "PUT", "/v1/admin/tariffs/p2p", fee, None).await;
    assert_eq!(status, 403);
    let (status, _) = server.signed("staff", "PUT", "/v1/admin/tiers/1", &identified("20.00"), None).await;
    assert_eq!(status, 403);
    for (path, body, status, field) in [
        ("/v1/admin/tariffs/p2p", r#"{"fixed":"0.25""#, 400, None),
        ("/v1/admin/tariffs/p2p", r#"{"fixed":"abc"}"#, 422, Some("fixed")),
        ("/v1/admin/tariffs/p2p", r#"{"fixed":0.25}"#, 422, Some("fixed")),
        ("/v1/admin/tariffs/p2p", r#"{"percent_bps":10001}"#, 422, Some("percent_bps")),
        ("/v1/admin/tariffs/p2p", r#"{"percent_bps":-1}"#, 422, Some("percent_bps")),
        ("/v1/admin/tariffs/p2p", r#"{"min":"6.00","max":"5.00"}"#, 422, Some("min")),
        ("/v1/admin/tariffs/teleport", fee, 422, Some("operation")),
        ("/v1/admin/commissions/fee", fee, 422, Some("operation")),
        ("/v1/admin/tiers/256", &identified("20.00"), 422, Some("code")),
        ("/v1/admin/tiers/1", &identified("6000.00"), 422, Some("limits[0].max_per_operation")),
        ("/v1/admin/tiers/1", &identified("0"), 422, Some("limits[0].max_per_operation")),
        ("/v1/admin/tiers/1", r#"{"name":"identified","limits":[]}"#, 422, Some("limits")),
        ("/v1/admin/tiers/2", &identified("20.00"), 409, Some("name")),
    ] {
        let (got, error) = server.signed("admin", "PUT", path, body, None).await;
        assert_eq!(got, status, "PUT {path} {body}: {error}");
        if field.is_some() {
            assert_eq!(error["error"]["field"].as_str(), field, "PUT {path} {body}: {error}");
        }
    }
    // Unknown fields are refused, as everywhere.
    let (status, error) =
        server.signed("admin", "PUT", "/v1/admin/tariffs/p2p", r#"{"percent":"1"}"#, None).await;
    assert_eq!(status, 422, "{error}");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("percent")), "{error}");
    let refused = settings(&server).await;
    assert_eq!(p2p_tariff(&refused)["percent_bps"], 50, "nothing refused changed anything: {refused}");

    // A new P2P tariff: the next transfer pays it.
    let (status, set) = server.signed("admin", "PUT", "/v1/admin/tariffs/p2p", fee, None).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!((set["fixed"].as_str(), set["percent_bps"].as_u64()), (Some("0.25"), Some(0)), "{set}");
    let (status, receipt) = transfer(&server, &token, "10.00", "t-1").await;
    assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.25")), "{receipt}");
    assert_eq!(balance(&server, &token).await, "489.75");

    // A lower maximum per operation on the payer's tier: over it refused, at it passes.
    let (status, tier) = server.signed("admin", "PUT", "/v1/admin/tiers/1", &identified("20.00"), None).await;
    assert_eq!((status, tier["limits"][0]["max_per_operation"].as_str()), (200, Some("20.00")), "{tier}");
    let (status, refused) = transfer(&server, &token, "20.01", "t-2").await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("limit_per_operation")), "{refused}");
    let (status, receipt) = transfer(&server, &token, "20.00", "t-3").await;
    assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.25")), "{receipt}");
    assert_eq!(balance(&server, &token).await, "469.50");

    // Who and when.
    let (status, log) = server.signed("admin", "GET", "/v1/admin/wallet-settings/changes", "", None).await;
    assert_eq!(status, 200, "{log}");
    let admin = server.credential("admin").0;
    assert_eq!(log["changes"][0]["action"], "put_tier", "{log}");
    assert_eq!(log["changes"][0]["by"].as_str(), Some(admin.as_str()), "{log}");
    assert_eq!(log["changes"][0]["target"], "1", "{log}");
    assert_eq!(log["changes"][1]["action"], "put_tariff", "{log}");
    assert!(log["changes"][0]["at_s"].as_u64().is_some_and(|t| t > 1_700_000_000), "{log}");

    // Tiers are replaced, never removed: no wallet can be left without one.
    let (status, _) = server.signed("admin", "DELETE", "/v1/admin/tiers/1", "", None).await;
    assert_eq!(status, 405);

    // Two restarts with the same configuration: the changes stay in force.
    for round in 0..2 {
        server.stop().await?;
        server = Server::start(dir.path()).await?;
        let live = settings(&server).await;
        assert_eq!(p2p_tariff(&live)["fixed"], "0.25", "restart {round}: {live}");
        assert_eq!(live["tiers"][1]["limits"][0]["max_per_operation"], "20.00", "restart {round}: {live}");
        assert_eq!(live["tiers"][1]["limits"][0]["monthly_count"], "unlimited", "restart {round}: {live}");
        let (status, refused) = transfer(&server, &token, "20.01", &format!("r-{round}-over")).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("limit_per_operation")));
        let (status, receipt) = transfer(&server, &token, "1.00", &format!("r-{round}-ok")).await;
        assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.25")), "restart {round}: {receipt}");
    }
    assert_eq!(balance(&server, &token).await, "467.00");

    // Removing the tariff: the next transfer is free; removing it again finds none.
    let (status, _) = server.signed("admin", "DELETE", "/v1/admin/tariffs/p2p", "", None).await;
    assert_eq!(status, 204);
    let (status, gone) = server.signed("admin", "DELETE", "/v1/admin/tariffs/p2p", "", None).await;
    assert_eq!((status, gone["error"]["code"].as_str()), (404, Some("not_found")), "{gone}");
    let (status, receipt) = transfer(&server, &token, "1.00", "t-free").await;
    assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.00")), "{receipt}");
    assert_eq!(p2p_tariff(&settings(&server).await), Value::Null);
    server.assert_balanced().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_configuration_file_wins_over_live_changes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = |fixed: &str| {
        let mut config = config(dir.path());
        config.wallet_toml = format!("[[tariffs]]\noperation = \"p2p\"\nfixed = \"{fixed}\"\n");
        config
    };
    let mut server = Server::start_with(file("0.30")).await?;
    assert_eq!(p2p_tariff(&settings(&server).await)["fixed"], "0.30");
    let (status, _) =
        server.signed("admin", "PUT", "/v1/admin/tariffs/p2p", r#"{"fixed":"0.40"}"#, None).await;
    assert_eq!(status, 200);
    let (status, commission) =
        server.signed("admin", "PUT", "/v1/admin/commissions/cash_in", r#"{"fixed":"0.05"}"#, None).await;
    assert_eq!(status, 200, "{commission}");

    // The same file: the live changes win.
    server.stop().await?;
    server = Server::start_with(file("0.30")).await?;
    let live = settings(&server).await;
    assert_eq!(p2p_tariff(&live)["fixed"], "0.40", "{live}");
    assert_eq!(live["commissions"][0]["fixed"], "0.05", "{live}");

    // An edited file: its rules replace the live ones, and the change log says so.
    server.stop().await?;
    server = Server::start_with(file("0.50")).await?;
    let live = settings(&server).await;
    assert_eq!(p2p_tariff(&live)["fixed"], "0.50", "{live}");
    assert_eq!(live["commissions"], json!([]), "{live}");
    let token = server.login(PAYER).await?;
    let (status, receipt) = transfer(&server, &token, "3.00", "file-1").await;
    assert_eq!((status, receipt["fee"].as_str()), (200, Some("0.50")), "{receipt}");
    let (_, log) = server.signed("admin", "GET", "/v1/admin/wallet-settings/changes", "", None).await;
    assert_eq!(log["changes"][0]["by"], "configuration file", "{log}");
    assert_eq!(log["changes"][1]["action"], "put_commission", "{log}");
    server.assert_balanced().await;
    server.stop().await
}
