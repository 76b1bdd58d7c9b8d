//! Statements over HTTP, from the sled views: a customer's own, a wallet's for staff (paged,
//! and exported as CSV or JSON for accounting), an agent's daily report of its float.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use engine::statement::{self, StatementQuery};
use engine::{AccountId, Currency};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::{Customer, Signed};
use super::error::ApiError;
use crate::store::Role;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/customer/statement", get(customer_statement))
        .route("/v1/customer/spending", get(customer_spending))
        .route("/v1/staff/wallets/{msisdn}/statement", get(staff_statement))
        .route("/v1/staff/wallets/{msisdn}/export", get(staff_export))
        .route("/v1/agent/report", get(agent_report))
}

const DAY_NS: u64 = 86_400 * 1_000_000_000;
/// Baku: days of reports are local days.
const OFFSET_NS: u64 = 4 * 3_600 * 1_000_000_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatementParams {
    /// Window start, unix seconds (default: 30 days ago).
    pub from: Option<u64>,
    /// Window end, unix seconds, exclusive (default: now).
    pub to: Option<u64>,
    /// Only these operation codes (comma-separated numbers).
    pub codes: Option<String>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// Lines a page (1 to 500, default 50).
    pub limit: Option<usize>,
    /// `csv` or `json` (exports only; default `json`).
    pub format: Option<String>,
}

/// The views, caught up with the request ([`crate::current_views`]).
async fn views(state: &AppState) -> Result<&engine::views::Views, ApiError> {
    crate::current_views(&state.engine).await.ok_or_else(|| ApiError::from(engine::OpError::ViewsUnavailable))
}

fn query(state: &AppState, account: AccountId, params: &StatementParams) -> Result<StatementQuery, ApiError> {
    let now = state.engine.now_ns();
    let to = params.to.map_or(now, |s| s.saturating_mul(1_000_000_000));
    let from = params.from.map_or(to.saturating_sub(30 * DAY_NS), |s| s.saturating_mul(1_000_000_000));
    if from > to {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "from",
            "from must not be after to",
        ));
    }
    let mut query = StatementQuery::new(account, from, to);
    if let Some(codes) = &params.codes {
        let codes: Result<Vec<u16>, _> = codes.split(',').map(|c| c.trim().parse::<u16>()).collect();
        let codes = codes.map_err(|_| {
            ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                "codes",
                "comma-separated operation codes",
            )
        })?;
        query = query.with_codes(&codes);
    }
    Ok(query)
}

fn statement_error(error: statement::StatementError) -> ApiError {
    match error {
        statement::StatementError::Cursor(e) => {
            ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", "cursor", e.to_string())
        }
        statement::StatementError::CursorAccount => ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_cursor",
            "cursor",
            "the cursor belongs to another statement",
        ),
        other => ApiError::internal(other),
    }
}

async fn page_json(
    state: &AppState,
    account: AccountId,
    params: &StatementParams,
) -> Result<serde_json::Value, ApiError> {
    let query = query(state, account, params)?;
    let page =
        statement::page(views(state).await?, &query, params.cursor.as_deref(), params.limit.unwrap_or(50))
            .map_err(statement_error)?;
    let lines: Vec<serde_json::Value> = page
        .lines
        .iter()
        .map(|line| {
            json!({
                "time": statement::rfc3339(line.booked_at),
                "reference": format!("{:032x}", line.user_data),
                "transfer": format!("{:032x}", line.transfer_id.0),
                "code": statement::code_name(line.code),
                "kind": line.kind.name(),
                "direction": if line.debit { "out" } else { "in" },
                "amount": statement::decimal(i128::from(line.amount), line.currency).unwrap_or_default(),
                "balance_after": statement::decimal(line.balance_after, line.currency).unwrap_or_default(),
                "counterparty": statement::account_name(line.other_account),
            })
        })
        .collect();
    Ok(json!({ "lines": lines, "next": page.next }))
}

#[utoipa::path(get, path = "/v1/customer/statement", tag = "customer", description = "The customer's statement, paged with a stable cursor.", params(StatementParams), responses((status = 200, description = "a page"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn customer_statement(
    State(state): State<Arc<AppState>>,
    customer: Customer,
    Query(params): Query<StatementParams>,
) -> Result<Response, ApiError> {
    let account = AccountId::wallet(customer.msisdn.get(), Currency::Azn);
    Ok(axum::Json(page_json(&state, account, &params).await?).into_response())
}

