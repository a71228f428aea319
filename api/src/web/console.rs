//! The finance and admin console: account search and an account's figures, now or as of an
//! instant. Customers are not let in (404).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::AccountId;
use maud::html;
use serde::Deserialize;

use app::people::{Role, Session};

use super::auth::{unavailable, Staff};
use super::layout::{api_money, figure, money, page, status_page, transaction_source};
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(search))
        .route("/console/accounts/{id}", get(account_page))
        .route("/console/accounts/{id}/statement", get(statement_page))
        .route("/console/invoices/{id}", get(invoice_page))
        .route("/console/invoices/{id}/pdf", get(invoice_pdf))
        .route("/console/events/{position}", get(event_page))
        .route("/console/trial-balance", get(trial_balance))
        .route("/console/verify", get(verify_segment))
}

#[derive(Deserialize)]
struct SearchForm {
    #[serde(default)]
    query: String,
}

async fn search(State(state): State<AppState>, Staff(session): Staff, Query(form): Query<SearchForm>) -> Response {
    let query: String = form.query.chars().take(200).collect();
    let accounts = match app::reads::search_accounts(&state.pool, &query, None, 50).await {
        Ok(page) => page.items,
        Err(error) => return unavailable(error),
    };
    let body = html! {
        form method="get" action="/console" role="search" {
            label { "Find an account by name or email" input type="search" name="query" value=(query); }
            button type="submit" { "Search" }
        }
        div class="table" {
            table {
                thead { tr { th { "Account" } th { "Email" } th { "Currency" } th class="n" { "Balance" } th class="n" { "Available" } } }
                tbody {
                    @for account in &accounts {
                        tr {
                            td { a href={ "/console/accounts/" (account.account_id) } { (account.name) } }
                            td { (account.email) }
                            td { (account.currency) }
                            td class="n" { (api_money(account.balance, &account.currency, &format!("/v1/accounts/{}", account.account_id), "/balance")) }
                            td class="n" { (api_money(account.available, &account.currency, &format!("/v1/accounts/{}", account.account_id), "/available")) }
                        }
                    }
                }
            }
        }
    };
    page("Accounts", Some(&session), body).into_response()
}

#[derive(Deserialize)]
struct AsOf {
    as_of: Option<String>,
}

impl AsOf {
    /// The instant asked for (none when the field is empty), or a page saying how to write one.
    fn instant(&self, session: &Session) -> Result<Option<chrono::DateTime<chrono::Utc>>, Response> {
        match self.as_of.as_deref().filter(|text| !text.is_empty()) {
            None => Ok(None),
            Some(text) => chrono::DateTime::parse_from_rfc3339(text)
                .map(|instant| Some(instant.to_utc()))
                .map_err(|_| {
                    status_page(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Not an instant",
                        "Give the instant as RFC 3339, such as 2026-03-31T23:59:59Z.",
                        Some(session),
                    )
                }),
        }
    }
}

/// A correction form filled in from a statement row: a service credit of a charge, a card refund
/// of a top-up.
#[derive(Deserialize, Default)]
struct Prefill {
    kind: Option<String>,
    target: Option<String>,
}

