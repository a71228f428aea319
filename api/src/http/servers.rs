//! Servers: the plans on sale, deploy orders, and a server's life (setup, power, cancellation).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use domain::{AccountId, ServerId};
use projections::servers::ServerRow;
use rust_decimal::Decimal;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{page_size, path_id, Json, Query};
use super::types::{
    Cancellation, CancellationMode, Money, OrderAccepted, PlaceOrder, Plan, PlanPage, PlanPrice, Power, Server, ServerPage, ServerStatus,
    ServersQuery, Setup,
};
use super::{accounts, read_your_writes, AppState, Reply};
use app::flows::ServerRequest;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/plans", get(plans))
        .route("/v1/accounts/{id}/servers", get(account_servers))
        .route("/v1/accounts/{id}/orders", post(place_order))
        .route("/v1/servers/{id}", get(get_server))
        .route("/v1/servers/{id}/setup", post(setup_server))
        .route("/v1/servers/{id}/power", post(power_server))
        .route("/v1/servers/{id}/cancellation", post(cancel_server).delete(revoke_cancellation))
}

/// The read model's status; a row not yet provisioned reads as provisioning.
fn status(text: &str) -> ServerStatus {
    ServerStatus(domain::server::Status::parse(text).unwrap_or(domain::server::Status::Provisioning))
}

/// The server as shown at `now`: month-to-date counts the current month only.
pub fn view(row: ServerRow, now: DateTime<Utc>, currency: &str) -> Server {
    let this_month = domain::YearMonth::of(now).to_string();
    let month_to_date = if row.month.as_deref() == Some(this_month.as_str()) {
        row.month_to_date_net
    } else {
        Decimal::ZERO
    };
    Server {
        id: row.server_id,
        account_id: row.account_id,
        status: status(&row.status),
        plan_id: row.plan_id,
        location: row.location,
        hostname: row.hostname,
        os_image: row.os_image,
        month_to_date_net: Money::of(month_to_date, currency),
        next_charge_at: row.next_charge_at,
        cancellation_mode: row.cancellation_mode.as_deref().map(|mode| match mode {
            "immediate" => CancellationMode::Immediate,
            _ => CancellationMode::Grace,
        }),
        cancellation_effective_at: row.cancellation_effective_at,
        suspension_reason: row.suspension_reason,
        created_at: row.created_at,
    }
}

/// The catalogue: plans on sale now, with monthly and hourly prices per currency (tax exclusive).
#[utoipa::path(get, path = "/v1/plans", tag = "servers", responses((status = 200, description = "the plans on sale", body = PlanPage)))]
pub(crate) async fn plans(State(state): State<AppState>) -> Reply<PlanPage> {
    let catalog = state
        .flows
        .handler
        .load::<domain::Catalog>(domain::catalog::CATALOG_STREAM)
        .await
        .map_err(|error| ApiError::from(app::flows::FlowError::from(error)))?;
    let now = state.clock.now();
    let items = catalog
        .state
        .plans_at(now)
        .into_iter()
        .map(|(spec, prices)| Plan {
            id: spec.id.to_string(),
            vcpu: spec.vcpu,
            ram_gb: spec.ram_gb,
            disk_gb: spec.disk_gb,
            prices: prices
                .iter()
                .map(|(currency, monthly)| {
                    let code = currency.code();
                    let hourly = domain::billing::rate_per_hour(*monthly);
                    (
                        code.to_string(),
                        PlanPrice {
                            monthly: Money::of(*monthly, code),
                            hourly: Money::of(hourly, code),
                        },
                    )
                })
                .collect(),
        })
        .collect();
    // The catalogue is served whole: there is never a next page.
    Ok((StatusCode::OK, axum::Json(PlanPage { items, next_cursor: None })))
}

/// The account's servers, in the order they were ordered.
#[utoipa::path(get, path = "/v1/accounts/{id}/servers", tag = "servers", params(("id" = Uuid, Path), ServersQuery), security(("bearer" = [])),
    responses((status = 200, description = "the account's servers", body = ServerPage)))]
pub(crate) async fn account_servers(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(page): Query<ServersQuery>,
) -> Reply<ServerPage> {
    let account_id = accounts::readable(&caller, &id)?;
    let account = accounts::load(&state, account_id).await?;
    let limit = page_size(page.limit, 50, app::reads::PAGE_MAX)?;
    let rows = app::reads::servers_of_account(&state.pool, account_id, page.cursor.map(ServerId), limit)
        .await?
        .ok_or_else(|| ApiError::not_found("server (the cursor)"))?;
    let now = state.clock.now();
    Ok((
        StatusCode::OK,
        axum::Json(ServerPage::of(rows, |row| view(row, now, &account.currency))),
    ))
}

