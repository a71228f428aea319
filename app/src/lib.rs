//! The application: what the product does, without a wire format. The command handler runs the
//! domain's aggregates over the event log; the flows are the product's commands over several
//! aggregates; the workers and the outbox do the due work and tell the outside; `payments` decides
//! what a card processor's event does; `reads` is every query of the read models. `api` (HTTP and
//! the binary) and the tools (`sim`, `bench`) sit on this crate.

pub mod audit;
pub mod cache;
pub mod config;
pub mod flows;
pub mod handler;
pub mod history;
pub mod idempotency;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod payments;
pub mod people;
pub mod reads;
pub mod rebuilds;
pub mod workers;
