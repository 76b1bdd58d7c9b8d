//! The HTTP API, versioned under `/v1`: agents, ATM networks, post-office staff, customers and
//! administrators, plus `/health`, `/ready` and `/metrics`. Handlers parse and check their
//! input, call the wallet [`engine::Domain`], and map its answer; nothing here moves money
//! itself.

pub mod admin;
pub mod admission;
pub mod agent;
pub mod auth;
pub mod customer;
pub mod error;
pub mod idempotency;
pub mod merchant;
pub mod openapi;
pub mod staff;
pub mod statements;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use engine::money::{Amount, Currency, Zero};
use engine::msisdn::Msisdn;
use engine::{Domain, Engine};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::config::Config;
use crate::store::Store;
use error::ApiError;

/// What every handler reaches.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub engine: Engine,
    pub domain: Domain,
    pub store: Store,
    pub secret: Arc<engine::secret::ServerSecret>,
    pub rate: auth::RateLimiter,
    pub in_flight: idempotency::InFlight,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Cleared when shutdown starts: `/ready` then answers 503.
    pub ready: std::sync::atomic::AtomicBool,
    /// Where SMS go (OTPs).
    pub sms: Arc<dyn crate::sms::SmsSink>,
    /// The demo's simulated handsets, on a `--demo` server.
    pub demo_inbox: Option<Arc<crate::sms::DemoInbox>>,
    /// The SMS sender over the SMPP binds, when SMPP is on.
    pub smpp_sms: Option<Arc<crate::ussd::SmppSms>>,
    /// How many API requests are served at once (adapts to their latency).
    pub admission: admission::Admission,
    /// The per-route request metrics' handles, registered once each.
    pub request_metrics: RequestMetrics,
}

/// Every route of the API, with its method: the OpenAPI test and the docs list these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/agent/cash-in"),
    ("POST", "/v1/agent/cash-out"),
    ("GET", "/v1/agent/float"),
    ("GET", "/v1/agent/operations/{reference}"),
    ("GET", "/v1/agent/report"),
    ("POST", "/v1/atm/redemptions"),
    ("GET", "/v1/atm/redemptions/{reference}"),
    ("GET", "/v1/staff/wallets/{msisdn}"),
    ("GET", "/v1/staff/wallets/{msisdn}/statement"),
    ("GET", "/v1/staff/wallets/{msisdn}/export"),
    ("POST", "/v1/staff/wallets/{msisdn}/identify"),
    ("PUT", "/v1/staff/wallets/{msisdn}/profile"),
    ("POST", "/v1/staff/wallets/{msisdn}/unblock"),
    ("POST", "/v1/staff/wallets/{msisdn}/block"),
    ("POST", "/v1/staff/cash-in"),
    ("POST", "/v1/staff/cash-out"),
    ("POST", "/v1/staff/reversals"),
    ("POST", "/v1/customer/register"),
    ("POST", "/v1/customer/otp"),
    ("POST", "/v1/customer/sessions"),
    ("POST", "/v1/customer/sessions/refresh"),
    ("DELETE", "/v1/customer/sessions"),
    ("GET", "/v1/customer/balance"),
    ("GET", "/v1/customer/statement"),
    ("POST", "/v1/customer/transfers"),
    ("POST", "/v1/customer/cash-codes"),
    ("POST", "/v1/customer/qr-payments"),
    ("POST", "/v1/merchant/qr"),
    ("GET", "/v1/merchant/payments/{request}"),
    ("POST", "/v1/merchant/refunds"),
    ("GET", "/v1/customer/spending"),
    ("GET", "/v1/demo/sms/{msisdn}"),
    ("POST", "/v1/admin/agents"),
    ("POST", "/v1/admin/agents/{agent}/funding"),
    ("POST", "/v1/admin/merchants"),
    ("POST", "/v1/admin/credentials"),
    ("DELETE", "/v1/admin/credentials/{key_id}"),
    ("GET", "/v1/admin/trial-balance"),
    ("GET", "/v1/admin/wallet-settings"),
    ("GET", "/v1/admin/wallet-settings/changes"),
    ("PUT", "/v1/admin/tiers/{code}"),
    ("PUT", "/v1/admin/tariffs/{operation}"),
    ("DELETE", "/v1/admin/tariffs/{operation}"),
    ("PUT", "/v1/admin/commissions/{operation}"),
    ("DELETE", "/v1/admin/commissions/{operation}"),
];

