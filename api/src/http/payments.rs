//! Payments: top-ups through the card processor's checkout, its webhook, card refunds and the
//! review of payments held for it. What an event does is decided in `app::payments`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use domain::{AccountId, TopUpId};

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::extract::{path_id, request_id, Json};
use super::types::{Account, AmountWithReason, CardRefund, HeldPaymentAccepted, Money, TopUp, TopUpRequest, WebhookReceipt};
use super::{accounts, read_your_writes, AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts/{id}/topups", post(request_topup))
        .route("/v1/webhooks/stripe", post(stripe_webhook))
        .route("/v1/admin/topups/{id}/refunds", post(refund_topup))
        .route("/v1/admin/topups/{id}/resolution", post(resolve_held_payment))
}

fn processor(
    state: &AppState,
    slug: &'static str,
    title: &'static str,
    what: &str,
) -> Result<std::sync::Arc<dyn domain::payments::PaymentGateway>, ApiError> {
    state.payments.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            slug,
            title,
            format!("{what} are not configured on this server (STRIPE_SECRET_KEY)"),
        )
    })
}

/// Starts a top-up: a checkout at the card processor; the wallet is credited when the processor
/// reports the payment (never by the redirect).
#[utoipa::path(post, path = "/v1/accounts/{id}/topups", tag = "payments", params(("id" = Uuid, Path)), request_body = TopUpRequest, security(("bearer" = [])),
    responses((status = 201, description = "pending, with its checkout URL", body = TopUp),
        (status = 502, description = "the processor refused the checkout", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn request_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<TopUpRequest>,
) -> Reply<TopUp> {
    let account_id = path_id(AccountId::parse(&id), "account")?;
    caller.may_act_as_owner(account_id)?;
    let account = accounts::load(&state, account_id).await?;
    let currency = accounts::currency_of(&account)?;
    let amount = body.amount.0;
    let metadata = caller.metadata();
    let (topup_id, checkout_url) =
        app::payments::start_topup(&state.flows, state.payments.as_deref(), account_id, currency, amount, &metadata).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TopUp {
            topup_id: topup_id.0,
            checkout_url,
            amount: Money::of(amount, &account.currency),
            status: "pending".into(),
        }),
    ))
}

