//! `balances`: per account balance, reserved, available, and the hourly burn of its billable
//! servers (for runway).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use domain::account::AccountEvent;
use domain::server::ServerEvent;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::upsert;

pub struct Balances;

/// The channel on which every change to the live `balances` read model is announced, in the
/// transaction that makes it (see `Changed`): processes that keep balance rows in memory listen.
pub const CHANGED_CHANNEL: &str = "billing_balances";

/// An announcement on `CHANGED_CHANNEL`: the checkpoint the live read model moved to and the
/// accounts whose rows changed (`None`: any may have, as after a rebuild's swap).
#[derive(Clone, Debug, PartialEq)]
pub struct Changed {
    pub position: i64,
    pub accounts: Option<Vec<Uuid>>,
}

/// A `NOTIFY` payload stays under 8,000 bytes: past this many accounts a change names none.
const CHANGED_ACCOUNTS_NAMED_MAX: usize = 150;

impl Changed {
    /// `"<position> <id>,<id>,..."`, or `"<position> *"`.
    pub fn payload(&self) -> String {
        match &self.accounts {
            Some(accounts) if accounts.len() <= CHANGED_ACCOUNTS_NAMED_MAX => {
                let ids: Vec<String> = accounts.iter().map(Uuid::to_string).collect();
                format!("{} {}", self.position, ids.join(","))
            }
            _ => format!("{} *", self.position),
        }
    }

    pub fn parse(payload: &str) -> Option<Changed> {
        let (position, accounts) = payload.split_once(' ')?;
        let position = position.parse().ok()?;
        let accounts = match accounts {
            "*" => None,
            "" => Some(Vec::new()),
            ids => Some(ids.split(',').map(Uuid::parse_str).collect::<Result<_, _>>().ok()?),
        };
        Some(Changed { position, accounts })
    }

    /// Announces the change in `tx`'s transaction (heard when it commits). With `only_live`, only
    /// if `tx` works on the live read model (its search path starts with it): a rebuild's or a
    /// verification's side tables announce nothing (a rebuild's swap announces, after moving
    /// them, whatever the search path then is).
    pub async fn announce(&self, tx: &mut PgConnection, only_live: bool) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2) WHERE NOT $3 OR current_schema() = $4")
            .bind(CHANGED_CHANNEL)
            .bind(self.payload())
            .bind(only_live)
            .bind(crate::runner::LIVE_SCHEMA)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BalanceRow {
    pub account_id: Uuid,
    pub name: String,
    pub email: String,
    pub currency: String,
    pub country: String,
    pub balance: Decimal,
    pub reserved: Decimal,
    pub available: Decimal,
    pub hourly_burn: Decimal,
    pub low_balance_warned: bool,
    pub opened_at: DateTime<Utc>,
    pub position: i64,
}

