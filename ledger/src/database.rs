//! Finding PostgreSQL without a manual step: `DATABASE_URL`; else a server on the local socket or
//! 127.0.0.1:5432; else a private cluster under the project's data folder, started from the installed
//! server binaries (as the `postgres` user when run as root); else an error saying what to install.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const PRIVATE_PORT: u16 = 5432;

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(
        "no PostgreSQL found: nothing answers on the local socket or 127.0.0.1:5432, and no server binaries \
         (initdb, pg_ctl) are installed to start a private one. Install PostgreSQL (Debian/Ubuntu: \
         `apt-get install -y postgresql`) or set DATABASE_URL to a server you can reach."
    )]
    NotFound,
    #[error("DATABASE_URL is not a PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("could not start the private PostgreSQL cluster in {dir}: {reason}")]
    PrivateCluster { dir: PathBuf, reason: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Where a server was found, as a URL template for any database on it.
#[derive(Clone, Debug)]
pub struct Server {
    /// Says where, for people (`local socket /var/run/postgresql`, `private cluster in ...`).
    pub description: String,
    kind: ServerKind,
}

#[derive(Clone, Debug)]
enum ServerKind {
    /// From `DATABASE_URL`; other databases on the same server replace its path.
    Url(String),
    Socket {
        dir: PathBuf,
        port: u16,
        user: String,
    },
    Tcp {
        host: String,
        port: u16,
        user: String,
    },
}

impl Server {
    /// The connection URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        match &self.kind {
            ServerKind::Url(url) => replace_database(url, database),
            ServerKind::Socket { dir, port, user } => {
                format!("postgres://{user}@localhost/{database}?host={}&port={port}", dir.display())
            }
            ServerKind::Tcp { host, port, user } => {
                format!("postgres://{user}@{host}:{port}/{database}")
            }
        }
    }

    pub fn options(&self, database: &str) -> PgConnectOptions {
        session_settings(PgConnectOptions::from_str(&self.url(database)).expect("URLs built by Server::url parse"))
    }

    /// Creates `database` unless it exists (racing creators are fine).
    pub async fn ensure_database(&self, database: &str) -> Result<(), DatabaseError> {
        let mut admin = PgConnection::connect_with(&self.options(self.maintenance_database())).await?;
        let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(database)
            .fetch_optional(&mut admin)
            .await?;
        if exists.is_none() {
            let created = sqlx::query(&format!("CREATE DATABASE {}", quote_identifier(database)))
                .execute(&mut admin)
                .await;
            match created {
                Ok(_) => {}
                // 42P04 duplicate_database, 23505 when two creators race on pg_database's index.
                Err(sqlx::Error::Database(error)) if matches!(error.code().as_deref(), Some("42P04") | Some("23505")) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// The database to connect to for administration.
    pub fn maintenance_database(&self) -> &str {
        "postgres"
    }
}

/// What every connection of the product sets for its session, on top of the server's defaults.
///
/// `jit = off`: PostgreSQL compiles a query to machine code when its estimated cost passes
/// `jit_above_cost`, which the product's set-wise reads reach whenever they name a few thousand
/// streams (a billing run loading its batch's wallets and servers: about 130 ms of compiling, each
/// time, for a read that runs in a few milliseconds). Every query of the product is short, so
/// compiling one never pays for itself.
pub fn session_settings(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("jit", "off")]).log_statements(tracing::log::LevelFilter::Trace)
}

/// The project's data folder: `BILLING_DATA_DIR`, else `.data` at the workspace root.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("BILLING_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the ledger crate sits in the workspace")
            .join(".data"),
    }
}

/// Finds a server as the module documentation says.
pub async fn locate() -> Result<Server, DatabaseError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        PgConnectOptions::from_str(&url).map_err(DatabaseError::BadUrl)?;
        return Ok(Server {
            description: "DATABASE_URL".into(),
            kind: ServerKind::Url(url),
        });
    }
    // BILLING_PG_PROBE=off skips the shared server, to use (and test) the private cluster.
    if std::env::var("BILLING_PG_PROBE").as_deref() != Ok("off") {
        if let Some(server) = probe_local_servers().await {
            return Ok(server);
        }
    }
    start_private_cluster(&data_dir()).await
}

/// Connects to the product's database `name` (creating it on a located server when missing). With
/// `DATABASE_URL` the URL's database is used as it is.
pub async fn connect(name: &str, max_connections: u32) -> Result<(PgPool, Server), DatabaseError> {
    let server = locate().await?;
    let options = match &server.kind {
        ServerKind::Url(url) => session_settings(PgConnectOptions::from_str(url).map_err(DatabaseError::BadUrl)?),
        _ => {
            server.ensure_database(name).await?;
            server.options(name)
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok((pool, server))
}

async fn probe_local_servers() -> Option<Server> {
    let mut users = vec!["postgres".to_string()];
    if let Ok(user) = std::env::var("USER") {
        if user != "postgres" {
            users.push(user);
        }
    }
    let mut candidates = Vec::new();
    for dir in ["/var/run/postgresql", "/tmp"] {
        if Path::new(dir).join(".s.PGSQL.5432").exists() {
            for user in &users {
                candidates.push(Server {
                    description: format!("local socket {dir} as {user}"),
                    kind: ServerKind::Socket {
                        dir: dir.into(),
                        port: 5432,
                        user: user.clone(),
                    },
                });
            }
        }
    }
    for user in &users {
        candidates.push(Server {
            description: format!("127.0.0.1:5432 as {user}"),
            kind: ServerKind::Tcp {
                host: "127.0.0.1".into(),
                port: 5432,
                user: user.clone(),
            },
        });
    }
    for candidate in candidates {
        if answers(&candidate).await {
            return Some(candidate);
        }
    }
    None
}

async fn answers(server: &Server) -> bool {
    let options = server.options("postgres");
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(&options)).await,
        Ok(Ok(_))
    )
}

