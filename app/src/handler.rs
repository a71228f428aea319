//! The command handler: loads aggregates from their streams, runs their `handle`, and appends the
//! events of every stream a command touched in one atomic append with expected versions. On a
//! version conflict the whole command is retried from fresh state, a bounded number of times.
//!
//! A command that spans several aggregates (an order holds money, creates the order and the
//! server) is a loop over attempts: take a `Unit`, load what is needed, decide, and `commit`,
//! which answers `Done` or `Retry` (the loop goes round again) or gives up after the bound:
//!
//! ```ignore
//! for attempt in 1.. {
//!     let mut unit = handler.unit();
//!     let mut account = unit.load::<Account>(&stream).await?;
//!     unit.handle(&mut account, command.clone()).await.map_err(HandlerError::Rejected)?;
//!     if let Commit::Done(outcome) = handler.commit(unit, &metadata, attempt).await? {
//!         break outcome;
//!     }
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::Clock;
use ledger::{AppendError, AppendOutcome, AppendRequest, EventLog, ExpectedVersion, NewEvent, StreamAppend};
use rand::Rng;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Attempts of one command before it gives up as contended.
pub const ATTEMPTS_MAX: u32 = 50;

/// An aggregate that lives in one stream of the log.
pub trait StreamAggregate: Aggregate<Services = ()> + Clone {
    /// The aggregate and the shape of its state as its snapshots are kept (changed whenever the
    /// state changes shape, so that older snapshots are passed over); none for aggregates whose
    /// streams stay short.
    const SNAPSHOT_KIND: Option<&'static str> = None;

    /// Roughly the bytes the state holds: its weight in the state cache.
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
    }
}

impl StreamAggregate for domain::Account {
    const SNAPSHOT_KIND: Option<&'static str> = Some("Account/2");

    fn footprint(&self) -> usize {
        domain::Account::footprint(self)
    }
}
impl StreamAggregate for domain::Server {
    fn footprint(&self) -> usize {
        // The strings it holds (hostname, image, provider id) are short.
        std::mem::size_of::<Self>() + 256
    }
}
impl StreamAggregate for domain::Order {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + 256
    }
}
impl StreamAggregate for domain::Catalog {
    fn footprint(&self) -> usize {
        // Cached rarely (once per version of the catalogue): measured by its serialised size.
        serde_json::to_vec(self).map_or(64 * 1024, |bytes| 2 * bytes.len())
    }
}
impl StreamAggregate for domain::InvoiceSeries {
    fn footprint(&self) -> usize {
        domain::InvoiceSeries::footprint(self)
    }
}
impl StreamAggregate for domain::topup::TopUp {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + 256
    }
}

/// Events read past a stream's snapshot before the next snapshot is taken.
pub const SNAPSHOT_EVERY: i64 = 100;