const BALANCE_COLUMNS: &[&str] = &[
    "account_id",
    "name",
    "email",
    "currency",
    "country",
    "balance",
    "reserved",
    "available",
    "hourly_burn",
    "low_balance_warned",
    "opened_at",
    "position",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct ServerRow {
    server_id: Uuid,
    account_id: Uuid,
    provisioned: bool,
    suspended: bool,
    cancelled: bool,
    deleted: bool,
    hourly_gross: Decimal,
}

const SERVER_COLUMNS: &[&str] = &[
    "server_id",
    "account_id",
    "provisioned",
    "suspended",
    "cancelled",
    "deleted",
    "hourly_gross",
];

impl Projection for Balances {
    fn name(&self) -> &'static str {
        "balances"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["balances", "balance_servers"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let account_ids = crate::decode::account_ids(records);
            let server_ids: Vec<Uuid> = records
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
            let mut accounts: BTreeMap<Uuid, BalanceRow> =
                sqlx::query_as::<_, BalanceRow>("SELECT * FROM balances WHERE account_id = ANY($1)")
                    .bind(&account_ids)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .map(|row| (row.account_id, row))
                    .collect();
            let mut servers: BTreeMap<Uuid, ServerRow> =
                sqlx::query_as::<_, ServerRow>("SELECT * FROM balance_servers WHERE server_id = ANY($1)")
                    .bind(&server_ids)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .map(|row| (row.server_id, row))
                    .collect();
            let mut changed_accounts = BTreeSet::new();
            let mut changed_servers = BTreeSet::new();
            for record in records {
                match &record.event {
                    Decoded::Account(id, event) => {
                        if let AccountEvent::AccountOpened {
                            account_id,
                            name,
                            email,
                            currency,
                            country,
                            opened_at,
                        } = event
                        {
                            accounts.insert(
                                account_id.0,
                                BalanceRow {
                                    account_id: account_id.0,
                                    name: name.clone(),
                                    email: email.clone(),
                                    currency: currency.code().to_string(),
                                    country: country.as_str().to_string(),
                                    balance: Decimal::ZERO,
                                    reserved: Decimal::ZERO,
                                    available: Decimal::ZERO,
                                    hourly_burn: Decimal::ZERO,
                                    low_balance_warned: false,
                                    opened_at: *opened_at,
                                    position: record.position,
                                },
                            );
                        }
                        let Some(row) = accounts.get_mut(&id.0) else {
                            continue;
                        };
                        row.position = record.position;
                        changed_accounts.insert(id.0);
                        if let Some(figures) = event.figures() {
                            row.balance = figures.balance;
                            row.reserved = figures.reserved;
                            row.available = figures.available;
                        }
                        match event {
                            AccountEvent::LowBalanceWarned { .. } => row.low_balance_warned = true,
                            AccountEvent::LowBalanceCleared { .. } => row.low_balance_warned = false,
                            AccountEvent::HourCharged {
                                server_id,
                                rate_per_hour,
                                tax_rate,
                                ..
                            } => {
                                if let Some(server) = servers.get_mut(&server_id.0) {
                                    server.hourly_gross = rate_per_hour + domain::billing::tax_on(*rate_per_hour, *tax_rate);
                                    changed_servers.insert(server_id.0);
                                }
                            }
                            AccountEvent::HoldCaptured { server_id, net, tax, .. } => {
                                if let Some(server) = servers.get_mut(&server_id.0) {
                                    server.hourly_gross = net + tax;
                                    changed_servers.insert(server_id.0);
                                }
                            }
                            _ => {}
                        }
                    }
                    Decoded::Server(id, event) => {
                        if let ServerEvent::ServerOrdered { account_id, .. } = event {
                            servers.insert(
                                id.0,
                                ServerRow {
                                    server_id: id.0,
                                    account_id: account_id.0,
                                    provisioned: false,
                                    suspended: false,
                                    cancelled: false,
                                    deleted: false,
                                    hourly_gross: Decimal::ZERO,
                                },
                            );
                        }
                        let Some(server) = servers.get_mut(&id.0) else {
                            continue;
                        };
                        match event {
                            ServerEvent::ServerProvisioned { .. } => server.provisioned = true,
                            ServerEvent::ServerSuspended { .. } => server.suspended = true,
                            ServerEvent::ServerResumed { .. } => server.suspended = false,
                            ServerEvent::CancellationRequested { .. } => server.cancelled = true,
                            ServerEvent::CancellationRevoked { .. } => server.cancelled = false,
                            ServerEvent::ServerDeleted { .. }
                            | ServerEvent::TerminatedForNonPayment { .. }
                            | ServerEvent::ProvisioningFailed { .. } => server.deleted = true,
                            _ => {}
                        }
                        changed_servers.insert(id.0);
                    }
                    _ => {}
                }
            }
            let server_rows: Vec<&ServerRow> = changed_servers.iter().filter_map(|id| servers.get(id)).collect();
            upsert(tx, "balance_servers", &["server_id"], SERVER_COLUMNS, &server_rows).await?;
            let account_rows: Vec<&BalanceRow> = changed_accounts.iter().filter_map(|id| accounts.get(id)).collect();
            upsert(tx, "balances", &["account_id"], BALANCE_COLUMNS, &account_rows).await?;
            // The burn of every account whose servers or figures changed, summed by the database
            // (an addition of stored amounts; nothing is rounded).
            let burn_accounts: Vec<Uuid> = changed_accounts
                .iter()
                .copied()
                .chain(server_rows.iter().map(|s| s.account_id))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            sqlx::query(
                "UPDATE balances b SET hourly_burn = COALESCE((SELECT sum(s.hourly_gross) FROM balance_servers s \
                 WHERE s.account_id = b.account_id AND s.provisioned AND NOT s.suspended AND NOT s.cancelled AND NOT s.deleted), 0) \
                 WHERE b.account_id = ANY($1)",
            )
            .bind(&burn_accounts)
            .execute(&mut *tx)
            .await?;
            let position = records.last().map_or(0, |record| record.position);
            Changed {
                position,
                accounts: Some(burn_accounts),
            }
            .announce(tx, true)
            .await
        })
    }
}
