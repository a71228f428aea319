//! Benchmarks against a local PostgreSQL (found like the product finds it), in a database of their
//! own that is dropped and recreated per scenario. Prints a table for people, or with `--json` one
//! JSON object per scenario: `{scenario, value, unit, baseline, baseline_value, ratio}`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ledger::database::{locate, quote_identifier, Server};
use ledger::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent, StreamAppend};
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The same allocator as the `billing` binary, so the figures are the product's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCENARIOS: &[&str] = &[
    "append",
    "append_concurrent",
    "billing_run",
    "catch_up",
    "commands",
    "http_balance",
    "memory",
    "pages",
    "rebuild",
];

#[derive(Parser)]
#[command(about = "Benchmarks of the billing ledger")]
struct Args {
    /// A scenario name (append, append_concurrent, billing_run, catch_up, commands, http_balance,
    /// memory, pages, rebuild) or `all`.
    scenario: String,
    /// Small sizes, to keep the benchmarks compiling and correct in CI.
    #[arg(long)]
    quick: bool,
    /// One JSON object per scenario on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Repetitions per scenario, each on a fresh database; medians are reported (default 3, 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
}

#[derive(Serialize)]
struct Measurement {
    scenario: &'static str,
    value: f64,
    unit: &'static str,
    baseline: Option<&'static str>,
    baseline_value: Option<f64>,
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
    events: usize,
    repetitions: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median of each figure over the repetitions; the ratio is of the two medians.
fn summarise(runs: Vec<Measurement>) -> Measurement {
    let optional_median = |pick: fn(&Measurement) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(pick).collect();
        (!values.is_empty()).then(|| median(values))
    };
    let value = median(runs.iter().map(|m| m.value).collect());
    let baseline_value = optional_median(|m| m.baseline_value);
    let p50_ms = optional_median(|m| m.p50_ms);
    let p99_ms = optional_median(|m| m.p99_ms);
    let first = &runs[0];
    Measurement {
        scenario: first.scenario,
        value,
        unit: first.unit,
        baseline: first.baseline,
        baseline_value,
        ratio: baseline_value.map(|baseline| value / baseline),
        p50_ms,
        p99_ms,
        events: first.events,
        repetitions: runs.len(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Stage timings (RUST_LOG=projections=debug, for example) go to stderr; errors only by default.
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => tracing_subscriber::EnvFilter::new(directives),
        _ => tracing_subscriber::EnvFilter::new("error"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let selected: Vec<&str> = match args.scenario.as_str() {
        "all" => SCENARIOS.to_vec(),
        name if SCENARIOS.contains(&name) => {
            vec![SCENARIOS[SCENARIOS.iter().position(|s| *s == name).unwrap()]]
        }
        other => anyhow::bail!("unknown scenario {other:?}; known: {} or all", SCENARIOS.join(", ")),
    };
    let server = locate().await?;
    let mut results = Vec::new();
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    for scenario in selected {
        let mut runs = Vec::new();
        for _ in 0..repeat {
            let pool = fresh_database(&server).await?;
            runs.push(match scenario {
                "append" => append(&pool, args.quick).await?,
                "append_concurrent" => append_concurrent(&pool, args.quick).await?,
                "rebuild" => rebuild(&pool, args.quick).await?,
                "billing_run" => billing_run(&pool, args.quick).await?,
                "catch_up" => catch_up(&pool, args.quick).await?,
                "commands" => commands(&pool, args.quick).await?,
                "http_balance" => http_balance(&pool, args.quick).await?,
                "pages" => pages(&pool, args.quick).await?,
                "memory" => memory(&pool, &server, args.quick).await?,
                _ => unreachable!("checked above"),
            });
            pool.close().await;
        }
        let measurement = summarise(runs);
        if args.json {
            println!("{}", serde_json::to_string(&measurement)?);
        }
        results.push(measurement);
    }
    if !args.json {
        print_table(&results);
    }
    Ok(())
}

async fn fresh_database(server: &Server) -> anyhow::Result<PgPool> {
    const NAME: &str = "billing_bench";
    let mut admin = PgConnection::connect_with(&server.options("postgres")).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(NAME)))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {}", quote_identifier(NAME)))
        .execute(&mut admin)
        .await?;
    let pool = PgPoolOptions::new().max_connections(70).connect_with(server.options(NAME)).await?;
    ledger::MIGRATOR.run(&pool).await.context("migrating the bench database")?;
    Ok(pool)
}

fn event(index: usize) -> NewEvent {
    NewEvent::new(
        "HourCharged",
        json!({"server_id": format!("server-{index}"), "net": "0.006849", "tax": "0.000685", "slot": "2026-11-01T10:00:00Z"}),
    )
}

/// Batched appends: requests of 1,000 streams with one event each and a `NoStream` check.
async fn append(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    let events_total = if quick { 4_000 } else { 200_000 };
    let per_request = 1_000;
    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    // Several requests in flight, so the writer can group them.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for request_index in 0..events_total / per_request {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let streams = (0..per_request)
                .map(|n| {
                    let index = request_index * per_request + n;
                    StreamAppend::new(format!("server-{index}"), ExpectedVersion::NoStream, vec![event(index)])
                })
                .collect();
            log.append(AppendRequest { streams }).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM events").fetch_one(pool).await?;
    anyhow::ensure!(count as usize == events_total, "stored {count} of {events_total} events");

    // Baseline: the same events appended one per transaction, one after another.
    let baseline_events = if quick { 200 } else { 5_000 };
    let started_baseline = Instant::now();
    for index in 0..baseline_events {
        log.append(AppendRequest::single(
            format!("baseline-{index}"),
            ExpectedVersion::NoStream,
            vec![event(index)],
        ))
        .await?;
    }
    let baseline_rate = baseline_events as f64 / started_baseline.elapsed().as_secs_f64();
    let rate = events_total as f64 / elapsed.as_secs_f64();
    let report = ledger::verify::verify_chain(pool, None, |_, _| {}).await?;
    anyhow::ensure!(report.ok, "the chain does not verify after the benchmark: {report:?}");
    Ok(Measurement {
        scenario: "append",
        value: rate,
        unit: "events/s",
        baseline: Some("one event per append, sequential"),
        baseline_value: Some(baseline_rate),
        ratio: Some(rate / baseline_rate),
        p50_ms: None,
        p99_ms: None,
        events: events_total,
        repetitions: 1,
    })
}

/// 64 concurrent clients, each appending single events to its own stream with exact versions.
async fn append_concurrent(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    const CLIENTS: usize = 64;
    let per_client = if quick { 30 } else { 1_500 };
    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for version in 0..per_client {
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version as i64)
                };
                let sent = Instant::now();
                log.append(AppendRequest::single(format!("account-{client}"), expected, vec![event(version)]))
                    .await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let latencies = sorted_latencies(tasks).await?;
    let elapsed = started.elapsed();
    let events_total = CLIENTS * per_client;
    let percentile = |p: f64| percentile_ms(&latencies, p);
    Ok(Measurement {
        scenario: "append_concurrent",
        value: events_total as f64 / elapsed.as_secs_f64(),
        unit: "events/s",
        baseline: None,
        baseline_value: None,
        ratio: None,
        p50_ms: Some(percentile(0.50)),
        p99_ms: Some(percentile(0.99)),
        events: events_total,
        repetitions: 1,
    })
}

