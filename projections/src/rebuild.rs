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

use crate::decode::{read_records_after, Record};
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
    let was_refused = refused.is_some();
    let rebuilt = match refused {
        Some(error) => Err(error),
        None => rebuild_locked(pool, projections, &mut progress, started).await,
    };
    if rebuilt.is_err() && !was_refused {
        // A failed rebuild is over: its read models are no longer shown as rebuilding (cleared
        // while the locks are still held, so a rebuild started after keeps its own mark; a
        // refused one marked nothing, and the rebuild holding the lock keeps its mark).
        if let Err(error) = sqlx::query("UPDATE projection_status SET rebuilding = FALSE WHERE name = ANY($1) AND rebuilding")
            .bind(&locked)
            .execute(&mut *guard)
            .await
        {
            tracing::warn!(%error, "a failed rebuild's read models are still marked as rebuilding");
        }
    }
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
    // One reader feeds every read model; each applies the batches on a task of its own (so their
    // work in this process spreads over the cores and none waits for the slowest at every batch)
    // in its own transactions with its own checkpoint (nobody else writes them: the rebuild locks
    // are held). A read model may run at most a batch ahead of the slowest, so at most three
    // batches are held at once.
    let mut after = i64::MAX;
    for (_, checkpoint) in &sides {
        after = after.min(ledger::checkpoint::load(pool, checkpoint).await?);
    }
    let (applied, mut reports) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
    let mut feeds = Vec::with_capacity(projections.len());
    let mut appliers = Vec::with_capacity(projections.len());
    for (index, (projection, (schema, checkpoint))) in projections.iter().zip(&sides).enumerate() {
        let (feed, mut batches) = tokio::sync::mpsc::channel::<Arc<Vec<Record>>>(1);
        feeds.push(feed);
        let (pool, projection, schema, checkpoint, applied) = (
            pool.clone(),
            projection.clone(),
            schema.clone(),
            checkpoint.clone(),
            applied.clone(),
        );
        appliers.push(tokio::spawn(async move {
            let target = Target {
                projection: projection.as_ref(),
                schema: &schema,
                checkpoint: &checkpoint,
            };
            let mut events = 0i64;
            while let Some(records) = batches.recv().await {
                events += apply_records(&pool, &target, &records, true).await? as i64;
                if let Some(last) = records.last() {
                    // The receiver outlives every applier.
                    let _ = applied.send((index, last.position));
                }
            }
            Ok::<i64, ProjectionError>(events)
        }));
    }
    drop(applied);
    let reader_pool = pool.clone();
    let reader = tokio::spawn(async move {
        let mut after = after;
        loop {
            let records = read_records_after(&reader_pool, after, REBUILD_BATCH_EVENTS).await?;
            let Some(last) = records.last().map(|record| record.position) else {
                return Ok::<(), ProjectionError>(());
            };
            after = last;
            let records = Arc::new(records);
            for feed in &feeds {
                // A closed feed is an applier that failed: its error ends the rebuild.
                if feed.send(records.clone()).await.is_err() {
                    return Ok(());
                }
            }
        }
    });
    let mut tasks = Tasks { reader, appliers };
    // Progress is the position every read model has reached; the reports end when every
    // applier has.
    let followed: Result<i64, ProjectionError> = async {
        let mut reached = vec![after; projections.len()];
        let mut shown = after;
        let mut last_status = Instant::now();
        while let Some((index, position)) = reports.recv().await {
            reached[index] = position;
            let all = reached.iter().copied().min().unwrap_or(after);
            if all == shown {
                continue;
            }
            shown = all;
            let (head,): (i64,) = sqlx::query_as("SELECT position FROM ledger_head").fetch_one(pool).await?;
            progress(shown, head);
            if last_status.elapsed() > Duration::from_millis(500) {
                set_rebuild_position(pool, projections, shown).await?;
                last_status = Instant::now();
            }
        }
        Ok(shown)
    }
    .await;
    // Every task has ended before the rebuild returns, failed or not, so none writes into a side
    // schema that a later rebuild has made anew. A failure to follow stops the reader; the
    // appliers finish what they were given.
    if followed.is_err() {
        tasks.reader.abort();
    }
    let mut first_error = None;
    let mut events = Vec::with_capacity(projections.len());
    for applier in &mut tasks.appliers {
        match applier.await {
            Ok(Ok(applied)) => events.push(applied),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            // A read model's task that panicked fails the rebuild as that panic.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    match (&mut tasks.reader).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            first_error.get_or_insert(error);
        }
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => {} // aborted above
    }
    let shown = followed?;
    if let Some(error) = first_error {
        return Err(error);
    }
    set_rebuild_position(pool, projections, shown).await?;
    // Each read model's indexes are built on a connection of its own, all at once.
    try_join_all(projections.iter().zip(&sides).map(|(projection, (schema, _))| async move {
        let started = Instant::now();
        index_bulk_tables(pool, projection.as_ref(), schema).await?;
        tracing::debug!(
            projection = projection.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bulk tables indexed"
        );
        Ok::<(), ProjectionError>(())
    }))
    .await?;
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

/// A rebuild's reader and appliers, aborted if the rebuild is dropped before it has awaited them
/// (its caller gone): no task outlives the rebuild that spawned it.
struct Tasks {
    reader: tokio::task::JoinHandle<Result<(), ProjectionError>>,
    appliers: Vec<tokio::task::JoinHandle<Result<i64, ProjectionError>>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        for applier in &self.appliers {
            applier.abort();
        }
    }
}

async fn set_rebuild_position(pool: &PgPool, projections: &[Arc<dyn Projection>], position: i64) -> Result<(), ProjectionError> {
    for projection in projections {
        sqlx::query("UPDATE projection_status SET rebuild_position = $2 WHERE name = $1")
            .bind(projection.name())
            .bind(position)
            .execute(pool)
            .await?;
    }
    Ok(())
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
