//! Admin corrections (adjustments, service credits) and the read models' upkeep (status, rebuild).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use domain::{AccountId, ChargeId};

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::extract::{page_size, path_id, Json, Query};
use super::types::{
    Account, Adjustment, AdjustmentMade, AmountWithReason, KeyPage, KeyView, KeysQuery, Money, ProjectionPage, ProjectionStatus,
    RebuildStarted, ServiceCredit,
};
use super::{accounts, read_your_writes, AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/accounts/{id}/adjustments", post(adjust))
        .route("/v1/admin/charges/{id}/refunds", post(credit_charge))
        .route("/v1/admin/api-keys", get(list_keys))
        .route("/v1/admin/api-keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/admin/projections", get(projection_status))
        .route("/v1/admin/projections/{name}/rebuild", post(rebuild_projection))
}

/// API keys, newest first (never their tokens), optionally of one account.
#[utoipa::path(get, path = "/v1/admin/api-keys", tag = "admin", params(KeysQuery), security(("bearer" = [])),
    responses((status = 200, description = "the keys", body = KeyPage),
        (status = 404, description = "the cursor names no key (of that account)", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_keys(State(state): State<AppState>, caller: Caller, Query(query): Query<KeysQuery>) -> Reply<KeyPage> {
    caller.require(&[Role::Admin])?;
    let limit = page_size(query.limit, 50, app::reads::PAGE_MAX)?;
    let page = app::keys::list(&state.pool, query.account.map(AccountId), query.cursor, limit)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    Ok((StatusCode::OK, axum::Json(KeyPage::of(page, KeyView::of))))
}

/// Revokes an API key: from the next request on, in every process, it answers 401. Revoking a
/// revoked key changes nothing.
#[utoipa::path(delete, path = "/v1/admin/api-keys/{id}", tag = "admin", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, description = "revoked", body = KeyView),
        (status = 409, description = "the key of the request itself: another admin key revokes it", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn revoke_key(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Reply<KeyView> {
    caller.require(&[Role::Admin])?;
    let key_id = path_id(uuid::Uuid::parse_str(&id), "key")?;
    if key_id == caller.key_id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "own-key",
            "A key does not revoke itself",
            "this is the key of the request; revoke it with another admin key or from the console",
        ));
    }
    let key = app::keys::revoke(&state.pool, key_id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    // Answered once no process serves the key any more.
    state.cache.revoked().await;
    tracing::info!(key = %key_id, by = caller.id.get(..16).unwrap_or_default(), "API key revoked");
    Ok((StatusCode::OK, axum::Json(KeyView::of(key))))
}

/// Credits or debits a wallet with a reason; a debit never takes the balance below zero.
#[utoipa::path(post, path = "/v1/admin/accounts/{id}/adjustments", tag = "admin", params(("id" = Uuid, Path)), request_body = Adjustment, security(("bearer" = [])),
    responses((status = 201, description = "adjusted", body = AdjustmentMade),
        (status = 402, description = "a debit beyond the available balance", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn adjust(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Adjustment>,
) -> Reply<AdjustmentMade> {
    let account_id = path_id(AccountId::parse(&id), "account")?;
    caller.require_for_account(&[Role::Admin], account_id)?;
    let account = accounts::load(&state, account_id).await?;
    let amount = accounts::money_in(body.amount.0, accounts::currency_of(&account)?)?.amount;
    let adjustment_id = state.flows.adjust(account_id, amount, &body.reason.0, &caller.metadata()).await?;
    read_your_writes(&state).await?;
    let account = accounts::load(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(AdjustmentMade {
            adjustment_id: adjustment_id.0,
            account: Account::of(&account),
        }),
    ))
}

/// A service credit against a charge, to the wallet (never more than the charge's gross in
/// total); a credit against an invoiced charge issues a credit note.
#[utoipa::path(post, path = "/v1/admin/charges/{id}/refunds", tag = "admin", params(("id" = Uuid, Path)), request_body = AmountWithReason, security(("bearer" = [])),
    responses((status = 201, description = "credited to the wallet", body = ServiceCredit)))]
pub(crate) async fn credit_charge(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<AmountWithReason>,
) -> Reply<ServiceCredit> {
    caller.require(&[Role::Admin])?;
    let (charge_id, refund_id, account_id, amount) =
        service_credit(&state, &id, None, body.amount.0, &body.reason.0, &caller.metadata()).await?;
    read_your_writes(&state).await?;
    let account = accounts::load(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ServiceCredit {
            refund_id: refund_id.0,
            charge_id: charge_id.0,
            amount: Money::of(amount, &account.currency),
            account: Account::of(&account),
        }),
    ))
}

/// A service credit against charge `id` (its id as given; of account `of` when given, else it is
/// not found) for `amount` of the account's currency:
/// the rules of the API's and the console's credits. Returns the charge's, the refund's and the
/// account's ids and the amount.
pub(crate) async fn service_credit(
    state: &AppState,
    id: &str,
    of: Option<AccountId>,
    amount: rust_decimal::Decimal,
    reason: &str,
    metadata: &app::handler::Metadata,
) -> Result<(ChargeId, domain::RefundId, AccountId, rust_decimal::Decimal), ApiError> {
    let charge_id = path_id(ChargeId::parse(id), "charge")?;
    let account_id = app::reads::account_of_charge(&state.pool, charge_id)
        .await?
        .filter(|account_id| of.is_none_or(|of| of == *account_id))
        .ok_or_else(|| ApiError::not_found("charge"))?;
    let account = accounts::load(state, account_id).await?;
    let amount = accounts::money_in(amount, accounts::currency_of(&account)?)?.amount;
    let refund_id = state.flows.service_credit(account_id, charge_id, amount, reason, metadata).await?;
    Ok((charge_id, refund_id, account_id, amount))
}

/// Each read model's position, lag behind the log, generation and rebuild state.
#[utoipa::path(get, path = "/v1/admin/projections", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "every read model", body = ProjectionPage)))]
pub(crate) async fn projection_status(State(state): State<AppState>, caller: Caller) -> Reply<ProjectionPage> {
    caller.require(&[Role::Admin])?;
    let items = projections::queries::status(&state.pool)
        .await?
        .into_iter()
        .map(|status| ProjectionStatus {
            name: status.name,
            position: status.position,
            head: status.head,
            lag: status.lag,
            generation: status.generation,
            rebuilding: status.rebuilding,
            rebuild_position: status.rebuild_position,
        })
        .collect();
    // Every read model, always: there is never a next page.
    Ok((StatusCode::OK, axum::Json(ProjectionPage { items, next_cursor: None })))
}

/// Rebuilds a read model from position 0 beside the live one, swapped in when caught up.
#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", tag = "admin",
    params(("name" = String, Path, description = "balances, statement, servers, invoices, journal or metrics")), security(("bearer" = [])),
    responses((status = 202, description = "rebuilding; follow it at /v1/admin/projections", body = RebuildStarted),
        (status = 409, description = "already being rebuilt", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn rebuild_projection(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> Reply<RebuildStarted> {
    caller.require(&[Role::Admin])?;
    let key = app::rebuilds::start(&state.pool, &name).map_err(|error| match error {
        app::rebuilds::NotStarted::Unknown(_) => ApiError::not_found("read model"),
        already => ApiError::new(
            StatusCode::CONFLICT,
            "already-rebuilding",
            "Already rebuilding",
            already.to_string(),
        ),
    })?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(RebuildStarted {
            name: key.to_string(),
            status: "rebuilding".into(),
        }),
    ))
}
