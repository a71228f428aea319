//! Request ids, per-token rate limits on top-ups and orders, request timeouts, and the counters
//! `/metrics` serves in Prometheus' text format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// A request that runs longer than this is answered 503 (and its work is cancelled).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Gives every request an `x-request-id` (the caller's, if sane) and echoes it in the response.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= 100 && value.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let header = HeaderValue::from_str(&id).expect("checked to be visible ASCII");
    request.headers_mut().insert("x-request-id", header.clone());
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    let method = request.method().clone();
    let mut response = match tokio::time::timeout(REQUEST_TIMEOUT, tracing::Instrument::instrument(next.run(request), span.clone())).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Timed out",
            format!("the request took longer than {} s", REQUEST_TIMEOUT.as_secs()),
        )
        .into_response(),
    };
    METRICS.record(&method, response.status(), started.elapsed());
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        )
    });
    response.headers_mut().insert("x-request-id", header);
    response
}

/// A token bucket per caller for creating POSTs on top-ups and orders.
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Callers remembered at most; past that the map starts afresh (everyone gets a full bucket).
const BUCKETS_MAX: usize = 100_000;

impl RateLimiter {
    pub fn new(burst: u32, per_second: f64) -> RateLimiter {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(0.001),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// As configured (`Config::rate_limit_burst`, `Config::rate_limit_per_second`).
    pub fn of(config: &app::config::Config) -> RateLimiter {
        RateLimiter::new(config.rate_limit_burst, config.rate_limit_per_second)
    }

    /// Takes a token for `caller`; `Err(seconds)` says how long until one is free.
    pub fn take(&self, caller: &str) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(caller) {
            buckets.clear();
        }
        let now = Instant::now();
        let (tokens, last) = buckets.entry(caller.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil() as u64)
        }
    }
}

pub async fn rate_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let limited = request.method() == Method::POST && (path.ends_with("/topups") || path.ends_with("/orders"));
    if !limited {
        return next.run(request).await;
    }
    // Keyed on the token itself, however the header spells it (extra spaces get no fresh bucket).
    let Ok(token) = super::auth::bearer_token(request.headers()) else {
        return next.run(request).await;
    };
    let caller = hex::encode(Sha256::digest(token.as_bytes()));
    match state.rate_limiter.take(&caller) {
        Ok(()) => next.run(request).await,
        Err(retry_after) => {
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("too many top-ups or orders from this token; retry in {retry_after} s"),
            )
            .into_response();
            response.headers_mut().insert("retry-after", HeaderValue::from(retry_after));
            response
        }
    }
}

/// Request counters and latency buckets since start; the application's own counters follow them.
pub struct Metrics {
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    latency_buckets: [AtomicU64; 8],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

const LATENCY_BOUNDS_S: [f64; 7] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(|| Metrics {
    requests: Mutex::new(HashMap::new()),
    latency_buckets: Default::default(),
    latency_count: AtomicU64::new(0),
    latency_sum_us: AtomicU64::new(0),
});

impl Metrics {
    fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        // Labels are bounded: any method a client invents counts as "other".
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((method, status.as_u16()))
            .or_default() += 1;
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS_S
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS_S.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The process's counters in Prometheus' text format, followed by `extra` lines.
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::from("# TYPE billing_http_requests_total counter\n");
        let mut requests: Vec<_> = self.requests.lock().expect("metrics lock").iter().map(|(k, v)| (*k, *v)).collect();
        requests.sort();
        for ((method, status), count) in requests {
            out.push_str(&format!(
                "billing_http_requests_total{{method=\"{method}\",status=\"{status}\"}} {count}\n"
            ));
        }
        out.push_str("# TYPE billing_http_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (index, bound) in LATENCY_BOUNDS_S.iter().enumerate() {
            cumulative += self.latency_buckets[index].load(Ordering::Relaxed);
            out.push_str(&format!(
                "billing_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n"
            ));
        }
        cumulative += self.latency_buckets[LATENCY_BOUNDS_S.len()].load(Ordering::Relaxed);
        out.push_str(&format!(
            "billing_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n"
        ));
        out.push_str(&format!(
            "billing_http_request_duration_seconds_sum {}\n",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
        out.push_str(&format!(
            "billing_http_request_duration_seconds_count {}\n",
            self.latency_count.load(Ordering::Relaxed)
        ));
        out.push_str(&app::metrics::render());
        out.push_str(extra);
        out
    }
}
