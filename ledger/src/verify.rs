//! Chain verification: recompute every hash from position 1 and compare with what is stored.

use serde::Serialize;
use sqlx::PgPool;

use crate::chain::{canonical_json, GENESIS_HASH};

const PAGE_SIZE: usize = 5_000;

/// A head recorded outside the database: the event at `position` must have `hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub position: i64,
    pub hash: [u8; 32],
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// Parses `POSITION:HASH`, the hash as 64 hexadecimal digits.
    fn from_str(text: &str) -> Result<Anchor, String> {
        let (position, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("an anchor is POSITION:HASH, got {text:?}"))?;
        let position: i64 = position
            .parse()
            .map_err(|_| format!("anchor position {position:?} is not a whole number"))?;
        if position < 1 {
            return Err(format!("anchor position {position} must be at least 1"));
        }
        let bytes = hex::decode(hash).map_err(|_| format!("anchor hash {hash:?} is not hexadecimal"))?;
        let hash: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "an anchor hash is 64 hexadecimal digits (SHA-256)".to_string())?;
        Ok(Anchor { position, hash })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub events_checked: u64,
    pub head_position: i64,
    pub head_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_position: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Recomputes the chain over the whole log. `progress(done, total)` is called after each page.
pub async fn verify_chain(pool: &PgPool, anchor: Option<Anchor>, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, sqlx::Error> {
    // One snapshot for the head and every page of the log: appends committed meanwhile (the log
    // of a serving system grows) are neither half seen nor mistaken for a broken head.
    let mut snapshot = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    let (head_position, head_hash): (i64, Vec<u8>) = sqlx::query_as("SELECT position, hash FROM ledger_head WHERE singleton")
        .fetch_one(&mut *snapshot)
        .await?;
    let (stored_max,): (Option<i64>,) = sqlx::query_as("SELECT max(position) FROM events").fetch_one(&mut *snapshot).await?;
    let total = head_position.max(stored_max.unwrap_or(0)) as u64;

    let mut previous_position = 0i64;
    let mut previous_hash = GENESIS_HASH;
    let mut events_checked = 0u64;
    let mut anchor_seen = false;
    let mut scratch = Vec::with_capacity(1024);
    let bad = |events_checked: u64, position: i64, problem: String, head_hash: [u8; 32]| VerifyReport {
        ok: false,
        events_checked,
        head_position: previous_position_or(position),
        head_hash: hex::encode(head_hash),
        first_bad_position: Some(position),
        problem: Some(problem),
    };
    loop {
        let page = read_stored(&mut *snapshot, previous_position, PAGE_SIZE).await?;
        // Events whose text is not the canonical text hashed, and the first failure of the page.
        let mut unusual = Vec::new();
        let mut failure = None;
        for stored in &page {
            let event = &stored.event;
            let expected_position = previous_position + 1;
            if event.position != expected_position {
                let problem = format!(
                    "position {expected_position} is missing; the next stored event is {}",
                    event.position
                );
                failure = Some((events_checked, expected_position, problem, previous_hash));
                break;
            }
            if event.prev_hash != previous_hash {
                let problem = format!(
                    "prev_hash {} does not match the hash of position {previous_position}",
                    hex::encode(event.prev_hash)
                );
                failure = Some((events_checked, event.position, problem, previous_hash));
                break;
            }
            let (recomputed, as_hashed) = stored.recompute(&previous_hash, &mut scratch);
            if recomputed != event.hash {
                let problem = format!(
                    "stored hash {} differs from the recomputed {}: the event was changed after it was written",
                    hex::encode(event.hash),
                    hex::encode(recomputed)
                );
                failure = Some((events_checked, event.position, problem, previous_hash));
                break;
            }
            if !as_hashed {
                // A NUL escape is refused by the appender and by `jsonb` alike: such text was
                // never stored by the log (and would fail the cast to jsonb rather than report).
                if crate::log::holds_nul(&stored.payload_text) || crate::log::holds_nul(&stored.metadata_text) {
                    failure = Some((events_checked, event.position, TEXT_PROBLEM.into(), previous_hash));
                    break;
                }
                unusual.push((event.position, events_checked, previous_hash));
            }
            if let Some(anchor) = anchor.filter(|anchor| anchor.position == event.position) {
                anchor_seen = true;
                if anchor.hash != event.hash {
                    let problem = format!(
                        "the anchor says {} but the log has {}",
                        hex::encode(anchor.hash),
                        hex::encode(event.hash)
                    );
                    failure = Some((events_checked, event.position, problem, previous_hash));
                    break;
                }
            }
            events_checked += 1;
            previous_position = event.position;
            previous_hash = event.hash;
        }
        // Every event before the failure (if any) is in `unusual` if its text is unusual.
        if let Some(position) = first_not_as_hashed(&mut *snapshot, &unusual).await? {
            let (_, checked, hash_before) = unusual.iter().find(|(at, _, _)| *at == position).expect("one of those asked about");
            return Ok(bad(*checked, position, TEXT_PROBLEM.into(), *hash_before));
        }
        if let Some((checked, position, problem, hash_before)) = failure {
            return Ok(bad(checked, position, problem, hash_before));
        }
        progress(events_checked, total);
        if page.len() < PAGE_SIZE {
            break;
        }
    }
    if head_position != previous_position || head_hash != previous_hash {
        let problem = format!(
            "the recorded head is position {head_position} hash {}, the log ends at {previous_position} hash {}: events were removed",
            hex::encode(&head_hash),
            hex::encode(previous_hash)
        );
        return Ok(bad(events_checked, previous_position + 1, problem, previous_hash));
    }
    if let Some(anchor) = anchor.filter(|_| !anchor_seen) {
        let problem = format!(
            "the anchor names position {} but the log ends at {previous_position}",
            anchor.position
        );
        return Ok(bad(events_checked, anchor.position, problem, previous_hash));
    }
    Ok(VerifyReport {
        ok: true,
        events_checked,
        head_position: previous_position,
        head_hash: hex::encode(previous_hash),
        first_bad_position: None,
        problem: None,
    })
}

const TEXT_PROBLEM: &str = "the payload or metadata is stored as other text than was hashed (the value \
     hashes as stored, but readers of the text may read it otherwise): the event was changed after it was written";

/// An event as verification reads it: as the log holds it, with its payload and metadata as the
/// text stored.
struct Stored {
    event: crate::RecordedEvent,
    payload_text: String,
    metadata_text: String,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Stored {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Stored {
            event: crate::RecordedEvent::from_row(row)?,
            payload_text: row.try_get("payload_text")?,
            metadata_text: row.try_get("metadata_text")?,
        })
    }
}

