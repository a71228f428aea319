//! cqrs-es 0.5's `PersistedEventRepository` on the log, so an `Aggregate` runs in a
//! `CqrsFramework` over it. An aggregate instance is the stream `<Aggregate::TYPE>-<id>`; its event
//! sequence is the stream version. Event versions are whole numbers ("1", "2") and become the
//! envelope's `schema_version`. Metadata may carry `event_id` (a UUID, for idempotent retries) and
//! `occurred_at` (RFC 3339 domain time); the rest is stored as it is.

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;

use cqrs_es::persist::{
    EventUpcaster, PersistedEventRepository, PersistedEventStore, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::{Aggregate, AggregateContext, AggregateError, EventEnvelope, EventStore};
use serde_json::Value;
use uuid::Uuid;

use crate::{AppendError, AppendRequest, EventLog, ExpectedVersion, NewEvent, RecordedEvent};

const REPLAY_QUEUE: usize = 256;

#[derive(Clone)]
pub struct LedgerEventRepository {
    log: EventLog,
}

impl LedgerEventRepository {
    pub fn new(log: EventLog) -> LedgerEventRepository {
        LedgerEventRepository { log }
    }
}

pub fn stream_id<A: Aggregate>(aggregate_id: &str) -> String {
    format!("{}-{aggregate_id}", A::TYPE)
}

fn unknown(error: impl std::error::Error + Send + Sync + 'static) -> PersistenceError {
    PersistenceError::UnknownError(Box::new(error))
}

fn invalid(message: String) -> PersistenceError {
    PersistenceError::UnknownError(message.into())
}

fn serialized<A: Aggregate>(aggregate_id: &str, event: RecordedEvent) -> SerializedEvent {
    SerializedEvent {
        aggregate_id: aggregate_id.to_string(),
        sequence: event.stream_version as usize,
        aggregate_type: A::TYPE.to_string(),
        event_type: event.event_type,
        event_version: event.schema_version.to_string(),
        payload: event.payload,
        metadata: event.metadata,
    }
}

fn schema_version(event_version: &str) -> Result<i32, PersistenceError> {
    let whole = event_version.strip_suffix(".0").unwrap_or(event_version);
    whole
        .parse::<i32>()
        .ok()
        .filter(|version| *version >= 1)
        .ok_or_else(|| invalid(format!("event version {event_version:?} is not a whole number >= 1")))
}

fn new_event(event: &SerializedEvent) -> Result<NewEvent, PersistenceError> {
    let metadata = match &event.metadata {
        Value::Object(map) => map.clone(),
        Value::Null => Default::default(),
        other => return Err(invalid(format!("event metadata must be an object, got {other}"))),
    };
    let event_id = match metadata.get("event_id").and_then(Value::as_str) {
        Some(text) => Uuid::parse_str(text).map_err(|error| invalid(format!("metadata event_id {text:?}: {error}")))?,
        None => Uuid::now_v7(),
    };
    let occurred_at = match metadata.get("occurred_at").and_then(Value::as_str) {
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text)
                .map_err(|error| invalid(format!("metadata occurred_at {text:?}: {error}")))?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    Ok(NewEvent {
        event_id,
        event_type: event.event_type.clone(),
        schema_version: schema_version(&event.event_version)?,
        payload: event.payload.clone().into(),
        metadata: Value::Object(metadata).into(),
        occurred_at,
    })
}

impl PersistedEventRepository for LedgerEventRepository {
    async fn get_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self.log.read_stream_all(&stream_id::<A>(aggregate_id)).await.map_err(unknown)?;
        Ok(events.into_iter().map(|event| serialized::<A>(aggregate_id, event)).collect())
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let stream = stream_id::<A>(aggregate_id);
        let mut events = Vec::new();
        let mut after = last_sequence as i64;
        loop {
            let page = self
                .log
                .read_stream(&stream, after, crate::log::READ_LIMIT_MAX)
                .await
                .map_err(unknown)?;
            let full = page.len() == crate::log::READ_LIMIT_MAX;
            after = page.last().map(|event| event.stream_version).unwrap_or(after);
            events.extend(page.into_iter().map(|event| serialized::<A>(aggregate_id, event)));
            if !full {
                return Ok(events);
            }
        }
    }

    async fn get_snapshot<A: Aggregate>(&self, _aggregate_id: &str) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        // Aggregates are rebuilt from their streams; the log keeps no snapshots.
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return Err(invalid(
                "the event log keeps no snapshots: use an event store without snapshots".into(),
            ));
        }
        self.append::<A>(events, None).await.map(|_| ())
    }

    async fn stream_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<ReplayStream, PersistenceError> {
        let events = self.get_events::<A>(aggregate_id).await?;
        let (mut feed, stream) = ReplayStream::new(REPLAY_QUEUE);
        tokio::spawn(async move {
            for event in events {
                if feed.push(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(stream)
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let prefix = format!("{}-", A::TYPE);
        let log = self.log.clone();
        let (mut feed, stream) = ReplayStream::new(REPLAY_QUEUE);
        tokio::spawn(async move {
            let mut after = 0i64;
            loop {
                let page = match log.read_all(after, crate::log::READ_LIMIT_MAX).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = feed.push(Err(unknown(error))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                after = last.position;
                for event in page {
                    if let Some(aggregate_id) = event.stream_id.strip_prefix(&prefix).map(str::to_string) {
                        if feed.push(Ok(serialized::<A>(&aggregate_id, event))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(stream)
    }
}

impl LedgerEventRepository {
    /// Appends one aggregate instance's events, expecting its stream at the version before the
    /// first; `None` when there were none. A retry whose events are all stored already is the
    /// stored outcome, marked `duplicate`.
    async fn append<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        seen_at: Option<crate::SeenAt>,
    ) -> Result<Option<crate::AppendOutcome>, PersistenceError> {
        let Some(first) = events.first() else {
            return Ok(None);
        };

        if events.iter().any(|event| event.aggregate_id != first.aggregate_id) {
            return Err(invalid("one persist call covers one aggregate instance".into()));
        }
        let expected = match first.sequence {
            0 => return Err(invalid("event sequences start at 1".into())),
            1 => ExpectedVersion::NoStream,
            sequence => ExpectedVersion::Exact(sequence as i64 - 1),
        };
        let new_events = events.iter().map(new_event).collect::<Result<Vec<_>, _>>()?;
        let mut stream = crate::StreamAppend::new(stream_id::<A>(&first.aggregate_id), expected, new_events);
        stream.seen_at = seen_at;
        let request = AppendRequest { streams: vec![stream] };
        match self.log.append(request).await {
            Ok(outcome) => Ok(Some(outcome)),
            Err(AppendError::Conflict(_)) | Err(AppendError::PartialDuplicate { .. }) => Err(PersistenceError::OptimisticLockError),
            Err(AppendError::Database(error)) => Err(PersistenceError::ConnectionError(Box::new(AppendError::Database(error)))),
            Err(other) => Err(unknown(other)),
        }
    }
}

/// A cqrs-es `EventStore` on the log that keeps aggregates it has committed in memory, so a
/// command on a known instance reads nothing: it is decided on the kept state and appended with
/// the log's version check. A state is kept only after its events were appended (not for a
/// retry found stored already); an append that fails, for example because another process
/// appended to the stream first, drops it, and the next command loads the stream again. Streams
/// are loaded, on a miss, as `PersistedEventStore` loads them (with its upcasters). The cache is
/// bounded by a number of instances and evicts them one by one.
pub struct LedgerEventStore<A: Aggregate> {
    repository: LedgerEventRepository,
    loader: PersistedEventStore<LedgerEventRepository, A>,
    kept: quick_cache::sync::Cache<String, Arc<Kept<A>>>,
}

struct Kept<A> {
    version: usize,
    /// The log's head at which the stream stood at `version` (from the append that left it there).
    seen_at: Option<crate::SeenAt>,
    aggregate: A,
}

/// An aggregate instance as a command sees it: its state at `version` of its stream (as of the
/// log's head `seen_at`, when known).
pub struct LedgerAggregateContext<A> {
    aggregate_id: String,
    aggregate: A,
    version: usize,
    seen_at: Option<crate::SeenAt>,
}

impl<A: Aggregate> AggregateContext<A> for LedgerAggregateContext<A> {
    fn aggregate(&mut self) -> &mut A {
        &mut self.aggregate
    }
}

impl<A: Aggregate> LedgerEventStore<A> {
    /// Keeps up to `instances` aggregate instances in memory.
    pub fn new(repository: LedgerEventRepository, instances: usize) -> LedgerEventStore<A> {
        LedgerEventStore {
            loader: PersistedEventStore::new_event_store(repository.clone()),
            repository,
            kept: quick_cache::sync::Cache::new(instances.max(1)),
        }
    }

    /// Upcasters for loading stored events, as `PersistedEventStore::with_upcasters`.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn EventUpcaster>>) -> LedgerEventStore<A> {
        self.loader = self.loader.with_upcasters(upcasters);
        self
    }
}

impl<A: Aggregate + Clone> EventStore<A> for LedgerEventStore<A> {
    type AC = LedgerAggregateContext<A>;

    async fn load_events(&self, aggregate_id: &str) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.loader.load_events(aggregate_id).await
    }

    async fn load_aggregate(&self, aggregate_id: &str) -> Result<LedgerAggregateContext<A>, AggregateError<A::Error>> {
        if let Some(kept) = self.kept.get(aggregate_id) {
            return Ok(LedgerAggregateContext {
                aggregate_id: aggregate_id.to_string(),
                aggregate: kept.aggregate.clone(),
                version: kept.version,
                seen_at: kept.seen_at,
            });
        }
        let loaded = self.loader.load_aggregate(aggregate_id).await?;
        Ok(LedgerAggregateContext {
            aggregate_id: loaded.aggregate_id,
            aggregate: loaded.aggregate,
            version: loaded.current_sequence,
            seen_at: None,
        })
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: LedgerAggregateContext<A>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let LedgerAggregateContext {
            aggregate_id,
            mut aggregate,
            version,
            seen_at,
        } = context;
        let envelopes: Vec<EventEnvelope<A>> = events
            .into_iter()
            .zip(version + 1..)
            .map(|(payload, sequence)| EventEnvelope {
                aggregate_id: aggregate_id.clone(),
                sequence,
                payload,
                metadata: metadata.clone(),
            })
            .collect();
        let serialized = envelopes
            .iter()
            .map(SerializedEvent::try_from)
            .collect::<Result<Vec<_>, PersistenceError>>()?;
        match self.repository.append::<A>(&serialized, seen_at).await {
            Ok(Some(outcome)) if !outcome.duplicate => {
                for envelope in &envelopes {
                    aggregate.apply(envelope.payload.clone());
                }
                let version = version + envelopes.len();
                let kept = Kept {
                    version,
                    seen_at: outcome.seen_at,
                    aggregate,
                };
                self.kept.insert(aggregate_id, Arc::new(kept));
            }
            // Nothing appended: the kept state, if any, is still the stream's.
            Ok(None) => {}
            // Stored before: what the stream holds now is not known here.
            Ok(Some(_)) => {
                self.kept.remove(&aggregate_id);
            }
            Err(error) => {
                self.kept.remove(&aggregate_id);
                return Err(error.into());
            }
        }
        Ok(envelopes)
    }
}
