//! Errors as RFC 9457 problem details (`application/problem+json`). A 500 is logged with its cause
//! and answered without it.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use app::flows::FlowError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub field: Option<String>,
}

/// An error (RFC 9457 problem details), served as `application/problem+json`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The field at fault, for a 422.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            slug,
            title,
            detail: detail.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", "A field is invalid", detail)
        }
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", "Not found", format!("no such {what}"))
    }

    pub fn unauthorized(detail: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "Authentication required", detail)
    }

    pub fn forbidden() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Not allowed",
            "this token's role may not do this",
        )
    }

    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request failed; it has been logged",
        )
    }

    pub fn unavailable(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "database unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the database is unavailable; try again shortly",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("https://billing.invalid/problems/{}", self.slug),
            title: self.title.to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            field: self.field,
        };
        let body = serde_json::to_vec(&problem).expect("a problem serialises");
        (self.status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        if ledger::database::is_unavailable(&error) {
            ApiError::unavailable(error)
        } else {
            ApiError::internal(error)
        }
    }
}

impl From<projections::ProjectionError> for ApiError {
    fn from(error: projections::ProjectionError) -> ApiError {
        match error {
            projections::ProjectionError::Database(error) => error.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<FlowError> for ApiError {
    fn from(error: FlowError) -> ApiError {
        use domain::account::AccountError as A;
        use domain::server::ServerError as S;
        let detail = error.to_string();
        let conflict = |detail: String| ApiError::new(StatusCode::CONFLICT, "conflict", "Conflicts with the current state", detail);
        match error {
            FlowError::Account(A::InsufficientFunds { .. }) => {
                ApiError::new(StatusCode::PAYMENT_REQUIRED, "insufficient-funds", "Insufficient funds", detail)
            }
            FlowError::Account(A::Invalid { field, .. }) => ApiError::invalid(field, detail),
            FlowError::Account(A::NotOpen) => ApiError::not_found("account"),
            FlowError::Account(A::UnknownCharge(_)) => ApiError::not_found("charge"),
            FlowError::Account(A::UnknownTopUp(_)) => ApiError::not_found("top-up"),
            FlowError::Account(A::RefundExceedsCharge { .. } | A::RefundExceedsTopUp { .. }) => ApiError::invalid("amount", detail),
            FlowError::Account(_) => conflict(detail),
            FlowError::Server(S::NotFound) => ApiError::not_found("server"),
            FlowError::Server(S::Invalid(_)) => ApiError::invalid("os_image", detail),
            FlowError::Server(_) | FlowError::Order(_) | FlowError::Invoice(_) => conflict(detail),
            FlowError::Catalog(domain::CatalogError::UnknownPlan(_) | domain::CatalogError::PlanRetired(_)) => {
                ApiError::invalid("plan_id", detail)
            }
            FlowError::Catalog(domain::CatalogError::UnknownLocation(_)) => ApiError::invalid("location", detail),
            FlowError::Catalog(_) => conflict(detail),
            FlowError::TopUp(domain::topup::TopUpError::NotFound) => ApiError::not_found("top-up"),
            FlowError::TopUp(domain::topup::TopUpError::AmountNotAsked { .. }) => ApiError::invalid("amount", detail),
            FlowError::TopUp(domain::topup::TopUpError::NoReason) => ApiError::invalid("reason", detail),
            FlowError::TopUp(_) => conflict(detail),
            FlowError::NotFound(what) => ApiError::not_found(what),
            FlowError::Invalid { field, .. } => ApiError::invalid(field, detail),
            FlowError::Contended { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "contended", "Busy", detail),
            FlowError::Storage(app::handler::StorageError::Read(error)) => error.into(),
            FlowError::Storage(app::handler::StorageError::Append(ledger::AppendError::Database(error)))
                if ledger::database::is_unavailable(&error) =>
            {
                ApiError::unavailable(error)
            }
            FlowError::Storage(app::handler::StorageError::Append(ledger::AppendError::WriterStopped)) => {
                ApiError::unavailable("the log's writer has stopped")
            }
            FlowError::Storage(other) => ApiError::internal(other),
            FlowError::Projections(error) => error.into(),
        }
    }
}

impl From<app::payments::StripeEventError> for ApiError {
    fn from(error: app::payments::StripeEventError) -> ApiError {
        use app::payments::StripeEventError as E;
        match error {
            E::Malformed(detail) => ApiError::new(StatusCode::BAD_REQUEST, "malformed-event", "Malformed event", detail),
            E::NotYetKnown(detail) => ApiError::new(StatusCode::CONFLICT, "payment-unknown", "Payment not known yet", detail),
            E::Flow(error) => error.into(),
        }
    }
}

impl From<app::payments::TopUpError> for ApiError {
    fn from(error: app::payments::TopUpError) -> ApiError {
        use app::payments::TopUpError as E;
        let detail = error.to_string();
        match error {
            E::Unconfigured => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "payments-unavailable",
                "Payments unavailable",
                detail,
            ),
            E::Amount(_) => ApiError::invalid("amount", detail),
            E::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "payments-unavailable",
                "Payments unavailable",
                detail,
            ),
            E::Refused(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "payment-processor-refused",
                "Payment processor refused",
                detail,
            ),
            E::Flow(error) => error.into(),
        }
    }
}
