//! Parsing requests into the wire types, with every refusal a problem: malformed JSON is a 400, a
//! body too large a 413, a body that is not JSON a 415, and a body or query that does not fit its
//! type a 422 naming the field.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::BODY_BYTES_MAX;

/// A JSON body of type `T`.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Json<T>, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media| {
                let media = media.trim().to_ascii_lowercase();
                media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                "JSON expected",
                "set Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(request, state).await.map_err(|error| match error {
            BytesRejection::FailedToBufferBody(ref failed) if failed.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Body too large",
                format!("bodies are at most {BODY_BYTES_MAX} bytes"),
            ),
            other => ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Malformed request", other.body_text()),
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// `T` from JSON text: a syntax error is a 400, a value that does not fit a 422 naming its field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    if let Ok(value) = value {
        // Trailing characters after the value are malformed JSON.
        return deserializer
            .end()
            .map(|()| value)
            .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Malformed JSON", error.to_string()));
    }
    value.map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Malformed JSON", inner.to_string())
            }
            serde_json::error::Category::Data => {
                let field = match path.as_str() {
                    "." | "" => missing_field(&inner.to_string()).unwrap_or_else(|| "body".to_string()),
                    path => path.to_string(),
                };
                let message = inner.to_string();
                // serde_json appends " at line L column C"; the field names the place.
                let message = message.split(" at line ").next().unwrap_or(&message).to_string();
                ApiError::invalid(field.clone(), format!("{field}: {message}"))
            }
        }
    })
}

/// The field named by serde's "missing field `name`".
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// `axum`'s `Query`, refusing a malformed query string as a problem (422, `field` "query")
/// rather than as plain text: `?limit=abc` or `?chain_only=perhaps`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Query<T>, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| ApiError::invalid("query", rejection.body_text()))
    }
}

/// The request's id (set by the request-id layer), for the metadata of what it causes.
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.chars().take(100).collect())
}

/// Page sizes, bounded: `limit` absent is `default`, outside `1..=max` a 422.
pub fn page_size(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::invalid("limit", format!("limit is 1 to {max}, not {limit}"))),
    }
}

/// The id in a path: one that does not parse names nothing here (a 404).
pub fn path_id<T, E>(parsed: Result<T, E>, what: &'static str) -> Result<T, ApiError> {
    parsed.map_err(|_| ApiError::not_found(what))
}
