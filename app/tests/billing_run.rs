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

/// A process of the product on `db` at `clock`, the fixtures' catalogue synced.
async fn process(db: &TestDatabase, clock: Arc<ManualClock>) -> (EventLog, Flows) {
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let flows = Flows::new(CommandHandler::new(log.clone(), clock));
    let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
    flows.sync_catalog(fixtures, &admin()).await.unwrap();
    (log, flows)
}

fn admin() -> Metadata {
    Metadata::actor("admin", "test")
}

/// A USD account in the US credited with `funds`.
async fn customer(flows: &Flows, name: &str, funds: Decimal) -> AccountId {
    let account_id = AccountId::new();
    flows
        .open_account(
            account_id,
            name,
            "customer@example.com",
            Currency::USD,
            Country::parse("US").unwrap(),
            &admin(),
        )
        .await
        .unwrap();
    flows.adjust(account_id, funds, "credit", &admin()).await.unwrap();
    account_id
}

/// A `vps-1g` server of `account_id`, ordered and provisioned now (its first hour charged).
async fn provisioned(flows: &Flows, account_id: AccountId, provider_server_id: &str) -> ServerId {
    let (order_id, server_id) = (OrderId::new(), ServerId::new());
    flows
        .place_order(
            account_id,
            PlanId::parse("vps-1g").unwrap(),
            Location::parse("nyc").unwrap(),
            order_id,
            server_id,
            &admin(),
        )
        .await
        .unwrap();
    flows.complete_provisioning(order_id, provider_server_id, &admin()).await.unwrap();
    server_id
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
        let (funds, servers) = if index < 40 { (dec!(5.00), 2) } else { (first_hour, 1) };
        let account_id = customer(&flows, &format!("Run {index}"), funds).await;
        for _ in 0..servers {
            let server_id = provisioned(&flows, account_id, &format!("sim-{index}")).await;
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

/// The run decides from the servers read model's rows without reading the servers' streams, its
/// append guarded by the version each row was folded from: a server suspended after the rows
/// were read (the read model not caught up yet) is not charged, while the rest of the batch is.
#[tokio::test]
async fn a_run_that_read_the_servers_before_a_suspension_does_not_charge_the_suspended_server() {
    let db = TestDatabase::new().await;
    let clock = Arc::new(ManualClock::new(at("2027-03-01T09:10:00Z")));
    let (log, flows) = process(&db, clock.clone()).await;
    let admin = admin();
    let mut servers = Vec::new();
    // The third can pay for its first hour only.
    for index in 0..3 {
        let funds = if index == 2 { dec!(0.006849) } else { dec!(5.00) };
        let account_id = customer(&flows, &format!("Guarded {index}"), funds).await;
        let server_id = provisioned(&flows, account_id, &format!("sim-g{index}")).await;
        servers.push((account_id, server_id));
    }
    clock.set(at("2027-03-01T10:10:00Z")).unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let until = HourSlot::containing(clock.now());
    let (rows, checkpoint) = app::reads::charges_due(&db.pool, until.start()).await.unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let stream_version = log.stream_version(&ServerId(row.server_id).stream_id()).await.unwrap();
        assert_eq!(row.version, stream_version, "a row carries the version it was folded from");
        assert_eq!(row.first_billable_slot, Some(at("2027-03-01T09:00:00Z")));
    }
    let seen_at = log.seen_at(checkpoint).await.unwrap();
    assert!(seen_at.is_some());

    // The first account's server is suspended; the read model has not seen it.
    let (suspended_account, suspended) = servers[0];
    flows
        .server_command(
            suspended,
            domain::ServerCommand::Suspend {
                reason: domain::server::SuspensionReason::Dispute,
                at: clock.now(),
            },
            &admin,
        )
        .await
        .unwrap();
    // The third's server is set up: its stream moved, and it is still billable.
    flows
        .server_command(
            servers[2].1,
            domain::ServerCommand::Setup {
                os_image: "debian-12".into(),
                hostname: domain::Hostname::parse("guarded-2").unwrap(),
                at: clock.now(),
            },
            &admin,
        )
        .await
        .unwrap();
    let due: Vec<(AccountId, Vec<app::flows::DueServer>, usize)> = rows
        .iter()
        .map(|row| {
            (
                AccountId(row.account_id),
                vec![app::flows::DueServer {
                    server_id: ServerId(row.server_id),
                    first: HourSlot::containing(row.next_charge_at),
                    folded: Some(app::flows::FoldedServer {
                        plan_id: PlanId::parse(&row.plan_id).unwrap(),
                        billable_from: HourSlot::containing(row.first_billable_slot.unwrap()),
                        version: row.version,
                    }),
                }],
                1,
            )
        })
        .collect();
    let balance = |account_id: AccountId| {
        let flows = &flows;
        async move {
            flows
                .handler
                .load::<domain::Account>(&account_id.stream_id())
                .await
                .unwrap()
                .state
                .balance()
        }
    };
    let before = balance(suspended_account).await;
    let charges = flows.charge_due_batch(&due, until, seen_at, &admin).await.unwrap();
    assert_eq!(charges.charged, 1, "only the server still billable that can pay is charged");
    assert_eq!(charges.declined, 1, "the one that cannot pay is declined");
    let last: String = sqlx::query_scalar("SELECT event_type FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1")
        .bind(servers[2].1.stream_id())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        last, "ServerSuspended",
        "declined, its server is suspended from its stream as it now is"
    );
    let charged: Vec<String> = sqlx::query_scalar(
        "SELECT payload->>'server_id' FROM events WHERE event_type = 'HourCharged' AND (payload->>'slot')::timestamptz = $1",
    )
    .bind(until.start())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(charged, vec![servers[1].1.to_string()]);
    assert_eq!(
        balance(suspended_account).await,
        before,
        "the suspended server's wallet is not charged"
    );
}

