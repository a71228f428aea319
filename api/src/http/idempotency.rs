//! `Idempotency-Key` on POSTs: the first request with a key runs and its response is stored; a
//! repeat gets the stored response; the same key with another request is a 422. The key's row is
//! inserted before the request runs, so concurrent duplicates wait for the first and share its
//! effect. Keys are per caller (the token's hash). A 5xx is not stored, so it may be retried.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::{AppState, BODY_BYTES_MAX};

/// How long a duplicate waits for the first request with its key to finish.
const WAIT_FOR_FIRST_MAX: Duration = Duration::from_secs(10);

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
    // The caller is the bearer token (hashed); without one the handler answers 401 anyway.
    let Some(authorization) = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return Ok(next.run(request).await);
    };
    let caller = hex::encode(Sha256::digest(authorization.as_bytes()));
    let (parts, body) = request.into_parts();
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

    let claimed =
        sqlx::query("INSERT INTO idempotency_keys (caller, key, request_hash) VALUES ($1, $2, $3) ON CONFLICT (caller, key) DO NOTHING")
            .bind(&caller)
            .bind(&key)
            .bind(&request_hash)
            .execute(&state.pool)
            .await?
            .rows_affected()
            == 1;
    if !claimed {
        return replay(&state, &caller, &key, &request_hash).await;
    }
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let status = response.status();
    if status.is_server_error() {
        sqlx::query("DELETE FROM idempotency_keys WHERE caller = $1 AND key = $2")
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

async fn replay(state: &AppState, caller: &str, key: &str, request_hash: &[u8]) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    loop {
        let row: Option<(Vec<u8>, Option<i32>, Option<serde_json::Value>)> =
            sqlx::query_as("SELECT request_hash, status, body FROM idempotency_keys WHERE caller = $1 AND key = $2")
                .bind(caller)
                .bind(key)
                .fetch_optional(&state.pool)
                .await?;
        match row {
            Some((stored_hash, _, _)) if stored_hash != request_hash => {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "this Idempotency-Key was used with a different request",
                ));
            }
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
                return Ok(response);
            }
            // The first request failed with a 5xx and gave the key back: not replayable.
            None => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "retry",
                    "Retry",
                    "the first request with this Idempotency-Key failed; send it again",
                ))
            }
            Some((_, None, _)) if started.elapsed() < WAIT_FOR_FIRST_MAX => tokio::time::sleep(Duration::from_millis(25)).await,
            Some((_, None, _)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "in-progress",
                    "In progress",
                    "a request with this Idempotency-Key is still running",
                ))
            }
        }
    }
}
