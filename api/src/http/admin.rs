//! Admin corrections (adjustments, service credits) and the read models' upkeep (status, rebuild).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use domain::{AccountId, ChargeId};

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::extract::{path_id, Json};
use super::types::{
    Account, Adjustment, AdjustmentMade, AmountWithReason, Money, ProjectionPage, ProjectionStatus, RebuildStarted, ServiceCredit,
};
use super::{accounts, read_your_writes, AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/accounts/{id}/adjustments", post(adjust))
        .route("/v1/admin/charges/{id}/refunds", post(credit_charge))
        .route("/v1/admin/projections", get(projection_status))
        .route("/v1/admin/projections/{name}/rebuild", post(rebuild_projection))
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
    let charge_id = path_id(ChargeId::parse(&id), "charge")?;
    let account_id = app::reads::account_of_charge(&state.pool, charge_id)
        .await?
        .ok_or_else(|| ApiError::not_found("charge"))?;
    let account = accounts::load(&state, account_id).await?;
    let amount = accounts::money_in(body.amount.0, accounts::currency_of(&account)?)?.amount;
    let refund_id = state
        .flows
        .service_credit(account_id, charge_id, amount, &body.reason.0, &caller.metadata())
        .await?;
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

/// Read models being rebuilt by this process (a second rebuild of one would share its side schema).
static REBUILDING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
    std::sync::LazyLock::new(Default::default);

/// Rebuilds a read model from position 0 beside the live one, swapped in when caught up.
#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", tag = "admin",
    params(("name" = String, Path, description = "balances, statement, servers, invoices, journal or metrics")), security(("bearer" = [])),
    responses((status = 202, description = "rebuilding; follow it at /v1/admin/projections", body = RebuildStarted),
        (status = 409, description = "already being rebuilt", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn rebuild_projection(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> Reply<RebuildStarted> {
    caller.require(&[Role::Admin])?;
    let projection = projections::projection::by_name(&name).ok_or_else(|| ApiError::not_found("read model"))?;
    let key = projection.name();
    if !REBUILDING.lock().expect("rebuild lock").insert(key) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already-rebuilding",
            "Already rebuilding",
            format!("{key} is being rebuilt already"),
        ));
    }
    let pool = state.pool.clone();
    tokio::spawn(async move {
        match projections::rebuild::rebuild(&pool, projection.as_ref(), |_, _| {}).await {
            Ok(report) => tracing::info!(
                name = report.name,
                events = report.events,
                elapsed_ms = report.elapsed_ms,
                "read model rebuilt and swapped in"
            ),
            Err(error) => tracing::error!(name = key, %error, "rebuilding a read model failed; the live one is untouched"),
        }
        REBUILDING.lock().expect("rebuild lock").remove(key);
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(RebuildStarted {
            name: key.to_string(),
            status: "rebuilding".into(),
        }),
    ))
}
