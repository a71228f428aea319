//! Provider adapters behind `domain::provider::ServerProvider`. Only this crate speaks to a VPS
//! provider.

pub mod simulated;
pub mod virtfusion;
