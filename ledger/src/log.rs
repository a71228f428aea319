//! `EventLog`: the handle the rest of the product uses to append to and read the log.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::event::{AppendError, AppendOutcome, AppendRequest, RecordedEvent, SeenAt, StreamEvent, EVENT_COLUMNS};
use crate::subscription::Subscription;
use crate::writer::{self, Job, NOTIFY_CHANNEL};

/// Whether JSON text holds the escape of a NUL character: a `\u0000` whose backslash is not
/// itself escaped (preceded by an even number of backslashes). `json` columns would store it,
/// but PostgreSQL's text cannot hold it, so no `->>` could read the field back.
pub(crate) fn holds_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    json.match_indices("\\u0000").any(|(start, _)| {
        let escaped = bytes[..start].iter().rev().take_while(|&&byte| byte == b'\\').count();
        escaped % 2 == 0
    })
}

/// Longest payload or metadata of one event, as JSON (PostgreSQL's limit on a field is 1 GiB).
pub const JSON_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Most events one read returns.
pub const READ_LIMIT_MAX: usize = 10_000;

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A batch stops taking further waiting appends once it holds this many events.
    pub batch_events_max: usize,
    /// Appends waiting for the writer before callers are made to wait.
    pub queue_depth: usize,
    /// How long a subscriber waits for a notification before it looks at the log anyway.
    pub poll_interval: Duration,
    /// Tests only: hold each batch's transaction open up to this long before COMMIT, so slow
    /// committers meet fast readers. Zero in production.
    pub pause_before_commit_max: Duration,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            batch_events_max: 10_000,
            queue_depth: 4_096,
            poll_interval: Duration::from_millis(500),
            pause_before_commit_max: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the event log is not set up in this database (run `billing migrate`): {0}")]
    NotMigrated(sqlx::Error),
    #[error("the log's writer could not start: {0}")]
    Writer(std::io::Error),
}

