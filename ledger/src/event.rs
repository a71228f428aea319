//! The shapes that cross the log's boundary: events to append, events as recorded, and the
//! outcomes and errors of an append.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Most events one append may carry; larger imports are split by the caller.
pub const APPEND_EVENTS_MAX: usize = 10_000;
/// Longest stream id or event type the log accepts (the schema checks the same bound).
pub const NAME_LENGTH_MAX: usize = 200;

/// An event's payload or metadata on its way into the log: a JSON value, or the canonical text of
/// a typed value, written from it without building a `Value` (`Json::of`). Either way the log
/// stores and hashes the canonical text.
#[derive(Clone, Debug, PartialEq)]
pub struct Json(JsonForm);

#[derive(Clone, Debug, PartialEq)]
enum JsonForm {
    Value(Value),
    /// Written by `canonical::to_canonical_json`, so canonical by construction.
    Canonical(String),
}

impl Json {
    /// The canonical JSON of a typed value (the same text as of `serde_json::to_value(value)`).
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Json, serde_json::Error> {
        Ok(Json(JsonForm::Canonical(crate::canonical::to_canonical_json(value)?)))
    }

    /// The canonical text the log stores and hashes (`chain::canonical_json`).
    pub fn canonical(&self) -> std::borrow::Cow<'_, str> {
        match &self.0 {
            JsonForm::Value(value) => std::borrow::Cow::Owned(crate::chain::canonical_json(value)),
            JsonForm::Canonical(text) => std::borrow::Cow::Borrowed(text),
        }
    }

    /// Whether it is a JSON object.
    pub fn is_object(&self) -> bool {
        match &self.0 {
            JsonForm::Value(value) => value.is_object(),
            JsonForm::Canonical(text) => text.starts_with('{'),
        }
    }

    /// As a JSON value.
    pub fn to_value(&self) -> Value {
        match &self.0 {
            JsonForm::Value(value) => value.clone(),
            JsonForm::Canonical(text) => serde_json::from_str(text).expect("canonical JSON parses"),
        }
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        Json(JsonForm::Value(value))
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        match &self.0 {
            JsonForm::Value(value) => value == other,
            JsonForm::Canonical(_) => self.to_value() == *other,
        }
    }
}

/// An event to append. `occurred_at` is domain time; when absent it is the database time of the append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Json,
    pub metadata: Json,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// A version-1 event with a fresh id, empty metadata and database time.
    pub fn new(event_type: impl Into<String>, payload: impl Into<Json>) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload: payload.into(),
            metadata: Value::Object(Default::default()).into(),
            occurred_at: None,
        }
    }

    pub fn with_id(mut self, event_id: Uuid) -> NewEvent {
        self.event_id = event_id;
        self
    }

    pub fn with_metadata(mut self, metadata: impl Into<Json>) -> NewEvent {
        self.metadata = metadata.into();
        self
    }

    pub fn with_schema_version(mut self, schema_version: i32) -> NewEvent {
        self.schema_version = schema_version;
        self
    }

    pub fn occurred_at(mut self, occurred_at: DateTime<Utc>) -> NewEvent {
        self.occurred_at = Some(occurred_at);
        self
    }
}

/// What the appender expects a stream's current version to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must have no events yet.
    NoStream,
    /// The stream's last event must have exactly this version (versions start at 1).
    Exact(i64),
}

impl ExpectedVersion {
    fn matches(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(version) => actual == version,
        }
    }
}

/// Events for one stream, appended after the stream's current version. With no events, a guard:
/// the append goes ahead only if the stream is still at its expected version.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamAppend {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// The log's head when `expected` was read as the stream's current version (what the
    /// `EventLog::read_streams_each` that read it returned). The writer then need not look the
    /// version up if it knows that nothing was appended to the stream since (`crate::writer`).
    pub seen_at: Option<SeenAt>,
}

/// The log's head, position and hash, at which a read found its streams' versions
/// (`EventLog::read_streams_each`) or an append left the streams it wrote
/// (`AppendOutcome::seen_at`). Only the log makes one, so an append can say at which head its
/// expected versions held, and nothing else; the hash ties it to the log as it was then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenAt {
    pub(crate) position: i64,
    pub(crate) hash: [u8; 32],
}

impl SeenAt {
    /// The head's position.
    pub fn position(self) -> i64 {
        self.position
    }
}

impl StreamAppend {
    pub fn new(stream_id: impl Into<String>, expected: ExpectedVersion, events: Vec<NewEvent>) -> StreamAppend {
        StreamAppend {
            stream_id: stream_id.into(),
            expected,
            events,
            seen_at: None,
        }
    }

    /// `expected` is the stream's version as read by the read that returned `head`.
    pub fn seen_at(mut self, head: SeenAt) -> StreamAppend {
        self.seen_at = Some(head);
        self
    }
}

/// One atomic append over one or several streams: all of it is stored, or none of it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AppendRequest {
    pub streams: Vec<StreamAppend>,
}

impl AppendRequest {
    pub fn single(stream_id: impl Into<String>, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
        AppendRequest {
            streams: vec![StreamAppend::new(stream_id, expected, events)],
        }
    }

    pub fn stream(mut self, stream_id: impl Into<String>, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
        self.streams.push(StreamAppend::new(stream_id, expected, events));
        self
    }

    pub(crate) fn event_count(&self) -> usize {
        self.streams.iter().map(|stream| stream.events.len()).sum()
    }

