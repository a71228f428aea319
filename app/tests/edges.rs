//! Money at the edges, through the real flows on a real PostgreSQL: cancellations and revocations
//! at the provider and within one hour, resumptions that a crash could split, cancellations
//! racing the billing run, and billing after days of downtime.

use std::sync::{Arc, Mutex};

use app::flows::{Flows, SlotOutcome};
use app::handler::{CommandHandler, Commit, Metadata};
use chrono::{DateTime, Utc};
use domain::account::{AccountCommand, AccountEvent};
use domain::catalog::Fixtures;
use domain::provider::ServerAction;
use domain::server::CancellationMode;
use domain::server::PowerAction;
use domain::{AccountId, Clock, Country, Currency, Hostname, HourSlot, Location, ManualClock, OrderId, PlanId, ServerId};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

struct World {
    db: TestDatabase,
    clock: Arc<ManualClock>,
    flows: Flows,
}

fn admin() -> Metadata {
    Metadata::actor("admin", "test")
}

impl World {
    async fn new(start: &str) -> World {
        let db = TestDatabase::new().await;
        let clock = Arc::new(ManualClock::new(at(start)));
        let flows = Flows::new(CommandHandler::new(
            EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap(),
            clock.clone(),
        ));
        let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
        flows.sync_catalog(fixtures, &admin()).await.unwrap();
        World { db, clock, flows }
    }

    async fn customer(&self, currency: Currency, country: &str, funds: Decimal) -> AccountId {
        let account_id = AccountId::new();
        self.flows
            .open_account(
                account_id,
                "Edge",
                "edge@example.com",
                currency,
                Country::parse(country).unwrap(),
                &admin(),
            )
            .await
            .unwrap();
        if funds > Decimal::ZERO {
            self.flows.adjust(account_id, funds, "credit", &admin()).await.unwrap();
        }
        account_id
    }

    /// A server ordered and provisioned now (its first hour captured).
    async fn server(&self, account_id: AccountId, plan: &str) -> ServerId {
        let (order_id, server_id) = (OrderId::new(), ServerId::new());
        self.flows
            .place_order(
                account_id,
                PlanId::parse(plan).unwrap(),
                Location::parse("syd").unwrap(),
                order_id,
                server_id,
                &admin(),
            )
            .await
            .unwrap();
        self.flows
            .complete_provisioning(order_id, &format!("sim-{}", server_id.0.simple()), &admin())
            .await
            .unwrap();
        server_id
    }

    fn set(&self, instant: &str) {
        self.clock.set(at(instant)).unwrap();
    }

    async fn balance(&self, account_id: AccountId) -> Decimal {
        self.flows
            .handler
            .load::<domain::Account>(&account_id.stream_id())
            .await
            .unwrap()
            .state
            .balance()
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db.pool).await.unwrap()
    }
}

/// The simulated provider, recording every action it is asked for.
#[derive(Default)]
struct RecordingProvider {
    inner: adapters::simulated::SimulatedProvider,
    actions: Mutex<Vec<ServerAction>>,
}

impl domain::provider::ServerProvider for RecordingProvider {
    fn provision(&self, request: domain::provider::ProvisionRequest) -> domain::provider::ProviderFuture<'_, String> {
        self.inner.provision(request)
    }

    fn act(&self, provider_server_id: &str, action: ServerAction) -> domain::provider::ProviderFuture<'_, ()> {
        self.actions.lock().unwrap().push(action.clone());
        self.inner.act(provider_server_id, action)
    }
}

async fn dispatch(world: &World, provider: &RecordingProvider) -> Vec<ServerAction> {
    let policy = app::workers::RetryPolicy {
        attempts_max: 3,
        backoff_base: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(50),
        lease: std::time::Duration::from_secs(60),
    };
    let parties = app::outbox::Parties { provider, payments: None };
    app::outbox::dispatch(&world.flows, parties, policy).await.unwrap();
    std::mem::take(&mut *provider.actions.lock().unwrap())
}

