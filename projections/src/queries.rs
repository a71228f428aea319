//! Queries finance asks: balances and the trial balance as of an instant, digests of read models,
//! and the projections' status.

use chrono::{DateTime, Utc};
use domain::account::Figures;
use domain::AccountId;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::decode::{decode, Decoded};
use crate::runner::ProjectionError;

/// An account's figures as of `at` (domain time), from its stream in the log: those carried by
/// its last event up to `at` that carries any (one event read and decoded, found from the
/// stream's end). `None` before the account's first money event.
pub async fn balance_as_of(pool: &PgPool, account_id: AccountId, at: DateTime<Utc>) -> Result<Option<Figures>, ProjectionError> {
    let event: Option<ledger::RecordedEvent> = sqlx::query_as(
        "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, \
                recorded_at, occurred_at, prev_hash, hash \
         FROM events WHERE stream_id = $1 AND occurred_at <= $2 AND payload->'figures' IS NOT NULL \
         ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(account_id.stream_id())
    .bind(at)
    .fetch_optional(pool)
    .await?;
    let Some(event) = event else {
        return Ok(None);
    };
    match decode(&event)?.event {
        Decoded::Account(_, event) => Ok(event.figures()),
        _ => Ok(None),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrialBalanceLine {
    pub account: String,
    pub debit: Decimal,
    pub credit: Decimal,
}

/// The trial balance of one currency: its ledger accounts and their totals, which net to zero.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurrencyBooks {
    pub currency: String,
    pub accounts: Vec<TrialBalanceLine>,
    pub total_debit: Decimal,
    pub total_credit: Decimal,
}

/// Journal totals per currency: amounts of different currencies are never added.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrialBalance {
    pub as_of: Option<DateTime<Utc>>,
    pub currencies: Vec<CurrencyBooks>,
}

impl TrialBalance {
    /// The books of one currency, if it has any.
    pub fn currency(&self, code: &str) -> Option<&CurrencyBooks> {
        self.currencies.iter().find(|books| books.currency == code)
    }
}

/// Journal totals per ledger account, over everything or up to `as_of` (inclusive): whole days
/// from the daily totals, the last day from its entries.
pub async fn trial_balance(pool: &PgPool, as_of: Option<DateTime<Utc>>) -> Result<TrialBalance, ProjectionError> {
    let rows: Vec<(String, String, Decimal, Decimal)> = match as_of {
        None => {
            sqlx::query_as(
                "SELECT currency, ledger_account, sum(debit), sum(credit) FROM rm.journal_totals \
                 GROUP BY currency, ledger_account ORDER BY currency, ledger_account",
            )
            .fetch_all(pool)
            .await?
        }
        Some(at) => {
            sqlx::query_as(
                "SELECT currency, account, sum(debit), sum(credit) FROM ( \
                    SELECT currency, ledger_account AS account, debit, credit FROM rm.journal_totals WHERE day < ($1 AT TIME ZONE 'UTC')::date \
                    UNION ALL \
                    SELECT p.currency, p.account, p.debit, p.credit FROM rm.journal_entries e \
                    CROSS JOIN LATERAL json_to_recordset(e.postings) AS p(account text, currency text, debit numeric, credit numeric) \
                    WHERE e.occurred_at >= date_trunc('day', $1 AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AND e.occurred_at <= $1 \
                 ) lines GROUP BY currency, account ORDER BY currency, account",
            )
            .bind(at)
            .fetch_all(pool)
            .await?
        }
    };
    let mut currencies: Vec<CurrencyBooks> = Vec::new();
    for (currency, account, debit, credit) in rows {
        if currencies.last().is_none_or(|books| books.currency != currency) {
            currencies.push(CurrencyBooks {
                currency: currency.clone(),
                accounts: Vec::new(),
                total_debit: Decimal::ZERO,
                total_credit: Decimal::ZERO,
            });
        }
        let books = currencies.last_mut().expect("pushed");
        books.total_debit += debit;
        books.total_credit += credit;
        books.accounts.push(TrialBalanceLine {
            account,
            debit: debit.normalize(),
            credit: credit.normalize(),
        });
    }
    for books in &mut currencies {
        books.total_debit = books.total_debit.normalize();
        books.total_credit = books.total_credit.normalize();
    }
    Ok(TrialBalance { as_of, currencies })
}

/// A digest of a table's content (every row as text, sorted), to compare two builds byte for byte.
pub async fn table_digest(pool: &PgPool, schema: &str, table: &str) -> Result<String, ProjectionError> {
    let digest: String = sqlx::query_scalar(&format!(
        "SELECT md5(COALESCE(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {schema}.{table} t"
    ))
    .fetch_one(pool)
    .await?;
    Ok(digest)
}

#[derive(Clone, Debug, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: i64,
    pub head: i64,
    pub lag: i64,
    pub generation: i32,
    pub rebuilding: bool,
    pub rebuild_position: i64,
}

pub async fn status(pool: &PgPool) -> Result<Vec<ProjectionStatus>, ProjectionError> {
    let (head,): (i64,) = sqlx::query_as("SELECT position FROM ledger_head").fetch_one(pool).await?;
    let mut statuses = Vec::new();
    for projection in crate::projection::all() {
        let name = projection.name();
        let position = ledger::checkpoint::load(pool, name).await?;
        let row: Option<(i32, bool, i64)> =
            sqlx::query_as("SELECT generation, rebuilding, rebuild_position FROM projection_status WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        let (generation, rebuilding, rebuild_position) = row.unwrap_or((1, false, 0));
        statuses.push(ProjectionStatus {
            name: name.to_string(),
            position,
            head,
            lag: head - position,
            generation,
            rebuilding,
            rebuild_position,
        });
    }
    Ok(statuses)
}
