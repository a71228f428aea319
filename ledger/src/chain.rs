//! The hash chain: `hash = SHA-256(prev_hash || canonical envelope)`.
//!
//! The canonical envelope is the event's fields as JSON with object keys sorted by their bytes, no
//! whitespace, and instants as RFC 3339 UTC with exactly six fractional digits (PostgreSQL keeps
//! microseconds). It is computed from values as they read back from the database, so `verify`
//! recomputes exactly what the appender wrote.

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The fields that are hashed, borrowed from either a new or a recorded event.
pub struct Envelope<'a> {
    pub position: i64,
    pub stream_id: &'a str,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: i32,
    /// The payload's and metadata's canonical JSON (`canonical_json`).
    pub payload_json: &'a str,
    pub metadata_json: &'a str,
    pub recorded_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
}

impl Envelope<'_> {
    pub fn canonical(&self, out: &mut Vec<u8>) {
        // Keys in byte order, written by hand so the order cannot depend on serde_json's map type.
        out.extend_from_slice(b"{\"event_id\":\"");
        out.extend_from_slice(self.event_id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
        out.extend_from_slice(b"\",\"event_type\":");
        write_string(out, self.event_type);
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(self.metadata_json.as_bytes());
        out.extend_from_slice(b",\"occurred_at\":\"");
        write_instant(out, self.occurred_at);
        out.extend_from_slice(b"\",\"payload\":");
        out.extend_from_slice(self.payload_json.as_bytes());
        out.extend_from_slice(b",\"position\":");
        out.extend_from_slice(self.position.to_string().as_bytes());
        out.extend_from_slice(b",\"recorded_at\":\"");
        write_instant(out, self.recorded_at);
        out.extend_from_slice(b"\",\"schema_version\":");
        out.extend_from_slice(self.schema_version.to_string().as_bytes());
        out.extend_from_slice(b",\"stream_id\":");
        write_string(out, self.stream_id);
        out.extend_from_slice(b",\"stream_version\":");
        out.extend_from_slice(self.stream_version.to_string().as_bytes());
        out.push(b'}');
    }

    /// The chained hash of this envelope after `prev_hash`. `scratch` is reused between calls.
    pub fn hash(&self, prev_hash: &[u8; 32], scratch: &mut Vec<u8>) -> [u8; 32] {
        scratch.clear();
        self.canonical(scratch);
        let mut hasher = Sha256::new();
        hasher.update(prev_hash);
        hasher.update(&scratch[..]);
        hasher.finalize().into()
    }
}

impl crate::RecordedEvent {
    /// Recomputes this event's hash after `prev_hash` from its stored fields.
    pub fn recompute_hash(&self, prev_hash: &[u8; 32], scratch: &mut Vec<u8>) -> [u8; 32] {
        let payload_json = canonical_json(&self.payload);
        let metadata_json = canonical_json(&self.metadata);
        self.envelope(&payload_json, &metadata_json).hash(prev_hash, scratch)
    }

    /// This event's envelope, its payload and metadata given as their canonical JSON.
    pub fn envelope<'a>(&'a self, payload_json: &'a str, metadata_json: &'a str) -> Envelope<'a> {
        Envelope {
            position: self.position,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload_json,
            metadata_json,
            recorded_at: self.recorded_at,
            occurred_at: self.occurred_at,
        }
    }
}

/// Instants are stored with microsecond precision; truncate before hashing and storing.
pub fn to_stored_precision(instant: DateTime<Utc>) -> DateTime<Utc> {
    instant.trunc_subsecs(6)
}

fn format_instant(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Writes `format_instant(instant)`: digit by digit for years 0 to 9999 outside a leap second
/// (every instant PostgreSQL stores in that range), through chrono's formatter otherwise.
fn write_instant(out: &mut Vec<u8>, instant: DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (instant.year(), instant.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        out.extend_from_slice(format_instant(instant).as_bytes());
        return;
    }
    let digits = |out: &mut Vec<u8>, value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    };
    digits(out, year as u32, 4);
    out.push(b'-');
    digits(out, instant.month(), 2);
    out.push(b'-');
    digits(out, instant.day(), 2);
    out.push(b'T');
    digits(out, instant.hour(), 2);
    out.push(b':');
    digits(out, instant.minute(), 2);
    out.push(b':');
    digits(out, instant.second(), 2);
    out.push(b'.');
    digits(out, nanos / 1_000, 6);
    out.push(b'Z');
}

