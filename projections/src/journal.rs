//! `journal`: the double-entry postings of every money event (`journal_entries`) and their totals
//! per ledger account and day (`journal_totals`), from which the trial balance is read as of any
//! instant.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use domain::account::AccountEvent;
use domain::postings::{postings, Posting};
use domain::{AccountId, Country};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::{insert_new, upsert};

pub struct Journal;

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct EntryRow {
    pub event_id: Uuid,
    pub position: i64,
    pub occurred_at: DateTime<Utc>,
    pub account_id: Uuid,
    pub postings: Json<Vec<Posting>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct TotalRow {
    pub ledger_account: String,
    pub day: NaiveDate,
    pub debit: Decimal,
    pub credit: Decimal,
}

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
struct AccountRow {
    account_id: Uuid,
    country: String,
}

impl Projection for Journal {
    fn name(&self) -> &'static str {
        "journal"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["journal_entries", "journal_totals", "journal_accounts"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let ids: Vec<Uuid> = records
                .iter()
                .filter_map(|r| if let Decoded::Account(id, _) = &r.event { Some(id.0) } else { None })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut countries: BTreeMap<Uuid, Country> =
                sqlx::query_as::<_, AccountRow>("SELECT * FROM journal_accounts WHERE account_id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .filter_map(|row| Country::parse(&row.country).ok().map(|country| (row.account_id, country)))
                    .collect();
            let mut new_accounts = Vec::new();
            let mut entries = Vec::new();
            let mut totals: BTreeMap<(String, NaiveDate), (Decimal, Decimal)> = BTreeMap::new();
            for record in records {
                let Decoded::Account(account_id, event) = &record.event else {
                    continue;
                };
                if let AccountEvent::AccountOpened { country, .. } = event {
                    countries.insert(account_id.0, *country);
                    new_accounts.push(AccountRow {
                        account_id: account_id.0,
                        country: country.as_str().to_string(),
                    });
                }
                let Some(country) = countries.get(&account_id.0) else {
                    continue;
                };
                let lines = postings(AccountId(account_id.0), *country, event);
                if lines.is_empty() {
                    continue;
                }
                let day = record.occurred_at.date_naive();
                for line in &lines {
                    let total = totals.entry((line.account.clone(), day)).or_default();
                    total.0 += line.debit;
                    total.1 += line.credit;
                }
                entries.push(EntryRow {
                    event_id: record.event_id,
                    position: record.position,
                    occurred_at: record.occurred_at,
                    account_id: account_id.0,
                    postings: Json(lines),
                });
            }
            upsert(tx, "journal_accounts", &["account_id"], &["account_id", "country"], &new_accounts).await?;
            insert_new(
                tx,
                "journal_entries",
                &["event_id"],
                &["event_id", "position", "occurred_at", "account_id", "postings"],
                &entries,
            )
            .await?;
            let rows: Vec<TotalRow> = totals
                .into_iter()
                .map(|((ledger_account, day), (debit, credit))| TotalRow {
                    ledger_account,
                    day,
                    debit,
                    credit,
                })
                .collect();
            if !rows.is_empty() {
                sqlx::query(
                    "INSERT INTO journal_totals (ledger_account, day, debit, credit) \
                     SELECT ledger_account, day, debit, credit FROM jsonb_populate_recordset(NULL::journal_totals, $1) \
                     ON CONFLICT (ledger_account, day) DO UPDATE \
                     SET debit = journal_totals.debit + EXCLUDED.debit, credit = journal_totals.credit + EXCLUDED.credit",
                )
                .bind(serde_json::to_value(&rows).expect("rows serialise"))
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        })
    }
}
