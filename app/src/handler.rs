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
pub trait StreamAggregate: Aggregate<Services = ()> + Clone {}

impl StreamAggregate for domain::Account {}
impl StreamAggregate for domain::Server {}
impl StreamAggregate for domain::Order {}
impl StreamAggregate for domain::Catalog {}
impl StreamAggregate for domain::InvoiceSeries {}
impl StreamAggregate for domain::topup::TopUp {}

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

/// An aggregate as loaded from its stream.
pub struct Loaded<A> {
    pub stream_id: String,
    pub version: i64,
    pub state: A,
}

/// The streams a command touches: what was loaded at which version, and the events decided.
pub struct Unit {
    log: EventLog,
    cache: Arc<StateCache>,
    appends: Vec<(String, i64, Vec<(String, i32, Value)>)>,
    /// Where each stream's entry is in `appends`.
    indexes: std::collections::HashMap<String, usize>,
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
        self.guard(&loaded.stream_id, loaded.version);
        Ok(loaded)
    }

    /// Loads many aggregates of one kind in one read of the log (cached states are read on from
    /// their version), each guarded as by `load`. The result is in the order of `stream_ids`.
    pub async fn load_many<A: StreamAggregate + 'static>(&mut self, stream_ids: &[String]) -> Result<Vec<Loaded<A>>, StorageError> {
        let loaded = load_many(&self.log, &self.cache, stream_ids).await?;
        for entry in &loaded {
            self.guard(&entry.stream_id, entry.version);
        }
        Ok(loaded)
    }

    /// Makes the commit depend on `stream_id` being still at `version`. A stream read twice keeps
    /// the first version read: if it moved in between, the commit conflicts and the command reruns.
    fn guard(&mut self, stream_id: &str, version: i64) {
        if !self.indexes.contains_key(stream_id) {
            self.indexes.insert(stream_id.to_string(), self.appends.len());
            self.appends.push((stream_id.to_string(), version, Vec::new()));
        }
    }

    /// Whether the unit has events to append (guards alone are nothing to commit).
    fn has_events(&self) -> bool {
        self.appends.iter().any(|(_, _, events)| !events.is_empty())
    }

    /// Records a receipt once: opens `stream_id` with one event unless it already has events.
    /// Returns false when it had (a redelivery). If another command opens the stream meanwhile,
    /// the commit conflicts and the retry sees it. Receipts of external events (a webhook's event
    /// id) use it to act once, in the same append as their effect.
    pub async fn record_once(&mut self, stream_id: &str, event_type: &str, payload: Value) -> Result<bool, StorageError> {
        if self.log.stream_version(stream_id).await? > 0 {
            return Ok(false);
        }
        self.guard(stream_id, 0);
        let index = self.indexes[stream_id];
        self.appends[index].2.push((event_type.to_string(), 1, payload));
        Ok(true)
    }

    /// Every event of a stream as stored (for flows that read history, such as invoicing).
    pub async fn read_stream(&self, stream_id: &str) -> Result<Vec<ledger::RecordedEvent>, StorageError> {
        Ok(self.log.read_stream_all(stream_id).await?)
    }

    /// Runs a command on a loaded aggregate; its events are applied to `loaded.state` and kept
    /// for the commit. A refusal leaves nothing to commit for this aggregate.
    pub async fn handle<A: StreamAggregate>(&mut self, loaded: &mut Loaded<A>, command: A::Command) -> Result<Vec<A::Event>, A::Error> {
        let sink = EventSink::<A>::default();
        // Every aggregate of the domain decides its events before applying any (`decide`, then
        // `apply` each), so a refusal leaves the state as it was and no copy is needed.
        let result = loaded.state.handle(command, &(), &sink).await;
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
                            serde_json::to_value(event).expect("domain events serialise"),
                        )
                    })
                    .collect::<Vec<_>>();
                if !serialized.is_empty() {
                    match self.indexes.get(&loaded.stream_id) {
                        Some(&index) => self.appends[index].2.extend(serialized),
                        None => {
                            self.indexes.insert(loaded.stream_id.clone(), self.appends.len());
                            self.appends.push((loaded.stream_id.clone(), loaded.version, serialized));
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
/// The log stays the truth; a stale entry only means reading more events.
#[derive(Default)]
struct StateCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (i64, Arc<dyn std::any::Any + Send + Sync>)>>,
}

/// Streams kept in the cache before it starts afresh.
const CACHE_STREAMS_MAX: usize = 250_000;

impl StateCache {
    fn get<A: StreamAggregate + 'static>(&self, stream_id: &str) -> Option<(i64, A)> {
        let entries = self.entries.lock().expect("cache lock");
        let (version, state) = entries.get(stream_id)?;
        state.downcast_ref::<A>().map(|state| (*version, state.clone()))
    }

    fn put<A: StreamAggregate + 'static>(&self, stream_id: &str, version: i64, state: &A) {
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= CACHE_STREAMS_MAX && !entries.contains_key(stream_id) {
            entries.clear();
        }
        match entries.get(stream_id) {
            Some((cached, _)) if *cached >= version => {}
            _ => {
                entries.insert(stream_id.to_string(), (version, Arc::new(state.clone())));
            }
        }
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
            cache: Arc::default(),
        }
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
        }
    }

    /// Appends what `unit` decided, atomically over its streams. A version conflict on attempt
    /// `attempt` is a `Retry` (after a short jittered pause) until the bound, then `Contended`.
    pub async fn commit<E>(&self, unit: Unit, metadata: &Metadata, attempt: u32) -> Result<Commit, HandlerError<E>> {
        if !unit.has_events() {
            return Ok(Commit::Done(None));
        }
        match self.log.append(self.request(unit, metadata)).await {
            Ok(outcome) => Ok(Commit::Done(Some(outcome))),
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
        let streams = unit
            .appends
            .into_iter()
            .map(|(stream_id, version, events)| {
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
                StreamAppend::new(stream_id, expected, events)
            })
            .collect();
        AppendRequest { streams }
    }
}

