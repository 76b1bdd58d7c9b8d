//! Agents (kiosks, terminals, post offices) and ATM networks.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use engine::domain::{CustomerAuth, agent_float, channels};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{AppState, auth::Signed, idempotency};
use crate::store::Role;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/agent/cash-in", post(cash_in))
        .route("/v1/agent/cash-out", post(cash_out))
        .route("/v1/agent/float", get(float))
        .route("/v1/agent/operations/{reference}", get(operation))
        .route("/v1/atm/redemptions", post(redeem))
        .route("/v1/atm/redemptions/{reference}", get(redemption))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CashIn {
    pub msisdn: String,
    pub amount: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CashOut {
    pub msisdn: String,
    pub amount: String,
    /// The customer's PIN, typed on the terminal's PIN pad.
    #[serde(default)]
    pub pin: Option<String>,
    /// Or an OTP the customer received.
    #[serde(default)]
    pub otp: Option<String>,
}

const AGENTS: &[Role] = &[Role::Agent, Role::Staff];

#[utoipa::path(post, path = "/v1/agent/cash-in", tag = "agent", description = "Cash-in: the agent takes cash and credits the wallet from its float. Idempotency-Key required.", request_body = CashIn, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
pub async fn cash_in(State(state): State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    idempotency::signed_once(state, &headers, signed, AGENTS, |call, caller| async move {
        let request: CashIn = super::parse(&call.body)?;
        let msisdn = super::msisdn(&call.state, &request.msisdn, "msisdn")?;
        let amount = super::amount(&request.amount, "amount")?;
        let receipt = call.state.domain.cash_in(call.op, caller.agent, msisdn, amount).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}

#[utoipa::path(post, path = "/v1/agent/cash-out", tag = "agent", description = "Cash-out confirmed by the customer's PIN or OTP. Idempotency-Key required.", request_body = CashOut, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
pub async fn cash_out(State(state): State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    idempotency::signed_once(state, &headers, signed, AGENTS, |call, caller| async move {
        let request: CashOut = super::parse(&call.body)?;
        let msisdn = super::msisdn(&call.state, &request.msisdn, "msisdn")?;
        let amount = super::amount(&request.amount, "amount")?;
        let pin = request.pin.as_deref().map(|p| super::pin(p, "pin")).transpose()?;
        let otp = request.otp.as_deref().map(|o| super::otp(o, "otp")).transpose()?;
        let channel =
            if caller.role == Role::Staff { channels::POST_OFFICE } else { channels::AGENT_TERMINAL };
        let auth = CustomerAuth { pin: pin.as_ref(), otp: otp.as_ref(), channel };
        let receipt = call.state.domain.cash_out(call.op, caller.agent, msisdn, amount, auth).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}

#[utoipa::path(get, path = "/v1/agent/float", tag = "agent", description = "The caller's float balance.", responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn float(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Agent, Role::Atm, Role::Staff])?;
    let account = state.engine.lookup_accounts(&[agent_float(caller.agent)]).await?.pop().flatten();
    let account = account.ok_or_else(|| ApiError::not_found("float account"))?;
    Ok(axum::Json(json!({
        "agent": caller.agent,
        "balance": super::balance(account.balance_posted()),
        "available": super::balance(account.balance_available()),
    }))
    .into_response())
}

/// An operation's status by the caller's reference (its Idempotency-Key).
#[utoipa::path(get, path = "/v1/agent/operations/{reference}", tag = "agent", description = "An operation's status by the caller's Idempotency-Key (also served at /v1/atm/redemptions/{reference}).", params(("reference" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn operation(
    State(state): State<Arc<AppState>>,
    Path(reference): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Agent, Role::Atm, Role::Staff])?;
    let op = idempotency::operation_id(&caller.key_id, &reference);
    let stored = state.store.response(op)?;
    let status = state.domain.operation_status(op).await?;
    let ledger = status.map(|s| format!("{:?}", s.state).to_lowercase());
    match (stored, ledger) {
        (None, None) => Err(ApiError::not_found("operation")),
        (stored, ledger) => Ok(axum::Json(json!({
            "reference": reference,
            "operation": format!("{op:032x}"),
            "ledger_state": ledger,
            "response_status": stored.as_ref().map(|s| s.status),
            "response": stored.and_then(|s| serde_json::from_str::<serde_json::Value>(&s.body).ok()),
        }))
        .into_response()),
    }
}

#[utoipa::path(get, path = "/v1/atm/redemptions/{reference}", tag = "atm", description = "A redemption's status by the caller's Idempotency-Key.", params(("reference" = String, Path)), responses((status = 200, description = "found"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn redemption(
    state: State<Arc<AppState>>,
    reference: Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    operation(state, reference, signed).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeem {
    pub msisdn: String,
    pub code: String,
    pub amount: String,
    /// The ATM or counter that pays the cash.
    pub device: u64,
}

#[utoipa::path(post, path = "/v1/atm/redemptions", tag = "atm", description = "An ATM network or post office pays out a cash code. Idempotency-Key required.", request_body = Redeem, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn redeem(State(state): State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    idempotency::signed_once(state, &headers, signed, &[Role::Atm, Role::Staff], |call, caller| async move {
        let request: Redeem = super::parse(&call.body)?;
        let msisdn = super::msisdn(&call.state, &request.msisdn, "msisdn")?;
        let amount = super::amount(&request.amount, "amount")?;
        let code = engine::secret::OneTimeCode::parse(&request.code, 8).map_err(|e| {
            ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e.code(), "code", e.to_string())
        })?;
        let receipt = call
            .state
            .domain
            .redeem_cash_code(call.op, caller.agent, request.device, msisdn, &code, amount)
            .await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}