/// The canonical JSON text of a value (keys sorted by bytes, no whitespace).
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(&mut out, value);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

fn write_string(out: &mut Vec<u8>, value: &str) {
    serde_json::to_writer(&mut *out, value).expect("writing a string to a Vec cannot fail");
}

fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_canonical(out, item);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing a scalar to a Vec cannot fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope_of<'a>(payload: &'a str, metadata: &'a str) -> Envelope<'a> {
        Envelope {
            position: 7,
            stream_id: "account-1",
            stream_version: 3,
            event_id: Uuid::nil(),
            event_type: "TopUpSettled",
            schema_version: 1,
            payload_json: payload,
            metadata_json: metadata,
            recorded_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z").unwrap().to_utc(),
            occurred_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().to_utc(),
        }
    }

    proptest::proptest! {
        /// The envelope's instants are written as chrono's formatter writes them, for any instant
        /// from 4713 BC to 294276 AD (PostgreSQL's range) and beyond, leap seconds included.
        #[test]
        fn instants_are_written_as_chrono_formats_them(micros in -220_000_000_000_000_000i64..8_000_000_000_000_000_000i64, leap in 0u32..1_000_000) {
            let instant = DateTime::<Utc>::from_timestamp_micros(micros).unwrap();
            let mut out = Vec::new();
            write_instant(&mut out, instant);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), format_instant(instant));
            // A leap second (chrono keeps it as a nanosecond count past a whole second).
            let leap = chrono::NaiveTime::from_hms_nano_opt(23, 59, 59, 1_000_000_000 + leap * 1_000).unwrap();
            let instant = instant.date_naive().and_time(leap).and_utc();
            let mut out = Vec::new();
            write_instant(&mut out, instant);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), format_instant(instant));
        }
    }

    #[test]
    fn instants_at_the_edges_of_the_fast_path_are_written_as_chrono_formats_them() {
        for text in [
            "0000-01-01T00:00:00Z",
            "0001-02-03T04:05:06.000001Z",
            "1999-12-31T23:59:59.999999Z",
            "2026-11-29T12:00:00.5Z",
            "9999-12-31T23:59:59.999999Z",
            "-0001-12-31T23:59:59Z",
            "+10000-01-01T00:00:00Z",
        ] {
            let instant = DateTime::parse_from_rfc3339(text)
                .map(|instant| instant.to_utc())
                .or_else(|_| text.parse::<DateTime<Utc>>())
                .unwrap_or_else(|error| panic!("{text}: {error}"));
            let mut out = Vec::new();
            write_instant(&mut out, instant);
            assert_eq!(String::from_utf8(out).unwrap(), format_instant(instant), "{text}");
        }
    }

    #[test]
    fn canonical_form_sorts_keys_and_fixes_instants() {
        let payload = canonical_json(&json!({"b": [1, {"z": "x", "a": null}], "a": "25.00"}));
        let metadata = canonical_json(&json!({}));
        let mut out = Vec::new();
        envelope_of(&payload, &metadata).canonical(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"event_id":"00000000-0000-0000-0000-000000000000","event_type":"TopUpSettled","metadata":{},"occurred_at":"2026-01-02T03:04:05.000000Z","payload":{"a":"25.00","b":[1,{"a":null,"z":"x"}]},"position":7,"recorded_at":"2026-01-02T03:04:05.123456Z","schema_version":1,"stream_id":"account-1","stream_version":3}"#
        );
    }

    #[test]
    fn key_order_does_not_change_the_hash_but_content_does() {
        let metadata = canonical_json(&json!({}));
        let parse = |text: &str| canonical_json(&serde_json::from_str::<Value>(text).unwrap());
        let first = parse(r#"{"a":1,"b":"two"}"#);
        let second = parse(r#"{"b":"two","a":1}"#);
        let changed = canonical_json(&json!({"a": 2, "b": "two"}));
        let mut scratch = Vec::new();
        let hash = |payload: &str, scratch: &mut Vec<u8>| envelope_of(payload, &metadata).hash(&GENESIS_HASH, scratch);
        assert_eq!(hash(&first, &mut scratch), hash(&second, &mut scratch));
        assert_ne!(hash(&first, &mut scratch), hash(&changed, &mut scratch));
        // The previous hash is part of the chain.
        assert_ne!(
            envelope_of(&first, &metadata).hash(&[1; 32], &mut scratch),
            hash(&first, &mut scratch)
        );
    }
}