/// Bytes of aggregate state the cache of a `CommandHandler` keeps by default.
pub const STATE_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Who did it and why, recorded with every event.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metadata {
    pub actor_kind: String,
    pub actor_id: String,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Metadata {
    pub fn actor(kind: &str, id: impl Into<String>) -> Metadata {
        Metadata {
            actor_kind: kind.to_string(),
            actor_id: id.into(),
            ..Metadata::default()
        }
    }

    /// A new id for an object the command creates (`label` names which): random, or, for a
    /// request with an idempotency key, derived from the key, so the same request run again
    /// names the same objects and the domain refuses to make them twice.
    pub fn id_for(&self, label: &str) -> Uuid {
        match &self.idempotency_key {
            Some(key) => Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("billing:{label}:{key}").as_bytes()),
            None => Uuid::now_v7(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("reading the log: {0}")]
    Read(#[from] sqlx::Error),
    #[error("event at position {position} of {stream_id} does not decode: {reason}")]
    Corrupt { stream_id: String, position: i64, reason: String },
    #[error("appending: {0}")]
    Append(AppendError),
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError<E> {
    /// The domain refused the command: an expected outcome, not a fault.
    #[error(transparent)]
    Rejected(E),
    #[error("the command lost {attempts} races for its streams; try again")]
    Contended { attempts: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// An aggregate as loaded from its stream. The state is shared with the state cache until a
/// command changes it (then it is copied: the cache keeps the state as stored).
pub struct Loaded<A> {
    pub stream_id: String,
    pub version: i64,
    pub state: Arc<A>,
    /// The log's head as of the read that found the stream at `version` (its append says so,
    /// and the writer need not look the version up again: `ledger::StreamAppend::seen_at`).
    seen_at: Option<ledger::SeenAt>,
    /// The version of the stream's latest snapshot known when it was loaded.
    snapshot_version: i64,
    /// The version it was loaded at, and the events `Unit::handle` applied to it since.
    loaded_version: i64,
    applied: i64,
}

/// The streams a command touches: what was loaded at which version, and the events decided.
pub struct Unit {
    log: EventLog,
    cache: Arc<StateCache>,
    appends: Vec<Pending>,
    /// Where each stream's entry is in `appends`.
    indexes: std::collections::HashMap<String, usize>,
    /// Each changed aggregate's state after the events decided, kept once they are stored.
    changed: std::collections::HashMap<String, Keep>,
}

/// A stream the unit read or writes: the version it was read at (and as of which head, when it
/// was read from the log), and the events decided for it (none for a guard).
struct Pending {
    stream_id: String,
    version: i64,
    seen_at: Option<ledger::SeenAt>,
    events: Vec<(String, i32, ledger::Json)>,
}

/// What `commit` did.
#[derive(Debug)]
pub enum Commit {
    /// Stored (or nothing to store).
    Done(Option<AppendOutcome>),
    /// A stream moved on since it was loaded: run the command again from fresh state.
    Retry,
}

impl Unit {
    /// Loads an aggregate by folding its stream (events upcast, then decoded).
    /// The unit's decision depends on what it loads, so every loaded stream is guarded at the
    /// version read: the commit goes ahead only if none of them has moved on since, whether or not
    /// the unit appends to it. (A cancellation that reads an account and writes only its server
    /// conflicts with a billing run that charged the account meanwhile, and the other way round.)
    pub async fn load<A: StreamAggregate + 'static>(&mut self, stream_id: &str) -> Result<Loaded<A>, StorageError> {
        let loaded = load(&self.log, &self.cache, stream_id).await?;
        self.guard(&loaded.stream_id, loaded.version, loaded.seen_at);
        Ok(loaded)
    }

    /// Loads many aggregates of one kind in one read of the log (cached states are read on from
    /// their version), each guarded as by `load`. The result is in the order of `stream_ids`.
    pub async fn load_many<A: StreamAggregate + 'static>(&mut self, stream_ids: &[String]) -> Result<Vec<Loaded<A>>, StorageError> {
        let loaded = load_many(&self.log, &self.cache, stream_ids).await?;
        for entry in &loaded {
            self.guard(&entry.stream_id, entry.version, entry.seen_at);
        }
        Ok(loaded)
    }

    /// Makes the commit depend on `stream_id` being at `version`, without reading the stream: for
    /// a caller that knows its version by other means (a read model's row, folded from the stream
    /// up to the read model's checkpoint, which `seen_at` names). A stream that moved since fails
    /// the commit as a conflict, as a stream loaded and moved since does.
    pub fn expect_version(&mut self, stream_id: &str, version: i64, seen_at: Option<ledger::SeenAt>) {
        self.guard(stream_id, version, seen_at);
    }

    /// Makes the commit depend on `stream_id` being still at `version`. A stream read twice keeps
    /// the first version read: if it moved in between, the commit conflicts and the command reruns.
    fn guard(&mut self, stream_id: &str, version: i64, seen_at: Option<ledger::SeenAt>) {
        if !self.indexes.contains_key(stream_id) {
            self.indexes.insert(stream_id.to_string(), self.appends.len());
            self.appends.push(Pending {
                stream_id: stream_id.to_string(),
                version,
                seen_at,
                events: Vec::new(),
            });
        }
    }

    /// Whether the unit has events to append (guards alone are nothing to commit).
    fn has_events(&self) -> bool {
        self.appends.iter().any(|pending| !pending.events.is_empty())
    }

    /// Records a receipt once: opens `stream_id` with one event unless it already has events.
    /// Returns false when it had (a redelivery). If another command opens the stream meanwhile,
    /// the commit conflicts and the retry sees it. Receipts of external events (a webhook's event
    /// id) use it to act once, in the same append as their effect.
    pub async fn record_once(&mut self, stream_id: &str, event_type: &str, payload: Value) -> Result<bool, StorageError> {
        if self.log.stream_version(stream_id).await? > 0 {
            return Ok(false);
        }
        self.guard(stream_id, 0, None);
        let index = self.indexes[stream_id];
        self.appends[index].events.push((event_type.to_string(), 1, payload.into()));
        Ok(true)
    }

    /// Every event of a stream as stored (for flows that read history, such as invoicing).
    pub async fn read_stream(&self, stream_id: &str) -> Result<Vec<ledger::RecordedEvent>, StorageError> {
        Ok(self.log.read_stream_all(stream_id).await?)
    }

    /// Runs a command on a loaded aggregate; its events are applied to `loaded.state` and kept
    /// for the commit. A refusal leaves nothing to commit for this aggregate.
    pub async fn handle<A: StreamAggregate + Send + Sync + 'static>(
        &mut self,
        loaded: &mut Loaded<A>,
        command: A::Command,
    ) -> Result<Vec<A::Event>, A::Error> {
        let sink = EventSink::<A>::default();
        // Every aggregate of the domain decides its events before applying any (`decide`, then
        // `apply` each), so a refusal leaves the state as it was. A state shared with the cache
        // is copied first: the cache keeps states as stored.
        // The unit's own reference to the state it keeps after the commit goes first, so that a
        // state handled again is changed in place rather than copied.
        self.changed.remove(&loaded.stream_id);
        let result = Arc::make_mut(&mut loaded.state).handle(command, &(), &sink).await;
        let events = sink.collect().await;
        match result {
            Ok(()) => {
                let serialized = events
                    .iter()
                    .map(|event| {
                        let version = event
                            .event_version()
                            .parse::<i32>()
                            .expect("domain event versions are whole numbers");
                        (
                            event.event_type(),
                            version,
                            ledger::Json::of(event).expect("domain events serialise"),
                        )
                    })
                    .collect::<Vec<_>>();
                loaded.applied += serialized.len() as i64;
                if loaded.applied > 0 {
                    self.changed.insert(loaded.stream_id.clone(), Keep::of(loaded, 0));
                }
                if !serialized.is_empty() {
                    match self.indexes.get(&loaded.stream_id) {
                        Some(&index) => self.appends[index].events.extend(serialized),
                        None => {
                            self.indexes.insert(loaded.stream_id.clone(), self.appends.len());
                            self.appends.push(Pending {
                                stream_id: loaded.stream_id.clone(),
                                version: loaded.version,
                                seen_at: loaded.seen_at,
                                events: serialized,
                            });
                        }
                    }
                }
                Ok(events)
            }
            Err(error) => Err(error),
        }
    }
}

#[derive(Clone)]
pub struct CommandHandler {
    log: EventLog,
    clock: Arc<dyn Clock>,
    attempts_max: u32,
    cache: Arc<StateCache>,
}

/// Aggregates as last loaded, by stream: a load reads only the events after the cached version.
/// The log stays the truth; a stale or evicted entry only means reading more events. Bounded by
/// the states' footprints in bytes; the least used entries are evicted one by one.
struct StateCache {
    entries: quick_cache::sync::Cache<String, Cached, ByFootprint>,
}

#[derive(Clone)]
struct Cached {
    version: i64,
    /// The version of the stream's latest snapshot known.
    snapshot_version: i64,
    bytes: u64,
    state: Arc<dyn std::any::Any + Send + Sync>,
}

#[derive(Clone)]
struct ByFootprint;

/// Bytes of an entry besides its state (the key's allocation, the entry's own fields).
const CACHE_ENTRY_OVERHEAD: u64 = 96;

impl quick_cache::Weighter<String, Cached> for ByFootprint {
    fn weight(&self, key: &String, cached: &Cached) -> u64 {
        key.capacity() as u64 + cached.bytes + CACHE_ENTRY_OVERHEAD
    }
}

/// Where a load starts: a cached state, else the stream's snapshot, else the empty state.
struct Start<A> {
    version: i64,
    snapshot_version: i64,
    state: Arc<A>,
}

impl<A: Default> Default for Start<A> {
    fn default() -> Start<A> {
        Start {
            version: 0,
            snapshot_version: 0,
            state: Arc::new(A::default()),
        }
    }
}

impl StateCache {
    fn new(bytes: u64) -> StateCache {
        // The item estimate only sizes the index up front; the bound is the bytes.
        let items = (bytes / 1024).clamp(1_024, 1_000_000) as usize;
        // One shard: the byte bound applies to the whole cache, so a large state (a year's
        // invoice series) is admitted up to nearly all of it rather than to a shard's share.
        let options = quick_cache::OptionsBuilder::new()
            .shards(1)
            .estimated_items_capacity(items)
            .weight_capacity(bytes.max(1))
            .build()
            .expect("valid cache options");
        StateCache {
            entries: quick_cache::sync::Cache::with_options(
                options,
                ByFootprint,
                quick_cache::DefaultHashBuilder::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
        }
    }

    fn get<A: StreamAggregate + Send + Sync + 'static>(&self, stream_id: &str) -> Option<Start<A>> {
        let cached = self.entries.get(stream_id)?;
        let state = cached.state.downcast::<A>().ok()?;
        Some(Start {
            version: cached.version,
            snapshot_version: cached.snapshot_version,
            state,
        })
    }

    fn put(&self, keep: Keep) {
        if self
            .entries
            .get(&keep.stream_id)
            .is_some_and(|cached| cached.version >= keep.version)
        {
            return;
        }
        let cached = Cached {
            version: keep.version,
            snapshot_version: keep.snapshot_version,
            bytes: (keep.footprint)(keep.state.as_ref()) as u64,
            state: keep.state,
        };
        self.entries.insert(keep.stream_id, cached);
    }
}

/// What a committed command returns: the closure's value and where its events landed.
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    pub outcome: Option<AppendOutcome>,
    pub attempts: u32,
}

impl CommandHandler {
    pub fn new(log: EventLog, clock: Arc<dyn Clock>) -> CommandHandler {
        CommandHandler {
            log,
            clock,
            attempts_max: ATTEMPTS_MAX,
            cache: Arc::new(StateCache::new(STATE_CACHE_BYTES)),
        }
    }

    /// The state cache bounded at `bytes` instead of `STATE_CACHE_BYTES` (a fresh, empty cache).
    pub fn with_state_cache_bytes(mut self, bytes: u64) -> CommandHandler {
        self.cache = Arc::new(StateCache::new(bytes));
        self
    }

    pub fn with_attempts_max(mut self, attempts_max: u32) -> CommandHandler {
        self.attempts_max = attempts_max.max(1);
        self
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub async fn load<A: StreamAggregate + 'static>(&self, stream_id: &str) -> Result<Loaded<A>, StorageError> {
        load(&self.log, &self.cache, stream_id).await
    }

    /// A fresh unit for one attempt of a command.
    pub fn unit(&self) -> Unit {
        Unit {
            log: self.log.clone(),
            cache: self.cache.clone(),
            appends: Vec::new(),
            indexes: std::collections::HashMap::new(),
            changed: std::collections::HashMap::new(),
        }
    }

    /// Appends what `unit` decided, atomically over its streams. A version conflict on attempt
    /// `attempt` is a `Retry` (after a short jittered pause) until the bound, then `Contended`.
    pub async fn commit<E>(&self, unit: Unit, metadata: &Metadata, attempt: u32) -> Result<Commit, HandlerError<E>> {
        if !unit.has_events() {
            return Ok(Commit::Done(None));
        }
        // Once stored, a changed state is the state of its stream at the version appended: if it
        // was loaded at the version the append was guarded at, and every event appended to the
        // stream was applied to it (a stream loaded twice in one unit is not kept).
        let mut changed = Vec::new();
        for Pending {
            stream_id,
            version,
            events,
            ..
        } in &unit.appends
        {
            if let Some(keep) = unit.changed.get(stream_id) {
                if keep.loaded_version == *version && keep.applied == events.len() as i64 {
                    let mut keep = keep.clone();
                    keep.version = version + events.len() as i64;
                    changed.push(keep);
                }
            }
        }
        match self.log.append(self.request(unit, metadata)).await {
            Ok(outcome) => {
                if !outcome.duplicate {
                    keep(&self.log, &self.cache, changed).await;
                }
                Ok(Commit::Done(Some(outcome)))
            }
            Err(AppendError::Conflict(conflict)) if attempt < self.attempts_max => {
                tracing::debug!(%conflict, attempt, "command lost a race; retrying");
                // Jitter spreads the losers so they do not collide again in lockstep.
                let pause_us = rand::thread_rng().gen_range(0..(200 * u64::from(attempt.min(10))));
                tokio::time::sleep(Duration::from_micros(pause_us)).await;
                Ok(Commit::Retry)
            }
            Err(AppendError::Conflict(_)) => Err(HandlerError::Contended {
                attempts: self.attempts_max,
            }),
            Err(error) => Err(StorageError::Append(error).into()),
        }
    }

    /// One command on one aggregate, retried on conflict.
    pub async fn execute<A: StreamAggregate + 'static>(
        &self,
        stream_id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<Vec<A::Event>>, HandlerError<A::Error>>
    where
        A::Command: Clone,
    {
        for attempt in 1.. {
            let mut unit = self.unit();
            let mut loaded = unit.load::<A>(stream_id).await?;
            let events = unit.handle(&mut loaded, command.clone()).await.map_err(HandlerError::Rejected)?;
            if let Commit::Done(outcome) = self.commit(unit, metadata, attempt).await? {
                return Ok(Committed {
                    value: events,
                    outcome,
                    attempts: attempt,
                });
            }
        }
        unreachable!("commit gives up after attempts_max")
    }

    fn request(&self, unit: Unit, metadata: &Metadata) -> AppendRequest {
        let occurred_at = self.clock.now();
        let command_id = Uuid::now_v7();
        let mut metadata = serde_json::to_value(metadata).expect("metadata serialises");
        if let Value::Object(map) = &mut metadata {
            map.retain(|_, value| !value.is_null());
            map.insert("command_id".into(), Value::String(command_id.to_string()));
        }
        // Every event of the command carries the same metadata: written once.
        let metadata = ledger::Json::of(&metadata).expect("metadata serialises");
        let streams = unit
            .appends
            .into_iter()
            .map(
                |Pending {
                     stream_id,
                     version,
                     seen_at,
                     events,
                 }| {
                    let expected = if version == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version)
                    };
                    let events = events
                        .into_iter()
                        .map(|(event_type, schema_version, payload)| {
                            NewEvent::new(event_type, payload)
                                .with_schema_version(schema_version)
                                .with_metadata(metadata.clone())
                                .occurred_at(occurred_at)
                        })
                        .collect();
                    let append = StreamAppend::new(stream_id, expected, events);
                    match seen_at {
                        Some(head) => append.seen_at(head),
                        None => append,
                    }
                },
            )
            .collect();
        AppendRequest { streams }
    }
}

