//! The event log: an append-only, hash-chained sequence of events in PostgreSQL.
//!
//! This crate owns appending (with optimistic concurrency per stream and group commit), reading a
//! stream or the whole log, catch-up subscriptions with checkpoints, chain verification, and the
//! cqrs-es `PersistedEventRepository` over the log. It knows nothing of billing.

pub mod canonical;
pub mod chain;
pub mod checkpoint;
pub mod cqrs;
pub mod database;
mod event;
pub mod log;
pub mod subscription;
/// Fresh migrated databases for tests; not in production builds.
#[cfg(feature = "testing")]
pub mod testing;
pub mod verify;
mod writer;

pub use event::{
    AppendError, AppendOutcome, AppendRequest, ExpectedVersion, Json, NewEvent, RecordedEvent, SeenAt, StreamAppend, StreamEvent,
    VersionConflict,
};
pub use log::{EventLog, LogConfig, LogError};
pub use writer::COPY_BINARY_HEADER;

/// The migrations of the whole product, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