#[tokio::test]
async fn a_grace_cancellation_powers_the_server_off_at_the_provider_and_a_revocation_back_on() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::AUD, "AU", dec!(20)).await;
    let server = world.server(account, "vps-2g").await;
    world
        .flows
        .setup(server, "ubuntu-24.04", Hostname::parse("web-1").unwrap(), &admin())
        .await
        .unwrap();
    let provider = RecordingProvider::default();
    assert!(matches!(dispatch(&world, &provider).await.as_slice(), [ServerAction::Build { .. }]));

    world.set("2027-03-01T09:20:00Z");
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    assert_eq!(
        dispatch(&world, &provider).await,
        vec![ServerAction::Power {
            action: PowerAction::Shutdown
        }],
        "a cancelled server no longer billed must not keep running at the provider"
    );
    world.set("2027-03-01T12:20:00Z");
    world.flows.revoke_cancellation(server, &admin()).await.unwrap();
    assert_eq!(
        dispatch(&world, &provider).await,
        vec![ServerAction::Power { action: PowerAction::Boot }],
        "a revoked cancellation powers the server back on"
    );

    // A server stopped by its owner is neither shut down again nor booted by a revocation.
    world
        .flows
        .power(server, domain::server::PowerAction::Shutdown, &admin())
        .await
        .unwrap();
    assert_eq!(dispatch(&world, &provider).await.len(), 1);
    world.set("2027-03-01T13:20:00Z");
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    world.set("2027-03-01T14:20:00Z");
    world.flows.revoke_cancellation(server, &admin()).await.unwrap();
    assert_eq!(dispatch(&world, &provider).await, vec![]);
    let view = world.flows.handler.load::<domain::Server>(&server.stream_id()).await.unwrap();
    assert_eq!(view.state.status(), Some(domain::server::Status::Stopped));
}

#[tokio::test]
async fn a_revocation_in_the_hour_of_its_cancellation_leaves_the_hour_paid_from_the_revocation_on() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::AUD, "AU", dec!(20)).await;
    let server = world.server(account, "vps-2g").await;
    world.set("2027-03-01T10:00:00Z");
    assert_eq!(
        app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
            .await
            .unwrap()
            .charged,
        1
    );
    let before_hour = world.balance(account).await + dec!(0.022603);
    let gross = dec!(0.022603);

    world.set("2027-03-01T10:00:10Z");
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    world.set("2027-03-01T10:00:20Z");
    world.flows.revoke_cancellation(server, &admin()).await.unwrap();
    let paid = before_hour - world.balance(account).await;
    // At least the hour from 10:00:20 on: 3,580 s of it.
    assert!(
        paid >= domain::billing::pro_rata(gross, 3580),
        "the customer paid {paid} for an hour used from 10:00:20 on"
    );
    assert!(paid <= gross);

    // Cancelled again in the same hour: the unused time from then on is given back again.
    world.set("2027-03-01T10:30:00Z");
    let before = world.balance(account).await;
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    assert!(
        world.balance(account).await > before,
        "the second cancellation refunds its unused time"
    );
    let paid = before_hour - world.balance(account).await;
    assert!(paid >= domain::billing::pro_rata(gross, 3580) - domain::billing::pro_rata(gross, 1800) - dec!(0.000002));

    // Revoked in a later hour: that hour is charged in full, in the append of the revocation.
    world.set("2027-03-01T12:15:00Z");
    let outcome = world.flows.revoke_cancellation(server, &admin()).await.unwrap();
    assert!(matches!(outcome, SlotOutcome::Charged { .. }), "{outcome:?}");
    let charged_with_revocation = world
        .count(
            "SELECT count(*) FROM events c JOIN events r ON r.metadata->>'command_id' = c.metadata->>'command_id' \
             WHERE c.event_type = 'HourCharged' AND r.event_type = 'CancellationRevoked'",
        )
        .await;
    assert_eq!(
        charged_with_revocation, 1,
        "the slot in progress is charged in the revocation's append"
    );
    // 11:00 was not billable, and is never charged.
    assert_eq!(
        app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
            .await
            .unwrap()
            .charged,
        0
    );
    // The read models of it all equal a replay of the log.
    projections::runner::catch_up_all(&world.db.pool).await.unwrap();
    for name in ["balances", "statement", "journal", "invoices"] {
        let projection = projections::projection::by_name(name).unwrap();
        let check = projections::verify::verify(&world.db.pool, projection.as_ref()).await.unwrap();
        assert!(check.differences.is_empty(), "{name}: {:?}", check.differences);
    }
}

