//! The page shell (dark first, readable down to a 375 px phone, usable by keyboard) and the
//! pieces every page shares.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use app::people::Session;

const STYLESHEET: &str = include_str!("app.css");
/// htmx 2.0.8 (Zero-Clause BSD; `vendor/README.md`).
const HTMX: &str = include_str!("vendor/htmx.min.js");

pub async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLESHEET,
    )
}

pub async fn htmx() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        HTMX,
    )
}

/// A whole page: `title`, the navigation for `session` (none before sign-in), and `body`.
pub fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="dark light";
                title { (title) " · Billing" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/htmx-2.0.8.min.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header class="bar" {
                    a class="brand" href="/" { "Billing" }
                    @if let Some(session) = session {
                        nav aria-label="Main" {
                            @match session.role {
                                app::people::Role::Customer => {
                                    a href="/" { "Dashboard" }
                                    a href="/orders/new" { "Order" }
                                    a href="/topup" { "Top up" }
                                    a href="/transactions" { "Transactions" }
                                    a href="/invoices" { "Invoices" }
                                }
                                role => {
                                    a href="/console" { "Accounts" }
                                    a href="/console/trial-balance" { "Trial balance" }
                                    a href="/console/audit" { "Audit" }
                                    @if role == app::people::Role::Admin {
                                        a href="/console/people" { "People" }
                                        a href="/console/keys" { "API keys" }
                                        a href="/console/projections" { "Read models" }
                                    }
                                }
                            }
                        }
                        form class="signout" method="post" action="/signout" {
                            (csrf_field(&session.csrf_token))
                            span class="who" { (session.email) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    @if session.is_some_and(|session| session.role == app::people::Role::Customer) {
                        p id="live-notice" class="banner" role="status" hidden {}
                    }
                    (body)
                }
                @if session.is_some_and(|session| session.role == app::people::Role::Customer) {
                    script { (maud::PreEscaped(super::live::SCRIPT)) }
                }
            }
        }
    }
}

/// The hidden field every form of a session carries.
pub fn csrf_field(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// A page with a status: 403, 404 and the like, as HTML.
pub fn status_page(status: StatusCode, title: &str, detail: &str, session: Option<&Session>) -> Response {
    (
        status,
        page(title, session, html! { p { (detail) } p { a href="/" { "Back to the start" } } }),
    )
        .into_response()
}

/// A labelled figure.
pub fn figure(label: &str, value: impl maud::Render) -> Markup {
    html! {
        div class="figure" {
            div class="label" { (label) }
            div class="value" { (value) }
        }
    }
}

/// A money figure that is the API's figure `field` (a JSON pointer) of the object at `source` (an
/// API path): marked so that a test can read both and compare them.
pub fn api_money(amount: rust_decimal::Decimal, currency: &str, source: &str, field: &str) -> Markup {
    html! { span data-api=(source) data-field=(field) { (money(amount, currency)) } }
}

/// A money figure the API has no object for (a sum, a price, an effect before it is made), marked
/// with how it is reached.
pub fn derived_money(amount: rust_decimal::Decimal, currency: &str, how: &str) -> Markup {
    html! { span data-derived=(how) { (money(amount, currency)) } }
}

/// The API path of a statement row: the page of one movement after the position before it.
pub fn transaction_source(account_id: impl std::fmt::Display, position: i64) -> String {
    format!("/v1/accounts/{account_id}/transactions?cursor={}&limit=1", position - 1)
}

/// An amount with its currency, as the API writes it (exact, at least the currency's minor digits).
pub fn money(amount: rust_decimal::Decimal, currency: &str) -> String {
    format!("{} {currency}", crate::http::types::Money::of(amount, currency).0)
}