#[utoipa::path(get, path = "/v1/customer/spending", tag = "customer", description = "What the customer spent over a window (default: 30 days), by category.", params(StatementParams), responses((status = 200, description = "the summary"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn customer_spending(
    State(state): State<Arc<AppState>>,
    customer: Customer,
    Query(params): Query<StatementParams>,
) -> Result<Response, ApiError> {
    let account = AccountId::wallet(customer.msisdn.get(), Currency::Azn);
    let query = query(&state, account, &params)?;
    let summary = statement::spending(views(&state).await?, &query).map_err(statement_error)?;
    let money = |minor: u128| {
        statement::decimal(i128::try_from(minor).unwrap_or(i128::MAX), Currency::Azn).unwrap_or_default()
    };
    let categories: Vec<serde_json::Value> = summary
        .categories
        .iter()
        .map(|c| json!({ "category": c.category.name(), "count": c.count, "total": money(c.total) }))
        .collect();
    Ok(axum::Json(json!({ "categories": categories, "total": money(summary.total) })).into_response())
}

#[utoipa::path(get, path = "/v1/staff/wallets/{msisdn}/statement", tag = "staff", description = "A wallet's statement, paged with a stable cursor.", params(("msisdn" = String, Path), StatementParams), responses((status = 200, description = "a page"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn staff_statement(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    Query(params): Query<StatementParams>,
    signed: Signed,
) -> Result<Response, ApiError> {
    signed.require(&[Role::Staff])?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    let account = AccountId::wallet(msisdn.get(), Currency::Azn);
    Ok(axum::Json(page_json(&state, account, &params).await?).into_response())
}

#[utoipa::path(get, path = "/v1/staff/wallets/{msisdn}/export", tag = "staff", description = "A wallet's operations over a window for accounting: one row per operation (gross, fee, commission, net, reference), as CSV or JSON.", params(("msisdn" = String, Path), StatementParams), responses((status = 200, description = "the export"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn staff_export(
    State(state): State<Arc<AppState>>,
    Path(msisdn): Path<String>,
    Query(params): Query<StatementParams>,
    signed: Signed,
) -> Result<Response, ApiError> {
    signed.require(&[Role::Staff])?;
    let msisdn = super::msisdn(&state, &msisdn, "msisdn")?;
    let query = query(&state, AccountId::wallet(msisdn.get(), Currency::Azn), &params)?;
    let views = views(&state).await?;
    let mut out = Vec::new();
    match params.format.as_deref().unwrap_or("json") {
        "csv" => {
            statement::write_csv(views, &query, &mut out).map_err(statement_error)?;
            Ok(([(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response())
        }
        "json" => {
            statement::write_json(views, &query, &mut out).map_err(statement_error)?;
            Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response())
        }
        _ => Err(ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "format", "csv or json")),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// The day, `YYYY-MM-DD` in Baku time (default: today).
    pub date: Option<String>,
}

/// Days since the epoch of a `YYYY-MM-DD` date (proleptic Gregorian).
fn days(date: &str) -> Option<u64> {
    let mut parts = date.split('-');
    let (y, m, d): (i64, i64, i64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

#[utoipa::path(get, path = "/v1/agent/report", tag = "agent", description = "The agent's daily report: its float's operations of a (Baku) day, totals by operation.", params(ReportParams), responses((status = 200, description = "the report"), (status = "4XX", description = "refused", body = super::openapi::ErrorBody)))]
async fn agent_report(
    State(state): State<Arc<AppState>>,
    Query(params): Query<ReportParams>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let caller = signed.require(&[Role::Agent, Role::Atm, Role::Staff])?;
    let start = match params.date.as_deref() {
        Some(date) => days(date)
            .ok_or_else(|| {
                ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "date", "YYYY-MM-DD")
            })?
            .saturating_mul(DAY_NS)
            .saturating_sub(OFFSET_NS),
        None => (state.engine.now_ns() + OFFSET_NS) / DAY_NS * DAY_NS - OFFSET_NS,
    };
    let query = StatementQuery::new(engine::domain::agent_float(caller.agent), start, start + DAY_NS);
    let rows = statement::operations(views(&state).await?, &query).map_err(statement_error)?;
    let mut totals: std::collections::BTreeMap<&'static str, (u64, i128)> = std::collections::BTreeMap::new();
    for row in &rows {
        let entry = totals.entry(statement::code_name(row.code)).or_default();
        entry.0 += 1;
        entry.1 += row.net;
    }
    let totals: Vec<serde_json::Value> = totals
        .into_iter()
        .map(|(code, (count, net))| json!({ "code": code, "count": count, "net": statement::decimal(net, Currency::Azn).unwrap_or_default() }))
        .collect();
    Ok(axum::Json(json!({
        "agent": caller.agent,
        "from": statement::rfc3339(start),
        "to": statement::rfc3339(start + DAY_NS),
        "operations": rows.len(),
        "totals": totals,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_count_days() {
        assert_eq!(super::days("1970-01-01"), Some(0));
        assert_eq!(super::days("2026-11-23"), Some(20_780));
        assert_eq!(super::days("2026-13-01"), None);
        assert_eq!(super::days("2026-11"), None);
        assert_eq!(super::days("x"), None);
    }
}
