//! Administrators: agents and their funding, credentials, the trial balance that operators and
//! the load tool use to check that nothing was created or lost, and the wallet rules (tiers and
//! their limits, tariffs, commissions), read and changed at run time through
//! [`crate::settings`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use engine::domain::AgentKind;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{AppState, auth::Signed, idempotency};
use crate::settings::{self, TariffJson, TierJson};
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
        .route("/v1/admin/wallet-settings/changes", get(settings_changes))
        .route("/v1/admin/tiers/{code}", put(put_tier))
        .route("/v1/admin/tariffs/{operation}", put(put_tariff).delete(delete_tariff))
        .route("/v1/admin/commissions/{operation}", put(put_commission).delete(delete_commission))
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

#[utoipa::path(get, path = "/v1/admin/wallet-settings", tag = "admin", description = "The tiers with their limits, the tariffs and commissions, and the attempt limits in force. Tiers, tariffs and commissions are the live ones: the configuration file's, or administrators' changes since (PUT /v1/admin/tiers/{code}, PUT|DELETE /v1/admin/tariffs/{operation} and /v1/admin/commissions/{operation}); the rest comes from the configuration file.", responses((status = 200, description = "the settings"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn wallet_settings(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let config = state.domain.config();
    let rules = state.domain.rules();
    let policy = &rules.policy;
    let tiers: Vec<serde_json::Value> = policy.tiers.iter().map(tier_view).collect();
    let table = |table: &engine::tariff::TariffTable| -> Vec<serde_json::Value> {
        table.iter().map(|(code, t)| tariff_view(code, t)).collect()
    };
    Ok(axum::Json(json!({
        "tiers": tiers,
        "tariffs": table(&rules.tariffs),
        "commissions": table(&rules.commissions),
        "step_up_above": if config.step_up_above == u64::MAX { json!("unlimited") } else { json!(super::money(config.step_up_above)) },
        "pin_attempts": policy.pin_attempts_max,
        "otp_attempts": policy.otp_attempts_max,
        "code_attempts": policy.code_attempts_max,
        "otp_ttl_s": config.otp_ttl_s,
        "cash_code_ttl_s": config.cash_code_ttl_s,
        "reversal_window_s": config.reversal_window_s,
    }))
    .into_response())
}

/// A tier as the GET shows it: its code, name and limits.
fn tier_view(tier: &engine::wallet::Tier) -> serde_json::Value {
    let json = settings::tier_json(tier);
    json!({ "code": tier.code, "name": json.name, "limits": json.limits })
}

/// A tariff as the GET shows it: its operation and its rule.
fn tariff_view(code: u16, tariff: &engine::tariff::Tariff) -> serde_json::Value {
    let json = settings::tariff_json(tariff);
    json!({
        "operation": engine::statement::code_name(code),
        "fixed": json.fixed,
        "percent_bps": json.percent_bps,
        "min": json.min,
        "max": json.max,
    })
}

#[utoipa::path(get, path = "/v1/admin/wallet-settings/changes", tag = "admin", description = "The last 100 changes of the tiers, tariffs and commissions, newest first: when (unix seconds), by whom (the administrator's key id, or the configuration file when it won at a start), what, and the new value (null: removed).", responses((status = 200, description = "the changes"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn settings_changes(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    signed.require(&[Role::Admin])?;
    let changes = state.store.settings_changes(100)?;
    Ok(axum::Json(json!({ "changes": changes })).into_response())
}

fn tier_code(text: &str) -> Result<u8, ApiError> {
    text.trim().parse::<u8>().map_err(|_| {
        ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "code", "a tier code, 0 to 255")
    })
}

#[utoipa::path(put, path = "/v1/admin/tiers/{code}", tag = "admin", description = "Create or replace a KYC tier and its limits per currency. Amounts are decimal text or \"unlimited\"; counts are whole numbers or \"unlimited\". Wallets on the tier keep it and meet the new limits from their next operation; a new tier goes after the others (the first stays the one self-registration gives). Tiers are never removed over the API, so no wallet is ever left without one. In force at once, kept across restarts, recorded with who and when.", request_body = TierJson, params(("code" = u8, Path)), responses((status = 200, description = "the tier as now in force"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn put_tier(
    State(state): State<Arc<AppState>>,
    Path(code): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Admin])?;
    let code = tier_code(&code)?;
    let request: TierJson = super::parse(&signed.body)?;
    let tier = settings::tier(code, &request)?;
    let view = tier_view(&tier);
    settings::change(&state, &caller.key_id, "put_tier", &code.to_string(), view.clone(), |rules| {
        engine::config::put_tier(&mut rules.policy.tiers, tier, "name").map_err(|e| {
            ApiError::field(StatusCode::CONFLICT, "tier_name_taken", &e.path, e.problem.to_string())
        })
    })
    .await?;
    Ok(axum::Json(view).into_response())
}

