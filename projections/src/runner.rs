//! Running a projection: a batch of events after its checkpoint, applied and checkpointed in one
//! transaction, so a crash anywhere neither loses nor applies twice.

use sqlx::{PgConnection, PgPool};

use crate::decode::{decode, DecodeError};
use crate::projection::Projection;

/// Where the live read models are.
pub const LIVE_SCHEMA: &str = "rm";
/// Events per batch: bounded, so one transaction stays short.
pub const BATCH_EVENTS: usize = 5_000;

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

/// Brings every live projection up to the head.
pub async fn catch_up_all(pool: &PgPool) -> Result<(), ProjectionError> {
    for projection in crate::projection::all() {
        catch_up(pool, projection.as_ref()).await?;
    }
    Ok(())
}
