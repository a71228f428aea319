//! The routes of API v1.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::{AccountId, Country, Currency, Money, ServerId};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::auth::{create_key, Caller, Role};
use super::error::{ApiError, Query};
use super::{AppState, BODY_BYTES_MAX};

pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/plans", get(plans))
        .route("/v1/accounts", post(open_account).get(search_accounts))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/accounts/{id}/api-keys", post(create_api_key))
        .route("/v1/accounts/{id}/transactions", get(transactions))
        .route("/v1/accounts/{id}/servers", get(account_servers))
        .route("/v1/servers/{id}", get(get_server))
        .route("/v1/accounts/{id}/orders", post(place_order))
        .route("/v1/accounts/{id}/topups", post(request_topup))
        .route("/v1/accounts/{id}/invoices", get(account_invoices))
        .route("/v1/invoices/{id}", get(get_invoice))
        .route("/v1/webhooks/stripe", post(stripe_webhook))
        .route("/v1/servers/{id}/setup", post(setup_server))
        .route("/v1/servers/{id}/power", post(power_server))
        .route("/v1/servers/{id}/cancellation", post(cancel_server).delete(revoke_cancellation))
        .route("/v1/admin/accounts/{id}/adjustments", post(adjust))
        .route("/v1/admin/charges/{id}/refunds", post(credit_charge))
        .route("/v1/admin/topups/{id}/refunds", post(refund_topup))
        .route("/v1/admin/topups/{id}/resolution", post(resolve_held_payment))
        .route("/v1/admin/projections", get(projection_status))
        .route("/v1/admin/projections/{name}/rebuild", post(rebuild_projection))
        .route("/v1/ledger/verify", get(verify_ledger))
        .route("/v1/ledger/trial-balance", get(trial_balance))
        .route("/v1/ledger/events", get(ledger_events));
    if state.dev_clock.is_some() {
        router = router
            .route("/v1/dev/clock", post(dev_clock).get(dev_clock_now))
            .route("/dev/checkout/{topup_id}", get(dev_checkout_page))
            .route("/dev/checkout/{topup_id}/pay", post(dev_checkout_pay));
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::idempotency::layer))
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::operations::rate_limit))
        .layer(axum::middleware::from_fn(super::operations::request_id))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

/// A JSON object body; malformed JSON is a 400, a body too large a 413, anything else that is not
/// a JSON object a 422, all as problem details.
pub struct Body(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body, ApiError> {
        match Json::<Value>::from_request(request, state).await {
            Ok(Json(Value::Object(map))) => Ok(Body(map)),
            Ok(Json(_)) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-body",
                "The body is not a JSON object",
                "send a JSON object",
            )),
            Err(JsonRejection::JsonSyntaxError(error)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                "Malformed JSON",
                error.body_text(),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                "JSON expected",
                "set Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(error)) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Body too large",
                format!("bodies are at most {BODY_BYTES_MAX} bytes"),
            )),
            Err(error) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                "Malformed request",
                error.body_text(),
            )),
        }
    }
}

impl Body {
    fn string(&self, field: &'static str) -> Result<&str, ApiError> {
        match self.0.get(field) {
            Some(Value::String(text)) => Ok(text),
            Some(_) => Err(ApiError::invalid(field, format!("{field} must be a string"))),
            None => Err(ApiError::invalid(field, format!("{field} is required"))),
        }
    }

    /// An amount written as a JSON string; a JSON number is refused, so no float ever carries money.
    fn amount(&self, field: &'static str, currency: Currency, signed: bool) -> Result<Decimal, ApiError> {
        let text = match self.0.get(field) {
            Some(Value::String(text)) => text,
            Some(Value::Number(_)) => {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} must be a string such as \"25.00\", not a JSON number"),
                ))
            }
            Some(_) => return Err(ApiError::invalid(field, format!("{field} must be a string such as \"25.00\""))),
            None => return Err(ApiError::invalid(field, format!("{field} is required"))),
        };
        let parsed = if signed {
            Money::parse_signed(text, currency)
        } else {
            Money::parse_positive(text, currency)
        };
        parsed
            .map(|money| money.amount)
            .map_err(|error| ApiError::invalid(field, format!("{field}: {error}")))
    }
}

/// Amounts as strings: exact, with at least the currency's minor digits (`25.00`, `0.022603`).
pub fn money_text(amount: Decimal, currency: &str) -> String {
    let digits = Currency::parse(currency).map(|c| c.minor_unit_digits()).unwrap_or(2);
    let mut amount = amount.normalize();
    if amount.scale() < digits {
        amount.rescale(digits);
    }
    amount.to_string()
}

fn parse_account_id(text: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(text).map_err(|_| ApiError::not_found("account"))
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.chars().take(100).collect())
}

/// Waits until the read models have passed the command's writes, so a response reflects them.
async fn read_your_writes(state: &AppState) -> Result<(), ApiError> {
    projections::runner::catch_up_all(&state.pool).await.map_err(ApiError::from)
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "database reachable; the projectors' lag"), (status = 503, description = "database unavailable", body = super::openapi::Problem)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let statuses = projections::queries::status(&state.pool).await?;
    let lag = statuses.iter().map(|status| status.lag).max().unwrap_or(0);
    Ok(Json(json!({"status": "ready", "projector_lag": lag})))
}

#[utoipa::path(get, path = "/v1/plans", responses((status = 200, description = "the plans on sale, with monthly and hourly prices per currency")))]
pub(crate) async fn plans(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let catalog = state
        .flows
        .handler
        .load::<domain::Catalog>(domain::catalog::CATALOG_STREAM)
        .await
        .map_err(|e| ApiError::from(app::flows::FlowError::from(e)))?;
    let now = state.clock.now();
    let plans: Vec<Value> = catalog
        .state
        .plans_at(now)
        .into_iter()
        .map(|(spec, prices)| {
            let prices: Map<String, Value> = prices
                .iter()
                .map(|(currency, monthly)| {
                    let hourly = domain::billing::rate_per_hour(*monthly);
                    (
                        currency.code().to_string(),
                        json!({"monthly": money_text(*monthly, currency.code()), "hourly": money_text(hourly, currency.code())}),
                    )
                })
                .collect();
            json!({"id": spec.id.as_str(), "vcpu": spec.vcpu, "ram_gb": spec.ram_gb, "disk_gb": spec.disk_gb, "prices": prices})
        })
        .collect();
    Ok(Json(json!({"items": plans})))
}

#[utoipa::path(post, path = "/v1/accounts", request_body = super::openapi::OpenAccount, security(("bearer" = [])), responses((status = 201, description = "opened: {id}"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn open_account(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&[Role::Admin])?;
    let name = body.string("name")?;
    let email = body.string("email")?;
    let currency = Currency::parse(body.string("currency")?).map_err(|error| ApiError::invalid("currency", error.to_string()))?;
    let country = Country::parse(body.string("country")?).map_err(|error| ApiError::invalid("country", error.reason))?;
    let metadata = caller.metadata(request_id(&headers), None);
    let account_id = AccountId(metadata.id_for("account"));
    state
        .flows
        .open_account(account_id, name, email, currency, country, &metadata)
        .await?;
    read_your_writes(&state).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": account_id}))))
}

