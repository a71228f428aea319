//! The outermost crate: the command handler that runs domain aggregates over the event log, the
//! commands of the `billing` binary, and (later) the HTTP API and workers. Only this crate knows
//! the wire format.

pub mod audit;
pub mod cli;
pub mod flows;
pub mod handler;
pub mod history;
pub mod http;
pub mod outbox;
pub mod stripe;
pub mod workers;
