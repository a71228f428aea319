//! VirtFusion over its REST API (`/api/v1`, bearer token). Creating a server is
//! `POST /api/v1/servers` with the package (plan), user and hypervisor group (location); the
//! answer's `data.id` is the provider's id. A 423 (the resource is locked), 429, any 5xx and a
//! timeout are worth retrying; other refusals are not.

use std::collections::HashMap;
use std::time::Duration;

use domain::provider::{ProviderError, ProviderFuture, ProvisionRequest, ServerProvider};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct VirtFusionConfig {
    pub base_url: String,
    pub token: String,
    /// VirtFusion package id per plan id.
    pub packages: HashMap<String, u64>,
    /// Hypervisor group id per location.
    pub hypervisor_groups: HashMap<String, u64>,
    /// The VirtFusion user servers are created for.
    pub user_id: u64,
    pub timeout: Duration,
}

pub struct VirtFusion {
    config: VirtFusionConfig,
    client: reqwest::Client,
}

impl VirtFusion {
    pub fn new(config: VirtFusionConfig) -> VirtFusion {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .expect("a reqwest client");
        VirtFusion { config, client }
    }

    fn classify(status: reqwest::StatusCode, body: &str) -> ProviderError {
        let detail = format!("VirtFusion answered {status}: {}", body.chars().take(300).collect::<String>());
        if status == reqwest::StatusCode::LOCKED || status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            ProviderError::Retryable(detail)
        } else {
            ProviderError::Permanent(detail)
        }
    }
}

impl ServerProvider for VirtFusion {
    fn provision(&self, request: ProvisionRequest) -> ProviderFuture<'_, String> {
        Box::pin(async move {
            let package = self
                .config
                .packages
                .get(request.plan_id.as_str())
                .ok_or_else(|| ProviderError::Permanent(format!("no VirtFusion package for plan {}", request.plan_id)))?;
            let group = self.config.hypervisor_groups.get(request.location.as_str()).ok_or_else(|| {
                ProviderError::Permanent(format!("no VirtFusion hypervisor group for location {}", request.location.as_str()))
            })?;
            let body = json!({
                "packageId": package,
                "userId": self.config.user_id,
                "hypervisorId": group,
                "ipv4": 1,
                // Our ids travel with the server, so a retry after a lost answer can be recognised.
                "name": request.server_id.to_string(),
                "additional": {"order_id": request.order_id.to_string()},
            });
            let response = self
                .client
                .post(format!("{}/api/v1/servers", self.config.base_url.trim_end_matches('/')))
                .bearer_auth(&self.config.token)
                .header("accept", "application/json")
                .json(&body)
                .send()
                .await
                .map_err(|error| {
                    if error.is_timeout() || error.is_connect() {
                        ProviderError::Retryable(format!("VirtFusion unreachable: {error}"))
                    } else {
                        ProviderError::Retryable(error.to_string())
                    }
                })?;
            let status = response.status();
            let text = response.text().await.map_err(|error| ProviderError::Retryable(error.to_string()))?;
            if !status.is_success() {
                return Err(VirtFusion::classify(status, &text));
            }
            let value: Value = serde_json::from_str(&text)
                .map_err(|error| ProviderError::Permanent(format!("VirtFusion answered with invalid JSON: {error}")))?;
            let id = value["data"]["id"]
                .as_u64()
                .ok_or_else(|| ProviderError::Permanent(format!("VirtFusion's answer has no data.id: {text}")))?;
            Ok(format!("vf-{id}"))
        })
    }
}