#[tokio::test]
async fn hours_before_a_resumption_are_never_charged_even_if_its_charge_was_lost() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    // Enough for the first hour only: the 10:00 slot is declined and the server suspended.
    let account = world.customer(Currency::USD, "US", dec!(0.006849)).await;
    let server = world.server(account, "vps-1g").await;
    world.set("2027-03-01T10:00:00Z");
    let run = app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    assert_eq!((run.charged, run.declined), (0, 1));

    // Three days later the wallet is topped up and the server resumed, and a crash loses the
    // resumption's charge (as when the two were separate appends): the next run may charge the
    // slot of the resumption on, never the 72 hours of the suspension.
    world.set("2027-03-04T10:30:00Z");
    world.flows.adjust(account, dec!(5), "top-up", &admin()).await.unwrap();
    world
        .flows
        .server_command(server, domain::ServerCommand::Resume { at: world.clock.now() }, &admin())
        .await
        .unwrap();
    let run = app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    assert_eq!(run.charged, 1, "only the slot of the resumption is billable");
    assert_eq!(world.balance(account).await, dec!(5) - dec!(0.006849));

    // The resumption and its first charge are one append.
    let suspended_again = world.customer(Currency::USD, "US", dec!(0.006849)).await;
    let other = world.server(suspended_again, "vps-1g").await;
    world.set("2027-03-04T11:00:00Z");
    app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    world.flows.adjust(suspended_again, dec!(1), "top-up", &admin()).await.unwrap();
    world.set("2027-03-04T13:30:00Z");
    assert!(matches!(
        world.flows.resume(other, &admin()).await.unwrap(),
        SlotOutcome::Charged { .. }
    ));
    let together = world
        .count(
            "SELECT count(*) FROM events c JOIN events r ON r.metadata->>'command_id' = c.metadata->>'command_id' \
             WHERE c.event_type = 'HourCharged' AND r.event_type = 'ServerResumed'",
        )
        .await;
    assert_eq!(together, 1);
    // A wallet that cannot pay is not resumed at all.
    let poor = world.customer(Currency::USD, "US", dec!(0.006849)).await;
    let poor_server = world.server(poor, "vps-1g").await;
    world.set("2027-03-04T14:00:00Z");
    app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    assert_eq!(world.flows.resume(poor_server, &admin()).await.unwrap(), SlotOutcome::NotAffordable);
    let view = world.flows.handler.load::<domain::Server>(&poor_server.stream_id()).await.unwrap();
    assert_eq!(view.state.status(), Some(domain::server::Status::Suspended));
}

