//! An order whose saga was interrupted (the process stopped after placing it) is taken up again
//! by the due-work run, and its hold captured once.

use std::sync::Arc;

use api::flows::Flows;
use api::handler::{CommandHandler, Metadata};
use chrono::{DateTime, Duration, Utc};
use domain::catalog::Fixtures;
use domain::{AccountId, Clock, Country, Currency, Location, ManualClock, OrderId, PlanId, ServerId};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal_macros::dec;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

#[tokio::test]
async fn an_interrupted_order_is_resumed_after_two_minutes_and_captured_once() {
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

    let provider: Arc<dyn domain::provider::ServerProvider> = Arc::new(adapters::simulated::SimulatedProvider::default());
    let policy = api::workers::RetryPolicy {
        attempts_max: 3,
        backoff_base: std::time::Duration::from_millis(5),
        backoff_max: std::time::Duration::from_millis(50),
    };
    clock.advance(Duration::seconds(60)).unwrap();
    let early = api::workers::run_due(&flows, &provider, policy, clock.now()).await.unwrap();
    assert_eq!(early.orders_resumed, 0, "a saga may still be running after one minute");

    clock.advance(Duration::seconds(90)).unwrap();
    let report = api::workers::run_due(&flows, &provider, policy, clock.now()).await.unwrap();
    assert_eq!(report.orders_resumed, 1);
    let order = flows.handler.load::<domain::Order>(&order_id.stream_id()).await.unwrap();
    assert_eq!(order.state.status, Some(domain::order::OrderStatus::Completed));
    let account = flows.handler.load::<domain::Account>(&account_id.stream_id()).await.unwrap();
    assert_eq!(
        (account.state.balance(), account.state.reserved()),
        (dec!(1.00) - dec!(0.006849), dec!(0))
    );
    assert_eq!(
        api::workers::run_due(&flows, &provider, policy, clock.now())
            .await
            .unwrap()
            .orders_resumed,
        0
    );
    let captured: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldCaptured'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(captured, 1);
}