#[derive(Deserialize)]
pub(crate) struct SearchQuery {
    query: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/accounts", params(("query" = Option<String>, Query, description = "part of a name or email"), ("limit" = Option<i64>, Query)), security(("bearer" = [])), responses((status = 200, description = "matching accounts", body = super::openapi::Page), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn search_accounts(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<SearchQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let limit = query.limit.unwrap_or(50).clamp(1, 200);
    let pattern = format!(
        "%{}%",
        query
            .query
            .unwrap_or_default()
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let rows: Vec<projections::balances::BalanceRow> = sqlx::query_as(
        "SELECT * FROM rm.balances WHERE lower(name) LIKE $1 OR lower(email) LIKE $1 ORDER BY lower(name), account_id LIMIT $2",
    )
    .bind(pattern)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({"items": rows.iter().map(account_json).collect::<Vec<_>>()})))
}

fn account_json(row: &projections::balances::BalanceRow) -> Value {
    let runway_hours = (row.hourly_burn > Decimal::ZERO)
        .then(|| domain::billing::runway_hours(row.available, row.hourly_burn))
        .flatten();
    json!({
        "id": row.account_id,
        "name": row.name,
        "email": row.email,
        "currency": row.currency,
        "country": row.country,
        "balance": money_text(row.balance, &row.currency),
        "reserved": money_text(row.reserved, &row.currency),
        "available": money_text(row.available, &row.currency),
        "hourly_burn": money_text(row.hourly_burn, &row.currency),
        "runway_hours": runway_hours.map(|hours| hours.to_string()),
        "low_balance": row.low_balance_warned,
    })
}

#[derive(Deserialize)]
pub(crate) struct AsOfQuery {
    as_of: Option<String>,
}

async fn load_account(state: &AppState, account_id: AccountId) -> Result<projections::balances::BalanceRow, ApiError> {
    sqlx::query_as("SELECT * FROM rm.balances WHERE account_id = $1")
        .bind(account_id.0)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

#[utoipa::path(get, path = "/v1/accounts/{id}", params(("id" = String, Path), ("as_of" = Option<String>, Query, description = "an RFC 3339 instant")), security(("bearer" = [])), responses((status = 200, description = "the account", body = super::openapi::Account), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<AsOfQuery>,
) -> Result<Json<Value>, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_read(account_id)?;
    let row = load_account(&state, account_id).await?;
    let Some(as_of) = query.as_of else {
        return Ok(Json(account_json(&row)));
    };
    let instant = DateTime::parse_from_rfc3339(&as_of)
        .map_err(|_| ApiError::invalid("as_of", format!("{as_of:?} is not an RFC 3339 instant")))?
        .to_utc();
    let figures = projections::queries::balance_as_of(&state.pool, account_id, instant).await?;
    let (balance, reserved, available) = figures.map(|f| (f.balance, f.reserved, f.available)).unwrap_or_default();
    Ok(Json(json!({
        "id": row.account_id,
        "name": row.name,
        "currency": row.currency,
        "country": row.country,
        "as_of": instant,
        "balance": money_text(balance, &row.currency),
        "reserved": money_text(reserved, &row.currency),
        "available": money_text(available, &row.currency),
        "runway_hours": Value::Null,
    })))
}

#[utoipa::path(post, path = "/v1/accounts/{id}/api-keys", params(("id" = String, Path)), request_body = super::openapi::NewKey, security(("bearer" = [])), responses((status = 201, description = "{token}, shown once"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.require_for_account(&[Role::Admin], account_id)?;
    load_account(&state, account_id).await?;
    let role = Role::parse(body.string("role")?).ok_or_else(|| ApiError::invalid("role", "role is one of customer, finance, admin"))?;
    let token = create_key(
        &state.pool,
        role,
        (role == Role::Customer).then_some(account_id),
        &format!("created by {}", caller.role.as_str()),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": token, "role": role.as_str(), "account_id": account_id})),
    ))
}

#[derive(Deserialize)]
pub(crate) struct PageQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

/// Page sizes are bounded.
const PAGE_MAX: i64 = 200;

#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", params(("id" = String, Path), ("cursor" = Option<String>, Query), ("limit" = Option<i64>, Query)), security(("bearer" = [])), responses((status = 200, description = "the statement, oldest first", body = super::openapi::Page), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn transactions(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_read(account_id)?;
    let account = load_account(&state, account_id).await?;
    let after: i64 = match page.cursor.as_deref() {
        None | Some("") => 0,
        Some(cursor) => cursor
            .parse()
            .map_err(|_| ApiError::invalid("cursor", "cursor is the next_cursor of an earlier page"))?,
    };
    let limit = page.limit.unwrap_or(50).clamp(1, PAGE_MAX);
    let rows: Vec<projections::statement::StatementRow> =
        sqlx::query_as("SELECT * FROM rm.statement WHERE account_id = $1 AND position > $2 ORDER BY position LIMIT $3")
            .bind(account_id.0)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&state.pool)
            .await?;
    let more = rows.len() as i64 > limit;
    let items: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|row| {
            json!({
                "id": row.event_id,
                "position": row.position,
                "kind": row.kind,
                "amount": money_text(row.amount, &account.currency),
                "balance_after": money_text(row.balance_after, &account.currency),
                "occurred_at": row.occurred_at,
                "server_id": row.server_id,
                "reference": row.reference,
            })
        })
        .collect();
    let next_cursor = if more {
        items.last().map(|item| item["position"].to_string())
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

fn server_json(row: &projections::servers::ServerRow, now: DateTime<Utc>, currency: &str) -> Value {
    let this_month = domain::YearMonth::of(now).to_string();
    let month_to_date = if row.month.as_deref() == Some(this_month.as_str()) {
        row.month_to_date_net
    } else {
        Decimal::ZERO
    };
    json!({
        "id": row.server_id,
        "account_id": row.account_id,
        "plan_id": row.plan_id,
        "location": row.location,
        "status": row.status,
        "hostname": row.hostname,
        "os_image": row.os_image,
        "month_to_date_net": money_text(month_to_date, currency),
        "next_charge_at": row.next_charge_at,
        "cancellation_mode": row.cancellation_mode,
        "cancellation_effective_at": row.cancellation_effective_at,
        "created_at": row.created_at,
    })
}

#[utoipa::path(get, path = "/v1/accounts/{id}/servers", params(("id" = String, Path)), security(("bearer" = [])), responses((status = 200, description = "the account's servers", body = super::openapi::Page), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn account_servers(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_read(account_id)?;
    let account = load_account(&state, account_id).await?;
    let rows: Vec<projections::servers::ServerRow> =
        sqlx::query_as("SELECT * FROM rm.servers WHERE account_id = $1 ORDER BY created_at, server_id LIMIT 1000")
            .bind(account_id.0)
            .fetch_all(&state.pool)
            .await?;
    let now = state.clock.now();
    Ok(Json(
        json!({"items": rows.iter().map(|row| server_json(row, now, &account.currency)).collect::<Vec<_>>(), "next_cursor": Value::Null}),
    ))
}