#[tokio::test]
async fn a_charge_decided_before_a_cancellation_committed_is_decided_again() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(5)).await;
    let server = world.server(account, "vps-1g").await;
    world.set("2027-03-01T11:00:00Z");
    let catalog = world
        .flows
        .handler
        .load::<domain::Catalog>(domain::catalog::CATALOG_STREAM)
        .await
        .unwrap();
    let price = catalog
        .state
        .monthly_price(&PlanId::parse("vps-1g").unwrap(), Currency::USD, world.clock.now())
        .unwrap();

    // A billing run reads the wallet and the server (billable) and decides the 11:00 slot ...
    let handler = world.flows.handler.clone();
    let mut unit = handler.unit();
    let mut wallet = unit.load::<domain::Account>(&account.stream_id()).await.unwrap();
    let read = unit.load::<domain::Server>(&server.stream_id()).await.unwrap();
    assert!(read.state.may_bill(HourSlot::containing(world.clock.now())));
    let events = unit
        .handle(
            &mut wallet,
            AccountCommand::ChargeSlot {
                charge_id: domain::ChargeId::new(),
                server_id: server,
                plan_id: PlanId::parse("vps-1g").unwrap(),
                slot: HourSlot::containing(world.clock.now()),
                monthly_price: price.amount,
                tax_rate: catalog.state.tax_rate(Country::parse("US").unwrap(), world.clock.now()),
            },
        )
        .await
        .unwrap();
    assert!(matches!(events.as_slice(), [AccountEvent::HourCharged { .. }]));
    // ... while the customer cancels (nothing of 11:00 is charged yet, so nothing is refunded) ...
    world.set("2027-03-01T11:00:05Z");
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    // ... so the run's append, decided on a server that has moved on, must not go through. (The
    // cancellation itself charged the hours it owed, 10:00 and 11:00, and gave 11:00's unused
    // 3,595 s back.)
    let commit = handler.commit::<domain::AccountError>(unit, &admin(), 1).await.unwrap();
    assert!(matches!(commit, Commit::Retry), "a stale charge was committed: {commit:?}");
    assert_eq!(world.count("SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await, 2);
    assert_eq!(
        world
            .count("SELECT count(*) FROM events WHERE event_type = 'CancellationRefunded' AND payload->>'unused_seconds' = '3595'")
            .await,
        1
    );

    // Racing for real: many cancellations at the start of an hour while the run bills it. Every
    // charge of that hour is refunded in full (cancelled at its first second), or never made.
    let mut servers = Vec::new();
    world.set("2027-03-01T11:10:00Z");
    for _ in 0..40 {
        let account = world.customer(Currency::USD, "US", dec!(1)).await;
        servers.push(world.server(account, "vps-1g").await);
    }
    world.set("2027-03-01T12:00:00Z");
    let metadata = admin();
    let cancellations = futures::future::join_all(
        servers
            .iter()
            .map(|server| world.flows.cancel(*server, CancellationMode::Grace, &metadata)),
    );
    let (run, cancelled) = tokio::join!(
        app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now())),
        cancellations
    );
    run.unwrap();
    assert!(cancelled.iter().all(Result::is_ok));
    let unrefunded = world
        .count(
            "SELECT count(*) FROM events c WHERE c.event_type = 'HourCharged' AND c.payload->>'slot' LIKE '2027-03-01T12%' \
             AND NOT EXISTS (SELECT 1 FROM events r WHERE r.event_type = 'CancellationRefunded' \
                             AND r.payload->>'charge_id' = c.payload->>'charge_id' AND r.payload->>'unused_seconds' = '3600')",
        )
        .await;
    assert_eq!(unrefunded, 0, "a cancelled server was charged for its hour without refund");
}

#[tokio::test]
async fn billing_resumes_after_ten_days_of_downtime_and_one_broken_account_stops_no_one_else() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let mut accounts = Vec::new();
    for _ in 0..5 {
        let account = world.customer(Currency::USD, "US", dec!(100)).await;
        for _ in 0..10 {
            world.server(account, "vps-1g").await;
        }
        accounts.push(account);
    }
    // One more account that cannot be billed: its plan was repriced without its currency.
    let broken = world.customer(Currency::EUR, "DE", dec!(100)).await;
    world.server(broken, "vps-2g").await;
    world.set("2027-03-01T09:20:00Z");
    let plans = include_str!("../../fixtures/plans.toml").replace(
        r#"monthly = { USD = "10.00", AUD = "15.00", EUR = "9.00" }"#,
        r#"monthly = { USD = "10.00", AUD = "15.00" }"#,
    );
    let fixtures = Fixtures::parse(&plans, include_str!("../../fixtures/tax.toml")).unwrap();
    assert_eq!(world.flows.sync_catalog(fixtures, &admin()).await.unwrap(), 1, "vps-2g repriced");

    // Ten days without a run: 240 slots for each of 50 servers, 12,000 charges, more than one
    // append may carry.
    world.set("2027-03-11T09:10:00Z");
    let run = app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    assert_eq!(run.charged, 50 * 240);
    assert_eq!(run.failed_accounts, 1, "{run:?}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM events WHERE event_type = 'HourCharged' AND payload->>'slot' LIKE '2027-03-11T09%'")
            .await,
        50
    );
    // Nothing is charged twice when the run is repeated.
    let again = app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    assert_eq!(again.charged, 0);
    for account in accounts {
        assert_eq!(world.balance(account).await, dec!(100) - dec!(0.006849) * Decimal::from(10 * 241));
    }
}

