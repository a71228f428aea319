//! The appender: one task per process that groups concurrent appends into one transaction.
//!
//! Each batch locks the `ledger_head` row first, so batches from every process are serialised; under
//! that lock it reads the streams' versions and the already stored event ids, decides each request
//! (appended, duplicate, conflict), assigns positions `head + 1 ..` and the hash chain in memory,
//! inserts all rows with one statement, moves the head and notifies once, then commits. A request
//! that fails its checks is answered without touching the others in its batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::chain::{canonical_json, to_stored_precision, Envelope};
use crate::event::{AppendError, AppendOutcome, AppendRequest};
use crate::LogConfig;

pub(crate) const NOTIFY_CHANNEL: &str = "ledger_events";

pub(crate) struct Job {
    pub request: AppendRequest,
    pub reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

pub(crate) async fn run(pool: PgPool, mut jobs: mpsc::Receiver<Job>, head: watch::Sender<i64>, config: LogConfig) {
    let mut scratch = Vec::with_capacity(1024);
    while let Some(first) = jobs.recv().await {
        let mut events = first.request.event_count();
        let mut batch = vec![first];
        while events < config.batch_events_max {
            match jobs.try_recv() {
                Ok(job) => {
                    events += job.request.event_count();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        commit_jobs(&pool, batch, &head, &config, &mut scratch).await;
    }
}

async fn commit_jobs(pool: &PgPool, jobs: Vec<Job>, head: &watch::Sender<i64>, config: &LogConfig, scratch: &mut Vec<u8>) {
    let requests: Vec<&AppendRequest> = jobs.iter().map(|job| &job.request).collect();
    match commit_batch(pool, &requests, config, scratch).await {
        Ok((results, head_position)) => {
            head.send_if_modified(|current| {
                let moved = head_position > *current;
                *current = (*current).max(head_position);
                moved
            });
            for (job, result) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(error) if jobs.len() > 1 => {
            // One request may carry what the database refuses (say a NUL in a JSON string):
            // retry each alone, so the others are not lost with it.
            tracing::warn!(%error, requests = jobs.len(), "batched append failed; retrying requests one by one");
            for job in jobs {
                Box::pin(commit_jobs(pool, vec![job], head, config, scratch)).await;
            }
        }
        Err(error) => {
            let error = AppendError::Database(Arc::new(error));
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Rows to insert, column by column, for one `UNNEST` insert.
#[derive(Default)]
struct Columns {
    position: Vec<i64>,
    stream_id: Vec<String>,
    stream_version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    payload: Vec<String>,
    metadata: Vec<String>,
    occurred_at: Vec<DateTime<Utc>>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

type BatchResult = (Vec<Result<AppendOutcome, AppendError>>, i64);

async fn commit_batch(
    pool: &PgPool,
    requests: &[&AppendRequest],
    config: &LogConfig,
    scratch: &mut Vec<u8>,
) -> Result<BatchResult, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let head_row = sqlx::query("SELECT position, hash, clock_timestamp() AS now FROM ledger_head WHERE singleton FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    let mut head_position: i64 = head_row.try_get("position")?;
    let head_hash: Vec<u8> = head_row.try_get("hash")?;
    let mut head_hash: [u8; 32] = head_hash.try_into().expect("ledger_head.hash is 32 bytes by its CHECK");
    let recorded_at = to_stored_precision(head_row.try_get::<DateTime<Utc>, _>("now")?);

    let stream_ids: Vec<String> = unique(requests.iter().flat_map(|r| r.streams.iter().map(|s| s.stream_id.clone())));
    let event_ids: Vec<Uuid> = requests.iter().flat_map(|r| r.event_ids()).collect();
    let (mut versions, mut stored) = known_versions_and_ids(&mut tx, &stream_ids, &event_ids).await?;

    let mut columns = Columns::default();
    let mut results = Vec::with_capacity(requests.len());
    for request in requests {
        let result = decide(request, &versions, &stored).and_then(|duplicate| match duplicate {
            Some(outcome) => Ok(outcome),
            None => {
                let first_position = head_position + 1;
                for stream in &request.streams {
                    let version = versions.entry(stream.stream_id.clone()).or_insert(0);
                    for event in &stream.events {
                        head_position += 1;
                        *version += 1;
                        let occurred_at = event.occurred_at.map(to_stored_precision).unwrap_or(recorded_at);
                        let payload_json = canonical_json(&event.payload);
                        let metadata_json = canonical_json(&event.metadata);
                        let envelope = Envelope {
                            position: head_position,
                            stream_id: &stream.stream_id,
                            stream_version: *version,
                            event_id: event.event_id,
                            event_type: &event.event_type,
                            schema_version: event.schema_version,
                            payload_json: &payload_json,
                            metadata_json: &metadata_json,
                            recorded_at,
                            occurred_at,
                        };
                        let hash = envelope.hash(&head_hash, scratch);
                        columns.position.push(head_position);
                        columns.stream_id.push(stream.stream_id.clone());
                        columns.stream_version.push(*version);
                        columns.event_id.push(event.event_id);
                        columns.event_type.push(event.event_type.clone());
                        columns.schema_version.push(event.schema_version);
                        columns.payload.push(payload_json);
                        columns.metadata.push(metadata_json);
                        columns.occurred_at.push(occurred_at);
                        columns.prev_hash.push(head_hash.to_vec());
                        columns.hash.push(hash.to_vec());
                        stored.insert(event.event_id, head_position);
                        head_hash = hash;
                    }
                }
                Ok(AppendOutcome {
                    first_position,
                    last_position: head_position,
                    duplicate: false,
                })
            }
        });
        results.push(result);
    }

    if !columns.position.is_empty() {
        sqlx::query(
            "INSERT INTO events (position, stream_id, stream_version, event_id, event_type, schema_version, \
                                 payload, metadata, recorded_at, occurred_at, prev_hash, hash) \
             SELECT position, stream_id, stream_version, event_id, event_type, schema_version, \
                    payload::jsonb, metadata::jsonb, $9, occurred_at, prev_hash, hash \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int[], \
                         $7::text[], $8::text[], $10::timestamptz[], $11::bytea[], $12::bytea[]) \
                  AS t(position, stream_id, stream_version, event_id, event_type, schema_version, \
                       payload, metadata, occurred_at, prev_hash, hash)",
        )
        .bind(&columns.position)
        .bind(&columns.stream_id)
        .bind(&columns.stream_version)
        .bind(&columns.event_id)
        .bind(&columns.event_type)
        .bind(&columns.schema_version)
        .bind(&columns.payload)
        .bind(&columns.metadata)
        .bind(recorded_at)
        .bind(&columns.occurred_at)
        .bind(&columns.prev_hash)
        .bind(&columns.hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "WITH moved AS (UPDATE ledger_head SET position = $1, hash = $2 WHERE singleton RETURNING position) \
             SELECT pg_notify($3, position::text) FROM moved",
        )
        .bind(head_position)
        .bind(head_hash.to_vec())
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    }
    if !config.pause_before_commit_max.is_zero() {
        // A pseudo-random pause per batch; the head position is as good a seed as any.
        let max_micros = config.pause_before_commit_max.as_micros() as u64;
        let pause = (head_position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % max_micros.max(1);
        tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
    }
    tx.commit().await?;
    Ok((results, head_position))
}

/// Decides a request against the versions and ids known so far: `Some` is a duplicate (nothing to
/// write), `None` means append, an error rejects the request alone.
fn decide(
    request: &AppendRequest,
    versions: &HashMap<String, i64>,
    stored: &HashMap<Uuid, i64>,
) -> Result<Option<AppendOutcome>, AppendError> {
    let stored_positions: Vec<(Uuid, i64)> = request
        .event_ids()
        .filter_map(|id| stored.get(&id).map(|position| (id, *position)))
        .collect();
    if !stored_positions.is_empty() {
        // A retry of a stored append is answered with the stored positions; its expected versions
        // are not checked again, since the first attempt already moved the streams on.
        if stored_positions.len() == request.event_count() {
            let first_position = stored_positions.iter().map(|(_, p)| *p).min().expect("not empty");
            let last_position = stored_positions.iter().map(|(_, p)| *p).max().expect("not empty");
            return Ok(Some(AppendOutcome {
                first_position,
                last_position,
                duplicate: true,
            }));
        }
        return Err(AppendError::PartialDuplicate {
            stored_event_ids: stored_positions.into_iter().map(|(id, _)| id).collect(),
        });
    }
    for stream in &request.streams {
        let actual = versions.get(&stream.stream_id).copied().unwrap_or(0);
        stream.expected.check(&stream.stream_id, actual).map_err(AppendError::Conflict)?;
    }
    Ok(None)
}

fn unique(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    items.filter(|item| seen.insert(item.clone())).collect()
}

/// The current version of each stream and the position of each already stored event id, in one
/// round trip. LATERAL with LIMIT is never flattened into a join, so every stream and id is one
/// probe of its unique index whatever plan the prepared statement settles on (a plain
/// `event_id = ANY($1)` degraded to a scan under the generic plan).
async fn known_versions_and_ids(
    tx: &mut Transaction<'_, Postgres>,
    stream_ids: &[String],
    event_ids: &[Uuid],
) -> Result<(HashMap<String, i64>, HashMap<Uuid, i64>), sqlx::Error> {
    let rows: Vec<(Option<String>, Option<Uuid>, i64)> = sqlx::query_as(
        "SELECT s.stream_id, NULL::uuid, v.version FROM UNNEST($1::text[]) AS s(stream_id) \
         CROSS JOIN LATERAL (SELECT stream_version AS version FROM events e \
                             WHERE e.stream_id = s.stream_id ORDER BY stream_version DESC LIMIT 1) v \
         UNION ALL \
         SELECT NULL, i.event_id, e.position FROM UNNEST($2::uuid[]) AS i(event_id) \
         CROSS JOIN LATERAL (SELECT position FROM events \
                             WHERE events.event_id = i.event_id LIMIT 1) e",
    )
    .bind(stream_ids)
    .bind(event_ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut versions = HashMap::with_capacity(stream_ids.len());
    let mut stored = HashMap::new();
    for (stream_id, event_id, number) in rows {
        match (stream_id, event_id) {
            (Some(stream_id), None) => {
                versions.insert(stream_id, number);
            }
            (None, Some(event_id)) => {
                stored.insert(event_id, number);
            }
            _ => unreachable!("each row names a stream or an event"),
        }
    }
    Ok((versions, stored))
}