pub fn router(state: Arc<AppState>) -> Router {
    // The API admits what it can serve in time and refuses the rest at once; the operations
    // routes stay reachable under any load.
    let api = Router::new()
        .merge(agent::routes())
        .merge(staff::routes())
        .merge(customer::routes())
        .merge(admin::routes())
        .merge(statements::routes())
        .merge(merchant::routes())
        .layer(axum::middleware::from_fn_with_state(state.clone(), admission::admit));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(api)
        .fallback(|| async { ApiError::not_found("route") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(|_: tower::BoxError| async {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long")
                }))
                .timeout(Duration::from_secs(30)),
        )
        .with_state(state)
}

#[utoipa::path(get, path = "/health", tag = "operations", description = "The process is up.", responses((status = 200, description = "up")))]
async fn health() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

#[utoipa::path(get, path = "/ready", tag = "operations", description = "503 while starting or stopping, or once the journal failed.", responses((status = 200, description = "ready"), (status = 503, description = "not ready", body = openapi::ErrorBody)))]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(std::sync::atomic::Ordering::Acquire) && !state.engine.journal().failed() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "not ready").into_response()
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", description = "Prometheus text format: requests and latency by route and status, shard batches, the journal's durable position, how far the views and the notification outbox's sender are behind.", responses((status = 200, description = "metrics")))]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return ApiError::not_found("metrics recorder").into_response();
    };
    let depths = state.engine.shard_queue_depths();
    for (shard, (batches, messages)) in state.engine.shard_stats().iter().enumerate() {
        let shard = shard.to_string();
        metrics::gauge!("qepik_shard_batches_total", "shard" => shard.clone()).set(*batches as f64);
        metrics::gauge!("qepik_shard_messages_total", "shard" => shard.clone()).set(*messages as f64);
        let mean = if *batches == 0 { 0.0 } else { *messages as f64 / *batches as f64 };
        metrics::gauge!("qepik_shard_batch_size_mean", "shard" => shard.clone()).set(mean);
        let depth = depths.get(shard.parse::<usize>().unwrap_or(0)).copied().unwrap_or(0);
        metrics::gauge!("qepik_shard_queue_depth", "shard" => shard).set(depth as f64);
    }
    let journal = state.engine.journal();
    metrics::gauge!("qepik_journal_durable_bytes").set(journal.durable() as f64);
    if let Some(views) = state.engine.views() {
        metrics::gauge!("qepik_views_behind_bytes")
            .set(journal.durable().saturating_sub(views.applied()) as f64);
        let (backlog, segments) = views.outbox().backlog();
        metrics::gauge!("qepik_outbox_backlog_bytes").set(backlog as f64);
        metrics::gauge!("qepik_outbox_segments").set(segments as f64);
    }
    let mut text = handle.render();
    // The journal's fdatasync latency, as a Prometheus histogram (cumulative buckets).
    text.push_str("# TYPE qepik_journal_fsync_seconds histogram\n");
    let mut cumulative = 0;
    for (bound, count) in engine::journal::SYNC_BUCKETS_US.iter().zip(&journal.sync_buckets) {
        cumulative += count.load(std::sync::atomic::Ordering::Relaxed);
        text.push_str(&format!(
            "qepik_journal_fsync_seconds_bucket{{le=\"{}\"}} {cumulative}\n",
            *bound as f64 / 1e6
        ));
    }
    let syncs = journal.syncs.load(std::sync::atomic::Ordering::Relaxed);
    let sum = journal.sync_ns_total.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
    text.push_str(&format!("qepik_journal_fsync_seconds_bucket{{le=\"+Inf\"}} {syncs}\nqepik_journal_fsync_seconds_sum {sum}\nqepik_journal_fsync_seconds_count {syncs}\n"));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Requests and their latency by route and status.
async fn record_metrics(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = request.extensions().get::<axum::extract::MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", axum::extract::MatchedPath::as_str);
    let (requests, seconds) = state.request_metrics.handles(route, &method, response.status().as_u16());
    requests.increment(1);
    seconds.record(started.elapsed().as_secs_f64());
    response
}

/// The request counter and latency histogram of each route, method and status, registered
/// with the recorder once: registering them by their labels on every request cost three
/// string allocations and two lookups in the recorder's registry a request. Kept per server,
/// whose start installs the recorder before the first request.
#[derive(Default)]
pub struct RequestMetrics {
    by_route: std::sync::RwLock<rustc_hash::FxHashMap<Box<str>, ByStatus>>,
}

