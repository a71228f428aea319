//! Rebuilding a read model from position 0 beside the live one, swapped in when caught up; its
//! progress is in the read model's status (`projections::queries::status`).

use sqlx::PgPool;

/// Why a rebuild did not start.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("no read model is named {0:?}")]
    Unknown(String),
    #[error("{0} is being rebuilt already")]
    AlreadyRebuilding(&'static str),
}

/// Read models being rebuilt by this process (a second rebuild of one would share its side schema).
static REBUILDING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
    std::sync::LazyLock::new(Default::default);

/// Starts rebuilding the read model `name` in the background and returns its name.
pub fn start(pool: &PgPool, name: &str) -> Result<&'static str, NotStarted> {
    let projection = projections::projection::by_name(name).ok_or_else(|| NotStarted::Unknown(name.to_string()))?;
    let key = projection.name();
    if !REBUILDING.lock().expect("rebuild lock").insert(key) {
        return Err(NotStarted::AlreadyRebuilding(key));
    }
    let pool = pool.clone();
    tokio::spawn(async move {
        match projections::rebuild::rebuild(&pool, projection, |_, _| {}).await {
            Ok(report) => tracing::info!(
                name = report.name,
                events = report.events,
                elapsed_ms = report.elapsed_ms,
                "read model rebuilt and swapped in"
            ),
            Err(error) => tracing::error!(name = key, %error, "rebuilding a read model failed; the live one is untouched"),
        }
        REBUILDING.lock().expect("rebuild lock").remove(key);
    });
    Ok(key)
}