#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    jobs: mpsc::Sender<Job>,
    head: watch::Sender<i64>,
    config: LogConfig,
    listener: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl EventLog {
    /// Opens the log on a migrated database and starts this process's writer and listener.
    pub async fn open(pool: PgPool, config: LogConfig) -> Result<EventLog, LogError> {
        let (position,): (i64,) = sqlx::query_as("SELECT position FROM ledger_head WHERE singleton")
            .fetch_one(&pool)
            .await
            .map_err(|error| match &error {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => LogError::NotMigrated(error),
                _ => LogError::Database(error),
            })?;
        let (head, _) = watch::channel(position);
        let (jobs, receiver) = mpsc::channel(config.queue_depth);
        // The writer runs on a thread (and runtime) of its own: on the caller's runtime it would
        // wait behind whatever CPU-bound work (deciding a batch of commands) holds the runtime's
        // threads, and every appender waits on it. It ends once the last handle to the log is
        // dropped and the appends queued before are done.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LogError::Writer)?;
        let (writer_pool, writer_head, writer_config) = (pool.clone(), head.clone(), config.clone());
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || runtime.block_on(writer::run(writer_pool, receiver, writer_head, writer_config)))
            .map_err(LogError::Writer)?;
        let listener = tokio::spawn(listen(pool.clone(), head.clone()));
        Ok(EventLog {
            inner: Arc::new(Inner {
                pool,
                jobs,
                head,
                config,
                listener,
            }),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Appends atomically: every stream's expected version holds and all events are stored, or
    /// nothing is. A retry whose event ids are all stored is answered as a duplicate. Appends in
    /// flight at the same time are ordered by the log's lock, not by when they were called: a
    /// caller that needs one before another awaits the first.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        request.check()?;
        // The JSON is written here, on the caller's task, so the writer (one per log opened,
        // holding the log's lock) only chains and copies.
        let json = request
            .streams
            .iter()
            .flat_map(|stream| stream.events.iter())
            .map(|event| (event.payload.canonical().into_owned(), event.metadata.canonical().into_owned()))
            .collect::<Vec<_>>();
        if let Some((payload, metadata)) = json
            .iter()
            .find(|(payload, metadata)| payload.len().max(metadata.len()) > JSON_BYTES_MAX)
        {
            return Err(AppendError::Invalid(format!(
                "an event's payload or metadata is at most {JSON_BYTES_MAX} bytes of JSON, this one {}",
                payload.len().max(metadata.len())
            )));
        }
        if json.iter().any(|(payload, metadata)| holds_nul(payload) || holds_nul(metadata)) {
            return Err(AppendError::Invalid(
                "an event's payload or metadata holds a NUL character (\\u0000), which PostgreSQL's text cannot".into(),
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { request, json, reply })
            .await
            .map_err(|_| AppendError::WriterStopped)?;
        answer.await.map_err(|_| AppendError::WriterStopped)?
    }

    /// Events of one stream with a version above `after_version`, oldest first, at most `limit`.
    pub async fn read_stream(&self, stream_id: &str, after_version: i64, limit: usize) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        let limit = limit.clamp(1, READ_LIMIT_MAX) as i64;
        sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version LIMIT $3"
        ))
        .bind(stream_id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(&self.inner.pool)
        .await
    }

    /// Events of many streams at once, each after its own version, as an aggregate's load reads
    /// them (`StreamEvent`: no metadata, times or hashes): `(stream_id, after_version)` pairs in,
    /// events handed to `each` grouped by stream and oldest first, as they arrive (a batch's
    /// memory is what `each` keeps, not every event read). One round trip for a batch of
    /// aggregates (the billing run loads thousands of wallets and servers this way).
    ///
    /// Returns the log's head as of the read: one statement reads the head and every stream, so
    /// at that head each stream's version is that of the last event handed to `each` for it (or
    /// the version it was asked after). An append may say so (`StreamAppend::seen_at`). A stream
    /// that does not have the version it was asked to go on from (the reader holds more of it
    /// than the log does) fails the read, so a head is never returned for a version not read.
    pub async fn read_streams_each<E: From<sqlx::Error>>(
        &self,
        streams: &[(String, i64)],
        mut each: impl FnMut(StreamEvent) -> Result<(), E>,
    ) -> Result<SeenAt, E> {
        use futures::TryStreamExt;
        if streams.is_empty() {
            let (position, hash) = self.head().await?;
            return Ok(SeenAt { position, hash });
        }
        let (ids, versions): (Vec<&str>, Vec<i64>) = streams.iter().map(|(id, version)| (id.as_str(), *version)).unzip();
        // LATERAL keeps this an index probe per stream whatever the plan (a hash join over the
        // whole log is what the planner picks otherwise once the batch is large). Every stream
        // gives a row, with no event when it has none at or after its version, so the head is
        // read whatever the streams hold; the event at the version asked after comes first,
        // without its payload, to show that the stream has it.
        let sql = "SELECT (SELECT position FROM ledger_head WHERE singleton) AS head, \
                    (SELECT hash FROM ledger_head WHERE singleton) AS head_hash, s.ord, s.after_version, \
                    e.position, e.stream_id, e.stream_version, e.event_type, e.schema_version, \
                    CASE WHEN e.stream_version > s.after_version THEN e.payload::text END AS payload \
             FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS s(stream_id, after_version, ord) \
             LEFT JOIN LATERAL (SELECT * FROM events x WHERE x.stream_id = s.stream_id COLLATE \"C\" \
                                AND x.stream_version >= s.after_version ORDER BY x.stream_version) e ON true \
             ORDER BY s.ord, e.stream_version";
        let mut rows = sqlx::query_as::<_, HeadedRow>(sql)
            .bind(&ids)
            .bind(&versions)
            .fetch(&self.inner.pool);
        let mut head = None;
        let mut stream = 0;
        while let Some(row) = rows.try_next().await? {
            if head.is_none() {
                head = Some(SeenAt {
                    position: row.head,
                    hash: row.head_hash()?,
                });
            }
            if row.ord != stream {
                // A stream's first row: the version it was asked after, unless that is 0.
                stream = row.ord;
                if row.after_version > 0 && row.version != Some(row.after_version) {
                    let stream_id = &streams[(row.ord - 1) as usize].0;
                    return Err(sqlx::Error::Protocol(format!(
                        "stream {stream_id} has no version {}, which the read was asked to go on from: \
                         the log holds less of it than the reader does",
                        row.after_version
                    ))
                    .into());
                }
            }
            if let Some(event) = row.event {
                each(event)?;
            }
        }
        Ok(head.expect("a row for every stream asked for"))
    }

    /// Every event of one stream, oldest first, read in bounded pages.
    pub async fn read_stream_all(&self, stream_id: &str) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        let mut events = Vec::new();
        loop {
            let after = events.last().map(|event: &RecordedEvent| event.stream_version).unwrap_or(0);
            let page = self.read_stream(stream_id, after, READ_LIMIT_MAX).await?;
            let full = page.len() == READ_LIMIT_MAX;
            events.extend(page);
            if !full {
                return Ok(events);
            }
        }
    }

    /// Events of the whole log after `after_position`, in position order, at most `limit`.
    pub async fn read_all(&self, after_position: i64, limit: usize) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        read_after(&self.inner.pool, after_position, limit).await
    }

    /// The current version of a stream (0 when it has no events).
    pub async fn stream_version(&self, stream_id: &str) -> Result<i64, sqlx::Error> {
        let (version,): (Option<i64>,) = sqlx::query_as("SELECT max(stream_version) FROM events WHERE stream_id = $1")
            .bind(stream_id)
            .fetch_one(&self.inner.pool)
            .await?;
        Ok(version.unwrap_or(0))
    }

    /// The log as it was at `position` (0, or a committed position): for a reader that knows
    /// streams' versions as of that position by other means (a read model whose checkpoint it
    /// is), so that an append guarded by those versions can say where they held
    /// (`StreamAppend::seen_at`). None for a position the log does not have.
    pub async fn seen_at(&self, position: i64) -> Result<Option<SeenAt>, sqlx::Error> {
        if position == 0 {
            return Ok(Some(SeenAt {
                position,
                hash: crate::chain::GENESIS_HASH,
            }));
        }
        let hash: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
            .bind(position)
            .fetch_optional(&self.inner.pool)
            .await?;
        Ok(hash.map(|hash| SeenAt {
            position,
            hash: hash.try_into().expect("events.hash is 32 bytes by its CHECK"),
        }))
    }

    /// The last committed position and its hash.
    pub async fn head(&self) -> Result<(i64, [u8; 32]), sqlx::Error> {
        let (position, hash): (i64, Vec<u8>) = sqlx::query_as("SELECT position, hash FROM ledger_head WHERE singleton")
            .fetch_one(&self.inner.pool)
            .await?;
        Ok((position, hash.try_into().expect("ledger_head.hash is 32 bytes by its CHECK")))
    }

    /// The last committed position as this process knows it (its own appends, and others' through
    /// NOTIFY); `changed()` wakes a follower when it moves.
    pub fn head_watch(&self) -> watch::Receiver<i64> {
        self.inner.head.subscribe()
    }

    /// A catch-up subscription to every event after `after_position`.
    pub fn subscribe(&self, after_position: i64, batch_size: usize) -> Subscription {
        Subscription::new(
            self.clone(),
            after_position,
            batch_size,
            self.inner.head.subscribe(),
            self.inner.config.poll_interval,
        )
    }
}

