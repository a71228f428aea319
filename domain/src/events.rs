//! Stored events back into domain events: the one way, so that no reader forgets an upcaster.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Brings a stored payload of an older schema version to the current one (every upcaster of
/// every stream; event type names are unique across aggregates).
pub fn upcast(event_type: &str, schema_version: i32, payload: Value) -> Value {
    crate::account::upcast(event_type, schema_version, payload)
}

/// Whether `upcast` changes a payload of this type and version.
pub fn upcasts(event_type: &str, schema_version: i32) -> bool {
    crate::account::upcasts(event_type, schema_version)
}

/// A stored event, as the text of its payload, as the domain event it records: decoded straight
/// from the text unless an upcaster applies.
pub fn decode_event_text<E: DeserializeOwned>(event_type: &str, schema_version: i32, payload: &str) -> Result<E, serde_json::Error> {
    if upcasts(event_type, schema_version) {
        decode_event(event_type, schema_version, serde_json::from_str(payload)?)
    } else {
        serde_json::from_str(payload)
    }
}

/// A stored event as the domain event it records: upcast, then decoded.
pub fn decode_event<E: DeserializeOwned>(event_type: &str, schema_version: i32, payload: Value) -> Result<E, serde_json::Error> {
    serde_json::from_value(upcast(event_type, schema_version, payload))
}