async fn load<A: StreamAggregate + Send + Sync + 'static>(
    log: &EventLog,
    cache: &StateCache,
    stream_id: &str,
) -> Result<Loaded<A>, StorageError> {
    let ids = [stream_id.to_string()];
    let Some(start) = starts::<A>(log, cache, &ids).await?.pop() else {
        unreachable!("one start per stream")
    };
    let cached_version = start.version;
    let mut loaded = Loaded {
        stream_id: stream_id.to_string(),
        version: start.version,
        state: start.state,
        seen_at: None,
        snapshot_version: start.snapshot_version,
        loaded_version: 0,
        applied: 0,
    };
    // Folded as the rows arrive: a load holds the state, not the stream's events.
    let head = log
        .read_streams_each(&[(stream_id.to_string(), loaded.version)], |recorded| fold(&mut loaded, recorded))
        .await?;
    loaded.seen_at = Some(head);
    loaded.loaded_version = loaded.version;
    if loaded.version > cached_version {
        keep(log, cache, vec![Keep::of(&loaded, loaded.version)]).await;
    }
    Ok(loaded)
}

async fn load_many<A: StreamAggregate + Send + Sync + 'static>(
    log: &EventLog,
    cache: &StateCache,
    stream_ids: &[String],
) -> Result<Vec<Loaded<A>>, StorageError> {
    let starts = starts::<A>(log, cache, stream_ids).await?;
    let cached: Vec<i64> = starts.iter().map(|start| start.version).collect();
    let mut loaded: Vec<Loaded<A>> = stream_ids
        .iter()
        .zip(starts)
        .map(|(stream_id, start)| Loaded {
            stream_id: stream_id.clone(),
            version: start.version,
            state: start.state,
            seen_at: None,
            snapshot_version: start.snapshot_version,
            loaded_version: 0,
            applied: 0,
        })
        .collect();
    // A stream asked for twice is read once, into its first place, and copied to the others.
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(stream_ids.len());
    let mut wanted: Vec<(String, i64)> = Vec::with_capacity(stream_ids.len());
    let mut again = Vec::new();
    for (at, entry) in loaded.iter().enumerate() {
        match index.entry(stream_ids[at].as_str()) {
            std::collections::hash_map::Entry::Occupied(first) => again.push((at, *first.get())),
            std::collections::hash_map::Entry::Vacant(place) => {
                place.insert(at);
                wanted.push((entry.stream_id.clone(), entry.version));
            }
        }
    }
    // Folded as the rows arrive: a batch holds its states, not every event it reads.
    let head = log
        .read_streams_each(&wanted, |recorded| {
            let at = index[recorded.stream_id.as_str()];
            fold(&mut loaded[at], recorded)
        })
        .await?;
    for entry in &mut loaded {
        entry.loaded_version = entry.version;
        entry.seen_at = Some(head);
    }
    for (at, first) in again {
        let copy = Loaded {
            stream_id: loaded[first].stream_id.clone(),
            state: loaded[first].state.clone(),
            ..loaded[first]
        };
        loaded[at] = copy;
    }
    let read_on = loaded
        .iter()
        .zip(cached)
        .filter(|(entry, cached_version)| entry.version > *cached_version)
        .map(|(entry, _)| Keep::of(entry, entry.version))
        .collect();
    keep(log, cache, read_on).await;
    Ok(loaded)
}