/// Stripe's events, signed with `Stripe-Signature` (300 s tolerance), each acted on once.
#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "payments",
    params(("Stripe-Signature" = String, Header, description = "`t=<unix time>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">`")),
    request_body(content = Object, description = "a Stripe event", content_type = "application/json"),
    responses((status = 200, description = "received (`duplicate`: received before)", body = WebhookReceipt),
        (status = 400, description = "a bad signature, a stale timestamp or a malformed event", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "the payment is not known yet; deliver again later", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn stripe_webhook(State(state): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Reply<WebhookReceipt> {
    let secret = state.webhook_secret.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhooks-unconfigured",
            "Webhooks not configured",
            "STRIPE_WEBHOOK_SECRET is not set",
        )
    })?;
    let signature = headers.get("stripe-signature").and_then(|value| value.to_str().ok());
    // Signatures are checked against real time, whatever the dev clock says.
    adapters::stripe::webhook::verify(secret, signature, &body, Utc::now())
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "bad-signature", "Bad webhook signature", error.to_string()))?;
    let event: adapters::stripe::webhook::Event = serde_json::from_slice(&body)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Malformed event", error.to_string()))?;
    let receipt = app::payments::handle_stripe_event(&state.flows, &event, request_id(&headers)).await?;
    read_your_writes(&state).await?;
    Ok((
        StatusCode::OK,
        axum::Json(WebhookReceipt {
            received: receipt.received,
            duplicate: receipt.duplicate,
            acted_on: receipt.acted_on,
            matched: receipt.matched,
        }),
    ))
}

/// The top-up as the log has it, with what was asked; unknown is a 404.
async fn asked(state: &AppState, id: &str) -> Result<(TopUpId, domain::topup::TopUp, domain::topup::Requested), ApiError> {
    let topup_id = path_id(TopUpId::parse(id), "top-up")?;
    let topup = app::payments::load_topup(&state.flows, topup_id).await?;
    let requested = topup.requested.clone().ok_or_else(|| ApiError::not_found("top-up"))?;
    Ok((topup_id, topup, requested))
}

/// A card refund of a paid top-up: the wallet is debited now (at most the top-up less earlier
/// refunds, and at most what is available); Stripe's `refund.updated` completes it or gives the
/// money back.
#[utoipa::path(post, path = "/v1/admin/topups/{id}/refunds", tag = "payments", params(("id" = Uuid, Path)), request_body = AmountWithReason, security(("bearer" = [])),
    responses((status = 201, description = "requested; the wallet is debited until Stripe answers", body = CardRefund),
        (status = 402, description = "more than is available", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "the top-up is not paid", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn refund_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<AmountWithReason>,
) -> Reply<CardRefund> {
    caller.require(&[Role::Admin])?;
    let (topup_id, refund_id, account_id) = card_refund(&state, &id, None, body.amount.0, &body.reason.0, &caller.metadata()).await?;
    read_your_writes(&state).await?;
    let account = accounts::load(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CardRefund {
            refund_id: refund_id.0,
            topup_id: topup_id.0,
            amount: Money::of(body.amount.0, &account.currency),
            status: "requested".into(),
            account: Account::of(&account),
        }),
    ))
}

/// A card refund of top-up `id` (its id as given; of account `of` when given, else it is not
/// found) for `amount` of the account's currency: the
/// rules of the API's and the console's refunds. Returns the top-up's, the refund's and the
/// account's ids.
pub(crate) async fn card_refund(
    state: &AppState,
    id: &str,
    of: Option<domain::AccountId>,
    amount: rust_decimal::Decimal,
    reason: &str,
    metadata: &app::handler::Metadata,
) -> Result<(TopUpId, domain::RefundId, domain::AccountId), ApiError> {
    let (topup_id, topup, requested) = asked(state, id).await?;
    if of.is_some_and(|of| of != requested.account_id) {
        return Err(ApiError::not_found("top-up"));
    }
    if topup.paid_by.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-paid",
            "Not paid",
            "the top-up has not been paid; there is nothing to refund",
        ));
    }
    accounts::money_in(amount, requested.currency)?
        .to_minor_units()
        .map_err(|error| ApiError::invalid("amount", format!("amount: {error}")))?;
    processor(state, "refunds-unavailable", "Card refunds unavailable", "card refunds")?;
    let refund_id = state
        .flows
        .request_card_refund(requested.account_id, topup_id, amount, reason, metadata)
        .await?;
    Ok((topup_id, refund_id, requested.account_id))
}

/// A payment held for review (another currency or amount than asked) accepted by an admin for an
/// amount in the account's currency, at most the amount asked: the wallet is credited that.
#[utoipa::path(post, path = "/v1/admin/topups/{id}/resolution", tag = "payments", params(("id" = Uuid, Path)), request_body = AmountWithReason, security(("bearer" = [])),
    responses((status = 201, description = "accepted: the top-up is paid and the wallet credited", body = HeldPaymentAccepted),
        (status = 409, description = "no payment of the top-up is held for review", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn resolve_held_payment(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<AmountWithReason>,
) -> Reply<HeldPaymentAccepted> {
    caller.require(&[Role::Admin])?;
    let (topup_id, _, requested) = asked(&state, &id).await?;
    let amount = accounts::money_in(body.amount.0, requested.currency)?.amount;
    let account_id = state
        .flows
        .accept_held_payment(topup_id, amount, &body.reason.0, &caller.metadata())
        .await?;
    app::workers::resume_affordable(&state.flows, Some(account_id)).await?;
    read_your_writes(&state).await?;
    let account = accounts::load(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(HeldPaymentAccepted {
            topup_id: topup_id.0,
            amount: Money::of(amount, &account.currency),
            status: "paid".into(),
            account: Account::of(&account),
        }),
    ))
}
