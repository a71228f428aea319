//! The read models over realistic history: snapshots, the books, time travel, verify, rebuild.

use std::sync::Arc;

use app::flows::Flows;
use app::handler::CommandHandler;
use chrono::{DateTime, Utc};
use domain::catalog::Fixtures;
use domain::{AccountId, ManualClock};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use projections::queries::{balance_as_of, table_digest, trial_balance};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::Value;

const HISTORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/histories/march-2026.jsonl");

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn fixtures() -> Fixtures {
    Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap()
}

fn account(name: &str) -> AccountId {
    AccountId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()))
}

/// Makes the March history through the command path and writes it to the fixture file.
/// Run with `cargo nextest run -p app --run-ignored only regenerate` after changing the domain.
#[tokio::test]
#[ignore = "regenerates fixtures/histories/march-2026.jsonl"]
async fn regenerate_march_history() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-02-01T00:00:00Z")));
    let flows = Flows::new(CommandHandler::new(log, clock.clone()));
    app::history::march_2026(&flows, &clock, fixtures()).await.unwrap();
    let file = std::fs::File::create(HISTORY).unwrap();
    let written = app::audit::export(&db.pool, None, None, app::audit::Format::Jsonl, file)
        .await
        .unwrap();
    assert!(written > 1_000, "a month of history, got {written} events");
}

async fn load_history() -> TestDatabase {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let file = std::io::BufReader::new(std::fs::File::open(HISTORY).expect("the history fixture"));
    app::audit::import(&log, file).await.unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    db
}

/// A table's rows as JSON, amounts as strings so their scale shows.
async fn rows(db: &TestDatabase, table: &str, order: &str, columns: &str) -> Value {
    let sql = format!(
        "SELECT COALESCE(jsonb_agg(r ORDER BY {order}), '[]'::jsonb)::text FROM ( \
           SELECT (SELECT jsonb_object_agg(key, CASE WHEN jsonb_typeof(value) = 'number' THEN to_jsonb(value::text) ELSE value END) \
                   FROM jsonb_each(to_jsonb(t))) AS r, {order} FROM (SELECT {columns} FROM {table}) t) s"
    );
    let text: String = sqlx::query_scalar(&sql).fetch_one(&db.pool).await.unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn read_models_of_the_march_history() {
    let db = load_history().await;
    insta::assert_json_snapshot!("balances", rows(&db, "rm.balances", "account_id", "*").await);
    insta::assert_json_snapshot!("servers", rows(&db, "rm.servers", "server_id", "server_id, account_id, plan_id, location, status, hostname, os_image, cancellation_mode, cancellation_effective_at, month, month_to_date_net, last_charged_slot, next_charge_at, created_at").await);
    insta::assert_json_snapshot!(
        "invoices",
        rows(
            &db,
            "rm.invoices",
            "number",
            "number, account_id, period_start, period_end, currency, lines, taxes, net, tax, total, display"
        )
        .await
    );
    insta::assert_json_snapshot!(
        "credit_notes",
        rows(
            &db,
            "rm.credit_notes",
            "number",
            "number, account_id, reason, net, tax, total, display, issued_at"
        )
        .await
    );
    insta::assert_json_snapshot!("metrics_revenue", rows(&db, "rm.metrics_revenue", "day, currency", "*").await);
    insta::assert_json_snapshot!(
        "statement_movements",
        rows(
            &db,
            "rm.statement",
            "position",
            "position, account_id, kind, amount, balance_after, occurred_at, reference"
        )
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["kind"] != "charge")
        .cloned()
        .collect::<Vec<_>>()
    );
    insta::assert_json_snapshot!(
        "statement_charges",
        rows(
            &db,
            "(SELECT account_id, count(*) AS charges, sum(amount) AS total FROM rm.statement WHERE kind = 'charge' GROUP BY account_id) c",
            "account_id",
            "*"
        )
        .await
    );
    insta::assert_json_snapshot!("trial_balance", trial_balance(&db.pool, None).await.unwrap());
    insta::assert_json_snapshot!(
        "orders",
        rows(
            &db,
            "rm.orders",
            "placed_at, order_id",
            "order_id, account_id, server_id, plan_id, location, status, placed_at, ended_at"
        )
        .await
    );
}

