//! API keys: random bearer tokens, shown once and stored as their SHA-256, each with a role (and a
//! customer's account). A key is named by its id; revoked, it stays for the record and no longer
//! opens anything. Any change to a key is announced on `REVOKED_CHANNEL` in its transaction (a
//! trigger), so a process that keeps grants in memory (`crate::cache`) drops the key as the
//! change commits.

use chrono::{DateTime, Utc};
use domain::AccountId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::people::Role;

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (`bl_` and 64 hexadecimal digits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("bl_{}", hex::encode(bytes))
}

/// What a key opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub key_id: Uuid,
    pub role: Role,
    pub account_id: Option<AccountId>,
}

/// A key as listed (never its token).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct KeyRow {
    pub key_id: Uuid,
    pub role: String,
    pub account_id: Option<Uuid>,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Stores a key for `token` (unless it exists) and returns its id.
pub async fn store(pool: &PgPool, token: &str, role: Role, account_id: Option<AccountId>, label: &str) -> sqlx::Result<Uuid> {
    let hash = token_hash(token).to_vec();
    sqlx::query(
        "INSERT INTO api_keys (token_sha256, role, account_id, label) VALUES ($1, $2, $3, $4) ON CONFLICT (token_sha256) DO NOTHING",
    )
    .bind(&hash)
    .bind(role.as_str())
    .bind(account_id.map(|id| id.0))
    .bind(label)
    .execute(pool)
    .await?;
    sqlx::query_scalar("SELECT key_id FROM api_keys WHERE token_sha256 = $1")
        .bind(&hash)
        .fetch_one(pool)
        .await
}

/// Creates a key with a fresh token: `(id, token)`; the token is returned once and never stored.
pub async fn create(pool: &PgPool, role: Role, account_id: Option<AccountId>, label: &str) -> sqlx::Result<(Uuid, String)> {
    let token = new_token();
    let key_id = store(pool, &token, role, account_id, label).await?;
    Ok((key_id, token))
}

/// What `token` opens now: `None` for an unknown or revoked key.
pub async fn grant(pool: &PgPool, token: &str) -> sqlx::Result<Option<Grant>> {
    let row: Option<(Uuid, String, Option<Uuid>)> =
        sqlx::query_as("SELECT key_id, role, account_id FROM api_keys WHERE token_sha256 = $1 AND revoked_at IS NULL")
            .bind(token_hash(token).to_vec())
            .fetch_optional(pool)
            .await?;
    let Some((key_id, role, account_id)) = row else {
        return Ok(None);
    };
    let role = Role::parse(&role).ok_or_else(|| sqlx::Error::Decode(format!("api_keys holds an unknown role {role:?}").into()))?;
    Ok(Some(Grant {
        key_id,
        role,
        account_id: account_id.map(AccountId),
    }))
}

/// Keys, newest first, optionally of one account, after a cursor (a key's id): `None` when the
/// cursor names no key (of that account).
pub async fn list(
    pool: &PgPool,
    account_id: Option<AccountId>,
    after: Option<Uuid>,
    limit: u32,
) -> sqlx::Result<Option<crate::reads::Page<KeyRow>>> {
    let account = account_id.map(|id| id.0);
    let after: Option<(DateTime<Utc>, Uuid)> = match after {
        None => None,
        Some(cursor) => {
            let row = sqlx::query_as("SELECT created_at, key_id FROM api_keys WHERE key_id = $1 AND ($2::uuid IS NULL OR account_id = $2)")
                .bind(cursor)
                .bind(account)
                .fetch_optional(pool)
                .await?;
            match row {
                Some(row) => Some(row),
                None => return Ok(None),
            }
        }
    };
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_id, role, account_id, label, created_at, revoked_at FROM api_keys
          WHERE ($1::uuid IS NULL OR account_id = $1)
            AND ($2::timestamptz IS NULL OR (created_at, key_id) < ($2, $3))
          ORDER BY created_at DESC, key_id DESC LIMIT $4",
    )
    .bind(account)
    .bind(after.map(|(at, _)| at))
    .bind(after.map(|(_, id)| id))
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    Ok(Some(crate::reads::Page::of(rows, limit, |row| row.key_id.to_string())))
}

/// Revokes a key: `None` if there is no such key; the key as it now is otherwise (revoking a
/// revoked key changes nothing and keeps its first instant).
pub async fn revoke(pool: &PgPool, key_id: Uuid) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE key_id = $1
         RETURNING key_id, role, account_id, label, created_at, revoked_at",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await
}

/// The channel on which any change to a key is announced (by a trigger on `api_keys`, migration
/// 0015, whoever makes the change): the payload is its token's SHA-256 in hexadecimal.
pub const REVOKED_CHANNEL: &str = "billing_api_keys";