/// A provider that is down for its first `outage` calls to `act`, and that looks, during each call,
/// at how many of the database's sessions sit idle in a transaction (a dispatcher holding one
/// across the call would starve the pool).
struct FlakyProvider {
    inner: adapters::simulated::SimulatedProvider,
    outage: std::sync::atomic::AtomicU32,
    pool: sqlx::PgPool,
    acted: Mutex<Vec<ServerAction>>,
    idle_in_transaction: std::sync::atomic::AtomicI64,
}

impl domain::provider::ServerProvider for FlakyProvider {
    fn provision(&self, request: domain::provider::ProvisionRequest) -> domain::provider::ProviderFuture<'_, String> {
        self.inner.provision(request)
    }

    fn act(&self, provider_server_id: &str, action: ServerAction) -> domain::provider::ProviderFuture<'_, ()> {
        let provider_server_id = provider_server_id.to_string();
        Box::pin(async move {
            let idle: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            self.idle_in_transaction.fetch_max(idle, std::sync::atomic::Ordering::SeqCst);
            let down = self
                .outage
                .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            if down {
                return Err(domain::provider::ProviderError::Retryable("503 Service Unavailable".into()));
            }
            self.acted.lock().unwrap().push(action.clone());
            self.inner.act(&provider_server_id, action).await
        })
    }
}

#[tokio::test]
async fn a_provider_down_for_a_while_is_told_of_a_deletion_when_it_is_back_and_no_transaction_waits_on_it() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(5)).await;
    let server = world.server(account, "vps-1g").await;
    let provider = FlakyProvider {
        inner: adapters::simulated::SimulatedProvider::default(),
        outage: std::sync::atomic::AtomicU32::new(0),
        pool: world.db.pool.clone(),
        acted: Mutex::new(Vec::new()),
        idle_in_transaction: std::sync::atomic::AtomicI64::new(0),
    };
    let policy = app::workers::RetryPolicy {
        attempts_max: 3,
        backoff_base: std::time::Duration::from_millis(1),
        backoff_max: std::time::Duration::from_millis(5),
        lease: std::time::Duration::from_secs(60),
    };
    let parties = app::outbox::Parties {
        provider: &provider,
        payments: None,
    };
    app::outbox::dispatch(&world.flows, parties, policy).await.unwrap();
    // Cancelled at once; due five minutes later, deleted: the provider is down for ten calls,
    // more than the saga's three attempts.
    world.flows.cancel(server, CancellationMode::Immediate, &admin()).await.unwrap();
    world.set("2027-03-01T09:16:00Z");
    world.flows.delete_due(server, &admin()).await.unwrap();
    provider.outage.store(10, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..40 {
        app::outbox::dispatch(&world.flows, parties, policy).await.unwrap();
        if !provider.acted.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        *provider.acted.lock().unwrap(),
        vec![ServerAction::Delete],
        "the deletion reached the provider once it was back"
    );
    assert_eq!(world.count("SELECT count(*) FROM outbox WHERE status <> 'done'").await, 0);
    assert_eq!(
        provider.idle_in_transaction.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a transaction was held open while the provider answered"
    );
}

