//! Bearer tokens: random, shown once, stored as SHA-256, each with a role. A customer token sees
//! one account; anything of another account is "not found" to it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use domain::AccountId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;

pub use app::people::Role;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
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

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (`bl_` and 64 hexadecimal digits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("bl_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Stores a key for `token` (creating it unless it exists).
pub async fn store_key(pool: &PgPool, token: &str, role: Role, account_id: Option<AccountId>, label: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_keys (token_sha256, role, account_id, label) VALUES ($1, $2, $3, $4) ON CONFLICT (token_sha256) DO NOTHING",
    )
    .bind(token_hash(token).to_vec())
    .bind(role.as_str())
    .bind(account_id.map(|id| id.0))
    .bind(label)
    .execute(pool)
    .await?;
    Ok(())
}

/// Keys recently found in `api_keys`, by token hash, so a busy caller is not looked up per request.
/// Keys are never changed or removed once stored, so an entry cannot go stale; it is still dropped
/// after `KEY_CACHE_SECONDS`, and the whole cache when it holds `KEY_CACHE_MAX` keys.
struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], ((Role, Option<AccountId>), std::time::Instant)>>,
}

const KEY_CACHE_SECONDS: u64 = 60;
const KEY_CACHE_MAX: usize = 100_000;

static KNOWN_KEYS: std::sync::LazyLock<KeyCache> = std::sync::LazyLock::new(|| KeyCache {
    entries: std::sync::Mutex::new(std::collections::HashMap::new()),
});

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<(Role, Option<AccountId>)> {
        let entries = self.entries.lock().expect("key cache lock");
        let (known, at) = entries.get(hash)?;
        (at.elapsed().as_secs() < KEY_CACHE_SECONDS).then_some(*known)
    }

    fn put(&self, hash: [u8; 32], known: (Role, Option<AccountId>)) {
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash, (known, std::time::Instant::now()));
    }
}

/// Creates a key with a fresh token; the token is returned once and never stored.
pub async fn create_key(pool: &PgPool, role: Role, account_id: Option<AccountId>, label: &str) -> Result<String, sqlx::Error> {
    let token = new_token();
    store_key(pool, &token, role, account_id, label).await?;
    Ok(token)
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
        let hash = token_hash(token);
        let (role, account_id) = match KNOWN_KEYS.get(&hash) {
            Some(known) => known,
            None => {
                let row: Option<(String, Option<Uuid>)> = sqlx::query_as("SELECT role, account_id FROM api_keys WHERE token_sha256 = $1")
                    .bind(hash.to_vec())
                    .fetch_optional(&state.pool)
                    .await?;
                let (role, account_id) = row.ok_or_else(|| ApiError::unauthorized("unknown token"))?;
                let role = Role::parse(&role).ok_or_else(|| ApiError::internal(format!("api_keys holds an unknown role {role:?}")))?;
                let known = (role, account_id.map(AccountId));
                KNOWN_KEYS.put(hash, known);
                known
            }
        };
        Ok(Caller {
            role,
            account_id,
            id: hash.iter().map(|b| format!("{b:02x}")).collect(),
            idempotency_key: parts.extensions.get::<ClaimedKey>().map(|claimed| claimed.0.clone()),
            request_id: super::extract::request_id(&parts.headers),
        })
    }
}