#[utoipa::path(get, path = "/v1/servers/{id}", params(("id" = String, Path)), security(("bearer" = [])), responses((status = 200, description = "the server", body = super::openapi::Server), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn get_server(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let server_id = ServerId::parse(&id).map_err(|_| ApiError::not_found("server"))?;
    let row: projections::servers::ServerRow = sqlx::query_as("SELECT * FROM rm.servers WHERE server_id = $1")
        .bind(server_id.0)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    caller
        .may_read(AccountId(row.account_id))
        .map_err(|_| ApiError::not_found("server"))?;
    let account = load_account(&state, AccountId(row.account_id)).await?;
    Ok(Json(server_json(&row, state.clock.now(), &account.currency)))
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/adjustments", params(("id" = String, Path)), request_body = super::openapi::Adjustment, security(("bearer" = [])), responses((status = 201, description = "adjusted"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 402, description = "a debit beyond the available balance", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn adjust(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.require_for_account(&[Role::Admin], account_id)?;
    let account = load_account(&state, account_id).await?;
    let currency = Currency::parse(&account.currency).map_err(ApiError::internal)?;
    let amount = body.amount("amount", currency, true)?;
    let reason = body.string("reason")?;
    let adjustment_id = state
        .flows
        .adjust(account_id, amount, reason, &caller.metadata(request_id(&headers), None))
        .await?;
    read_your_writes(&state).await?;
    let account = load_account(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"adjustment_id": adjustment_id, "account": account_json(&account)})),
    ))
}

#[utoipa::path(get, path = "/v1/admin/projections", security(("bearer" = [])), responses((status = 200, description = "each read model's position, lag, generation and rebuild state"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn projection_status(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin])?;
    Ok(Json(json!({"items": projections::queries::status(&state.pool).await?})))
}

/// Read models being rebuilt by this process (a second rebuild of one would share its side schema).
static REBUILDING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
    std::sync::LazyLock::new(Default::default);

#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", params(("name" = String, Path)), security(("bearer" = [])), responses((status = 202, description = "rebuilding from position 0 beside the live read model; swapped in when caught up (follow it at /v1/admin/projections)"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "no read model of that name", body = super::openapi::Problem), (status = 409, description = "already being rebuilt", body = super::openapi::Problem)))]
pub(crate) async fn rebuild_projection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    Ok((StatusCode::ACCEPTED, Json(json!({"name": key, "status": "rebuilding"}))))
}

#[derive(Deserialize)]
pub(crate) struct VerifyQuery {
    chain_only: Option<bool>,
}

#[utoipa::path(get, path = "/v1/ledger/verify", params(("chain_only" = Option<bool>, Query)), security(("bearer" = [])), responses((status = 200, description = "`{ok, events_checked, head_position, head_hash, first_bad_position?, read_models?}`: the hash chain recomputed, and every read model compared with a replay"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem)))]
pub(crate) async fn verify_ledger(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<VerifyQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Finance])?;
    // One verification at a time in this process (each is a full replay); others wait their turn.
    static VERIFYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = VERIFYING.lock().await;
    let report = ledger::verify::verify_chain(&state.pool, None, |_, _| {}).await?;
    let mut value = serde_json::to_value(&report).map_err(ApiError::internal)?;
    let mut ok = report.ok;
    if report.ok && !query.chain_only.unwrap_or(false) {
        let mut checks = Vec::new();
        for projection in projections::projection::all() {
            let check = projections::verify::verify(&state.pool, projection.as_ref())
                .await
                .map_err(ApiError::internal)?;
            ok &= check.differences.is_empty();
            checks.push(check);
        }
        value["read_models"] = serde_json::to_value(&checks).map_err(ApiError::internal)?;
    }
    value["ok"] = Value::Bool(ok);
    Ok(Json(value))
}

#[utoipa::path(get, path = "/v1/ledger/trial-balance", params(("as_of" = Option<String>, Query)), security(("bearer" = [])), responses((status = 200, description = "journal totals per ledger account", body = super::openapi::TrialBalance), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn trial_balance(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<AsOfQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let as_of = match query.as_of {
        None => None,
        Some(text) => Some(
            DateTime::parse_from_rfc3339(&text)
                .map_err(|_| ApiError::invalid("as_of", format!("{text:?} is not an RFC 3339 instant")))?
                .to_utc(),
        ),
    };
    let books = projections::queries::trial_balance(&state.pool, as_of).await?;
    let currencies: Vec<Value> = books
        .currencies
        .iter()
        .map(|books| {
            let accounts: Vec<Value> = books
                .accounts
                .iter()
                .map(|line| json!({"account": line.account, "debit": money_text(line.debit, &books.currency), "credit": money_text(line.credit, &books.currency)}))
                .collect();
            json!({"currency": books.currency, "accounts": accounts, "total_debit": money_text(books.total_debit, &books.currency), "total_credit": money_text(books.total_credit, &books.currency)})
        })
        .collect();
    Ok(Json(json!({"as_of": books.as_of, "currencies": currencies})))
}

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    after: Option<i64>,
    limit: Option<usize>,
    stream: Option<String>,
}

#[utoipa::path(get, path = "/v1/ledger/events", params(("after" = Option<i64>, Query), ("limit" = Option<usize>, Query), ("stream" = Option<String>, Query)), security(("bearer" = [])), responses((status = 200, description = "the audit stream with hashes", body = super::openapi::Page), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn ledger_events(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let after = query.after.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(100).clamp(1, 1_000);
    let events = match &query.stream {
        Some(stream) => {
            let events: Vec<ledger::RecordedEvent> = sqlx::query_as(
                "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at, occurred_at, prev_hash, hash \
                 FROM events WHERE stream_id = $1 AND position > $2 ORDER BY position LIMIT $3",
            )
            .bind(stream)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&state.pool)
            .await?;
            events
        }
        None => ledger::log::read_after(&state.pool, after, limit).await?,
    };
    let next_cursor = (events.len() == limit).then(|| events.last().map(|event| event.position)).flatten();
    Ok(Json(json!({"items": events, "next_cursor": next_cursor})))
}

async fn dev_clock_now(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"now": state.clock.now()}))
}

