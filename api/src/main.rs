//! The `billing` binary: thin over the crates; it parses arguments, finds the database and reports.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use api::cli;

#[derive(Parser)]
#[command(
    name = "billing",
    version,
    about = "The billing ledger: an event-sourced ledger for VPS hosting"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the database schema (finds or starts PostgreSQL when DATABASE_URL is unset).
    Migrate,
    /// Recompute the hash chain over the whole log; exit 1 naming the first bad position.
    Verify {
        /// Also check that the event at POSITION has HASH (a head recorded outside the database).
        #[arg(long, value_name = "POSITION:HASH")]
        anchor: Option<ledger::verify::Anchor>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        match args.command {
            Command::Migrate => cli::migrate().await,
            Command::Verify { anchor, json } => cli::verify(anchor, json).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
