//! `Idempotency-Key` on every money-moving call. The first request with a key runs; its status
//! and body are kept (fjall, surviving restarts) and answered to every retry with the same body;
//! a retry with another body gets 422 `idempotency_key_reused`; a retry while the first still
//! runs waits for it. The operation's ledger id derives from the caller and the key, so even a
//! lost record cannot post twice: the ledger answers a known id with its first result.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use tokio::sync::watch;

use super::AppState;
use super::error::ApiError;
use crate::store::StoredResponse;

/// What a money-moving operation is given: the server, the request body, its reference (the
/// caller's Idempotency-Key) and its ledger id.
#[derive(Debug)]
pub struct Call {
    pub state: Arc<AppState>,
    pub body: axum::body::Bytes,
    pub reference: String,
    pub op: u128,
}

/// A money-moving call of `caller` (an API key id, or a customer): reads its Idempotency-Key and
/// runs `operation` once per key (see [`once`]).
pub async fn run_once<F, Fut>(
    state: Arc<AppState>,
    caller: &str,
    headers: &axum::http::HeaderMap,
    body: axum::body::Bytes,
    operation: F,
) -> Response
where
    F: FnOnce(Call) -> Fut,
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let key = match key_from(headers) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let shared = state.clone();
    let reference = key.clone();
    let hashed = body.clone();
    once(&shared, caller, &key, &hashed, |op| operation(Call { state, body, reference, op })).await
}

/// [`run_once`] for a signed caller holding one of `roles`.
pub async fn signed_once<F, Fut>(
    state: Arc<AppState>,
    headers: &axum::http::HeaderMap,
    signed: super::auth::Signed,
    roles: &[crate::store::Role],
    operation: F,
) -> Response
where
    F: FnOnce(Call, crate::store::Credential) -> Fut,
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let caller = match signed.require(roles) {
        Ok(caller) => caller.clone(),
        Err(error) => return error.into_response(),
    };
    let key_id = caller.key_id.clone();
    run_once(state, &key_id, headers, signed.body, |call| operation(call, caller)).await
}

/// Requests running under a key, for retries that arrive meanwhile.
#[derive(Debug, Default)]
pub struct InFlight {
    running: Mutex<HashMap<u128, watch::Receiver<Option<StoredResponse>>>>,
}

/// The ledger id of the operation `caller` runs under `key`: never zero.
pub fn operation_id(caller: &str, key: &str) -> u128 {
    let digest = Sha256::new()
        .chain_update(b"qepik/op/v1\0")
        .chain_update(caller)
        .chain_update(b"\0")
        .chain_update(key)
        .finalize();
    let mut id = [0_u8; 16];
    id.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(id) | 1
}

/// The key's text, checked: 1 to 128 visible ASCII characters.
pub fn key_from(headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    let missing = || {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "Idempotency-Key",
            "money-moving calls need an Idempotency-Key header of 1 to 128 visible ASCII characters",
        )
    };
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).ok_or_else(missing)?;
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(missing());
    }
    Ok(key.to_owned())
}

fn stored_response(stored: &StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body.clone()).into_response();
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    response
}

fn answer(stored: &StoredResponse, body_sha256: &[u8; 32]) -> Response {
    if stored.body_sha256 != *body_sha256 {
        return ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "Idempotency-Key",
            "this Idempotency-Key was used with another request body",
        )
        .into_response();
    }
    stored_response(stored)
}

/// Runs `operation` (given its ledger id) once per `(caller, key)`, answering retries from the
/// record. `operation`'s error responses are recorded too: a retry of a refused request gets the
/// same refusal.
pub async fn once<F, Fut>(
    state: &Arc<AppState>,
    caller: &str,
    key: &str,
    body: &[u8],
    operation: F,
) -> Response
where
    F: FnOnce(u128) -> Fut,
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    // The operation's ledger id is also its record's key: a SHA-256 of the caller and the key.
    let op = operation_id(caller, key);
    // Keyed, not a plain hash: a body may carry a PIN, and a plain hash of a 4-digit PIN is no
    // secret.
    let body_sha256 = state.secret.derive_key("idempotency", body);
    loop {
        match state.store.response(op) {
            Ok(Some(stored)) => return answer(&stored, &body_sha256),
            Ok(None) => {}
            Err(error) => return ApiError::from(error).into_response(),
        }
        match state.in_flight.enter(op) {
            Entered::First(sender) => return run(state, op, &body_sha256, operation(op), sender).await,
            Entered::Running(mut receiver) => {
                // The first request is running: wait for its answer (or for it to give up,
                // then look again).
                let done = receiver.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
                if let Some(stored) = done {
                    return answer(&stored, &body_sha256);
                }
            }
        }
    }
}

enum Entered {
    First(watch::Sender<Option<StoredResponse>>),
    Running(watch::Receiver<Option<StoredResponse>>),
}

impl InFlight {
    fn enter(&self, op: u128) -> Entered {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(receiver) = running.get(&op) {
            return Entered::Running(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        running.insert(op, receiver);
        Entered::First(sender)
    }
}

async fn run<Fut>(
    state: &Arc<AppState>,
    op: u128,
    body_sha256: &[u8; 32],
    operation: Fut,
    sender: watch::Sender<Option<StoredResponse>>,
) -> Response
where
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    // Removes the in-flight entry however this ends (a dropped connection included).
    struct Leave<'a>(&'a AppState, u128);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.in_flight.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
        }
    }
    let _leave = Leave(state, op);
    let (status, body) = match operation.await {
        Ok(answer) => answer,
        // Unavailability is not an answer: not recorded, so a retry runs again.
        Err(error) if error.status == StatusCode::SERVICE_UNAVAILABLE || error.status.is_server_error() => {
            return error.into_response();
        }
        Err(error) => (error.status, error.body()),
    };
    let stored =
        StoredResponse { body_sha256: *body_sha256, status: status.as_u16(), body: body.to_string() };
    if let Err(error) = state.store.put_response(op, &stored) {
        return ApiError::from(error).into_response();
    }
    sender.send_replace(Some(stored.clone()));
    stored_response(&stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_per_caller_and_key() {
        assert_eq!(operation_id("a", "k1"), operation_id("a", "k1"));
        assert_ne!(operation_id("a", "k1"), operation_id("a", "k2"));
        assert_ne!(operation_id("a", "k1"), operation_id("b", "k1"));
        assert_ne!(operation_id("ab", "c"), operation_id("a", "bc"));
        assert_eq!(operation_id("x", "y") & 1, 1);
    }

    #[test]
    fn keys_are_checked() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(key_from(&headers).is_err());
        headers.insert("idempotency-key", axum::http::HeaderValue::from_static("abc-123"));
        assert_eq!(key_from(&headers).ok().as_deref(), Some("abc-123"));
        headers.insert("idempotency-key", axum::http::HeaderValue::from_static("has space"));
        assert!(key_from(&headers).is_err());
    }
}
