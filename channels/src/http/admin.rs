//! Administrators: agents and their funding, credentials, and the trial balance that operators
//! and the load tool use to check that nothing was created or lost.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use engine::domain::AgentKind;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{AppState, auth::Signed, idempotency};
use crate::store::{Credential, Role};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/agents", post(create_agent))
        .route("/v1/admin/agents/{agent}/funding", post(fund_agent))
        .route("/v1/admin/merchants", post(create_merchant))
        .route("/v1/admin/credentials", post(issue_credential))
        .route("/v1/admin/credentials/{key_id}", delete(revoke_credential))
        .route("/v1/admin/trial-balance", get(trial_balance))
        .route("/v1/admin/wallet-settings", get(wallet_settings))
}

pub fn agent_kind(name: &str) -> Option<AgentKind> {
    match name {
        "agent" => Some(AgentKind::Agent),
        "kiosk" => Some(AgentKind::Kiosk),
        "post_office" => Some(AgentKind::PostOffice),
        "atm_network" => Some(AgentKind::AtmNetwork),
        _ => None,
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateAgent {
    agent: u64,
    kind: String,
}

#[utoipa::path(post, path = "/v1/admin/agents", tag = "admin", description = "Create an agent of a kind, with its float and commission accounts.", request_body = CreateAgent, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn create_agent(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let request: CreateAgent = super::parse(&signed.body)?;
    let kind = agent_kind(&request.kind).ok_or_else(|| {
        ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "kind",
            "agent, kiosk, post_office or atm_network",
        )
    })?;
    if request.agent == 0 || request.agent >= 1 << 40 {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "agent",
            "1 to 2^40 - 1",
        ));
    }
    state.domain.create_agent(request.agent, kind).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "agent": request.agent, "kind": request.kind })))
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMerchant {
    pub merchant: u64,
    pub name: String,
    pub city: String,
    /// Where signed payment webhooks go (http or https).
    #[serde(default)]
    pub webhook_url: Option<String>,
}

/// Creates a merchant (its account, its record) and its credential.
pub async fn merchant(state: &AppState, request: CreateMerchant) -> Result<serde_json::Value, ApiError> {
    let text_ok =
        |t: &str| !t.trim().is_empty() && t.chars().count() <= 25 && t.chars().all(|c| !c.is_control());
    if !text_ok(&request.name) {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "name",
            "1 to 25 printable characters",
        ));
    }
    if !text_ok(&request.city) || request.city.chars().count() > 15 {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "city",
            "1 to 15 printable characters",
        ));
    }
    if request.merchant == 0 || request.merchant >= 1 << 40 {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "merchant",
            "1 to 2^40 - 1",
        ));
    }
    if let Some(url) = &request.webhook_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "webhook_url",
            "an http or https URL",
        ));
    }
    state.domain.create_merchant(request.merchant).await?;
    state.store.put_merchant(&crate::store::Merchant {
        merchant: request.merchant,
        name: request.name.trim().to_owned(),
        city: request.city.trim().to_owned(),
        webhook_url: request.webhook_url,
    })?;
    let (credential, key) = issue(state, Role::Merchant, request.merchant, 0)?;
    let webhook_key = hex::encode(super::merchant::webhook_key(&state.secret, request.merchant));
    Ok(
        json!({ "merchant": request.merchant, "key_id": credential.key_id, "key": key, "webhook_key": webhook_key }),
    )
}

