//! VirtFusion over its REST API (`/api/v1`, bearer token). Creating a server is
//! `POST /api/v1/servers` with the package (plan), user and hypervisor group (location); the
//! answer's `data.id` is the provider's id. Then, on that id: `POST .../build` (operating system
//! template, name, hostname), `POST .../power/{boot|shutdown|restart}`, `POST .../suspend`,
//! `POST .../unsuspend` and `DELETE /api/v1/servers/{id}?delay=0`. A 423 (the resource is
//! locked), 429, any 5xx and a timeout are worth retrying; other refusals are not, except that a
//! 404 on a delete means the server is already gone. Creating is made safe to repeat by looking
//! the server up by our id (its name) among the user's servers first.

use std::collections::HashMap;
use std::time::Duration;

use domain::provider::{ProviderError, ProviderFuture, ProvisionRequest, ServerAction, ServerProvider};
use domain::server::PowerAction;
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
    /// Operating system template id per OS image name (`ubuntu-24.04`, ...).
    pub os_templates: HashMap<String, u64>,
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

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.config.base_url.trim_end_matches('/'))
    }

    /// Sends a request and reads the answer; an unsuccessful status is classified.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(reqwest::StatusCode, String), ProviderError> {
        let response = request
            .bearer_auth(&self.config.token)
            .header("accept", "application/json")
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
        Ok((status, text))
    }

    fn server_number(provider_server_id: &str) -> Result<u64, ProviderError> {
        provider_server_id
            .strip_prefix("vf-")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| ProviderError::Permanent(format!("{provider_server_id:?} is not a VirtFusion server id")))
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

impl VirtFusion {
    /// The user's servers (`GET /api/v1/servers/user/{userId}`, every page): our provider id for
    /// each, and our server id where its name is one. A user with no servers may answer 404.
    async fn list(&self) -> Result<Vec<(String, Option<domain::ServerId>)>, ProviderError> {
        let mut servers = Vec::new();
        for page in 1..=PAGES_MAX {
            let url = self.url(&format!("servers/user/{}?page={page}", self.config.user_id));
            let (status, text) = self.send(self.client.get(url)).await?;
            if status == reqwest::StatusCode::NOT_FOUND {
                break;
            }
            if !status.is_success() {
                // Not knowing what exists, nothing may be created: try again later.
                return Err(ProviderError::Retryable(format!(
                    "listing VirtFusion servers: {}",
                    VirtFusion::classify(status, &text)
                )));
            }
            let value: Value = serde_json::from_str(&text)
                .map_err(|error| ProviderError::Retryable(format!("VirtFusion listed servers in invalid JSON: {error}")))?;
            let items = value["data"].as_array().cloned().unwrap_or_default();
            for item in &items {
                let Some(id) = item["id"].as_u64() else {
                    continue;
                };
                let ours = item["name"].as_str().and_then(|name| domain::ServerId::parse(name).ok());
                servers.push((format!("vf-{id}"), ours));
            }
            let last_page = value["last_page"].as_u64().unwrap_or(1);
            if items.is_empty() || page >= last_page {
                break;
            }
        }
        Ok(servers)
    }
}

/// Pages of a server list read at most.
const PAGES_MAX: u64 = 1_000;

impl ServerProvider for VirtFusion {
    fn servers(&self) -> ProviderFuture<'_, Vec<(String, Option<domain::ServerId>)>> {
        Box::pin(self.list())
    }

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
            // Creating is not idempotent at VirtFusion: a server made by an earlier attempt whose
            // answer was lost carries our server id as its name, and is used as it is.
            if let Some(existing) = self
                .list()
                .await?
                .into_iter()
                .find(|(_, server_id)| *server_id == Some(request.server_id))
            {
                return Ok(existing.0);
            }
            let body = json!({
                "packageId": package,
                "userId": self.config.user_id,
                "hypervisorId": group,
                "ipv4": 1,
                // Our ids travel with the server, so a retry after a lost answer can be recognised.
                "name": request.server_id.to_string(),
                "additional": {"order_id": request.order_id.to_string()},
            });
            let (status, text) = self.send(self.client.post(self.url("servers")).json(&body)).await?;
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

    fn act(&self, provider_server_id: &str, action: ServerAction) -> ProviderFuture<'_, ()> {
        let provider_server_id = provider_server_id.to_string();
        Box::pin(async move {
            let id = VirtFusion::server_number(&provider_server_id)?;
            let request = match &action {
                ServerAction::Build { os_image, hostname } => {
                    let template = self
                        .config
                        .os_templates
                        .get(os_image)
                        .ok_or_else(|| ProviderError::Permanent(format!("no VirtFusion operating system template for {os_image}")))?;
                    let mut body = json!({"operatingSystemId": template, "email": false});
                    if let Some(hostname) = hostname {
                        body["name"] = json!(hostname);
                        body["hostname"] = json!(hostname);
                    }
                    self.client.post(self.url(&format!("servers/{id}/build"))).json(&body)
                }
                ServerAction::Power { action } => {
                    let verb = match action {
                        PowerAction::Boot => "boot",
                        PowerAction::Shutdown => "shutdown",
                        PowerAction::Reboot => "restart",
                    };
                    self.client.post(self.url(&format!("servers/{id}/power/{verb}")))
                }
                ServerAction::Suspend => self.client.post(self.url(&format!("servers/{id}/suspend"))),
                ServerAction::Unsuspend => self.client.post(self.url(&format!("servers/{id}/unsuspend"))),
                ServerAction::Delete => self.client.delete(self.url(&format!("servers/{id}?delay=0"))),
            };
            let (status, text) = self.send(request).await?;
            if status.is_success() || (action == ServerAction::Delete && status == reqwest::StatusCode::NOT_FOUND) {
                return Ok(());
            }
            Err(VirtFusion::classify(status, &text))
        })
    }
}