async fn account_page(
    State(state): State<AppState>,
    Staff(session): Staff,
    Path(id): Path<String>,
    Query(as_of): Query<AsOf>,
    Query(prefill): Query<Prefill>,
) -> Response {
    let (account_id, account) = match super::actions::account_named(&state, &session, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let instant = match as_of.instant(&session) {
        Ok(instant) => instant,
        Err(response) => return response,
    };
    let currency = account.currency.clone();
    let admin = session.role == Role::Admin;
    let chosen = prefill.kind.clone().unwrap_or_else(|| "adjustment".into());
    let statement = match app::reads::statement_latest(&state.pool, account_id, 20).await {
        Ok(rows) => rows,
        Err(error) => return unavailable(error),
    };
    let servers = match app::reads::servers_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX).await {
        Ok(page) => page.map(|page| page.items).unwrap_or_default(),
        Err(error) => return unavailable(error),
    };
    let now = state.clock.now();
    let servers: Vec<crate::http::types::Server> = servers
        .into_iter()
        .map(|row| crate::http::servers::view(row, now, &currency))
        .collect();
    let invoices = match app::reads::invoices_of_account(&state.pool, account_id, None, 24).await {
        Ok(page) => page.map(|page| page.items).unwrap_or_default(),
        Err(error) => return unavailable(error),
    };
    let (balance, reserved, available) = match instant {
        None => (account.balance, account.reserved, account.available),
        Some(instant) => match projections::queries::balance_as_of(&state.pool, account_id, instant).await {
            Ok(figures) => figures.map(|f| (f.balance, f.reserved, f.available)).unwrap_or_default(),
            Err(error) => return unavailable(error),
        },
    };
    // The API's account, as of the same instant.
    let source = match instant {
        None => format!("/v1/accounts/{account_id}"),
        Some(instant) => format!(
            "/v1/accounts/{account_id}?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("as_of", &instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                .finish()
        ),
    };
    let body = html! {
        p class="muted" { (account.email) " · " (account.country) " · " (currency) }
        form method="get" action={ "/console/accounts/" (account.account_id) } {
            label { "As of (RFC 3339)" input type="text" name="as_of" placeholder="2026-03-31T23:59:59Z" value=(as_of.as_of.clone().unwrap_or_default()); }
            button type="submit" { "Show" }
        }
        @if let Some(instant) = instant { p { "Figures as of " (instant.to_rfc3339()) } }
        section class="figures" aria-label="Wallet" {
            (figure("Balance", api_money(balance, &currency, &source, "/balance")))
            (figure("Reserved", api_money(reserved, &currency, &source, "/reserved")))
            (figure("Available", api_money(available, &currency, &source, "/available")))
        }
        h2 { "Servers" }
        @if servers.is_empty() { p class="muted" { "None." } }
        @else { div class="table" { table {
            thead { tr { th { "Server" } th { "Status" } th { "Plan" } th { "Location" } th class="n" { "This month (net)" } } }
            tbody { @for server in &servers { tr {
                td { code { (super::actions::server_name(server.hostname.as_deref(), server.id)) } }
                td { (server.status.0.as_str().replace('_', " ")) @if let Some(reason) = &server.suspension_reason { " (" (reason.replace('_', " ")) ")" } }
                td { (server.plan_id) }
                td { (server.location) }
                td class="n" { (api_money(server.month_to_date_net.0.parse().unwrap_or_default(), &currency, &format!("/v1/servers/{}", server.id), "/month_to_date_net")) }
            } } }
        } } }
        h2 { "Latest movements" }
        p { a href={ "/console/accounts/" (account.account_id) "/statement" } { "The whole statement, oldest first" } }
        div class="table" { table {
            thead { tr {
                th { "Position" } th { "When (UTC)" } th { "What" } th class="n" { "Amount" } th class="n" { "Balance after" }
                @if admin { th { "Correct" } }
            } }
            tbody { @for row in &statement { tr {
                td { a href={ "/console/events/" (row.position) } { (row.position) } }
                td { (row.occurred_at.format("%Y-%m-%d %H:%M")) }
                td { (row.kind.replace('_', " ")) }
                td class="n" { (api_money(row.amount, &currency, &transaction_source(account_id, row.position), "/items/0/amount")) }
                td class="n" { (api_money(row.balance_after, &currency, &transaction_source(account_id, row.position), "/items/0/balance_after")) }
                @if admin { td {
                    @match (row.kind.as_str(), &row.reference) {
                        ("charge", Some(reference)) => a href={ "?kind=service_credit&target=" (reference) "#correct" } { "Service credit" },
                        ("topup", Some(reference)) => a href={ "?kind=card_refund&target=" (reference) "#correct" } { "Card refund" },
                        _ => {},
                    }
                } }
            } } }
        } }
        h2 { "Invoices" }
        @if invoices.is_empty() { p class="muted" { "None yet." } }
        ul { @for invoice in &invoices { li {
            a href={ "/console/invoices/" (invoice.invoice_id) } { (invoice.number) }
            " · " (invoice.period_start.format("%Y-%m")) " · " (api_money(invoice.total, &currency, &format!("/v1/invoices/{}", invoice.invoice_id), "/total"))
        } } }
        @if admin {
            h2 id="correct" { "Correct the wallet" }
            p class="muted" { "An adjustment credits or debits the wallet; a service credit gives back (part of) a charge; a card refund returns (part of) a top-up to the card. Each is shown with its effect before it is made." }
            form class="card" method="post" action={ "/console/accounts/" (account.account_id) "/corrections" } {
                (super::actions::guard_fields(&session))
                label { "Kind" select name="kind" {
                    option value="adjustment" selected[chosen == "adjustment"] { "adjustment" }
                    option value="service_credit" selected[chosen == "service_credit"] { "service credit (of a charge)" }
                    option value="card_refund" selected[chosen == "card_refund"] { "card refund (of a top-up)" }
                } }
                label { "Charge or top-up (its id; not for adjustments)" input type="text" name="target" value=(prefill.target.clone().unwrap_or_default()); }
                label { "Amount (" (currency) "; an adjustment is negative for a debit)" input type="text" name="amount" required placeholder="-5.00"; }
                label { "Reason (kept in the ledger; a service credit's is printed on its credit note)" input type="text" name="reason" required maxlength="500"; }
                button type="submit" { "Review" }
            }
        }
    };
    page(&account.name, Some(&session), body).into_response()
}

