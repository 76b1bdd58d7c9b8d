//! Customers (web and app): self-registration, OTP login to a session (expiry, refresh,
//! revoke), balance, P2P transfers and cash codes.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use engine::domain::{CustomerAuth, channels};
use engine::wallet::Actor;
use serde::Deserialize;
use serde_json::json;

use super::auth::{Customer, now_s, sha256_hex};
use super::error::ApiError;
use super::{AppState, idempotency};
use crate::store::Session;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/customer/register", post(register))
        .route("/v1/customer/otp", post(request_otp))
        .route("/v1/customer/sessions", post(login).delete(logout))
        .route("/v1/customer/sessions/refresh", post(refresh))
        .route("/v1/customer/balance", get(balance))
        .route("/v1/customer/transfers", post(transfer))
        .route("/v1/customer/cash-codes", post(cash_code))
        .route("/v1/demo/sms/{msisdn}", get(demo_sms))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Register {
    msisdn: String,
    pin: String,
    #[serde(default)]
    language: Option<String>,
}

fn language(code: Option<&str>) -> Result<u8, ApiError> {
    match code.unwrap_or("az") {
        "az" => Ok(0),
        "ru" => Ok(1),
        "en" => Ok(2),
        _ => Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "language",
            "az, ru or en",
        )),
    }
}

/// Self-registration from the app: the lowest tier, with a PIN.
#[utoipa::path(post, path = "/v1/customer/register", tag = "customer", description = "Self-registration with a PIN (lowest tier).", request_body = Register, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn register(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: Register = super::parse(&body)?;
    let msisdn = super::msisdn(&state, &request.msisdn, "msisdn")?;
    let pin = super::pin(&request.pin, "pin")?;
    let language = language(request.language.as_deref())?;
    state.rate.admit(&format!("register:{}", msisdn.get()), 1)?;
    state.domain.register(msisdn, Some(&pin), language, Actor::customer(msisdn.get())).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "msisdn": msisdn.to_string(), "tier": 0 }))).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct OtpRequest {
    msisdn: String,
}

/// Sends a login OTP by SMS. Answers the same whether or not the number has a wallet, so that
/// the endpoint does not tell who is a customer.
#[utoipa::path(post, path = "/v1/customer/otp", tag = "customer", description = "Send a login OTP by SMS.", request_body = OtpRequest, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn request_otp(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: OtpRequest = super::parse(&body)?;
    let msisdn = super::msisdn(&state, &request.msisdn, "msisdn")?;
    match state.domain.request_otp(msisdn).await {
        // With the views running, the OTP goes out through the outbox once its issue is durable
        // (the notifier actor); without them, from here, after the same commit.
        Ok(issued) if state.engine.views().is_none() => {
            let code = state.domain.otp_for_delivery(msisdn, issued.nonce);
            state.sms.send(msisdn.get(), format!("Qepik: your code is {}. Do not share it.", code.expose()));
        }
        Ok(_) => {}
        Err(engine::OpError::Wallet(engine::wallet::WalletRefusal::NotFound)) => {}
        Err(error) => return Err(error.into()),
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "sent": true, "expires_in_s": state.domain.config().otp_ttl_s })),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    msisdn: String,
    otp: String,
}

fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// A new access token and refresh token for `msisdn`.
fn open_session(state: &AppState, msisdn: u64) -> Result<serde_json::Value, ApiError> {
    let (access, refresh) = (token(), token());
    let now = now_s();
    let http = &state.config.http;
    state.store.put_session(
        &sha256_hex(access.as_bytes()),
        &Session { msisdn, expires_at_s: now + http.session_ttl_s, refresh: false },
    )?;
    state.store.put_session(
        &sha256_hex(refresh.as_bytes()),
        &Session { msisdn, expires_at_s: now + http.refresh_ttl_s, refresh: true },
    )?;
    Ok(json!({
        "token": access,
        "expires_in_s": http.session_ttl_s,
        "refresh_token": refresh,
        "refresh_expires_in_s": http.refresh_ttl_s,
    }))
}

