//! `qepik serve --demo`: on first start, a small world to try everything with, and
//! `data_dir/demo.json` listing every object and credential it made. Later starts find the file
//! and seed nothing. Every seeding step is idempotent (fixed operation ids; "exists" is fine), so
//! a crash halfway through seeds the rest on the next start.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use engine::domain::AgentKind;
use engine::secret::Pin;
use engine::tariff::Tariff;
use engine::wallet::{Actor, Profile, WalletRefusal, codes};
use engine::{DomainConfig, OpError};
use serde_json::json;

use crate::http::AppState;
use crate::http::admin::issue;
use crate::store::Role;

pub const AGENT: u64 = 1001;
pub const KIOSK: u64 = 1002;
pub const POST_OFFICE: u64 = 2001;
pub const ATM_NETWORK: u64 = 3001;
pub const STAFF: u64 = 501;
pub const ADMIN: u64 = 1;
pub const MERCHANT: u64 = 5001;

/// Manat in minor units.
const fn azn(manat: u64) -> u64 {
    manat * 100
}

/// The demo's wallets: number, PIN, tier, opening balance (minor units).
pub const WALLETS: [(&str, &str, u8, u64); 4] = [
    ("+994501111111", "1111", 1, azn(500)),
    ("+994552222222", "2222", 0, azn(100)),
    ("+994703333333", "3333", 0, azn(50)),
    ("+994774444444", "4444", 0, 0),
];

/// Tariffs a demo shows when the configuration has none: P2P 0.5 % (0.10–5.00), cash-out 1 %
/// (at least 0.50), a cash code 0.50; agents earn 0.3 % on cash-in and cash-out, ATM networks
/// 0.20 a code.
pub fn default_tariffs(config: &mut DomainConfig) -> anyhow::Result<()> {
    if config.tariffs.iter().next().is_some() || config.commissions.iter().next().is_some() {
        return Ok(());
    }
    config.tariffs.set(codes::P2P, Tariff { fixed: 0, percent_bps: 50, min: 10, max: 500 })?;
    config.tariffs.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 100, min: 50, max: 0 })?;
    config.tariffs.set(codes::CASH_CODE, Tariff { fixed: 50, percent_bps: 0, min: 0, max: 0 })?;
    config.commissions.set(codes::CASH_IN, Tariff { fixed: 0, percent_bps: 30, min: 0, max: 0 })?;
    config.commissions.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 30, min: 0, max: 0 })?;
    config.commissions.set(codes::CASH_CODE, Tariff { fixed: 20, percent_bps: 0, min: 0, max: 0 })?;
    Ok(())
}

fn op(n: u128) -> u128 {
    // A fixed range no client key can reach (client operation ids are hashes with bit 0 set).
    (0xDE40 << 112) | (n << 1)
}

