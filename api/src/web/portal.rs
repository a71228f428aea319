//! The customer portal: the dashboard of one account (its figures, its servers) and a server's
//! page. A customer sees their own account only; anything else is a 404.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::ServerId;
use maud::html;
use rust_decimal::Decimal;

use app::people::Session;

use super::auth::{unavailable, Customer};
use super::layout::{api_money, derived_money, figure, money, page, status_page};
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(home)).route("/servers/{id}", get(server_page))
}

fn not_found(session: &Session) -> Response {
    status_page(StatusCode::NOT_FOUND, "Not found", "There is no such page here.", Some(session))
}

async fn home(State(state): State<AppState>, Customer { session, account_id }: Customer) -> Response {
    let account = match app::reads::account(&state.pool, account_id).await {
        Ok(Some(account)) => account,
        Ok(None) => return not_found(&session),
        Err(error) => return unavailable(error),
    };
    let servers = match app::reads::servers_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX).await {
        Ok(Some(page)) => page,
        Ok(None) => return not_found(&session),
        Err(error) => return unavailable(error),
    };
    let now = state.clock.now();
    let currency = account.currency.as_str();
    let views: Vec<_> = servers
        .items
        .into_iter()
        .map(|row| crate::http::servers::view(row, now, currency))
        .collect();
    let month_to_date: Decimal = views
        .iter()
        .map(|server| server.month_to_date_net.0.parse::<Decimal>().unwrap_or_default())
        .sum();
    let today = now.date_naive();
    let days = match app::reads::balance_by_day(&state.pool, account_id, today, 30).await {
        Ok(days) => days,
        Err(error) => return unavailable(error),
    };
    let balance_chart = balance_chart(&days, currency);
    let spend: Vec<(String, Decimal, String, String)> = views
        .iter()
        .filter_map(|server| {
            let spent: Decimal = server.month_to_date_net.0.parse().ok()?;
            (spent > Decimal::ZERO).then(|| {
                let name = super::actions::server_name(server.hostname.as_deref(), server.id);
                (name, spent, money(spent, currency), format!("/v1/servers/{}", server.id))
            })
        })
        .collect();
    let runway = (account.hourly_burn > Decimal::ZERO)
        .then(|| domain::billing::runway_hours(account.available, account.hourly_burn))
        .flatten();
    let body = html! {
        @if account.low_balance_warned {
            p class="banner" role="status" { "Your balance is running low: top up to keep your servers running." }
        }
        section class="figures" aria-label="Wallet" aria-live="polite" data-live="/live" {
            (live_figure("Balance", "balance", &money(account.balance, currency), &account_id))
            (live_figure("Reserved", "reserved", &money(account.reserved, currency), &account_id))
            (live_figure("Available", "available", &money(account.available, currency), &account_id))
            (figure("Runway", &runway.map(|hours| format!("{hours} h")).unwrap_or_else(|| "nothing billed".into())))
            (figure("This month (net)", derived_money(month_to_date, currency, "the sum of the servers' month_to_date_net")))
        }
        div class="charts" {
            (balance_chart)
            @if spend.is_empty() {
                figure class="chart" { figcaption { "This month's spend per server" } p class="muted" { "Nothing spent this month yet." } }
            } @else {
                (super::charts::bars(
                    "This month's spend per server (net)",
                    &format!("This month's net spend per server: {}", spend.iter().map(|(name, _, written, _)| format!("{name} {written}")).collect::<Vec<_>>().join(", ")),
                    &spend,
                ))
            }
        }
        h2 { "Servers" }
        div data-servers=(views.len()) {}
        @if views.is_empty() {
            p class="muted" { "No servers yet." }
        } @else {
            div class="table" {
                table {
                    thead { tr { th { "Server" } th { "Status" } th { "Plan" } th { "Location" } th class="n" { "This month" } } }
                    tbody {
                        @for server in &views {
                            tr {
                                td { a href={ "/servers/" (server.id) } { (server.hostname.clone().unwrap_or_else(|| server.id.to_string()[..8].to_string())) } }
                                td data-server=(server.id) { (badge(server)) }
                                td { (server.plan_id) }
                                td { (server.location) }
                                td class="n" { (api_money(server.month_to_date_net.0.parse().unwrap_or_default(), currency, &format!("/v1/servers/{}", server.id), "/month_to_date_net")) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&account.name, Some(&session), body).into_response()
}

/// The balance at the end of each of the last 30 days.
fn balance_chart(days: &[(chrono::NaiveDate, Decimal)], currency: &str) -> maud::Markup {
    let points: Vec<(String, Decimal)> = days
        .iter()
        .map(|(day, balance)| (day.format("%b %-d").to_string(), *balance))
        .collect();
    let low = days.iter().map(|(_, balance)| *balance).min().unwrap_or_default();
    let high = days.iter().map(|(_, balance)| *balance).max().unwrap_or_default();
    let last = days.last().map(|(_, balance)| *balance).unwrap_or_default();
    let alternative = format!(
        "Balance at the end of each of the last {} days: lowest {}, highest {}, {} at the end of today so far.",
        days.len(),
        money(low, currency),
        money(high, currency),
        money(last, currency)
    );
    super::charts::line("Balance, last 30 days", &alternative, &points)
}

/// A figure the live stream updates: the account's `name` as the API has it.
fn live_figure(label: &str, name: &str, value: &str, account_id: &domain::AccountId) -> maud::Markup {
    html! {
        div class="figure" {
            div class="label" { (label) }
            div class="value" data-figure=(name) data-api={ "/v1/accounts/" (account_id) } data-field={ "/" (name) } { (value) }
        }
    }
}

fn status_text(server: &crate::http::types::Server) -> String {
    server.status.0.as_str().to_string()
}

fn badge(server: &crate::http::types::Server) -> maud::Markup {
    let status = status_text(server);
    let label = match (status.as_str(), server.suspension_reason.as_deref()) {
        ("suspended", Some("dispute")) => "SUSPENDED (DISPUTE)".to_string(),
        ("suspended", Some("non_payment")) => "SUSPENDED (UNPAID)".to_string(),
        (other, _) => other.replace('_', " ").to_uppercase(),
    };
    html! { span class={ "badge " (status) } { (label) } }
}

async fn server_page(State(state): State<AppState>, Customer { session, account_id }: Customer, Path(id): Path<String>) -> Response {
    let Ok(server_id) = ServerId::parse(&id) else {
        return not_found(&session);
    };
    let row = match app::reads::server(&state.pool, server_id).await {
        Ok(Some(row)) if row.account_id == account_id.0 => row,
        Ok(_) => return not_found(&session),
        Err(error) => return unavailable(error),
    };
    let account = match app::reads::account(&state.pool, account_id).await {
        Ok(Some(account)) => account,
        Ok(None) => return not_found(&session),
        Err(error) => return unavailable(error),
    };
    let currency = account.currency.clone();
    let now = state.clock.now();
    let server = crate::http::servers::view(row, now, &currency);
    // A cancellation gives back the unused part of the current hour's charge, to the second.
    let refund = match app::reads::latest_charge_of_server(&state.pool, account_id, server_id).await {
        Ok(charge) => charge
            .filter(|charge| domain::HourSlot::containing(charge.occurred_at) == domain::HourSlot::containing(now))
            .map(|charge| {
                let unused = domain::HourSlot::containing(now).seconds_after(now);
                derived_money(
                    domain::billing::pro_rata(-charge.amount, unused),
                    &currency,
                    "the unused part of this hour's charge",
                )
            }),
        Err(error) => return unavailable(error),
    };
    let body = html! {
        p data-server=(server.id) { (badge(&server)) }
        section class="figures" aria-label="Server" {
            (figure("Plan", &server.plan_id))
            (figure("Location", &server.location))
            (figure("Operating system", server.os_image.as_deref().unwrap_or("not set up yet")))
            (figure("This month (net)", api_money(server.month_to_date_net.0.parse().unwrap_or_default(), &currency, &format!("/v1/servers/{}", server.id), "/month_to_date_net")))
            (figure("Next charge", &server.next_charge_at.map(|at| at.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_else(|| "none".into())))
        }
        (super::actions::server_actions(&session, &server, &status_text(&server), refund))
        @if let (Some(mode), Some(at)) = (server.cancellation_mode, server.cancellation_effective_at) {
            p class="banner" {
                "Cancelled ("
                (serde_json::to_value(mode).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
                "): deleted at " (at.format("%Y-%m-%d %H:%M UTC"))
            }
        }
    };
    let title = server
        .hostname
        .clone()
        .unwrap_or_else(|| format!("Server {}", &server.id.to_string()[..8]));
    page(&title, Some(&session), body).into_response()
}