#[utoipa::path(post, path = "/v1/dev/clock", request_body = super::openapi::DevClock, responses((status = 200, description = "the new instant, and the due work it ran"), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem), (status = 404, description = "not in dev mode", body = super::openapi::Problem)))]
pub(crate) async fn dev_clock(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let clock = state.dev_clock.as_ref().ok_or_else(|| ApiError::not_found("route"))?;
    let now = match (body.0.get("now"), body.0.get("advance_seconds")) {
        (Some(Value::String(text)), None) => {
            let instant = DateTime::parse_from_rfc3339(text)
                .map_err(|_| ApiError::invalid("now", format!("{text:?} is not an RFC 3339 instant")))?
                .to_utc();
            clock.set(instant).map_err(|error| ApiError::invalid("now", error.to_string()))?
        }
        (None, Some(Value::Number(seconds))) => {
            let seconds = seconds
                .as_i64()
                .filter(|s| (0..=366 * 24 * 3600).contains(s))
                .ok_or_else(|| ApiError::invalid("advance_seconds", "a whole number of seconds from 0 to a year"))?;
            clock
                .advance(chrono::Duration::seconds(seconds))
                .map_err(|error| ApiError::invalid("advance_seconds", error.to_string()))?
        }
        _ => {
            return Err(ApiError::invalid(
                "now",
                "send either {\"now\": RFC 3339} or {\"advance_seconds\": N}",
            ))
        }
    };
    let report = app::workers::run_due(&state.flows, now).await?;
    Ok(Json(json!({"now": now, "due": report})))
}

#[utoipa::path(post, path = "/v1/accounts/{id}/orders", params(("id" = String, Path)), request_body = super::openapi::PlaceOrder, security(("bearer" = [])), responses((status = 202, description = "accepted; provisioning", body = super::openapi::OrderAccepted), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 402, description = "the first hour is not affordable", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem), (status = 429, description = "too many orders", body = super::openapi::Problem)))]
pub(crate) async fn place_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_act_as_owner(account_id)?;
    load_account(&state, account_id).await?;
    let plan_id = domain::PlanId::parse(body.string("plan_id")?).map_err(|error| ApiError::invalid("plan_id", error.reason))?;
    let location = domain::Location::parse(body.string("location")?).map_err(|error| ApiError::invalid("location", error.reason))?;
    let metadata = caller.metadata(request_id(&headers), None);
    let (order_id, server_id) = (domain::OrderId(metadata.id_for("order")), ServerId(metadata.id_for("server")));
    state
        .flows
        .place_order(account_id, plan_id, location, order_id, server_id, &metadata)
        .await?;
    // The outbox provisions it (woken by this append): the deploy saga.
    read_your_writes(&state).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"order_id": order_id, "server_id": server_id, "status": "provisioning"})),
    ))
}

/// The server, if the caller is its account's customer.
async fn owned_server(state: &AppState, caller: &Caller, id: &str) -> Result<projections::servers::ServerRow, ApiError> {
    let server_id = ServerId::parse(id).map_err(|_| ApiError::not_found("server"))?;
    let row: projections::servers::ServerRow = sqlx::query_as("SELECT * FROM rm.servers WHERE server_id = $1")
        .bind(server_id.0)
        .fetch_optional(&state.pool)
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

async fn server_response(state: &AppState, server_id: uuid::Uuid) -> Result<Json<Value>, ApiError> {
    read_your_writes(state).await?;
    let row: projections::servers::ServerRow = sqlx::query_as("SELECT * FROM rm.servers WHERE server_id = $1")
        .bind(server_id)
        .fetch_one(&state.pool)
        .await?;
    let account = load_account(state, AccountId(row.account_id)).await?;
    Ok(Json(server_json(&row, state.clock.now(), &account.currency)))
}

#[utoipa::path(post, path = "/v1/servers/{id}/setup", params(("id" = String, Path)), request_body = super::openapi::Setup, security(("bearer" = [])), responses((status = 200, description = "set up", body = super::openapi::Server), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 409, description = "not in a state that allows it", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn setup_server(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let row = owned_server(&state, &caller, &id).await?;
    let os_image = body.string("os_image")?;
    let hostname = domain::Hostname::parse(body.string("hostname")?).map_err(|error| ApiError::invalid("hostname", error.reason))?;
    state
        .flows
        .setup(
            ServerId(row.server_id),
            os_image,
            hostname,
            &caller.metadata(request_id(&headers), None),
        )
        .await?;
    server_response(&state, row.server_id).await
}

#[utoipa::path(post, path = "/v1/servers/{id}/power", params(("id" = String, Path)), request_body = super::openapi::Power, security(("bearer" = [])), responses((status = 200, description = "done", body = super::openapi::Server), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 409, description = "not in a state that allows it", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn power_server(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let row = owned_server(&state, &caller, &id).await?;
    let action = match body.string("action")? {
        "boot" => domain::server::PowerAction::Boot,
        "shutdown" => domain::server::PowerAction::Shutdown,
        "reboot" => domain::server::PowerAction::Reboot,
        other => {
            return Err(ApiError::invalid(
                "action",
                format!("{other:?} is not one of boot, shutdown, reboot"),
            ))
        }
    };
    state
        .flows
        .power(ServerId(row.server_id), action, &caller.metadata(request_id(&headers), None))
        .await?;
    server_response(&state, row.server_id).await
}

#[utoipa::path(post, path = "/v1/servers/{id}/cancellation", params(("id" = String, Path)), request_body = super::openapi::Cancellation, security(("bearer" = [])), responses((status = 200, description = "cancelled; the unused part of the slot refunded", body = super::openapi::Server), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 409, description = "already cancelled or not cancellable", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn cancel_server(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let row = owned_server(&state, &caller, &id).await?;
    let mode = match body.string("mode")? {
        "grace" => domain::server::CancellationMode::Grace,
        "immediate" => domain::server::CancellationMode::Immediate,
        other => return Err(ApiError::invalid("mode", format!("{other:?} is not one of grace, immediate"))),
    };
    state
        .flows
        .cancel(ServerId(row.server_id), mode, &caller.metadata(request_id(&headers), None))
        .await?;
    server_response(&state, row.server_id).await
}

#[utoipa::path(delete, path = "/v1/servers/{id}/cancellation", params(("id" = String, Path)), security(("bearer" = [])), responses((status = 200, description = "revoked; the slot in progress charged", body = super::openapi::Server), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 409, description = "immediate, due, or not cancelled", body = super::openapi::Problem)))]
pub(crate) async fn revoke_cancellation(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = owned_server(&state, &caller, &id).await?;
    state
        .flows
        .revoke_cancellation(ServerId(row.server_id), &caller.metadata(request_id(&headers), None))
        .await?;
    server_response(&state, row.server_id).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/topups", params(("id" = String, Path)), request_body = super::openapi::AmountRequest, security(("bearer" = [])), responses((status = 201, description = "pending, with its checkout URL", body = super::openapi::TopUp), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem), (status = 429, description = "too many top-ups", body = super::openapi::Problem), (status = 502, description = "Stripe refused the checkout", body = super::openapi::Problem), (status = 503, description = "no card processor configured, or Stripe unavailable", body = super::openapi::Problem)))]
pub(crate) async fn request_topup(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_act_as_owner(account_id)?;
    let account = load_account(&state, account_id).await?;
    let currency = Currency::parse(&account.currency).map_err(ApiError::internal)?;
    let amount = body.amount("amount", currency, false)?;
    if amount > Decimal::from(10_000) {
        return Err(ApiError::invalid("amount", "a top-up is at most 10000"));
    }
    let payments = state.payments.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "payments-unavailable",
            "Payments unavailable",
            "card payments are not configured on this server (STRIPE_SECRET_KEY)",
        )
    })?;
    let amount_minor = Money::new(amount, currency)
        .and_then(|money| money.to_minor_units())
        .map_err(|error| ApiError::invalid("amount", format!("amount: {error}")))?;
    let metadata = caller.metadata(request_id(&headers), None);
    let topup_id = domain::TopUpId(metadata.id_for("topup"));
    let checkout = payments
        .create_checkout(domain::payments::CheckoutRequest {
            topup_id,
            account_id,
            amount_minor,
            currency,
        })
        .await
        .map_err(payment_error)?;
    let (topup_id, checkout_url) = state
        .flows
        .request_topup(account_id, topup_id, amount, checkout.url, &metadata)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"topup_id": topup_id, "checkout_url": checkout_url, "amount": money_text(amount, &account.currency), "status": "pending"}),
        ),
    ))
}

