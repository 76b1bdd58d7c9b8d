//! Who is calling. Agents, ATM networks, staff and administrators sign every request with their
//! API key; customers present a session token from an OTP login.
//!
//! An API key is `(key_id, key)`: `key` = HMAC(server secret, `key_id`) (see
//! `ServerSecret::derive_key`), given to the caller once; the store keeps only its SHA-256, so a
//! copy of the store cannot sign. A request carries `X-Qepik-Key: <key_id>`,
//! `X-Qepik-Timestamp: <unix seconds>` and `X-Qepik-Signature: <hex HMAC-SHA256(key, method \n
//! path?query \n timestamp \n hex(SHA-256(body)))>`. A timestamp outside the window is refused,
//! which bounds replays; a replayed money call inside it meets its idempotency key and posts
//! nothing. Every failure is the same 401, saying nothing of which check failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::store::{Credential, Role};

/// The label API keys are derived under.
pub const KEY_DOMAIN: &str = "api";

/// The key of credential `key_id`.
pub fn api_key(secret: &engine::secret::ServerSecret, key_id: &str) -> [u8; 32] {
    secret.derive_key(KEY_DOMAIN, key_id.as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The signature of a request, as callers compute it.
pub fn signature(key: &[u8], method: &str, path_and_query: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path_and_query.as_bytes());
    mac.update(b"\n");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(sha256_hex(body).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A signed request: its verified caller and its body.
#[derive(Debug)]
pub struct Signed {
    pub caller: Credential,
    pub body: Bytes,
}

impl Signed {
    /// The caller, if its role is one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<&Credential, ApiError> {
        if roles.contains(&self.caller.role) { Ok(&self.caller) } else { Err(ApiError::forbidden()) }
    }
}

fn header<'a>(parts: &'a Parts, name: &str) -> Result<&'a str, ApiError> {
    parts.headers.get(name).and_then(|v| v.to_str().ok()).ok_or_else(ApiError::unauthenticated)
}

impl FromRequest<Arc<AppState>> for Signed {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let limit = state.config.http.max_body_bytes;
        let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("bodies are at most {limit} bytes"),
            )
        })?;
        let caller = verify(state, &parts, &body)?;
        state.rate.admit(&caller.key_id, state.config.http.rate_per_s)?;
        Ok(Signed { caller, body })
    }
}

fn verify(state: &AppState, parts: &Parts, body: &[u8]) -> Result<Credential, ApiError> {
    let key_id = header(parts, "x-qepik-key")?;
    let timestamp: u64 =
        header(parts, "x-qepik-timestamp")?.parse().map_err(|_| ApiError::unauthenticated())?;
    let given = hex::decode(header(parts, "x-qepik-signature")?).map_err(|_| ApiError::unauthenticated())?;
    if now_s().abs_diff(timestamp) > state.config.http.signature_window_s {
        return Err(ApiError::unauthenticated());
    }
    let Some(credential) = state.store.credential(key_id)? else {
        return Err(ApiError::unauthenticated());
    };
    let key = api_key(&state.secret, key_id);
    let current = sha256_hex(&key).as_bytes().ct_eq(credential.key_sha256.as_bytes());
    if credential.revoked || !bool::from(current) {
        return Err(ApiError::unauthenticated());
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let expected = signature(&key, parts.method.as_str(), path, timestamp, body);
    let expected = hex::decode(expected).map_err(ApiError::internal)?;
    if !bool::from(expected.ct_eq(&given)) {
        return Err(ApiError::unauthenticated());
    }
    Ok(credential)
}

/// A customer's session, from `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy)]
pub struct Customer {
    pub msisdn: engine::msisdn::Msisdn,
}

impl FromRequestParts<Arc<AppState>> for Customer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let token =
            header(parts, "authorization")?.strip_prefix("Bearer ").ok_or_else(ApiError::unauthenticated)?;
        let session = state
            .store
            .session(&sha256_hex(token.trim().as_bytes()))?
            .ok_or_else(ApiError::unauthenticated)?;
        if session.refresh || session.expires_at_s <= now_s() {
            return Err(ApiError::unauthenticated());
        }
        let msisdn = engine::msisdn::Msisdn::from_u64(session.msisdn, &state.domain.config().plan)
            .map_err(|_| ApiError::unauthenticated())?;
        state.rate.admit(&format!("customer:{}", session.msisdn), state.config.http.rate_per_s)?;
        Ok(Customer { msisdn })
    }
}

/// Token buckets per caller: `rate` requests a second, bursts of one second's worth. Integer
/// arithmetic in nanoseconds of credit.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (u64, Instant)>>,
}

impl RateLimiter {
    pub fn admit(&self, caller: &str, rate: u32) -> Result<(), ApiError> {
        const SECOND: u64 = 1_000_000_000;
        let cost = SECOND / u64::from(rate.max(1));
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (credit, last) = buckets.entry(caller.to_owned()).or_insert((SECOND, now));
        let earned = u64::try_from(now.duration_since(*last).as_nanos()).unwrap_or(u64::MAX);
        *credit = credit.saturating_add(earned).min(SECOND);
        *last = now;
        if *credit < cost {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; slow down",
            ));
        }
        *credit -= cost;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_every_part() {
        let key = [7_u8; 32];
        let base = signature(&key, "POST", "/v1/agent/cash-in", 1_700_000_000, b"{}");
        assert_eq!(base.len(), 64);
        assert_ne!(base, signature(&key, "GET", "/v1/agent/cash-in", 1_700_000_000, b"{}"));
        assert_ne!(base, signature(&key, "POST", "/v1/agent/cash-out", 1_700_000_000, b"{}"));
        assert_ne!(base, signature(&key, "POST", "/v1/agent/cash-in", 1_700_000_001, b"{}"));
        assert_ne!(base, signature(&key, "POST", "/v1/agent/cash-in", 1_700_000_000, b"{ }"));
        assert_ne!(base, signature(&[8_u8; 32], "POST", "/v1/agent/cash-in", 1_700_000_000, b"{}"));
    }

    #[test]
    fn the_bucket_refuses_beyond_the_rate() {
        let limiter = RateLimiter::default();
        let admitted = (0..20).filter(|_| limiter.admit("k", 10).is_ok()).count();
        assert_eq!(admitted, 10);
        assert!(limiter.admit("other", 10).is_ok());
    }
}
