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

use super::auth::{unavailable, Visitor};
use super::layout::{figure, money, page, status_page};
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(search))
        .route("/console/accounts/{id}", get(account_page))
}

/// Finance or admin; anyone else finds nothing here.
fn staff(visitor: Visitor) -> Result<Session, Response> {
    let session = visitor.signed_in()?;
    match session.role {
        Role::Finance | Role::Admin => Ok(session),
        Role::Customer => Err(status_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page here.",
            Some(&session),
        )),
    }
}

#[derive(Deserialize)]
struct SearchForm {
    #[serde(default)]
    query: String,
}

async fn search(State(state): State<AppState>, visitor: Visitor, Query(form): Query<SearchForm>) -> Response {
    let session = match staff(visitor) {
        Ok(session) => session,
        Err(response) => return response,
    };
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
                            td class="n" { (money(account.balance, &account.currency)) }
                            td class="n" { (money(account.available, &account.currency)) }
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

async fn account_page(State(state): State<AppState>, visitor: Visitor, Path(id): Path<String>, Query(as_of): Query<AsOf>) -> Response {
    let session = match staff(visitor) {
        Ok(session) => session,
        Err(response) => return response,
    };
    let not_found = || status_page(StatusCode::NOT_FOUND, "Not found", "There is no such account.", Some(&session));
    let Ok(account_id) = AccountId::parse(&id) else {
        return not_found();
    };
    let account = match app::reads::account(&state.pool, account_id).await {
        Ok(Some(account)) => account,
        Ok(None) => return not_found(),
        Err(error) => return unavailable(error),
    };
    let instant = match as_of.as_of.as_deref().filter(|text| !text.is_empty()) {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(instant) => Some(instant.to_utc()),
            Err(_) => {
                return status_page(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Not an instant",
                    "Give the instant as RFC 3339, such as 2026-03-31T23:59:59Z.",
                    Some(&session),
                )
            }
        },
    };
    let currency = account.currency.clone();
    let (balance, reserved, available) = match instant {
        None => (account.balance, account.reserved, account.available),
        Some(instant) => match projections::queries::balance_as_of(&state.pool, account_id, instant).await {
            Ok(figures) => figures.map(|f| (f.balance, f.reserved, f.available)).unwrap_or_default(),
            Err(error) => return unavailable(error),
        },
    };
    let body = html! {
        p class="muted" { (account.email) " · " (account.country) " · " (currency) }
        form method="get" action={ "/console/accounts/" (account.account_id) } {
            label { "As of (RFC 3339)" input type="text" name="as_of" placeholder="2026-03-31T23:59:59Z" value=(as_of.as_of.clone().unwrap_or_default()); }
            button type="submit" { "Show" }
        }
        @if let Some(instant) = instant { p { "Figures as of " (instant.to_rfc3339()) } }
        section class="figures" aria-label="Wallet" {
            (figure("Balance", &money(balance, &currency)))
            (figure("Reserved", &money(reserved, &currency)))
            (figure("Available", &money(available, &currency)))
        }
    };
    page(&account.name, Some(&session), body).into_response()
}