/// Applies one stored event (upcast, then decoded) to a loaded aggregate.
fn fold<A: StreamAggregate>(loaded: &mut Loaded<A>, recorded: ledger::StreamEvent) -> Result<(), StorageError> {
    let event: A::Event = domain::decode_event_text(&recorded.event_type, recorded.schema_version, &recorded.payload).map_err(|error| {
        StorageError::Corrupt {
            stream_id: recorded.stream_id.clone(),
            position: recorded.position,
            reason: error.to_string(),
        }
    })?;
    Arc::make_mut(&mut loaded.state).apply(event);
    loaded.version = recorded.stream_version;
    Ok(())
}

/// Where each stream's load starts: its cached state, else its snapshot (one read for all the
/// streams not cached), else the empty state. A snapshot that does not decode is passed over.
async fn starts<A: StreamAggregate + Send + Sync + 'static>(
    log: &EventLog,
    cache: &StateCache,
    stream_ids: &[String],
) -> Result<Vec<Start<A>>, StorageError> {
    let mut starts: Vec<Start<A>> = stream_ids.iter().map(|id| cache.get::<A>(id).unwrap_or_default()).collect();
    let Some(kind) = A::SNAPSHOT_KIND else {
        return Ok(starts);
    };
    let missing: Vec<&str> = stream_ids
        .iter()
        .zip(&starts)
        .filter(|(_, start)| start.version == 0)
        .map(|(id, _)| id.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(starts);
    }
    let rows: Vec<(String, i64, Value)> = sqlx::query_as(
        "SELECT s.stream_id, s.stream_version, s.state FROM unnest($1::text[]) AS w(stream_id) \
         CROSS JOIN LATERAL (SELECT * FROM snapshots x WHERE x.stream_id = w.stream_id COLLATE \"C\" AND x.kind = $2) s \
         WHERE EXISTS (SELECT 1 FROM events e WHERE e.stream_id = s.stream_id AND e.stream_version = s.stream_version \
                       AND e.hash = s.event_hash)",
    )
    .bind(&missing)
    .bind(kind)
    .fetch_all(log.pool())
    .await?;
    let index: std::collections::HashMap<&str, usize> = stream_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    for (stream_id, version, state) in rows {
        match serde_json::from_value::<A>(state) {
            Ok(state) => {
                starts[index[stream_id.as_str()]] = Start {
                    version,
                    snapshot_version: version,
                    state: Arc::new(state),
                }
            }
            Err(error) => tracing::warn!(%stream_id, %kind, %error, "a snapshot that does not decode is passed over"),
        }
    }
    Ok(starts)
}

