//! `metrics`: hosting revenue per day and currency, net of pro-rata cancellation refunds. Active
//! servers are counted from the `servers` read model.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use domain::account::AccountEvent;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::upsert;

pub struct Metrics;

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct RevenueRow {
    pub day: NaiveDate,
    pub currency: String,
    pub net: Decimal,
    pub tax: Decimal,
}

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
struct AccountRow {
    account_id: Uuid,
    currency: String,
}

impl Projection for Metrics {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["metrics_revenue", "metrics_accounts"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let ids = crate::decode::account_ids(records);
            let mut currencies: BTreeMap<Uuid, String> =
                sqlx::query_as::<_, AccountRow>("SELECT * FROM metrics_accounts WHERE account_id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .map(|row| (row.account_id, row.currency))
                    .collect();
            let mut new_accounts = Vec::new();
            let mut revenue: BTreeMap<(NaiveDate, String), (Decimal, Decimal)> = BTreeMap::new();
            for record in records {
                let Decoded::Account(account_id, event) = &record.event else {
                    continue;
                };
                if let AccountEvent::AccountOpened { currency, .. } = event {
                    currencies.insert(account_id.0, currency.code().to_string());
                    new_accounts.push(AccountRow {
                        account_id: account_id.0,
                        currency: currency.code().to_string(),
                    });
                }
                let Some(currency) = currencies.get(&account_id.0) else {
                    continue;
                };
                let (day, net, tax) = match event {
                    AccountEvent::HourCharged { slot, net, tax, .. } | AccountEvent::HoldCaptured { slot, net, tax, .. } => {
                        (slot.start().date_naive(), *net, *tax)
                    }
                    AccountEvent::CancellationRefunded { net, tax, .. } => (record.occurred_at.date_naive(), -*net, -*tax),
                    AccountEvent::UnusedTimeRecharged { net, tax, .. } => (record.occurred_at.date_naive(), *net, *tax),
                    _ => continue,
                };
                let entry = revenue.entry((day, currency.clone())).or_default();
                entry.0 += net;
                entry.1 += tax;
            }
            upsert(tx, "metrics_accounts", &["account_id"], &["account_id", "currency"], &new_accounts).await?;
            let rows: Vec<RevenueRow> = revenue
                .into_iter()
                .map(|((day, currency), (net, tax))| RevenueRow { day, currency, net, tax })
                .collect();
            if !rows.is_empty() {
                sqlx::query(
                    "INSERT INTO metrics_revenue (day, currency, net, tax) \
                     SELECT day, currency, net, tax FROM jsonb_populate_recordset(NULL::metrics_revenue, $1) \
                     ON CONFLICT (day, currency) DO UPDATE SET net = metrics_revenue.net + EXCLUDED.net, tax = metrics_revenue.tax + EXCLUDED.tax",
                )
                .bind(serde_json::to_value(&rows).expect("rows serialise"))
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        })
    }
}
