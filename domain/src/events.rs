//! Stored events back into domain events: the one way, so that no reader forgets an upcaster.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Brings a stored payload of an older schema version to the current one (every upcaster of
/// every stream; event type names are unique across aggregates).
pub fn upcast(event_type: &str, schema_version: i32, payload: Value) -> Value {
    crate::account::upcast(event_type, schema_version, payload)
}

/// A stored event as the domain event it records: upcast, then decoded.
pub fn decode_event<E: DeserializeOwned>(event_type: &str, schema_version: i32, payload: Value) -> Result<E, serde_json::Error> {
    serde_json::from_value(upcast(event_type, schema_version, payload))
}
