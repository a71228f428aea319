//! What a customer does from the portal: order a server (the first hour's hold shown before
//! confirming), set it up, power it, cancel it either way or revoke a grace cancellation, top up,
//! and read the statement and the invoices. Every action is the application's own flow, run with
//! an idempotency key from its form, so a form sent twice acts once.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use domain::{AccountId, ServerId};
use maud::{html, Markup};
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::Digest;

use app::flows::ServerRequest;
use app::handler::Metadata;
use app::people::Session;

use super::auth::{check_csrf, unavailable, Customer};
use super::layout::{api_money, csrf_field, derived_money, page, status_page, transaction_source};
use crate::http::error::ApiError;
use crate::http::types::{CancellationMode, PowerAction};
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orders/new", get(order_page))
        .route("/orders", post(order))
        .route("/servers/{id}/setup", post(setup))
        .route("/servers/{id}/power", post(power))
        .route("/servers/{id}/cancellation", post(cancel))
        .route("/servers/{id}/revocation", post(revoke))
        .route("/topup", get(topup_page).post(topup))
        .route("/transactions", get(transactions))
        .route("/transactions.csv", get(transactions_csv))
        .route("/invoices", get(invoices))
        .route("/invoices/{id}", get(invoice))
        .route("/invoices/{id}/pdf", get(invoice_pdf))
}

/// A form's fields every action shares: the session's CSRF token and the form's own nonce.
#[derive(Deserialize)]
struct Guard {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    nonce: String,
}

/// The hidden fields of an action's form.
pub fn guard_fields(session: &Session) -> Markup {
    html! {
        (csrf_field(&session.csrf_token))
        input type="hidden" name="nonce" value=(app::people::random_token());
    }
}

/// Who did it (a customer as their account, staff by email), and the form's nonce with what it
/// asks (`content`) as the idempotency key: a form sent twice acts once, and the same form sent
/// again with other values (after going back) is a new request.
pub fn metadata(session: &Session, nonce: &str, content: &str) -> Metadata {
    let actor = match session.account_id {
        Some(account_id) => account_id.to_string(),
        None => session.email.clone(),
    };
    Metadata {
        idempotency_key: (!nonce.is_empty()).then(|| {
            let asked = hex::encode(&sha2::Sha256::digest(content.as_bytes())[..8]);
            format!("web:{}:{}:{asked}", session.person_id, nonce.chars().take(64).collect::<String>())
        }),
        ..Metadata::actor(session.role.as_str(), actor)
    }
}

/// Orders and top-ups are limited per person as they are per API token.
fn rate_limited(state: &AppState, session: &Session) -> Result<(), Response> {
    state
        .rate_limiter
        .take(&format!("person:{}", session.person_id))
        .map_err(|retry_after| {
            status_page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests",
                &format!("Too many orders or top-ups in a short while; try again in {retry_after} s."),
                Some(session),
            )
        })
}

/// A refusal of the application as a page: its status and its reason.
fn refused(session: &Session, error: impl Into<ApiError>) -> Response {
    let error: ApiError = error.into();
    if error.status.is_server_error() {
        return unavailable(&error.detail);
    }
    let hint = match error.status {
        StatusCode::PAYMENT_REQUIRED => {
            html! { p { "The available balance does not cover it. " a href="/topup" { "Top up" } " and try again." } }
        }
        _ => html! {},
    };
    (
        error.status,
        page(
            error.title,
            Some(session),
            html! { p class="error" role="alert" { (error.detail) } (hint) p { a href="/" { "Back to the dashboard" } } },
        ),
    )
        .into_response()
}

/// The account `id` names (a 404 page when it names none).
pub(super) async fn account_named(
    state: &AppState,
    session: &Session,
    id: &str,
) -> Result<(AccountId, projections::balances::BalanceRow), Response> {
    let Ok(account_id) = AccountId::parse(id) else {
        return Err(status_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such account.",
            Some(session),
        ));
    };
    account_row(state, session, account_id).await.map(|row| (account_id, row))
}

