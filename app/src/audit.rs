//! Export of the log for auditors (JSONL or CSV, with positions and hashes) and import of such an
//! export into another database (event ids, versions and domain times kept; positions and hashes
//! are the new log's own).

use std::io::{BufRead, Write};

use chrono::{DateTime, Utc};
use ledger::{AppendRequest, EventLog, ExpectedVersion, NewEvent, RecordedEvent, StreamAppend};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(text: &str) -> Result<Format, String> {
        match text {
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            other => Err(format!("{other:?} is not a format: csv or jsonl")),
        }
    }
}

/// Where an export starts or ends: a position, or an instant of recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Position(i64),
    Instant(DateTime<Utc>),
}

impl std::str::FromStr for Bound {
    type Err = String;
    fn from_str(text: &str) -> Result<Bound, String> {
        if let Ok(position) = text.parse::<i64>() {
            return Ok(Bound::Position(position));
        }
        DateTime::parse_from_rfc3339(text)
            .map(|instant| Bound::Instant(instant.to_utc()))
            .map_err(|_| format!("{text:?} is neither a position nor an RFC 3339 instant"))
    }
}

const CSV_HEADER: [&str; 12] = [
    "position",
    "stream_id",
    "stream_version",
    "event_id",
    "event_type",
    "schema_version",
    "payload",
    "metadata",
    "recorded_at",
    "occurred_at",
    "prev_hash",
    "hash",
];
const PAGE: usize = 5_000;

/// Which events of a range an export holds: of one stream, of one type; all when `None`.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub stream: Option<String>,
    pub event_type: Option<String>,
}

impl Selection {
    fn holds(&self, event: &RecordedEvent) -> bool {
        self.stream.as_ref().is_none_or(|stream| *stream == event.stream_id)
            && self.event_type.as_ref().is_none_or(|kind| *kind == event.event_type)
    }
}

/// Writes the events with `from <= bound <= to` in position order; returns how many.
pub async fn export(pool: &PgPool, from: Option<Bound>, to: Option<Bound>, format: Format, out: impl Write) -> anyhow::Result<u64> {
    export_selected(pool, from, to, &Selection::default(), None, format, out).await
}

/// Writes the events of `selection` with `from <= bound <= to` in position order, at most `limit`
/// of them when given; returns how many.
pub async fn export_selected(
    pool: &PgPool,
    from: Option<Bound>,
    to: Option<Bound>,
    selection: &Selection,
    limit: Option<u64>,
    format: Format,
    out: impl Write,
) -> anyhow::Result<u64> {
    let mut sink = match format {
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(out);
            writer.write_record(CSV_HEADER)?;
            Sink::Csv(writer)
        }
        Format::Jsonl => Sink::Jsonl(std::io::BufWriter::new(out)),
    };
    let included = |event: &RecordedEvent| {
        let after_from = match from {
            None => true,
            Some(Bound::Position(position)) => event.position >= position,
            Some(Bound::Instant(instant)) => event.recorded_at >= instant,
        };
        let before_to = match to {
            None => true,
            Some(Bound::Position(position)) => event.position <= position,
            Some(Bound::Instant(instant)) => event.recorded_at <= instant,
        };
        (after_from, before_to)
    };
    let mut after = match from {
        Some(Bound::Position(position)) => position - 1,
        _ => 0,
    };
    let mut written = 0u64;
    'pages: loop {
        if limit.is_some_and(|limit| written >= limit) {
            break;
        }
        let page = crate::reads::events(
            pool,
            selection.stream.as_deref(),
            selection.event_type.as_deref(),
            after,
            PAGE as u32,
        )
        .await?
        .items;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            match included(event) {
                (_, false) => break 'pages,
                (false, true) => continue,
                (true, true) if !selection.holds(event) => continue,
                (true, true) if limit.is_some_and(|limit| written >= limit) => break 'pages,
                (true, true) => {}
            }
            match &mut sink {
                Sink::Csv(writer) => writer.write_record([
                    event.position.to_string(),
                    event.stream_id.clone(),
                    event.stream_version.to_string(),
                    event.event_id.to_string(),
                    event.event_type.clone(),
                    event.schema_version.to_string(),
                    event.payload.to_string(),
                    event.metadata.to_string(),
                    event.recorded_at.to_rfc3339(),
                    event.occurred_at.to_rfc3339(),
                    hex_of(&event.prev_hash),
                    hex_of(&event.hash),
                ])?,
                Sink::Jsonl(writer) => {
                    serde_json::to_writer(&mut *writer, event)?;
                    writer.write_all(b"\n")?;
                }
            }
            written += 1;
        }
    }
    match sink {
        Sink::Csv(mut writer) => writer.flush()?,
        Sink::Jsonl(mut writer) => writer.flush()?,
    }
    Ok(written)
}

enum Sink<W: Write> {
    Csv(csv::Writer<W>),
    Jsonl(std::io::BufWriter<W>),
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Deserialize)]
struct ImportedEvent {
    stream_id: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    occurred_at: DateTime<Utc>,
}

/// Appends the events of a JSONL export in their order, each stream at its recorded version.
/// Importing the same file twice stores nothing the second time (event ids are kept).
pub async fn import(log: &EventLog, input: impl BufRead) -> anyhow::Result<u64> {
    let mut pending: Vec<StreamAppend> = Vec::new();
    let mut imported = 0u64;
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: ImportedEvent = serde_json::from_str(&line).map_err(|error| anyhow::anyhow!("line {}: {error}", index + 1))?;
        // One append may not name a stream twice: flush before a stream repeats, keeping order.
        if pending.iter().any(|append| append.stream_id == event.stream_id) {
            imported += flush(log, &mut pending).await?;
        }
        let expected = if event.stream_version == 1 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(event.stream_version - 1)
        };
        let new_event = NewEvent::new(event.event_type, event.payload)
            .with_id(event.event_id)
            .with_schema_version(event.schema_version)
            .with_metadata(event.metadata)
            .occurred_at(event.occurred_at);
        pending.push(StreamAppend::new(event.stream_id, expected, vec![new_event]));
    }
    imported += flush(log, &mut pending).await?;
    Ok(imported)
}

async fn flush(log: &EventLog, pending: &mut Vec<StreamAppend>) -> anyhow::Result<u64> {
    if pending.is_empty() {
        return Ok(0);
    }
    let streams = std::mem::take(pending);
    let count = streams.len() as u64;
    let outcome = log.append(AppendRequest { streams }).await?;
    Ok(if outcome.duplicate { 0 } else { count })
}
