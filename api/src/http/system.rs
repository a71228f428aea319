//! The service itself: liveness, readiness, Prometheus metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, HeaderName, StatusCode};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::types::Ready;
use super::{AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive", body = String, content_type = "text/plain")))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// The database answers; how far the read models lag behind the log.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "ready", body = Ready)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Reply<Ready> {
    let statuses = projections::queries::status(&state.pool).await?;
    let lag = statuses.iter().map(|status| status.lag).max().unwrap_or(0);
    Ok((
        StatusCode::OK,
        axum::Json(Ready {
            status: "ready".into(),
            projector_lag: lag,
        }),
    ))
}

/// Requests, latency, billing runs, the ledger head, projector lag, billable servers, overdue
/// provider work, in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<([(HeaderName, &'static str); 1], String), ApiError> {
    let statuses = projections::queries::status(&state.pool).await?;
    let mut extra = String::from("# TYPE billing_ledger_head_position gauge\n");
    extra.push_str(&format!(
        "billing_ledger_head_position {}\n",
        statuses.first().map(|s| s.head).unwrap_or(0)
    ));
    extra.push_str("# TYPE billing_projector_lag_events gauge\n");
    for status in &statuses {
        extra.push_str(&format!(
            "billing_projector_lag_events{{projection=\"{}\"}} {}\n",
            status.name, status.lag
        ));
    }
    let billable = app::reads::billable_server_count(&state.pool).await?;
    extra.push_str(&format!("# TYPE billing_active_servers gauge\nbilling_active_servers {billable}\n"));
    let overdue = app::outbox::overdue(&state.pool).await?;
    extra.push_str(&format!("# TYPE billing_outbox_overdue gauge\nbilling_outbox_overdue {overdue}\n"));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::operations::METRICS.render(&extra),
    ))
}

/// This API's OpenAPI 3.1 document, derived from the types the server reads and writes.
async fn openapi(State(state): State<AppState>) -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(super::openapi::document(state.dev_clock.is_some()))
}
