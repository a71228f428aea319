//! The commands of the `billing` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ledger::verify::{verify_chain, Anchor};
use sqlx::PgPool;

/// The product's database on a located server (DATABASE_URL names its own).
const DATABASE_NAME: &str = "billing";

/// Logs to standard error, as text or, with `LOG_FORMAT=json`, as JSON lines (set up before any
/// command reads its configuration).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn connect() -> anyhow::Result<PgPool> {
    // `billing serve` holds two for good (the log's and the read cache's listeners).
    let (pool, server) = ledger::database::connect(DATABASE_NAME, 10).await?;
    tracing::info!(server = %server.description, "connected to PostgreSQL");
    Ok(pool)
}

pub async fn migrate() -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    let applied = ledger::MIGRATOR.iter().count();
    println!("database is up to date ({applied} migrations)");
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(anchor: Option<Anchor>, chain_only: bool, json: bool) -> anyhow::Result<ExitCode> {
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
    let mut checks = Vec::new();
    if report.ok && !chain_only {
        for projection in projections::projection::all() {
            checks.push(
                projections::verify::verify(&pool, projection.as_ref())
                    .await
                    .with_context(|| format!("replaying {}", projection.name()))?,
            );
        }
    }
    let read_models_ok = checks.iter().all(|check| check.differences.is_empty());
    let ok = report.ok && read_models_ok;
    if json {
        let mut value = serde_json::to_value(&report).expect("a report serialises");
        value["ok"] = serde_json::Value::Bool(ok);
        if !chain_only {
            value["read_models"] = serde_json::to_value(&checks).expect("checks serialise");
        }
        println!("{value}");
    } else {
        if report.ok {
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
        for check in &checks {
            if check.differences.is_empty() {
                println!("ok: read model {} matches a replay up to position {}", check.name, check.position);
            } else {
                println!(
                    "FAILED: read model {} differs from a replay up to position {}:",
                    check.name, check.position
                );
                for difference in &check.differences {
                    println!(
                        "  {} row {}: stored {} / replayed {}",
                        difference.table,
                        difference.key,
                        difference.live.as_deref().unwrap_or("(missing)"),
                        difference.replayed.as_deref().unwrap_or("(missing)")
                    );
                }
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub async fn rebuild(name: Option<String>) -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    let selected = match name {
        Some(name) => vec![projections::projection::by_name(&name).ok_or_else(|| {
            let known: Vec<&str> = projections::projection::all().iter().map(|p| p.name()).collect();
            anyhow::anyhow!("no read model named {name:?}; known: {}", known.join(", "))
        })?],
        None => projections::projection::all(),
    };
    // Every read model selected is fed by one pass over the log, then each is swapped in.
    let bar = progress_bar("rebuilding");
    let names: Vec<&str> = selected.iter().map(|projection| projection.name()).collect();
    bar.set_message(format!("rebuilding {}", names.join(", ")));
    let reports = projections::rebuild::rebuild_all(&pool, &selected, |done, head| {
        bar.set_length(head.max(0) as u64);
        bar.set_position(done.max(0) as u64);
    })
    .await?;
    bar.finish_and_clear();
    for report in reports {
        println!(
            "rebuilt {}: {} events to position {} in {} ms",
            report.name, report.events, report.position, report.elapsed_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn export(
    from: Option<app::audit::Bound>,
    to: Option<app::audit::Bound>,
    format: app::audit::Format,
    output: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    let written = match output {
        Some(path) => {
            let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            app::audit::export(&pool, from, to, format, file).await?
        }
        None => app::audit::export(&pool, from, to, format, std::io::stdout().lock()).await?,
    };
    eprintln!("exported {written} events");
    Ok(ExitCode::SUCCESS)
}

pub async fn import(file: std::path::PathBuf) -> anyhow::Result<ExitCode> {
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    let log = ledger::EventLog::open(pool.clone(), ledger::LogConfig::default()).await?;
    let input = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let imported = app::audit::import(&log, std::io::BufReader::new(input)).await?;
    // Imported history was acted on when it happened: the provider is not told again.
    app::outbox::skip_to_head(&pool).await?;
    projections::runner::catch_up_all(&pool).await?;
    println!("imported {imported} events from {}; read models are up to date", file.display());
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal; hidden when stderr is not one.
pub fn progress_bar(message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} events, {per_sec}, eta {eta}").expect("a valid template"));
    bar.set_message(message);
    bar
}

/// The catalogue shipped with the binary, loaded into the `catalog` stream at start.
pub fn embedded_catalog() -> domain::catalog::Fixtures {
    domain::catalog::Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml"))
        .expect("the embedded fixtures parse")
}

pub async fn serve(dev: bool, bind: String) -> anyhow::Result<ExitCode> {
    let config = app::config::Config::from_env(dev, bind)?;
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    run_server(pool, config, chrono::Utc::now(), None).await
}

pub async fn bill(until: Option<chrono::DateTime<chrono::Utc>>) -> anyhow::Result<ExitCode> {
    let now = chrono::Utc::now();
    let until = until.unwrap_or(now);
    if until > now {
        eprintln!("error: --until {until} is in the future; hours are billed once they have begun");
        return Ok(ExitCode::from(2));
    }
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    let log = ledger::EventLog::open(pool.clone(), ledger::LogConfig::default()).await?;
    let flows = app::flows::Flows::new(app::handler::CommandHandler::new(
        log,
        std::sync::Arc::new(app::handler::SystemClock),
    ));
    let spinner = progress_bar("billing");
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let started = std::time::Instant::now();
    let report = app::workers::bill_due(&flows, domain::HourSlot::containing(until)).await?;
    spinner.finish_and_clear();
    println!(
        "billed up to the hour starting {}: {} slots charged, {} declined (servers suspended), {} skipped, in {:.2} s",
        domain::HourSlot::containing(until).start(),
        report.charged,
        report.declined,
        report.skipped,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Loads the demo history, makes a key of each role, and serves in dev mode with the clock where
/// the history ends.
pub async fn demo(bind: String) -> anyhow::Result<ExitCode> {
    use app::keys::create;
    use app::people::Role;
    let config = app::config::Config::from_env(true, bind)?;
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    let log = ledger::EventLog::open(pool.clone(), ledger::LogConfig::default()).await?;
    let app::history::Demo {
        imported,
        history_end,
        accounts,
        servers,
        events,
        customer_account,
    } = app::history::demo(&log, config.demo_accounts, |progress| eprintln!("demo: {progress}")).await?;
    let admin = match &config.bootstrap_admin_token {
        Some(token) => token.clone(),
        None => create(&pool, Role::Admin, None, "demo").await?.1,
    };
    let finance = create(&pool, Role::Finance, None, "demo").await?.1;
    let customer = create(&pool, Role::Customer, Some(customer_account), "demo").await?.1;
    // A login of each role for the portal and the console, with a fresh password each run.
    let mut logins = String::new();
    for (email, role, account) in [
        ("admin@demo.billing.test", app::people::Role::Admin, None),
        ("finance@demo.billing.test", app::people::Role::Finance, None),
        ("customer@demo.billing.test", app::people::Role::Customer, Some(customer_account)),
    ] {
        let now = chrono::Utc::now();
        // A fresh password each run: a first one through an invitation, later ones through a reset.
        let link = match app::people::invite(&pool, email, role, account, now).await {
            Err(app::people::PeopleError::AlreadyActive(_)) => app::people::request_reset(&pool, email, now)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{email} is known and yet has no reset link"))?,
            other => other?,
        };
        let password = app::people::random_token()[..20].to_string();
        app::people::set_password(&pool, &link, &password, now).await?;
        logins.push_str(&format!("\n{:<9} login:  {email} / {password}", role.as_str()));
    }
    let clock_start = history_end;
    let banner = format!(
        "demo: {accounts} accounts, {servers} servers, {events} events ({imported} new from the March 2026 history); \
         the dev clock starts at {clock_start}\n\
         admin token:    {admin}\n\
         finance token:  {finance}\n\
         customer token: {customer} (account {customer_account}){logins}\n\
         portal:       URL/ (customers), URL/console (finance, admin)\n\
         try:          curl -H 'Authorization: Bearer {customer}' URL/v1/accounts/{customer_account}\n\
         advance time: curl -X POST -H 'content-type: application/json' -d '{{\"advance_seconds\": 3600}}' URL/v1/dev/clock"
    );
    run_server(pool, config, clock_start, Some(banner)).await
}

async fn run_server(
    pool: sqlx::PgPool,
    config: app::config::Config,
    clock_start: chrono::DateTime<chrono::Utc>,
    banner: Option<String>,
) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;
    let dev = config.dev;
    let log = ledger::EventLog::open(pool.clone(), ledger::LogConfig::default()).await?;
    let dev_clock = dev.then(|| Arc::new(domain::ManualClock::new(clock_start)));
    let clock: Arc<dyn domain::Clock> = match &dev_clock {
        Some(clock) => clock.clone(),
        None => Arc::new(app::handler::SystemClock),
    };
    let mut flows = app::flows::Flows::new(
        app::handler::CommandHandler::new(log.clone(), clock.clone()).with_state_cache_bytes(config.state_cache_bytes),
    );
    flows.settings = config.rules;
    flows
        .sync_catalog(embedded_catalog(), &app::handler::Metadata::actor("system", "startup"))
        .await?;
    if let Some(token) = &config.bootstrap_admin_token {
        app::keys::store(&pool, token, app::people::Role::Admin, None, "bootstrap").await?;
        if app::keys::grant(&pool, token).await?.is_none() {
            tracing::warn!("BILLING_BOOTSTRAP_ADMIN_TOKEN names a revoked key: it stays revoked; set another token");
        }
    }
    projections::runner::catch_up_all(&pool).await?;
    // The projectors follow the log for as long as the server runs: woken by appends (this
    // process's or, through NOTIFY, another's), polling twice a second besides.
    let projector_pool = pool.clone();
    let mut head = log.head_watch();
    tokio::spawn(async move {
        loop {
            if let Err(error) = projections::runner::catch_up_all(&projector_pool).await {
                tracing::error!(%error, "projector failed; retrying");
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), head.changed()).await;
        }
    });
    // Due work (hourly slots, deletions) every 30 s; in dev mode it also runs when the clock moves.
    let provider = config.provider();
    let provider_retry = config.retry;
    let worker_flows = flows.clone();
    let worker_clock = clock.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tick.tick().await;
            let (flows, now) = (worker_flows.clone(), worker_clock.now());
            app::workers::guarded("due work", async move { app::workers::run_due(&flows, now).await }).await;
        }
    });
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    let address = listener.local_addr()?;
    let public_url = format!("http://{address}");
    let payments = config.payments(&public_url)?;
    // The outbox: server changes reach the provider, and card refunds Stripe, within about a second.
    let outbox_flows = flows.clone();
    let outbox_provider = provider.clone();
    let outbox_payments = payments.clone();
    let mut outbox_head = log.head_watch();
    let scan_every = config.orphan_scan;
    tokio::spawn(async move {
        // Orphans (servers the provider holds that the log says should not exist) are looked for
        // at start and then every `BILLING_ORPHAN_SCAN_SECONDS` (default 600).
        let mut last_scan: Option<std::time::Instant> = None;
        loop {
            let parties = app::outbox::Parties {
                provider: outbox_provider.as_ref(),
                payments: outbox_payments.as_deref(),
            };
            if let Err(error) = app::outbox::dispatch(&outbox_flows, parties, provider_retry).await {
                tracing::error!(%error, "the outbox failed; retrying");
            }
            if last_scan.is_none_or(|at| at.elapsed() >= scan_every) {
                last_scan = Some(std::time::Instant::now());
                if let Err(error) = app::outbox::reconcile_orphans(&outbox_flows, outbox_provider.as_ref()).await {
                    tracing::error!(%error, "looking for orphaned servers failed; trying again later");
                }
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), outbox_head.changed()).await;
        }
    });
    let state = crate::http::AppState::new(crate::http::Shared {
        cache: app::cache::ReadCache::start(&pool),
        pool,
        flows,
        clock,
        dev_clock,
        webhook_secret: config.webhook_secret.clone(),
        public_url,
        payments,
        rate_limiter: std::sync::Arc::new(crate::http::operations::RateLimiter::of(&config)),
        sessions: config.sessions,
        signin_limiter: std::sync::Arc::new(crate::http::operations::RateLimiter::new(10, 0.2)),
        signin_limiter_all: std::sync::Arc::new(crate::http::operations::RateLimiter::new(60, 5.0)),
    });
    println!(
        "listening on http://{address}{}",
        if dev { " (dev mode: simulated clock at /v1/dev/clock)" } else { "" }
    );
    if let Some(banner) = banner {
        println!("{}", banner.replace("URL", &format!("http://{address}")));
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    axum::serve(listener, crate::http::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn create_key(role: &str, account: Option<String>) -> anyhow::Result<ExitCode> {
    use crate::http::auth::Role;
    let role = Role::parse(role).ok_or_else(|| anyhow::anyhow!("--role is one of customer, finance, admin"))?;
    let account_id = match (role, account) {
        (Role::Customer, Some(text)) => {
            Some(domain::AccountId::parse(&text).map_err(|_| anyhow::anyhow!("--account {text:?} is not an account id"))?)
        }
        (Role::Customer, None) => anyhow::bail!("a customer key needs --account ID"),
        (_, Some(_)) => anyhow::bail!("only customer keys belong to an account"),
        (_, None) => None,
    };
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    if let Some(account_id) = account_id {
        projections::runner::catch_up_all(&pool).await?;
        anyhow::ensure!(app::reads::account(&pool, account_id).await?.is_some(), "no account {account_id}");
    }
    let (_, token) = app::keys::create(&pool, role, account_id, "created with billing keys create").await?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// Invites a person to the portal or the console: prints the one-time link that sets their
/// password (valid 7 days; open it at the server's address).
pub async fn invite_person(email: &str, role: &str, account: Option<String>) -> anyhow::Result<ExitCode> {
    let role = app::people::Role::parse(role).ok_or_else(|| anyhow::anyhow!("--role is one of customer, finance, admin"))?;
    let account_id = match account {
        Some(text) => Some(domain::AccountId::parse(&text).map_err(|_| anyhow::anyhow!("--account {text:?} is not an account id"))?),
        None => None,
    };
    let pool = connect().await?;
    ledger::MIGRATOR.run(&pool).await.context("running the migrations")?;
    if let Some(account_id) = account_id {
        projections::runner::catch_up_all(&pool).await?;
        anyhow::ensure!(app::reads::account(&pool, account_id).await?.is_some(), "no account {account_id}");
    }
    let link = app::people::invite(&pool, email, role, account_id, chrono::Utc::now()).await?;
    println!("/link/{link}");
    Ok(ExitCode::SUCCESS)
}
