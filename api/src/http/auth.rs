//! Bearer tokens: random, shown once, stored as SHA-256, each with a role. A customer token sees
//! one account; anything of another account is "not found" to it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use domain::AccountId;

use super::error::ApiError;
use super::AppState;

pub use app::people::Role;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The key the request came with.
    pub key_id: uuid::Uuid,
    pub role: Role,
    pub account_id: Option<AccountId>,
    /// The token's hash, hex: identifies the caller (for idempotency keys) without the secret.
    pub id: String,
    /// The request's `Idempotency-Key`, scoped to this caller, once the idempotency layer has
    /// claimed it: recorded in the metadata of every event the request causes.
    pub idempotency_key: Option<String>,
    /// The request's `x-request-id`, kept with the events it causes.
    pub request_id: Option<String>,
}

/// A claimed `Idempotency-Key`, scoped to its caller; put in the request's extensions by the
/// idempotency layer.
#[derive(Clone, Debug)]
pub struct ClaimedKey(pub String);

impl Caller {
    /// Finance and admin read everything; a customer reads its own account only.
    pub fn may_read(&self, account_id: AccountId) -> Result<(), ApiError> {
        match self.role {
            Role::Admin | Role::Finance => Ok(()),
            Role::Customer if self.account_id == Some(account_id) => Ok(()),
            Role::Customer => Err(ApiError::not_found("account")),
        }
    }

    /// Only the account's own customer acts on it (top-ups, orders, servers).
    pub fn may_act_as_owner(&self, account_id: AccountId) -> Result<(), ApiError> {
        match self.role {
            Role::Customer if self.account_id == Some(account_id) => Ok(()),
            Role::Customer => Err(ApiError::not_found("account")),
            Role::Admin | Role::Finance => Err(ApiError::forbidden()),
        }
    }

    /// A role check on an account's object: to a customer of another account the object does
    /// not exist (404) rather than being forbidden, so existence is not leaked.
    pub fn require_for_account(&self, roles: &[Role], account_id: AccountId) -> Result<(), ApiError> {
        if self.role == Role::Customer && self.account_id != Some(account_id) {
            return Err(ApiError::not_found("account"));
        }
        self.require(roles)
    }

    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }

    /// Who did it, for the events a request causes: the caller, the request's id and its claimed
    /// `Idempotency-Key`.
    pub fn metadata(&self) -> app::handler::Metadata {
        let (request_id, idempotency_key) = (self.request_id.clone(), self.idempotency_key.clone());
        app::handler::Metadata {
            actor_kind: self.role.as_str().to_string(),
            actor_id: self
                .account_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| self.id[..16].to_string()),
            request_id,
            idempotency_key,
            ..Default::default()
        }
    }
}

/// The bearer token of a request, trimmed (`Bearer  tok ` is the token `tok`).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("an Authorization: Bearer token is required"))?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty() && token.len() <= 200)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let hash = app::keys::token_hash(token);
        // Found already for this request (by the idempotency layer), or looked up now.
        let grant = match parts.extensions.get::<app::keys::Grant>() {
            Some(grant) => *grant,
            None => state
                .cache
                .grant(&state.pool, token, hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?,
        };
        let (role, account_id) = (grant.role, grant.account_id);
        Ok(Caller {
            key_id: grant.key_id,
            role,
            account_id,
            id: hex::encode(hash),
            idempotency_key: parts.extensions.get::<ClaimedKey>().map(|claimed| claimed.0.clone()),
            request_id: super::extract::request_id(&parts.headers),
        })
    }
}
