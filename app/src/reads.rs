//! The read side: every query of the read models (schema `rm`) and of the log by value, typed, in
//! one place. The HTTP layer renders these rows; the workers pick their due work from them. A read
//! model may lag the log: whatever is decided from a row is checked again by its aggregate.

use chrono::{DateTime, Utc};
use domain::{AccountId, ChargeId, InvoiceId, ServerId, TopUpId};
use ledger::RecordedEvent;
use projections::balances::BalanceRow;
use projections::invoices::{CreditNoteRow, InvoiceRow};
use projections::servers::ServerRow;
use projections::statement::StatementRow;
use sqlx::PgPool;
use uuid::Uuid;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

/// A page of a list: at most `limit` items after a cursor, and the cursor of the next page when
/// there is more.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// From rows fetched with `limit + 1`: the extra row only says there is a next page.
    pub fn of(mut rows: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Page<T> {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_cursor = if more { rows.last().map(cursor) } else { None };
        Page { items: rows, next_cursor }
    }
}

/// `text` matched literally by `LIKE`.
fn like_escaped(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// The largest page any list serves.
pub const PAGE_MAX: u32 = 200;

pub async fn account(pool: &PgPool, account_id: AccountId) -> Result<Option<BalanceRow>> {
    sqlx::query_as("SELECT * FROM rm.balances WHERE account_id = $1")
        .bind(account_id.0)
        .fetch_optional(pool)
        .await
}

/// Accounts whose name or email contains `text` (case-insensitive), by id (the cursor).
pub async fn search_accounts(pool: &PgPool, text: &str, after: Option<AccountId>, limit: u32) -> Result<Page<BalanceRow>> {
    let pattern = format!("%{}%", like_escaped(&text.to_lowercase()));
    // Ordered by id so that the cursor (the last id) is exact under concurrent openings.
    let rows: Vec<BalanceRow> = sqlx::query_as(
        "SELECT * FROM rm.balances WHERE (lower(name) LIKE $1 OR lower(email) LIKE $1) AND ($2::uuid IS NULL OR account_id > $2) \
         ORDER BY account_id LIMIT $3",
    )
    .bind(pattern)
    .bind(after.map(|id| id.0))
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    Ok(Page::of(rows, limit, |row| row.account_id.to_string()))
}

/// Which of an account's movements a statement shows: of one kind, of one server, in
/// `[from, to)` by when they happened; each left out when `None`.
#[derive(Clone, Debug, Default)]
pub struct StatementFilter {
    pub kind: Option<String>,
    pub server_id: Option<ServerId>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// An account's money movements after log position `after`, oldest first, as `filter` says.
pub async fn statement(
    pool: &PgPool,
    account_id: AccountId,
    after: i64,
    limit: u32,
    filter: &StatementFilter,
) -> Result<Page<StatementRow>> {
    let rows: Vec<StatementRow> = sqlx::query_as(
        "SELECT * FROM rm.statement WHERE account_id = $1 AND position > $2
            AND ($4::text IS NULL OR kind = $4) AND ($5::uuid IS NULL OR server_id = $5)
            AND ($6::timestamptz IS NULL OR occurred_at >= $6) AND ($7::timestamptz IS NULL OR occurred_at < $7)
          ORDER BY position LIMIT $3",
    )
    .bind(account_id.0)
    .bind(after)
    .bind(i64::from(limit) + 1)
    .bind(filter.kind.as_deref())
    .bind(filter.server_id.map(|id| id.0))
    .bind(filter.from)
    .bind(filter.to)
    .fetch_all(pool)
    .await?;
    Ok(Page::of(rows, limit, |row| row.position.to_string()))
}

/// The kinds of movement an account's statement holds, by name.
pub async fn statement_kinds(pool: &PgPool, account_id: AccountId) -> Result<Vec<String>> {
    sqlx::query_scalar("SELECT DISTINCT kind FROM rm.statement WHERE account_id = $1 ORDER BY kind")
        .bind(account_id.0)
        .fetch_all(pool)
        .await
}

/// The account a charge was made to.
pub async fn account_of_charge(pool: &PgPool, charge_id: ChargeId) -> Result<Option<AccountId>> {
    let owner: Option<Uuid> = sqlx::query_scalar("SELECT account_id FROM rm.statement WHERE kind = 'charge' AND reference = $1")
        .bind(charge_id.to_string())
        .fetch_optional(pool)
        .await?;
    Ok(owner.map(AccountId))
}

pub async fn server(pool: &PgPool, server_id: ServerId) -> Result<Option<ServerRow>> {
    sqlx::query_as("SELECT * FROM rm.servers WHERE server_id = $1")
        .bind(server_id.0)
        .fetch_optional(pool)
        .await
}

/// An account's servers in the order they were ordered, after the server `after` (the cursor is
/// the last server's id). None when `after` is not a server of this account.
pub async fn servers_of_account(
    pool: &PgPool,
    account_id: AccountId,
    after: Option<ServerId>,
    limit: u32,
) -> Result<Option<Page<ServerRow>>> {
    let start: Option<(DateTime<Utc>, Uuid)> = match after {
        None => None,
        Some(server_id) => {
            let row = sqlx::query_as("SELECT created_at, server_id FROM rm.servers WHERE server_id = $1 AND account_id = $2")
                .bind(server_id.0)
                .bind(account_id.0)
                .fetch_optional(pool)
                .await?;
            match row {
                Some(row) => Some(row),
                None => return Ok(None),
            }
        }
    };
    let rows: Vec<ServerRow> = sqlx::query_as(
        "SELECT * FROM rm.servers WHERE account_id = $1 AND ($2::timestamptz IS NULL OR (created_at, server_id) > ($2, $3)) \
         ORDER BY created_at, server_id LIMIT $4",
    )
    .bind(account_id.0)
    .bind(start.map(|(created_at, _)| created_at))
    .bind(start.map(|(_, server_id)| server_id))
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    Ok(Some(Page::of(rows, limit, |row| row.server_id.to_string())))
}

/// The account's servers that are billable now, as the read model has them.
pub async fn billable_servers(pool: &PgPool, account_id: AccountId) -> Result<Vec<ServerId>> {
    let servers: Vec<Uuid> = sqlx::query_scalar("SELECT server_id FROM rm.servers WHERE account_id = $1 AND billable ORDER BY server_id")
        .bind(account_id.0)
        .fetch_all(pool)
        .await?;
    Ok(servers.into_iter().map(ServerId).collect())
}

/// The account's servers suspended for `reason` (`dispute`, `non_payment`), or of every account.
pub async fn suspended_servers(pool: &PgPool, account_id: Option<AccountId>, reason: &str) -> Result<Vec<(ServerId, AccountId)>> {
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT server_id, account_id FROM rm.servers WHERE suspension_reason = $1 AND ($2::uuid IS NULL OR account_id = $2) \
         ORDER BY server_id",
    )
    .bind(reason)
    .bind(account_id.map(|id| id.0))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(server, account)| (ServerId(server), AccountId(account)))
        .collect())
}