/// An aggregate's state at a version of its stream, to cache (and snapshot), whatever its type.
#[derive(Clone)]
struct Keep {
    stream_id: String,
    version: i64,
    snapshot_version: i64,
    loaded_version: i64,
    applied: i64,
    state: Arc<dyn std::any::Any + Send + Sync>,
    /// The state's footprint (worked out only when it is cached).
    footprint: fn(&(dyn std::any::Any + Send + Sync)) -> usize,
    /// The snapshot kind and how to serialise the state, for aggregates that are snapshotted.
    snapshot: Option<(&'static str, fn(&(dyn std::any::Any + Send + Sync)) -> Option<Value>)>,
}

impl Keep {
    fn of<A: StreamAggregate + Send + Sync + 'static>(loaded: &Loaded<A>, version: i64) -> Keep {
        fn serialise<A: StreamAggregate + 'static>(state: &(dyn std::any::Any + Send + Sync)) -> Option<Value> {
            serde_json::to_value(state.downcast_ref::<A>()?).ok()
        }
        fn footprint<A: StreamAggregate + 'static>(state: &(dyn std::any::Any + Send + Sync)) -> usize {
            state.downcast_ref::<A>().map_or(0, A::footprint)
        }
        Keep {
            stream_id: loaded.stream_id.clone(),
            version,
            snapshot_version: loaded.snapshot_version,
            loaded_version: loaded.loaded_version,
            applied: loaded.applied,
            state: loaded.state.clone(),
            footprint: footprint::<A>,
            snapshot: A::SNAPSHOT_KIND.map(|kind| (kind, serialise::<A> as fn(&(dyn std::any::Any + Send + Sync)) -> Option<Value>)),
        }
    }
}