#[utoipa::path(post, path = "/v1/admin/merchants", tag = "admin", description = "Create a merchant: its account, its record and its API credential; the key and the webhook signing key are returned once.", request_body = CreateMerchant, responses((status = 201, description = "created"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn create_merchant(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let request: CreateMerchant = super::parse(&signed.body)?;
    Ok((StatusCode::CREATED, axum::Json(merchant(&state, request).await?)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Funding {
    amount: String,
}

/// E-money issued to an agent's float against cash or a bank deposit it paid in.
#[utoipa::path(post, path = "/v1/admin/agents/{agent}/funding", tag = "admin", description = "Issue e-money to an agent's float against funds received. Idempotency-Key required.", request_body = Funding, params(("agent" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn fund_agent(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<u64>,
    headers: HeaderMap,
    signed: Signed,
) -> Response {
    idempotency::signed_once(state, &headers, signed, &[Role::Admin], |call, _caller| async move {
        let request: Funding = super::parse(&call.body)?;
        let amount = super::amount(&request.amount, "amount")?;
        let receipt = call.state.domain.fund_agent(call.op, agent, amount).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct IssueCredential {
    role: Role,
    #[serde(default)]
    agent: u64,
    #[serde(default)]
    staff: u64,
}

/// Issues a credential and returns its key, once.
pub fn issue(state: &AppState, role: Role, agent: u64, staff: u64) -> Result<(Credential, String), ApiError> {
    let key_id = format!("{}_{}", role.name(), hex::encode(rand::random::<[u8; 8]>()));
    let key = super::auth::api_key(&state.secret, &key_id);
    let credential = Credential {
        key_id,
        role,
        agent,
        staff,
        key_sha256: super::auth::sha256_hex(&key),
        created_at_s: super::auth::now_s(),
        revoked: false,
    };
    state.store.put_credential(&credential)?;
    Ok((credential, hex::encode(key)))
}

#[utoipa::path(post, path = "/v1/admin/credentials", tag = "admin", description = "Issue an API credential; the key is returned once.", request_body = IssueCredential, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn issue_credential(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let request: IssueCredential = super::parse(&signed.body)?;
    if matches!(request.role, Role::Agent | Role::Atm | Role::Staff) && request.agent == 0 {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "agent",
            "the agent this credential acts for",
        ));
    }
    if request.role == Role::Staff && request.staff == 0 {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "staff",
            "the staff member's id",
        ));
    }
    let (credential, key) = issue(&state, request.role, request.agent, request.staff)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "key_id": credential.key_id, "key": key, "role": credential.role, "agent": credential.agent, "staff": credential.staff })),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/v1/admin/credentials/{key_id}", tag = "admin", description = "Revoke an API credential.", params(("key_id" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn revoke_credential(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let mut credential = state.store.credential(&key_id)?.ok_or_else(|| ApiError::not_found("credential"))?;
    credential.revoked = true;
    state.store.put_credential(&credential)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Totals per currency and per account kind, and whether debits equal credits.
