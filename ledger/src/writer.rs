//! The appender: one per log opened (`EventLog::open`), on a thread of its own, that groups
//! concurrent appends into one transaction.
//!
//! Each batch locks the `ledger_head` row first, so batches from every process are serialised
//! (two of this process's batches overlap only in that the second waits for the lock while the
//! first finishes); under that lock it reads the versions of the streams it cannot vouch for and
//! the already stored event ids it must (`Checks`), decides each request (appended, duplicate,
//! conflict), assigns positions `head + 1 ..` and the hash chain in memory, writes the rows (a
//! small batch with one `INSERT` that also moves the head and notifies, a large one streamed
//! with binary `COPY` as it chains them, then the head and the notification), then commits. A
//! request that fails its checks is answered without touching the others in its batch.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
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
    let recent = std::sync::Mutex::new(Recent::default());
    let writer = Writer {
        pool: &pool,
        head: &head,
        config: &config,
        recent: &recent,
    };
    let loops = (0..BATCHES_IN_FLIGHT).map(|_| writer_loop(writer, &jobs));
    futures::future::join_all(loops).await;
}

/// What every loop of the writer shares.
#[derive(Clone, Copy)]
struct Writer<'a> {
    pool: &'a PgPool,
    head: &'a watch::Sender<i64>,
    config: &'a LogConfig,
    recent: &'a std::sync::Mutex<Recent>,
}

