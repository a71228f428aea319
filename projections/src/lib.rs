//! The read models of the billing ledger, built from the log by projectors that write their rows
//! and their checkpoint in one transaction; rebuilt beside the live tables and swapped in; checked
//! against a replay; and queried as of a past instant.

pub mod balances;
pub mod decode;
pub mod invoices;
pub mod journal;
pub mod metrics;
pub mod orders;
pub mod projection;
pub mod queries;
pub mod rebuild;
pub mod runner;
pub mod servers;
pub mod statement;
mod store;
pub mod verify;

pub use projection::Projection;
pub use runner::ProjectionError;