fn exists_ok(result: Result<(), OpError>) -> anyhow::Result<()> {
    match result {
        Ok(()) | Err(OpError::Wallet(WalletRefusal::Exists)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Seeds the demo world unless `demo.json` exists, then writes it.
/// The demo operator's gateway credentials: the password derives from the server secret, so it
/// is the same at every start of one data directory.
pub fn smpp_operator(secret: &engine::secret::ServerSecret) -> crate::config::OperatorSection {
    let tag = secret.derive_code("smpp-demo", 0, 0, 8);
    crate::config::OperatorSection {
        name: "demo".into(),
        system_id: "demo-gw".into(),
        password: tag.expose().to_owned(),
        allowed_addresses: Vec::new(),
        max_binds: 64,
        window: 256,
        throughput_per_s: 50_000,
        mode: crate::config::SmppMode::Server,
        connect: None,
        outbound: None,
        session_reference: crate::config::SessionReference::ItsSessionInfo,
        service_type: "USSD".into(),
        sms_source: "Qepik".into(),
        sms_prefixes: Vec::new(),
    }
}

pub async fn seed(
    state: &Arc<AppState>,
    addr: SocketAddr,
    smpp_addr: Option<SocketAddr>,
    smpp: &crate::config::SmppSection,
) -> anyhow::Result<()> {
    let path = state.config.server.data_dir.join("demo.json");
    if path.exists() {
        tracing::info!(path = %path.display(), "demo world already seeded");
        return Ok(());
    }
    let domain = &state.domain;
    let agents = [
        (AGENT, AgentKind::Agent, "agent", "Nizami kiosk agent", azn(100_000)),
        (KIOSK, AgentKind::Kiosk, "kiosk", "28 May metro kiosk", azn(50_000)),
        (POST_OFFICE, AgentKind::PostOffice, "post_office", "Azerpost Baku AZ1000", azn(200_000)),
        (ATM_NETWORK, AgentKind::AtmNetwork, "atm_network", "Demo ATM network", azn(10_000)),
    ];
    let mut agent_list = Vec::new();
    for (n, (agent, kind, kind_name, name, float)) in agents.iter().enumerate() {
        domain.create_agent(*agent, *kind).await?;
        domain.fund_agent(op(n as u128 + 1), *agent, *float).await?;
        agent_list.push(
            json!({ "agent": agent, "kind": kind_name, "name": name, "float": crate::http::money(*float) }),
        );
    }
    let mut wallets = Vec::new();
    for (n, (number, pin, tier, balance)) in WALLETS.iter().enumerate() {
        let msisdn = domain.msisdn(number)?;
        let pin_value = Pin::parse(pin)?;
        exists_ok(domain.register(msisdn, Some(&pin_value), 0, Actor::customer(msisdn.get())).await)?;
        if *tier > 0 {
            let profile = Profile {
                document_type: "ID".into(),
                document_number: format!("AZE{:07}", 1000 + n),
                first_name: "Demo".into(),
                last_name: format!("Customer {}", n + 1),
                birth_date: "1990-01-01".into(),
            };
            domain.identify(msisdn, *tier, profile, STAFF).await?;
        }
        if *balance > 0 {
            domain.cash_in(op(100 + n as u128), AGENT, msisdn, *balance).await?;
        }
        wallets.push(json!({ "msisdn": msisdn.to_string(), "pin": pin, "tier": tier, "cash_in": crate::http::money(*balance) }));
    }
    let credentials = [
        (Role::Admin, 0, ADMIN, "administrator"),
        (Role::Agent, AGENT, 0, "Nizami kiosk agent"),
        (Role::Agent, KIOSK, 0, "28 May metro kiosk"),
        (Role::Staff, POST_OFFICE, STAFF, "post-office clerk 501 at Azerpost Baku AZ1000"),
        (Role::Atm, ATM_NETWORK, 0, "Demo ATM network"),
    ];
    let mut credential_list = Vec::new();
    for (role, agent, staff, who) in credentials {
        let (credential, key) =
            issue(state, role, agent, staff).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        credential_list.push(json!({
            "role": role, "who": who, "agent": agent, "staff": staff,
            "key_id": credential.key_id, "key": key,
        }));
    }
    let merchant = crate::http::admin::merchant(
        state,
        crate::http::admin::CreateMerchant {
            merchant: MERCHANT,
            name: "Demo Cafe".into(),
            city: "Baku".into(),
            webhook_url: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    credential_list.push(json!({
        "role": "merchant", "who": "Demo Cafe", "agent": MERCHANT, "staff": 0,
        "key_id": merchant["key_id"], "key": merchant["key"], "webhook_key": merchant["webhook_key"],
    }));
    let demo = json!({
        "http": format!("http://{addr}"),
        "signing": "X-Qepik-Key: key_id; X-Qepik-Timestamp: unix seconds; X-Qepik-Signature: hex HMAC-SHA256(hex-decoded key, METHOD\\nPATH?QUERY\\nTIMESTAMP\\nhex SHA-256 of the body)",
        "sms_inbox": format!("http://{addr}/v1/demo/sms/{{msisdn}}"),
        "credentials": credential_list,
        "agents": agent_list,
        "staff": [{ "staff": STAFF, "post_office": POST_OFFICE }],
        "wallets": wallets,
        "smpp": smpp_addr.map(|at| json!({
            "address": at.to_string(),
            "service_code": smpp.service_code,
            "operators": smpp.operators.iter().filter(|o| o.mode == crate::config::SmppMode::Server).map(|o| json!({
                "name": o.name, "system_id": o.system_id, "password": o.password,
                "max_binds": o.max_binds, "window": o.window,
            })).collect::<Vec<_>>(),
        })),
        "tiers": domain.rules().policy.tiers.iter().map(|t| json!({ "code": t.code, "name": t.name })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&demo)?;
    crate::server::write_private(&path, text.as_bytes()).context("writing demo.json")?;
    tracing::info!(path = %path.display(), "demo world seeded");
    Ok(())
}