/// A synthetic history shaped like production: accounts with a top-up and servers ordered and
/// provisioned, then every server charged hour after hour. Events are the domain's own types.
async fn synthetic_history(pool: &PgPool, events_target: usize) -> anyhow::Result<usize> {
    use domain::account::{AccountEvent, Figures};
    use domain::server::ServerEvent;
    use domain::{AccountId, ChargeId, Country, Currency, HourSlot, Location, OrderId, PlanId, ServerId, TaxRate, TopUpId};
    use rust_decimal::Decimal;

    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    let accounts = (events_target / 1_000).clamp(10, 2_000);
    let servers_per_account = 2;
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.to_utc();
    let tax_rate = TaxRate::new(Decimal::new(1, 1))?;
    let plan = PlanId::parse("vps-1g")?;
    let rate = domain::billing::rate_per_hour(Decimal::new(800, 2));
    let tax = domain::billing::tax_on(rate, tax_rate);
    let top_up = Decimal::new(1_000_000, 0);
    let account_ids: Vec<AccountId> = (0..accounts).map(|_| AccountId::new()).collect();
    let server_ids: Vec<Vec<ServerId>> = (0..accounts)
        .map(|_| (0..servers_per_account).map(|_| ServerId::new()).collect())
        .collect();
    let mut balances: Vec<Decimal> = vec![top_up; accounts];
    let to_event = |event_type: String, payload: serde_json::Value, at: chrono::DateTime<chrono::Utc>| {
        NewEvent::new(event_type, payload).occurred_at(at)
    };
    let mut batch: Vec<StreamAppend> = Vec::new();
    let mut written = 0usize;
    async fn flush(log: &EventLog, batch: &mut Vec<StreamAppend>) -> anyhow::Result<()> {
        if !batch.is_empty() {
            log.append(AppendRequest {
                streams: std::mem::take(batch),
            })
            .await?;
        }
        Ok(())
    }
    for (index, account_id) in account_ids.iter().enumerate() {
        let opened = AccountEvent::AccountOpened {
            account_id: *account_id,
            name: format!("Bench {index}"),
            email: "bench@example.com".into(),
            currency: Currency::AUD,
            country: Country::parse("AU")?,
            opened_at: start,
        };
        let settled = AccountEvent::TopUpSettled {
            topup_id: TopUpId::new(),
            payment_id: format!("pi_{index}"),
            amount: top_up,
            figures: Figures {
                balance: top_up,
                reserved: Decimal::ZERO,
                available: top_up,
            },
        };
        let events = [opened, settled]
            .into_iter()
            .map(|event| {
                to_event(cqrs_es_event_type(&event), serde_json::to_value(&event).unwrap(), start).with_schema_version(
                    if matches!(event, AccountEvent::AccountOpened { .. }) {
                        2
                    } else {
                        1
                    },
                )
            })
            .collect();
        batch.push(StreamAppend::new(account_id.stream_id(), ExpectedVersion::Any, events));
        for server_id in &server_ids[index] {
            let ordered = ServerEvent::ServerOrdered {
                server_id: *server_id,
                account_id: *account_id,
                order_id: OrderId::new(),
                plan_id: plan.clone(),
                location: Location::parse("syd")?,
                at: start,
            };
            let provisioned = ServerEvent::ServerProvisioned {
                provider_server_id: format!("sim-{server_id}"),
                at: start,
            };
            let events = [ordered, provisioned]
                .into_iter()
                .map(|event| to_event(server_event_type(&event), serde_json::to_value(&event).unwrap(), start))
                .collect();
            batch.push(StreamAppend::new(server_id.stream_id(), ExpectedVersion::Any, events));
        }
        written += 2 + 2 * servers_per_account;
        if batch.len() >= 500 {
            flush(&log, &mut batch).await?;
        }
    }
    flush(&log, &mut batch).await?;
    let mut slot = HourSlot::containing(start);
    while written < events_target {
        for (index, account_id) in account_ids.iter().enumerate() {
            let mut events = Vec::new();
            for server_id in &server_ids[index] {
                balances[index] -= rate + tax;
                let charged = AccountEvent::HourCharged {
                    charge_id: ChargeId::new(),
                    server_id: *server_id,
                    plan_id: plan.clone(),
                    slot,
                    rate_per_hour: rate,
                    net: rate,
                    tax,
                    gross: rate + tax,
                    tax_rate,
                    capped: false,
                    figures: Figures {
                        balance: balances[index],
                        reserved: Decimal::ZERO,
                        available: balances[index],
                    },
                };
                events.push(to_event("HourCharged".into(), serde_json::to_value(&charged)?, slot.start()));
            }
            written += events.len();
            batch.push(StreamAppend::new(account_id.stream_id(), ExpectedVersion::Any, events));
        }
        // One append per slot: each account appears once in it.
        flush(&log, &mut batch).await?;
        slot = slot.next();
    }
    flush(&log, &mut batch).await?;
    Ok(written)
}