/// Events after `after_position`, in position order, at most `limit`, read through any executor
/// (a projector reads inside the transaction that writes its rows).
pub async fn read_after<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    after_position: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let limit = limit.clamp(1, READ_LIMIT_MAX) as i64;
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
    ))
    .bind(after_position)
    .bind(limit)
    .fetch_all(executor)
    .await
}

/// Follows other processes' appends through LISTEN/NOTIFY; subscribers also poll, so a lost
/// connection delays them by at most the poll interval.
async fn listen(pool: PgPool, head: watch::Sender<i64>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "ledger listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::debug!(%error, "ledger listener cannot LISTEN; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        while let Ok(notification) = listener.recv().await {
            if let Ok(position) = notification.payload().parse::<i64>() {
                head.send_if_modified(|current| {
                    let moved = position > *current;
                    *current = (*current).max(position);
                    moved
                });
            }
        }
    }
}

/// A row of `read_streams_each`: the head as of the read, the stream asked for (by its place in
/// the request) and the version asked after, the version of the row's event if it has one, and
/// the event itself if it comes after that version.
struct HeadedRow {
    head: i64,
    head_hash: Vec<u8>,
    ord: i64,
    after_version: i64,
    version: Option<i64>,
    event: Option<StreamEvent>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for HeadedRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<HeadedRow, sqlx::Error> {
        use sqlx::Row;
        let after_version: i64 = row.try_get("after_version")?;
        let version: Option<i64> = row.try_get("stream_version")?;
        let event = match version {
            Some(version) if version > after_version => Some(<StreamEvent as sqlx::FromRow<'r, sqlx::postgres::PgRow>>::from_row(row)?),
            _ => None,
        };
        Ok(HeadedRow {
            head: row.try_get("head")?,
            head_hash: row.try_get("head_hash")?,
            ord: row.try_get("ord")?,
            after_version,
            version,
            event,
        })
    }
}

impl HeadedRow {
    fn head_hash(&self) -> Result<[u8; 32], sqlx::Error> {
        self.head_hash
            .as_slice()
            .try_into()
            .map_err(|_| sqlx::Error::Protocol(format!("ledger_head.hash is {} bytes, not 32", self.head_hash.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::holds_nul;

    #[test]
    fn a_nul_escape_is_found_and_an_escaped_backslash_before_u0000_is_not_one() {
        let text = |value: &str| serde_json::to_string(value).unwrap();
        assert!(holds_nul(&text("a\u{0000}b")));
        assert!(holds_nul(&text("\\\u{0000}")));
        // The six characters `\u0000` as text, not a NUL: their backslash is escaped.
        assert!(!holds_nul(&text("\\u0000")));
        assert!(!holds_nul(&text("\\\\u0000")));
        assert!(!holds_nul(&text("plain \u{0001}")));
    }
}