async fn start_private_cluster(data_dir: &Path) -> Result<Server, DatabaseError> {
    let data_dir = data_dir.to_path_buf();
    let cluster = {
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || start_private_cluster_blocking(&data_dir))
            .await
            .expect("the cluster starter does not panic")?
    };
    let server = Server {
        description: format!("private cluster in {}", cluster.display()),
        kind: ServerKind::Socket {
            dir: cluster,
            port: PRIVATE_PORT,
            user: "postgres".into(),
        },
    };
    for _ in 0..50 {
        if answers(&server).await {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(DatabaseError::PrivateCluster {
        dir: data_dir,
        reason: "the server started but does not answer on its socket".into(),
    })
}

/// The cluster's directory, which is also its socket directory. As root the server runs as
/// `postgres`, which must be able to reach it; a data folder it cannot reach (under /root, say) is
/// swapped for one in the system's temporary folder.
fn cluster_dir(data_dir: &Path) -> PathBuf {
    let preferred = data_dir.join("pg");
    if !running_as_root() || reachable_by_postgres(data_dir) {
        return preferred;
    }
    let mut hash = 0xcbf29ce484222325u64;
    for byte in data_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3);
    }
    std::env::temp_dir().join(format!("billing-pg-{:08x}", hash as u32))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|metadata| metadata.uid() == 0).unwrap_or(false)
}

fn reachable_by_postgres(dir: &Path) -> bool {
    let _ = std::fs::create_dir_all(dir);
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(dir)
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// Initialises the cluster when new and starts it when stopped; returns its directory.
fn start_private_cluster_blocking(data_dir: &Path) -> Result<PathBuf, DatabaseError> {
    let fail = |reason: String| DatabaseError::PrivateCluster {
        dir: data_dir.to_path_buf(),
        reason,
    };
    let bin = server_binaries().ok_or(DatabaseError::NotFound)?;
    std::fs::create_dir_all(data_dir).map_err(|error| fail(format!("cannot create the data folder: {error}")))?;
    let cluster = cluster_dir(data_dir);
    // One starter at a time, across processes (tests start in parallel).
    let lock_path = data_dir.join("cluster.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|error| fail(format!("cannot create {}: {error}", lock_path.display())))?;
    lock.lock()
        .map_err(|error| fail(format!("cannot lock {}: {error}", lock_path.display())))?;

    let as_root = running_as_root();
    let run = |program: &Path, args: &[&str]| -> Result<(), DatabaseError> {
        let mut command = if as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        let output = command
            .args(args)
            .output()
            .map_err(|error| fail(format!("cannot run {}: {error}", program.display())))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(fail(format!(
                "{} {} failed: {}{}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    };
    let cluster_text = cluster.to_str().ok_or_else(|| fail("the data folder's path is not UTF-8".into()))?;
    if !cluster.join("PG_VERSION").exists() {
        std::fs::create_dir_all(&cluster).map_err(|error| fail(format!("cannot create {cluster_text}: {error}")))?;
        if as_root {
            let status = Command::new("chown").args(["-R", "postgres:postgres", cluster_text]).status();
            if !status.map(|status| status.success()).unwrap_or(false) {
                return Err(fail("cannot give the cluster folder to the postgres user".into()));
            }
        }
        run(
            &bin.join("initdb"),
            &[
                "-D",
                cluster_text,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        )?;
    }
    let status = if as_root {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args(["-D", cluster_text, "status"])
            .output()
    } else {
        Command::new(bin.join("pg_ctl")).args(["-D", cluster_text, "status"]).output()
    };
    let running = status.map(|output| output.status.success()).unwrap_or(false);
    if !running {
        let log = format!("{cluster_text}/server.log");
        let server_options = format!("-c listen_addresses='' -k {cluster_text} -p {PRIVATE_PORT}");
        run(
            &bin.join("pg_ctl"),
            &["-D", cluster_text, "-l", &log, "-w", "-t", "60", "-o", &server_options, "start"],
        )?;
    }
    drop(lock);
    Ok(cluster)
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`, newest version first.
fn server_binaries() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        if output.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                entry
                    .file_name()
                    .to_str()?
                    .parse::<u32>()
                    .ok()
                    .map(|version| (version, entry.path().join("bin")))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        candidates.extend(versions.into_iter().map(|(_, path)| path));
    }
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|dir| ["initdb", "pg_ctl", "postgres"].iter().all(|program| dir.join(program).exists()))
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|index| index + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(index) => &base[..authority_start + index],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_database_on_the_same_server() {
        assert_eq!(
            replace_database("postgres://u:p@h:5/app?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://u@h", "t1"), "postgres://u@h/t1");
        assert_eq!(
            replace_database("postgresql:///app?host=/run/pg", "t1"),
            "postgresql:///t1?host=/run/pg"
        );
    }
}

/// Whether an error means the database cannot be reached or is not serving now (so trying again
/// shortly may pass), rather than that a statement is wrong: the network, the pool, a server
/// shutting down or restarting (SQLSTATE classes 08 and 57P, 53 for exhausted resources), or a
/// database closed to connections.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || (code == "55000" && database.message().contains("not currently accepting connections"))
        }
        _ => false,
    }
}
