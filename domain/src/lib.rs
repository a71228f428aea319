//! The domain of the billing ledger: money, plans, tax and the billing rules as cqrs-es aggregates,
//! their commands and events, and the double-entry postings of money events. No IO: no database,
//! no HTTP, no system time (time arrives in commands, from a `Clock` at the edge).

pub mod account;
pub mod billing;
pub mod catalog;
pub mod clock;
pub mod events;
pub mod invoice;
pub mod money;
pub mod order;
pub mod payments;
pub mod postings;
pub mod provider;
pub mod server;
pub mod topup;
pub mod types;

pub use account::{Account, AccountCommand, AccountError, AccountEvent, Figures};
pub use catalog::{Catalog, CatalogCommand, CatalogError, CatalogEvent, Fixtures};
pub use clock::{Clock, ManualClock};
pub use events::{decode_event, decode_event_text};
pub use invoice::{InvoiceSeries, InvoiceSeriesCommand, InvoiceSeriesEvent};
pub use money::{Currency, Money, MoneyError};
pub use order::{Order, OrderCommand, OrderError, OrderEvent};
pub use server::{Server, ServerCommand, ServerError, ServerEvent};
pub use types::*;
