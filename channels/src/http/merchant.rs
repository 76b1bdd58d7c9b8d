//! Merchants and QR payments: a merchant creates a dynamic payment request and shows its EMVCo
//! payload as a QR code; the customer's app scans it and pays (PIN-confirmed); the merchant
//! sees the status and receives a signed webhook.
//!
//! A request is paid at most once: a payer first claims it in the store (one payer at a time),
//! and the payment's ledger id derives from the request's id, so the claimant's retries meet
//! their first payment in the ledger and post nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use engine::domain::{CustomerAuth, channels};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::auth::{Customer, Signed, now_s};
use super::error::ApiError;
use super::{AppState, idempotency};
use crate::emvco;
use crate::store::{Paid, PaymentRequest, Role, Webhook};

/// How long a payment request can be paid.
pub const REQUEST_TTL_S: u64 = 15 * 60;
/// How long one payer holds a request while paying it.
const CLAIM_TTL_S: u64 = 120;
/// The label webhook signing keys are derived under.
pub const WEBHOOK_KEY_DOMAIN: &str = "webhook";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/merchant/qr", post(create_request))
        .route("/v1/merchant/payments/{request}", get(status))
        .route("/v1/customer/qr-payments", post(pay))
        .route("/v1/merchant/refunds", post(refund))
}

/// The key a merchant's webhooks are signed with (HMAC-SHA256 over `timestamp \n body`).
pub fn webhook_key(secret: &engine::secret::ServerSecret, merchant: u64) -> [u8; 32] {
    secret.derive_key(WEBHOOK_KEY_DOMAIN, &merchant.to_be_bytes())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub amount: String,
    /// The merchant's own reference (an order number), 1 to 25 characters.
    pub reference: String,
}