impl Writer<'_> {
    /// The notes, for a moment (no await while they are held). A loop that panicked while
    /// holding them left them whole: each change to them is a single insert or removal.
    fn notes(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn writer_loop(writer: Writer<'_>, jobs: &Mutex<mpsc::Receiver<Job>>) {
    let Writer { pool, config, .. } = writer;
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
        commit_jobs(writer, batch, locked, &mut scratch).await;
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

async fn commit_jobs(writer: Writer<'_>, jobs: Vec<Job>, locked: Result<Locked, sqlx::Error>, scratch: &mut Vec<u8>) {
    let batch: Vec<&Job> = jobs.iter().collect();
    let committed = commit_deciding(writer, locked, &batch, scratch).await;
    match committed {
        Ok((results, head_position)) => {
            writer.head.send_if_modified(|current| {
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
                let locked = lock(writer.pool).await;
                Box::pin(commit_jobs(writer, vec![job], locked, scratch)).await;
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

/// Commits a batch under the lock it holds. Should a stored event id or a taken stream version
/// meet its unique index, the batch is decided again under a new lock, looking every id and
/// version up first, so a retry is answered as the duplicate it is and a stale request as the
/// conflict it is.
async fn commit_deciding(
    writer: Writer<'_>,
    locked: Result<Locked, sqlx::Error>,
    batch: &[&Job],
    scratch: &mut Vec<u8>,
) -> Result<BatchResult, sqlx::Error> {
    match commit_batch(writer, locked?, batch, scratch, Checks::ByIndex).await {
        Err(error) if is_taken(&error) => commit_batch(writer, lock(writer.pool).await?, batch, scratch, Checks::LookUp).await,
        other => other,
    }
}

/// How a batch learns the streams' versions and which of its event ids are already stored.
#[derive(Clone, Copy, PartialEq)]
enum Checks {
    /// Versions are looked up only for streams the writer cannot vouch for: not for a stream
    /// that gets its first events (should it have some, its first version meets the
    /// `events_stream_version_key` unique index), nor for one read at a head since which the
    /// writer knows it was not appended to (`Recent`). Ids are looked up for requests with an
    /// unchecked (`Any`) stream, and for the others only when a request's versions do not hold
    /// (a retry's would not). Should a stored id or a taken version still reach its unique
    /// index, the batch is decided again with `LookUp`. New events under version checks, nearly
    /// all of them, cost no lookup.
    ByIndex,
    /// Every version and id looked up before deciding.
    LookUp,
}

/// A unique index refused a row: its event id is stored, or its stream already has that version.
fn is_taken(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if matches!(db.constraint(), Some("events_event_id_key" | "events_stream_version_key")))
}

/// Streams that recent batches of this writer appended to, so that a stream read at a head
/// since which the writer appended everything (`StreamAppend::seen_at`) and not to that stream
/// is known to be still at the version read, without looking it up.
///
/// Each batch is noted once its rows are copied, with the hashes of the log before and after it.
/// Only a run of notes that the log's current head vouches for counts: walking back from the
/// locked head, each note must end with the hash the log has there (the hash chain then
/// vouches that the log holds exactly that batch's events), and the one before it must end with
/// the hash this one started from. A batch that rolled back, or one from another process, breaks
/// the run there, and the streams read before it are looked up.
#[derive(Default)]
struct Recent {
    /// By last position: the batch's first position, the hashes before and after it, and its
    /// streams (hashed, sorted: a collision only costs a lookup).
    batches: BTreeMap<i64, Noted>,
    /// Stream hashes held in all, kept under `RECENT_STREAMS_MAX`.
    streams: usize,
    hasher: std::collections::hash_map::RandomState,
}

struct Noted {
    first: i64,
    before: [u8; 32],
    after: [u8; 32],
    streams: Vec<u64>,
}

/// Stream hashes `Recent` holds at most (8 bytes each): far more than the appends of the few
/// batches a read waits through before its append.
const RECENT_STREAMS_MAX: usize = 1 << 18;

impl Recent {
    fn hash(&self, stream_id: &str) -> u64 {
        self.hasher.hash_one(stream_id)
    }

    fn note(&mut self, first: i64, last: i64, before: [u8; 32], after: [u8; 32], stream_ids: &[&str]) {
        let mut streams: Vec<u64> = stream_ids.iter().map(|stream_id| self.hash(stream_id)).collect();
        streams.sort_unstable();
        streams.dedup();
        self.streams += streams.len();
        if let Some(replaced) = self.batches.insert(
            last,
            Noted {
                first,
                before,
                after,
                streams,
            },
        ) {
            self.streams -= replaced.streams.len();
        }
        while self.streams > RECENT_STREAMS_MAX {
            let Some((_, oldest)) = self.batches.pop_first() else { break };
            self.streams -= oldest.streams.len();
        }
    }

    /// The batches the log at `head` (position and hash) vouches for, newest first, down to the
    /// first that does not continue the run, to `down_to`, or to `VOUCHED_BATCHES_MAX`
    /// batches, whichever comes first.
    fn vouched(&self, head: i64, hash: &[u8; 32], down_to: i64) -> Vouched<'_> {
        let mut run = Vec::new();
        let (mut position, mut at) = (head, hash);
        while position > down_to && run.len() < VOUCHED_BATCHES_MAX {
            let Some(noted) = self.batches.get(&position) else { break };
            if &noted.after != at {
                break;
            }
            run.push((position, noted));
            (position, at) = (noted.first - 1, &noted.before);
        }
        Vouched {
            head,
            head_hash: *hash,
            since: position,
            run,
        }
    }
}

/// Batches walked back from the locked head, at most: a read older than that is looked up.
const VOUCHED_BATCHES_MAX: usize = 256;

/// The batches of this writer that the log vouches for: every event after position `since` up
/// to the locked `head` (whose hash is `head_hash`), as `(last position, batch)`, newest first.
struct Vouched<'r> {
    head: i64,
    head_hash: [u8; 32],
    since: i64,
    run: Vec<(i64, &'r Noted)>,
}

impl Vouched<'_> {
    /// The log's hash at `position`, where the run knows it: the head, and either end of each
    /// batch in the run.
    fn hash_at(&self, position: i64) -> Option<&[u8; 32]> {
        if position == self.head {
            return Some(&self.head_hash);
        }
        self.run.iter().find_map(|(last, noted)| {
            if position == *last {
                Some(&noted.after)
            } else if position == noted.first - 1 {
                Some(&noted.before)
            } else {
                None
            }
        })
    }

    /// Whether a stream read at head `seen` is still at the version read: the log still has
    /// `seen`'s hash at its position, and no batch after it appended to the stream. Unknown
    /// (false) when the run does not reach back that far.
    fn unchanged(&self, seen: crate::SeenAt, stream_hash: u64) -> bool {
        seen.position >= self.since
            && self.hash_at(seen.position) == Some(&seen.hash)
            && self
                .run
                .iter()
                .take_while(|(last, _)| *last > seen.position)
                .all(|(_, noted)| noted.streams.binary_search(&stream_hash).is_err())
    }
}

/// The rows are sent with `COPY ... (FORMAT binary)` in chunks of about this many bytes, so
/// PostgreSQL inserts the first while the writer chains the next.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

const COPY_EVENTS: &str = "COPY events (position, stream_id, stream_version, event_id, event_type, schema_version, \
     payload, metadata, recorded_at, occurred_at, prev_hash, hash) FROM STDIN (FORMAT binary)";

async fn commit_batch(
    writer: Writer<'_>,
    locked: Locked,
    jobs: &[&Job],
    scratch: &mut Vec<u8>,
    checks: Checks,
) -> Result<BatchResult, sqlx::Error> {
    let config = writer.config;
    let Locked {
        mut tx,
        position: locked_position,
        hash: mut head_hash,
        recorded_at,
        started,
        locked,
    } = locked;

    let locked_hash = head_hash;
    let event_ids: Vec<Uuid> = jobs.iter().flat_map(|job| job.request.event_ids()).collect();
    let looked_up_streams;
    let (versions, mut stored) = match checks {
        Checks::LookUp => {
            let stream_ids = unique(jobs.iter().flat_map(|job| job.request.streams.iter().map(|s| s.stream_id.as_str())));
            looked_up_streams = stream_ids.len();
            known_versions_and_ids(&mut tx, &stream_ids, &event_ids).await?
        }
        Checks::ByIndex => {
            let (vouched, looked_up) = vouch(&writer.notes(), jobs, locked_position, &locked_hash);
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
            looked_up_streams = looked_up.len();
            let (mut versions, stored) = known_versions_and_ids(&mut tx, &looked_up, &unchecked).await?;
            versions.extend(vouched.into_iter().map(|(stream_id, version)| (stream_id.to_string(), version)));
            (versions, stored)
        }
    };
    let mut decided = decide_all(jobs, versions.clone(), &stored, locked_position);
    if checks == Checks::ByIndex && decided.results.iter().any(Result::is_err) {
        // A request refused on its versions may be a retry of one stored: look the ids up.
        stored = known_versions_and_ids(&mut tx, &[], &event_ids).await?.1;
        decided = decide_all(jobs, versions, &stored, locked_position);
    }
    let probed = started.elapsed();
    let Decided {
        mut results,
        appended,
        head_position,
    } = decided;
    if !appended.is_empty() {
        let envelopes = envelopes(&appended, locked_position + 1, recorded_at);
        debug_assert_eq!(locked_position + envelopes.len() as i64, head_position);
        let count = envelopes.len() as u64;
        let json_bytes: usize = envelopes
            .iter()
            .map(|event| event.payload_json.len() + event.metadata_json.len())
            .sum();
        let copied = if envelopes.len() <= INSERT_EVENTS_MAX && json_bytes <= INSERT_JSON_BYTES_MAX {
            // A small batch in one statement: its rows, the head and the notification.
            let mut rows = InsertRows::with_capacity(envelopes.len());
            for envelope in &envelopes {
                let hash = envelope.hash(&head_hash, scratch);
                rows.push(envelope, &head_hash, &hash);
                head_hash = hash;
            }
            rows.insert(&mut tx, recorded_at, head_position, &head_hash).await?
        } else {
            // Chain and encode the rows, sending them in chunks as they are made.
            let mut copy = tx.copy_in_raw(COPY_EVENTS).await?;
            let mut rows = CopyRows::new(recorded_at);
            for envelope in &envelopes {
                let hash = envelope.hash(&head_hash, scratch);
                rows.push(envelope, &head_hash, &hash);
                head_hash = hash;
                if rows.bytes.len() >= COPY_CHUNK_BYTES {
                    rows.send(&mut copy).await?;
                }
            }
            rows.finish();
            rows.send(&mut copy).await?;
            let copied = copy.finish().await?;
            sqlx::query(
                "WITH moved AS (UPDATE ledger_head SET position = $1, hash = $2 WHERE singleton RETURNING position) \
                 SELECT pg_notify($3, position::text) FROM moved",
            )
            .bind(head_position)
            .bind(head_hash.to_vec())
            .bind(NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await?;
            copied
        };
        if copied != count {
            // Positions are assigned in memory: a row not stored would be a gap. Roll back.
            return Err(sqlx::Error::Protocol(format!("stored {copied} of {count} events")));
        }
        // Noted before the commit (so the next batch, granted the lock the moment this one
        // commits, finds it); should the commit not happen, the log never vouches for it.
        let written = unique(appended.iter().flat_map(|(job, _)| {
            job.request
                .streams
                .iter()
                .filter(|stream| !stream.events.is_empty())
                .map(|stream| stream.stream_id.as_str())
        }));
        writer
            .notes()
            .note(locked_position + 1, head_position, locked_hash, head_hash, &written);
    }
    vouch_for_outcomes(
        jobs,
        &mut results,
        crate::SeenAt {
            position: head_position,
            hash: head_hash,
        },
    );
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
        looked_up_streams,
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
                    seen_at: None,
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

/// Each appended request's streams stand at the versions it left them at the batch's head
/// (`head`), unless a later request of the batch wrote to them: its outcome says so.
fn vouch_for_outcomes(jobs: &[&Job], results: &mut [Result<AppendOutcome, AppendError>], head: crate::SeenAt) {
    let mut last_writer: HashMap<&str, usize> = HashMap::new();
    for (index, (job, result)) in jobs.iter().zip(results.iter()).enumerate() {
        if matches!(result, Ok(outcome) if !outcome.duplicate) {
            for stream in job.request.streams.iter().filter(|stream| !stream.events.is_empty()) {
                last_writer.insert(stream.stream_id.as_str(), index);
            }
        }
    }
    for (index, (job, result)) in jobs.iter().zip(results.iter_mut()).enumerate() {
        if let Ok(outcome) = result {
            let last =
                |stream: &crate::StreamAppend| stream.events.is_empty() || last_writer.get(stream.stream_id.as_str()) == Some(&index);
            if !outcome.duplicate && job.request.streams.iter().all(last) {
                outcome.seen_at = Some(head);
            }
        }
    }
}

/// The envelope of every event appended by a batch, in position order from `first_position`.
fn envelopes<'j>(appended: &[(&'j Job, Vec<i64>)], first_position: i64, recorded_at: DateTime<Utc>) -> Vec<Envelope<'j>> {
    let mut envelopes = Vec::new();
    let mut position = first_position;
    for &(job, ref after_versions) in appended {
        let mut json = job.json.iter();
        for (stream, after_version) in job.request.streams.iter().zip(after_versions) {
            for (event, version) in stream.events.iter().zip(after_version + 1..) {
                let (payload_json, metadata_json) = json.next().expect("one JSON pair per event");
                envelopes.push(Envelope {
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
                });
                position += 1;
            }
        }
    }
    envelopes
}

/// Batches of at most this many events (and `INSERT_JSON_BYTES_MAX` of JSON) are written by one
/// `INSERT` (rows, head and notification in one round trip, its plan prepared once), larger ones
/// by `COPY`, which costs two round trips more but less per row, and streams its rows in chunks
/// where an `INSERT` sends every parameter in one message (at most 1 GiB).
const INSERT_EVENTS_MAX: usize = 256;
const INSERT_JSON_BYTES_MAX: usize = 1024 * 1024;

/// A small batch's rows as arrays, one per column, for one `INSERT ... SELECT FROM unnest`.
#[derive(Default)]
struct InsertRows<'j> {
    positions: Vec<i64>,
    stream_ids: Vec<&'j str>,
    stream_versions: Vec<i64>,
    event_ids: Vec<Uuid>,
    event_types: Vec<&'j str>,
    schema_versions: Vec<i32>,
    payloads: Vec<&'j str>,
    metadata: Vec<&'j str>,
    occurred_at: Vec<DateTime<Utc>>,
    prev_hashes: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
}

impl<'j> InsertRows<'j> {
    fn with_capacity(rows: usize) -> InsertRows<'j> {
        InsertRows {
            positions: Vec::with_capacity(rows),
            stream_ids: Vec::with_capacity(rows),
            stream_versions: Vec::with_capacity(rows),
            event_ids: Vec::with_capacity(rows),
            event_types: Vec::with_capacity(rows),
            schema_versions: Vec::with_capacity(rows),
            payloads: Vec::with_capacity(rows),
            metadata: Vec::with_capacity(rows),
            occurred_at: Vec::with_capacity(rows),
            prev_hashes: Vec::with_capacity(rows),
            hashes: Vec::with_capacity(rows),
        }
    }

    fn push(&mut self, event: &Envelope<'j>, prev_hash: &[u8; 32], hash: &[u8; 32]) {
        self.positions.push(event.position);
        self.stream_ids.push(event.stream_id);
        self.stream_versions.push(event.stream_version);
        self.event_ids.push(event.event_id);
        self.event_types.push(event.event_type);
        self.schema_versions.push(event.schema_version);
        self.payloads.push(event.payload_json);
        self.metadata.push(event.metadata_json);
        self.occurred_at.push(event.occurred_at);
        self.prev_hashes.push(prev_hash.to_vec());
        self.hashes.push(hash.to_vec());
    }

    /// Inserts the rows, moves the head to `head_position` and `head_hash` and notifies, in one
    /// statement; returns how many rows were stored.
    async fn insert(
        self,
        tx: &mut Transaction<'static, Postgres>,
        recorded_at: DateTime<Utc>,
        head_position: i64,
        head_hash: &[u8; 32],
    ) -> Result<u64, sqlx::Error> {
        let (stored,): (i64,) = sqlx::query_as(
            "WITH stored AS ( \
                 INSERT INTO events (position, stream_id, stream_version, event_id, event_type, schema_version, \
                                     payload, metadata, recorded_at, occurred_at, prev_hash, hash) \
                 SELECT r.position, r.stream_id, r.stream_version, r.event_id, r.event_type, r.schema_version, \
                        r.payload::json, r.metadata::json, $9, r.occurred_at, r.prev_hash, r.hash \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int4[], $7::text[], \
                             $8::text[], $10::timestamptz[], $11::bytea[], $12::bytea[]) \
                      AS r(position, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, \
                           occurred_at, prev_hash, hash) \
                 RETURNING 1), \
             moved AS (UPDATE ledger_head SET position = $13, hash = $14 WHERE singleton RETURNING position) \
             SELECT (SELECT count(*) FROM stored), pg_notify($15, position::text) FROM moved",
        )
        .bind(&self.positions)
        .bind(&self.stream_ids)
        .bind(&self.stream_versions)
        .bind(&self.event_ids)
        .bind(&self.event_types)
        .bind(&self.schema_versions)
        .bind(&self.payloads)
        .bind(&self.metadata)
        .bind(recorded_at)
        .bind(&self.occurred_at)
        .bind(&self.prev_hashes)
        .bind(&self.hashes)
        .bind(head_position)
        .bind(head_hash.to_vec())
        .bind(NOTIFY_CHANNEL)
        .fetch_one(&mut **tx)
        .await?;
        Ok(stored as u64)
    }
}

