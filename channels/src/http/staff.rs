//! Post-office staff: find a wallet, identify it (raising its tier), change its registration
//! data, block and unblock it, cash-in and cash-out at their post office, reverse an operation.
//! Every change is journaled with the staff member's id.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use engine::wallet::{Actor, Profile, WalletView};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{AppState, auth::Signed, idempotency};
use crate::store::Role;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/staff/wallets/{msisdn}", get(find))
        .route("/v1/staff/wallets/{msisdn}/identify", post(identify))
        .route("/v1/staff/wallets/{msisdn}/profile", put(profile))
        .route("/v1/staff/wallets/{msisdn}/unblock", post(unblock))
        .route("/v1/staff/wallets/{msisdn}/block", post(block))
        .route("/v1/staff/cash-in", post(cash_in))
        .route("/v1/staff/cash-out", post(cash_out))
        .route("/v1/staff/reversals", post(reverse))
}

#[utoipa::path(post, path = "/v1/staff/cash-in", tag = "staff", description = "Cash-in at the clerk's post office (as an agent's). Idempotency-Key required.", request_body = super::agent::CashIn, responses((status = 200, description = "posted"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn cash_in(state: State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    super::agent::cash_in(state, headers, signed).await
}

#[utoipa::path(post, path = "/v1/staff/cash-out", tag = "staff", description = "Cash-out at the clerk's post office, confirmed by the customer's PIN. Idempotency-Key required.", request_body = super::agent::CashOut, responses((status = 200, description = "posted"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn cash_out(state: State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    super::agent::cash_out(state, headers, signed).await
}

/// A wallet as staff see it.
pub fn wallet_json(view: &WalletView, plan: &engine::msisdn::NumberingPlan) -> serde_json::Value {
    let msisdn =
        engine::msisdn::Msisdn::from_u64(view.state.msisdn, plan).map(|m| m.to_string()).unwrap_or_default();
    let accounts: Vec<serde_json::Value> = view
        .accounts
        .iter()
        .map(|a| {
            json!({
                "currency": a.account.currency.code(),
                "balance": super::balance(a.account.balance_posted()),
                "available": super::balance(a.account.balance_available()),
                "limits": {
                    "max_balance": super::money(a.limits.max_balance),
                    "max_per_operation": super::money(a.limits.max_per_operation),
                    "daily_amount": super::money(a.limits.daily_amount),
                    "daily_count": a.limits.daily_count,
                    "monthly_amount": super::money(a.limits.monthly_amount),
                    "monthly_count": a.limits.monthly_count,
                },
                "today": { "amount": super::money(a.outflow.day_amount), "count": a.outflow.day_count },
                "this_month": { "amount": super::money(a.outflow.month_amount), "count": a.outflow.month_count },
            })
        })
        .collect();
    json!({
        "msisdn": msisdn,
        "tier": view.state.tier,
        "blocked": view.state.blocked(),
        "pin_set": view.state.pin.is_some(),
        "pin_failures": view.state.pin_failures,
        "language": view.state.language,
        "accounts": accounts,
    })
}

fn staff(signed: &Signed) -> Result<&crate::store::Credential, ApiError> {
    signed.require(&[Role::Staff])
}

#[utoipa::path(get, path = "/v1/staff/wallets/{msisdn}", tag = "staff", description = "A wallet: tier, blocks, balances, limits, today's and this month's outflow.", params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn find(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    staff(&signed)?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    let view = state.domain.wallet(msisdn).await?;
    Ok(axum::Json(wallet_json(&view, &state.domain.config().plan)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    pub document_type: String,
    pub document_number: String,
    pub first_name: String,
    pub last_name: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Identify {
    pub tier: u8,
    #[serde(flatten)]
    pub profile: ProfileBody,
}

fn checked_profile(body: ProfileBody) -> Result<Profile, ApiError> {
    let text = |value: &str, field: &str| {
        let ok =
            !value.trim().is_empty() && value.chars().count() <= 64 && !value.chars().any(char::is_control);
        if ok {
            Ok(value.trim().to_owned())
        } else {
            Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                field,
                "1 to 64 printable characters",
            ))
        }
    };
    let date = body.birth_date.as_bytes();
    let date_ok = date.len() == 10
        && date[4] == b'-'
        && date[7] == b'-'
        && date.iter().enumerate().all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
    if !date_ok {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "birth_date",
            "YYYY-MM-DD",
        ));
    }
    Ok(Profile {
        document_type: text(&body.document_type, "document_type")?,
        document_number: text(&body.document_number, "document_number")?,
        first_name: text(&body.first_name, "first_name")?,
        last_name: text(&body.last_name, "last_name")?,
        birth_date: body.birth_date,
    })
}

#[utoipa::path(post, path = "/v1/staff/wallets/{msisdn}/identify", tag = "staff", description = "Identify a customer in person: documents recorded, tier set.", request_body = Identify, params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn identify(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = staff(&signed)?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    let request: Identify = super::parse(&signed.body)?;
    let profile = checked_profile(request.profile)?;
    state.domain.identify(msisdn, request.tier, profile, caller.staff).await?;
    let view = state.domain.wallet(msisdn).await?;
    Ok(axum::Json(wallet_json(&view, &state.domain.config().plan)).into_response())
}

#[utoipa::path(put, path = "/v1/staff/wallets/{msisdn}/profile", tag = "staff", description = "Change registration data.", request_body = ProfileBody, params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn profile(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = staff(&signed)?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    let profile = checked_profile(super::parse(&signed.body)?)?;
    state.domain.update_profile(msisdn, profile, Actor::staff(caller.staff)).await?;
    Ok(axum::Json(json!({ "msisdn": msisdn.to_string(), "updated": true })).into_response())
}

#[utoipa::path(post, path = "/v1/staff/wallets/{msisdn}/unblock", tag = "staff", description = "Unblock a wallet (PIN or staff block).", params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn unblock(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = staff(&signed)?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    state.domain.unblock(msisdn, caller.staff).await?;
    Ok(axum::Json(json!({ "msisdn": msisdn.to_string(), "blocked": false })).into_response())
}

#[utoipa::path(post, path = "/v1/staff/wallets/{msisdn}/block", tag = "staff", description = "Block a wallet: no debits, no credits.", params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn block(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = staff(&signed)?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    state.domain.block(msisdn, caller.staff).await?;
    Ok(axum::Json(json!({ "msisdn": msisdn.to_string(), "blocked": true })).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reverse {
    /// The operation to reverse, as its receipt names it (32 hex digits).
    pub operation: String,
}

#[utoipa::path(post, path = "/v1/staff/reversals", tag = "staff", description = "Reverse a posted operation within the window: principal, fee and commission. Idempotency-Key required.", request_body = Reverse, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn reverse(State(state): State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    idempotency::signed_once(state, &headers, signed, &[Role::Staff], |call, caller| async move {
        let request: Reverse = super::parse(&call.body)?;
        let op = u128::from_str_radix(&request.operation, 16)
            .ok()
            .filter(|_| request.operation.len() == 32)
            .ok_or_else(|| {
                ApiError::field(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    "operation",
                    "32 hex digits",
                )
            })?;
        let receipt = call.state.domain.reverse(op, caller.staff).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}