#[tokio::test]
async fn the_books_balance_and_wallets_equal_balances() {
    let db = load_history().await;
    for as_of in [
        None,
        Some(at("2026-03-02T12:30:00Z")),
        Some(at("2026-03-15T08:31:00Z")),
        Some(at("2026-03-31T23:59:59Z")),
    ] {
        let books = trial_balance(&db.pool, as_of).await.unwrap();
        assert!(!books.currencies.is_empty());
        for currency in &books.currencies {
            assert_eq!(
                currency.total_debit, currency.total_credit,
                "{} trial balance as of {as_of:?}",
                currency.currency
            );
        }
    }
    // The history has accounts in three currencies, each with its own books.
    let books = trial_balance(&db.pool, None).await.unwrap();
    let codes: Vec<&str> = books.currencies.iter().map(|books| books.currency.as_str()).collect();
    assert_eq!(codes, ["AUD", "EUR", "USD"]);
    let balances: Vec<(uuid::Uuid, String, Decimal)> =
        sqlx::query_as("SELECT account_id, currency, balance FROM rm.balances ORDER BY account_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for currency in &books.currencies {
        let mut wallets_total = Decimal::ZERO;
        for (account_id, _, balance) in balances.iter().filter(|(_, code, _)| *code == currency.currency) {
            let wallet = currency
                .accounts
                .iter()
                .find(|line| line.account == format!("liabilities:wallets:{account_id}"))
                .expect("a wallet account");
            assert_eq!(wallet.credit - wallet.debit, *balance, "wallet of {account_id}");
            wallets_total += wallet.credit - wallet.debit;
        }
        // Only this currency's wallets are in its books, and they add up to its balances.
        let wallets_in_books: Decimal = currency
            .accounts
            .iter()
            .filter(|line| line.account.starts_with("liabilities:wallets:"))
            .map(|line| line.credit - line.debit)
            .sum();
        assert_eq!(wallets_in_books, wallets_total, "{}", currency.currency);
        let in_balances: Decimal = balances
            .iter()
            .filter(|(_, code, _)| *code == currency.currency)
            .map(|(_, _, balance)| *balance)
            .sum();
        assert_eq!(wallets_total, in_balances, "{}", currency.currency);
    }
}

#[tokio::test]
async fn balances_as_of_past_instants_match_the_hand_computed_figures() {
    let db = load_history().await;
    let bob = account("bob");
    // vps-4g in USD is 20.00 a month: 20.00 / 730 = 0.027397 an hour, no US tax.
    let cases = [
        ("2026-03-01T00:00:00Z", None),
        ("2026-03-02T12:04:00Z", Some(dec!(5.00))),
        ("2026-03-02T12:30:00Z", Some(dec!(5.00) - dec!(0.027397))),
        ("2026-03-02T15:00:00Z", Some(dec!(5.00) - dec!(4) * dec!(0.027397))),
    ];
    for (instant, expected) in cases {
        let figures = balance_as_of(&db.pool, bob, at(instant)).await.unwrap();
        assert_eq!(figures.map(|f| f.balance), expected, "as of {instant}");
    }
    // While the first hour was held, before provisioning captured it.
    let held = balance_as_of(&db.pool, bob, at("2026-03-02T12:05:00Z")).await.unwrap().unwrap();
    assert_eq!(
        (held.balance, held.reserved, held.available),
        (dec!(5.00), dec!(0.027397), dec!(4.972603))
    );
}

#[tokio::test]
async fn verify_passes_then_names_a_row_changed_behind_its_back() {
    let db = load_history().await;
    for projection in projections::projection::all() {
        let check = projections::verify::verify(&db.pool, projection.as_ref()).await.unwrap();
        assert!(check.differences.is_empty(), "{}: {:?}", check.name, check.differences);
    }
    let acme = account("acme");
    sqlx::query("UPDATE rm.balances SET balance = balance + 1 WHERE account_id = $1")
        .bind(acme.0)
        .execute(&db.pool)
        .await
        .unwrap();
    let check = projections::verify::verify(&db.pool, projections::projection::by_name("balances").unwrap().as_ref())
        .await
        .unwrap();
    assert_eq!(check.differences.len(), 1, "{:?}", check.differences);
    let difference = &check.differences[0];
    assert_eq!((difference.table.as_str(), difference.key.clone()), ("balances", acme.to_string()));
    assert!(
        difference.live.as_deref().unwrap().contains("79.733037") && difference.replayed.as_deref().unwrap().contains("78.733037"),
        "{difference:?}"
    );
}

