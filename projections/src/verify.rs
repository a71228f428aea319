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

/// Rounds of catching the replay up with a live projector that keeps moving before the
/// comparison holds it still instead (only under a sustained stream of writes).
const SNAPSHOT_ROUNDS_MAX: usize = 20;

/// Replays the log into scratch tables of this run's own (two verifications at once never touch
/// each other's) up to the live checkpoint, and compares them with the live tables in one
/// snapshot that shows the live tables at exactly the replay's position. Writers are not held up:
/// the live projector is only held still if it moved on in every one of `SNAPSHOT_ROUNDS_MAX`
/// rounds.
pub async fn verify(pool: &PgPool, projection: &dyn Projection) -> Result<ProjectionCheck, ProjectionError> {
    let name = projection.name();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let schema = format!("rm_verify_{name}_{}", &run[..12]);
    let checkpoint = format!("{name}@verify-{}", &run[..12]);
    prepare_side_schema(pool, projection, &schema, &checkpoint, false).await?;
    let result = compare_when_caught_up(pool, projection, &schema, &checkpoint).await;
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM checkpoints WHERE name = $1")
        .bind(&checkpoint)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let (position, differences) = result?;
    Ok(ProjectionCheck {
        name,
        position,
        differences,
    })
}

async fn compare_when_caught_up(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    checkpoint: &str,
) -> Result<(i64, Vec<Difference>), ProjectionError> {
    let name = projection.name();
    let mut target = ledger::checkpoint::load(pool, name).await?;
    for _ in 0..SNAPSHOT_ROUNDS_MAX {
        while run_batch(pool, projection, schema, checkpoint, BATCH_EVENTS, Some(target)).await? > 0 {}
        // One snapshot for the live checkpoint and the live tables: the projector writes both in
        // one transaction, so they agree; the replay committed before it, so it is seen whole.
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let live = ledger::checkpoint::load(&mut *tx, name).await?;
        if live == target {
            let differences = compare(&mut tx, projection, schema).await?;
            tx.commit().await?;
            return Ok((target, differences));
        }
        tx.rollback().await?;
        target = live;
    }
    // The projector kept moving: hold it still for the last events and the comparison.
    let mut tx = pool.begin().await?;
    let position = ledger::checkpoint::lock(&mut tx, name).await?;
    while apply_batch(&mut tx, projection, schema, checkpoint, BATCH_EVENTS, Some(position)).await? > 0 {}
    let differences = compare(&mut tx, projection, schema).await?;
    tx.commit().await?;
    Ok((position, differences))
}

/// Every row that differs between the live tables and the replay's, by primary key.
async fn compare(tx: &mut sqlx::PgConnection, projection: &dyn Projection, schema: &str) -> Result<Vec<Difference>, ProjectionError> {
    let mut differences = Vec::new();
    for table in projection.tables() {
        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        )
        .bind(format!("{LIVE_SCHEMA}.{table}"))
        .fetch_all(&mut *tx)
        .await?;
        // `json` has no equality: its values are compared as `jsonb`.
        let (columns,): (String,) = sqlx::query_as(
            "SELECT string_agg(quote_ident(attname) || CASE WHEN atttypid = 'json'::regtype THEN '::jsonb' ELSE '' END, ', ' ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        )
        .bind(format!("{LIVE_SCHEMA}.{table}"))
        .fetch_one(&mut *tx)
        .await?;
        let key_text = key.iter().map(|column| format!("t.{column}::text")).collect::<Vec<_>>().join(", ");
        let live = format!("{LIVE_SCHEMA}.{table}");
        let replayed = format!("{schema}.{table}");
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(&format!(
            "WITH only_live AS (SELECT {columns} FROM {live} EXCEPT SELECT {columns} FROM {replayed}), \
                  only_replayed AS (SELECT {columns} FROM {replayed} EXCEPT SELECT {columns} FROM {live}), \
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
    Ok(differences)
}