/// An invoice explained: each line, and the charges behind it down to their events.
async fn invoice_page(State(state): State<AppState>, Staff(session): Staff, Path(id): Path<String>) -> Response {
    let not_found = || status_page(StatusCode::NOT_FOUND, "Not found", "There is no such invoice.", Some(&session));
    let Ok(invoice_id) = domain::InvoiceId::parse(&id) else {
        return not_found();
    };
    let row = match app::reads::invoice(&state.pool, invoice_id).await {
        Ok(Some(row)) => row,
        Ok(None) => return not_found(),
        Err(error) => return unavailable(error),
    };
    let charges: Vec<String> = row
        .charge_ids
        .0
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().map(str::to_string))
        .collect();
    let rows = match app::reads::statement_rows_of(&state.pool, AccountId(row.account_id), &charges).await {
        Ok(rows) => rows,
        Err(error) => return unavailable(error),
    };
    let currency = row.currency.clone();
    let source = format!("/v1/invoices/{}", row.invoice_id);
    let lines = row.lines.0.as_array().cloned().unwrap_or_default();
    let body = html! {
        p {
            "Period " (row.period_start.format("%Y-%m")) " · total " (api_money(row.total, &currency, &source, "/total"))
            " (net " (api_money(row.net, &currency, &source, "/net")) ", tax " (api_money(row.tax, &currency, &source, "/tax")) ")"
        }
        p {
            a href={ "/console/invoices/" (row.invoice_id) "/pdf" } { "Download the PDF" }
            @if let (Some(first), Some(last)) = (rows.iter().map(|charge| charge.position).min(), rows.iter().map(|charge| charge.position).max()) {
                " · " a href={ "/console/verify?from=" (first) "&to=" (last) } { "Verify the chain from #" (first) " to #" (last) }
            }
        }
        @for line in &lines {
            @let server = line["server_id"].as_str().unwrap_or_default();
            h2 { (line["description"].as_str().unwrap_or_default()) }
            p class="muted" { "Net " (line["net"].as_str().unwrap_or_default()) " · tax " (line["tax"].as_str().unwrap_or_default()) }
            @if !server.is_empty() {
                div class="table" { table {
                    thead { tr { th { "Event" } th { "Hour" } th class="n" { "Wallet (gross)" } } }
                    tbody { @for charge in rows.iter().filter(|charge| charge.server_id.map(|id| id.to_string()).as_deref() == Some(server)) { tr {
                        td { a href={ "/console/events/" (charge.position) } { "#" (charge.position) } }
                        td { (charge.occurred_at.format("%Y-%m-%d %H:%M")) }
                        td class="n" { (api_money(charge.amount, &currency, &transaction_source(row.account_id, charge.position), "/items/0/amount")) }
                    } } }
                } }
            }
        }
    };
    page(&format!("Invoice {}", row.number), Some(&session), body).into_response()
}

#[derive(Deserialize)]
struct After {
    after: Option<i64>,
}