/// Caches states read on or changed, and snapshots those `SNAPSHOT_EVERY` events past their
/// snapshot (one write per kind). A snapshot that cannot be written is only a longer read later.
async fn keep(log: &EventLog, cache: &StateCache, states: Vec<Keep>) {
    let mut snapshots: std::collections::BTreeMap<&'static str, (Vec<String>, Vec<i64>, Vec<Value>)> = Default::default();
    for mut keep in states {
        if let Some((kind, serialise)) = keep.snapshot {
            if keep.version - keep.snapshot_version >= SNAPSHOT_EVERY {
                match serialise(keep.state.as_ref()) {
                    Some(state) => {
                        let batch = snapshots.entry(kind).or_default();
                        batch.0.push(keep.stream_id.clone());
                        batch.1.push(keep.version);
                        batch.2.push(state);
                        keep.snapshot_version = keep.version;
                    }
                    None => tracing::warn!(stream_id = %keep.stream_id, "state not snapshotted"),
                }
            }
        }
        cache.put(keep);
    }
    for (kind, (stream_ids, versions, states)) in snapshots {
        let written = sqlx::query(
            "INSERT INTO snapshots (stream_id, kind, stream_version, event_hash, state) \
             SELECT s.stream_id, $2, s.stream_version, e.hash, s.state \
             FROM unnest($1::text[], $3::bigint[], $4::jsonb[]) AS s(stream_id, stream_version, state) \
             JOIN events e ON e.stream_id = s.stream_id COLLATE \"C\" AND e.stream_version = s.stream_version \
             ON CONFLICT (stream_id) DO UPDATE SET kind = EXCLUDED.kind, stream_version = EXCLUDED.stream_version, \
                 event_hash = EXCLUDED.event_hash, state = EXCLUDED.state, taken_at = now() \
             WHERE snapshots.stream_version <= EXCLUDED.stream_version OR snapshots.kind <> EXCLUDED.kind",
        )
        .bind(&stream_ids)
        .bind(kind)
        .bind(&versions)
        .bind(&states)
        .execute(log.pool())
        .await;
        if let Err(error) = written {
            tracing::warn!(%error, kind, streams = stream_ids.len(), "snapshots not written");
        }
    }
}

/// The system's clock: the one place that reads the time of day.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        domain::clock::stored_precision(Utc::now())
    }
}