pub(super) async fn account_row(
    state: &AppState,
    session: &Session,
    account_id: AccountId,
) -> Result<projections::balances::BalanceRow, Response> {
    match app::reads::account(&state.pool, account_id).await {
        Ok(Some(row)) => Ok(row),
        Ok(None) => Err(status_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such account.",
            Some(session),
        )),
        Err(error) => Err(unavailable(error)),
    }
}

async fn order_page(State(state): State<AppState>, Customer { session, account_id }: Customer) -> Response {
    let account = match account_row(&state, &session, account_id).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    let catalog = match state.flows.handler.load::<domain::Catalog>(domain::catalog::CATALOG_STREAM).await {
        Ok(catalog) => catalog.state,
        Err(error) => return unavailable(error),
    };
    let (Ok(currency), Ok(country)) = (domain::Currency::parse(&account.currency), domain::Country::parse(&account.country)) else {
        return unavailable("an account with an unknown currency or country");
    };
    let now = state.clock.now();
    let tax_rate = catalog.tax_rate(country, now);
    let locations: Vec<String> = crate::http::types::CATALOG
        .locations
        .iter()
        .map(|l| l.as_str().to_string())
        .collect();
    let body = html! {
        form class="card" method="post" action="/orders" {
            (guard_fields(&session))
            fieldset {
                legend { "Plan (prices exclude tax; the first hour is held when you order)" }
                @for (spec, prices) in catalog.plans_at(now) {
                    @if let Some(monthly) = prices.get(&currency) {
                        @let first_hour = domain::billing::slot_charge(*monthly, Decimal::ZERO, tax_rate);
                        label {
                            span {
                                input type="radio" name="plan_id" value=(spec.id.as_str()) required;
                                " " strong { (spec.id.as_str()) } " · " (spec.vcpu) " vCPU, " (spec.ram_gb) " GB RAM, " (spec.disk_gb) " GB disk"
                            }
                            span class="muted" {
                                (derived_money(domain::billing::rate_per_hour(*monthly), &account.currency, "the catalogue's hourly rate")) " an hour, "
                                (derived_money(*monthly, &account.currency, "the catalogue's monthly price")) " a month at most; first hour held now: "
                                (derived_money(first_hour.gross, &account.currency, "the first hour with tax")) " incl. tax"
                            }
                        }
                    }
                }
            }
            label {
                "Location"
                select name="location" required {
                    @for location in &locations { option value=(location) { (location) } }
                }
            }
            p class="muted" { "Available now: " (api_money(account.available, &account.currency, &format!("/v1/accounts/{}", account.account_id), "/available")) }
            button type="submit" { "Order" }
        }
    };
    page("Order a server", Some(&session), body).into_response()
}

#[derive(Deserialize)]
struct OrderForm {
    #[serde(flatten)]
    guard: Guard,
    plan_id: String,
    location: String,
}

async fn order(State(state): State<AppState>, Customer { session, account_id }: Customer, Form(form): Form<OrderForm>) -> Response {
    if let Err(refused) = check_csrf(&session, &form.guard.csrf) {
        return refused;
    }
    let (Ok(plan_id), Ok(location)) = (domain::PlanId::parse(&form.plan_id), domain::Location::parse(&form.location)) else {
        return refused(
            &session,
            ApiError::invalid("plan_id", "choose a plan and a location from the lists"),
        );
    };
    if let Err(limited) = rate_limited(&state, &session) {
        return limited;
    }
    let metadata = metadata(&session, &form.guard.nonce, &format!("order {} {}", form.plan_id, form.location));
    let (order_id, server_id) = (domain::OrderId(metadata.id_for("order")), ServerId(metadata.id_for("server")));
    if let Err(error) = state
        .flows
        .place_order(account_id, plan_id, location, order_id, server_id, &metadata)
        .await
    {
        return refused(&session, error);
    }
    // The server's page shows it from the read models.
    if let Err(error) = crate::http::caught_up(&state).await {
        return unavailable(error);
    }
    Redirect::to(&format!("/servers/{server_id}")).into_response()
}

