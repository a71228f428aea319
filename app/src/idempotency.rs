//! How long `Idempotency-Key`s are honoured (`Config::idempotency_retention`, at least 24 h). A
//! request's key rides in the metadata of the events it appends (`Flows::replayed` finds them
//! there) and its answer is stored by the HTTP layer; both count for the retention, then the due
//! work deletes the stored answers.

/// The retention when none is configured.
pub const RETENTION_DEFAULT: chrono::Duration = chrono::Duration::hours(24);

/// Deletes stored answers older than `retention`; returns how many.
pub async fn expire(pool: &sqlx::PgPool, retention: chrono::Duration) -> Result<u64, sqlx::Error> {
    let cutoff = chrono::Utc::now() - retention;
    Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(cutoff)
        .execute(pool)
        .await?
        .rows_affected())
}
