//! Live pages: the account's own changes reach the open dashboard over Server-Sent Events. The
//! stream wakes on every append to the log (this process's or, through NOTIFY, another's), reads
//! the account's figures and servers from the read models once they have passed it, and sends
//! them when they changed; a quiet stream is kept open by comments.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::AccountId;
use futures::stream::{self, Stream};
use serde_json::json;

use super::auth::Visitor;
use super::layout::money;
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/live", get(live))
}

/// What the dashboard shows of the account, as sent: figures and each server's status.
async fn snapshot(state: &AppState, account_id: AccountId) -> Option<serde_json::Value> {
    projections::runner::catch_up_all(&state.pool).await.ok()?;
    let account = app::reads::account(&state.pool, account_id).await.ok()??;
    let servers = app::reads::servers_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX)
        .await
        .ok()??;
    let currency = account.currency.as_str();
    Some(json!({
        "balance": money(account.balance, currency),
        "reserved": money(account.reserved, currency),
        "available": money(account.available, currency),
        "servers": servers.items.iter().map(|row| json!({"id": row.server_id, "status": row.status})).collect::<Vec<_>>(),
    }))
}

async fn live(State(state): State<AppState>, headers: axum::http::HeaderMap, visitor: Visitor) -> Response {
    let (Some(account_id), Some(cookie)) = (
        visitor.0.and_then(|session| session.account_id),
        super::auth::cookie(&headers, super::SESSION_COOKIE).map(str::to_string),
    ) else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    let head = state.flows.handler.log().head_watch();
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> = Box::pin(stream::unfold(
        (state, head, None::<serde_json::Value>),
        move |(state, mut head, last)| {
            let cookie = cookie.clone();
            async move {
                let mut first = last.is_none();
                loop {
                    // At once for the first figures; then woken by an append, or every few seconds to
                    // notice what another process wrote.
                    if !first {
                        let _ = tokio::time::timeout(Duration::from_secs(5), head.changed()).await;
                    }
                    first = false;
                    // The stream lasts only as long as its session: signed out, reset, idle or old,
                    // it ends.
                    match app::people::session(&state.pool, &cookie, state.sessions, chrono::Utc::now()).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return None,
                        Err(_) => continue,
                    }
                    let Some(now) = snapshot(&state, account_id).await else {
                        continue;
                    };
                    if last.as_ref() != Some(&now) {
                        let event = Event::default().event("account").data(now.to_string());
                        return Some((Ok(event), (state, head, Some(now))));
                    }
                }
            }
        },
    ));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
