//! Errors as the API shows them: JSON `{"error": {"code", "message", "field"?}}` with a stable
//! machine code. Every refusal of the domain is mapped to an HTTP status here, in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use engine::wallet::WalletRefusal;
use engine::{OpError, TransferResult};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code.to_owned(), message: message.into(), field: None }
    }

    /// A request field that is missing, malformed or out of range.
    pub fn field(status: StatusCode, code: &str, field: &str, message: impl Into<String>) -> ApiError {
        ApiError { field: Some(field.to_owned()), ..ApiError::new(status, code, message) }
    }

    /// Authentication failed: nothing more is said.
    pub fn unauthenticated() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "authentication failed")
    }

    pub fn forbidden() -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this credential may not do that")
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!(%message, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }

    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(field) = &self.field {
            error["field"] = json!(field);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(error: OpError) -> ApiError {
        op_error(&error)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> ApiError {
        ApiError::internal(error)
    }
}

impl From<engine::EngineError> for ApiError {
    fn from(error: engine::EngineError) -> ApiError {
        op_error(&OpError::Engine(error))
    }
}

/// The one mapping from domain refusals to HTTP.
pub fn op_error(error: &OpError) -> ApiError {
    use StatusCode as S;
    let code = error.code();
    let message = error.to_string();
    let status = match error {
        OpError::Msisdn(_) => return ApiError::field(S::UNPROCESSABLE_ENTITY, code, "msisdn", message),
        OpError::Secret(_) => S::UNPROCESSABLE_ENTITY,
        OpError::Tariff(_) | OpError::OtpTtl | OpError::CashCodeTtl => S::INTERNAL_SERVER_ERROR,
        OpError::Wallet(refusal) => match refusal {
            WalletRefusal::NotFound => S::NOT_FOUND,
            WalletRefusal::Exists => S::CONFLICT,
            WalletRefusal::Blocked => S::FORBIDDEN,
            WalletRefusal::OtpRateLimited { .. } => S::TOO_MANY_REQUESTS,
            WalletRefusal::NotLocal => S::INTERNAL_SERVER_ERROR,
            _ => S::UNPROCESSABLE_ENTITY,
        },
        OpError::Limit { result, remaining } => {
            let counts =
                matches!(result, TransferResult::LimitDailyCount | TransferResult::LimitMonthlyCount);
            let left = if counts {
                format!("{remaining} operations")
            } else {
                format!("{} AZN", super::money(*remaining))
            };
            return ApiError::new(S::UNPROCESSABLE_ENTITY, code, format!("{result}: {left} remaining"));
        }
        OpError::Refused(result) => match result {
            TransferResult::AuthWalletNotFound
            | TransferResult::DebitAccountNotFound
            | TransferResult::CreditAccountNotFound => S::NOT_FOUND,
            TransferResult::AuthWalletBlocked
            | TransferResult::DebitWalletBlocked
            | TransferResult::CreditWalletBlocked => S::FORBIDDEN,
            TransferResult::ExistsWithDifferentBody => S::CONFLICT,
            _ => S::UNPROCESSABLE_ENTITY,
        },
        OpError::ZeroAmount => return ApiError::field(S::UNPROCESSABLE_ENTITY, code, "amount", message),
        OpError::AccountCreation(_) => S::CONFLICT,
        OpError::AuthenticationRequired => S::UNPROCESSABLE_ENTITY,
        OpError::NotARedeemer => S::FORBIDDEN,
        OpError::OperationNotFound => S::NOT_FOUND,
        OpError::NotIndexedYet => S::SERVICE_UNAVAILABLE,
        OpError::NotReversible | OpError::ReversalWindowPassed { .. } => S::UNPROCESSABLE_ENTITY,
        OpError::ViewsUnavailable | OpError::Views(_) | OpError::Engine(_) => S::SERVICE_UNAVAILABLE,
    };
    if status == S::INTERNAL_SERVER_ERROR {
        return ApiError::internal(message);
    }
    ApiError::new(status, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_stable_codes() {
        let e = op_error(&OpError::Refused(TransferResult::ExceedsCredits));
        assert_eq!((e.status, e.code.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "exceeds_credits"));
        let e = op_error(&OpError::Wallet(WalletRefusal::NotFound));
        assert_eq!((e.status, e.code.as_str()), (StatusCode::NOT_FOUND, "wallet_not_found"));
        let e = op_error(&OpError::ZeroAmount);
        assert_eq!(e.field.as_deref(), Some("amount"));
        let body = e.body();
        assert_eq!(body["error"]["field"], "amount");
    }
}