/// The card processor could not open a checkout: 503 when trying again may pass, 502 when it refused.
fn payment_error(error: domain::payments::PaymentError) -> ApiError {
    match error {
        domain::provider::ProviderError::Retryable(reason) => {
            tracing::warn!(%reason, "the card processor is unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "payments-unavailable",
                "Payments unavailable",
                "the card processor did not answer; try again shortly",
            )
        }
        domain::provider::ProviderError::Permanent(reason) => {
            tracing::error!(%reason, "the card processor refused a checkout");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "payment-processor-refused",
                "Payment processor refused",
                reason,
            )
        }
    }
}

#[utoipa::path(post, path = "/v1/webhooks/stripe", responses((status = 200, description = "received (duplicate: already acted on)"), (status = 400, description = "bad signature, stale timestamp or malformed event", body = super::openapi::Problem), (status = 409, description = "the payment is not known yet; deliver again later", body = super::openapi::Problem)))]
pub(crate) async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
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
    if !adapters::stripe::webhook::valid_event_id(&event.id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "Malformed event",
            "the event id is not a Stripe event id",
        ));
    }
    if let Some((created, dispute)) = event.dispute() {
        return dispute_webhook(&state, &headers, &event, created, dispute).await;
    }
    if let Some(refund) = event.refund() {
        return refund_webhook(&state, &headers, &event, refund).await;
    }
    if let Some(refunded) = event.charge_refunded() {
        return charge_refunded_webhook(&state, &headers, &event, refunded).await;
    }
    let paid = match event.paid_checkout() {
        None => None,
        Some(checkout) => {
            let topup_id = domain::TopUpId::parse(&checkout.topup_reference).ok();
            let stated = checkout.stated();
            topup_id.map(|topup_id| (topup_id, checkout.payment_id, stated))
        }
    };
    let (receipt_stream, metadata, receipt) = stripe_receipt(&event, &headers, json!({"acted_on": paid.is_some()}));
    // A failure to read is a 5xx, so Stripe delivers the event again: never swallowed.
    let credited_account = match &paid {
        Some((topup_id, _, _)) => account_of_topup(&state, *topup_id).await?,
        None => None,
    };
    let fresh = state.flows.receive_payment_event(&receipt_stream, receipt, paid, &metadata).await?;
    // A top-up that makes a suspended server affordable resumes it now.
    if let (true, Some(account_id)) = (fresh, credited_account) {
        app::workers::resume_affordable(&state.flows, Some(account_id)).await?;
    }
    read_your_writes(&state).await?;
    Ok(Json(json!({"received": true, "duplicate": !fresh})))
}

async fn dev_topup(state: &AppState, topup_id: &str) -> Result<domain::topup::Requested, ApiError> {
    let topup_id = domain::TopUpId::parse(topup_id).map_err(|_| ApiError::not_found("top-up"))?;
    let topup = load_topup(state, topup_id).await?;
    topup.requested.ok_or_else(|| ApiError::not_found("top-up"))
}

/// The local stand-in for Stripe Checkout: a page with a button that pays.
async fn dev_checkout_page(State(state): State<AppState>, Path(topup_id): Path<String>) -> Result<axum::response::Html<String>, ApiError> {
    let topup = dev_topup(&state, &topup_id).await?;
    let amount = money_text(topup.amount, topup.currency.code());
    Ok(axum::response::Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Checkout</title></head>\
         <body style=\"font-family: sans-serif; max-width: 28rem; margin: 4rem auto\">\
         <h1>Top up your wallet</h1><p>Amount: <strong>{} {}</strong></p>\
         <form method=\"post\" action=\"/dev/checkout/{}/pay\"><button type=\"submit\">Pay {} {}</button></form>\
         <p><small>Dev mode: paying posts a signed <code>checkout.session.completed</code> webhook.</small></p></body></html>",
        topup.currency, amount, topup.topup_id, topup.currency, amount
    )))
}

/// Pays a top-up as Stripe would: posts a signed `checkout.session.completed` to the webhook.
async fn dev_checkout_pay(State(state): State<AppState>, Path(topup_id): Path<String>) -> Result<axum::response::Html<String>, ApiError> {
    let topup = dev_topup(&state, &topup_id).await?;
    let secret = state
        .webhook_secret
        .clone()
        .ok_or_else(|| ApiError::internal("dev mode without a webhook secret"))?;
    let minor = Money::new(topup.amount, topup.currency)
        .and_then(|m| m.to_minor_units())
        .map_err(ApiError::internal)?;
    let session = json!({
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
    Ok(axum::response::Html(format!("<!doctype html><html lang=\"en\"><body style=\"font-family: sans-serif; max-width: 28rem; margin: 4rem auto\"><h1>Paid</h1><p>{} {} was added to your wallet.</p></body></html>", topup.currency, money_text(topup.amount, topup.currency.code()))))
}

async fn invoice_json(state: &AppState, row: &projections::invoices::InvoiceRow) -> Result<Value, ApiError> {
    let notes: Vec<projections::invoices::CreditNoteRow> =
        sqlx::query_as("SELECT * FROM rm.credit_notes WHERE invoice_id = $1 ORDER BY number")
            .bind(row.invoice_id)
            .fetch_all(&state.pool)
            .await?;
    let currency = row.currency.as_str();
    let text = |value: &Value| {
        value
            .as_str()
            .and_then(|t| t.parse::<Decimal>().ok())
            .map(|d| money_text(d, currency))
            .unwrap_or_default()
    };
    let lines: Vec<Value> = row
        .lines
        .0
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|line| json!({"description": line["description"], "server_id": line["server_id"], "hours": line["hours"], "net": text(&line["net"]), "tax": text(&line["tax"])}))
                .collect()
        })
        .unwrap_or_default();
    let taxes: Vec<Value> = row
        .taxes
        .0
        .as_array()
        .map(|taxes| {
            taxes
                .iter()
                .map(|t| json!({"rate": t["rate"], "net": text(&t["net"]), "tax": text(&t["tax"])}))
                .collect()
        })
        .unwrap_or_default();
    let display = &row.display.0;
    let credit_notes: Vec<Value> = notes
        .iter()
        .map(|note| {
            json!({
                "id": note.credit_note_id,
                "number": note.number,
                "charge_id": note.charge_id,
                "reason": note.reason,
                "net": money_text(note.net, currency),
                "tax": money_text(note.tax, currency),
                "total": money_text(note.total, currency),
                "issued_at": note.issued_at,
            })
        })
        .collect();
    Ok(json!({
        "id": row.invoice_id,
        "number": row.number,
        "account_id": row.account_id,
        "period_start": row.period_start,
        "period_end": row.period_end,
        "currency": row.currency,
        "lines": lines,
        "taxes": taxes,
        "net": money_text(row.net, currency),
        "tax": money_text(row.tax, currency),
        "total": money_text(row.total, currency),
        "display": {"net": text(&display["net"]), "tax": text(&display["tax"]), "total": text(&display["total"])},
        "issued_at": row.issued_at,
        "credit_notes": credit_notes,
    }))
}

