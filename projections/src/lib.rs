//! The read models of the billing ledger, built from the log by projectors that write their rows
//! and their checkpoint in one transaction; rebuilt beside the live tables and swapped in; checked
//! against a replay; and queried as of a past instant.

pub mod balances;
pub mod decode;
pub mod invoices;
pub mod journal;
pub mod metrics;
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

use domain::account::{AccountEvent, Figures};

/// The figures an account event carries, if it carries any.
pub fn figures_of(event: &AccountEvent) -> Option<Figures> {
    match event {
        AccountEvent::TopUpSettled { figures, .. }
        | AccountEvent::HoldPlaced { figures, .. }
        | AccountEvent::HoldCaptured { figures, .. }
        | AccountEvent::HoldReleased { figures, .. }
        | AccountEvent::HourCharged { figures, .. }
        | AccountEvent::ChargeDeclined { figures, .. }
        | AccountEvent::CancellationRefunded { figures, .. }
        | AccountEvent::ServiceCredited { figures, .. }
        | AccountEvent::CardRefundRequested { figures, .. }
        | AccountEvent::CardRefundFailed { figures, .. }
        | AccountEvent::Adjusted { figures, .. }
        | AccountEvent::DisputeOpened { figures, .. }
        | AccountEvent::DisputeClosed { figures, .. } => Some(*figures),
        AccountEvent::AccountOpened { .. }
        | AccountEvent::CardRefundCompleted { .. }
        | AccountEvent::LowBalanceWarned { .. }
        | AccountEvent::LowBalanceCleared { .. } => None,
    }
}
