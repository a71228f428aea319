//! The commands of the `billing` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ledger::verify::{verify_chain, Anchor};
use sqlx::PgPool;

/// The product's database on a located server (DATABASE_URL names its own).
const DATABASE_NAME: &str = "billing";

pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn connect() -> anyhow::Result<PgPool> {
    let (pool, server) = ledger::database::connect(DATABASE_NAME, 8).await?;
    tracing::info!(server = %server.description, "connected to PostgreSQL");
    Ok(pool)
}

pub async fn migrate() -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    ledger::MIGRATOR
        .run(&pool)
        .await
        .context("running the migrations")?;
    let applied = ledger::MIGRATOR.iter().count();
    println!("database is up to date ({applied} migrations)");
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(anchor: Option<Anchor>, json: bool) -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    let bar = progress_bar("verifying the chain");
    let report = verify_chain(&pool, anchor, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .map_err(|error| match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
            anyhow::anyhow!("the database has no event log yet: run `billing migrate` first")
        }
        _ => anyhow::Error::new(error).context("reading the event log"),
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json_line(&report));
    } else if report.ok {
        println!(
            "ok: {} events checked; head position {} hash {}",
            report.events_checked, report.head_position, report.head_hash
        );
    } else {
        println!(
            "FAILED at position {}: {} ({} events checked before it)",
            report.first_bad_position.unwrap_or_default(),
            report.problem.as_deref().unwrap_or("chain broken"),
            report.events_checked
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn serde_json_line(report: &ledger::verify::VerifyReport) -> String {
    serde_json::to_string(report).expect("a report serialises")
}

/// A progress bar on a terminal; hidden when stderr is not one.
pub fn progress_bar(message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} events, {per_sec}, eta {eta}")
            .expect("a valid template"),
    );
    bar.set_message(message);
    bar
}
