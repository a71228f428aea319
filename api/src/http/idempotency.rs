//! `Idempotency-Key` on POSTs: the first request with a key runs and its response is stored; a
//! repeat gets the stored response; the same key with another request is a 422. Keys are per
//! caller (the token's hash), and only an authenticated caller's key is ever written.
//!
//! The response table is a convenience; the effect happens once by the log. The key (scoped to
//! its caller) is recorded in the metadata of every event the request appends, and the ids the
//! request creates are derived from it (`Metadata::id_for`), so a command that runs again with
//! the same key finds its effect already in the log and answers as the first run did instead of
//! acting twice (`Flows::replayed`). That is what makes the two cases below safe:
//! - A 5xx is not stored: the key is released, and a retry runs the request again (if the first
//!   run committed before failing, the retry finds its effect and does nothing more).
//! - A claim is a lease (`LEASE`): if its request crashed or timed out without answering, a
//!   retry after the lease takes the key over.
//!
//! Stored keys are deleted after the retention (`BILLING_IDEMPOTENCY_RETENTION_HOURS`, at least
//! 24 h) by the due work.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::auth::{Caller, ClaimedKey};
use super::error::ApiError;
use super::{AppState, BODY_BYTES_MAX};

/// How long a duplicate waits for the first request with its key to finish.
const WAIT_FOR_FIRST_MAX: Duration = Duration::from_secs(10);
/// How long a claim holds a key: longer than the request timeout, so only a request that died
/// (a crash, a lost connection to the database) leaves a claim that can be taken over.
const LEASE_SECONDS: i64 = 60;

/// Paths whose POSTs are not creations (webhooks carry their own ids; the dev routes are tools).
fn exempt(path: &str) -> bool {
    path.starts_with("/v1/webhooks/") || path.starts_with("/v1/dev/") || path.starts_with("/dev/")
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get("idempotency-key").cloned() else {
        return next.run(request).await;
    };
    match handle(state, key, request, next).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(state: AppState, key: HeaderValue, request: Request, next: Next) -> Result<Response, ApiError> {
    let key = key
        .to_str()
        .ok()
        .filter(|key| (1..=255).contains(&key.len()))
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "an Idempotency-Key is 1 to 255 visible characters"))?
        .to_string();
    // Authenticated first: a caller that is not one gets its 401 from the handler, and no key.
    let (mut parts, body) = request.into_parts();
    let caller = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => {
            // The handler's own `Caller` takes the key found here rather than looking it up again.
            parts.extensions.insert(app::keys::Grant {
                key_id: caller.key_id,
                role: caller.role,
                account_id: caller.account_id,
            });
            caller.id
        }
        Err(_) => return Ok(next.run(Request::from_parts(parts, body)).await),
    };
    let bytes = axum::body::to_bytes(body, BODY_BYTES_MAX).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Body too large",
            format!("bodies are at most {BODY_BYTES_MAX} bytes"),
        )
    })?;
    let mut hasher = Sha256::new();
    hasher.update(parts.uri.path().as_bytes());
    hasher.update(b"\n");
    hasher.update(&bytes);
    let request_hash = hasher.finalize().to_vec();

    // Claimed, or answered already, or another request holds it: wait for its answer (or for its
    // lease to be given up, then take the key over).
    let started = std::time::Instant::now();
    while !claim(&state, &caller, &key, &request_hash).await? {
        if let Some(response) = stored(&state, &caller, &key, &request_hash).await? {
            return Ok(response);
        }
        if started.elapsed() >= WAIT_FOR_FIRST_MAX {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "in-progress",
                "In progress",
                "a request with this Idempotency-Key is still running; send it again later",
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    parts.extensions.insert(ClaimedKey(format!("{}:{key}", &caller[..16])));
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let status = response.status();
    if status.is_server_error() {
        // Not stored, so it may be retried: the lease is given up at once.
        sqlx::query("UPDATE idempotency_keys SET claimed_until = now() WHERE caller = $1 AND key = $2 AND status IS NULL")
            .bind(&caller)
            .bind(&key)
            .execute(&state.pool)
            .await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 4 * BODY_BYTES_MAX).await.map_err(ApiError::internal)?;
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    sqlx::query("UPDATE idempotency_keys SET status = $3, body = $4 WHERE caller = $1 AND key = $2")
        .bind(&caller)
        .bind(&key)
        .bind(i32::from(status.as_u16()))
        .bind(stored)
        .execute(&state.pool)
        .await?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// Claims the key for this request: a new key, or one whose earlier request left no answer and
/// whose lease has run out (it failed with a 5xx, crashed or timed out). False when the key is
/// answered already or another request holds it.
async fn claim(state: &AppState, caller: &str, key: &str, request_hash: &[u8]) -> Result<bool, ApiError> {
    let lease = chrono::Utc::now() + chrono::Duration::seconds(LEASE_SECONDS);
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, request_hash, claimed_until) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (caller, key) DO UPDATE SET claimed_until = EXCLUDED.claimed_until \
         WHERE idempotency_keys.status IS NULL AND idempotency_keys.claimed_until < now() \
           AND idempotency_keys.request_hash = EXCLUDED.request_hash",
    )
    .bind(caller)
    .bind(key)
    .bind(request_hash)
    .bind(lease)
    .execute(&state.pool)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// The stored answer to the key, if it has one; a 422 if the key was used with another request.
async fn stored(state: &AppState, caller: &str, key: &str, request_hash: &[u8]) -> Result<Option<Response>, ApiError> {
    let row: Option<(Vec<u8>, Option<i32>, Option<serde_json::Value>)> =
        sqlx::query_as("SELECT request_hash, status, body FROM idempotency_keys WHERE caller = $1 AND key = $2")
            .bind(caller)
            .bind(key)
            .fetch_optional(&state.pool)
            .await?;
    match row {
        Some((stored_hash, _, _)) if stored_hash != request_hash => Err(ApiError::invalid(
            "Idempotency-Key",
            "this Idempotency-Key was used with a different request",
        )),
        Some((_, Some(status), body)) => {
            let status = StatusCode::from_u16(status as u16).map_err(ApiError::internal)?;
            let content_type = if status.is_success() {
                "application/json"
            } else {
                "application/problem+json"
            };
            let mut response = (
                status,
                [(axum::http::header::CONTENT_TYPE, content_type)],
                serde_json::to_vec(&body.unwrap_or_default()).expect("JSON"),
            )
                .into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(Some(response))
        }
        // Still running, or expired just now (the next claim then succeeds).
        _ => Ok(None),
    }
}
