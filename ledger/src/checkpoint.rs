//! Checkpoints of projectors. A projector locks its checkpoint, applies events past it and stores
//! the new position in the same transaction as its rows: a crash anywhere loses or repeats nothing,
//! and a second instance of the same projector waits instead of applying events twice.

use sqlx::{PgConnection, PgExecutor};

/// The stored position of `name`, 0 when it has none.
pub async fn load<'e>(executor: impl PgExecutor<'e>, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<(i64,)> = sqlx::query_as("SELECT position FROM checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(executor)
        .await?;
    Ok(position.map(|(position,)| position).unwrap_or(0))
}

/// Locks `name`'s checkpoint for the rest of the transaction and returns its position.
pub async fn lock(tx: &mut PgConnection, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query("INSERT INTO checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let (position,): (i64,) = sqlx::query_as("SELECT position FROM checkpoints WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    Ok(position)
}

/// Moves `name`'s checkpoint forward; it never moves back.
pub async fn store(tx: &mut PgConnection, name: &str, position: i64) -> Result<(), sqlx::Error> {
    let updated = sqlx::query(
        "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now() \
         WHERE checkpoints.position <= excluded.position",
    )
    .bind(name)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    assert_eq!(updated.rows_affected(), 1, "checkpoint {name} would move back to {position}");
    Ok(())
}