/// A server action on the customer's own server, then back to its page.
async fn act(state: &AppState, session: &Session, account_id: AccountId, id: &str, guard: &Guard, request: ServerRequest) -> Response {
    if let Err(refused) = check_csrf(session, &guard.csrf) {
        return refused;
    }
    let not_found = || status_page(StatusCode::NOT_FOUND, "Not found", "There is no such page here.", Some(session));
    let Ok(server_id) = ServerId::parse(id) else {
        return not_found();
    };
    match app::reads::server(&state.pool, server_id).await {
        Ok(Some(row)) if row.account_id == account_id.0 => {}
        Ok(_) => return not_found(),
        Err(error) => return unavailable(error),
    }
    if let Err(error) = state
        .flows
        .act_on_server(
            server_id,
            request.clone(),
            &metadata(session, &guard.nonce, &format!("{server_id} {request:?}")),
        )
        .await
    {
        return refused(session, error);
    }
    if let Err(error) = crate::http::caught_up(&state).await {
        return unavailable(error);
    }
    Redirect::to(&format!("/servers/{server_id}")).into_response()
}

#[derive(Deserialize)]
struct SetupForm {
    #[serde(flatten)]
    guard: Guard,
    os_image: String,
    hostname: String,
}

async fn setup(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Path(id): Path<String>,
    Form(form): Form<SetupForm>,
) -> Response {
    let hostname = match domain::Hostname::parse(form.hostname.trim()) {
        Ok(hostname) => hostname,
        Err(error) => return refused(&session, ApiError::invalid("hostname", error.reason)),
    };
    let request = ServerRequest::Setup {
        os_image: form.os_image.trim().to_string(),
        hostname,
    };
    act(&state, &session, account_id, &id, &form.guard, request).await
}

#[derive(Deserialize)]
struct PowerForm {
    #[serde(flatten)]
    guard: Guard,
    action: PowerAction,
}

async fn power(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Path(id): Path<String>,
    Form(form): Form<PowerForm>,
) -> Response {
    act(
        &state,
        &session,
        account_id,
        &id,
        &form.guard,
        ServerRequest::Power(form.action.into()),
    )
    .await
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(flatten)]
    guard: Guard,
    mode: CancellationMode,
}

async fn cancel(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Path(id): Path<String>,
    Form(form): Form<CancelForm>,
) -> Response {
    act(
        &state,
        &session,
        account_id,
        &id,
        &form.guard,
        ServerRequest::Cancel(form.mode.into()),
    )
    .await
}

async fn revoke(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Path(id): Path<String>,
    Form(guard): Form<Guard>,
) -> Response {
    act(&state, &session, account_id, &id, &guard, ServerRequest::RevokeCancellation).await
}

