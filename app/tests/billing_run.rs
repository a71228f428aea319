//! The hourly billing run, set-based: one query for what is due, wallets and servers read a batch
//! at a time, one append per batch. Two runs racing over the same hours (two processes) charge
//! every (server, slot) once, and a wallet that cannot pay has its server suspended once.

use std::collections::HashMap;
use std::sync::Arc;

use app::flows::Flows;
use app::handler::{CommandHandler, Metadata};
use chrono::{DateTime, Utc};
use domain::catalog::Fixtures;
use domain::{AccountId, Clock, Country, Currency, HourSlot, Location, ManualClock, OrderId, PlanId, ServerId};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

#[tokio::test]
async fn two_racing_runs_charge_each_slot_once_and_suspend_who_cannot_pay_once() {
    let db = TestDatabase::new().await;
    let clock = Arc::new(ManualClock::new(at("2027-03-01T09:10:00Z")));
    let process = |clock: Arc<ManualClock>| {
        let pool = db.pool.clone();
        async move {
            Flows::new(CommandHandler::new(
                EventLog::open(pool, LogConfig::default()).await.unwrap(),
                clock,
            ))
        }
    };
    let flows = process(clock.clone()).await;
    let admin = Metadata::actor("admin", "test");
    let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
    flows.sync_catalog(fixtures, &admin).await.unwrap();
    let first_hour = dec!(0.006849);
    // 40 accounts that can pay for two servers for hours, 6 that can pay one server's first hour only.
    let mut servers_of: HashMap<AccountId, Vec<ServerId>> = HashMap::new();
    for index in 0..46 {
        let account_id = AccountId::new();
        let (funds, servers) = if index < 40 { (dec!(5.00), 2) } else { (first_hour, 1) };
        flows
            .open_account(
                account_id,
                &format!("Run {index}"),
                "run@example.com",
                Currency::USD,
                Country::parse("US").unwrap(),
                &admin,
            )
            .await
            .unwrap();
        flows.adjust(account_id, funds, "credit", &admin).await.unwrap();
        for _ in 0..servers {
            let (order_id, server_id) = (OrderId::new(), ServerId::new());
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
            flows
                .complete_provisioning(order_id, &format!("sim-{index}"), &admin)
                .await
                .unwrap();
            servers_of.entry(account_id).or_default().push(server_id);
        }
    }

    // Three hours later, two processes run the billing at once: slots 10:00, 11:00 and 12:00 are due.
    clock.set(at("2027-03-01T12:10:00Z")).unwrap();
    let other = process(clock.clone()).await;
    let until = HourSlot::containing(clock.now());
    let (a, b) = tokio::join!(app::workers::bill_due(&flows, until), app::workers::bill_due(&other, until));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.charged + b.charged,
        80 * 3,
        "80 paying servers, three slots each, between the two runs"
    );
    assert_eq!(a.declined + b.declined, 6, "the six who cannot pay are declined once each");

    let charges: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT payload->>'server_id', payload->>'slot', count(*) FROM events WHERE event_type = 'HourCharged' GROUP BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(charges.len(), 240, "one row per (server, slot) charged by the runs");
    assert!(charges.iter().all(|(_, _, count)| *count == 1), "a slot charged twice: {charges:?}");
    let suspended: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ServerSuspended'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(suspended, 6);

    // Every paying wallet paid its first hours and three more per server; the others are at zero.
    let rate = first_hour;
    for (account_id, servers) in &servers_of {
        let account = flows.handler.load::<domain::Account>(&account_id.stream_id()).await.unwrap();
        let expected = if servers.len() == 2 {
            dec!(5.00) - rate * Decimal::from(2 * 4)
        } else {
            Decimal::ZERO
        };
        assert_eq!(account.state.balance(), expected, "{account_id}");
    }
    // Nothing is due again for these hours; the next hour is.
    assert_eq!(app::workers::bill_due(&flows, until).await.unwrap().charged, 0);
    clock.set(at("2027-03-01T13:00:00Z")).unwrap();
    let next = app::workers::bill_due(&other, HourSlot::containing(clock.now())).await.unwrap();
    assert_eq!((next.charged, next.declined), (80, 0), "suspended servers are not billed");
}