/// A server, as its owner, finance or an admin sees it.
#[utoipa::path(get, path = "/v1/servers/{id}", tag = "servers", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, description = "the server", body = Server)))]
pub(crate) async fn get_server(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Reply<Server> {
    let server_id = path_id(ServerId::parse(&id), "server")?;
    let row = app::reads::server(&state.pool, server_id)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    caller
        .may_read(AccountId(row.account_id))
        .map_err(|_| ApiError::not_found("server"))?;
    render(&state, row).await
}

async fn render(state: &AppState, row: ServerRow) -> Reply<Server> {
    let account = accounts::load(state, AccountId(row.account_id)).await?;
    Ok((StatusCode::OK, axum::Json(view(row, state.clock.now(), &account.currency))))
}

/// Places a deploy order: the first hour is held now, captured when the server is made, released
/// if making it fails.
#[utoipa::path(post, path = "/v1/accounts/{id}/orders", tag = "servers", params(("id" = Uuid, Path)), request_body = PlaceOrder, security(("bearer" = [])),
    responses((status = 202, description = "accepted; provisioning", body = OrderAccepted), (status = 402, description = "the first hour is not affordable", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn place_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<PlaceOrder>,
) -> Reply<OrderAccepted> {
    let account_id = path_id(AccountId::parse(&id), "account")?;
    caller.may_act_as_owner(account_id)?;
    accounts::load(&state, account_id).await?;
    let metadata = caller.metadata();
    let (order_id, server_id) = (domain::OrderId(metadata.id_for("order")), ServerId(metadata.id_for("server")));
    state
        .flows
        .place_order(account_id, body.plan_id.0, body.location.0, order_id, server_id, &metadata)
        .await?;
    // The outbox provisions it (woken by this append): the deploy saga.
    read_your_writes(&state).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(OrderAccepted {
            order_id: order_id.0,
            server_id: server_id.0,
            status: "provisioning".into(),
        }),
    ))
}

/// The server, if the caller is its account's customer (to another account's, it does not exist).
async fn owned(state: &AppState, caller: &Caller, id: &str) -> Result<ServerRow, ApiError> {
    let server_id = path_id(ServerId::parse(id), "server")?;
    let row = app::reads::server(&state.pool, server_id)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    caller.may_act_as_owner(AccountId(row.account_id)).map_err(|error| {
        if error.status == StatusCode::NOT_FOUND {
            ApiError::not_found("server")
        } else {
            error
        }
    })?;
    Ok(row)
}

/// Does what the owner asked of its server; answers with the server once the read models show it.
async fn act(state: &AppState, caller: &Caller, id: &str, request: ServerRequest) -> Reply<Server> {
    let row = owned(state, caller, id).await?;
    let server_id = ServerId(row.server_id);
    state.flows.act_on_server(server_id, request, &caller.metadata()).await?;
    read_your_writes(state).await?;
    let row = app::reads::server(&state.pool, server_id)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    render(state, row).await
}

/// Installs an operating system and names the server (a new server needs this once).
#[utoipa::path(post, path = "/v1/servers/{id}/setup", tag = "servers", params(("id" = Uuid, Path)), request_body = Setup, security(("bearer" = [])),
    responses((status = 200, description = "set up", body = Server), (status = 409, description = "not in a state that allows it", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn setup_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Setup>,
) -> Reply<Server> {
    let hostname = domain::Hostname::parse(&body.hostname.0).map_err(|error| ApiError::invalid("hostname", error.reason))?;
    act(
        &state,
        &caller,
        &id,
        ServerRequest::Setup {
            os_image: body.os_image.0,
            hostname,
        },
    )
    .await
}

/// Boots, shuts down or reboots the server (a stopped server is still billed).
#[utoipa::path(post, path = "/v1/servers/{id}/power", tag = "servers", params(("id" = Uuid, Path)), request_body = Power, security(("bearer" = [])),
    responses((status = 200, description = "done", body = Server), (status = 409, description = "not in a state that allows it", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn power_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Power>,
) -> Reply<Server> {
    act(&state, &caller, &id, ServerRequest::Power(body.action.into())).await
}

/// Cancels the server: billing stops now and the unused part of the paid hour goes back to the
/// wallet.
#[utoipa::path(post, path = "/v1/servers/{id}/cancellation", tag = "servers", params(("id" = Uuid, Path)), request_body = Cancellation, security(("bearer" = [])),
    responses((status = 200, description = "cancelled; the unused part of the hour refunded", body = Server), (status = 409, description = "already cancelled, or not cancellable", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn cancel_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Cancellation>,
) -> Reply<Server> {
    act(&state, &caller, &id, ServerRequest::Cancel(body.mode.into())).await
}

/// Revokes a grace cancellation: the server is powered on and the hour in progress charged.
#[utoipa::path(delete, path = "/v1/servers/{id}/cancellation", tag = "servers", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, description = "revoked; the hour in progress charged", body = Server), (status = 402, description = "the hour in progress is not affordable", body = super::error::Problem, content_type = "application/problem+json"), (status = 409, description = "immediate, due, or not cancelled", body = super::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn revoke_cancellation(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Reply<Server> {
    act(&state, &caller, &id, ServerRequest::RevokeCancellation).await
}