impl Stored {
    /// The event's hash after `prev_hash`, recomputed from its values, and whether its text is
    /// the canonical text of those values, as the appender hashed and stored it.
    fn recompute(&self, prev_hash: &[u8; 32], scratch: &mut Vec<u8>) -> ([u8; 32], bool) {
        let event = &self.event;
        let payload_json = canonical_json(&event.payload);
        let metadata_json = canonical_json(&event.metadata);
        let hash = event.envelope(&payload_json, &metadata_json).hash(prev_hash, scratch);
        (hash, self.payload_text == payload_json && self.metadata_text == metadata_json)
    }
}

async fn read_stored<'e>(executor: impl sqlx::PgExecutor<'e>, after_position: i64, limit: usize) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {}, payload::text AS payload_text, metadata::text AS metadata_text \
         FROM events WHERE position > $1 ORDER BY position LIMIT $2",
        crate::event::EVENT_COLUMNS
    ))
    .bind(after_position)
    .bind(limit as i64)
    .fetch_all(executor)
    .await
}

/// Of events whose text is not the canonical text they were hashed in (`unusual`: position
/// first), the first whose text is not jsonb's rendering of its value either. Events stored
/// before payloads were kept as `json` (migration 0017) hold that rendering; any other text was
/// written behind the log's back: keys given twice, escapes or spaces that the parsed value does
/// not show, but a reader of the text (an index, a query's `->>`, a decoder that refuses a
/// duplicate field) may.
///
/// Text that jsonb refuses (a number beyond `numeric`'s range, which `json` stores and serde
/// reads as some float) cannot be jsonb's rendering either: when the check of the page fails on
/// such text, each position is checked alone (in a savepoint of its own, where `conn` is in a
/// transaction) and the first refused or not rendered is the answer.
async fn first_not_as_hashed<T>(conn: &mut sqlx::PgConnection, unusual: &[(i64, T, [u8; 32])]) -> Result<Option<i64>, sqlx::Error> {
    if unusual.is_empty() {
        return Ok(None);
    }
    let positions: Vec<i64> = unusual.iter().map(|(position, _, _)| *position).collect();
    match not_rendered(conn, &positions).await? {
        Rendered::Not(position) => Ok(Some(position)),
        Rendered::All => Ok(None),
        Rendered::Refused => {
            for position in positions {
                if !matches!(not_rendered(conn, &[position]).await?, Rendered::All) {
                    return Ok(Some(position));
                }
            }
            Ok(None)
        }
    }
}

enum Rendered {
    All,
    Not(i64),
    /// The cast to jsonb failed on one of them.
    Refused,
}

async fn not_rendered(conn: &mut sqlx::PgConnection, positions: &[i64]) -> Result<Rendered, sqlx::Error> {
    use sqlx::Connection;
    let mut check = conn.begin().await?;
    let found: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
        "SELECT min(position) FROM events WHERE position = ANY($1) \
         AND NOT (payload::text = payload::jsonb::text AND metadata::text = metadata::jsonb::text)",
    )
    .bind(positions)
    .fetch_one(&mut *check)
    .await;
    match found {
        Ok(found) => {
            check.commit().await?;
            Ok(found.map_or(Rendered::All, Rendered::Not))
        }
        // Class 22, data exception: the text is valid JSON that jsonb cannot hold.
        Err(sqlx::Error::Database(error)) if error.code().is_some_and(|code| code.starts_with("22")) => {
            check.rollback().await?;
            Ok(Rendered::Refused)
        }
        Err(error) => Err(error),
    }
}