/// The actions a server's page offers for its status.
/// The forms of a server's page; `refund` is what a cancellation now would give back of the
/// current hour (shown before the customer confirms).
pub fn server_actions(session: &Session, server: &crate::http::types::Server, status: &str, refund: Option<Markup>) -> Markup {
    let id = server.id;
    html! {
        @if status == "needs_setup" {
            h2 { "Set up" }
            form class="card" method="post" action={ "/servers/" (id) "/setup" } {
                (guard_fields(session))
                label { "Operating system" select name="os_image" {
                    @for image in ["debian-12", "ubuntu-24.04", "ubuntu-22.04", "rocky-9", "almalinux-9"] { option value=(image) { (image) } }
                } }
                label { "Host name (letters, digits, hyphens and dots)"
                    input type="text" name="hostname" required maxlength="253"
                        pattern="[A-Za-z0-9]([A-Za-z0-9\\-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9\\-]{0,61}[A-Za-z0-9])?)*";
                }
                button type="submit" { "Install" }
            }
        }
        @if matches!(status, "running" | "stopped" | "needs_setup") {
            @if status != "needs_setup" {
                h2 { "Power" }
                form method="post" action={ "/servers/" (id) "/power" } {
                    (guard_fields(session))
                    @if status == "stopped" { button type="submit" name="action" value="boot" { "Boot" } }
                    @else {
                        button type="submit" name="action" value="shutdown" { "Shut down" } " "
                        button type="submit" name="action" value="reboot" { "Reboot" }
                    }
                }
            }
            h2 { "Cancel" }
            p class="muted" {
                "Billing stops at once and the unused part of the hour you paid is refunded to your wallet, to the second. "
                strong { "Grace" } ": the server is powered off and deleted in 30 days; you can change your mind until then. "
                strong { "Immediate" } ": deleted in 5 minutes; this cannot be undone."
            }
            @if let Some(refund) = refund {
                p { "Cancelled now, either way, about " strong { (refund) } " of this hour comes back to your wallet." }
            }
            form method="post" action={ "/servers/" (id) "/cancellation" } {
                (guard_fields(session))
                button type="submit" name="mode" value="grace" { "Cancel with 30 days' grace" } " "
                button type="submit" name="mode" value="immediate" { "Delete in 5 minutes" }
            }
        }
        @if status == "pending_cancellation" {
            form method="post" action={ "/servers/" (id) "/revocation" } {
                (guard_fields(session))
                p { "Keep this server: it is powered on again and billed from this hour." }
                button type="submit" { "Revoke the cancellation" }
            }
        }
    }
}

async fn topup_page(State(state): State<AppState>, Customer { session, account_id }: Customer) -> Response {
    let account = match account_row(&state, &session, account_id).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    let body = html! {
        form class="card" method="post" action="/topup" {
            (guard_fields(&session))
            label { "Amount (" (account.currency) ")"
                input type="text" inputmode="decimal" name="amount" required pattern="[0-9]{1,5}(\\.[0-9]{1,2})?" placeholder="25.00";
            }
            button type="submit" { "Pay by card" }
            p class="muted" { "You are taken to the card payment page; your balance changes when the payment is confirmed." }
        }
    };
    page("Top up", Some(&session), body).into_response()
}

#[derive(Deserialize)]
struct TopUpForm {
    #[serde(flatten)]
    guard: Guard,
    amount: String,
}

async fn topup(State(state): State<AppState>, Customer { session, account_id }: Customer, Form(form): Form<TopUpForm>) -> Response {
    if let Err(refused) = check_csrf(&session, &form.guard.csrf) {
        return refused;
    }
    let account = match account_row(&state, &session, account_id).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    let Ok(currency) = domain::Currency::parse(&account.currency) else {
        return unavailable("an account with an unknown currency");
    };
    let amount = match domain::Money::parse_positive(form.amount.trim(), currency) {
        Ok(money) if money.amount <= Decimal::from(10_000) => money.amount,
        _ => {
            return refused(
                &session,
                ApiError::invalid("amount", "an amount more than 0 and at most 10000, such as 25.00"),
            )
        }
    };
    if let Err(limited) = rate_limited(&state, &session) {
        return limited;
    }
    let metadata = metadata(&session, &form.guard.nonce, &format!("topup {amount}"));
    match app::payments::start_topup(&state.flows, state.payments.as_deref(), account_id, currency, amount, &metadata).await {
        Ok((_, checkout_url)) => Redirect::to(&checkout_url).into_response(),
        Err(error) => refused(&session, error),
    }
}

#[derive(Deserialize, Default)]
struct StatementPage {
    after: Option<i64>,
    /// One kind of movement only (empty: all).
    kind: Option<String>,
    /// One server's movements only (empty: all).
    server: Option<String>,
    /// The first day shown, `YYYY-MM-DD` (UTC; empty: from the start).
    from: Option<String>,
    /// The last day shown, `YYYY-MM-DD` (UTC; empty: to the end).
    to: Option<String>,
}