#[utoipa::path(get, path = "/v1/admin/trial-balance", tag = "admin", description = "Totals per currency and account kind, and whether debits equal credits.", responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn trial_balance(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let engine = state.engine.clone();
    let by_kind =
        tokio::task::spawn_blocking(move || engine.totals_by_kind()).await.map_err(ApiError::internal)??;
    let mut totals: std::collections::BTreeMap<&'static str, engine::Totals> =
        std::collections::BTreeMap::new();
    let mut lines: Vec<((&'static str, u16), serde_json::Value)> = Vec::new();
    for ((currency, kind), t) in &by_kind {
        totals.entry(currency.code()).or_default().merge(t);
        // Posted balance as the kind's holders see it: credits minus debits.
        let balance = i128::try_from(t.credits_posted).unwrap_or(i128::MAX)
            - i128::try_from(t.debits_posted).unwrap_or(i128::MAX);
        lines.push((
            (currency.code(), kind.0),
            json!({
                "currency": currency.code(),
                "kind": kind_name(*kind),
                "debits_posted": t.debits_posted.to_string(),
                "credits_posted": t.credits_posted.to_string(),
                "debits_pending": t.debits_pending.to_string(),
                "credits_pending": t.credits_pending.to_string(),
                "balance": super::balance(balance),
            }),
        ));
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let currencies: Vec<serde_json::Value> = totals
        .iter()
        .map(|(currency, t)| {
            json!({
                "currency": currency,
                "debits_posted": t.debits_posted.to_string(),
                "credits_posted": t.credits_posted.to_string(),
                "debits_pending": t.debits_pending.to_string(),
                "credits_pending": t.credits_pending.to_string(),
                "balanced": t.balanced(),
            })
        })
        .collect();
    let balanced = totals.values().all(|t| t.balanced());
    let kinds: Vec<serde_json::Value> = lines.into_iter().map(|(_, line)| line).collect();
    Ok(axum::Json(json!({ "balanced": balanced, "currencies": currencies, "kinds": kinds })).into_response())
}

fn kind_name(kind: engine::AccountKind) -> String {
    use engine::AccountKind as K;
    let name = match kind {
        K::WALLET => "wallet",
        K::AGENT_FLOAT => "agent_float",
        K::BILLER_SETTLEMENT => "biller_settlement",
        K::FEE_INCOME => "fee_income",
        K::CARD_SETTLEMENT => "card_settlement",
        K::EMONEY_ISSUANCE => "emoney_issuance",
        K::ATM_CLEARING => "atm_clearing",
        K::SUSPENSE => "suspense",
        K::AGENT_COMMISSION => "agent_commission",
        K::KIOSK_FLOAT => "kiosk_float",
        K::POST_OFFICE_FLOAT => "post_office_float",
        K::ATM_NETWORK_FLOAT => "atm_network_float",
        K::MERCHANT => "merchant",
        other => return format!("kind_{}", other.0),
    };
    name.to_owned()
}

/// A limit as text: an amount, or "unlimited".
fn limit(minor: u64) -> serde_json::Value {
    if minor == u64::MAX { json!("unlimited") } else { json!(super::money(minor)) }
}

#[utoipa::path(get, path = "/v1/admin/wallet-settings", tag = "admin", description = "The tiers with their limits, the tariffs and commissions, and the attempt limits in force. They come from the configuration file (change it and restart).", responses((status = 200, description = "the settings"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn wallet_settings(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let config = state.domain.config();
    let policy = &config.policy;
    let tiers: Vec<serde_json::Value> = policy
        .tiers
        .iter()
        .map(|tier| {
            let limits: Vec<serde_json::Value> = tier
                .limits
                .iter()
                .map(|(currency, l)| {
                    json!({
                        "currency": engine::Currency::from_u8(*currency).map_or("?", |c| c.code()),
                        "max_balance": limit(l.max_balance),
                        "max_per_operation": limit(l.max_per_operation),
                        "daily_amount": limit(l.daily_amount),
                        "daily_count": l.daily_count,
                        "monthly_amount": limit(l.monthly_amount),
                        "monthly_count": l.monthly_count,
                    })
                })
                .collect();
            json!({ "code": tier.code, "name": tier.name, "limits": limits })
        })
        .collect();
    let table = |table: &engine::tariff::TariffTable| -> Vec<serde_json::Value> {
        table
            .iter()
            .map(|(code, t)| {
                json!({
                    "operation": engine::statement::code_name(code),
                    "fixed": super::money(t.fixed),
                    "percent_bps": t.percent_bps,
                    "min": super::money(t.min),
                    "max": if t.max == 0 { json!(null) } else { json!(super::money(t.max)) },
                })
            })
            .collect()
    };
    Ok(axum::Json(json!({
        "tiers": tiers,
        "tariffs": table(&config.tariffs),
        "commissions": table(&config.commissions),
        "step_up_above": limit(config.step_up_above),
        "pin_attempts": policy.pin_attempts_max,
        "otp_attempts": policy.otp_attempts_max,
        "code_attempts": policy.code_attempts_max,
        "otp_ttl_s": config.otp_ttl_s,
        "cash_code_ttl_s": config.cash_code_ttl_s,
        "reversal_window_s": config.reversal_window_s,
    }))
    .into_response())
}
