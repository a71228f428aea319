//! `statement`: every money movement of an account with the balance after it.

use domain::account::AccountEvent;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::{copy_new, insert_new, CopyFields, CopyRow};

pub struct Statement;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct StatementRow {
    pub event_id: Uuid,
    pub position: i64,
    pub account_id: Uuid,
    pub kind: String,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub server_id: Option<Uuid>,
    pub reference: Option<String>,
}

impl CopyRow for StatementRow {
    fn copy_fields(&self, fields: &mut CopyFields) {
        fields.field(&self.event_id);
        fields.field(&self.position);
        fields.field(&self.account_id);
        fields.field(&self.kind);
        fields.field(&self.amount);
        fields.field(&self.balance_after);
        fields.field(&self.occurred_at);
        fields.field(&self.server_id);
        fields.field(&self.reference);
    }
}

const COLUMNS: &[&str] = &[
    "event_id",
    "position",
    "account_id",
    "kind",
    "amount",
    "balance_after",
    "occurred_at",
    "server_id",
    "reference",
];

/// The kind, signed wallet amount, server and reference of a money movement; `None` for events
/// that move no money.
pub fn movement(event: &AccountEvent) -> Option<(&'static str, Decimal, Option<Uuid>, Option<String>)> {
    Some(match event {
        AccountEvent::TopUpSettled { topup_id, amount, .. } => ("topup", *amount, None, Some(topup_id.to_string())),
        AccountEvent::HoldCaptured {
            charge_id,
            server_id,
            gross,
            ..
        }
        | AccountEvent::HourCharged {
            charge_id,
            server_id,
            gross,
            ..
        } => ("charge", -*gross, Some(server_id.0), Some(charge_id.to_string())),
        AccountEvent::CancellationRefunded {
            charge_id,
            server_id,
            gross,
            ..
        } => ("cancellation_refund", *gross, Some(server_id.0), Some(charge_id.to_string())),
        AccountEvent::UnusedTimeRecharged {
            charge_id,
            server_id,
            gross,
            ..
        } => ("revocation_charge", -*gross, Some(server_id.0), Some(charge_id.to_string())),
        AccountEvent::ServiceCredited { charge_id, amount, .. } => ("service_credit", *amount, None, Some(charge_id.to_string())),
        AccountEvent::CardRefundRequested { refund_id, amount, .. } => ("card_refund", -*amount, None, Some(refund_id.to_string())),
        AccountEvent::CardRefundFailed { refund_id, amount, .. } => ("card_refund_failed", *amount, None, Some(refund_id.to_string())),
        AccountEvent::CardRefundReversed { refund_id, amount, .. } => ("card_refund_reversed", *amount, None, Some(refund_id.to_string())),
        AccountEvent::Adjusted { adjustment_id, amount, .. } => ("adjustment", *amount, None, Some(adjustment_id.to_string())),
        AccountEvent::DisputeOpened { dispute_id, amount, .. } | AccountEvent::DisputeFundsWithdrawn { dispute_id, amount, .. }
            if !amount.is_zero() =>
        {
            ("dispute", -*amount, None, Some(dispute_id.to_string()))
        }
        AccountEvent::DisputeFundsReinstated { dispute_id, amount, .. } => {
            ("dispute_reinstated", *amount, None, Some(dispute_id.to_string()))
        }
        AccountEvent::DisputeClosed {
            dispute_id,
            amount_returned,
            ..
        } if !amount_returned.is_zero() => ("dispute_won", *amount_returned, None, Some(dispute_id.to_string())),
        _ => return None,
    })
}

impl Projection for Statement {
    fn name(&self) -> &'static str {
        "statement"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["statement"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move { insert_new(tx, "statement", &["event_id"], COLUMNS, &rows(records)).await })
    }

    fn apply_bulk<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move { copy_new(tx, "statement", COLUMNS, &rows(records)).await })
    }

    fn bulk_tables(&self) -> &'static [&'static str] {
        &["statement"]
    }
}

/// The statement lines of a batch: one per money movement.
fn rows(records: &[Record]) -> Vec<StatementRow> {
    let mut rows = Vec::new();
    for record in records {
        let Decoded::Account(account_id, event) = &record.event else {
            continue;
        };
        let (Some((kind, amount, server_id, reference)), Some(figures)) = (movement(event), event.figures()) else {
            continue;
        };
        rows.push(StatementRow {
            event_id: record.event_id,
            position: record.position,
            account_id: account_id.0,
            kind: kind.to_string(),
            amount,
            balance_after: figures.balance,
            occurred_at: record.occurred_at,
            server_id,
            reference,
        });
    }
    rows
}
