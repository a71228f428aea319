//! Live pages: the account's own changes reach its open pages over Server-Sent Events (figures in
//! place, a page whose server changed status reloaded, a new invoice announced). The
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

/// What the pages show of the account, as sent: figures, each server's status, the latest invoice.

/// Keeps a customer's open page current (on every page of the portal): figures replaced in place,
/// a reload when a server shown on the page changed status (its row or page shows more than the
/// status), and a notice with a link when a new invoice is issued.
pub const SCRIPT: &str = r#"
(function () {
  if (!window.EventSource) return;
  var source = new EventSource("/live");
  var invoice = null;
  source.addEventListener("account", function (message) {
    var now = JSON.parse(message.data);
    ["balance", "reserved", "available"].forEach(function (name) {
      var cell = document.querySelector('[data-figure="' + name + '"]');
      if (cell) cell.textContent = now[name];
    });
    var changed = now.servers.some(function (server) {
      var cell = document.querySelector('[data-server="' + server.id + '"] .badge');
      return cell && !cell.classList.contains(server.status);
    });
    var listed = document.querySelector('[data-servers]');
    if (listed && String(now.servers.length) !== listed.getAttribute('data-servers')) changed = true;
    if (changed) { window.location.reload(); return; }
    var latest = now.invoice ? now.invoice.id : "";
    if (invoice !== null && latest && latest !== invoice) {
      var notice = document.getElementById("live-notice");
      if (notice) {
        notice.textContent = "Invoice " + now.invoice.number + " has been issued. ";
        var link = document.createElement("a");
        link.href = "/invoices/" + latest;
        link.textContent = "Open it";
        notice.appendChild(link);
        notice.hidden = false;
      }
    }
    invoice = latest;
  });
})();
"#;
async fn snapshot(state: &AppState, account_id: AccountId) -> Option<serde_json::Value> {
    projections::runner::catch_up_all(&state.pool).await.ok()?;
    let account = app::reads::account(&state.pool, account_id).await.ok()??;
    let servers = app::reads::servers_of_account(&state.pool, account_id, None, app::reads::PAGE_MAX)
        .await
        .ok()??;
    let latest_invoice = app::reads::invoices_of_account(&state.pool, account_id, None, 1)
        .await
        .ok()
        .flatten()
        .and_then(|page| page.items.into_iter().next())
        .map(|invoice| json!({"id": invoice.invoice_id, "number": invoice.number}));
    let currency = account.currency.as_str();
    Some(json!({
        "invoice": latest_invoice,
        "balance": money(account.balance, currency),
        "reserved": money(account.reserved, currency),
        "available": money(account.available, currency),
        "servers": servers.items.iter().map(|row| json!({"id": row.server_id, "status": row.status})).collect::<Vec<_>>(),
    }))
}

async fn live(State(state): State<AppState>, headers: axum::http::HeaderMap, visitor: Visitor) -> Response {
    let (Some(account_id), Some(cookie)) = (
        visitor.0.and_then(|session| session.account_id),
        super::auth::cookie(&state, &headers, super::SESSION_COOKIE).map(str::to_string),
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
                    // Checked without marking the session used: an open tab alone does not keep
                    // it alive past its idle timeout.
                    match app::people::session_is_open(&state.pool, &cookie, state.sessions, chrono::Utc::now()).await {
                        Ok(true) => {}
                        Ok(false) => return None,
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