#[utoipa::path(get, path = "/v1/accounts/{id}/invoices", params(("id" = String, Path)), security(("bearer" = [])), responses((status = 200, description = "issued invoices, newest first", body = super::openapi::Page), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn account_invoices(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account_id = parse_account_id(&id)?;
    caller.may_read(account_id)?;
    load_account(&state, account_id).await?;
    let rows: Vec<projections::invoices::InvoiceRow> =
        sqlx::query_as("SELECT * FROM rm.invoices WHERE account_id = $1 ORDER BY period_start DESC LIMIT 200")
            .bind(account_id.0)
            .fetch_all(&state.pool)
            .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(invoice_json(&state, row).await?);
    }
    Ok(Json(json!({"items": items, "next_cursor": Value::Null})))
}

#[utoipa::path(get, path = "/v1/invoices/{id}", params(("id" = String, Path)), security(("bearer" = [])), responses((status = 200, description = "the invoice; HTML with Accept: text/html", body = super::openapi::Invoice), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem)))]
pub(crate) async fn get_invoice(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let invoice_id = domain::InvoiceId::parse(&id).map_err(|_| ApiError::not_found("invoice"))?;
    let row: projections::invoices::InvoiceRow = sqlx::query_as("SELECT * FROM rm.invoices WHERE invoice_id = $1")
        .bind(invoice_id.0)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    caller
        .may_read(AccountId(row.account_id))
        .map_err(|_| ApiError::not_found("invoice"))?;
    let invoice = invoice_json(&state, &row).await?;
    let wants_html = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if !wants_html {
        return Ok(Json(invoice).into_response());
    }
    let account = load_account(&state, AccountId(row.account_id)).await?;
    Ok(axum::response::Html(invoice_html(&invoice, &account.name)).into_response())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn invoice_html(invoice: &Value, customer: &str) -> String {
    let field = |value: &Value| escape(value.as_str().unwrap_or_default());
    let mut rows = String::new();
    for line in invoice["lines"].as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>",
            field(&line["description"]),
            line["hours"].as_u64().map(|h| h.to_string()).unwrap_or_default(),
            field(&line["net"]),
            field(&line["tax"]),
        ));
    }
    let display = &invoice["display"];
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Invoice {number}</title>\
         <style>body{{font-family:sans-serif;max-width:48rem;margin:3rem auto}}td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd}}.n{{text-align:right}}</style></head>\
         <body><h1>Invoice {number}</h1><p>{customer}<br>Period {start} to {end}<br>All amounts in {currency}</p>\
         <table><thead><tr><th>Description</th><th class=n>Hours</th><th class=n>Net</th><th class=n>Tax</th></tr></thead><tbody>{rows}</tbody></table>\
         <p class=n>Net {net}<br>Tax {tax}<br><strong>Total {total}</strong></p></body></html>",
        number = field(&invoice["number"]),
        customer = escape(customer),
        start = field(&invoice["period_start"]),
        end = field(&invoice["period_end"]),
        currency = field(&invoice["currency"]),
        net = field(&display["net"]),
        tax = field(&display["tax"]),
        total = field(&display["total"]),
    )
}

/// A service credit against a charge, to the wallet (never more than the charge's gross in total).
#[utoipa::path(post, path = "/v1/admin/charges/{id}/refunds", params(("id" = String, Path)), request_body = super::openapi::Adjustment, security(("bearer" = [])), responses((status = 201, description = "credited to the wallet"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "a role that may not do this", body = super::openapi::Problem), (status = 404, description = "unknown, or another account's", body = super::openapi::Problem), (status = 422, description = "an invalid field, named in `field`", body = super::openapi::Problem)))]
pub(crate) async fn credit_charge(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&[Role::Admin])?;
    let charge_id = domain::ChargeId::parse(&id).map_err(|_| ApiError::not_found("charge"))?;
    let owner: Option<(uuid::Uuid,)> = sqlx::query_as("SELECT account_id FROM rm.statement WHERE kind = 'charge' AND reference = $1")
        .bind(charge_id.to_string())
        .fetch_optional(&state.pool)
        .await?;
    let account_id = AccountId(owner.ok_or_else(|| ApiError::not_found("charge"))?.0);
    let account = load_account(&state, account_id).await?;
    let currency = Currency::parse(&account.currency).map_err(ApiError::internal)?;
    let amount = body.amount("amount", currency, false)?;
    let reason = body.string("reason")?;
    let refund_id = state
        .flows
        .service_credit(account_id, charge_id, amount, reason, &caller.metadata(request_id(&headers), None))
        .await?;
    read_your_writes(&state).await?;
    let account = load_account(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"refund_id": refund_id, "charge_id": charge_id, "amount": money_text(amount, &account.currency), "account": account_json(&account)}),
        ),
    ))
}

/// The account's servers the read model shows as billable (each is checked again by its own
/// aggregate before anything is done to it).
async fn billable_servers(state: &AppState, account_id: AccountId) -> Result<Vec<ServerId>, ApiError> {
    let servers: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT server_id FROM rm.servers WHERE account_id = $1 AND status IN ('needs_setup', 'running', 'stopped') ORDER BY server_id",
    )
    .bind(account_id.0)
    .fetch_all(&state.pool)
    .await?;
    Ok(servers.into_iter().map(|(id,)| ServerId(id)).collect())
}

/// A top-up as its stream in the log has it (an unknown one is empty); a failure to read is an error.
async fn load_topup(state: &AppState, topup_id: domain::TopUpId) -> Result<domain::topup::TopUp, ApiError> {
    let topup = state
        .flows
        .handler
        .load::<domain::topup::TopUp>(&topup_id.stream_id())
        .await
        .map_err(|error| ApiError::from(app::flows::FlowError::from(error)))?;
    Ok(topup.state)
}

/// The account a top-up is for, if it is known. A failure to read is an error (a 5xx, so the
/// processor delivers its event again), never taken for an unknown top-up.
async fn account_of_topup(state: &AppState, topup_id: domain::TopUpId) -> Result<Option<AccountId>, ApiError> {
    let topup = load_topup(state, topup_id).await?;
    Ok(topup.requested.map(|requested| requested.account_id))
}