fn cqrs_es_event_type(event: &domain::account::AccountEvent) -> String {
    use cqrs_es::DomainEvent;
    event.event_type()
}

fn server_event_type(event: &domain::server::ServerEvent) -> String {
    use cqrs_es::DomainEvent;
    event.event_type()
}

/// All read models rebuilt from position 0 over a synthetic history.
async fn rebuild(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    let events_target = if quick { 20_000 } else { 1_000_000 };
    let events = synthetic_history(pool, events_target).await?;
    let started = Instant::now();
    for report in projections::rebuild::rebuild_all(pool, &projections::projection::all(), |_, _| {}).await? {
        anyhow::ensure!(
            report.events as usize == events,
            "{} applied {} of {events} events",
            report.name,
            report.events
        );
        eprintln!("rebuild: {} swapped in after {} ms", report.name, report.elapsed_ms);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "rebuild: all read models from {events} events in one pass: {} ms",
        elapsed.as_millis()
    );
    let books = projections::queries::trial_balance(pool, None).await?;
    anyhow::ensure!(
        books.currencies.iter().all(|books| books.total_debit == books.total_credit),
        "the rebuilt books do not balance"
    );
    Ok(Measurement {
        scenario: "rebuild",
        value: events as f64 / elapsed.as_secs_f64(),
        unit: "events/s",
        baseline: None,
        baseline_value: None,
        ratio: None,
        p50_ms: None,
        p99_ms: None,
        events,
        repetitions: 1,
    })
}