/// Servers suspended for non-payment since `before` or earlier.
pub async fn unpaid_since(pool: &PgPool, before: DateTime<Utc>) -> Result<Vec<ServerId>> {
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "SELECT server_id FROM rm.servers WHERE suspension_reason = 'non_payment' AND suspended_at <= $1 ORDER BY server_id",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(ServerId).collect())
}

/// Whether the account's available balance pays one hour of the server.
pub async fn affords_an_hour(pool: &PgPool, account_id: AccountId, server_id: ServerId) -> Result<bool> {
    let affordable: Option<bool> = sqlx::query_scalar(
        "SELECT b.available >= s.hourly_gross FROM rm.balances b JOIN rm.balance_servers s ON s.account_id = b.account_id \
         WHERE b.account_id = $1 AND s.server_id = $2",
    )
    .bind(account_id.0)
    .bind(server_id.0)
    .fetch_optional(pool)
    .await?;
    Ok(affordable == Some(true))
}

/// Cancelled servers whose deletion is due at `now`.
pub async fn deletions_due(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<ServerId>> {
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "SELECT server_id FROM rm.servers WHERE status IN ('pending_cancellation', 'deleting') AND cancellation_effective_at <= $1 \
         ORDER BY server_id",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(ServerId).collect())
}

/// A billable server with a slot due, as the servers read model has it.
#[derive(Clone, Debug)]
pub struct DueRow {
    pub account_id: Uuid,
    pub server_id: Uuid,
    pub next_charge_at: DateTime<Utc>,
    pub plan_id: String,
    /// `Server::first_billable_slot`, as the row was folded.
    pub first_billable_slot: Option<DateTime<Utc>>,
    /// The version of the server's stream the row was folded from (0: unknown).
    pub version: i64,
}

