//! The `billing` binary: thin over the crates; it parses arguments, finds the database and reports.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use api::cli;

#[derive(Parser)]
#[command(name = "billing", version, about = "The billing ledger: an event-sourced ledger for VPS hosting")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the database schema (finds or starts PostgreSQL when DATABASE_URL is unset).
    Migrate,
    /// Recompute the hash chain over the whole log, then replay it through the projections and
    /// compare every read model row by row; exit 1 naming the first bad position or differing rows.
    Verify {
        /// Also check that the event at POSITION has HASH (a head recorded outside the database).
        #[arg(long, value_name = "POSITION:HASH")]
        anchor: Option<ledger::verify::Anchor>,
        /// Check the chain only, not the read models.
        #[arg(long)]
        chain_only: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from position 0 beside the live ones and swap them in when caught up.
    Rebuild {
        /// The read model: balances, statement, servers, invoices, journal, metrics.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every read model.
        #[arg(long)]
        all: bool,
    },
    /// Write the events with positions and hashes, for auditors.
    Export {
        /// First position, or first instant of recording (RFC 3339), included.
        #[arg(long)]
        from: Option<app::audit::Bound>,
        /// Last position, or last instant of recording (RFC 3339), included.
        #[arg(long)]
        to: Option<app::audit::Bound>,
        #[arg(long, default_value = "jsonl")]
        format: app::audit::Format,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Serve the HTTP API (and keep the read models following the log).
    Serve {
        /// Dev mode: a controllable clock at /v1/dev/clock.
        #[arg(long)]
        dev: bool,
        /// Address to listen on.
        #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
        bind: String,
    },
    /// Charge every due (server, hour) up to the hour containing INSTANT (default: now), exactly
    /// once whatever else is billing, then print what was charged and declined.
    Bill {
        /// An RFC 3339 instant, not in the future.
        #[arg(long, value_name = "INSTANT")]
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Load a month of demo history, make a key of each role, and serve in dev mode.
    Demo {
        #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
        bind: String,
    },
    /// People who sign in to the portal and the console.
    People {
        #[command(subcommand)]
        command: PeopleCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Append the events of a JSONL export (such as fixtures/histories/march-2026.jsonl), keeping
    /// their ids and domain times, then bring the read models up to date.
    Import { file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum PeopleCommand {
    /// Invite a person: prints the one-time link (valid 7 days) that sets their password.
    Invite {
        #[arg(long)]
        email: String,
        /// customer, finance or admin.
        #[arg(long)]
        role: String,
        /// The account of a customer.
        #[arg(long)]
        account: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its token (shown once).
    Create {
        #[arg(long)]
        role: String,
        /// The account of a customer key.
        #[arg(long)]
        account: Option<String>,
    },
}

/// mimalloc: under the system allocator, a profile of the billing run benchmark spent about a
/// quarter of its samples in malloc and free (JSON payloads and event envelopes, across threads).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            Command::Verify { anchor, chain_only, json } => cli::verify(anchor, chain_only, json).await,
            Command::Rebuild { name, all: _ } => cli::rebuild(name).await,
            Command::Export { from, to, format, output } => cli::export(from, to, format, output).await,
            Command::Import { file } => cli::import(file).await,
            Command::Serve { dev, bind } => cli::serve(dev, bind).await,
            Command::Demo { bind } => cli::demo(bind).await,
            Command::Bill { until } => cli::bill(until).await,
            Command::People {
                command: PeopleCommand::Invite { email, role, account },
            } => cli::invite_person(&email, &role, account).await,
            Command::Keys {
                command: KeysCommand::Create { role, account },
            } => cli::create_key(&role, account).await,
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