/// A route's handles by method and status.
type ByStatus = rustc_hash::FxHashMap<(&'static str, u16), Handles>;

type Handles = (metrics::Counter, metrics::Histogram);

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

impl RequestMetrics {
    fn handles(&self, route: &str, method: &axum::http::Method, status: u16) -> Handles {
        use axum::http::Method;
        // Any other method a client makes up is one label, not a series (and an entry) each.
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::PATCH => "PATCH",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "OTHER",
        };
        let key = (method, status);
        if let Some(found) = self
            .by_route
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(route)
            .and_then(|by_status| by_status.get(&key))
        {
            return found.clone();
        }
        let labels =
            [("route", route.to_owned()), ("method", method.to_owned()), ("status", status.to_string())];
        let made = (
            metrics::counter!("qepik_http_requests_total", &labels),
            metrics::histogram!("qepik_http_request_seconds", &labels),
        );
        self.by_route
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry(route.into())
            .or_default()
            .insert(key, made.clone());
        made
    }
}

/// Parses a JSON body into `T`, naming the offending field on failure (unknown fields are
/// refused by `T`'s `deny_unknown_fields`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let code = if inner.is_syntax() || inner.is_eof() { "malformed_json" } else { "invalid_field" };
        let status =
            if code == "malformed_json" { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
        let field = if path == "." { String::new() } else { path };
        ApiError {
            status,
            code: code.to_owned(),
            message: inner.to_string(),
            field: (!field.is_empty()).then_some(field),
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?;
    Ok(value)
}

/// An amount in AZN from its decimal text (`"12.50"`), naming `field` on failure.
pub fn amount(text: &str, field: &str) -> Result<u64, ApiError> {
    let amount = Amount::parse(text, Currency::Azn, Zero::Rejected).map_err(|e| {
        ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", field, e.to_string())
    })?;
    u64::try_from(amount.minor()).map_err(|_| {
        ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", field, "amount must be positive")
    })
}

/// Minor units as decimal text.
pub fn money(minor: u64) -> String {
    Amount::from_minor(i64::try_from(minor).unwrap_or(i64::MAX), Currency::Azn).to_decimal().to_string()
}

/// Signed minor units (a balance) as decimal text.
pub fn balance(minor: i128) -> String {
    let clamped = i64::try_from(minor).unwrap_or(if minor < 0 { i64::MIN } else { i64::MAX });
    Amount::from_minor(clamped, Currency::Azn).to_decimal().to_string()
}

pub fn msisdn(state: &AppState, text: &str, field: &str) -> Result<Msisdn, ApiError> {
    state.domain.msisdn(text).map_err(|e| {
        let mut error = error::op_error(&e);
        error.field = Some(field.to_owned());
        error
    })
}

pub fn pin(text: &str, field: &str) -> Result<engine::secret::Pin, ApiError> {
    engine::secret::Pin::parse(text)
        .map_err(|e| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e.code(), field, e.to_string()))
}

pub fn otp(text: &str, field: &str) -> Result<engine::secret::OneTimeCode, ApiError> {
    engine::secret::OneTimeCode::parse(text, 6)
        .map_err(|e| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e.code(), field, e.to_string()))
}

/// A receipt as JSON.
pub fn receipt(reference: &str, receipt: &engine::domain::Receipt) -> serde_json::Value {
    json!({
        "reference": reference,
        "operation": format!("{:032x}", receipt.id.0),
        "amount": money(receipt.amount),
        "fee": money(receipt.fee),
        "commission": money(receipt.commission),
        "status": "posted",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_register_once_per_route_method_and_status() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let cache = RequestMetrics::default();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                let (requests, _) = cache.handles("/v1/agent/cash-in", &axum::http::Method::POST, 200);
                requests.increment(1);
            }
            let (requests, seconds) = cache.handles("/v1/agent/cash-in", &axum::http::Method::POST, 503);
            requests.increment(1);
            seconds.record(0.001);
            for made_up in ["FOO", "BAR", "BAZ"] {
                let method = axum::http::Method::from_bytes(made_up.as_bytes()).expect("a token");
                cache.handles("unmatched", &method, 404).0.increment(1);
            }
        });
        let text = handle.render();
        assert!(
            text.contains(
                r#"qepik_http_requests_total{route="/v1/agent/cash-in",method="POST",status="200"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"method="POST",status="503"} 1"#), "{text}");
        assert!(
            text.contains(r#"qepik_http_requests_total{route="unmatched",method="OTHER",status="404"} 3"#),
            "{text}"
        );
        let by_route = cache.by_route.read().expect("lock");
        assert_eq!(by_route.len(), 2);
        assert_eq!(
            by_route.get("unmatched").map(|by_status| by_status.len()),
            Some(1),
            "made-up methods share one"
        );
    }
}