/// The top-up whose payment `payment_id` is held for review, from the log.
async fn held_topup_of_payment(state: &AppState, payment_id: &str) -> Result<Option<domain::TopUpId>, ApiError> {
    let stream: Option<String> = sqlx::query_scalar(
        "SELECT stream_id FROM events WHERE event_type = 'PaymentHeldForReview' AND payload->>'payment_id' = $1 LIMIT 1",
    )
    .bind(payment_id)
    .fetch_optional(&state.pool)
    .await?;
    Ok(stream.and_then(|stream| domain::TopUpId::parse(stream.strip_prefix("topup-")?).ok()))
}

/// The account and top-up paid by `payment_id`, from the log.
async fn topup_of_payment(state: &AppState, payment_id: &str) -> Result<Option<(AccountId, domain::TopUpId)>, ApiError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT stream_id, payload->>'topup_id' FROM events WHERE event_type = 'TopUpSettled' AND payload->>'payment_id' = $1 LIMIT 1",
    )
    .bind(payment_id)
    .fetch_optional(&state.pool)
    .await?;
    Ok(row.and_then(|(stream, topup)| {
        let account_id = stream.strip_prefix("account-").and_then(|id| AccountId::parse(id).ok())?;
        Some((account_id, domain::TopUpId::parse(&topup).ok()?))
    }))
}

/// `charge.refunded`: Stripe's total refunded for a top-up's payment. Refunds this ledger asked
/// for are known already (their `refund.updated` settles them); any excess was refunded from
/// Stripe's dashboard and is recorded as a completed card refund. An unknown payment is a 409, so
/// Stripe delivers it again once its top-up is known.
async fn charge_refunded_webhook(
    state: &AppState,
    headers: &HeaderMap,
    event: &adapters::stripe::webhook::Event,
    refunded: adapters::stripe::webhook::ChargeRefundedFacts,
) -> Result<Json<Value>, ApiError> {
    let (receipt_stream, metadata, receipt) = stripe_receipt(event, headers, json!({"payment_id": refunded.payment_id}));
    let (Some(payment_id), Some(minor)) = (refunded.payment_id.as_deref(), refunded.amount_refunded_minor) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-event",
            "Malformed event",
            "a charge.refunded event needs the charge's payment_intent and amount_refunded",
        ));
    };
    let Some((account_id, topup_id)) = topup_of_payment(state, payment_id).await? else {
        // A payment held for review (nothing credited) refunded at Stripe: recorded, so it can no
        // longer be accepted; nothing moves.
        if let Some(topup_id) = held_topup_of_payment(state, payment_id).await? {
            let fresh = state
                .flows
                .receive_held_payment_returned(&receipt_stream, receipt, topup_id, payment_id, &metadata)
                .await?;
            return Ok(Json(json!({"received": true, "duplicate": !fresh})));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "unknown-payment",
            "Unknown payment",
            format!("no top-up was paid by {payment_id} yet; deliver again later"),
        ));
    };
    let account = load_account(state, account_id).await?;
    let currency = Currency::parse(&account.currency).map_err(ApiError::internal)?;
    if let Some(code) = &refunded.currency {
        if !code.eq_ignore_ascii_case(currency.code()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed-event",
                "Malformed event",
                format!("the charge is in {code}, the account in {}", currency.code()),
            ));
        }
    }
    let total = Money::from_minor_units(minor, currency);
    let servers = billable_servers(state, account_id).await?;
    let fresh = state
        .flows
        .receive_charge_refunded_event(&receipt_stream, receipt, account_id, topup_id, total.amount, &servers, &metadata)
        .await?;
    read_your_writes(state).await?;
    Ok(Json(json!({"received": true, "duplicate": !fresh})))
}

async fn dispute_webhook(
    state: &AppState,
    headers: &HeaderMap,
    event: &adapters::stripe::webhook::Event,
    closed: bool,
    dispute: adapters::stripe::webhook::DisputeFacts,
) -> Result<Json<Value>, ApiError> {
    let (receipt_stream, metadata, receipt) = stripe_receipt(event, headers, json!({"dispute": dispute.dispute_reference}));
    let paid = match &dispute.payment_id {
        Some(payment_id) => topup_of_payment(state, payment_id).await?,
        None => None,
    };
    let (Some((account_id, topup_id)), Some(payment_id)) = (paid, dispute.payment_id.clone()) else {
        if dispute.payment_id.is_some() {
            // Its payment is not settled here yet (events arrive out of order): refuse, so
            // Stripe delivers it again later, and nothing is lost.
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "payment-unknown",
                "Payment not known yet",
                "the disputed payment is not known yet; deliver the event again later",
            ));
        }
        tracing::error!(event = %event.id, dispute = %dispute.dispute_reference, "a dispute without a payment intent cannot be matched to an account; recorded for review");
        let fresh = state.flows.receive_payment_event(&receipt_stream, receipt, None, &metadata).await?;
        return Ok(Json(json!({"received": true, "duplicate": !fresh, "matched": false})));
    };
    let currency = Currency::parse(&dispute.currency)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Malformed event", error.to_string()))?;
    let topup = load_topup(state, topup_id).await?;
    let requested = topup
        .requested
        .ok_or_else(|| ApiError::internal("a paid top-up without its request"))?;
    let (withdrawn_minor, reinstated_minor) = dispute.totals_minor(&event.kind);
    // Amounts are in the disputed charge's currency. Presented in another one (Adaptive Pricing),
    // the whole charge is disputed as a rule: its top-up's amount, in the account's currency.
    let in_account_currency = |minor: i64| {
        if currency == requested.currency {
            Money::from_minor_units(minor, currency).amount
        } else if minor > 0 {
            requested.amount
        } else {
            Decimal::ZERO
        }
    };
    let dispute_id = domain::DisputeId(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("stripe:{}", dispute.dispute_reference).as_bytes(),
    ));
    let servers = billable_servers(state, account_id).await?;
    let report = domain::AccountCommand::SyncDispute {
        dispute_id,
        payment_id,
        withdrawn_total: in_account_currency(withdrawn_minor),
        reinstated_total: in_account_currency(reinstated_minor),
        closed: closed.then_some(dispute.status == "won"),
    };
    // Settled, the servers suspended for disputes come back in the same append (each checked by
    // its own aggregate), unless another dispute still holds funds.
    let suspended: Vec<ServerId> = if closed {
        let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(
            "SELECT server_id FROM rm.servers WHERE account_id = $1 AND status = 'suspended' AND state->'suspended'->>0 = 'dispute'",
        )
        .bind(account_id.0)
        .fetch_all(&state.pool)
        .await?;
        rows.into_iter().map(|(id,)| ServerId(id)).collect()
    } else {
        Vec::new()
    };
    let fresh = state
        .flows
        .receive_dispute_event(&receipt_stream, receipt, account_id, report, &servers, &suspended, &metadata)
        .await?;
    read_your_writes(state).await?;
    Ok(Json(json!({"received": true, "duplicate": !fresh})))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text: requests, latency, ledger head, projector lag, active servers")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
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
    let billable: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.servers WHERE status IN ('needs_setup', 'running', 'stopped')")
        .fetch_one(&state.pool)
        .await?;
    extra.push_str(&format!("# TYPE billing_active_servers gauge\nbilling_active_servers {billable}\n"));
    let overdue = app::outbox::overdue(&state.pool).await?;
    extra.push_str(&format!("# TYPE billing_outbox_overdue gauge\nbilling_outbox_overdue {overdue}\n"));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::operations::METRICS.render(&extra),
    ))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(super::openapi::ApiDoc::openapi())
}