/// A database of the version before the servers read model carried stream versions: migration
/// 0018 fills them (and the first billable slots) from the log and the folded states, so the rows
/// match a replay (`billing verify`) and the billing run decides from them.
#[tokio::test]
async fn servers_stored_before_their_versions_were_get_them_from_the_migration() {
    let db = TestDatabase::new().await;
    let clock = Arc::new(ManualClock::new(at("2027-03-01T09:10:00Z")));
    let (_, flows) = process(&db, clock.clone()).await;
    let admin = admin();
    let account_id = customer(&flows, "Upgraded", dec!(5.00)).await;
    let mut servers = Vec::new();
    for index in 0..3 {
        servers.push(provisioned(&flows, account_id, &format!("sim-u{index}")).await);
    }
    // One suspended and resumed an hour later (billable since then), one suspended still.
    clock.set(at("2027-03-01T10:20:00Z")).unwrap();
    for server_id in &servers[1..] {
        flows
            .server_command(
                *server_id,
                domain::ServerCommand::Suspend {
                    reason: domain::server::SuspensionReason::Dispute,
                    at: clock.now(),
                },
                &admin,
            )
            .await
            .unwrap();
    }
    clock.set(at("2027-03-01T11:30:00Z")).unwrap();
    flows.resume(servers[1], &admin).await.unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let expected: Vec<(uuid::Uuid, i64, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT server_id, version, first_billable_slot FROM rm.servers ORDER BY server_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(expected.iter().any(|(_, _, first)| *first == Some(at("2027-03-01T11:00:00Z"))));
    assert!(expected.iter().any(|(_, _, first)| first.is_none()));

    // The database as the previous version left it, then migrated.
    sqlx::query("ALTER TABLE rm.servers DROP COLUMN version, DROP COLUMN first_billable_slot")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 18")
        .execute(&db.pool)
        .await
        .unwrap();
    ledger::MIGRATOR.run(&db.pool).await.unwrap();
    let migrated: Vec<(uuid::Uuid, i64, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT server_id, version, first_billable_slot FROM rm.servers ORDER BY server_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(migrated, expected);
    for projection in projections::projection::all() {
        let check = projections::verify::verify(&db.pool, projection.as_ref()).await.unwrap();
        assert!(check.differences.is_empty(), "{}: {:?}", check.name, check.differences);
    }
    // The next hour is billed from the rows: the running and the resumed server.
    clock.set(at("2027-03-01T12:05:00Z")).unwrap();
    let run = app::workers::bill_due(&flows, HourSlot::containing(clock.now())).await.unwrap();
    assert_eq!(
        (run.charged, run.declined),
        (4, 0),
        "10:00, 11:00 and 12:00 of the running server, 12:00 of the resumed one"
    );
}

/// The run reads what is due a few rows at a time and bills the first accounts while it reads
/// the rest: the rows read in pieces are those of one statement, in account order, and every
/// server is charged once (that an account straddling two reads is planned whole is
/// `workers::tests::an_account_whose_rows_straddle_two_reads_is_planned_whole_once`).
#[tokio::test]
async fn a_run_reading_its_due_rows_in_pieces_charges_every_server_once() {
    let db = TestDatabase::new().await;
    let clock = Arc::new(ManualClock::new(at("2027-03-01T09:10:00Z")));
    let (_log, flows) = process(&db, clock.clone()).await;
    let mut servers = 0;
    for (index, count) in [3, 1, 4, 2].into_iter().enumerate() {
        let account_id = customer(&flows, &format!("Pieces {index}"), dec!(5.00)).await;
        for server in 0..count {
            provisioned(&flows, account_id, &format!("sim-p{index}-{server}")).await;
            servers += 1;
        }
    }
    clock.set(at("2027-03-01T12:10:00Z")).unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let until = HourSlot::containing(clock.now());

    // What is due, by one plain statement.
    let whole: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
        "SELECT account_id, server_id FROM rm.servers WHERE billable AND next_charge_at <= $1 ORDER BY account_id, server_id",
    )
    .bind(until.start())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(whole.len(), servers);
    let checkpoint: i64 = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = 'servers'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut cursor = app::reads::DueCursor::open(&db.pool, until.start(), 3).await.unwrap();
    let mut pieces = Vec::new();
    let mut reads = 0;
    while let Some(chunk) = cursor.next_chunk().await.unwrap() {
        assert!(chunk.len() <= 3);
        pieces.extend(chunk);
        reads += 1;
    }
    assert_eq!(reads, 4, "ten rows, three at a time");
    assert_eq!(cursor.checkpoint(), checkpoint);
    let ids = |rows: &[app::reads::DueRow]| rows.iter().map(|row| (row.account_id, row.server_id)).collect::<Vec<_>>();
    assert_eq!(ids(&pieces), whole, "the rows of one statement, in account order");

    // Slots 10:00, 11:00 and 12:00 are due (09:00 was charged at provisioning).
    let report = app::workers::bill_due_reading(&flows, until, 3).await.unwrap();
    assert_eq!(
        (report.charged, report.declined, report.failed_accounts),
        (3 * servers as u64, 0, 0)
    );
    let charges: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT payload->>'server_id', payload->>'slot', count(*) FROM events WHERE event_type = 'HourCharged' GROUP BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(charges.len(), 3 * servers, "each server's three due hours, each once");
    assert!(charges.iter().all(|(_, _, count)| *count == 1), "a slot charged twice: {charges:?}");
    assert_eq!(app::workers::bill_due_reading(&flows, until, 3).await.unwrap().charged, 0);
}
