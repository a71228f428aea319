//! Invoices and their credit notes, as JSON or as an HTML page.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::{AccountId, InvoiceId};
use projections::invoices::{CreditNoteRow, InvoiceRow};
use rust_decimal::Decimal;
use serde_json::Value;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{page_size, path_id, Query};
use super::types::{CreditNote, DisplayFigures, Invoice, InvoiceLine, InvoicePage, InvoicesQuery, Money, TaxLine};
use super::{accounts, AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts/{id}/invoices", get(account_invoices))
        .route("/v1/invoices/{id}", get(get_invoice))
}

/// An invoice with its credit notes, from the read model's rows.
fn view(row: InvoiceRow, notes: &[CreditNoteRow]) -> Invoice {
    let currency = row.currency.clone();
    let money = |value: &Value| {
        Money::of(
            value.as_str().and_then(|t| t.parse::<Decimal>().ok()).unwrap_or_default(),
            &currency,
        )
    };
    let lines = row
        .lines
        .0
        .as_array()
        .into_iter()
        .flatten()
        .map(|line| InvoiceLine {
            description: line["description"].as_str().unwrap_or_default().to_string(),
            server_id: line["server_id"].as_str().and_then(|id| id.parse().ok()),
            hours: line["hours"].as_u64().map(|hours| hours as u32),
            net: money(&line["net"]),
            tax: money(&line["tax"]),
        })
        .collect();
    let taxes = row
        .taxes
        .0
        .as_array()
        .into_iter()
        .flatten()
        .map(|tax| TaxLine {
            rate: match &tax["rate"] {
                Value::String(rate) => rate.clone(),
                other => other.to_string(),
            },
            net: money(&tax["net"]),
            tax: money(&tax["tax"]),
        })
        .collect();
    let display = &row.display.0;
    Invoice {
        id: row.invoice_id,
        number: row.number.clone(),
        account_id: row.account_id,
        period_start: row.period_start,
        period_end: row.period_end,
        lines,
        taxes,
        net: Money::of(row.net, &currency),
        tax: Money::of(row.tax, &currency),
        total: Money::of(row.total, &currency),
        display: DisplayFigures {
            net: money(&display["net"]),
            tax: money(&display["tax"]),
            total: money(&display["total"]),
        },
        issued_at: row.issued_at,
        credit_notes: notes
            .iter()
            .filter(|note| note.invoice_id == row.invoice_id)
            .map(|note| CreditNote {
                id: note.credit_note_id,
                number: note.number.clone(),
                charge_id: note.charge_id,
                reason: note.reason.clone(),
                net: Money::of(note.net, &currency),
                tax: Money::of(note.tax, &currency),
                total: Money::of(note.total, &currency),
                issued_at: note.issued_at,
            })
            .collect(),
        currency,
    }
}

/// The account's issued invoices, newest first.
#[utoipa::path(get, path = "/v1/accounts/{id}/invoices", tag = "invoices", params(("id" = Uuid, Path), InvoicesQuery), security(("bearer" = [])),
    responses((status = 200, description = "issued invoices, newest first", body = InvoicePage)))]
pub(crate) async fn account_invoices(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(page): Query<InvoicesQuery>,
) -> Reply<InvoicePage> {
    let account_id = accounts::readable(&caller, &id)?;
    accounts::load(&state, account_id).await?;
    let limit = page_size(page.limit, 50, app::reads::PAGE_MAX)?;
    let rows = app::reads::invoices_of_account(&state.pool, account_id, page.cursor.map(InvoiceId), limit)
        .await?
        .ok_or_else(|| ApiError::not_found("invoice (the cursor)"))?;
    let ids: Vec<uuid::Uuid> = rows.items.iter().map(|row| row.invoice_id).collect();
    let notes = app::reads::credit_notes(&state.pool, &ids).await?;
    Ok((StatusCode::OK, axum::Json(InvoicePage::of(rows, |row| view(row, &notes)))))
}

/// An invoice; with `Accept: text/html`, the page to print.
#[utoipa::path(get, path = "/v1/invoices/{id}", tag = "invoices", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, description = "the invoice", content((Invoice = "application/json"), (String = "text/html")))))]
pub(crate) async fn get_invoice(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let invoice_id = path_id(InvoiceId::parse(&id), "invoice")?;
    let row = app::reads::invoice(&state.pool, invoice_id)
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let account_id = AccountId(row.account_id);
    caller.may_read(account_id).map_err(|_| ApiError::not_found("invoice"))?;
    let wants_html = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if !wants_html {
        let notes = app::reads::credit_notes(&state.pool, &[row.invoice_id]).await?;
        return Ok(axum::Json(view(row, &notes)).into_response());
    }
    let account = accounts::load(&state, account_id).await?;
    Ok(axum::response::Html(printable(&state, row, &account.name).await?).into_response())
}

/// The invoice as a page to print, with its credit notes.
pub async fn printable(state: &AppState, row: InvoiceRow, customer: &str) -> Result<String, ApiError> {
    Ok(html(&document(state, row).await?, customer))
}

/// The invoice with its credit notes, as the API answers it.
pub async fn document(state: &AppState, row: InvoiceRow) -> Result<Invoice, ApiError> {
    let notes = app::reads::credit_notes(&state.pool, &[row.invoice_id]).await?;
    Ok(view(row, &notes))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(invoice: &Invoice, customer: &str) -> String {
    let mut rows = String::new();
    for line in &invoice.lines {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>",
            escape(&line.description),
            line.hours.map(|h| h.to_string()).unwrap_or_default(),
            escape(&line.net.0),
            escape(&line.tax.0),
        ));
    }
    let mut notes = String::new();
    for note in &invoice.credit_notes {
        notes.push_str(&format!(
            "<tr><td>{} ({})</td><td>{}</td><td class=n>-{}</td></tr>",
            escape(&note.number),
            note.issued_at.format("%Y-%m-%d"),
            escape(&note.reason),
            escape(&note.total.0),
        ));
    }
    if !notes.is_empty() {
        notes = format!("<h2>Credit notes</h2><table><thead><tr><th>Credit note</th><th>Reason</th><th class=n>Total</th></tr></thead><tbody>{notes}</tbody></table>");
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Invoice {number}</title>\
         <style>body{{font-family:sans-serif;max-width:48rem;margin:3rem auto}}td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd}}.n{{text-align:right}}</style></head>\
         <body><h1>Invoice {number}</h1><p>{customer}<br>Period {start} to {end}<br>All amounts in {currency}</p>\
         <table><thead><tr><th>Description</th><th class=n>Hours</th><th class=n>Net</th><th class=n>Tax</th></tr></thead><tbody>{rows}</tbody></table>\
         <p class=n>Net {net}<br>Tax {tax}<br><strong>Total {total}</strong></p>{notes}</body></html>",
        number = escape(&invoice.number),
        customer = escape(customer),
        start = invoice.period_start.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        end = invoice.period_end.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        currency = escape(&invoice.currency),
        net = escape(&invoice.display.net.0),
        tax = escape(&invoice.display.tax.0),
        total = escape(&invoice.display.total.0),
    )
}
