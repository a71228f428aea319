//! The HTTP API (v1): a module per resource (`accounts`, `servers`, `payments`, `invoices`,
//! `admin`, `ledger`, `system`, `dev`), each handler four steps: parse (the wire types of
//! `types`), authorize (`auth`), call the application (`app`), render. Errors are problem details
//! (`error`); the OpenAPI document is derived from the same types (`openapi`).

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod dev;
pub mod error;
pub mod extract;
mod idempotency;
pub mod invoices;
pub mod ledger;
pub mod openapi;
pub mod operations;
pub mod payments;
pub mod servers;
pub mod system;
pub mod types;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::Router;
use domain::{Clock, ManualClock};
use sqlx::PgPool;

use app::flows::Flows;
use error::ApiError;

/// What every handler shares, behind one `Arc` (cloned for each request by every layer).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub pool: PgPool,
    pub flows: Flows,
    pub clock: Arc<dyn Clock>,
    /// Set in dev mode: the controllable clock behind `/v1/dev/clock`.
    pub dev_clock: Option<Arc<ManualClock>>,
    /// The Stripe webhook signing secret (`whsec_dev` in dev mode unless configured).
    pub webhook_secret: Option<String>,
    /// This server's own base URL (for checkout links and the dev checkout's webhook).
    pub public_url: String,
    pub rate_limiter: Arc<operations::RateLimiter>,
    /// The card processor (Stripe, or dev mode's local one); None when neither is configured.
    pub payments: Option<Arc<dyn domain::payments::PaymentGateway>>,
    /// When portal and console sessions end by themselves.
    pub sessions: app::people::SessionLimits,
    /// Sign-in and reset attempts per email, in this process (the lockout is shared by all).
    pub signin_limiter: Arc<operations::RateLimiter>,
    /// Sign-in attempts of every email together, in this process.
    pub signin_limiter_all: Arc<operations::RateLimiter>,
    /// Balance rows and key grants kept in memory, kept true by the database's announcements.
    pub cache: Arc<app::cache::ReadCache>,
}

/// Largest request body accepted; larger is a 413.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// What a handler answers: a status and a JSON body, or a problem.
pub type Reply<T> = Result<(StatusCode, axum::Json<T>), ApiError>;

pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .merge(system::routes())
        .merge(accounts::routes())
        .merge(servers::routes())
        .merge(payments::routes())
        .merge(invoices::routes())
        .merge(admin::routes())
        .merge(ledger::routes())
        .merge(crate::web::routes());
    if state.dev_clock.is_some() {
        router = router.merge(dev::routes());
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::layer))
        .layer(axum::middleware::from_fn_with_state(state.clone(), operations::rate_limit))
        .layer(axum::middleware::from_fn(operations::request_id))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

/// Waits until the read models have passed the command's writes, so a response reflects them.
pub(crate) async fn read_your_writes(state: &AppState) -> Result<(), ApiError> {
    caught_up(state).await.map_err(ApiError::from)
}

/// Brings the read models up to the head, and waits until this process's read cache has heard
/// the balances reach it (so nothing older is served from memory afterwards).
pub(crate) async fn caught_up(state: &AppState) -> Result<(), projections::runner::ProjectionError> {
    let position = projections::runner::catch_up_all(&state.pool).await?;
    state.cache.caught_up(position).await;
    Ok(())
}
