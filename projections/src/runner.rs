//! Running a projection: a batch of events after its checkpoint, applied and checkpointed in one
//! transaction, so a crash anywhere neither loses nor applies twice.

use sqlx::{PgConnection, PgPool};

use crate::decode::{decode, DecodeError};
use crate::projection::Projection;

/// Where the live read models are.
pub const LIVE_SCHEMA: &str = "rm";
/// Events per batch: bounded, so one transaction stays short.
pub const BATCH_EVENTS: usize = 5_000;
/// Events per batch of a rebuild's bulk load into its side tables, which nobody reads yet: larger,
/// so each row a batch touches is rewritten fewer times.
pub const REBUILD_BATCH_EVENTS: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("no projection named {0:?}")]
    Unknown(String),
    #[error("{0} is being rebuilt already (by this or another process)")]
    AlreadyRebuilding(String),
}

/// Applies the next batch after `checkpoint` (not past `until`) in `tx`, writing into `schema`.
/// Returns the number of events applied.
pub async fn apply_batch(
    tx: &mut PgConnection,
    projection: &dyn Projection,
    schema: &str,
    checkpoint: &str,
    batch: usize,
    until: Option<i64>,
) -> Result<usize, ProjectionError> {
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{schema}, public"))
        .execute(&mut *tx)
        .await?;
    let position = ledger::checkpoint::lock(tx, checkpoint).await?;
    let mut events = ledger::log::read_after(&mut *tx, position, batch).await?;
    if let Some(until) = until {
        events.retain(|event| event.position <= until);
    }
    let Some(last) = events.last().map(|event| event.position) else {
        return Ok(0);
    };
    let records = events.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    projection.apply(tx, &records).await?;
    ledger::checkpoint::store(tx, checkpoint, last).await?;
    Ok(events.len())
}

/// One batch in a transaction of its own.
pub async fn run_batch(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    checkpoint: &str,
    batch: usize,
    until: Option<i64>,
) -> Result<usize, ProjectionError> {
    let mut tx = pool.begin().await?;
    let applied = apply_batch(&mut tx, projection, schema, checkpoint, batch, until).await?;
    tx.commit().await?;
    Ok(applied)
}

/// Brings a live projection up to the head of the log; returns its checkpoint.
pub async fn catch_up(pool: &PgPool, projection: &dyn Projection) -> Result<i64, ProjectionError> {
    while run_batch(pool, projection, LIVE_SCHEMA, projection.name(), BATCH_EVENTS, None).await? > 0 {}
    Ok(ledger::checkpoint::load(pool, projection.name()).await?)
}

/// Brings every live projection up to the head, reading and decoding each batch of the log once
/// for all of them: a batch after the lowest checkpoint is applied to each projection from its
/// own checkpoint on, and every checkpoint moves, in one transaction.
pub async fn catch_up_all(pool: &PgPool) -> Result<(), ProjectionError> {
    let projections = crate::projection::all();
    while apply_batch_to_all(pool, &projections).await? > 0 {}
    Ok(())
}

/// One batch for every live projection; returns the number of events read.
async fn apply_batch_to_all(pool: &PgPool, projections: &[std::sync::Arc<dyn Projection>]) -> Result<usize, ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{LIVE_SCHEMA}, public"))
        .execute(&mut *tx)
        .await?;
    // Always locked in the same order, so concurrent callers queue rather than deadlock.
    let mut positions = Vec::with_capacity(projections.len());
    for projection in projections {
        positions.push(ledger::checkpoint::lock(&mut tx, projection.name()).await?);
    }
    let from = positions.iter().copied().min().unwrap_or(0);
    let events = ledger::log::read_after(&mut *tx, from, BATCH_EVENTS).await?;
    let Some(last) = events.last().map(|event| event.position) else {
        return Ok(0);
    };
    let records = events.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    for (projection, position) in projections.iter().zip(positions) {
        // Records are in position order: this projection's share is what lies past its checkpoint.
        let unseen = &records[records.partition_point(|record| record.position <= position)..];
        if unseen.is_empty() {
            continue;
        }
        projection.apply(&mut tx, unseen).await?;
        ledger::checkpoint::store(&mut tx, projection.name(), last).await?;
    }
    tx.commit().await?;
    Ok(events.len())
}
