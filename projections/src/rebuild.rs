//! Rebuild without downtime: build a new version of a projection's tables from position 0 in a
//! side schema while the live tables keep serving, then, holding the live projector's checkpoint
//! lock, apply the last events and swap the tables in within one transaction. Readers see the old
//! tables or the new ones, never a half-built one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;

use crate::projection::Projection;
use futures::future::try_join_all;

use crate::decode::read_records_after;
use crate::runner::{apply_batch, apply_records, run_batch, ProjectionError, Target, BATCH_EVENTS, LIVE_SCHEMA, REBUILD_BATCH_EVENTS};

#[derive(Clone, Debug, Serialize)]
pub struct RebuildReport {
    pub name: &'static str,
    pub position: i64,
    pub events: i64,
    pub elapsed_ms: u128,
}

/// Creates `schema` holding empty copies of the projection's live tables (columns, constraints,
/// indexes; with `bulk`, its bulk tables without keys or indexes until `index_bulk_tables`), and
/// resets `checkpoint`.
pub(crate) async fn prepare_side_schema(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    checkpoint: &str,
    bulk: bool,
) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut *tx).await?;
    for table in projection.tables() {
        let like = if bulk && projection.bulk_tables().contains(table) {
            "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE"
        } else {
            "INCLUDING ALL"
        };
        sqlx::query(&format!("CREATE TABLE {schema}.{table} (LIKE {LIVE_SCHEMA}.{table} {like})"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM checkpoints WHERE name = $1")
        .bind(checkpoint)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Gives the bulk tables in `schema`, loaded without them, the keys and indexes of their live
/// counterparts (built once over all the rows rather than row by row).
async fn index_bulk_tables(pool: &PgPool, projection: &dyn Projection, schema: &str) -> Result<(), ProjectionError> {
    for table in projection.bulk_tables() {
        let live = format!("{LIVE_SCHEMA}.{table}");
        let indexes: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT pg_get_indexdef(i.indexrelid), quote_ident(c.conname), pg_get_constraintdef(c.oid) \
             FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x') \
             WHERE i.indrelid = $1::regclass AND i.indisvalid ORDER BY c.contype NULLS LAST, i.indexrelid",
        )
        .bind(&live)
        .fetch_all(pool)
        .await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL maintenance_work_mem = '256MB'").execute(&mut *tx).await?;
        for (index, constraint, definition) in indexes {
            let statement = match (constraint, definition) {
                (Some(name), Some(definition)) => format!("ALTER TABLE {schema}.{table} ADD CONSTRAINT {name} {definition}"),
                _ => {
                    // "CREATE [UNIQUE] INDEX name ON [ONLY] table USING ...": the same on the side table.
                    let (Some(on), Some(using)) = (index.find(" ON "), index.find(" USING ")) else {
                        return Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
                            "unexpected index definition: {index}"
                        ))));
                    };
                    format!("{} ON {schema}.{table}{}", &index[..on], &index[using..])
                }
            };
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

pub async fn rebuild(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    progress: impl FnMut(i64, i64),
) -> Result<RebuildReport, ProjectionError> {
    let mut reports = rebuild_all(pool, &[projection], progress).await?;
    Ok(reports.remove(0))
}

/// Rebuilds several read models at once: one pass over the log feeds all their side tables
/// (each batch read and decoded once), then each is swapped in as `rebuild` does.
pub async fn rebuild_all(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
    mut progress: impl FnMut(i64, i64),
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let started = Instant::now();
    // One rebuild of a read model at a time, across processes: a second would drop the first's
    // side schema. The locks are held by a connection of their own until the rebuild ends (or its
    // process dies).
    let mut guard = pool.acquire().await?;
    let mut locked: Vec<&str> = Vec::new();
    let mut refused = None;
    for projection in projections {
        let name = projection.name();
        let (taken,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock(hashtext('billing.rebuild'), hashtext($1))")
            .bind(name)
            .fetch_one(&mut *guard)
            .await?;
        if !taken {
            refused = Some(ProjectionError::AlreadyRebuilding(name.to_string()));
            break;
        }
        locked.push(name);
    }
    let rebuilt = match refused {
        Some(error) => Err(error),
        None => rebuild_locked(pool, projections, &mut progress, started).await,
    };
    for name in locked {
        let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext('billing.rebuild'), hashtext($1))")
            .bind(name)
            .execute(&mut *guard)
            .await;
    }
    rebuilt
}

async fn rebuild_locked(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
    progress: &mut impl FnMut(i64, i64),
    started: Instant,
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let sides: Vec<(String, String)> = projections
        .iter()
        .map(|projection| (format!("rm_next_{}", projection.name()), format!("{}@rebuild", projection.name())))
        .collect();
    for (projection, (schema, checkpoint)) in projections.iter().zip(&sides) {
        prepare_side_schema(pool, projection.as_ref(), schema, checkpoint, true).await?;
        sqlx::query(
            "INSERT INTO projection_status (name, rebuilding, rebuild_position) VALUES ($1, TRUE, 0) \
             ON CONFLICT (name) DO UPDATE SET rebuilding = TRUE, rebuild_position = 0",
        )
        .bind(projection.name())
        .execute(pool)
        .await?;
    }
    // The log is read one batch ahead of the one being applied, and each batch is applied to the
    // read models at once, each on its own task (so their work in this process spreads over the
    // cores) in its own transaction with its own checkpoint (nobody else writes them: the
    // rebuild locks are held).
    let mut after = i64::MAX;
    for (_, checkpoint) in &sides {
        after = after.min(ledger::checkpoint::load(pool, checkpoint).await?);
    }
    let (batches, mut next) = tokio::sync::mpsc::channel(1);
    let reader_pool = pool.clone();
    tokio::spawn(async move {
        loop {
            let records = read_records_after(&reader_pool, after, REBUILD_BATCH_EVENTS).await;
            let last = records
                .as_ref()
                .ok()
                .and_then(|records| records.last().map(|record| record.position));
            // The receiver is gone if the rebuild failed; an error or the log's end ends the reading.
            if batches.send(records).await.is_err() {
                return;
            }
            match last {
                Some(last) => after = last,
                None => return,
            }
        }
    });
    let mut reached = after;
    let mut events = vec![0i64; projections.len()];
    let mut last_status = Instant::now();
    loop {
        let records = next
            .recv()
            .await
            .ok_or_else(|| ProjectionError::Database(sqlx::Error::Protocol("the rebuild's reader stopped".to_string())))??;
        let position = records.last().map(|record| record.position);
        if let Some(position) = position {
            reached = position;
            let records = Arc::new(records);
            let tasks: Vec<_> = projections
                .iter()
                .zip(&sides)
                .map(|(projection, (schema, checkpoint))| {
                    let (pool, projection, schema, checkpoint, records) = (
                        pool.clone(),
                        projection.clone(),
                        schema.clone(),
                        checkpoint.clone(),
                        records.clone(),
                    );
                    tokio::spawn(async move {
                        let target = Target {
                            projection: projection.as_ref(),
                            schema: &schema,
                            checkpoint: &checkpoint,
                        };
                        apply_records(&pool, &target, &records, true).await
                    })
                })
                .collect();
            for (total, task) in events.iter_mut().zip(try_join_all(tasks).await.unwrap_or_else(|error| {
                // A read model's task panicked: the rebuild fails as that panic.
                std::panic::resume_unwind(error.into_panic())
            })) {
                *total += task? as i64;
            }
        }
        let (head,): (i64,) = sqlx::query_as("SELECT position FROM ledger_head").fetch_one(pool).await?;
        progress(reached, head);
        if last_status.elapsed() > Duration::from_millis(500) || position.is_none() {
            for projection in projections {
                sqlx::query("UPDATE projection_status SET rebuild_position = $2 WHERE name = $1")
                    .bind(projection.name())
                    .bind(reached)
                    .execute(pool)
                    .await?;
            }
            last_status = Instant::now();
        }
        if position.is_none() {
            break;
        }
    }
    for (projection, (schema, _)) in projections.iter().zip(&sides) {
        let started = Instant::now();
        index_bulk_tables(pool, projection.as_ref(), schema).await?;
        tracing::debug!(
            projection = projection.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bulk tables indexed"
        );
    }
    // What was appended while the indexes were built is applied before the swap, so the swap's
    // own tail (applied while the live projector waits) stays short.
    for ((projection, (schema, checkpoint)), events) in projections.iter().zip(&sides).zip(events.iter_mut()) {
        loop {
            let applied = run_batch(pool, projection.as_ref(), schema, checkpoint, BATCH_EVENTS, None).await?;
            *events += applied as i64;
            if applied == 0 {
                break;
            }
        }
    }
    let mut reports = Vec::with_capacity(projections.len());
    for ((projection, (schema, checkpoint)), events) in projections.iter().zip(&sides).zip(events) {
        reports.push(swap(pool, projection.as_ref(), schema, checkpoint, events, started).await?);
    }
    Ok(reports)
}

/// Swaps a rebuilt read model in.
async fn swap(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    checkpoint: &str,
    mut events: i64,
    started: Instant,
) -> Result<RebuildReport, ProjectionError> {
    let name = projection.name();
    // The swap: the live projector waits on its checkpoint while the last events are applied to
    // the new tables and they take the live ones' place.
    let mut tx = pool.begin().await?;
    ledger::checkpoint::lock(&mut tx, name).await?;
    loop {
        let applied = apply_batch(&mut tx, projection, schema, checkpoint, BATCH_EVENTS, None).await?;
        events += applied as i64;
        if applied == 0 {
            break;
        }
    }
    let position: i64 = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
        .bind(checkpoint)
        .fetch_one(&mut *tx)
        .await?;
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE {LIVE_SCHEMA}.{table}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA {LIVE_SCHEMA}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {LIVE_SCHEMA}.{table} TO billing_app"
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE checkpoints SET position = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(position)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM checkpoints WHERE name = $1")
        .bind(checkpoint)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP SCHEMA {schema}")).execute(&mut *tx).await?;
    if name == crate::balances::Balances.name() {
        // Every kept balance row is now from the old tables.
        crate::balances::Changed { position, accounts: None }
            .announce(&mut tx, false)
            .await?;
    }
    sqlx::query("UPDATE projection_status SET generation = generation + 1, rebuilding = FALSE, rebuild_position = $2, rebuilt_at = now() WHERE name = $1")
        .bind(name)
        .bind(position)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(RebuildReport {
        name,
        position,
        events,
        elapsed_ms: started.elapsed().as_millis(),
    })
}
