//! The appender: one task per process that groups concurrent appends into one transaction.
//!
//! Each batch locks the `ledger_head` row first, so batches from every process are serialised
//! (two of this process's batches overlap only in that the second waits for the lock while the
//! first finishes); under that lock it reads the streams' versions and the already stored event ids, decides each request
//! (appended, duplicate, conflict), assigns positions `head + 1 ..` and the hash chain in memory,
//! streams the rows to PostgreSQL with one binary `COPY` as it chains them, moves the head and
//! notifies once, then commits. A request
//! that fails its checks is answered without touching the others in its batch.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgCopyIn, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use uuid::Uuid;

use crate::chain::{to_stored_precision, Envelope};
use crate::event::{AppendError, AppendOutcome, AppendRequest, ExpectedVersion};
use crate::LogConfig;

pub(crate) const NOTIFY_CHANNEL: &str = "ledger_events";

pub(crate) struct Job {
    pub request: AppendRequest,
    /// Each event's payload and metadata as canonical JSON, in the request's order.
    pub json: Vec<(String, String)>,
    pub reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

/// Two batches overlap: while one holds the log's lock, the other's `BEGIN` and lock request are
/// already waiting in PostgreSQL, so the lock passes to it the moment the first commits, without
/// a round trip between them. A loop takes its batch's further jobs only once it holds the lock,
/// so everything queued meanwhile goes into that batch.
const BATCHES_IN_FLIGHT: usize = 2;

pub(crate) async fn run(pool: PgPool, jobs: mpsc::Receiver<Job>, head: watch::Sender<i64>, config: LogConfig) {
    // The writer's own connections, one per loop: taken from the shared pool, a batch would land
    // on whichever of its connections was idle, each with its own cold statement and plan cache.
    let pool = PgPoolOptions::new()
        .max_connections(BATCHES_IN_FLIGHT as u32)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .connect_lazy_with((*pool.connect_options()).clone());
    let jobs = Arc::new(Mutex::new(jobs));
    let loops = (0..BATCHES_IN_FLIGHT).map(|_| writer_loop(&pool, &jobs, &head, &config));
    futures::future::join_all(loops).await;
}

async fn writer_loop(pool: &PgPool, jobs: &Mutex<mpsc::Receiver<Job>>, head: &watch::Sender<i64>, config: &LogConfig) {
    let mut scratch = Vec::with_capacity(1024);
    loop {
        let Some(first) = jobs.lock().await.recv().await else {
            return;
        };
        let locked = lock(pool).await;
        let mut events = first.request.event_count();
        let mut batch = vec![first];
        // A loop still holding the queue is waiting for a job (the queue was empty). Without the
        // lock, the first job is answered alone and the rest wait for a working connection.
        if let (true, Ok(mut queue)) = (locked.is_ok(), jobs.try_lock()) {
            while events < config.batch_events_max {
                match queue.try_recv() {
                    Ok(job) => {
                        events += job.request.event_count();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        commit_jobs(pool, batch, locked, head, config, &mut scratch).await;
    }
}

/// A transaction holding the log's lock, with the head it locked.
struct Locked {
    tx: Transaction<'static, Postgres>,
    position: i64,
    hash: [u8; 32],
    recorded_at: DateTime<Utc>,
    started: std::time::Instant,
    locked: std::time::Duration,
}

async fn lock(pool: &PgPool) -> Result<Locked, sqlx::Error> {
    let started = std::time::Instant::now();
    // Each statement must see what committed before it (the versions read after the lock is
    // granted), whatever the database's default isolation.
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
    let head_row = sqlx::query("SELECT position, hash, clock_timestamp() AS now FROM ledger_head WHERE singleton FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    let hash: Vec<u8> = head_row.try_get("hash")?;
    Ok(Locked {
        position: head_row.try_get("position")?,
        hash: hash.try_into().expect("ledger_head.hash is 32 bytes by its CHECK"),
        recorded_at: to_stored_precision(head_row.try_get::<DateTime<Utc>, _>("now")?),
        tx,
        started,
        locked: started.elapsed(),
    })
}

async fn commit_jobs(
    pool: &PgPool,
    jobs: Vec<Job>,
    locked: Result<Locked, sqlx::Error>,
    head: &watch::Sender<i64>,
    config: &LogConfig,
    scratch: &mut Vec<u8>,
) {
    let batch: Vec<&Job> = jobs.iter().collect();
    let committed = commit_deciding(pool, locked, &batch, config, scratch).await;
    match committed {
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
                let locked = lock(pool).await;
                Box::pin(commit_jobs(pool, vec![job], locked, head, config, scratch)).await;
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

type BatchResult = (Vec<Result<AppendOutcome, AppendError>>, i64);

/// Commits a batch under the lock it holds. Should a stored event id meet the unique index, the
/// batch is decided again under a new lock, looking every id up first, so a retry is answered
/// as the duplicate it is.
async fn commit_deciding(
    pool: &PgPool,
    locked: Result<Locked, sqlx::Error>,
    batch: &[&Job],
    config: &LogConfig,
    scratch: &mut Vec<u8>,
) -> Result<BatchResult, sqlx::Error> {
    match commit_batch(locked?, batch, config, scratch, IdCheck::ByIndex).await {
        Err(error) if is_stored_event_id(&error) => commit_batch(lock(pool).await?, batch, config, scratch, IdCheck::LookUp).await,
        other => other,
    }
}

/// How a batch learns which of its event ids are already stored.
#[derive(Clone, Copy, PartialEq)]
enum IdCheck {
    /// Looked up for requests with an unchecked (`Any`) stream, and for the others only when a
    /// request's versions do not hold (a retry's would not). Should a stored id still reach the
    /// `events_event_id_key` unique index, the batch is decided again with `LookUp`. New events
    /// under version checks, nearly all of them, cost no lookup.
    ByIndex,
    /// Every id looked up before deciding.
    LookUp,
}

fn is_stored_event_id(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.constraint() == Some("events_event_id_key"))
}

/// The rows are sent with `COPY ... (FORMAT binary)` in chunks of about this many bytes, so
/// PostgreSQL inserts the first while the writer chains the next.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

const COPY_EVENTS: &str = "COPY events (position, stream_id, stream_version, event_id, event_type, schema_version, \
     payload, metadata, recorded_at, occurred_at, prev_hash, hash) FROM STDIN (FORMAT binary)";

async fn commit_batch(
    locked: Locked,
    jobs: &[&Job],
    config: &LogConfig,
    scratch: &mut Vec<u8>,
    id_check: IdCheck,
) -> Result<BatchResult, sqlx::Error> {
    let Locked {
        mut tx,
        position: locked_position,
        hash: mut head_hash,
        recorded_at,
        started,
        locked,
    } = locked;

    let stream_ids: Vec<&str> = unique(jobs.iter().flat_map(|job| job.request.streams.iter().map(|s| s.stream_id.as_str())));
    let event_ids: Vec<Uuid> = jobs.iter().flat_map(|job| job.request.event_ids()).collect();
    let (versions, mut stored) = match id_check {
        IdCheck::LookUp => known_versions_and_ids(&mut tx, &stream_ids, &event_ids).await?,
        IdCheck::ByIndex => {
            // Only a request with an unchecked stream can be a retry that passes its version
            // checks: its ids are looked up now, the others' only if they are refused.
            let unchecked: Vec<Uuid> = jobs
                .iter()
                .filter(|job| {
                    job.request
                        .streams
                        .iter()
                        .any(|stream| stream.expected == ExpectedVersion::Any && !stream.events.is_empty())
                })
                .flat_map(|job| job.request.event_ids())
                .collect();
            known_versions_and_ids(&mut tx, &stream_ids, &unchecked).await?
        }
    };
    let mut decided = decide_all(jobs, versions.clone(), &stored, locked_position);
    if id_check == IdCheck::ByIndex && decided.results.iter().any(Result::is_err) {
        // A request refused on its versions may be a retry of one stored: look the ids up.
        stored = known_versions_and_ids(&mut tx, &[], &event_ids).await?.1;
        decided = decide_all(jobs, versions, &stored, locked_position);
    }
    let probed = started.elapsed();
    let Decided {
        results,
        appended,
        head_position,
    } = decided;
    if !appended.is_empty() {
        // Chain and encode the rows, sending them in chunks as they are made.
        let mut copy = tx.copy_in_raw(COPY_EVENTS).await?;
        let mut rows = CopyRows::new(recorded_at);
        let mut position = locked_position + 1;
        for (job, after_versions) in &appended {
            let mut json = job.json.iter();
            for (stream, after_version) in job.request.streams.iter().zip(after_versions) {
                for (event, version) in stream.events.iter().zip(after_version + 1..) {
                    let (payload_json, metadata_json) = json.next().expect("one JSON pair per event");
                    let envelope = Envelope {
                        position,
                        stream_id: &stream.stream_id,
                        stream_version: version,
                        event_id: event.event_id,
                        event_type: &event.event_type,
                        schema_version: event.schema_version,
                        payload_json,
                        metadata_json,
                        recorded_at,
                        occurred_at: event.occurred_at.map(to_stored_precision).unwrap_or(recorded_at),
                    };
                    let hash = envelope.hash(&head_hash, scratch);
                    rows.push(&envelope, &head_hash, &hash);
                    head_hash = hash;
                    position += 1;
                    if rows.bytes.len() >= COPY_CHUNK_BYTES {
                        rows.send(&mut copy).await?;
                    }
                }
            }
        }
        debug_assert_eq!(position, head_position + 1);
        rows.finish();
        rows.send(&mut copy).await?;
        let copied = copy.finish().await?;
        if copied != rows.count {
            // Positions are assigned in memory: a row not stored would be a gap. Roll back.
            return Err(sqlx::Error::Protocol(format!("COPY stored {copied} of {} events", rows.count)));
        }
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
    let copied = started.elapsed();
    if !config.pause_before_commit_max.is_zero() {
        // A pseudo-random pause per batch; the head position is as good a seed as any.
        let max_micros = config.pause_before_commit_max.as_micros() as u64;
        let pause = (head_position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % max_micros.max(1);
        tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
    }
    tx.commit().await?;
    tracing::debug!(
        events = head_position - locked_position,
        lock_ms = locked.as_secs_f64() * 1e3,
        probe_ms = (probed - locked).as_secs_f64() * 1e3,
        copy_ms = (copied - probed).as_secs_f64() * 1e3,
        commit_ms = (started.elapsed() - copied).as_secs_f64() * 1e3,
        "batch appended"
    );
    Ok((results, head_position))
}

/// Each request decided in order, on the stored versions and ids and those of the requests
/// before it in the batch.
struct Decided<'j> {
    results: Vec<Result<AppendOutcome, AppendError>>,
    /// The appended requests with, per stream, the version their events follow.
    appended: Vec<(&'j Job, Vec<i64>)>,
    head_position: i64,
}

fn decide_all<'j>(jobs: &[&'j Job], mut versions: HashMap<String, i64>, stored: &HashMap<Uuid, i64>, locked_position: i64) -> Decided<'j> {
    let mut stored = Cow::Borrowed(stored);
    let mut head_position = locked_position;
    let mut results = Vec::with_capacity(jobs.len());
    let mut appended = Vec::new();
    for job in jobs {
        let request = &job.request;
        let result = decide(request, &versions, &stored).and_then(|duplicate| match duplicate {
            Some(outcome) => Ok(outcome),
            None => {
                let first_position = head_position + 1;
                let mut after_versions = Vec::with_capacity(request.streams.len());
                for stream in &request.streams {
                    let version = versions.entry(stream.stream_id.clone()).or_insert(0);
                    after_versions.push(*version);
                    *version += stream.events.len() as i64;
                    for event in &stream.events {
                        head_position += 1;
                        stored.to_mut().insert(event.event_id, head_position);
                    }
                }
                appended.push((*job, after_versions));
                Ok(AppendOutcome {
                    first_position,
                    last_position: head_position,
                    duplicate: false,
                })
            }
        });
        results.push(result);
    }
    Decided {
        results,
        appended,
        head_position,
    }
}

/// Events as `COPY` binary rows (PostgreSQL's "binary format" of `COPY`: a signature, then each
/// row as a field count and each field as its length and its value in the type's binary form).
struct CopyRows {
    bytes: Vec<u8>,
    /// Rows pushed so far, sent or not.
    count: u64,
    recorded_at: i64,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC), for `timestamptz`.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// The JSON text of a binary `jsonb` is preceded by its format's version.
const JSONB_VERSION: u8 = 1;
const EVENT_FIELDS: i16 = 12;

impl CopyRows {
    fn new(recorded_at: DateTime<Utc>) -> CopyRows {
        let mut bytes = Vec::with_capacity(COPY_CHUNK_BYTES + 4096);
        bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        bytes.extend_from_slice(&0i32.to_be_bytes()); // flags
        bytes.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyRows {
            bytes,
            count: 0,
            recorded_at: timestamptz(recorded_at),
        }
    }

    fn push(&mut self, event: &Envelope<'_>, prev_hash: &[u8; 32], hash: &[u8; 32]) {
        let out = &mut self.bytes;
        out.extend_from_slice(&EVENT_FIELDS.to_be_bytes());
        field(out, &event.position.to_be_bytes());
        field(out, event.stream_id.as_bytes());
        field(out, &event.stream_version.to_be_bytes());
        field(out, event.event_id.as_bytes());
        field(out, event.event_type.as_bytes());
        field(out, &event.schema_version.to_be_bytes());
        for json in [event.payload_json, event.metadata_json] {
            // At most `JSON_BYTES_MAX`, checked by `EventLog::append`: the length fits.
            out.extend_from_slice(&(json.len() as i32 + 1).to_be_bytes());
            out.push(JSONB_VERSION);
            out.extend_from_slice(json.as_bytes());
        }
        field(out, &self.recorded_at.to_be_bytes());
        field(out, &timestamptz(event.occurred_at).to_be_bytes());
        field(out, prev_hash);
        field(out, hash);
        self.count += 1;
    }

    /// The trailer: a field count of -1.
    fn finish(&mut self) {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
    }

    async fn send(&mut self, copy: &mut PgCopyIn<&mut PgConnection>) -> Result<(), sqlx::Error> {
        copy.send(&self.bytes[..]).await?;
        self.bytes.clear();
        Ok(())
    }
}

fn field(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as i32).to_be_bytes());
    out.extend_from_slice(value);
}

fn timestamptz(instant: DateTime<Utc>) -> i64 {
    instant.timestamp_micros() - POSTGRES_EPOCH_MICROS
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

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    items.filter(|item| seen.insert(*item)).collect()
}

/// The current version of each stream and the position of each already stored event id, in one
/// round trip. LATERAL with LIMIT is never flattened into a join, so every stream and id is one
/// probe of its unique index whatever plan the prepared statement settles on (a plain
/// `event_id = ANY($1)` degraded to a scan under the generic plan).
async fn known_versions_and_ids(
    tx: &mut Transaction<'_, Postgres>,
    stream_ids: &[&str],
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
