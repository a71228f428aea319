//! How long `Idempotency-Key`s are honoured. A request's key rides in the metadata of the events
//! it appends (`Flows::replayed` finds them there) and its answer is stored by the HTTP layer;
//! both are kept for the retention, then the due work deletes the stored answers.

/// How long stored keys are kept: `BILLING_IDEMPOTENCY_RETENTION_HOURS` (default 24, at least 24).
pub fn retention() -> chrono::Duration {
    let hours = std::env::var("BILLING_IDEMPOTENCY_RETENTION_HOURS")
        .ok()
        .and_then(|value| value.parse::<i64>().ok())
        .unwrap_or(24)
        .clamp(24, 24 * 365);
    chrono::Duration::hours(hours)
}

/// Deletes keys older than the retention; returns how many.
pub async fn expire(pool: &sqlx::PgPool) -> Result<u64, sqlx::Error> {
    let cutoff = chrono::Utc::now() - retention();
    Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(cutoff)
        .execute(pool)
        .await?
        .rows_affected())
}

