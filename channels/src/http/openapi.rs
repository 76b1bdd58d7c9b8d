//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa) and served at
//! `/openapi.json`. A test checks that it lists every route of [`super::ROUTES`].

use utoipa::OpenApi;

/// The shape of every error body.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// A stable machine code (`exceeds_credits`, `pin_invalid`, `idempotency_key_reused`, …).
    pub code: String,
    pub message: String,
    /// The request field at fault, for bad input.
    pub field: Option<String>,
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Qepik",
        description = "The Qepik e-wallet API. Agents, ATM networks, staff and administrators sign each request: \
            X-Qepik-Key (key id), X-Qepik-Timestamp (unix seconds, within 300 s) and X-Qepik-Signature = \
            hex HMAC-SHA256(key, METHOD \\n PATH?QUERY \\n TIMESTAMP \\n hex SHA-256 of the body). Customers send \
            Authorization: Bearer <token> from an OTP login. Money-moving calls take an Idempotency-Key header. \
            Amounts are decimal strings in AZN."
    ),
    paths(
        super::health,
        super::ready,
        super::metrics,
        openapi_json,
        super::agent::cash_in,
        super::agent::cash_out,
        super::agent::float,
        super::agent::operation,
        super::agent::redeem,
        super::agent::redemption,
        super::staff::find,
        super::staff::identify,
        super::staff::profile,
        super::staff::unblock,
        super::staff::block,
        super::staff::cash_in,
        super::staff::cash_out,
        super::staff::reverse,
        super::customer::register,
        super::customer::request_otp,
        super::customer::login,
        super::customer::refresh,
        super::customer::logout,
        super::customer::balance,
        super::customer::transfer,
        super::customer::cash_code,
        super::customer::demo_sms,
        super::admin::create_agent,
        super::admin::fund_agent,
        super::admin::issue_credential,
        super::admin::revoke_credential,
        super::admin::trial_balance,
        super::statements::customer_statement,
        super::statements::staff_statement,
        super::statements::staff_export,
        super::statements::agent_report,
        super::merchant::create_request,
        super::merchant::status,
        super::merchant::pay,
        super::merchant::refund,
        super::statements::customer_spending,
        super::admin::create_merchant,
        super::admin::wallet_settings,
        super::admin::settings_changes,
        super::admin::put_tier,
        super::admin::put_tariff,
        super::admin::delete_tariff,
        super::admin::put_commission,
        super::admin::delete_commission,
    ),
    components(schemas(ErrorBody, ErrorDetail))
)]
pub struct ApiDoc;

/// Serves the document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", description = "This document.", responses((status = 200, description = "the OpenAPI 3.1 document")))]
pub async fn openapi_json() -> axum::Json<serde_json::Value> {
    axum::Json(document())
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}