/// A payment held for review (another currency or amount than asked) accepted by an admin for an
/// amount in the account's currency, at most the amount asked: the wallet is credited that.
#[utoipa::path(post, path = "/v1/admin/topups/{id}/resolution", params(("id" = String, Path)), request_body = super::openapi::Adjustment, security(("bearer" = [])),
    responses((status = 201, description = "accepted: the top-up is paid and the wallet credited"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "not an admin", body = super::openapi::Problem), (status = 404, description = "no such top-up", body = super::openapi::Problem), (status = 409, description = "no payment of the top-up is held for review", body = super::openapi::Problem), (status = 422, description = "an invalid field (an amount above the one asked)", body = super::openapi::Problem)))]
pub(crate) async fn resolve_held_payment(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&[Role::Admin])?;
    let topup_id = domain::TopUpId::parse(&id).map_err(|_| ApiError::not_found("top-up"))?;
    let requested = load_topup(&state, topup_id)
        .await?
        .requested
        .ok_or_else(|| ApiError::not_found("top-up"))?;
    let amount = body.amount("amount", requested.currency, false)?;
    let reason = body.string("reason")?;
    let account_id = state
        .flows
        .accept_held_payment(topup_id, amount, reason, &caller.metadata(request_id(&headers), None))
        .await?;
    app::workers::resume_affordable(&state.flows, Some(account_id)).await?;
    read_your_writes(&state).await?;
    let account = load_account(&state, account_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"topup_id": topup_id, "amount": money_text(amount, &account.currency), "status": "paid", "account": account_json(&account)}),
        ),
    ))
}

/// A card refund of a paid top-up: the wallet is debited now (at most the top-up less earlier
/// refunds, and at most what is available); Stripe's `refund.updated` completes it or gives the
/// money back.
#[utoipa::path(post, path = "/v1/admin/topups/{id}/refunds", params(("id" = String, Path)), request_body = super::openapi::Adjustment, security(("bearer" = [])),
    responses((status = 201, description = "requested; the wallet is debited until Stripe answers"), (status = 401, description = "no or bad token", body = super::openapi::Problem), (status = 403, description = "not an admin", body = super::openapi::Problem), (status = 404, description = "no such top-up", body = super::openapi::Problem), (status = 402, description = "more than is available", body = super::openapi::Problem), (status = 409, description = "the top-up is not paid", body = super::openapi::Problem), (status = 422, description = "an invalid field", body = super::openapi::Problem), (status = 503, description = "no card processor configured (STRIPE_SECRET_KEY)", body = super::openapi::Problem)))]
pub(crate) async fn refund_topup(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&[Role::Admin])?;
    let topup_id = domain::TopUpId::parse(&id).map_err(|_| ApiError::not_found("top-up"))?;
    let topup = load_topup(&state, topup_id).await?;
    let requested = topup.requested.clone().ok_or_else(|| ApiError::not_found("top-up"))?;
    if topup.paid_by.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-paid",
            "Not paid",
            "the top-up has not been paid; there is nothing to refund",
        ));
    }
    let amount = body.amount("amount", requested.currency, false)?;
    Money::new(amount, requested.currency)
        .and_then(|money| money.to_minor_units())
        .map_err(|error| ApiError::invalid("amount", format!("amount: {error}")))?;
    let reason = body.string("reason")?;
    if state.payments.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "refunds-unavailable",
            "Card refunds unavailable",
            "card refunds are not configured on this server (STRIPE_SECRET_KEY)",
        ));
    }
    let refund_id = state
        .flows
        .request_card_refund(
            requested.account_id,
            topup_id,
            amount,
            reason,
            &caller.metadata(request_id(&headers), None),
        )
        .await?;
    read_your_writes(&state).await?;
    let account = load_account(&state, requested.account_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"refund_id": refund_id, "topup_id": topup_id, "amount": money_text(amount, &account.currency), "status": "requested", "account": account_json(&account)}),
        ),
    ))
}

async fn refund_webhook(
    state: &AppState,
    headers: &HeaderMap,
    event: &adapters::stripe::webhook::Event,
    refund: adapters::stripe::webhook::RefundFacts,
) -> Result<Json<Value>, ApiError> {
    let (receipt_stream, metadata, receipt) = stripe_receipt(event, headers, json!({"refund_status": refund.status}));
    let settled = match refund.status.as_str() {
        "succeeded" => Some(true),
        "failed" | "canceled" => Some(false),
        _ => None,
    };
    let refund_id = refund
        .refund_reference
        .as_deref()
        .and_then(|text| domain::RefundId::parse(text).ok());
    let topup_id = refund.topup_reference.as_deref().and_then(|text| domain::TopUpId::parse(text).ok());
    let account_id = match topup_id {
        Some(topup_id) => account_of_topup(state, topup_id).await?,
        None => None,
    };
    let (Some(settled), Some(refund_id), Some(account_id)) = (settled, refund_id, account_id) else {
        // A pending refund, or one this ledger did not start: recorded, nothing moves.
        let fresh = state.flows.receive_payment_event(&receipt_stream, receipt, None, &metadata).await?;
        return Ok(Json(json!({"received": true, "duplicate": !fresh, "acted_on": false})));
    };
    let fresh = state
        .flows
        .receive_refund_event(&receipt_stream, receipt, account_id, refund_id, settled, &metadata)
        .await?;
    read_your_writes(state).await?;
    Ok(Json(json!({"received": true, "duplicate": !fresh})))
}

/// A Stripe event's receipt: the stream it opens (once per event id), the metadata of what it
/// causes, and its payload (`detail`'s fields beside the event's own).
fn stripe_receipt(event: &adapters::stripe::webhook::Event, headers: &HeaderMap, detail: Value) -> (String, app::handler::Metadata, Value) {
    let metadata = app::handler::Metadata {
        actor_kind: "stripe".into(),
        actor_id: event.id.clone(),
        request_id: request_id(headers),
        ..Default::default()
    };
    let mut receipt = json!({"provider": "stripe", "event_id": event.id, "event_type": event.kind, "livemode": event.livemode});
    if let (Value::Object(receipt), Value::Object(detail)) = (&mut receipt, detail) {
        receipt.extend(detail);
    }
    (format!("stripe-event-{}", event.id), metadata, receipt)
}