#[tokio::test]
async fn two_verifications_at_once_each_finish_and_hold_no_writer_up() {
    let db = load_history().await;
    let statement = projections::projection::by_name("statement").unwrap();
    let journal = projections::projection::by_name("journal").unwrap();
    // Each run replays into scratch tables of its own: neither drops the other's.
    let (a, b, c) = tokio::join!(
        projections::verify::verify(&db.pool, statement.as_ref()),
        projections::verify::verify(&db.pool, statement.as_ref()),
        projections::verify::verify(&db.pool, journal.as_ref()),
    );
    for check in [a.unwrap(), b.unwrap(), c.unwrap()] {
        assert!(check.differences.is_empty(), "{}: {:?}", check.name, check.differences);
    }
    // No scratch schema is left behind.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rm_verify%'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // While a verification compares, the live projector's checkpoint is not locked: a writer
    // that takes it (as the projector does) does not wait.
    let pool = db.pool.clone();
    let verifying = tokio::spawn(async move {
        let journal = projections::projection::by_name("journal").unwrap();
        projections::verify::verify(&pool, journal.as_ref()).await.unwrap()
    });
    let mut waited_longest = std::time::Duration::ZERO;
    while !verifying.is_finished() {
        let started = std::time::Instant::now();
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '2s'").execute(&mut *tx).await.unwrap();
        ledger::checkpoint::lock(&mut tx, "journal")
            .await
            .expect("the checkpoint lock is free");
        tx.rollback().await.unwrap();
        waited_longest = waited_longest.max(started.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(verifying.await.unwrap().differences.is_empty());
    assert!(
        waited_longest < std::time::Duration::from_millis(500),
        "a writer waited {waited_longest:?}"
    );
}

async fn digests(db: &TestDatabase) -> Vec<(String, String)> {
    let mut digests = Vec::new();
    for projection in projections::projection::all() {
        for table in projection.tables() {
            digests.push((table.to_string(), table_digest(&db.pool, "rm", table).await.unwrap()));
        }
    }
    digests
}

/// Every read model table's keys and indexes (their definitions, whatever their names).
async fn index_shapes(db: &TestDatabase) -> Vec<(String, Vec<String>)> {
    let mut shapes = Vec::new();
    for projection in projections::projection::all() {
        for table in projection.tables() {
            let definitions: Vec<(String,)> = sqlx::query_as(
                "SELECT regexp_replace(pg_get_indexdef(i.indexrelid), '^CREATE (UNIQUE )?INDEX \\S+ ', 'CREATE \\1INDEX ') \
                        || coalesce(' ' || c.contype::text || ' ' || pg_get_constraintdef(c.oid), '') \
                 FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid \
                 WHERE i.indrelid = ('rm.' || $1)::regclass ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            shapes.push((table.to_string(), definitions.into_iter().map(|(definition,)| definition).collect()));
        }
    }
    shapes
}

#[tokio::test]
async fn a_rebuild_from_position_zero_is_byte_identical() {
    let db = load_history().await;
    let before = digests(&db).await;
    let indexes = index_shapes(&db).await;
    assert!(
        indexes.iter().any(|(table, shape)| table == "statement" && shape.len() == 2),
        "{indexes:?}"
    );
    for projection in projections::projection::all() {
        let report = projections::rebuild::rebuild(&db.pool, projection.clone(), |_, _| {})
            .await
            .unwrap();
        assert_eq!(report.events, 2123);
    }
    assert_eq!(digests(&db).await, before);
    let status = projections::queries::status(&db.pool).await.unwrap();
    assert!(
        status.iter().all(|s| s.generation == 2 && !s.rebuilding && s.lag == 0),
        "{status:?}"
    );
    // All of them at once, fed by one pass over the log: the same tables again.
    let reports = projections::rebuild::rebuild_all(&db.pool, &projections::projection::all(), |_, _| {})
        .await
        .unwrap();
    assert!(reports.iter().all(|report| report.events == 2123), "{reports:?}");
    assert_eq!(digests(&db).await, before);
    // The tables bulk-loaded without indexes got every key and index back.
    assert_eq!(index_shapes(&db).await, indexes);
    let status = projections::queries::status(&db.pool).await.unwrap();
    assert!(
        status.iter().all(|s| s.generation == 3 && !s.rebuilding && s.lag == 0),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_rebuild_keeps_the_scale_of_a_zero_balance() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let flows = Flows::new(CommandHandler::new(log, Arc::new(app::handler::SystemClock)));
    let admin = || app::handler::Metadata::actor("admin", "projections-test");
    let account_id = AccountId::new();
    flows
        .open_account(
            account_id,
            "Ada",
            "ada@example.com",
            domain::Currency::EUR,
            domain::Country::parse("DE").unwrap(),
            &admin(),
        )
        .await
        .unwrap();
    flows.adjust(account_id, dec!(25.00), "credit", &admin()).await.unwrap();
    flows.adjust(account_id, dec!(-25.00), "debit", &admin()).await.unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let balances_after = || async {
        sqlx::query_scalar::<_, String>("SELECT balance_after::text FROM rm.statement ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(balances_after().await, ["25.00", "0.00"]);
    let before = digests(&db).await;
    projections::rebuild::rebuild_all(&db.pool, &projections::projection::all(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        balances_after().await,
        ["25.00", "0.00"],
        "the rebuild's COPY wrote the zero as it was"
    );
    assert_eq!(digests(&db).await, before);
}

/// Applies a batch and then fails, as a projector killed after writing its rows but before
/// committing would.
struct FailsAfterWriting {
    inner: Arc<dyn projections::Projection>,
    failures_left: std::sync::atomic::AtomicU32,
}

impl projections::Projection for FailsAfterWriting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn tables(&self) -> &'static [&'static str] {
        self.inner.tables()
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        records: &'a [projections::decode::Record],
    ) -> futures::future::BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            self.inner.apply(tx, records).await?;
            if self
                .failures_left
                .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
            {
                return Err(sqlx::Error::Protocol("injected failure after writing the batch".into()));
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_rebuild_whose_read_model_fails_ends_with_that_error_and_leaves_the_live_tables_serving() {
    let db = load_history().await;
    let before = digests(&db).await;
    let projections: Vec<Arc<dyn projections::Projection>> = projections::projection::all()
        .into_iter()
        .map(|projection| -> Arc<dyn projections::Projection> {
            if projection.name() == "journal" {
                Arc::new(FailsAfterWriting {
                    inner: projection,
                    failures_left: std::sync::atomic::AtomicU32::new(1),
                })
            } else {
                projection
            }
        })
        .collect();
    // The other read models' tasks are fed and finish; none waits on the failed one for ever.
    let failed = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        projections::rebuild::rebuild_all(&db.pool, &projections, |_, _| {}),
    )
    .await
    .expect("the rebuild ends")
    .expect_err("the journal's failure fails the rebuild");
    assert!(failed.to_string().contains("injected failure"), "{failed}");
    assert_eq!(digests(&db).await, before, "nothing was swapped in");
    let status = projections::queries::status(&db.pool).await.unwrap();
    assert!(
        status.iter().all(|s| !s.rebuilding && s.generation == 1),
        "a failed rebuild is not shown as going on: {status:?}"
    );
    let reports = projections::rebuild::rebuild_all(&db.pool, &projections::projection::all(), |_, _| {})
        .await
        .unwrap();
    assert!(reports.iter().all(|report| report.events == 2123), "{reports:?}");
    assert_eq!(digests(&db).await, before);
}

#[tokio::test]
async fn a_projector_that_dies_mid_batch_resumes_without_loss_or_duplication() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    app::audit::import(&log, std::io::BufReader::new(std::fs::File::open(HISTORY).unwrap()))
        .await
        .unwrap();
    for projection in projections::projection::all() {
        let failing = FailsAfterWriting {
            inner: projection.clone(),
            failures_left: std::sync::atomic::AtomicU32::new(3),
        };
        let mut failures = 0;
        loop {
            match projections::runner::run_batch(&db.pool, &failing, "rm", projection.name(), 700, None).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    assert!(error.to_string().contains("injected failure"), "{error}");
                    failures += 1;
                }
            }
        }
        assert_eq!(failures, 3, "{}", projection.name());
        assert_eq!(ledger::checkpoint::load(&db.pool, projection.name()).await.unwrap(), 2123);
        let check = projections::verify::verify(&db.pool, projection.as_ref()).await.unwrap();
        assert!(check.differences.is_empty(), "{}: {:?}", check.name, check.differences);
    }
    let statement_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.statement")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let money_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type IN ('TopUpSettled','HoldCaptured','HourCharged','CancellationRefunded','ServiceCredited','CardRefundRequested','Adjusted','DisputeOpened','DisputeClosed')").fetch_one(&db.pool).await.unwrap();
    assert_eq!(statement_rows, money_events, "one statement line per money event, none twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_load_keeps_serving_and_misses_nothing() {
    let db = load_history().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-04-03T00:00:00Z")));
    let flows = Flows::new(CommandHandler::new(log, clock));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Writers: new accounts and top-ups on them, concurrently with the rebuild.
    let mut writers = Vec::new();
    for writer in 0..6 {
        let flows = flows.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let metadata = app::handler::Metadata::actor("system", "load");
            let mut opened = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && opened < 60 {
                let account_id = AccountId::new();
                flows
                    .open_account(
                        account_id,
                        &format!("Load {writer}-{opened}"),
                        "load@example.com",
                        domain::Currency::USD,
                        domain::Country::parse("US").unwrap(),
                        &metadata,
                    )
                    .await
                    .unwrap();
                for payment in 0..3 {
                    flows
                        .settle_topup(
                            account_id,
                            domain::TopUpId::new(),
                            &format!("pi_{account_id}_{payment}"),
                            dec!(1.25),
                            &metadata,
                        )
                        .await
                        .unwrap();
                }
                opened += 1;
            }
            opened
        }));
    }
    // The live projector keeps following, as `billing serve` would.
    let live = {
        let pool = db.pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let balances = projections::projection::by_name("balances").unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                projections::runner::run_batch(&pool, balances.as_ref(), "rm", "balances", 500, None)
                    .await
                    .unwrap();
            }
        })
    };
    // A reader: the model never shrinks and never shows a half-built table.
    let reader = {
        let pool = db.pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last = 0i64;
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (count, acme): (i64, Option<Decimal>) =
                    sqlx::query_as("SELECT count(*), max(balance) FILTER (WHERE name LIKE 'Acme%') FROM rm.balances")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                assert!(
                    count >= last && count >= 3,
                    "the balances read model went from {last} rows to {count}"
                );
                assert_eq!(acme, Some(dec!(78.733037)), "the history's account is always there, whole");
                last = count;
                reads += 1;
            }
            reads
        })
    };

    let balances = projections::projection::by_name("balances").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let report = projections::rebuild::rebuild(&db.pool, balances.clone(), |_, _| {}).await.unwrap();
    assert!(report.events >= 2123);
    let mut opened = 0;
    for writer in writers {
        opened += writer.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    live.await.unwrap();
    let reads = reader.await.unwrap();
    assert!(reads > 10, "the reader kept reading during the rebuild ({reads} reads)");

    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.balances")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 3 + opened, "every account opened during the rebuild is there");
    let wrong: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.balances WHERE name LIKE 'Load %' AND balance <> 3.75")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(wrong, 0, "no top-up lost or counted twice");
    // And a full rebuild after this concurrent workload is byte-identical to what the live
    // projectors built.
    let before = digests(&db).await;
    for projection in projections::projection::all() {
        projections::rebuild::rebuild(&db.pool, projection.clone(), |_, _| {})
            .await
            .unwrap();
    }
    assert_eq!(digests(&db).await, before);
}
