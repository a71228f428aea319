//! `invoices` and `credit_notes`, as issued. An issued invoice never changes.

use chrono::{DateTime, Utc};
use domain::invoice::InvoiceSeriesEvent;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::insert_new;

pub struct Invoices;

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct InvoiceRow {
    pub invoice_id: Uuid,
    pub number: String,
    pub account_id: Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub lines: sqlx::types::Json<Value>,
    pub taxes: sqlx::types::Json<Value>,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    pub display: sqlx::types::Json<Value>,
    pub charge_ids: sqlx::types::Json<Value>,
    pub issued_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct CreditNoteRow {
    pub credit_note_id: Uuid,
    pub number: String,
    pub invoice_id: Uuid,
    pub account_id: Uuid,
    pub charge_id: Uuid,
    pub reason: String,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    pub display: sqlx::types::Json<Value>,
    pub issued_at: DateTime<Utc>,
}

const INVOICE_COLUMNS: &[&str] = &[
    "invoice_id",
    "number",
    "account_id",
    "period_start",
    "period_end",
    "currency",
    "lines",
    "taxes",
    "net",
    "tax",
    "total",
    "display",
    "charge_ids",
    "issued_at",
];
const CREDIT_NOTE_COLUMNS: &[&str] = &[
    "credit_note_id",
    "number",
    "invoice_id",
    "account_id",
    "charge_id",
    "reason",
    "net",
    "tax",
    "total",
    "display",
    "issued_at",
];

impl Projection for Invoices {
    fn name(&self) -> &'static str {
        "invoices"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["invoices", "credit_notes"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let mut invoices = Vec::new();
            let mut notes = Vec::new();
            for record in records {
                let Decoded::Invoice(event) = &record.event else {
                    continue;
                };
                match event {
                    InvoiceSeriesEvent::InvoiceIssued {
                        invoice_id,
                        number,
                        invoice,
                        issued_at,
                    } => invoices.push(InvoiceRow {
                        invoice_id: invoice_id.0,
                        number: number.clone(),
                        account_id: invoice.account_id.0,
                        period_start: invoice.period.start(),
                        period_end: invoice.period.end(),
                        currency: invoice.currency.code().to_string(),
                        lines: sqlx::types::Json(serde_json::to_value(&invoice.lines).expect("lines serialise")),
                        taxes: sqlx::types::Json(serde_json::to_value(&invoice.taxes).expect("taxes serialise")),
                        net: invoice.net,
                        tax: invoice.tax,
                        total: invoice.total,
                        display: sqlx::types::Json(serde_json::to_value(&invoice.display).expect("display serialises")),
                        charge_ids: sqlx::types::Json(serde_json::to_value(&invoice.charge_ids).expect("ids serialise")),
                        issued_at: *issued_at,
                    }),
                    InvoiceSeriesEvent::CreditNoteIssued {
                        credit_note_id,
                        number,
                        credit_note,
                        total,
                        display,
                        issued_at,
                        ..
                    } => notes.push(CreditNoteRow {
                        credit_note_id: credit_note_id.0,
                        number: number.clone(),
                        invoice_id: credit_note.invoice_id.0,
                        account_id: credit_note.account_id.0,
                        charge_id: credit_note.charge_id.0,
                        reason: credit_note.reason.clone(),
                        net: credit_note.net,
                        tax: credit_note.tax,
                        total: *total,
                        display: sqlx::types::Json(serde_json::to_value(display).expect("display serialises")),
                        issued_at: *issued_at,
                    }),
                }
            }
            insert_new(tx, "invoices", &["invoice_id"], INVOICE_COLUMNS, &invoices).await?;
            insert_new(tx, "credit_notes", &["credit_note_id"], CREDIT_NOTE_COLUMNS, &notes).await
        })
    }
}