/// Every billable server with a slot due by `until`, by account, and the servers read model's
/// checkpoint the rows were read at (one statement: the rows hold every server event up to it
/// and none after). Read whole; the billing run reads them in chunks (`DueCursor`).
pub async fn charges_due(pool: &PgPool, until: DateTime<Utc>) -> Result<(Vec<DueRow>, i64)> {
    let mut cursor = DueCursor::open(pool, until, DUE_ROWS_PER_FETCH).await?;
    let mut rows = Vec::new();
    while let Some(chunk) = cursor.next_chunk().await? {
        rows.extend(chunk);
    }
    Ok((rows, cursor.checkpoint()))
}

/// The rows of `charges_due` through a cursor, in chunks in account order, so that work on the
/// first accounts starts while the rest are read. The cursor's statement reads one snapshot, so
/// every row is as of the one checkpoint it reports; a cursor's plan is chosen for its first rows
/// (an index scan in account order rather than a scan and a sort of every due row).
pub struct DueCursor {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    rows_per_fetch: usize,
    checkpoint: Option<i64>,
    done: bool,
}

/// Rows one fetch of a `DueCursor` reads, as the billing run reads them.
pub const DUE_ROWS_PER_FETCH: usize = 2_000;

impl DueCursor {
    /// Opens the cursor, to read `rows_per_fetch` rows at a time; holds a connection until dropped.
    pub async fn open(pool: &PgPool, until: DateTime<Utc>, rows_per_fetch: usize) -> Result<DueCursor> {
        let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY").await?;
        sqlx::query(
            "DECLARE due_servers NO SCROLL CURSOR FOR \
             SELECT (SELECT position FROM checkpoints WHERE name = 'servers'), account_id, server_id, next_charge_at, \
                    plan_id, first_billable_slot, version \
             FROM rm.servers WHERE billable AND next_charge_at <= $1 ORDER BY account_id, server_id",
        )
        .bind(until)
        .execute(&mut *tx)
        .await?;
        Ok(DueCursor {
            tx,
            rows_per_fetch: rows_per_fetch.max(1),
            checkpoint: None,
            done: false,
        })
    }

    /// The servers read model's checkpoint the rows are as of (0 while no row has been read, or
    /// if none is due: nothing is then decided from it).
    pub fn checkpoint(&self) -> i64 {
        self.checkpoint.unwrap_or(0)
    }

    /// The next rows in account order, `None` once every row has been read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<DueRow>>> {
        if self.done {
            return Ok(None);
        }
        let rows: Vec<(Option<i64>, Uuid, Uuid, DateTime<Utc>, String, Option<DateTime<Utc>>, i64)> =
            sqlx::query_as(&format!("FETCH FORWARD {} FROM due_servers", self.rows_per_fetch))
                .fetch_all(&mut *self.tx)
                .await?;
        if rows.len() < self.rows_per_fetch {
            self.done = true;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            rows.into_iter()
                .map(
                    |(checkpoint, account_id, server_id, next_charge_at, plan_id, first_billable_slot, version)| {
                        self.checkpoint.get_or_insert(checkpoint.unwrap_or(0));
                        DueRow {
                            account_id,
                            server_id,
                            next_charge_at,
                            plan_id,
                            first_billable_slot,
                            version,
                        }
                    },
                )
                .collect(),
        ))
    }
}

/// Accounts whose runway crossed `hours` (either way) since their last low-balance event: with
/// their hourly burn.
pub async fn runway_crossings(pool: &PgPool, hours: i64) -> Result<Vec<(AccountId, rust_decimal::Decimal)>> {
    let rows: Vec<(Uuid, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT account_id, hourly_burn FROM rm.balances WHERE hourly_burn > 0 AND (available < hourly_burn * $1) <> low_balance_warned",
    )
    .bind(rust_decimal::Decimal::from(hours))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(account, burn)| (AccountId(account), burn)).collect())
}

/// Accounts with a server billed in `[start, end)`, by id.
pub async fn accounts_billed_between(pool: &PgPool, start: DateTime<Utc>, end: DateTime<Utc>) -> Result<Vec<AccountId>> {
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT account_id FROM rm.servers WHERE last_charged_slot >= $1 AND created_at < $2 ORDER BY account_id",
    )
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(AccountId).collect())
}

/// Servers billable now, across every account.
pub async fn billable_server_count(pool: &PgPool) -> Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM rm.servers WHERE billable")
        .fetch_one(pool)
        .await
}

pub async fn invoice(pool: &PgPool, invoice_id: InvoiceId) -> Result<Option<InvoiceRow>> {
    sqlx::query_as("SELECT * FROM rm.invoices WHERE invoice_id = $1")
        .bind(invoice_id.0)
        .fetch_optional(pool)
        .await
}

