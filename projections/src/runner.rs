//! Running a projection: a batch of events after its checkpoint, applied and checkpointed in one
//! transaction, so a crash anywhere neither loses nor applies twice.

use sqlx::{PgConnection, PgPool};

use crate::decode::{read_records_after, DecodeError, Record};
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
    let position = ledger::checkpoint::lock(tx, checkpoint).await?;
    let mut records = read_records_after(&mut *tx, position, batch).await?;
    if let Some(until) = until {
        records.retain(|record| record.position <= until);
    }
    let Some(last) = records.last().map(|record| record.position) else {
        return Ok(0);
    };
    let target = Target {
        projection,
        schema,
        checkpoint,
    };
    apply_to(tx, &target, &records, position, last, false).await
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

/// Where a projection is applied: the schema of its tables and its checkpoint.
pub struct Target<'a> {
    pub projection: &'a dyn Projection,
    pub schema: &'a str,
    pub checkpoint: &'a str,
}

/// Brings every live projection up to the head, reading and decoding each batch of the log once
/// for all of them.
pub async fn catch_up_all(pool: &PgPool) -> Result<i64, ProjectionError> {
    let projections = crate::projection::all();
    let targets: Vec<Target> = projections
        .iter()
        .map(|projection| Target {
            projection: projection.as_ref(),
            schema: LIVE_SCHEMA,
            checkpoint: projection.name(),
        })
        .collect();
    loop {
        let mut tx = pool.begin().await?;
        let (read, _, through) = apply_batch_to_each(&mut tx, &targets, BATCH_EVENTS, false).await?;
        tx.commit().await?;
        if read == 0 {
            return Ok(through);
        }
    }
}

/// One batch for several projections in `tx`: the events after the lowest of their checkpoints,
/// read and decoded once, each projection given those past its own checkpoint (in its schema), and
/// every checkpoint moved. The checkpoints are locked in the order given, so callers that give
/// the same order queue rather than deadlock. `bulk` applies with `Projection::apply_bulk` (a
/// rebuild's side tables). Returns the events read, those applied to each, and the position every
/// checkpoint has now passed (the last read, or when none was, the lowest checkpoint: then all
/// stand at the head).
pub async fn apply_batch_to_each(
    tx: &mut PgConnection,
    targets: &[Target<'_>],
    batch: usize,
    bulk: bool,
) -> Result<(usize, Vec<usize>, i64), ProjectionError> {
    let mut positions = Vec::with_capacity(targets.len());
    for target in targets {
        positions.push(ledger::checkpoint::lock(tx, target.checkpoint).await?);
    }
    let from = positions.iter().copied().min().unwrap_or(0);
    let started = std::time::Instant::now();
    let records = read_records_after(&mut *tx, from, batch).await?;
    let Some(last) = records.last().map(|record| record.position) else {
        return Ok((0, vec![0; targets.len()], from));
    };
    tracing::debug!(
        events = records.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch read and decoded"
    );
    let mut applied = Vec::with_capacity(targets.len());
    for (target, position) in targets.iter().zip(positions) {
        applied.push(apply_to(tx, target, &records, position, last, bulk).await?);
    }
    Ok((records.len(), applied, last))
}

/// Applies to `target` the records past its checkpoint (`position`, locked by the caller) and
/// moves its checkpoint to `last`. Returns the number applied.
async fn apply_to(
    tx: &mut PgConnection,
    target: &Target<'_>,
    records: &[Record],
    position: i64,
    last: i64,
    bulk: bool,
) -> Result<usize, ProjectionError> {
    // Records are in position order: this projection's share is what lies past its checkpoint.
    let unseen = &records[records.partition_point(|record| record.position <= position)..];
    if unseen.is_empty() {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{}, public", target.schema))
        .execute(&mut *tx)
        .await?;
    if bulk {
        target.projection.apply_bulk(tx, unseen).await?;
    } else {
        target.projection.apply(tx, unseen).await?;
    }
    ledger::checkpoint::store(tx, target.checkpoint, last).await?;
    tracing::debug!(
        projection = target.projection.name(),
        events = unseen.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch applied"
    );
    Ok(unseen.len())
}

/// Applies a batch of records (in position order, not empty) to one target in a transaction of
/// its own: those past its checkpoint, which moves to the last record's position.
pub async fn apply_records(pool: &PgPool, target: &Target<'_>, records: &[Record], bulk: bool) -> Result<usize, ProjectionError> {
    let Some(last) = records.last().map(|record| record.position) else {
        return Ok(0);
    };
    let mut tx = pool.begin().await?;
    let position = ledger::checkpoint::lock(&mut tx, target.checkpoint).await?;
    let applied = apply_to(&mut tx, target, records, position, last, bulk).await?;
    tx.commit().await?;
    Ok(applied)
}