/// Events as `COPY` binary rows (PostgreSQL's "binary format" of `COPY`: a signature, then each
/// row as a field count and each field as its length and its value in the type's binary form).
struct CopyRows {
    bytes: Vec<u8>,
    recorded_at: i64,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC), for `timestamptz`.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
const EVENT_FIELDS: i16 = 12;
/// The start of every binary `COPY` stream: its signature, no flags, no header extension.
pub const COPY_BINARY_HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

impl CopyRows {
    fn new(recorded_at: DateTime<Utc>) -> CopyRows {
        let mut bytes = Vec::with_capacity(COPY_CHUNK_BYTES + 4096);
        bytes.extend_from_slice(COPY_BINARY_HEADER);
        CopyRows {
            bytes,
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
        // `json` in binary form is its text; at most `JSON_BYTES_MAX`, checked by
        // `EventLog::append`, so the length fits.
        field(out, event.payload_json.as_bytes());
        field(out, event.metadata_json.as_bytes());
        field(out, &self.recorded_at.to_be_bytes());
        field(out, &timestamptz(event.occurred_at).to_be_bytes());
        field(out, prev_hash);
        field(out, hash);
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
                seen_at: None,
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

/// The versions the writer can vouch for without looking them up, and the streams it must look
/// up (`Checks::ByIndex`). A stream that gets its first events is at version 0 as far as the
/// batch goes (should it have events, its first version meets the unique index); one read at a
/// head since which the log vouches that none of this writer's batches appended to it, and
/// nobody else appended at all (`Recent`), is still at the version read. A stream whose requests
/// disagree is looked up.
fn vouch<'j>(recent: &Recent, jobs: &[&'j Job], head: i64, head_hash: &[u8; 32]) -> (HashMap<&'j str, i64>, Vec<&'j str>) {
    // The run of notes is walked back only as far as the oldest read in the batch.
    let oldest_read = jobs
        .iter()
        .flat_map(|job| job.request.streams.iter().filter_map(|stream| stream.seen_at))
        .map(|seen_at| seen_at.position)
        .min()
        .unwrap_or(head);
    let vouched = recent.vouched(head, head_hash, oldest_read);
    let mut versions: HashMap<&str, Option<i64>> = HashMap::new();
    for stream in jobs.iter().flat_map(|job| job.request.streams.iter()) {
        let expected = match stream.expected {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(version) => Some(version),
        };
        let first_events = expected == Some(0) && !stream.events.is_empty();
        let seen_unchanged = || {
            stream
                .seen_at
                .is_some_and(|seen_at| vouched.unchanged(seen_at, recent.hash(&stream.stream_id)))
        };
        let version = expected.filter(|_| first_events || seen_unchanged());
        versions
            .entry(stream.stream_id.as_str())
            .and_modify(|known| {
                if *known != version {
                    *known = None
                }
            })
            .or_insert(version);
    }
    let mut known = HashMap::with_capacity(versions.len());
    let mut unknown = Vec::new();
    for (stream_id, version) in versions {
        match version {
            Some(version) => {
                known.insert(stream_id, version);
            }
            None => unknown.push(stream_id),
        }
    }
    (known, unknown)
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
    if stream_ids.is_empty() && event_ids.is_empty() {
        return Ok(Default::default());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> [u8; 32] {
        [n; 32]
    }

    /// Two batches of this writer, 1..=10 then 11..=20, chained 0 -> 1 -> 2.
    fn two_batches() -> Recent {
        let mut recent = Recent::default();
        recent.note(1, 10, hash(0), hash(1), &["server-1", "account-1"]);
        recent.note(11, 20, hash(1), hash(2), &["server-2"]);
        recent
    }

    /// A read at `position`, where the log's hash was `hash(n)`.
    fn at(position: i64, n: u8) -> crate::SeenAt {
        crate::SeenAt { position, hash: hash(n) }
    }

    #[test]
    fn a_stream_is_unchanged_only_where_the_log_vouches_for_every_batch_since_its_read() {
        let recent = two_batches();
        let s = |stream: &str| recent.hash(stream);
        let vouched = recent.vouched(20, &hash(2), 0);
        assert_eq!(vouched.since, 0);
        assert!(
            vouched.unchanged(at(10, 1), s("server-1")),
            "only server-2 was appended to since 10"
        );
        assert!(!vouched.unchanged(at(10, 1), s("server-2")));
        assert!(!vouched.unchanged(at(0, 0), s("server-1")), "appended to in 1..=10");
        assert!(vouched.unchanged(at(0, 0), s("server-3")));
        assert!(vouched.unchanged(at(20, 2), s("server-2")), "read at the head itself");
        assert!(!vouched.unchanged(at(21, 2), s("server-3")), "a read beyond the head says nothing");
        // A read of a log that is not this one at that position (restored, say) says nothing.
        assert!(!vouched.unchanged(at(20, 5), s("server-3")));
        assert!(!vouched.unchanged(at(10, 5), s("server-3")));
        // Walked back only as far as asked.
        let vouched = recent.vouched(20, &hash(2), 10);
        assert_eq!((vouched.since, vouched.run.len()), (10, 1));
        assert!(vouched.unchanged(at(10, 1), s("server-1")));
        assert!(!vouched.unchanged(at(0, 0), s("server-3")));

        // The log's head is not the end of the last batch noted (it rolled back, or another
        // process appended after it): nothing is vouched for but a read at the head.
        let vouched = recent.vouched(20, &hash(9), 0);
        assert_eq!((vouched.since, vouched.run.len()), (20, 0));
        assert!(!vouched.unchanged(at(10, 1), s("server-3")));
        assert!(vouched.unchanged(at(20, 9), s("server-3")));
        let vouched = recent.vouched(30, &hash(2), 0);
        assert!(!vouched.unchanged(at(20, 2), s("server-3")));
    }

    #[test]
    fn a_batch_that_does_not_continue_the_chain_ends_the_run() {
        let mut recent = Recent::default();
        recent.note(1, 10, hash(0), hash(1), &["server-1"]);
        // 11..=20 was noted but is not what the log holds at 10 (another process's 1..=10
        // committed instead): the run stops at it.
        recent.note(11, 20, hash(7), hash(2), &["server-2"]);
        let vouched = recent.vouched(20, &hash(2), 0);
        assert_eq!(vouched.since, 10);
        assert!(vouched.unchanged(at(10, 7), recent.hash("server-1")));
        assert!(
            !vouched.unchanged(at(10, 1), recent.hash("server-1")),
            "read from the batch that lost"
        );
        assert!(!vouched.unchanged(at(5, 0), recent.hash("server-3")));
    }

    #[test]
    fn a_batch_noted_again_at_the_same_end_replaces_the_one_that_rolled_back() {
        let mut recent = two_batches();
        recent.note(11, 20, hash(1), hash(3), &["server-3"]);
        assert_eq!(recent.streams, 3);
        let vouched = recent.vouched(20, &hash(3), 0);
        assert!(vouched.unchanged(at(10, 1), recent.hash("server-2")));
        assert!(!vouched.unchanged(at(10, 1), recent.hash("server-3")));
    }

    #[test]
    fn the_notes_keep_under_their_bound_by_forgetting_the_oldest() {
        let mut recent = Recent::default();
        let names: Vec<String> = (0..10_000).map(|n| format!("stream-{n}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let batches = RECENT_STREAMS_MAX / names.len() + 2;
        for batch in 0..batches {
            let first = (batch * 10_000) as i64 + 1;
            recent.note(first, first + 9_999, hash(batch as u8), hash(batch as u8 + 1), &names);
        }
        assert!(recent.streams <= RECENT_STREAMS_MAX);
        let head = (batches * 10_000) as i64;
        let vouched = recent.vouched(head, &hash(batches as u8), 0);
        assert!(vouched.since > 0, "the oldest batches are forgotten");
        assert!(!vouched.unchanged(at(0, 0), recent.hash("elsewhere")));
        let since = vouched.since;
        assert!(vouched.unchanged(at(since, (since / 10_000) as u8), recent.hash("elsewhere")));
    }
}
