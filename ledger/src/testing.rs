//! Fresh databases for tests: each test gets its own database, copied from a migrated template
//! (built once per set of migrations, under an advisory lock so parallel test processes agree).

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::database::{locate, quote_identifier, Server};
use crate::MIGRATOR;

const TEMPLATE_PREFIX: &str = "billing_tpl_";
const TEMPLATE_LOCK_KEY: i64 = 0x6269_6c6c_7470_6c00; // "billtpl\0"

/// A migrated database of its own, dropped when the value is dropped.
pub struct TestDatabase {
    pub pool: PgPool,
    pub name: String,
    pub server: Server,
}

impl TestDatabase {
    pub async fn new() -> TestDatabase {
        let server = locate().await.unwrap_or_else(|error| panic!("tests need PostgreSQL: {error}"));
        let template = ensure_template(&server)
            .await
            .unwrap_or_else(|error| panic!("cannot build the template database: {error}"));
        let name = format!("billing_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server.options("postgres"))
            .await
            .expect("connect to the maintenance database");
        // A template must have no other sessions: retry briefly if another test's copy is in flight.
        let mut attempts = 0;
        loop {
            let created = sqlx::query(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_identifier(&name),
                quote_identifier(&template)
            ))
            .execute(&mut admin)
            .await;
            match created {
                Ok(_) => break,
                Err(error) if attempts < 50 && error.to_string().contains("is being accessed by other users") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("cannot create test database {name}: {error}"),
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(40)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(server.options(&name))
            .await
            .expect("connect to the test database");
        TestDatabase { pool, name, server }
    }

    /// The connection URL, for a child process such as the `billing` binary.
    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let options = self.server.options("postgres");
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(&self.name));
        // Drop runs outside any runtime we may block: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect_with(&options).await {
                    let _ = sqlx::query(&statement).execute(&mut admin).await;
                }
            });
        })
        .join();
    }
}

async fn ensure_template(server: &Server) -> Result<String, sqlx::Error> {
    let mut digest = Sha256::new();
    for migration in MIGRATOR.iter() {
        digest.update(migration.version.to_le_bytes());
        digest.update(&migration.checksum);
    }
    let template = format!("{TEMPLATE_PREFIX}{}", &hex::encode(digest.finalize())[..16]);
    let mut admin = PgConnection::connect_with(&server.options("postgres")).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await?;
    let result = build_template_locked(server, &mut admin, &template).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await?;
    result.map(|_| template)
}

async fn build_template_locked(server: &Server, admin: &mut PgConnection, template: &str) -> Result<(), sqlx::Error> {
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(template)
        .fetch_optional(&mut *admin)
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    // Templates of older migrations are of no further use.
    let stale: Vec<(String,)> = sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{TEMPLATE_PREFIX}%"))
        .fetch_all(&mut *admin)
        .await?;
    for (name,) in stale {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(&name)))
            .execute(&mut *admin)
            .await?;
    }
    let building = format!("{template}_building");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(&building)))
        .execute(&mut *admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {}", quote_identifier(&building)))
        .execute(&mut *admin)
        .await?;
    {
        let mut connection = PgConnection::connect_with(&server.options(&building)).await?;
        MIGRATOR
            .run(&mut connection)
            .await
            .map_err(|error| sqlx::Error::Migrate(Box::new(error)))?;
        connection.close().await?;
    }
    // Published under its final name only when complete.
    sqlx::query(&format!(
        "ALTER DATABASE {} RENAME TO {}",
        quote_identifier(&building),
        quote_identifier(template)
    ))
    .execute(&mut *admin)
    .await?;
    Ok(())
}