/// A fleet for the billing scenarios: `servers_total` servers, two per account (each account
/// funded with 1,000 AUD), ordered and provisioned at `start`, written as the domain's own events
/// and projected; returns the flows to bill them with and their clock (a day before `start`).
async fn fleet(
    pool: &PgPool,
    servers_total: usize,
    start: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<(app::flows::Flows, std::sync::Arc<domain::ManualClock>)> {
    use domain::account::{AccountEvent, Figures};
    use domain::server::ServerEvent;
    use domain::{AccountId, Country, Currency, Location, OrderId, PlanId, ServerId, TopUpId};
    use rust_decimal::Decimal;

    let servers_per_account = 2;
    let accounts = servers_total / servers_per_account;
    let clock = std::sync::Arc::new(domain::ManualClock::new(start - chrono::Duration::days(1)));
    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    let flows = app::flows::Flows::new(app::handler::CommandHandler::new(log.clone(), clock.clone()));
    let catalog = domain::catalog::Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml"))?;
    flows
        .sync_catalog(catalog, &app::handler::Metadata::actor("system", "bench"))
        .await?;

    let plan = PlanId::parse("vps-1g")?;
    let top_up = Decimal::new(1_000, 0);
    let mut batch: Vec<StreamAppend> = Vec::new();
    let mut appends = Vec::new();
    for index in 0..accounts {
        let account_id = AccountId::new();
        let opened = AccountEvent::AccountOpened {
            account_id,
            name: format!("Bench {index}"),
            email: "bench@example.com".into(),
            currency: Currency::AUD,
            country: Country::parse("AU")?,
            opened_at: start,
        };
        let settled = AccountEvent::TopUpSettled {
            topup_id: TopUpId::new(),
            payment_id: format!("pi_{index}"),
            amount: top_up,
            figures: Figures {
                balance: top_up,
                reserved: Decimal::ZERO,
                available: top_up,
            },
        };
        let events = vec![
            NewEvent::new(cqrs_es_event_type(&opened), serde_json::to_value(&opened)?)
                .with_schema_version(2)
                .occurred_at(start),
            NewEvent::new(cqrs_es_event_type(&settled), serde_json::to_value(&settled)?).occurred_at(start),
        ];
        batch.push(StreamAppend::new(account_id.stream_id(), ExpectedVersion::NoStream, events));
        for _ in 0..servers_per_account {
            let server_id = ServerId::new();
            let ordered = ServerEvent::ServerOrdered {
                server_id,
                account_id,
                order_id: OrderId::new(),
                plan_id: plan.clone(),
                location: Location::parse("syd")?,
                at: start,
            };
            let provisioned = ServerEvent::ServerProvisioned {
                provider_server_id: format!("sim-{server_id}"),
                at: start,
            };
            let events = [ordered, provisioned]
                .into_iter()
                .map(|event| NewEvent::new(server_event_type(&event), serde_json::to_value(&event).unwrap()).occurred_at(start))
                .collect();
            batch.push(StreamAppend::new(server_id.stream_id(), ExpectedVersion::NoStream, events));
        }
        if batch.len() >= 1_500 {
            let log = log.clone();
            let streams = std::mem::take(&mut batch);
            appends.push(tokio::spawn(async move { log.append(AppendRequest { streams }).await }));
        }
    }
    if !batch.is_empty() {
        log.append(AppendRequest { streams: batch }).await?;
    }
    for append in appends {
        append.await??;
    }
    projections::runner::catch_up_all(pool).await?;
    // A fleet billed hour after hour has statistics by then (autovacuum analyses a table within
    // a minute of this many inserts); one made a moment ago has none, and without them PostgreSQL
    // plans each stream of a batch's load as a bitmap scan and a sort, not one index scan.
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok((flows, clock))
}

/// 64 concurrent clients, each on an account of its own: the account opened, then adjusted again
/// and again, every command through cqrs-es's `CqrsFramework` on the same `Account` aggregate: over
/// this project's log (`ledger::cqrs::LedgerEventRepository`: hash chain, version checks) and, as
/// the peer, over postgres-es's `PostgresEventRepository` (its own tables in the same database).
/// The peer runs as `PersistedEventStore::new_event_store` sets it up, without snapshots: each of
/// its commands loads the account's stream whole, so its rate falls as the accounts' histories
/// grow, and the ratio grows with the number of commands per client. 500 per client keeps this
/// log's run over a second long (at 100 it lasted a third of a second, and its rate varied by a
/// sixth between runs).
async fn commands(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    use cqrs_es::persist::PersistedEventStore;
    use cqrs_es::CqrsFramework;
    use std::sync::Arc;
    const CLIENTS: usize = 64;
    let per_client = if quick { 5 } else { 500 };

    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    // This log's store keeps the instances it has committed, so a command reads nothing before
    // it is decided; postgres-es's loads every event of the instance for every command.
    let ours = Arc::new(CqrsFramework::new(
        ledger::cqrs::LedgerEventStore::new(ledger::cqrs::LedgerEventRepository::new(log), 100_000),
        vec![],
        (),
    ));
    let (ours_rate, ours_latencies) = drive_commands(ours, CLIENTS, per_client).await?;

    for statement in [
        "CREATE TABLE es_events (aggregate_type text NOT NULL, aggregate_id text NOT NULL, sequence bigint CHECK (sequence >= 0) NOT NULL, \
         event_type text NOT NULL, event_version text NOT NULL, payload json NOT NULL, metadata json NOT NULL, \
         PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
        "CREATE TABLE es_snapshots (aggregate_type text NOT NULL, aggregate_id text NOT NULL, last_sequence bigint CHECK (last_sequence >= 0) NOT NULL, \
         current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL, payload json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    let repository = postgres_es::PostgresEventRepository::new(pool.clone()).with_tables("es_events", "es_snapshots");
    let theirs = Arc::new(CqrsFramework::new(PersistedEventStore::new_event_store(repository), vec![], ()));
    let (their_rate, _) = drive_commands(theirs, CLIENTS, per_client).await?;

    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM es_events").fetch_one(pool).await?;
    anyhow::ensure!(stored as usize == CLIENTS * (per_client + 1), "postgres-es stored {stored} events");
    let (ours_stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE stream_id LIKE 'account-%'")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        ours_stored as usize == CLIENTS * (per_client + 1),
        "the log stored {ours_stored} events"
    );
    let report = ledger::verify::verify_chain(pool, None, |_, _| {}).await?;
    anyhow::ensure!(report.ok, "the chain does not verify: {report:?}");
    Ok(Measurement {
        scenario: "commands",
        value: ours_rate,
        unit: "commands/s",
        baseline: Some("the same commands through CqrsFramework on postgres-es's PostgresEventRepository"),
        baseline_value: Some(their_rate),
        ratio: Some(ours_rate / their_rate),
        p50_ms: Some(percentile_ms(&ours_latencies, 0.50)),
        p99_ms: Some(percentile_ms(&ours_latencies, 0.99)),
        events: CLIENTS * (per_client + 1),
        repetitions: 1,
    })
}

/// `clients` tasks at once, each opening an account and adjusting it `per_client` times through
/// `cqrs`; the rate of commands and every command's latency, sorted.
async fn drive_commands<ES>(
    cqrs: std::sync::Arc<cqrs_es::CqrsFramework<domain::Account, ES>>,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<(f64, Vec<Duration>)>
where
    ES: cqrs_es::EventStore<domain::Account> + Send + Sync + 'static,
    ES::AC: Send,
{
    use domain::account::AccountCommand;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..clients {
        let cqrs = cqrs.clone();
        tasks.push(tokio::spawn(async move {
            let account_id = domain::AccountId::new();
            let id = account_id.to_string();
            let mut latencies = Vec::with_capacity(per_client + 1);
            let open = AccountCommand::Open {
                account_id,
                name: format!("Client {index}"),
                email: "client@example.com".into(),
                currency: domain::Currency::USD,
                country: domain::Country::parse("US")?,
                at: chrono::Utc::now(),
            };
            let sent = Instant::now();
            cqrs.execute(&id, open).await.map_err(|error| anyhow::anyhow!("open: {error}"))?;
            latencies.push(sent.elapsed());
            for _ in 0..per_client {
                let adjust = AccountCommand::Adjust {
                    adjustment_id: domain::AdjustmentId::new(),
                    amount: rust_decimal::Decimal::new(100, 2),
                    reason: "bench".into(),
                };
                let sent = Instant::now();
                cqrs.execute(&id, adjust)
                    .await
                    .map_err(|error| anyhow::anyhow!("adjust: {error}"))?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let latencies = sorted_latencies(tasks).await?;
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, latencies))
}

/// Ten days without a billing run: `app::workers::bill_due` (as `billing bill` runs it) catches up
/// 10,000 servers by 240 slots each (2,400,000 charges), each slot once.
async fn catch_up(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    use domain::HourSlot;
    let (servers_total, days) = if quick { (200, 2) } else { (10_000, 10) };
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.to_utc();
    let (flows, clock) = fleet(pool, servers_total, start).await?;
    let first = HourSlot::containing(start).next();
    let slots = 24 * days;
    let last = HourSlot::containing(first.start() + chrono::Duration::hours(slots as i64 - 1));
    clock.set(last.start() + chrono::Duration::minutes(5))?;
    let started = Instant::now();
    let report = app::workers::bill_due(&flows, last).await?;
    let elapsed = started.elapsed();
    let expected = servers_total * slots;
    let (charged, twice): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) - count(DISTINCT (payload->>'server_id', payload->>'slot')) FROM events WHERE event_type = 'HourCharged'",
    )
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        charged as usize == expected && twice == 0 && report.declined == 0,
        "caught up {charged} of {expected} slots ({twice} twice, {} declined)",
        report.declined
    );
    let again = app::workers::bill_due(&flows, last).await?;
    anyhow::ensure!(again.charged == 0, "a second run charged {} slots", again.charged);
    eprintln!(
        "catch_up: {servers_total} servers x {slots} slots = {expected} charges in {:.2} s",
        elapsed.as_secs_f64()
    );
    Ok(Measurement {
        scenario: "catch_up",
        value: expected as f64 / elapsed.as_secs_f64(),
        unit: "charges/s",
        baseline: None,
        baseline_value: None,
        ratio: None,
        p50_ms: None,
        p99_ms: None,
        events: expected,
        repetitions: 1,
    })
}

/// One hourly billing run (`app::workers::bill_due`, as `billing serve` and `billing bill` run
/// it) over servers that each owe exactly one slot, against a per-server loop doing the least a
/// wallet charge can do in SQL (read the wallet, insert the charge, update the wallet, one
/// transaction per server) on the same database.
async fn billing_run(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    use domain::HourSlot;
    use rust_decimal::Decimal;

    let servers_total = if quick { 2_000 } else { 100_000 };
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.to_utc();
    let (flows, clock) = fleet(pool, servers_total, start).await?;
    projections::runner::catch_up_all(pool).await?;
    let due_slot = HourSlot::containing(start).next();
    clock.set(due_slot.start() + chrono::Duration::minutes(5))?;

    // The run, from a process that has not seen these streams (nothing cached).
    let started = Instant::now();
    let report = app::workers::bill_due(&flows, due_slot).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        report.charged as usize == servers_total && report.declined == 0,
        "the run charged {} of {servers_total} servers ({} declined)",
        report.charged,
        report.declined
    );
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HourCharged'")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        charged as usize == servers_total,
        "{charged} charges stored for {servers_total} servers"
    );
    let again = app::workers::bill_due(&flows, due_slot).await?;
    anyhow::ensure!(again.charged == 0, "a second run of the same hour charged {} slots", again.charged);

    // The next hour, from the same process (wallets and servers cached, as in `billing serve`).
    let next_slot = due_slot.next();
    clock.set(next_slot.start() + chrono::Duration::minutes(5))?;
    projections::runner::catch_up_all(pool).await?;
    let started_warm = Instant::now();
    let warm = app::workers::bill_due(&flows, next_slot).await?;
    let elapsed_warm = started_warm.elapsed();
    anyhow::ensure!(
        warm.charged as usize == servers_total,
        "the second hour charged {} of {servers_total}",
        warm.charged
    );
    eprintln!(
        "billing_run: {servers_total} servers, first run (nothing cached) {:.3} s, next hour (cached) {:.3} s",
        elapsed.as_secs_f64(),
        elapsed_warm.as_secs_f64()
    );

    // Baseline: the per-server loop, on a sample of the same servers' wallets.
    let baseline_servers = if quick { 500 } else { 10_000 };
    sqlx::query("CREATE TABLE bench_wallets (account_id uuid PRIMARY KEY, balance numeric NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_charges (server_id uuid NOT NULL, slot timestamptz NOT NULL, account_id uuid NOT NULL, amount numeric NOT NULL, PRIMARY KEY (server_id, slot))")
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO bench_wallets SELECT account_id, available FROM rm.balances")
        .execute(pool)
        .await?;
    let sample: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as("SELECT server_id, account_id FROM rm.servers ORDER BY server_id LIMIT $1")
        .bind(baseline_servers as i64)
        .fetch_all(pool)
        .await?;
    let rate = domain::billing::rate_per_hour(Decimal::new(800, 2));
    let started_baseline = Instant::now();
    for (server_id, account_id) in &sample {
        let mut tx = pool.begin().await?;
        let balance: Decimal = sqlx::query_scalar("SELECT balance FROM bench_wallets WHERE account_id = $1 FOR UPDATE")
            .bind(account_id)
            .fetch_one(&mut *tx)
            .await?;
        anyhow::ensure!(balance >= rate, "the sample wallet cannot pay");
        sqlx::query("INSERT INTO bench_charges VALUES ($1, $2, $3, $4)")
            .bind(server_id)
            .bind(due_slot.start())
            .bind(account_id)
            .bind(rate)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE bench_wallets SET balance = balance - $2 WHERE account_id = $1")
            .bind(account_id)
            .bind(rate)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let baseline_rate = sample.len() as f64 / started_baseline.elapsed().as_secs_f64();
    let value = servers_total as f64 / elapsed.as_secs_f64();
    Ok(Measurement {
        scenario: "billing_run",
        value,
        unit: "servers/s",
        baseline: Some("per-server loop: read wallet, insert charge, update wallet, a transaction each"),
        baseline_value: Some(baseline_rate),
        ratio: Some(value / baseline_rate),
        p50_ms: None,
        p99_ms: None,
        events: servers_total,
        repetitions: 1,
    })
}

/// `GET /v1/accounts/{id}` over HTTP from 64 keep-alive connections, each its own customer with
/// its own token, for a fixed time, against the real router (`api::http::router`) on a local port.
async fn http_balance(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    use std::sync::Arc;
    const CONNECTIONS: usize = 64;
    let duration = Duration::from_secs(if quick { 2 } else { 20 });
    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    let clock: Arc<dyn domain::Clock> = Arc::new(app::handler::SystemClock);
    let flows = app::flows::Flows::new(app::handler::CommandHandler::new(log, clock.clone()));
    let admin = app::handler::Metadata::actor("admin", "bench");
    let mut customers = Vec::new();
    for index in 0..CONNECTIONS {
        let account_id = domain::AccountId::new();
        flows
            .open_account(
                account_id,
                &format!("Reader {index}"),
                "reader@example.com",
                domain::Currency::USD,
                domain::Country::parse("US")?,
                &admin,
            )
            .await?;
        flows
            .adjust(account_id, rust_decimal::Decimal::new(2_500, 2), "credit", &admin)
            .await?;
        let (_, token) = app::keys::create(pool, app::people::Role::Customer, Some(account_id), "bench").await?;
        customers.push((account_id, token));
    }
    projections::runner::catch_up_all(pool).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let listener_address = listener.local_addr()?;
    let base = format!("http://{listener_address}");
    let state = serving_state(pool, flows, clock, None, &base);
    let server = tokio::spawn(async move { axum::serve(listener, api::http::router(state)).await });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (account_id, token) in customers {
        tasks.push(tokio::spawn(async move {
            // A bare HTTP/1.1 connection (hyper's own client): the load generator's work shares the
            // two cores with the server's, so it is kept to the least.
            use http_body_util::BodyExt;
            let stream = tokio::net::TcpStream::connect(listener_address).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let path = format!("/v1/accounts/{account_id}");
            let authorization = format!("Bearer {token}");
            let host = listener_address.to_string();
            #[derive(serde::Deserialize)]
            struct Answer<'a> {
                balance: &'a str,
            }
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let sent = Instant::now();
                let request = axum::http::Request::get(&path)
                    .header(axum::http::header::HOST, &host)
                    .header(axum::http::header::AUTHORIZATION, &authorization)
                    .body(http_body_util::Empty::<axum::body::Bytes>::new())?;
                let response = sender.send_request(request).await?;
                anyhow::ensure!(response.status().is_success(), "GET balance answered {}", response.status());
                let body = response.into_body().collect().await?.to_bytes();
                let answer: Answer = serde_json::from_slice(&body)?;
                anyhow::ensure!(answer.balance == "25.00", "unexpected balance {}", answer.balance);
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let latencies = sorted_latencies(tasks).await?;
    let elapsed = started.elapsed();
    server.abort();
    let percentile = |p: f64| percentile_ms(&latencies, p);
    Ok(Measurement {
        scenario: "http_balance",
        value: latencies.len() as f64 / elapsed.as_secs_f64(),
        unit: "requests/s",
        baseline: None,
        baseline_value: None,
        ratio: None,
        p50_ms: Some(percentile(0.50)),
        p99_ms: Some(percentile(0.99)),
        events: latencies.len(),
        repetitions: 1,
    })
}

/// Every main page of the portal and the console, rendered by the real router over HTTP for a
/// signed-in customer (the demo's first account), finance and admin, on the demo dataset
/// (`app::history::demo` with `billing demo`'s default size): each page requested one after
/// another from one connection, after warming up; the time is until the whole page has arrived.
async fn pages(pool: &PgPool, quick: bool) -> anyhow::Result<Measurement> {
    use std::sync::Arc;
    let requests = if quick { 3 } else { 50 };
    let log = EventLog::open(pool.clone(), LogConfig::default()).await?;
    // `--quick` (CI) makes a small fleet: it checks the pages, not their speed.
    let size = if quick {
        12
    } else {
        app::config::Config::from_env(true, "127.0.0.1:0".into())?.demo_accounts
    };
    let demo = app::history::demo(&log, size, |_| {}).await?;
    projections::runner::catch_up_all(pool).await?;
    let clock = Arc::new(domain::ManualClock::new(demo.history_end));
    let flows = app::flows::Flows::new(app::handler::CommandHandler::new(log, clock.clone()));
    let now = chrono::Utc::now();
    let mut cookies = std::collections::HashMap::new();
    for (email, role, account) in [
        ("customer@bench.test", app::people::Role::Customer, Some(demo.customer_account)),
        ("finance@bench.test", app::people::Role::Finance, None),
        ("admin@bench.test", app::people::Role::Admin, None),
    ] {
        let link = app::people::invite(pool, email, role, account, now).await?;
        app::people::set_password(pool, &link, "a bench password", now).await?;
        let signed_in = app::people::sign_in(pool, email, "a bench password", now).await?;
        cookies.insert(role.as_str(), format!("{}={}", api::web::SESSION_COOKIE, signed_in.cookie));
    }
    let account = demo.customer_account;
    let server = app::reads::servers_of_account(pool, account, None, 1)
        .await?
        .and_then(|page| page.items.into_iter().next())
        .ok_or_else(|| anyhow::anyhow!("the demo's customer has no server"))?;
    let invoice = app::reads::invoices_of_account(pool, account, None, 1)
        .await?
        .and_then(|page| page.items.into_iter().next())
        .ok_or_else(|| anyhow::anyhow!("the demo's customer has no invoice"))?;
    let (_, _, events) = app::reads::counts(pool).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = serving_state(pool, flows, clock.clone(), Some(clock), &base);
    let served = tokio::spawn(async move { axum::serve(listener, api::http::router(state)).await });
    let pages: Vec<(&str, String)> = vec![
        ("customer", "/".into()),
        ("customer", format!("/servers/{}", server.server_id)),
        ("customer", "/orders/new".into()),
        ("customer", "/topup".into()),
        ("customer", "/transactions".into()),
        ("customer", "/invoices".into()),
        ("customer", format!("/invoices/{}", invoice.invoice_id)),
        ("finance", "/console?query=a".into()),
        ("finance", format!("/console/accounts/{account}")),
        ("finance", format!("/console/invoices/{}", invoice.invoice_id)),
        ("finance", format!("/console/events/{}", events / 2)),
        ("finance", "/console/trial-balance".into()),
        ("finance", "/console/audit".into()),
        ("admin", "/console/keys".into()),
        ("admin", "/console/people".into()),
        ("admin", "/console/projections".into()),
    ];
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let mut medians = Vec::new();
    let mut all = Vec::new();
    eprintln!("{:<10} {:<52} {:>9} {:>9}", "who", "page", "p50 ms", "p99 ms");
    for (who, path) in &pages {
        let mut latencies = Vec::new();
        for round in 0..requests + 3 {
            let sent = Instant::now();
            let response = client.get(format!("{base}{path}")).header("cookie", &cookies[who]).send().await?;
            let status = response.status();
            let body = response.text().await?;
            anyhow::ensure!(status.is_success(), "{path} answered {status}: {body}");
            if round >= 3 {
                latencies.push(sent.elapsed());
            }
        }
        latencies.sort();
        let (p50, p99) = (percentile_ms(&latencies, 0.50), percentile_ms(&latencies, 0.99));
        eprintln!("{who:<10} {path:<52} {p50:>9.2} {p99:>9.2}");
        medians.push(p50);
        all.extend(latencies);
    }
    served.abort();
    all.sort();
    Ok(Measurement {
        scenario: "pages",
        value: medians.iter().copied().fold(0.0, f64::max),
        unit: "ms, slowest page's median",
        baseline: None,
        baseline_value: None,
        ratio: None,
        p50_ms: Some(percentile_ms(&all, 0.50)),
        p99_ms: Some(percentile_ms(&all, 0.99)),
        events: events as usize,
        repetitions: 1,
    })
}

/// What the router serves with in a benchmark: no card processor, rate limits out of the way.
fn serving_state(
    pool: &PgPool,
    flows: app::flows::Flows,
    clock: std::sync::Arc<dyn domain::Clock>,
    dev_clock: Option<std::sync::Arc<domain::ManualClock>>,
    base: &str,
) -> api::http::AppState {
    use std::sync::Arc;
    api::http::AppState::new(api::http::Shared {
        cache: app::cache::ReadCache::start(pool),
        pool: pool.clone(),
        flows,
        clock,
        dev_clock,
        webhook_secret: None,
        public_url: base.to_string(),
        payments: None,
        rate_limiter: Arc::new(api::http::operations::RateLimiter::new(1_000_000, 1_000_000.0)),
        sessions: app::people::SessionLimits::default(),
        signin_limiter: Arc::new(api::http::operations::RateLimiter::new(10, 0.2)),
        signin_limiter_all: Arc::new(api::http::operations::RateLimiter::new(60, 5.0)),
    })
}

/// The resident memory of the real `billing serve` (the binary built beside this one) on a
/// database of accounts with two servers each and some hours of history: it catches up, runs the
/// hourly billing of every server, and answers a balance read of every account; its peak resident
/// set (`VmHWM` in `/proc`) is the figure. Measured twice, on histories of two lengths (fresh
/// databases), to show whether it grows with the history.
async fn memory(pool: &PgPool, server: &Server, quick: bool) -> anyhow::Result<Measurement> {
    let (accounts, hours) = if quick { (200, [6, 60]) } else { (100_000, [3, 12]) };
    let mut peaks = Vec::new();
    for (round, history_hours) in hours.into_iter().enumerate() {
        let pool = if round == 0 { pool.clone() } else { fresh_database(server).await? };
        let peak = memory_of_serve(&pool, server, accounts, history_hours).await?;
        eprintln!(
            "memory: {accounts} accounts, {} servers, {history_hours} h of history: peak resident {:.1} MiB",
            2 * accounts,
            peak as f64 / (1024.0 * 1024.0)
        );
        peaks.push((history_hours, peak));
    }
    let (short, long) = (peaks[0], peaks[1]);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(Measurement {
        scenario: "memory",
        value: mib(long.1),
        unit: "MiB peak resident",
        baseline: Some("the same on a history a quarter as long (or a tenth, with --quick)"),
        baseline_value: Some(mib(short.1)),
        ratio: Some(mib(long.1) / mib(short.1)),
        p50_ms: None,
        p99_ms: None,
        events: 0,
        repetitions: 1,
    })
}

/// One round of `memory`: the fleet, `history_hours` of charges before the hour in progress, the
/// read models caught up; then `billing serve` started on it, until it has charged the hour in
/// progress for every server and answered a balance read of every account. Returns its peak
/// resident set in bytes.
async fn memory_of_serve(pool: &PgPool, server: &Server, accounts: usize, history_hours: i64) -> anyhow::Result<u64> {
    use domain::HourSlot;
    let now = chrono::Utc::now();
    let current = HourSlot::containing(now);
    // Provisioned so that `history_hours` whole hours have been charged before the current one.
    let start = current.start() - chrono::Duration::hours(history_hours) - chrono::Duration::minutes(30);
    let servers_total = 2 * accounts;
    let (flows, clock) = fleet(pool, servers_total, start).await?;
    clock.set(now)?;
    let previous = HourSlot::containing(current.start() - chrono::Duration::hours(1));
    let history = app::workers::bill_due(&flows, previous).await?;
    anyhow::ensure!(
        history.charged as usize == servers_total * history_hours as usize,
        "the history has {} charges, not {}",
        history.charged,
        servers_total * history_hours as usize
    );
    projections::runner::catch_up_all(pool).await?;
    drop(flows);

    let binary = std::env::current_exe()?.with_file_name("billing");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release -p api)",
        binary.display()
    );
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let token = format!("bench-admin-{}", uuid::Uuid::new_v4().simple());
    let mut child = tokio::process::Command::new(&binary)
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", server.url("billing_bench"))
        .env("BILLING_BOOTSTRAP_ADMIN_TOKEN", &token)
        .env("BILLING_RATE_LIMIT_BURST", "1000000")
        .env("BILLING_RATE_LIMIT_PER_SECOND", "1000000")
        .env("PROVIDER", "simulated")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("the server's pid")?;
    let outcome = async {
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder().pool_max_idle_per_host(16).build()?;
        let ready = Instant::now();
        while client.get(format!("{base}/healthz")).send().await.is_err() {
            anyhow::ensure!(ready.elapsed() < Duration::from_secs(600), "billing serve did not answer");
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("billing serve exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Its due work runs at start: wait until its read model says the hour in progress is
        // charged for every server (a later hour, if the clock turned meanwhile, counts as well).
        loop {
            let (charged,): (i64,) = sqlx::query_as("SELECT count(*) FROM rm.servers WHERE last_charged_slot >= $1")
                .bind(current.start())
                .fetch_one(pool)
                .await?;
            if charged as usize >= servers_total {
                break;
            }
            anyhow::ensure!(
                ready.elapsed() < Duration::from_secs(900),
                "billed {charged} of {servers_total} servers"
            );
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("billing serve exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A balance read of every account, 16 at a time.
        let ids: Vec<String> = sqlx::query_scalar("SELECT account_id::text FROM rm.balances")
            .fetch_all(pool)
            .await?;
        anyhow::ensure!(ids.len() == accounts, "{} balances, not {accounts}", ids.len());
        let chunks: Vec<Vec<String>> = ids.chunks(ids.len().div_ceil(16)).map(<[String]>::to_vec).collect();
        let mut readers = Vec::new();
        for chunk in chunks {
            let (client, base, token) = (client.clone(), base.clone(), token.clone());
            readers.push(tokio::spawn(async move {
                for id in chunk {
                    let response = client.get(format!("{base}/v1/accounts/{id}")).bearer_auth(&token).send().await?;
                    anyhow::ensure!(response.status() == 200, "GET /v1/accounts/{id}: {}", response.status());
                    response.bytes().await?;
                }
                anyhow::Ok(())
            }));
        }
        for reader in readers {
            reader.await??;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc/<pid>/status")?;
        anyhow::Ok(peak_kib * 1024)
    }
    .await;
    child.kill().await.ok();
    outcome
}

/// Every client's latencies, sorted.
async fn sorted_latencies(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    latencies.sort();
    Ok(latencies)
}

/// The `p` quantile of sorted latencies, in milliseconds.
fn percentile_ms(latencies: &[Duration], p: f64) -> f64 {
    latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1_000.0
}

fn print_table(results: &[Measurement]) {
    println!(
        "{:<20} {:>14} {:<10} {:>10} {:>10} {:>14} {:>8}  baseline",
        "scenario", "value", "unit", "p50 ms", "p99 ms", "baseline value", "ratio"
    );
    for m in results {
        let optional = |value: Option<f64>, digits: usize| value.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:>14.0} {:<10} {:>10} {:>10} {:>14} {:>8}  {}",
            m.scenario,
            m.value,
            m.unit,
            optional(m.p50_ms, 2),
            optional(m.p99_ms, 2),
            optional(m.baseline_value, 0),
            optional(m.ratio, 1),
            m.baseline.unwrap_or("-")
        );
    }
}