/// An account's invoices, newest period first (one per month), after the invoice `after` (the
/// cursor is the last invoice's id). None when `after` is not an invoice of this account.
pub async fn invoices_of_account(
    pool: &PgPool,
    account_id: AccountId,
    after: Option<InvoiceId>,
    limit: u32,
) -> Result<Option<Page<InvoiceRow>>> {
    let before: Option<DateTime<Utc>> = match after {
        None => None,
        Some(invoice_id) => {
            let start = sqlx::query_scalar("SELECT period_start FROM rm.invoices WHERE invoice_id = $1 AND account_id = $2")
                .bind(invoice_id.0)
                .bind(account_id.0)
                .fetch_optional(pool)
                .await?;
            match start {
                Some(start) => Some(start),
                None => return Ok(None),
            }
        }
    };
    let rows: Vec<InvoiceRow> = sqlx::query_as(
        "SELECT * FROM rm.invoices WHERE account_id = $1 AND ($2::timestamptz IS NULL OR period_start < $2) \
         ORDER BY period_start DESC LIMIT $3",
    )
    .bind(account_id.0)
    .bind(before)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    Ok(Some(Page::of(rows, limit, |row| row.invoice_id.to_string())))
}

/// The credit notes of invoices, by number.
pub async fn credit_notes(pool: &PgPool, invoice_ids: &[Uuid]) -> Result<Vec<CreditNoteRow>> {
    sqlx::query_as("SELECT * FROM rm.credit_notes WHERE invoice_id = ANY($1) ORDER BY number")
        .bind(invoice_ids)
        .fetch_all(pool)
        .await
}

/// The log after position `after`, of one stream or of all, of one event type or of all.
pub async fn events(pool: &PgPool, stream: Option<&str>, event_type: Option<&str>, after: i64, limit: u32) -> Result<Page<RecordedEvent>> {
    const COLUMNS: &str =
        "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at, occurred_at, prev_hash, hash FROM events";
    let fetched = i64::from(limit) + 1;
    let rows = match (stream, event_type) {
        (None, None) => ledger::log::read_after(pool, after, limit as usize + 1).await?,
        (Some(stream), None) => {
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE stream_id = $1 AND position > $2 ORDER BY position LIMIT $3"
            ))
            .bind(stream)
            .bind(after)
            .bind(fetched)
            .fetch_all(pool)
            .await?
        }
        (Some(stream), Some(event_type)) => {
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE stream_id = $1 AND event_type = $4 AND position > $2 ORDER BY position LIMIT $3"
            ))
            .bind(stream)
            .bind(after)
            .bind(fetched)
            .bind(event_type)
            .fetch_all(pool)
            .await?
        }
        // By position with the type checked on the way (no index on the type: it would tax every append).
        (None, Some(event_type)) => {
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE event_type = $1 AND position > $2 ORDER BY position LIMIT $3"
            ))
            .bind(event_type)
            .bind(after)
            .bind(fetched)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(Page::of(rows, limit, |event: &RecordedEvent| event.position.to_string()))
}

/// The top-up (and its account) that payment `payment_id` settled, from the log.
pub async fn topup_settled_by(pool: &PgPool, payment_id: &str) -> Result<Option<(AccountId, TopUpId)>> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT stream_id, payload->>'topup_id' FROM events WHERE event_type = 'TopUpSettled' AND payload->>'payment_id' = $1 LIMIT 1",
    )
    .bind(payment_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(stream, topup)| {
        let account_id = stream.strip_prefix("account-").and_then(|id| AccountId::parse(id).ok())?;
        Some((account_id, TopUpId::parse(&topup).ok()?))
    }))
}

/// The top-up whose payment `payment_id` is held for review, from the log.
pub async fn topup_held_for(pool: &PgPool, payment_id: &str) -> Result<Option<TopUpId>> {
    let stream: Option<String> = sqlx::query_scalar(
        "SELECT stream_id FROM events WHERE event_type = 'PaymentHeldForReview' AND payload->>'payment_id' = $1 LIMIT 1",
    )
    .bind(payment_id)
    .fetch_optional(pool)
    .await?;
    Ok(stream.and_then(|stream| TopUpId::parse(stream.strip_prefix("topup-")?).ok()))
}

/// Accounts, servers and events there are.
pub async fn counts(pool: &PgPool) -> Result<(i64, i64, i64)> {
    sqlx::query_as("SELECT (SELECT count(*) FROM rm.balances), (SELECT count(*) FROM rm.servers), (SELECT position FROM ledger_head)")
        .fetch_one(pool)
        .await
}

