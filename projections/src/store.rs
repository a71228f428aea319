//! Writing rows set-wise: rows serialise to JSON and PostgreSQL turns them into typed rows with
//! `jsonb_populate_recordset` (amounts travel as strings, so nothing is rounded on the way).

use serde::Serialize;
use sqlx::PgConnection;

/// Inserts or replaces `rows` of `table` (unqualified: the transaction's search_path picks the
/// live or the rebuild schema). `key` is the primary key's columns, `columns` all columns.
pub async fn upsert<T: Serialize>(
    tx: &mut PgConnection,
    table: &str,
    key: &[&str],
    columns: &[&str],
    rows: &[T],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let updates = columns
        .iter()
        .filter(|column| !key.contains(column))
        .map(|column| format!("{column} = EXCLUDED.{column}"))
        .collect::<Vec<_>>()
        .join(", ");
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {updates}")
    };
    let list = columns.join(", ");
    let sql = format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_recordset(NULL::{table}, $1) ON CONFLICT ({}) {conflict}",
        key.join(", ")
    );
    sqlx::query(&sql)
        .bind(serde_json::to_value(rows).expect("rows serialise"))
        .execute(tx)
        .await?;
    Ok(())
}

/// Inserts rows that are never changed (statement lines, journal entries, issued invoices); a row
/// already there (the same event applied again) is left as it is.
pub async fn insert_new<T: Serialize>(
    tx: &mut PgConnection,
    table: &str,
    key: &[&str],
    columns: &[&str],
    rows: &[T],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let list = columns.join(", ");
    let sql = format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_recordset(NULL::{table}, $1) ON CONFLICT ({}) DO NOTHING",
        key.join(", ")
    );
    sqlx::query(&sql)
        .bind(serde_json::to_value(rows).expect("rows serialise"))
        .execute(tx)
        .await?;
    Ok(())
}

/// Streams rows into `table` with `COPY ... (FORMAT csv)`: for a rebuild's bulk load into a side
/// table where every row is new. Fields serialise as they do for `upsert` (amounts as exact
/// decimal strings); a `None` is an unquoted empty field, which `COPY` reads as NULL.
pub async fn copy_new<T: Serialize>(tx: &mut PgConnection, table: &str, columns: &[&str], rows: &[T]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .quote_style(csv::QuoteStyle::Necessary)
        .from_writer(Vec::with_capacity(rows.len() * 160));
    for row in rows {
        writer.serialize(row).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    }
    let data = writer
        .into_inner()
        .map_err(|error| sqlx::Error::Encode(Box::new(error.into_error())))?;
    let mut copy = tx
        .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN (FORMAT csv)", columns.join(", ")))
        .await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}
