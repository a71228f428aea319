//! Events as the projections see them: decoded into the domain's types once per batch.

use chrono::{DateTime, Utc};
use domain::account::AccountEvent;
use domain::catalog::CatalogEvent;
use domain::invoice::InvoiceSeriesEvent;
use domain::order::OrderEvent;
use domain::server::ServerEvent;
use domain::{AccountId, OrderId, ServerId};
use ledger::RecordedEvent;
use uuid::Uuid;

#[derive(Clone, Debug)]
pub enum Decoded {
    Account(AccountId, AccountEvent),
    Server(ServerId, ServerEvent),
    Order(OrderId, OrderEvent),
    Catalog(CatalogEvent),
    Invoice(InvoiceSeriesEvent),
    /// A stream no projection reads (webhook receipts, for example).
    Other,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub position: i64,
    /// The event's version in its stream.
    pub stream_version: i64,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub event: Decoded,
}

/// The accounts a batch's account events belong to, each once, in order.
pub fn account_ids(records: &[Record]) -> Vec<Uuid> {
    records
        .iter()
        .filter_map(|record| {
            if let Decoded::Account(id, _) = &record.event {
                Some(id.0)
            } else {
                None
            }
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("event at position {position} ({event_type} in {stream_id}) does not decode: {reason}")]
pub struct DecodeError {
    pub position: i64,
    pub stream_id: String,
    pub event_type: String,
    pub reason: String,
}

fn id_after(stream_id: &str, prefix: &str) -> Option<Uuid> {
    stream_id.strip_prefix(prefix).and_then(|rest| Uuid::parse_str(rest).ok())
}

pub fn decode(event: &RecordedEvent) -> Result<Record, DecodeError> {
    let payload = event.payload.to_string();
    decode_stored(&StoredEvent {
        position: event.position,
        stream_id: event.stream_id.clone(),
        stream_version: event.stream_version,
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        payload,
        occurred_at: event.occurred_at,
    })
}

/// What the projections read of a stored event: no metadata or hashes, the payload as text
/// (decoded straight into the domain's types, with no intermediate JSON tree).
#[derive(Debug, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: String,
    pub occurred_at: DateTime<Utc>,
}

/// The events after `after_position`, in position order, at most `limit`, decoded.
pub async fn read_records_after<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    after_position: i64,
    limit: usize,
) -> Result<Vec<Record>, crate::runner::ProjectionError> {
    let stored: Vec<StoredEvent> = sqlx::query_as(
        "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, payload::text AS payload, occurred_at \
         FROM events WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(after_position)
    .bind(limit.max(1) as i64)
    .fetch_all(executor)
    .await?;
    Ok(stored.iter().map(decode_stored).collect::<Result<Vec<_>, _>>()?)
}

pub fn decode_stored(event: &StoredEvent) -> Result<Record, DecodeError> {
    let fail = |reason: String| DecodeError {
        position: event.position,
        stream_id: event.stream_id.clone(),
        event_type: event.event_type.clone(),
        reason,
    };
    fn decode_as<E: serde::de::DeserializeOwned>(event: &StoredEvent) -> Result<E, String> {
        domain::decode_event_text(&event.event_type, event.schema_version, &event.payload).map_err(|error| error.to_string())
    }
    let decoded = if let Some(id) = id_after(&event.stream_id, "account-") {
        Decoded::Account(AccountId(id), decode_as(event).map_err(fail)?)
    } else if let Some(id) = id_after(&event.stream_id, "server-") {
        Decoded::Server(ServerId(id), decode_as(event).map_err(fail)?)
    } else if let Some(id) = id_after(&event.stream_id, "order-") {
        Decoded::Order(OrderId(id), decode_as(event).map_err(fail)?)
    } else if event.stream_id == domain::catalog::CATALOG_STREAM {
        Decoded::Catalog(decode_as(event).map_err(fail)?)
    } else if event.stream_id.starts_with("invoice-series-") {
        Decoded::Invoice(decode_as(event).map_err(fail)?)
    } else {
        Decoded::Other
    };
    Ok(Record {
        position: event.position,
        stream_version: event.stream_version,
        event_id: event.event_id,
        occurred_at: event.occurred_at,
        event: decoded,
    })
}