/// The head reported with a failure is the last good position.
fn previous_position_or(bad_position: i64) -> i64 {
    (bad_position - 1).max(0)
}

#[cfg(test)]
mod tests {
    use super::Anchor;

    #[test]
    fn anchors_parse_or_say_why_not() {
        let hash = "ab".repeat(32);
        assert_eq!(
            format!("12:{hash}").parse::<Anchor>().unwrap(),
            Anchor {
                position: 12,
                hash: [0xab; 32]
            }
        );
        assert!("12".parse::<Anchor>().unwrap_err().contains("POSITION:HASH"));
        assert!(format!("x:{hash}").parse::<Anchor>().unwrap_err().contains("whole number"));
        assert!(format!("0:{hash}").parse::<Anchor>().unwrap_err().contains("at least 1"));
        assert!("3:abcd".parse::<Anchor>().unwrap_err().contains("64 hexadecimal"));
        assert!("3:zz".parse::<Anchor>().unwrap_err().contains("not hexadecimal"));
    }
}

/// What checking a stretch of the chain found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentReport {
    pub from: i64,
    pub to: i64,
    pub ok: bool,
    pub events_checked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_position: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The stretch asked for was longer than `SEGMENT_MAX` events or went past the head: `to` is
    /// where the check stopped.
    pub cut: bool,
}

/// Events one stretch check recomputes at most; a longer stretch is cut there, and says so.
pub const SEGMENT_MAX: i64 = 100_000;

/// Recomputes the chain from `from` to `to` (at most `SEGMENT_MAX` events, and not past the
/// head): each event links to the hash of the one before (the event at `from - 1`, or the genesis
/// hash) and hashes to what is stored, and no position up to the end is missing. A stretch proves
/// itself only; `verify_chain` proves the whole log.
pub async fn verify_segment(pool: &PgPool, from: i64, to: i64) -> Result<SegmentReport, sqlx::Error> {
    let (head,): (i64,) = sqlx::query_as("SELECT position FROM ledger_head WHERE singleton")
        .fetch_one(pool)
        .await?;
    let from = from.clamp(1, head.max(1));
    let asked_to = to.max(from);
    let to = asked_to.min(head).min(from.saturating_add(SEGMENT_MAX - 1));
    let mut report = SegmentReport {
        from,
        to,
        ok: true,
        events_checked: 0,
        first_bad_position: None,
        problem: None,
        cut: to < asked_to,
    };
    let fail = |report: &mut SegmentReport, position: i64, problem: String| {
        report.ok = false;
        report.first_bad_position = Some(position);
        report.problem = Some(problem);
    };
    if head == 0 {
        report.to = 0;
        return Ok(report);
    }
    let mut previous_hash = if from == 1 {
        GENESIS_HASH
    } else {
        let before: Option<(Vec<u8>,)> = sqlx::query_as("SELECT hash FROM events WHERE position = $1")
            .bind(from - 1)
            .fetch_optional(pool)
            .await?;
        match before.and_then(|(hash,)| <[u8; 32]>::try_from(hash).ok()) {
            Some(hash) => hash,
            None => {
                fail(&mut report, from - 1, format!("position {} is missing", from - 1));
                return Ok(report);
            }
        }
    };
    let mut scratch = Vec::with_capacity(1024);
    let mut position = from - 1;
    while position < to {
        let page = read_stored(pool, position, PAGE_SIZE.min((to - position) as usize)).await?;
        if page.is_empty() {
            break;
        }
        let mut unusual = Vec::new();
        let mut failure = None;
        for stored in page.iter().take_while(|stored| stored.event.position <= to) {
            let event = &stored.event;
            let (recomputed, as_hashed) = stored.recompute(&previous_hash, &mut scratch);
            let problem = if event.position != position + 1 {
                Some(format!("position {} is missing", position + 1))
            } else if event.prev_hash != previous_hash {
                Some("its prev_hash is not the hash of the event before".to_string())
            } else if recomputed != event.hash {
                Some("its stored hash differs from the recomputed one: it was changed after it was written".to_string())
            } else if !as_hashed && (crate::log::holds_nul(&stored.payload_text) || crate::log::holds_nul(&stored.metadata_text)) {
                Some(TEXT_PROBLEM.to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                failure = Some((position + 1, problem));
                break;
            }
            if !as_hashed {
                unusual.push((event.position, (), previous_hash));
            }
            report.events_checked += 1;
            position = event.position;
            previous_hash = event.hash;
        }
        if let Some(bad_position) = first_not_as_hashed(&mut *pool.acquire().await?, &unusual).await? {
            report.events_checked = (bad_position - report.from) as u64;
            fail(&mut report, bad_position, TEXT_PROBLEM.to_string());
            return Ok(report);
        }
        if let Some((bad_position, problem)) = failure {
            fail(&mut report, bad_position, problem);
            return Ok(report);
        }
    }
    // The head says the log reaches `to`: anything short of it is missing.
    if position < to {
        fail(&mut report, position + 1, format!("position {} is missing", position + 1));
    }
    Ok(report)
}
