//! Writing rows set-wise: rows serialise to JSON text and PostgreSQL turns them into typed rows with
//! `json_populate_recordset` (amounts travel as strings, so nothing is rounded on the way, and a
//! `json` column keeps its value's text as written, as `COPY` keeps it).

use std::any::Any;

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::postgres::PgArgumentBuffer;
use sqlx::{Encode, PgConnection, Postgres};

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
        "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_recordset(NULL::{table}, $1::json) ON CONFLICT ({}) {conflict}",
        key.join(", ")
    );
    sqlx::query(&sql)
        .bind(serde_json::to_string(rows).map_err(|error| sqlx::Error::Encode(Box::new(error)))?)
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
        "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_recordset(NULL::{table}, $1::json) ON CONFLICT ({}) DO NOTHING",
        key.join(", ")
    );
    sqlx::query(&sql)
        .bind(serde_json::to_string(rows).map_err(|error| sqlx::Error::Encode(Box::new(error)))?)
        .execute(tx)
        .await?;
    Ok(())
}

/// A row as `copy_new` streams it: each of its columns, in order, given to `CopyFields::field`.
pub trait CopyRow {
    fn copy_fields(&self, fields: &mut CopyFields);
}

/// Rows in the binary form of `COPY` (a signature, then each row as its field count and each
/// field as its length and its value as PostgreSQL's binary input takes it, -1 for NULL), each
/// field encoded as sqlx encodes a bound parameter of its type.
pub struct CopyFields {
    out: PgArgumentBuffer,
    /// Fields written in the current row.
    written: usize,
    error: Option<sqlx::Error>,
}

impl CopyFields {
    fn new(capacity: usize) -> CopyFields {
        let mut out = PgArgumentBuffer::default();
        out.reserve(capacity);
        out.extend_from_slice(ledger::COPY_BINARY_HEADER);
        CopyFields {
            out,
            written: 0,
            error: None,
        }
    }

    /// Writes the next column's value. Only types whose binary form needs nothing resolved later
    /// belong here: numbers, text, uuids, instants, decimals and `Option`s of them; JSON goes
    /// through `json` (sqlx's `Json` leaves a fix-up for a `json` parameter behind per value).
    pub fn field<T: Encode<'static, Postgres> + Any>(&mut self, value: &T) {
        // sqlx sends every zero as a numeric of scale 0, where the text the live path binds
        // ("0.00") keeps its scale: decimals are written here, scale and all.
        let any: &dyn Any = value;
        if let Some(decimal) = any.downcast_ref::<Decimal>() {
            return self.decimal(decimal);
        }
        if let Some(Some(decimal)) = any.downcast_ref::<Option<Decimal>>() {
            return self.decimal(decimal);
        }
        let at = self.open();
        let written = value.encode_by_ref(&mut self.out);
        self.close(at, written);
    }

    /// Writes a `numeric` with the decimal's scale, a zero too (no digits, its scale as the
    /// display scale), as `numeric_in` keeps "0.00".
    fn decimal(&mut self, value: &Decimal) {
        if !value.is_zero() {
            let at = self.open();
            let written = value.encode_by_ref(&mut self.out);
            return self.close(at, written);
        }
        let at = self.open();
        self.out.extend_from_slice(&0i16.to_be_bytes()); // digits
        self.out.extend_from_slice(&0i16.to_be_bytes()); // weight
        self.out.extend_from_slice(&0u16.to_be_bytes()); // sign: positive, as PostgreSQL keeps every zero
        self.out.extend_from_slice(&(value.scale() as u16).to_be_bytes()); // display scale
        self.close(at, Ok(IsNull::No));
    }

    /// Writes the next column's value as `json`, whose binary form is its text, as serde_json
    /// writes it for `upsert` and `insert_new`.
    pub fn json<T: Serialize>(&mut self, value: &T) {
        let at = self.open();
        let written = serde_json::to_writer(&mut *self.out, value)
            .map(|()| IsNull::No)
            .map_err(|error| error.into());
        self.close(at, written);
    }

    /// Starts a field with room for its length; returns where the length goes.
    fn open(&mut self) -> usize {
        let at = self.out.len();
        self.out.extend_from_slice(&0i32.to_be_bytes());
        at
    }

    /// Ends the field started at `at`: its length, or -1 for NULL. An error is kept for `row`.
    fn close(&mut self, at: usize, written: Result<IsNull, sqlx::error::BoxDynError>) {
        let length = match written {
            Ok(IsNull::No) => i32::try_from(self.out.len() - at - 4).map_err(|error| error.into()),
            Ok(IsNull::Yes) => {
                self.out.truncate(at + 4);
                Ok(-1)
            }
            Err(error) => Err(error),
        };
        match length {
            Ok(length) => self.out[at..at + 4].copy_from_slice(&length.to_be_bytes()),
            Err(error) => {
                self.error.get_or_insert(sqlx::Error::Encode(error));
            }
        }
        self.written += 1;
    }

    fn row<T: CopyRow>(&mut self, row: &T, columns: usize) -> Result<(), sqlx::Error> {
        self.out.extend_from_slice(&(columns as i16).to_be_bytes());
        self.written = 0;
        row.copy_fields(self);
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        if self.written != columns {
            return Err(sqlx::Error::Encode(
                format!("a row gave {} fields for {columns} columns", self.written).into(),
            ));
        }
        Ok(())
    }

    /// The trailer: a field count of -1.
    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&(-1i16).to_be_bytes());
        std::mem::take(&mut *self.out)
    }
}

/// Streams rows into `table` with `COPY ... (FORMAT binary)`: for a rebuild's bulk load into a
/// side table where every row is new.
pub async fn copy_new<T: CopyRow>(tx: &mut PgConnection, table: &str, columns: &[&str], rows: &[T]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut fields = CopyFields::new(rows.len() * 128);
    for row in rows {
        fields.row(row, columns.len())?;
    }
    let data = fields.finish();
    let mut copy = tx
        .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN (FORMAT binary)", columns.join(", ")))
        .await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}