#[tokio::test]
async fn a_month_billed_only_after_it_ended_is_invoiced() {
    // Provisioned on the last evening of February; nothing runs again until April.
    let world = World::new("2027-02-28T23:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(20)).await;
    world.server(account, "vps-1g").await;
    world.set("2027-04-01T00:30:00Z");
    let report = app::workers::run_due(&world.flows, world.clock.now()).await.unwrap();
    assert_eq!(report.slots_charged, 31 * 24 + 1, "March and the first hour of April, caught up");
    // Every March charge was recorded in April; March is invoiced all the same.
    assert_eq!(report.invoices_issued, 1, "{report:?}");
    let (number, period): (String, String) =
        sqlx::query_as("SELECT payload->>'number', payload->'invoice'->'period'->>'month' FROM events WHERE event_type = 'InvoiceIssued'")
            .fetch_one(&world.db.pool)
            .await
            .unwrap();
    assert!(number.starts_with("INV-2027-"), "{number}");
    assert_eq!(period, "3", "March's invoice");
    // Once a month is invoiced, later runs leave it alone.
    world.set("2027-04-01T01:00:00Z");
    assert_eq!(
        app::workers::run_due(&world.flows, world.clock.now())
            .await
            .unwrap()
            .invoices_issued,
        0
    );
}

#[tokio::test]
async fn a_service_credit_racing_its_invoice_lands_on_the_invoice_or_on_a_credit_note() {
    let world = World::new("2027-03-31T22:10:00Z").await;
    let mut accounts = Vec::new();
    for _ in 0..24 {
        let account = world.customer(Currency::AUD, "AU", dec!(10)).await;
        world.server(account, "vps-1g").await;
        accounts.push(account);
    }
    world.set("2027-04-01T00:05:00Z");
    app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
        .await
        .unwrap();
    let march = domain::YearMonth::of(domain::HourSlot::containing(at("2027-03-31T22:00:00Z")).start());
    let mut races = Vec::new();
    for account in &accounts {
        let charge: String =
            sqlx::query_scalar("SELECT payload->>'charge_id' FROM events WHERE event_type = 'HoldCaptured' AND stream_id = $1")
                .bind(account.stream_id())
                .fetch_one(&world.db.pool)
                .await
                .unwrap();
        let charge = domain::ChargeId::parse(&charge).unwrap();
        let flows = world.flows.clone();
        let account = *account;
        races.push(async move {
            let metadata = admin();
            let (invoice, credit) = tokio::join!(
                flows.issue_invoice(account, march, &metadata),
                flows.service_credit(account, charge, dec!(0.005), "outage", &metadata)
            );
            invoice.unwrap().expect("an invoice for March");
            credit.unwrap();
        });
    }
    futures::future::join_all(races).await;
    // For every account, March as invoiced less its credit notes is March's charges less the
    // credits given against them.
    for account in &accounts {
        let invoiced: String = sqlx::query_scalar(
            "SELECT payload->'invoice'->>'total' FROM events WHERE event_type = 'InvoiceIssued' AND payload->'invoice'->>'account_id' = $1",
        )
        .bind(account.to_string())
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
        let noted: Vec<String> = sqlx::query_scalar(
            "SELECT payload->>'total' FROM events WHERE event_type = 'CreditNoteIssued' AND payload->'credit_note'->>'account_id' = $1",
        )
        .bind(account.to_string())
        .fetch_all(&world.db.pool)
        .await
        .unwrap();
        let noted: Decimal = noted.iter().map(|total| total.parse::<Decimal>().unwrap()).sum();
        let charged: Vec<String> = sqlx::query_scalar(
            "SELECT payload->>'gross' FROM events WHERE stream_id = $1 AND event_type IN ('HourCharged', 'HoldCaptured') \
             AND payload->>'slot' LIKE '2027-03%'",
        )
        .bind(account.stream_id())
        .fetch_all(&world.db.pool)
        .await
        .unwrap();
        let charged: Decimal = charged.iter().map(|gross| gross.parse::<Decimal>().unwrap()).sum();
        assert_eq!(
            invoiced.parse::<Decimal>().unwrap() - noted,
            charged - dec!(0.005),
            "account {account}: the credit is on neither its invoice nor a credit note"
        );
    }
}

#[tokio::test]
async fn a_panic_in_a_round_of_due_work_is_contained_and_the_next_round_runs() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(5)).await;
    world.server(account, "vps-1g").await;
    let panicked = app::workers::guarded("due work", async {
        if world_is_broken() {
            panic!("a bug in a run");
        }
        Ok::<_, app::flows::FlowError>(())
    })
    .await;
    assert_eq!(panicked, None, "the panic is contained and reported as a failed round");
    // The next round runs as usual.
    world.set("2027-03-01T10:00:00Z");
    let flows = world.flows.clone();
    let now = world.clock.now();
    let report = app::workers::guarded("due work", async move { app::workers::run_due(&flows, now).await }).await;
    assert_eq!(report.map(|report| report.slots_charged), Some(1));
}