/// The first account (by id) whose name starts with `prefix`.
pub async fn first_account_named(pool: &PgPool, prefix: &str) -> Result<Option<AccountId>> {
    let pattern = format!("{}%", like_escaped(prefix));
    let id: Option<Uuid> = sqlx::query_scalar("SELECT account_id FROM rm.balances WHERE name LIKE $1 ORDER BY account_id LIMIT 1")
        .bind(pattern)
        .fetch_optional(pool)
        .await?;
    Ok(id.map(AccountId))
}

/// The domain time of the latest event in the log.
pub async fn last_occurred_at(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar("SELECT max(occurred_at) FROM events").fetch_one(pool).await
}

/// The event at `position`, and the one before it (for its hash), from the log.
pub async fn event_with_previous(pool: &PgPool, position: i64) -> Result<(Option<RecordedEvent>, Option<RecordedEvent>)> {
    let events = ledger::log::read_after(pool, (position - 2).max(0), 2).await?;
    let event = events.iter().find(|event| event.position == position).cloned();
    let previous = events.into_iter().find(|event| event.position == position - 1);
    Ok((event, previous))
}

/// An account's statement rows that carry one of `references` (the charges an invoice bills).
pub async fn statement_rows_of(pool: &PgPool, account_id: AccountId, references: &[String]) -> Result<Vec<StatementRow>> {
    sqlx::query_as("SELECT * FROM rm.statement WHERE account_id = $1 AND reference = ANY($2) ORDER BY position")
        .bind(account_id.0)
        .bind(references)
        .fetch_all(pool)
        .await
}

/// An account's latest money movements, newest first.
pub async fn statement_latest(pool: &PgPool, account_id: AccountId, limit: u32) -> Result<Vec<StatementRow>> {
    sqlx::query_as("SELECT * FROM rm.statement WHERE account_id = $1 ORDER BY position DESC LIMIT $2")
        .bind(account_id.0)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
}

/// The account's balance at the end of each of `days` days ending with `last` (UTC), carried over
/// days without movements; zero before the first.
pub async fn balance_by_day(
    pool: &PgPool,
    account_id: AccountId,
    last: chrono::NaiveDate,
    days: u32,
) -> Result<Vec<(chrono::NaiveDate, rust_decimal::Decimal)>> {
    let first = last - chrono::Days::new(u64::from(days.max(1) - 1));
    let start = first.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
    let end = (last + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let opening: Option<rust_decimal::Decimal> = sqlx::query_scalar(
        "SELECT balance_after FROM rm.statement WHERE account_id = $1 AND occurred_at < $2 ORDER BY position DESC LIMIT 1",
    )
    .bind(account_id.0)
    .bind(start)
    .fetch_optional(pool)
    .await?;
    let closings: Vec<(chrono::NaiveDate, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT DISTINCT ON (day) (occurred_at AT TIME ZONE 'UTC')::date AS day, balance_after FROM rm.statement
          WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3
          ORDER BY day, position DESC",
    )
    .bind(account_id.0)
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?;
    let closings: std::collections::HashMap<_, _> = closings.into_iter().collect();
    let mut balance = opening.unwrap_or_default();
    Ok(first
        .iter_days()
        .take(days.max(1) as usize)
        .map(|day| {
            if let Some(closing) = closings.get(&day) {
                balance = *closing;
            }
            (day, balance)
        })
        .collect())
}

/// Hosting revenue (net of tax, less cancellation refunds; service credits are expenses and not
/// taken off) per currency and day, over the days `[first, last]` (UTC), from the journal.
pub async fn revenue_by_day(
    pool: &PgPool,
    first: chrono::NaiveDate,
    last: chrono::NaiveDate,
) -> Result<Vec<(String, chrono::NaiveDate, rust_decimal::Decimal)>> {
    sqlx::query_as(
        "SELECT currency, day, sum(credit - debit) FROM rm.journal_totals
          WHERE ledger_account = $3 AND day BETWEEN $1 AND $2
          GROUP BY currency, day ORDER BY currency, day",
    )
    .bind(first)
    .bind(last)
    .bind(domain::postings::HOSTING_INCOME)
    .fetch_all(pool)
    .await
}

/// The latest hourly charge of a server (its newest `charge` statement row).
pub async fn latest_charge_of_server(pool: &PgPool, account_id: AccountId, server_id: ServerId) -> Result<Option<StatementRow>> {
    sqlx::query_as("SELECT * FROM rm.statement WHERE account_id = $1 AND server_id = $2 AND kind = 'charge' ORDER BY position DESC LIMIT 1")
        .bind(account_id.0)
        .bind(server_id.0)
        .fetch_optional(pool)
        .await
}
