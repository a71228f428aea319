//! The port to a VPS provider. The domain names what it needs; `adapters` implements it (a
//! simulated provider, VirtFusion).

use std::future::Future;
use std::pin::Pin;

use crate::types::{Location, OrderId, PlanId, ServerId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionRequest {
    pub order_id: OrderId,
    pub server_id: ServerId,
    pub plan_id: PlanId,
    pub location: Location,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again later: the provider is busy, locked (423), unavailable or slow.
    #[error("provider temporarily unable: {0}")]
    Retryable(String),
    /// Trying again will not help: the request was refused.
    #[error("provider refused: {0}")]
    Permanent(String),
}

pub type ProviderFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

pub trait ServerProvider: Send + Sync {
    /// Creates the server; returns the provider's id for it.
    fn provision(&self, request: ProvisionRequest) -> ProviderFuture<'_, String>;
}