/// An account's whole statement, oldest first, a page at a time; each row opens its event.
async fn statement_page(
    State(state): State<AppState>,
    Staff(session): Staff,
    Path(id): Path<String>,
    Query(after): Query<After>,
) -> Response {
    let (account_id, account) = match super::actions::account_named(&state, &session, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let rows = match app::reads::statement(&state.pool, account_id, after.after.unwrap_or(0).max(0), 100, &Default::default()).await {
        Ok(rows) => rows,
        Err(error) => return unavailable(error),
    };
    let currency = account.currency.clone();
    let body = html! {
        p { a href={ "/console/accounts/" (account_id) } { "Back to " (account.name) } }
        div class="table" { table {
            thead { tr { th { "Position" } th { "When (UTC)" } th { "What" } th { "Reference" } th class="n" { "Amount" } th class="n" { "Balance after" } } }
            tbody { @for row in &rows.items { tr {
                td { a href={ "/console/events/" (row.position) } { (row.position) } }
                td { (row.occurred_at.format("%Y-%m-%d %H:%M")) }
                td { (row.kind.replace('_', " ")) }
                td { code { (row.reference.as_deref().map(|reference| reference.chars().take(8).collect::<String>()).unwrap_or_default()) } }
                td class="n" { (api_money(row.amount, &currency, &transaction_source(account_id, row.position), "/items/0/amount")) }
                td class="n" { (api_money(row.balance_after, &currency, &transaction_source(account_id, row.position), "/items/0/balance_after")) }
            } } }
        } }
        @if let Some(next) = &rows.next_cursor { p { a href={ "/console/accounts/" (account_id) "/statement?after=" (next) } { "Later movements" } } }
    };
    page(&format!("Statement of {}", account.name), Some(&session), body).into_response()
}

#[derive(Deserialize)]
struct Segment {
    from: Option<String>,
    to: Option<String>,
}

/// The hash chain recomputed over a stretch of the log, such as the events behind an invoice.
async fn verify_segment(State(state): State<AppState>, Staff(session): Staff, Query(segment): Query<Segment>) -> Response {
    let position = |text: &Option<String>| text.as_deref().and_then(|text| text.trim().parse::<i64>().ok());
    let (Some(from), Some(to)) = (position(&segment.from), position(&segment.to)) else {
        return status_page(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not a stretch of the log",
            "Give the first and the last position as whole numbers: /console/verify?from=10&to=20.",
            Some(&session),
        );
    };
    let report = match ledger::verify::verify_segment(&state.pool, from, to).await {
        Ok(report) => report,
        Err(error) => return unavailable(error),
    };
    let body = html! {
        p {
            @if report.ok { span class="badge running" { "CHAIN VERIFIED" } }
            @else { span class="badge suspended" { "CHAIN BROKEN" } }
        }
        p { "Positions " (report.from) " to " (report.to) ": " (report.events_checked) " events recomputed, each linked to the hash of the one before." }
        @if report.cut {
            p class="banner" { "The stretch asked for went past the log's head or beyond " (ledger::verify::SEGMENT_MAX) " events: the check stopped at #" (report.to) "." }
        }
        @if let (Some(position), Some(problem)) = (report.first_bad_position, &report.problem) {
            p class="error" { "At " a href={ "/console/events/" (position) } { "#" (position) } ": " (problem) }
        }
        p class="muted" { "A stretch proves itself only; the whole log is proved by " code { "billing verify" } " or GET /v1/ledger/verify." }
    };
    page("Chain verification", Some(&session), body).into_response()
}

async fn invoice_pdf(State(state): State<AppState>, Staff(session): Staff, Path(id): Path<String>) -> Response {
    super::actions::invoice_as(&state, &session, None, &id, super::actions::Format::Pdf).await
}

/// One event as the log holds it, with its hash recomputed from the event before it.
async fn event_page(State(state): State<AppState>, Staff(session): Staff, Path(position): Path<i64>) -> Response {
    let (event, previous) = match app::reads::event_with_previous(&state.pool, position).await {
        Ok(found) => found,
        Err(error) => return unavailable(error),
    };
    let Some(event) = event else {
        return status_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no event at that position.",
            Some(&session),
        );
    };
    let expected_prev = previous.as_ref().map(|previous| previous.hash).unwrap_or([0u8; 32]);
    let links = event.prev_hash == expected_prev;
    let recomputed = event.recompute_hash(&event.prev_hash, &mut Vec::new());
    let holds = recomputed == event.hash;
    let body = html! {
        p { @if links && holds { span class="badge running" { "CHAIN VERIFIED" } } @else { span class="badge suspended" { "CHAIN BROKEN HERE" } } }
        div class="table" { table { tbody {
            tr { th { "Position" } td { (event.position) } }
            tr { th { "Stream" } td { (event.stream_id) " v" (event.stream_version) } }
            tr { th { "Type" } td { (event.event_type) " (schema " (event.schema_version) ")" } }
            tr { th { "Occurred" } td { (event.occurred_at.to_rfc3339()) } }
            tr { th { "Recorded" } td { (event.recorded_at.to_rfc3339()) } }
            tr { th { "Previous hash" } td { code { (hex::encode(event.prev_hash)) } @if !links { " (the event before has another hash)" } } }
            tr { th { "Hash" } td { code { (hex::encode(event.hash)) } @if !holds { " (recomputed: " (hex::encode(recomputed)) ")" } } }
        } } }
        h2 { "Payload" }
        pre { code { (serde_json::to_string_pretty(&event.payload).unwrap_or_default()) } }
        h2 { "Metadata" }
        pre { code { (serde_json::to_string_pretty(&event.metadata).unwrap_or_default()) } }
        p { @if position > 1 { a href={ "/console/events/" (position - 1) } { "Previous event" } " · " } a href={ "/console/events/" (position + 1) } { "Next event" } }
    };
    page(&format!("Event {position}"), Some(&session), body).into_response()
}

