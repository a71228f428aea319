//! Adapters behind the domain's ports: VPS providers (`domain::provider::ServerProvider`: a
//! simulated provider, VirtFusion) and the card processor (`domain::payments::PaymentGateway`:
//! Stripe). Only this crate speaks to them.

pub mod simulated;
pub mod stripe;
pub mod virtfusion;
