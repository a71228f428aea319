//! The HTTP API (v1): thin handlers that parse, authorize, call the flows or read the read models,
//! and map errors to problem details. Money crosses as strings.

pub mod auth;
pub mod error;
mod idempotency;
pub mod openapi;
pub mod operations;
mod routes;

use std::sync::Arc;

use axum::Router;
use domain::{Clock, ManualClock};
use sqlx::PgPool;

use app::flows::Flows;

#[derive(Clone)]
pub struct AppState {
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
}

/// Largest request body accepted; larger is a 413.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

pub fn router(state: AppState) -> Router {
    routes::router(state)
}
