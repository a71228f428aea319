//! The simulated provider for dev mode and tests: provisioning completes after a latency; chosen
//! locations fail, to exercise the failure path. Actions on servers (build, power, suspend,
//! unsuspend, delete) succeed after a tenth of the latency.

use std::collections::HashSet;
use std::time::Duration;

use domain::provider::{ProviderError, ProviderFuture, ProvisionRequest, ServerAction, ServerProvider};

#[derive(Clone, Debug, Default)]
pub struct SimulatedProvider {
    pub latency: Duration,
    /// Provisioning in these locations is refused.
    pub failing_locations: HashSet<String>,
}

impl ServerProvider for SimulatedProvider {
    fn provision(&self, request: ProvisionRequest) -> ProviderFuture<'_, String> {
        Box::pin(async move {
            tokio::time::sleep(self.latency).await;
            if self.failing_locations.contains(request.location.as_str()) {
                return Err(ProviderError::Permanent(format!("no capacity in {}", request.location.as_str())));
            }
            Ok(format!("sim-{}", &request.server_id.0.simple().to_string()[..12]))
        })
    }

    fn act(&self, provider_server_id: &str, action: ServerAction) -> ProviderFuture<'_, ()> {
        let provider_server_id = provider_server_id.to_string();
        Box::pin(async move {
            tokio::time::sleep(self.latency / 10).await;
            tracing::debug!(%provider_server_id, ?action, "simulated provider acted");
            Ok(())
        })
    }
}