/// The trial balance per currency, now or as of an instant.
async fn trial_balance(State(state): State<AppState>, Staff(session): Staff, Query(as_of): Query<AsOf>) -> Response {
    let instant = match as_of.instant(&session) {
        Ok(instant) => instant,
        Err(response) => return response,
    };
    let books = match projections::queries::trial_balance(&state.pool, instant).await {
        Ok(books) => books,
        Err(error) => return unavailable(error),
    };
    let source = match instant {
        None => "/v1/ledger/trial-balance".to_string(),
        Some(instant) => format!(
            "/v1/ledger/trial-balance?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("as_of", &instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                .finish()
        ),
    };
    let last = instant.unwrap_or_else(|| state.clock.now()).date_naive();
    let first = last - chrono::Days::new(29);
    let revenue = match app::reads::revenue_by_day(&state.pool, first, last).await {
        Ok(revenue) => revenue,
        Err(error) => return unavailable(error),
    };
    let charts: Vec<maud::Markup> = books
        .currencies
        .iter()
        .map(|books| {
            let by_day: std::collections::HashMap<chrono::NaiveDate, rust_decimal::Decimal> = revenue
                .iter()
                .filter(|(currency, _, _)| *currency == books.currency)
                .map(|(_, day, amount)| (*day, *amount))
                .collect();
            let points: Vec<(String, rust_decimal::Decimal)> = first
                .iter_days()
                .take(30)
                .map(|day| (day.format("%b %-d").to_string(), by_day.get(&day).copied().unwrap_or_default()))
                .collect();
            let total: rust_decimal::Decimal = points.iter().map(|(_, amount)| *amount).sum();
            let best = points.iter().max_by_key(|(_, amount)| *amount).cloned().unwrap_or_default();
            let alternative = format!(
                "Hosting revenue in {} per day from {first} to {last}: {} in all, the most on {} ({}).",
                books.currency,
                money(total, &books.currency),
                best.0,
                money(best.1, &books.currency)
            );
            super::charts::columns(&format!("Revenue per day, {} (net of tax)", books.currency), &alternative, &points)
        })
        .collect();
    let body = html! {
        form method="get" action="/console/trial-balance" {
            label { "As of (RFC 3339)" input type="text" name="as_of" placeholder="2026-03-31T23:59:59Z" value=(as_of.as_of.clone().unwrap_or_default()); }
            button type="submit" { "Show" }
        }
        div class="charts" { @for chart in &charts { (chart) } }
        @for (i, books) in books.currencies.iter().enumerate() {
            h2 { (books.currency) }
            div class="table" { table {
                thead { tr { th { "Ledger account" } th class="n" { "Debit" } th class="n" { "Credit" } } }
                tbody { @for (j, line) in books.accounts.iter().enumerate() { tr {
                    td { (line.account) }
                    td class="n" { (api_money(line.debit, &books.currency, &source, &format!("/currencies/{i}/accounts/{j}/debit"))) }
                    td class="n" { (api_money(line.credit, &books.currency, &source, &format!("/currencies/{i}/accounts/{j}/credit"))) }
                } } }
                tfoot { tr {
                    th { "Total" }
                    th class="n" { (api_money(books.total_debit, &books.currency, &source, &format!("/currencies/{i}/total_debit"))) }
                    th class="n" { (api_money(books.total_credit, &books.currency, &source, &format!("/currencies/{i}/total_credit"))) }
                } }
            } }
        }
    };
    page("Trial balance", Some(&session), body).into_response()
}
