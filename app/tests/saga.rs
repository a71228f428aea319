//! An order whose process stopped after placing it is provisioned through the outbox by another
//! process, once, even when two processes dispatch at once; its hold is captured once.

use std::sync::Arc;

use app::flows::Flows;
use app::handler::{CommandHandler, Metadata};
use chrono::{DateTime, Duration, Utc};
use domain::catalog::Fixtures;
use domain::{AccountId, Country, Currency, Location, ManualClock, OrderId, PlanId, ServerId};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal_macros::dec;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

#[tokio::test]
async fn an_order_left_by_a_stopped_process_is_provisioned_once_by_two_racing_dispatchers() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let clock = Arc::new(ManualClock::new(at("2027-03-01T09:10:00Z")));
    let flows = Flows::new(CommandHandler::new(log, clock.clone()));
    let admin = Metadata::actor("admin", "test");
    let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
    flows.sync_catalog(fixtures, &admin).await.unwrap();
    let account_id = AccountId::new();
    flows
        .open_account(
            account_id,
            "Interrupted",
            "i@example.com",
            Currency::USD,
            Country::parse("US").unwrap(),
            &admin,
        )
        .await
        .unwrap();
    flows.adjust(account_id, dec!(1.00), "credit", &admin).await.unwrap();
    let (order_id, server_id) = (OrderId::new(), ServerId::new());
    // Placed, and then the process that would have provisioned it stopped.
    flows
        .place_order(
            account_id,
            PlanId::parse("vps-1g").unwrap(),
            Location::parse("nyc").unwrap(),
            order_id,
            server_id,
            &admin,
        )
        .await
        .unwrap();

    // Two other processes dispatch the outbox at once; the provider is slow, so both are at it
    // while the first call is in flight.
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let provider = CountingProvider {
        inner: adapters::simulated::SimulatedProvider {
            latency: std::time::Duration::from_millis(200),
            ..Default::default()
        },
        calls: calls.clone(),
    };
    let policy = app::workers::RetryPolicy {
        attempts_max: 3,
        backoff_base: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(50),
        lease: std::time::Duration::from_secs(60),
    };
    clock.advance(Duration::seconds(60)).unwrap();
    let parties = app::outbox::Parties {
        provider: &provider,
        payments: None,
    };
    let other = Flows::new(CommandHandler::new(
        EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap(),
        clock.clone(),
    ));
    let (a, b) = tokio::join!(
        app::outbox::dispatch(&flows, parties, policy),
        app::outbox::dispatch(&other, parties, policy)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.sent + b.sent, a.failed + b.failed), (1, 0), "{a:?} {b:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "the provider is asked once");
    let order = flows.handler.load::<domain::Order>(&order_id.stream_id()).await.unwrap();
    assert_eq!(order.state.status, Some(domain::order::OrderStatus::Completed));
    let account = flows.handler.load::<domain::Account>(&account_id.stream_id()).await.unwrap();
    assert_eq!(
        (account.state.balance(), account.state.reserved()),
        (dec!(1.00) - dec!(0.006849), dec!(0))
    );
    // Nothing is left to send.
    let again = app::outbox::dispatch(&other, parties, policy).await.unwrap();
    assert_eq!((again.sent, again.deferred), (0, 0));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let captured: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldCaptured'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(captured, 1);
}

/// The simulated provider, counting the servers it is asked to create.
struct CountingProvider {
    inner: adapters::simulated::SimulatedProvider,
    calls: Arc<std::sync::atomic::AtomicU32>,
}

impl domain::provider::ServerProvider for CountingProvider {
    fn provision(&self, request: domain::provider::ProvisionRequest) -> domain::provider::ProviderFuture<'_, String> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.provision(request)
    }

    fn act(&self, provider_server_id: &str, action: domain::provider::ServerAction) -> domain::provider::ProviderFuture<'_, ()> {
        self.inner.act(provider_server_id, action)
    }
}
