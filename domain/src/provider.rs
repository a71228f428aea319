//! The port to a VPS provider. The domain names what it needs; `adapters` implements it (a
//! simulated provider, VirtFusion).

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::server::PowerAction;
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

/// What the provider is told to do to a server it created, after the log records the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerAction {
    /// Install an operating system: the first setup (with its hostname) or a reinstall.
    Build {
        os_image: String,
        hostname: Option<String>,
    },
    Power {
        action: PowerAction,
    },
    Suspend,
    Unsuspend,
    Delete,
}

impl ServerAction {
    /// The provider action a server event asks for, if any.
    pub fn for_event(event: &crate::server::ServerEvent) -> Option<ServerAction> {
        use crate::server::ServerEvent;
        match event {
            ServerEvent::SetupCompleted { os_image, hostname, .. } => Some(ServerAction::Build {
                os_image: os_image.clone(),
                hostname: Some(hostname.as_str().to_string()),
            }),
            ServerEvent::Reinstalled { os_image, .. } => Some(ServerAction::Build {
                os_image: os_image.clone(),
                hostname: None,
            }),
            ServerEvent::PowerChanged { action, .. } => Some(ServerAction::Power { action: *action }),
            ServerEvent::ServerSuspended { .. } => Some(ServerAction::Suspend),
            ServerEvent::ServerResumed { .. } => Some(ServerAction::Unsuspend),
            ServerEvent::CancellationRequested { power_off: true, .. } => Some(ServerAction::Power {
                action: crate::server::PowerAction::Shutdown,
            }),
            ServerEvent::CancellationRevoked { boot: true, .. } => Some(ServerAction::Power {
                action: crate::server::PowerAction::Boot,
            }),
            ServerEvent::ServerDeleted { .. } | ServerEvent::TerminatedForNonPayment { .. } => Some(ServerAction::Delete),
            _ => None,
        }
    }
}

pub trait ServerProvider: Send + Sync {
    /// Creates the server; returns the provider's id for it. Safe to repeat: a server already
    /// made for the same `server_id` (an earlier attempt whose answer was lost) is found and
    /// returned, not made again.
    fn provision(&self, request: ProvisionRequest) -> ProviderFuture<'_, String>;

    /// The servers the provider holds for this business: its id for each, and ours where the
    /// server carries it. For finding orphans.
    fn servers(&self) -> ProviderFuture<'_, Vec<(String, Option<ServerId>)>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Tells the provider about a change to a server it created (`provider_server_id`). Sending
    /// the same action again must be harmless (the dispatcher retries after a lost answer).
    fn act(&self, provider_server_id: &str, action: ServerAction) -> ProviderFuture<'_, ()>;
}
