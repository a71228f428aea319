//! Accounts: opening, search, balances (now or as of an instant), API keys and the statement.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use domain::{AccountId, Money as DomainMoney};

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::extract::{page_size, path_id, Json, Query};
use super::types::{
    Account, AccountPage, ApiKey, AsOfQuery, Created, Money, NewKey, OpenAccount, SearchQuery, StatementQuery, Transaction, TransactionPage,
};
use super::{read_your_writes, AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts", post(open_account).get(search_accounts))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/accounts/{id}/api-keys", post(create_api_key))
        .route("/v1/accounts/{id}/transactions", get(transactions))
}

/// The account as the balances read model has it; unknown is a 404.
pub async fn load(state: &AppState, account_id: AccountId) -> Result<std::sync::Arc<projections::balances::BalanceRow>, ApiError> {
    state
        .cache
        .account(&state.pool, account_id)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

/// The account's id in a path, readable by the caller.
pub fn readable(caller: &Caller, id: &str) -> Result<AccountId, ApiError> {
    let account_id = path_id(AccountId::parse(id), "account")?;
    caller.may_read(account_id)?;
    Ok(account_id)
}

/// Opens an account; its currency is fixed from now on.
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = OpenAccount, security(("bearer" = [])),
    responses((status = 201, description = "opened", body = Created)))]
pub(crate) async fn open_account(State(state): State<AppState>, caller: Caller, Json(body): Json<OpenAccount>) -> Reply<Created> {
    caller.require(&[Role::Admin])?;
    let metadata = caller.metadata();
    let account_id = AccountId(metadata.id_for("account"));
    let country = domain::Country::parse(&body.country.0).map_err(|error| ApiError::invalid("country", error.reason))?;
    state
        .flows
        .open_account(account_id, &body.name.0, &body.email.0, body.currency.0, country, &metadata)
        .await?;
    read_your_writes(&state).await?;
    Ok((StatusCode::CREATED, axum::Json(Created { id: account_id.0 })))
}

/// Accounts whose name or email contains the query, in id order.
#[utoipa::path(get, path = "/v1/accounts", tag = "accounts", params(SearchQuery), security(("bearer" = [])),
    responses((status = 200, description = "matching accounts", body = AccountPage)))]
pub(crate) async fn search_accounts(State(state): State<AppState>, caller: Caller, Query(query): Query<SearchQuery>) -> Reply<AccountPage> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let limit = page_size(query.limit, 50, app::reads::PAGE_MAX)?;
    let page = app::reads::search_accounts(
        &state.pool,
        query.query.as_ref().map(|text| text.0.as_str()).unwrap_or_default(),
        query.cursor.map(AccountId),
        limit,
    )
    .await?;
    Ok((StatusCode::OK, axum::Json(AccountPage::of(page, |row| Account::of(&row)))))
}

/// Balance, reserved, available and runway; with `as_of`, the figures at that instant.
#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "accounts", params(("id" = Uuid, Path), AsOfQuery), security(("bearer" = [])),
    responses((status = 200, description = "the account", body = Account)))]
pub(crate) async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<AsOfQuery>,
) -> Reply<Account> {
    let account_id = readable(&caller, &id)?;
    let row = load(&state, account_id).await?;
    let mut account = Account::of(&row);
    if let Some(instant) = query.as_of {
        let figures = projections::queries::balance_as_of(&state.pool, account_id, instant).await?;
        let (balance, reserved, available) = figures.map(|f| (f.balance, f.reserved, f.available)).unwrap_or_default();
        account.balance = Money::of(balance, &row.currency);
        account.reserved = Money::of(reserved, &row.currency);
        account.available = Money::of(available, &row.currency);
        account.hourly_burn = None;
        account.runway_hours = None;
        account.low_balance = None;
        account.as_of = Some(instant);
    }
    Ok((StatusCode::OK, axum::Json(account)))
}

/// A new API key for the account (a customer key acts for it); the token is shown once.
#[utoipa::path(post, path = "/v1/accounts/{id}/api-keys", tag = "accounts", params(("id" = Uuid, Path)), request_body = NewKey, security(("bearer" = [])),
    responses((status = 201, description = "created; the token is shown once", body = ApiKey)))]
pub(crate) async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewKey>,
) -> Reply<ApiKey> {
    let account_id = path_id(AccountId::parse(&id), "account")?;
    caller.require_for_account(&[Role::Admin], account_id)?;
    load(&state, account_id).await?;
    let role = body.role.0;
    let (key_id, token) = app::keys::create(
        &state.pool,
        role,
        (role == Role::Customer).then_some(account_id),
        &format!("created by {}", caller.role.as_str()),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ApiKey {
            id: key_id,
            token,
            role: crate::http::types::Role(role),
            account_id: account_id.0,
        }),
    ))
}

/// Every money movement of the account with the balance after it, oldest first.
#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", tag = "accounts", params(("id" = Uuid, Path), StatementQuery), security(("bearer" = [])),
    responses((status = 200, description = "the statement, oldest first", body = TransactionPage)))]
pub(crate) async fn transactions(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(page): Query<StatementQuery>,
) -> Reply<TransactionPage> {
    let account_id = readable(&caller, &id)?;
    let account = load(&state, account_id).await?;
    let after = match &page.cursor {
        None => 0,
        Some(cursor) => cursor
            .0
            .parse()
            .map_err(|_| ApiError::invalid("cursor", "cursor is the next_cursor of an earlier page"))?,
    };
    let limit = page_size(page.limit, 50, app::reads::PAGE_MAX)?;
    let rows = app::reads::statement(&state.pool, account_id, after, limit, &Default::default()).await?;
    let currency = &account.currency;
    Ok((
        StatusCode::OK,
        axum::Json(TransactionPage::of(rows, |row| Transaction {
            id: row.event_id,
            position: row.position,
            kind: row.kind,
            amount: Money::of(row.amount, currency),
            balance_after: Money::of(row.balance_after, currency),
            occurred_at: row.occurred_at,
            server_id: row.server_id,
            reference: row.reference,
        })),
    ))
}

/// The account's currency, as the domain has it.
pub fn currency_of(row: &projections::balances::BalanceRow) -> Result<domain::Currency, ApiError> {
    domain::Currency::parse(&row.currency).map_err(ApiError::internal)
}

/// An amount in the account's currency, exact (checked against the ledger's precision).
pub fn money_in(amount: rust_decimal::Decimal, currency: domain::Currency) -> Result<DomainMoney, ApiError> {
    DomainMoney::new(amount, currency).map_err(|error| ApiError::invalid("amount", format!("amount: {error}")))
}
