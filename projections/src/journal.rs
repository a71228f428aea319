//! `journal`: the double-entry postings of every money event (`journal_entries`) and their totals
//! per ledger account, currency and day (`journal_totals`), from which the trial balance is read
//! per currency as of any instant.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use domain::account::AccountEvent;
use domain::postings::{postings, Posting};
use domain::{AccountId, Country, Currency};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{Decoded, Record};
use crate::projection::Projection;
use crate::store::{copy_new, insert_new, upsert, CopyFields, CopyRow};

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
    pub currency: String,
    pub day: NaiveDate,
    pub debit: Decimal,
    pub credit: Decimal,
}

#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
struct AccountRow {
    account_id: Uuid,
    country: String,
    currency: String,
}

impl Projection for Journal {
    fn name(&self) -> &'static str {
        "journal"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["journal_entries", "journal_totals", "journal_accounts"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(apply(tx, records, false))
    }

    fn apply_bulk<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(apply(tx, records, true))
    }

    fn bulk_tables(&self) -> &'static [&'static str] {
        &["journal_entries"]
    }
}

impl CopyRow for EntryRow {
    fn copy_fields(&self, fields: &mut CopyFields) {
        fields.field(&self.event_id);
        fields.field(&self.position);
        fields.field(&self.occurred_at);
        fields.field(&self.account_id);
        fields.json(&self.postings.0);
    }
}

/// Applies a batch; `bulk` streams the entries in with `COPY` (a rebuild's side table).
async fn apply(tx: &mut PgConnection, records: &[Record], bulk: bool) -> Result<(), sqlx::Error> {
    let ids = crate::decode::account_ids(records);
    let mut opened: BTreeMap<Uuid, (Country, Currency)> =
        sqlx::query_as::<_, AccountRow>("SELECT * FROM journal_accounts WHERE account_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .filter_map(|row| {
                Some((
                    row.account_id,
                    (Country::parse(&row.country).ok()?, Currency::parse(&row.currency).ok()?),
                ))
            })
            .collect();
    let mut new_accounts = Vec::new();
    let mut entries = Vec::new();
    let mut totals: BTreeMap<(String, Currency, NaiveDate), (Decimal, Decimal)> = BTreeMap::new();
    for record in records {
        let Decoded::Account(account_id, event) = &record.event else {
            continue;
        };
        if let AccountEvent::AccountOpened { country, currency, .. } = event {
            opened.insert(account_id.0, (*country, *currency));
            new_accounts.push(AccountRow {
                account_id: account_id.0,
                country: country.as_str().to_string(),
                currency: currency.code().to_string(),
            });
        }
        let Some((country, currency)) = opened.get(&account_id.0) else {
            continue;
        };
        let lines = postings(AccountId(account_id.0), *country, *currency, event);
        if lines.is_empty() {
            continue;
        }
        let day = record.occurred_at.date_naive();
        for line in &lines {
            let total = totals.entry((line.account.clone(), line.currency, day)).or_default();
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
    upsert(
        tx,
        "journal_accounts",
        &["account_id"],
        &["account_id", "country", "currency"],
        &new_accounts,
    )
    .await?;
    const ENTRY_COLUMNS: &[&str] = &["event_id", "position", "occurred_at", "account_id", "postings"];
    if bulk {
        copy_new(tx, "journal_entries", ENTRY_COLUMNS, &entries).await?;
    } else {
        insert_new(tx, "journal_entries", &["event_id"], ENTRY_COLUMNS, &entries).await?;
    }
    let rows: Vec<TotalRow> = totals
        .into_iter()
        .map(|((ledger_account, currency, day), (debit, credit))| TotalRow {
            ledger_account,
            currency: currency.code().to_string(),
            day,
            debit,
            credit,
        })
        .collect();
    if !rows.is_empty() {
        sqlx::query(
            "INSERT INTO journal_totals (ledger_account, currency, day, debit, credit) \
                     SELECT ledger_account, currency, day, debit, credit FROM jsonb_populate_recordset(NULL::journal_totals, $1) \
                     ON CONFLICT (ledger_account, currency, day) DO UPDATE \
                     SET debit = journal_totals.debit + EXCLUDED.debit, credit = journal_totals.credit + EXCLUDED.credit",
        )
        .bind(serde_json::to_value(&rows).expect("rows serialise"))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