#[utoipa::path(post, path = "/v1/merchant/qr", tag = "merchant", description = "A dynamic QR payment request: its EMVCo merchant-presented payload (with CRC) to show as a QR code.", request_body = CreateRequest, responses((status = 201, description = "created"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn create_request(State(state): State<Arc<AppState>>, signed: Signed) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Merchant])?;
    let request: CreateRequest = super::parse(&signed.body)?;
    let amount = super::amount(&request.amount, "amount")?;
    let reference = request.reference.trim();
    if reference.is_empty() || reference.len() > 25 || !reference.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "reference",
            "1 to 25 visible ASCII characters",
        ));
    }
    let merchant = state.store.merchant(caller.agent)?.ok_or_else(|| ApiError::not_found("merchant"))?;
    let id = hex::encode(rand::random::<[u8; 8]>());
    let record = PaymentRequest {
        request: id.clone(),
        merchant: merchant.merchant,
        amount,
        reference: reference.to_owned(),
        expires_at_s: now_s() + REQUEST_TTL_S,
        paid: None,
        claim: None,
    };
    let payload = emvco::encode(&emvco::PaymentRequest {
        merchant: merchant.merchant,
        request: id.clone(),
        amount: super::money(amount),
        merchant_name: merchant.name.chars().take(25).collect(),
        city: merchant.city.chars().take(15).collect(),
        reference: reference.to_owned(),
    })
    .map_err(|e| {
        ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "reference", e.to_string())
    })?;
    state.store.put_payment_request(&record)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "request": id, "payload": payload, "expires_in_s": REQUEST_TTL_S })),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/merchant/payments/{request}", tag = "merchant", description = "A payment request's status: open, paid (by whom, which operation) or expired.", params(("request" = String, Path)), responses((status = 200, description = "found"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn status(
    State(state): State<Arc<AppState>>,
    Path(request): Path<String>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Merchant])?;
    let record = state.store.payment_request(&request)?.filter(|r| r.merchant == caller.agent);
    let record = record.ok_or_else(|| ApiError::not_found("payment request"))?;
    let status = match (&record.paid, record.expires_at_s <= now_s()) {
        (Some(_), _) => "paid",
        (None, true) => "expired",
        (None, false) => "open",
    };
    Ok(axum::Json(json!({
        "request": record.request,
        "reference": record.reference,
        "amount": super::money(record.amount),
        "status": status,
        "paid": record.paid,
    }))
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pay {
    /// The scanned EMVCo payload.
    pub payload: String,
    pub pin: String,
    #[serde(default)]
    pub otp: Option<String>,
}

/// The ledger id of the payment of `request`: one per request.
fn payment_id(request: &str) -> u128 {
    let digest = Sha256::new().chain_update(b"qepik/qr/v1\0").chain_update(request).finalize();
    let mut id = [0_u8; 16];
    id.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(id) | 1
}

#[utoipa::path(post, path = "/v1/customer/qr-payments", tag = "customer", description = "Pay a scanned merchant QR (PIN-confirmed). Idempotency-Key required. A request is paid at most once.", request_body = Pay, responses((status = 200, description = "paid"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn pay(
    State(state): State<Arc<AppState>>,
    customer: Customer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = format!("customer:{}", customer.msisdn.get());
    idempotency::run_once(state, &caller, &headers, body, |call| async move {
        let request: Pay = super::parse(&call.body)?;
        let scanned = emvco::decode(&request.payload).map_err(|e| {
            ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_qr", "payload", e.to_string())
        })?;
        let record =
            call.state.store.payment_request(&scanned.request)?.filter(|r| r.merchant == scanned.merchant);
        let record = record.ok_or_else(|| ApiError::not_found("payment request"))?;
        let amount = super::amount(&scanned.amount, "payload")?;
        if amount != record.amount {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_qr",
                "payload",
                "the amount differs from the request's",
            ));
        }
        if record.paid.is_none() && record.expires_at_s <= now_s() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "request_expired",
                "the payment request has expired",
            ));
        }
        let pin = super::pin(&request.pin, "pin")?;
        let otp = request.otp.as_deref().map(|o| super::otp(o, "otp")).transpose()?;
        let auth = CustomerAuth { pin: Some(&pin), otp: otp.as_ref(), channel: channels::APP };
        let payer = customer.msisdn.to_string();
        if !call.state.store.claim(&record.request, &payer, now_s(), CLAIM_TTL_S)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "request_taken",
                "this payment request is paid or being paid",
            ));
        }
        let op = payment_id(&record.request);
        let receipt =
            call.state.domain.merchant_payment(op, customer.msisdn, record.merchant, amount, auth).await?;
        let paid =
            Paid { msisdn: customer.msisdn.to_string(), operation: format!("{op:032x}"), at_s: now_s() };
        let merchant = call.state.store.merchant(record.merchant)?;
        let webhook = merchant.and_then(|m| m.webhook_url).map(|url| Webhook {
            merchant: record.merchant,
            url,
            body: json!({
                "event": "payment.paid",
                "request": record.request,
                "reference": record.reference,
                "amount": super::money(record.amount),
                "operation": paid.operation,
                "paid_at": paid.at_s,
            })
            .to_string(),
            attempts: 0,
            next_at_s: 0,
        });
        call.state.store.mark_paid(&record.request, paid, webhook)?;
        let mut answer = super::receipt(&call.reference, &receipt);
        answer["merchant_reference"] = json!(record.reference);
        Ok((StatusCode::OK, answer))
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refund {
    /// The paid payment request to refund (in part or in full).
    pub request: String,
    pub amount: String,
}

#[utoipa::path(post, path = "/v1/merchant/refunds", tag = "merchant", description = "Refund a paid QR payment, in part or in full: a new transfer from the merchant to the payer, citing the payment (a reversal is something else, done by staff). Idempotency-Key required.", request_body = Refund, responses((status = 200, description = "refunded"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn refund(State(state): State<Arc<AppState>>, headers: HeaderMap, signed: Signed) -> Response {
    idempotency::signed_once(state, &headers, signed, &[Role::Merchant], |call, caller| async move {
        let request: Refund = super::parse(&call.body)?;
        let amount = super::amount(&request.amount, "amount")?;
        let record =
            call.state.store.payment_request(&request.request)?.filter(|r| r.merchant == caller.agent);
        let record = record.ok_or_else(|| ApiError::not_found("payment request"))?;
        let paid = record.paid.ok_or_else(|| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_paid", "the request was not paid")
        })?;
        if amount > record.amount {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_amount",
                "amount",
                "more than was paid",
            ));
        }
        let to = super::msisdn(&call.state, &paid.msisdn, "request")?;
        let original = u128::from_str_radix(&paid.operation, 16).unwrap_or(0);
        let receipt = call.state.domain.refund(call.op, caller.agent, to, amount, original).await?;
        Ok((StatusCode::OK, super::receipt(&call.reference, &receipt)))
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_payment_id_per_request() {
        assert_eq!(super::payment_id("a1"), super::payment_id("a1"));
        assert_ne!(super::payment_id("a1"), super::payment_id("a2"));
    }
}