async fn load<A: StreamAggregate + 'static>(log: &EventLog, cache: &StateCache, stream_id: &str) -> Result<Loaded<A>, StorageError> {
    let (mut version, mut state) = cache.get::<A>(stream_id).unwrap_or_default();
    let cached_version = version;
    loop {
        let events = log.read_stream(stream_id, version, ledger::log::READ_LIMIT_MAX).await?;
        let Some(last) = events.last().map(|event| event.stream_version) else {
            break;
        };
        for recorded in events {
            let event: A::Event =
                domain::decode_event(&recorded.event_type, recorded.schema_version, recorded.payload).map_err(|error| {
                    StorageError::Corrupt {
                        stream_id: stream_id.to_string(),
                        position: recorded.position,
                        reason: error.to_string(),
                    }
                })?;
            state.apply(event);
        }
        version = last;
    }
    if version > cached_version {
        cache.put(stream_id, version, &state);
    }
    Ok(Loaded {
        stream_id: stream_id.to_string(),
        version,
        state,
    })
}

async fn load_many<A: StreamAggregate + 'static>(
    log: &EventLog,
    cache: &StateCache,
    stream_ids: &[String],
) -> Result<Vec<Loaded<A>>, StorageError> {
    let mut loaded: Vec<Loaded<A>> = stream_ids
        .iter()
        .map(|stream_id| {
            let (version, state) = cache.get::<A>(stream_id).unwrap_or_default();
            Loaded {
                stream_id: stream_id.clone(),
                version,
                state,
            }
        })
        .collect();
    let cached: Vec<i64> = loaded.iter().map(|entry| entry.version).collect();
    let wanted: Vec<(String, i64)> = loaded.iter().map(|entry| (entry.stream_id.clone(), entry.version)).collect();
    let index: std::collections::HashMap<&str, usize> = stream_ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    for recorded in log.read_streams(&wanted).await? {
        let entry = &mut loaded[index[recorded.stream_id.as_str()]];
        let event: A::Event = domain::decode_event(&recorded.event_type, recorded.schema_version, recorded.payload).map_err(|error| {
            StorageError::Corrupt {
                stream_id: recorded.stream_id.clone(),
                position: recorded.position,
                reason: error.to_string(),
            }
        })?;
        entry.state.apply(event);
        entry.version = recorded.stream_version;
    }
    for (entry, cached_version) in loaded.iter().zip(cached) {
        if entry.version > cached_version {
            cache.put(&entry.stream_id, entry.version, &entry.state);
        }
    }
    Ok(loaded)
}

/// The system's clock: the one place that reads the time of day.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        domain::clock::stored_precision(Utc::now())
    }
}
