//! cqrs-es 0.5's `PersistedEventRepository` on the log, so an `Aggregate` runs in a
//! `CqrsFramework` over it. An aggregate instance is the stream `<Aggregate::TYPE>-<id>`; its event
//! sequence is the stream version. Event versions are whole numbers ("1", "2") and become the
//! envelope's `schema_version`. Metadata may carry `event_id` (a UUID, for idempotent retries) and
//! `occurred_at` (RFC 3339 domain time); the rest is stored as it is.

use chrono::{DateTime, Utc};
use cqrs_es::persist::{PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot};
use cqrs_es::Aggregate;
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
        payload: event.payload.clone(),
        metadata: Value::Object(metadata),
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
        let Some(first) = events.first() else {
            return Ok(());
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
        let request = AppendRequest::single(stream_id::<A>(&first.aggregate_id), expected, new_events);
        match self.log.append(request).await {
            Ok(_) => Ok(()),
            Err(AppendError::Conflict(_)) | Err(AppendError::PartialDuplicate { .. }) => Err(PersistenceError::OptimisticLockError),
            Err(AppendError::Database(error)) => Err(PersistenceError::ConnectionError(Box::new(AppendError::Database(error)))),
            Err(other) => Err(unknown(other)),
        }
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
