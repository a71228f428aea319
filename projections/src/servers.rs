//! `servers`: the server view; status comes from the domain's own `Server` state, folded here.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use domain::account::AccountEvent;
use domain::server::{CancellationMode, Server};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::upsert;

pub struct Servers;

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct ServerRow {
    pub server_id: Uuid,
    pub account_id: Uuid,
    pub order_id: Uuid,
    pub plan_id: String,
    pub location: String,
    pub status: String,
    pub hostname: Option<String>,
    pub os_image: Option<String>,
    pub provider_server_id: Option<String>,
    pub cancellation_mode: Option<String>,
    pub cancellation_effective_at: Option<DateTime<Utc>>,
    /// The month (`YYYY-MM`) `month_to_date_net` counts.
    pub month: Option<String>,
    pub month_to_date_net: Decimal,
    pub last_charged_slot: Option<DateTime<Utc>>,
    pub next_charge_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Charged hour by hour now (`Server::is_billable`).
    pub billable: bool,
    /// Why it is suspended (`non_payment`, `dispute`) and since when, while it is.
    pub suspension_reason: Option<String>,
    pub suspended_at: Option<DateTime<Utc>>,
    /// The start of the first slot it may be billed for while billable
    /// (`Server::first_billable_slot`).
    pub first_billable_slot: Option<DateTime<Utc>>,
    /// The version of the server's stream `state` was folded from (0: unknown, a row stored
    /// before the column was).
    pub version: i64,
    pub state: Json<Server>,
}

const COLUMNS: &[&str] = &[
    "server_id",
    "account_id",
    "order_id",
    "plan_id",
    "location",
    "status",
    "hostname",
    "os_image",
    "provider_server_id",
    "cancellation_mode",
    "cancellation_effective_at",
    "month",
    "month_to_date_net",
    "last_charged_slot",
    "next_charge_at",
    "created_at",
    "billable",
    "suspension_reason",
    "suspended_at",
    "first_billable_slot",
    "version",
    "state",
];

impl ServerRow {
    fn refresh(&mut self) {
        let server = &self.state.0;
        self.status = server.status().map(|s| s.as_str()).unwrap_or("provisioning").to_string();
        self.hostname = server.hostname.as_ref().map(|h| h.as_str().to_string());
        self.os_image = server.os_image.clone();
        self.provider_server_id = server.provider_server_id.clone();
        self.cancellation_mode = server.cancellation.as_ref().map(|c| match c.mode {
            CancellationMode::Grace => "grace".to_string(),
            CancellationMode::Immediate => "immediate".to_string(),
        });
        self.cancellation_effective_at = server.cancellation.as_ref().map(|c| c.effective_at);
        self.billable = server.is_billable();
        self.suspension_reason = server.suspension_in_force().map(|(reason, _)| reason.as_str().to_string());
        self.suspended_at = server.suspension_in_force().map(|(_, since)| since);
        self.first_billable_slot = server.first_billable_slot().map(|slot| slot.start());
        // Billed in advance per slot: the next charge is at the start of the slot after the last
        // one charged, while the server is billable, and never before the slot in which it last
        // became billable (a resumption or revocation charges that slot in its own append).
        self.next_charge_at = match (server.first_billable_slot(), self.last_charged_slot) {
            (Some(first), Some(last)) => Some((last + Duration::hours(1)).max(first.start())),
            (Some(first), None) => Some(first.end()),
            (None, _) => None,
        };
    }
}

impl Projection for Servers {
    fn name(&self) -> &'static str {
        "servers"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["servers"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let ids: Vec<Uuid> = records
                .iter()
                .filter_map(|r| match &r.event {
                    Decoded::Server(id, _) => Some(id.0),
                    Decoded::Account(_, AccountEvent::HourCharged { server_id, .. } | AccountEvent::HoldCaptured { server_id, .. }) => {
                        Some(server_id.0)
                    }
                    _ => None,
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut rows: BTreeMap<Uuid, ServerRow> = sqlx::query_as::<_, ServerRow>("SELECT * FROM servers WHERE server_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|row| (row.server_id, row))
                .collect();
            let mut changed = BTreeSet::new();
            for record in records {
                match &record.event {
                    Decoded::Server(id, event) => {
                        if let domain::server::ServerEvent::ServerOrdered {
                            account_id,
                            order_id,
                            plan_id,
                            location,
                            at,
                            ..
                        } = event
                        {
                            rows.insert(
                                id.0,
                                ServerRow {
                                    server_id: id.0,
                                    account_id: account_id.0,
                                    order_id: order_id.0,
                                    plan_id: plan_id.to_string(),
                                    location: location.as_str().to_string(),
                                    status: String::new(),
                                    hostname: None,
                                    os_image: None,
                                    provider_server_id: None,
                                    cancellation_mode: None,
                                    cancellation_effective_at: None,
                                    month: None,
                                    month_to_date_net: Decimal::ZERO,
                                    last_charged_slot: None,
                                    next_charge_at: None,
                                    created_at: *at,
                                    billable: false,
                                    suspension_reason: None,
                                    suspended_at: None,
                                    first_billable_slot: None,
                                    version: 0,
                                    state: Json(Server::default()),
                                },
                            );
                        }
                        let Some(row) = rows.get_mut(&id.0) else {
                            continue;
                        };
                        row.state.0.apply(event.clone());
                        row.version = record.stream_version;
                        changed.insert(id.0);
                    }
                    Decoded::Account(
                        _,
                        AccountEvent::HourCharged { server_id, slot, net, .. } | AccountEvent::HoldCaptured { server_id, slot, net, .. },
                    ) => {
                        let Some(row) = rows.get_mut(&server_id.0) else {
                            continue;
                        };
                        let month = slot.month().to_string();
                        if row.month.as_deref() == Some(month.as_str()) {
                            row.month_to_date_net += net;
                        } else if row.month.as_deref().is_none_or(|current| current < month.as_str()) {
                            row.month = Some(month);
                            row.month_to_date_net = *net;
                        }
                        row.last_charged_slot = Some(row.last_charged_slot.map_or(slot.start(), |last| last.max(slot.start())));
                        changed.insert(server_id.0);
                    }
                    _ => {}
                }
            }
            // The derived columns depend only on the state and the last slot charged: worked out
            // once per changed row, not once per event.
            for id in &changed {
                if let Some(row) = rows.get_mut(id) {
                    row.refresh();
                }
            }
            let changed_rows: Vec<&ServerRow> = changed.iter().filter_map(|id| rows.get(id)).collect();
            upsert(tx, "servers", &["server_id"], COLUMNS, &changed_rows).await
        })
    }
}