fn given(text: &Option<String>) -> Option<&str> {
    text.as_deref().map(str::trim).filter(|text| !text.is_empty())
}

impl StatementPage {
    /// The filter asked for, or what is wrong with it.
    fn filter(&self) -> Result<app::reads::StatementFilter, String> {
        let day = |text: Option<&str>, name: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
            text.map(|text| {
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .ok()
                    .filter(|date| (1970..=9999).contains(&chrono::Datelike::year(date)))
                    .map(|date| date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
                    .ok_or_else(|| format!("the {name} date is written YYYY-MM-DD (1970 to 9999), such as 2026-03-01"))
            })
            .transpose()
        };
        let server_id = given(&self.server)
            .map(|text| ServerId::parse(text).map_err(|_| "that is not one of your servers".to_string()))
            .transpose()?;
        let from = day(given(&self.from), "first")?;
        // The last day is shown whole.
        let to = day(given(&self.to), "last")?.map(|day| day + chrono::Duration::days(1));
        if let (Some(from), Some(to)) = (from, to) {
            if from >= to {
                return Err("the first day comes after the last".into());
            }
        }
        Ok(app::reads::StatementFilter {
            kind: given(&self.kind).map(str::to_string),
            server_id,
            from,
            to,
        })
    }

    /// The filter as a query string (without `after`), for the next page's link and the CSV.
    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("kind", &self.kind),
            ("server", &self.server),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(value) = given(value) {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

async fn transactions(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Query(query): Query<StatementPage>,
) -> Response {
    let account = match account_row(&state, &session, account_id).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    let (filter, problem) = match query.filter() {
        Ok(filter) => (filter, None),
        Err(problem) => (app::reads::StatementFilter::default(), Some(problem)),
    };
    let (rows, kinds, servers) = match tokio::try_join!(
        app::reads::statement(&state.pool, account_id, query.after.unwrap_or(0).max(0), 50, &filter),
        app::reads::statement_kinds(&state.pool, account_id),
        app::reads::servers_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX),
    ) {
        Ok(found) => found,
        Err(error) => return unavailable(error),
    };
    let servers = servers.map(|page| page.items).unwrap_or_default();
    let names: std::collections::HashMap<uuid::Uuid, String> = servers
        .iter()
        .map(|server| (server.server_id, server_name(server.hostname.as_deref(), server.server_id)))
        .collect();
    let chosen_server = filter.server_id.map(|id| id.0);
    let filters = query.query();
    let body = html! {
        @if let Some(problem) = &problem { p class="error" role="alert" { (problem) } }
        // Changing a filter replaces the table in place (htmx); without script the button sends it.
        form class="filters" method="get" action="/transactions" hx-get="/transactions" hx-trigger="change" hx-target="#statement" hx-select="#statement" hx-swap="outerHTML" hx-push-url="true" {
            label { "Kind" select name="kind" {
                option value="" { "all" }
                @for each in &kinds { option value=(each) selected[filter.kind.as_deref() == Some(each.as_str())] { (each.replace('_', " ")) } }
            } }
            label { "Server" select name="server" {
                option value="" { "all" }
                @for server in &servers { option value=(server.server_id) selected[chosen_server == Some(server.server_id)] { (names[&server.server_id]) } }
            } }
            label { "From" input type="date" name="from" value=(given(&query.from).unwrap_or_default()); }
            label { "To" input type="date" name="to" value=(given(&query.to).unwrap_or_default()); }
            button type="submit" { "Show" }
        }
        div id="statement" {
            p { a href={ "/transactions.csv?" (filters) } download { "Download these as CSV" } }
            @if rows.items.is_empty() { p class="muted" { "Nothing matches." } }
            @else { div class="table" { table {
                thead { tr { th { "When (UTC)" } th { "What" } th { "Server" } th class="n" { "Amount" } th class="n" { "Balance after" } } }
                tbody { @for row in &rows.items { tr {
                    td { (row.occurred_at.format("%Y-%m-%d %H:%M")) }
                    td { (row.kind.replace('_', " ")) }
                    td { @if let Some(server) = row.server_id { (names.get(&server).cloned().unwrap_or_else(|| server_name(None, server))) } }
                    td class="n" { (api_money(row.amount, &account.currency, &transaction_source(account_id, row.position), "/items/0/amount")) }
                    td class="n" { (api_money(row.balance_after, &account.currency, &transaction_source(account_id, row.position), "/items/0/balance_after")) }
                } } }
            } } }
            @if let Some(next) = &rows.next_cursor {
                p { a href={ "/transactions?after=" (next) "&" (filters) } hx-get={ "/transactions?after=" (next) "&" (filters) } hx-target="#statement" hx-select="#statement" hx-swap="outerHTML" hx-push-url="true" { "Later entries" } }
            }
        }
    };
    let status = if problem.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, page("Transactions", Some(&session), body)).into_response()
}

