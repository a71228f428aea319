//! Dev mode only: the controllable clock and the local stand-in for Stripe Checkout. Outside dev
//! mode none of these routes exist.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::extract::{path_id, Json};
use super::types::{ClockMoved, ClockNow, DevClock, DueReport, Money};
use super::{AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/dev/clock", post(dev_clock).get(dev_clock_now))
        .route("/dev/checkout/{topup_id}", get(checkout_page))
        .route("/dev/checkout/{topup_id}/pay", post(checkout_pay))
}

/// The dev clock's instant.
#[utoipa::path(get, path = "/v1/dev/clock", tag = "dev", responses((status = 200, description = "the dev clock's instant", body = ClockNow)))]
pub(crate) async fn dev_clock_now(State(state): State<AppState>) -> Reply<ClockNow> {
    Ok((StatusCode::OK, axum::Json(ClockNow { now: state.clock.now() })))
}

/// Sets the dev clock (never backwards) or moves it on, then runs the work due at the new
/// instant (hourly charges, deletions, invoices) before answering.
#[utoipa::path(post, path = "/v1/dev/clock", tag = "dev", request_body = DevClock,
    responses((status = 200, description = "the new instant, and the due work it ran", body = ClockMoved)))]
pub(crate) async fn dev_clock(State(state): State<AppState>, Json(body): Json<DevClock>) -> Reply<ClockMoved> {
    let clock = state.dev_clock.as_ref().ok_or_else(|| ApiError::not_found("route"))?;
    let now = match body {
        DevClock::Set { now } => clock.set(now).map_err(|error| ApiError::invalid("now", error.to_string()))?,
        DevClock::Advance { advance_seconds } => {
            if advance_seconds > 366 * 24 * 3600 {
                return Err(ApiError::invalid("advance_seconds", "a whole number of seconds from 0 to a year"));
            }
            clock
                .advance(chrono::Duration::seconds(i64::from(advance_seconds)))
                .map_err(|error| ApiError::invalid("advance_seconds", error.to_string()))?
        }
    };
    let report = app::workers::run_due(&state.flows, now).await?;
    super::read_your_writes(&state).await?;
    Ok((
        StatusCode::OK,
        axum::Json(ClockMoved {
            now,
            due: DueReport {
                slots_charged: report.slots_charged,
                slots_declined: report.slots_declined,
                servers_resumed: report.servers_resumed,
                servers_terminated: report.servers_terminated,
                servers_deleted: report.servers_deleted,
                invoices_issued: report.invoices_issued,
                low_balance_warnings: report.low_balance_warnings,
                failures: report.failures,
            },
        }),
    ))
}

async fn requested(state: &AppState, topup_id: &str) -> Result<domain::topup::Requested, ApiError> {
    let topup_id = path_id(domain::TopUpId::parse(topup_id), "top-up")?;
    let topup = app::payments::load_topup(&state.flows, topup_id).await?;
    topup.requested.ok_or_else(|| ApiError::not_found("top-up"))
}

/// The local stand-in for Stripe Checkout: a page with a button that pays.
async fn checkout_page(State(state): State<AppState>, Path(topup_id): Path<String>) -> Result<Html<String>, ApiError> {
    let topup = requested(&state, &topup_id).await?;
    let amount = Money::of(topup.amount, topup.currency.code()).0;
    Ok(Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Checkout</title></head>\
         <body style=\"font-family: sans-serif; max-width: 28rem; margin: 4rem auto\">\
         <h1>Top up your wallet</h1><p>Amount: <strong>{} {}</strong></p>\
         <form method=\"post\" action=\"/dev/checkout/{}/pay\"><button type=\"submit\">Pay {} {}</button></form>\
         <p><small>Dev mode: paying posts a signed <code>checkout.session.completed</code> webhook.</small></p></body></html>",
        topup.currency, amount, topup.topup_id, topup.currency, amount
    )))
}

/// Pays a top-up as Stripe would: posts a signed `checkout.session.completed` to the webhook.
async fn checkout_pay(State(state): State<AppState>, Path(topup_id): Path<String>) -> Result<Html<String>, ApiError> {
    let topup = requested(&state, &topup_id).await?;
    let secret = state
        .webhook_secret
        .clone()
        .ok_or_else(|| ApiError::internal("dev mode without a webhook secret"))?;
    let minor = domain::Money::new(topup.amount, topup.currency)
        .and_then(|m| m.to_minor_units())
        .map_err(ApiError::internal)?;
    let session = serde_json::json!({
        "id": format!("cs_dev_{}", topup.topup_id.0.simple()),
        "object": "checkout.session",
        "amount_total": minor,
        "currency": topup.currency.code().to_ascii_lowercase(),
        "client_reference_id": topup.topup_id.to_string(),
        "metadata": {"topup_id": topup.topup_id.to_string()},
        "mode": "payment",
        "payment_intent": format!("pi_dev_{}", topup.topup_id.0.simple()),
        "payment_status": "paid",
        "status": "complete"
    });
    adapters::stripe::dev::post_dev_event(
        &reqwest::Client::new(),
        &state.public_url,
        &secret,
        "checkout.session.completed",
        session,
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Html(format!(
        "<!doctype html><html lang=\"en\"><body style=\"font-family: sans-serif; max-width: 28rem; margin: 4rem auto\"><h1>Paid</h1><p>{} {} was added to your wallet.</p></body></html>",
        topup.currency,
        Money::of(topup.amount, topup.currency.code()).0
    )))
}