/// Stands for whatever bug makes a round panic.
fn world_is_broken() -> bool {
    true
}

#[tokio::test]
async fn a_cancellation_after_downtime_charges_the_hours_owed_before_billing_stops() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(5)).await;
    let server = world.server(account, "vps-1g").await;
    // No billing run for a day; the customer cancels at 08:30 the next morning.
    world.set("2027-03-02T08:30:00Z");
    world.flows.cancel(server, CancellationMode::Grace, &admin()).await.unwrap();
    // The 23 hours from 10:00 to 08:00 were billable and are charged, once; 08:00's unused half
    // hour is given back. Nothing is left for the billing run.
    assert_eq!(
        world.count("SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await,
        23
    );
    let rate = dec!(0.006849);
    assert_eq!(
        world.balance(account).await,
        dec!(5) - rate * Decimal::from(24) + domain::billing::pro_rata(rate, 1800)
    );
    assert_eq!(
        app::workers::bill_due(&world.flows, HourSlot::containing(world.clock.now()))
            .await
            .unwrap()
            .charged,
        0
    );
}

#[tokio::test]
async fn servers_stay_suspended_until_the_last_dispute_holding_funds_is_closed() {
    let world = World::new("2027-03-01T09:10:00Z").await;
    let account = world.customer(Currency::USD, "US", dec!(50)).await;
    let server = world.server(account, "vps-1g").await;
    let dispute = |id: &str, withdrawn: Decimal, reinstated: Decimal, closed: Option<bool>| AccountCommand::SyncDispute {
        dispute_id: domain::DisputeId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, id.as_bytes())),
        payment_id: format!("pi_{id}"),
        withdrawn_total: withdrawn,
        reinstated_total: reinstated,
        closed,
    };
    let receive = |event: &'static str, report: AccountCommand, suspended: Vec<ServerId>| {
        let flows = world.flows.clone();
        async move {
            flows
                .receive_dispute_event(
                    &format!("stripe-event-{event}"),
                    serde_json::json!({"event_id": event}),
                    account,
                    report,
                    &[server],
                    &suspended,
                    &admin(),
                )
                .await
                .unwrap()
        }
    };
    let status = || async {
        world
            .flows
            .handler
            .load::<domain::Server>(&server.stream_id())
            .await
            .unwrap()
            .state
            .status()
    };
    assert!(receive("evt_a_open", dispute("a", dec!(10), dec!(0), None), vec![]).await);
    assert!(receive("evt_b_open", dispute("b", dec!(10), dec!(0), None), vec![]).await);
    assert_eq!(status().await, Some(domain::server::Status::Suspended));
    // A is won; B still holds funds: the server stays suspended.
    assert!(receive("evt_a_closed", dispute("a", dec!(10), dec!(10), Some(true)), vec![server]).await);
    assert_eq!(status().await, Some(domain::server::Status::Suspended));
    // B is lost: nothing is held any more, and the server comes back in the append of the close.
    assert!(receive("evt_b_closed", dispute("b", dec!(10), dec!(0), Some(false)), vec![server]).await);
    assert_eq!(status().await, Some(domain::server::Status::NeedsSetup));
    let together = world
        .count(
            "SELECT count(*) FROM events c JOIN events r ON r.metadata->>'command_id' = c.metadata->>'command_id' \
             WHERE c.event_type = 'DisputeClosed' AND r.event_type = 'ServerResumed'",
        )
        .await;
    assert_eq!(together, 1, "resumed with the close that released it, once");
}