/// What a server is called on the portal's pages: its hostname, or the start of its id.
pub(super) fn server_name(hostname: Option<&str>, id: uuid::Uuid) -> String {
    hostname
        .map(str::to_string)
        .unwrap_or_else(|| format!("server {}", &id.to_string()[..8]))
}

/// Rows a CSV download holds at most.
const CSV_ROWS_MAX: usize = 100_000;

/// The statement (of one kind, or all) as CSV, with the API's figures.
async fn transactions_csv(
    State(state): State<AppState>,
    Customer { session, account_id }: Customer,
    Query(query): Query<StatementPage>,
) -> Response {
    let account = match account_row(&state, &session, account_id).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(problem) => return status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not a filter", &problem, Some(&session)),
    };
    let mut csv = csv::Writer::from_writer(Vec::new());
    let header = csv.write_record([
        "position",
        "occurred_at",
        "kind",
        "amount",
        "balance_after",
        "currency",
        "server_id",
        "reference",
    ]);
    if let Err(error) = header {
        return unavailable(error);
    }
    let (mut after, mut written) = (0, 0);
    loop {
        let page = match app::reads::statement(&state.pool, account_id, after, app::reads::PAGE_MAX, &filter).await {
            Ok(page) => page,
            Err(error) => return unavailable(error),
        };
        for row in &page.items {
            let record = [
                row.position.to_string(),
                row.occurred_at.to_rfc3339(),
                row.kind.clone(),
                crate::http::types::Money::of(row.amount, &account.currency).0,
                crate::http::types::Money::of(row.balance_after, &account.currency).0,
                account.currency.clone(),
                row.server_id.map(|id| id.to_string()).unwrap_or_default(),
                row.reference.clone().unwrap_or_default(),
            ];
            if let Err(error) = csv.write_record(&record) {
                return unavailable(error);
            }
            after = row.position;
            written += 1;
        }
        if page.next_cursor.is_none() || written >= CSV_ROWS_MAX {
            break;
        }
    }
    let bytes = match csv.into_inner() {
        Ok(bytes) => bytes,
        Err(error) => return unavailable(error),
    };
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (axum::http::header::CONTENT_DISPOSITION, "attachment; filename=\"transactions.csv\""),
        ],
        bytes,
    )
        .into_response()
}