    pub(crate) fn event_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.streams
            .iter()
            .flat_map(|stream| stream.events.iter().map(|event| event.event_id))
    }

    /// Checks the shape of the request; says what is wrong in words a caller can act on.
    pub(crate) fn check(&self) -> Result<(), AppendError> {
        let invalid = |reason: String| Err(AppendError::Invalid(reason));
        if self.streams.is_empty() || self.event_count() == 0 {
            return invalid("an append needs at least one event".into());
        }
        if self.event_count() > APPEND_EVENTS_MAX {
            return invalid(format!(
                "an append carries at most {APPEND_EVENTS_MAX} events, this one {}",
                self.event_count()
            ));
        }
        let mut stream_ids = std::collections::HashSet::new();
        for stream in &self.streams {
            if stream.stream_id.is_empty() || stream.stream_id.len() > NAME_LENGTH_MAX {
                return invalid(format!("a stream id is 1 to {NAME_LENGTH_MAX} bytes, got {:?}", stream.stream_id));
            }
            if !stream_ids.insert(stream.stream_id.as_str()) {
                return invalid(format!("stream {} appears twice in one append", stream.stream_id));
            }
            // A stream without events is a guard: its expected version is checked, nothing is
            // written to it (the append depended on what the stream said). Unchecked, it says nothing.
            if stream.events.is_empty() && stream.expected == ExpectedVersion::Any {
                return invalid(format!(
                    "stream {} has no events and no expected version in this append",
                    stream.stream_id
                ));
            }
            if let ExpectedVersion::Exact(version) = stream.expected {
                if version < 0 {
                    return invalid(format!("expected version {version} of stream {} is negative", stream.stream_id));
                }
            }
            for event in &stream.events {
                if event.event_type.is_empty() || event.event_type.len() > NAME_LENGTH_MAX {
                    return invalid(format!("an event type is 1 to {NAME_LENGTH_MAX} bytes, got {:?}", event.event_type));
                }
                if event.schema_version < 1 {
                    return invalid(format!(
                        "event {} has schema version {} (must be >= 1)",
                        event.event_id, event.schema_version
                    ));
                }
                if !event.metadata.is_object() {
                    return invalid(format!("event {} has metadata that is not a JSON object", event.event_id));
                }
            }
        }
        let mut event_ids = std::collections::HashSet::new();
        for event_id in self.event_ids() {
            if !event_ids.insert(event_id) {
                return invalid(format!("event id {event_id} appears twice in one append"));
            }
        }
        Ok(())
    }
}

/// What an append did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    /// Positions of the request's events, first and last (the stored ones when a duplicate).
    pub first_position: i64,
    pub last_position: i64,
    /// Every event id was already stored: nothing was written, the append was a retry.
    pub duplicate: bool,
    /// The log's head at which every stream this append wrote is at the version it left it
    /// (its batch's last position, when nothing after it in the batch wrote to those streams): a
    /// caller that keeps the state it appended may say so in its next append
    /// (`StreamAppend::seen_at`).
    #[serde(skip)]
    pub seen_at: Option<SeenAt>,
}

/// The expected version of one stream did not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionConflict {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub actual: i64,
}

impl std::fmt::Display for VersionConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let expected = match self.expected {
            ExpectedVersion::Any => "any version".to_string(),
            ExpectedVersion::NoStream => "no stream".to_string(),
            ExpectedVersion::Exact(version) => format!("version {version}"),
        };
        write!(f, "stream {} expected {expected}, is at version {}", self.stream_id, self.actual)
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AppendError {
    #[error("version conflict: {0}")]
    Conflict(VersionConflict),
    #[error("some but not all of the append's event ids are already stored: {stored_event_ids:?}")]
    PartialDuplicate { stored_event_ids: Vec<Uuid> },
    #[error("invalid append: {0}")]
    Invalid(String),
    #[error("database error during append: {0}")]
    Database(#[source] std::sync::Arc<sqlx::Error>),
    #[error("the log's writer has stopped")]
    WriterStopped,
}

impl ExpectedVersion {
    pub(crate) fn check(self, stream_id: &str, actual: i64) -> Result<(), VersionConflict> {
        if self.matches(actual) {
            Ok(())
        } else {
            Err(VersionConflict {
                stream_id: stream_id.to_string(),
                expected: self,
                actual,
            })
        }
    }
}

/// An event as the log holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedEvent {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    #[serde(serialize_with = "hex_bytes")]
    pub prev_hash: [u8; 32],
    #[serde(serialize_with = "hex_bytes")]
    pub hash: [u8; 32],
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(bytes))
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for RecordedEvent {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let hash_column = |name: &str| -> Result<[u8; 32], sqlx::Error> {
            let bytes: Vec<u8> = row.try_get(name)?;
            bytes.try_into().map_err(|bytes: Vec<u8>| sqlx::Error::ColumnDecode {
                index: name.to_string(),
                source: format!("a hash is 32 bytes, found {}", bytes.len()).into(),
            })
        };
        Ok(RecordedEvent {
            position: row.try_get("position")?,
            stream_id: row.try_get("stream_id")?,
            stream_version: row.try_get("stream_version")?,
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            schema_version: row.try_get("schema_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            recorded_at: row.try_get("recorded_at")?,
            occurred_at: row.try_get("occurred_at")?,
            prev_hash: hash_column("prev_hash")?,
            hash: hash_column("hash")?,
        })
    }
}

/// An event as an aggregate's load reads it: its place, its type and its payload as JSON text, to
/// be decoded straight into the domain's event (no metadata, times or hashes, and no JSON tree
/// built on the way).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct StreamEvent {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: String,
}

/// The columns of `RecordedEvent`, in the order of `FromRow`.
pub(crate) const EVENT_COLUMNS: &str = "position, stream_id, stream_version, event_id, event_type, schema_version, \
     payload, metadata, recorded_at, occurred_at, prev_hash, hash";
