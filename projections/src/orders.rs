//! `orders`: each deploy order, placed and then completed or failed.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use domain::order::OrderEvent;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::upsert;

pub struct Orders;

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub account_id: Uuid,
    pub server_id: Uuid,
    pub plan_id: String,
    pub location: String,
    pub status: String,
    pub placed_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

const COLUMNS: &[&str] = &[
    "order_id",
    "account_id",
    "server_id",
    "plan_id",
    "location",
    "status",
    "placed_at",
    "ended_at",
];

impl Projection for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["orders"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let ids: Vec<Uuid> = records
                .iter()
                .filter_map(|r| if let Decoded::Order(id, _) = &r.event { Some(id.0) } else { None })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut rows: BTreeMap<Uuid, OrderRow> = sqlx::query_as::<_, OrderRow>("SELECT * FROM orders WHERE order_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|row| (row.order_id, row))
                .collect();
            let mut changed = BTreeSet::new();
            for record in records {
                let Decoded::Order(id, event) = &record.event else { continue };
                match event {
                    OrderEvent::OrderPlaced {
                        order_id,
                        account_id,
                        server_id,
                        plan_id,
                        location,
                        at,
                        ..
                    } => {
                        rows.insert(
                            order_id.0,
                            OrderRow {
                                order_id: order_id.0,
                                account_id: account_id.0,
                                server_id: server_id.0,
                                plan_id: plan_id.to_string(),
                                location: location.as_str().to_string(),
                                status: "placed".into(),
                                placed_at: *at,
                                ended_at: None,
                            },
                        );
                    }
                    OrderEvent::OrderCompleted { at, .. } | OrderEvent::OrderFailed { at, .. } => {
                        let Some(row) = rows.get_mut(&id.0) else { continue };
                        row.status = if matches!(event, OrderEvent::OrderCompleted { .. }) {
                            "completed"
                        } else {
                            "failed"
                        }
                        .into();
                        row.ended_at = Some(*at);
                    }
                }
                changed.insert(id.0);
            }
            let changed_rows: Vec<&OrderRow> = changed.iter().filter_map(|id| rows.get(id)).collect();
            upsert(tx, "orders", &["order_id"], COLUMNS, &changed_rows).await
        })
    }
}