#[utoipa::path(post, path = "/v1/customer/sessions", tag = "customer", description = "Log in with the OTP: a session token and a refresh token.", request_body = Login, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn login(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: Login = super::parse(&body)?;
    let msisdn = super::msisdn(&state, &request.msisdn, "msisdn")?;
    let otp = super::otp(&request.otp, "otp")?;
    state.domain.verify_otp(msisdn, &otp).await?;
    Ok((StatusCode::CREATED, axum::Json(open_session(&state, msisdn.get())?)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Refresh {
    refresh_token: String,
}

/// Trades a refresh token for a new pair; the old refresh token is spent.
#[utoipa::path(post, path = "/v1/customer/sessions/refresh", tag = "customer", description = "Trade a refresh token for a new pair.", request_body = Refresh, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn refresh(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: Refresh = super::parse(&body)?;
    let hash = sha256_hex(request.refresh_token.trim().as_bytes());
    let session = state.store.session(&hash)?.ok_or_else(ApiError::unauthenticated)?;
    if !session.refresh || session.expires_at_s <= now_s() || !state.store.remove_session(&hash)? {
        return Err(ApiError::unauthenticated());
    }
    Ok((StatusCode::CREATED, axum::Json(open_session(&state, session.msisdn)?)).into_response())
}

/// Revokes the session whose token authorises the call (and a refresh token, if given).
#[utoipa::path(delete, path = "/v1/customer/sessions", tag = "customer", description = "Revoke the session (and a refresh token, if given in the body).", responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn logout(
    State(state): State<Arc<AppState>>,
    _customer: Customer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthenticated)?;
    state.store.remove_session(&sha256_hex(token.trim().as_bytes()))?;
    if !body.is_empty() {
        let request: Refresh = super::parse(&body)?;
        state.store.remove_session(&sha256_hex(request.refresh_token.trim().as_bytes()))?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/customer/balance", tag = "customer", description = "The customer's wallet, balances and limits.", responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn balance(State(state): State<Arc<AppState>>, customer: Customer) -> Result<Response, ApiError> {
    let view = state.domain.wallet(customer.msisdn).await?;
    Ok(axum::Json(super::staff::wallet_json(&view, &state.domain.config().plan)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Transfer {
    to: String,
    amount: String,
    pin: String,
    #[serde(default)]
    otp: Option<String>,
}

#[utoipa::path(post, path = "/v1/customer/transfers", tag = "customer", description = "P2P transfer confirmed by PIN (and OTP above the step-up amount). Idempotency-Key required.", request_body = Transfer, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn transfer(
    State(state): State<Arc<AppState>>,
    customer: Customer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = format!("customer:{}", customer.msisdn.get());
    idempotency::run_once(state, &caller, &headers, body, |call| async move {
        let request: Transfer = super::parse(&call.body)?;
        let to = super::msisdn(&call.state, &request.to, "to")?;
        let amount = super::amount(&request.amount, "amount")?;
        let pin = super::pin(&request.pin, "pin")?;
        let otp = request.otp.as_deref().map(|o| super::otp(o, "otp")).transpose()?;
        let auth = CustomerAuth { pin: Some(&pin), otp: otp.as_ref(), channel: channels::APP };
        let receipt = call.state.domain.p2p(call.op, customer.msisdn, to, amount, auth).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CashCodeRequest {
    amount: String,
    pin: String,
}

/// A cash code for an ATM or a post office. Not answered from a stored response (the answer
/// holds the code, which is stored nowhere): a retry under the same key re-derives the same
/// code for the same hold.
#[utoipa::path(post, path = "/v1/customer/cash-codes", tag = "customer", description = "A cash code for an ATM or post office; the amount and fee are held. Idempotency-Key required.", request_body = CashCodeRequest, responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn cash_code(
    State(state): State<Arc<AppState>>,
    customer: Customer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency::key_from(&headers)?;
    let op = idempotency::operation_id(&format!("customer:{}", customer.msisdn.get()), &key);
    let request: CashCodeRequest = super::parse(&body)?;
    let amount = super::amount(&request.amount, "amount")?;
    let pin = super::pin(&request.pin, "pin")?;
    let auth = CustomerAuth { pin: Some(&pin), otp: None, channel: channels::APP };
    let code = state.domain.issue_cash_code(op, customer.msisdn, amount, auth).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "code": code.code.expose(),
            "amount": super::money(code.amount),
            "fee": super::money(code.fee),
            "expires_in_s": code.expires_in_s,
        })),
    )
        .into_response())
}

/// The demo's simulated handset: the SMS a number received (only on a `--demo` server).
#[utoipa::path(get, path = "/v1/demo/sms/{msisdn}", tag = "demo", description = "Demo servers only: the SMS a simulated handset received.", params(("msisdn" = String, Path)), responses((status = 200, description = "done"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn demo_sms(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
) -> Result<Response, ApiError> {
    let Some(inbox) = &state.demo_inbox else {
        return Err(ApiError::not_found("route"));
    };
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    Ok(axum::Json(json!({ "msisdn": msisdn.to_string(), "messages": inbox.messages(msisdn.get()) }))
        .into_response())
}
