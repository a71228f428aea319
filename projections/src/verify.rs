//! Verify: replay the whole log through the same projection code into scratch tables, up to the
//! live projector's checkpoint, and compare every table with the live one row by row.

use serde::Serialize;
use sqlx::PgPool;

use crate::projection::Projection;
use crate::rebuild::prepare_side_schema;
use crate::runner::{apply_batch, run_batch, ProjectionError, BATCH_EVENTS, LIVE_SCHEMA};

/// Differences reported per table, at most.
const DIFFERENCES_MAX: i64 = 20;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Difference {
    pub table: String,
    /// The primary key of the row, comma-separated.
    pub key: String,
    /// The row as stored (`None`: missing from the live table).
    pub live: Option<String>,
    /// The row as the replay builds it (`None`: the live table has a row the replay does not).
    pub replayed: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProjectionCheck {
    pub name: &'static str,
    pub position: i64,
    pub differences: Vec<Difference>,
}

pub async fn verify(pool: &PgPool, projection: &dyn Projection) -> Result<ProjectionCheck, ProjectionError> {
    let name = projection.name();
    let schema = format!("rm_verify_{name}");
    let checkpoint = format!("{name}@verify");
    prepare_side_schema(pool, projection, &schema, &checkpoint).await?;
    let target = ledger::checkpoint::load(pool, name).await?;
    while run_batch(pool, projection, &schema, &checkpoint, BATCH_EVENTS, Some(target)).await? > 0 {}

    // Hold the live checkpoint still while the last events are replayed and the tables compared.
    let mut tx = pool.begin().await?;
    let position = ledger::checkpoint::lock(&mut tx, name).await?;
    while apply_batch(&mut tx, projection, &schema, &checkpoint, BATCH_EVENTS, Some(position)).await? > 0 {}
    let mut differences = Vec::new();
    for table in projection.tables() {
        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        )
        .bind(format!("{LIVE_SCHEMA}.{table}"))
        .fetch_all(&mut *tx)
        .await?;
        let key_text = key.iter().map(|column| format!("t.{column}::text")).collect::<Vec<_>>().join(", ");
        let live = format!("{LIVE_SCHEMA}.{table}");
        let replayed = format!("{schema}.{table}");
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(&format!(
            "WITH only_live AS (SELECT * FROM {live} EXCEPT SELECT * FROM {replayed}), \
                  only_replayed AS (SELECT * FROM {replayed} EXCEPT SELECT * FROM {live}), \
                  l AS (SELECT concat_ws(',', {key_text}) AS key, t::text AS row FROM only_live t), \
                  r AS (SELECT concat_ws(',', {key_text}) AS key, t::text AS row FROM only_replayed t) \
             SELECT COALESCE(l.key, r.key), l.row, r.row FROM l FULL JOIN r ON l.key = r.key ORDER BY 1 LIMIT {DIFFERENCES_MAX}"
        ))
        .fetch_all(&mut *tx)
        .await?;
        differences.extend(rows.into_iter().map(|(key, live, replayed)| Difference {
            table: (*table).to_string(),
            key,
            live,
            replayed,
        }));
    }
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM checkpoints WHERE name = $1")
        .bind(&checkpoint)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ProjectionCheck {
        name,
        position,
        differences,
    })
}