async fn invoices(State(state): State<AppState>, Customer { session, account_id }: Customer) -> Response {
    let rows = match app::reads::invoices_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX).await {
        Ok(Some(rows)) => rows.items,
        Ok(None) => Vec::new(),
        Err(error) => return unavailable(error),
    };
    let ids: Vec<uuid::Uuid> = rows.iter().map(|row| row.invoice_id).collect();
    let notes = match app::reads::credit_notes(&state.pool, &ids).await {
        Ok(notes) => notes,
        Err(error) => return unavailable(error),
    };
    // Each credit note with its invoice and its place among that invoice's notes (as the API lists them).
    let notes: Vec<(usize, &projections::invoices::CreditNoteRow, &projections::invoices::InvoiceRow)> = notes
        .iter()
        .filter_map(|note| {
            let invoice = rows.iter().find(|row| row.invoice_id == note.invoice_id)?;
            let place = notes
                .iter()
                .filter(|other| other.invoice_id == note.invoice_id)
                .position(|other| other.credit_note_id == note.credit_note_id)?;
            Some((place, note, invoice))
        })
        .collect();
    let body = html! {
        @if rows.is_empty() { p class="muted" { "No invoices yet: one is issued for each month with charges." } }
        @else { div class="table" { table {
            thead { tr { th { "Invoice" } th { "Month" } th class="n" { "Total" } th { "Download" } } }
            tbody { @for row in &rows { tr {
                td { a href={ "/invoices/" (row.invoice_id) } { (row.number) } }
                td { (row.period_start.format("%Y-%m")) }
                td class="n" { (api_money(row.total, &row.currency, &format!("/v1/invoices/{}", row.invoice_id), "/total")) }
                td { a href={ "/invoices/" (row.invoice_id) "/pdf" } aria-label={ "Invoice " (row.number) " as PDF" } { "PDF" } }
            } } }
        } } }
        @if !notes.is_empty() {
            h2 { "Credit notes" }
            div class="table" { table {
                thead { tr { th { "Credit note" } th { "Against invoice" } th { "Issued" } th { "Reason" } th class="n" { "Total" } } }
                tbody { @for (place, note, invoice) in &notes { tr {
                    td { (note.number) }
                    td { a href={ "/invoices/" (invoice.invoice_id) } { (invoice.number) } }
                    td { (note.issued_at.format("%Y-%m-%d")) }
                    td { (note.reason) }
                    td class="n" { (api_money(note.total, &invoice.currency, &format!("/v1/invoices/{}", invoice.invoice_id), &format!("/credit_notes/{place}/total"))) }
                } } }
            } }
        }
    };
    page("Invoices and credit notes", Some(&session), body).into_response()
}

async fn invoice(State(state): State<AppState>, Customer { session, account_id }: Customer, Path(id): Path<String>) -> Response {
    invoice_as(&state, &session, Some(account_id), &id, Format::Html).await
}

async fn invoice_pdf(State(state): State<AppState>, Customer { session, account_id }: Customer, Path(id): Path<String>) -> Response {
    invoice_as(&state, &session, Some(account_id), &id, Format::Pdf).await
}

/// How an invoice is given: the page to print, or a PDF to download.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Html,
    Pdf,
}

/// An invoice of `account` (any account's for staff, `None`) as `format`; anything else is a 404.
pub(super) async fn invoice_as(state: &AppState, session: &Session, account: Option<AccountId>, id: &str, format: Format) -> Response {
    let not_found = || status_page(StatusCode::NOT_FOUND, "Not found", "There is no such invoice.", Some(session));
    let Ok(invoice_id) = domain::InvoiceId::parse(id) else {
        return not_found();
    };
    let row = match app::reads::invoice(&state.pool, invoice_id).await {
        Ok(Some(row)) if account.is_none_or(|account| row.account_id == account.0) => row,
        Ok(_) => return not_found(),
        Err(error) => return unavailable(error),
    };
    let account = match account_row(state, session, AccountId(row.account_id)).await {
        Ok(row) => row,
        Err(response) => return response,
    };
    if format == Format::Html {
        return match crate::http::invoices::printable(state, row, &account.name).await {
            Ok(html) => axum::response::Html(html).into_response(),
            Err(error) => refused(session, error),
        };
    }
    match crate::http::invoices::document(state, row).await {
        Ok(invoice) => (
            [
                (axum::http::header::CONTENT_TYPE, "application/pdf".to_string()),
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"invoice-{}.pdf\"",
                        invoice.number.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
                    ),
                ),
            ],
            super::pdf::invoice(&invoice, &account.name),
        )
            .into_response(),
        Err(error) => refused(session, error),
    }
}