/// Which fee table a route changes.
#[derive(Debug, Clone, Copy)]
enum Table {
    Tariffs,
    Commissions,
}

impl Table {
    fn of(self, rules: &mut engine::Rules) -> &mut engine::tariff::TariffTable {
        match self {
            Table::Tariffs => &mut rules.tariffs,
            Table::Commissions => &mut rules.commissions,
        }
    }

    /// The actions' names in the change log (put, delete), and the thing in "no such …".
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Table::Tariffs => ("put_tariff", "delete_tariff", "tariff"),
            Table::Commissions => ("put_commission", "delete_commission", "commission"),
        }
    }
}

/// Whether a fee route sets a tariff or removes it.
#[derive(Debug, Clone, Copy)]
enum FeeChange {
    Put,
    Delete,
}

async fn change_fee(
    state: &AppState,
    signed: &Signed,
    operation: &str,
    (table, change): (Table, FeeChange),
) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Admin])?;
    let code = settings::operation(operation)?;
    let target = engine::statement::code_name(code);
    let (put, delete, what) = table.names();
    match change {
        FeeChange::Put => {
            let request: TariffJson = super::parse(&signed.body)?;
            let tariff = settings::tariff(&request)?;
            let view = tariff_view(code, &tariff);
            settings::change(state, &caller.key_id, put, target, view.clone(), |rules| {
                table.of(rules).set(code, tariff).map_err(|e| {
                    ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e.code(), "percent_bps", e.to_string())
                })
            })
            .await?;
            Ok(axum::Json(view).into_response())
        }
        FeeChange::Delete => {
            settings::change(state, &caller.key_id, delete, target, json!(null), |rules| {
                table.of(rules).remove(code).map(drop).ok_or_else(|| ApiError::not_found(what))
            })
            .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// Route handlers over `change_fee`, one per table and change, with their OpenAPI annotations.
macro_rules! fee_routes {
    ($($(#[$doc:meta])* $name:ident => $table:expr, $change:expr;)*) => {$(
        $(#[$doc])*
        async fn $name(
            State(state): State<Arc<AppState>>,
            Path(operation): Path<String>,
            signed: Signed,
        ) -> Result<Response, ApiError> {
            change_fee(&state, &signed, &operation, ($table, $change)).await
        }
    )*};
}

fee_routes! {
    #[utoipa::path(put, path = "/v1/admin/tariffs/{operation}", tag = "admin", description = "Set the customer fee of an operation (p2p, cash_in, cash_out, cash_code, merchant_payment, bill_payment, issuance, refund, or its code number): fixed + percent_bps of the amount, at least min, at most max (absent or null: no maximum). Amounts are AZN decimal text. The next operation pays it; kept across restarts; recorded with who and when.", request_body = TariffJson, params(("operation" = String, Path)), responses((status = 200, description = "the tariff as now in force"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
    put_tariff => Table::Tariffs, FeeChange::Put;
    #[utoipa::path(delete, path = "/v1/admin/tariffs/{operation}", tag = "admin", description = "Remove the customer fee of an operation: it is free from the next one.", params(("operation" = String, Path)), responses((status = 204, description = "removed"), (status = "4XX", description = "refused (404: the operation has no tariff)", body = super::openapi::ErrorBody)))]
    delete_tariff => Table::Tariffs, FeeChange::Delete;
    #[utoipa::path(put, path = "/v1/admin/commissions/{operation}", tag = "admin", description = "Set the agent commission of an operation (paid from fee income), in the same form as a tariff.", request_body = TariffJson, params(("operation" = String, Path)), responses((status = 200, description = "the commission as now in force"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
    put_commission => Table::Commissions, FeeChange::Put;
    #[utoipa::path(delete, path = "/v1/admin/commissions/{operation}", tag = "admin", description = "Remove the agent commission of an operation.", params(("operation" = String, Path)), responses((status = 204, description = "removed"), (status = "4XX", description = "refused (404: the operation has no commission)", body = super::openapi::ErrorBody)))]
    delete_commission => Table::Commissions, FeeChange::Delete;
}
