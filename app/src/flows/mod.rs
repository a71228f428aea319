//! The product's commands over several aggregates, each one atomic append, by process:
//! `accounts` (opening, the catalogue, adjustments), `orders` (hold + order + server, then capture
//! or release), `servers` (setup, power, cancellation with the pro-rata refund, revocation,
//! resumption, deletion), `billing` (a slot, a batch; declined: suspend), `payments` (top-ups,
//! card refunds, disputes, the processor's events) and `invoicing` (invoices, service credits and
//! credit notes). This module holds what they share: the error, the retry loop (`atomically!`)
//! and the idempotency-key replay check.

use chrono::{DateTime, Utc};
use domain::account::{Account, AccountCommand, AccountError, AccountEvent};
use domain::catalog::{Catalog, CatalogCommand, CatalogError, Fixtures, CATALOG_STREAM};
use domain::invoice::{
    build_invoice, series_stream, BilledCharge, BilledRefund, CreditNoteDraft, InvoiceError, InvoiceSeries, InvoiceSeriesCommand,
    RefundKind,
};
use domain::order::{Order, OrderCommand, OrderError};
use domain::server::{CancellationMode, PowerAction, Server, ServerCommand, ServerError, SuspensionReason};
use domain::{
    AccountId, AdjustmentId, ChargeId, Country, Currency, DisputeId, Hostname, HourSlot, InvoiceId, Location, OrderId, PlanId, RefundId,
    ServerId, TaxRate, TopUpId, YearMonth,
};
use rust_decimal::Decimal;

use crate::handler::{CommandHandler, Commit, HandlerError, Metadata, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Invoice(#[from] InvoiceError),
    #[error(transparent)]
    TopUp(#[from] domain::topup::TopUpError),
    #[error("no {0}")]
    NotFound(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the command lost {attempts} races for its streams; try again")]
    Contended { attempts: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the read models: {0}")]
    Projections(#[from] projections::ProjectionError),
}

impl From<HandlerError<FlowError>> for FlowError {
    fn from(error: HandlerError<FlowError>) -> FlowError {
        match error {
            HandlerError::Rejected(error) => error,
            HandlerError::Contended { attempts } => FlowError::Contended { attempts },
            HandlerError::Storage(error) => FlowError::Storage(error),
        }
    }
}

type Result<T> = std::result::Result<T, FlowError>;

/// Runs `$body` (which uses `$unit`) and commits, retrying on conflict; evaluates to the body's value.
/// `$attempt`, when named, is the attempt's number from 1. In the body, `break value` returns
/// without committing, and `continue` starts the next attempt without committing.
macro_rules! atomically {
    ($flows:expr, $metadata:expr, |$unit:ident| $body:block) => {
        atomically!($flows, $metadata, |$unit, _attempt| $body)
    };
    ($flows:expr, $metadata:expr, |$unit:ident, $attempt:ident| $body:block) => {{
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let $attempt = attempt;
            #[allow(unused_mut)]
            let mut $unit = $flows.handler.unit();
            let value = $body;
            match $flows.handler.commit::<FlowError>($unit, $metadata, attempt).await? {
                Commit::Done(_) => break value,
                Commit::Retry => continue,
            }
        }
    }};
}

mod accounts;
mod billing;
mod invoicing;
mod orders;
mod payments;
mod servers;

use billing::*;
pub use billing::{DueServer, FoldedServer};
use servers::*;

pub use servers::ServerRequest;

/// What charging a slot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotOutcome {
    Charged {
        charge_id: ChargeId,
        capped: bool,
    },
    /// Declined for insufficient funds; the server is now suspended.
    DeclinedAndSuspended,
    AlreadyCharged,
    NotBillable,
    /// A resumption the wallet cannot pay for: nothing was done.
    NotAffordable,
}

/// What one batch of the billing run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchCharges {
    pub charged: u64,
    pub declined: u64,
    /// Listed servers the log does not know as the account's (a stale read model): not charged.
    pub skipped: u64,
    /// Accounts set aside by the run because charging them failed (the others were billed).
    pub failed_accounts: u64,
    /// Which: they are not invoiced until they are billed.
    pub failed: Vec<AccountId>,
}

#[derive(Clone)]
pub struct Flows {
    pub handler: CommandHandler,
    pub settings: Settings,
}

/// The product's configurable rules (`Config` sets them; these are the defaults).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long a request's `Idempotency-Key` makes a repeat a replay (at least 24 h).
    pub idempotency_retention: chrono::Duration,
    /// Days a server suspended for non-payment waits before it is terminated.
    pub unpaid_days: i64,
    /// A runway below this many hours records one low-balance warning.
    pub low_balance_hours: i64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            idempotency_retention: crate::idempotency::RETENTION_DEFAULT,
            unpaid_days: 7,
            low_balance_hours: 24,
        }
    }
}

async fn unit_load<A: crate::handler::StreamAggregate + 'static>(
    unit: &mut crate::handler::Unit,
    stream_id: &str,
) -> Result<crate::handler::Loaded<A>> {
    Ok(unit.load::<A>(stream_id).await?)
}

impl Flows {
    pub fn new(handler: CommandHandler) -> Flows {
        Flows {
            handler,
            settings: Settings::default(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.handler.now()
    }

    /// Whether a request with `metadata`'s idempotency key already has its effect in the log (a
    /// retry of a request whose answer was lost): then the command is not run again, and answers
    /// as the first run did (the ids it made are derived from the key).
    pub async fn replayed(&self, metadata: &Metadata) -> Result<bool> {
        let Some(key) = &metadata.idempotency_key else {
            return Ok(false);
        };
        // Within the keys' retention: a key reused after it is a new request (whose ids, derived
        // from the key, the domain then refuses to make again, as a conflict).
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE metadata::text LIKE '%\"idempotency_key\"%' \
             AND metadata->>'idempotency_key' = $1 \
             AND recorded_at > $2)",
        )
        .bind(key)
        .bind(chrono::Utc::now() - self.settings.idempotency_retention)
        .fetch_one(self.handler.log().pool())
        .await
        .map_err(StorageError::Read)?;
        Ok(found)
    }
}

fn map_single<E: Into<FlowError>>(error: HandlerError<E>) -> FlowError {
    match error {
        HandlerError::Rejected(error) => error.into(),
        HandlerError::Contended { attempts } => FlowError::Contended { attempts },
        HandlerError::Storage(error) => FlowError::Storage(error),
    }
}
