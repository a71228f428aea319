//! The command handler over a real log: races on one account, atomic multi-stream commands,
//! bounded retries, and replay of stored (also old-version) events.

use std::sync::Arc;

use app::handler::{CommandHandler, Commit, HandlerError, Metadata, StorageError};
use chrono::{DateTime, Utc};
use domain::account::{Account, AccountCommand, AccountError, AccountEvent};
use domain::order::{Order, OrderCommand};
use domain::server::{Server, ServerCommand, Status};
use domain::{AccountId, Country, Currency, Location, ManualClock, OrderId, PlanId, ServerId, TopUpId};
use ledger::testing::TestDatabase;
use ledger::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use rust_decimal_macros::dec;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

async fn handler(db: &TestDatabase) -> CommandHandler {
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    CommandHandler::new(log, Arc::new(ManualClock::new(at("2026-03-01T12:00:00Z"))))
}

fn admin() -> Metadata {
    Metadata::actor("admin", "test")
}

async fn open_with(handler: &CommandHandler, amount: rust_decimal::Decimal) -> AccountId {
    let account_id = AccountId::new();
    let stream = account_id.stream_id();
    let open = AccountCommand::Open {
        account_id,
        name: "Race".into(),
        email: "race@example.com".into(),
        currency: Currency::USD,
        country: Country::parse("US").unwrap(),
        at: handler.now(),
    };
    handler.execute::<Account>(&stream, open, &admin()).await.unwrap();
    let settle = AccountCommand::SettleTopUp {
        topup_id: TopUpId::new(),
        payment_id: format!("pi_{account_id}"),
        amount,
    };
    handler.execute::<Account>(&stream, settle, &admin()).await.unwrap();
    account_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_holds_on_one_account_never_overspend() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let account_id = open_with(&handler, dec!(1.00)).await;
    let stream = account_id.stream_id();

    let mut tasks = Vec::new();
    for _ in 0..40 {
        let handler = handler.clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let hold = AccountCommand::PlaceHold {
                order_id: OrderId::new(),
                server_id: ServerId::new(),
                net: dec!(0.09),
                tax: dec!(0.01),
            };
            handler.execute::<Account>(&stream, hold, &Metadata::actor("customer", "c1")).await
        }));
    }
    let (mut placed, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(committed) => {
                assert!(matches!(committed.value.as_slice(), [AccountEvent::HoldPlaced { .. }]));
                placed += 1;
            }
            Err(HandlerError::Rejected(AccountError::InsufficientFunds { .. })) => refused += 1,
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!((placed, refused), (10, 30), "1.00 affords exactly ten holds of 0.10");

    // Replaying the account from the log agrees with the figures its events carry.
    let loaded = handler.load::<Account>(&stream).await.unwrap();
    assert_eq!(
        (loaded.state.balance(), loaded.state.reserved(), loaded.state.available()),
        (dec!(1.00), dec!(1.00), dec!(0.00))
    );
    assert_eq!(loaded.version, 2 + 10);
    let events = handler.log().read_stream_all(&stream).await.unwrap();
    let last: AccountEvent = serde_json::from_value(events.last().unwrap().payload.clone()).unwrap();
    let AccountEvent::HoldPlaced { figures, .. } = last else { panic!() };
    assert_eq!(
        (figures.balance, figures.reserved, figures.available),
        (dec!(1.00), dec!(1.00), dec!(0.00))
    );
    assert!(events
        .iter()
        .all(|e| e.metadata["command_id"].is_string() && e.metadata["actor_kind"].is_string()));
    assert_eq!(
        events[2].occurred_at,
        at("2026-03-01T12:00:00Z"),
        "domain time comes from the clock"
    );
}

/// Placing an order: hold the first hour, record the order and the server, in one append.
async fn place_order(
    handler: &CommandHandler,
    account_id: AccountId,
    server_id: ServerId,
    order_id: OrderId,
) -> Result<(), HandlerError<String>> {
    let now = handler.now();
    let metadata = Metadata::actor("customer", "c1");
    let reject = |error: &dyn std::fmt::Display| HandlerError::Rejected(error.to_string());
    for attempt in 1.. {
        let mut unit = handler.unit();
        let mut account = unit.load::<Account>(&account_id.stream_id()).await?;
        let mut order = unit.load::<Order>(&order_id.stream_id()).await?;
        let mut server = unit.load::<Server>(&server_id.stream_id()).await?;
        let (net, tax) = (dec!(0.006849), dec!(0.000685));
        let plan_id = PlanId::parse("vps-1g").unwrap();
        let location = Location::parse("syd").unwrap();
        // The order and the server are decided before the account, so a refusal by the account
        // shows that nothing decided earlier in the unit is stored.
        unit.handle(
            &mut order,
            OrderCommand::Place {
                order_id,
                account_id,
                server_id,
                plan_id: plan_id.clone(),
                location: location.clone(),
                net,
                tax,
                at: now,
            },
        )
        .await
        .map_err(|e| reject(&e))?;
        unit.handle(
            &mut server,
            ServerCommand::Order {
                server_id,
                account_id,
                order_id,
                plan_id,
                location,
                at: now,
            },
        )
        .await
        .map_err(|e| reject(&e))?;
        unit.handle(
            &mut account,
            AccountCommand::PlaceHold {
                order_id,
                server_id,
                net,
                tax,
            },
        )
        .await
        .map_err(|e| reject(&e))?;
        if let Commit::Done(_) = handler.commit(unit, &metadata, attempt).await? {
            return Ok(());
        }
    }
    unreachable!()
}

#[tokio::test]
async fn a_command_over_three_streams_is_stored_whole_or_not_at_all() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let account_id = open_with(&handler, dec!(0.01)).await;
    let (server_id, order_id) = (ServerId::new(), OrderId::new());
    place_order(&handler, account_id, server_id, order_id).await.unwrap();
    assert_eq!(handler.log().stream_version(&order_id.stream_id()).await.unwrap(), 1);
    let server = handler.load::<Server>(&server_id.stream_id()).await.unwrap();
    assert_eq!(server.state.status(), Some(Status::Provisioning));
    let account = handler.load::<Account>(&account_id.stream_id()).await.unwrap();
    assert_eq!(account.state.reserved(), dec!(0.007534));

    // The second order is refused by the account after the order and server were decided in
    // memory: none of its three streams gets an event.
    let (server_2, order_2) = (ServerId::new(), OrderId::new());
    let error = place_order(&handler, account_id, server_2, order_2).await.unwrap_err();
    assert!(
        matches!(&error, HandlerError::Rejected(message) if message.starts_with("insufficient funds")),
        "{error}"
    );
    assert_eq!(handler.log().stream_version(&order_2.stream_id()).await.unwrap(), 0);
    assert_eq!(handler.log().stream_version(&server_2.stream_id()).await.unwrap(), 0);
    assert_eq!(handler.log().stream_version(&account_id.stream_id()).await.unwrap(), 3);
}

#[tokio::test]
async fn a_command_that_keeps_losing_races_gives_up_after_its_bound() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await.with_attempts_max(4);
    let account_id = open_with(&handler, dec!(5)).await;
    let stream = account_id.stream_id();
    let log = handler.log().clone();
    let mut calls = 0;
    let result: Result<(), HandlerError<AccountError>> = async {
        for attempt in 1.. {
            calls += 1;
            let mut unit = handler.unit();
            let mut account = unit.load::<Account>(&stream).await?;
            // Someone else writes to the stream between our read and our append, every time.
            let meddler = NewEvent::new(
                "LowBalanceCleared",
                serde_json::json!({"type": "LowBalanceCleared", "runway_hours": null, "available": "5"}),
            );
            log.append(AppendRequest::single(stream.clone(), ExpectedVersion::Any, vec![meddler]))
                .await
                .unwrap();
            let adjust = AccountCommand::Adjust {
                adjustment_id: domain::AdjustmentId::new(),
                amount: dec!(1),
                reason: "retry test".into(),
            };
            unit.handle(&mut account, adjust).await.map_err(HandlerError::Rejected)?;
            if let Commit::Done(_) = handler.commit(unit, &admin(), attempt).await? {
                return Ok(());
            }
        }
        unreachable!()
    }
    .await;
    assert!(matches!(result, Err(HandlerError::Contended { attempts: 4 })), "{result:?}");
    assert_eq!(calls, 4, "one attempt per allowed try, no more");
    let account = handler.load::<Account>(&stream).await.unwrap();
    assert_eq!(account.state.balance(), dec!(5), "no adjustment was stored");
}

#[tokio::test]
async fn a_stored_version_1_event_still_replays() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let stored: serde_json::Value = serde_json::from_str(include_str!("../../fixtures/events/account_opened_v1.json")).unwrap();
    let event = NewEvent::new("AccountOpened", stored["payload"].clone())
        .with_schema_version(1)
        .with_metadata(stored["metadata"].clone())
        .occurred_at(at(stored["occurred_at"].as_str().unwrap()));
    let stream = stored["stream_id"].as_str().unwrap();
    handler
        .log()
        .append(AppendRequest::single(stream, ExpectedVersion::NoStream, vec![event]))
        .await
        .unwrap();

    let account = handler.load::<Account>(stream).await.unwrap();
    let opened = account.state.opened().expect("opened");
    assert_eq!((opened.country.as_str(), opened.currency.code()), ("NZ", "NZD"));
    // New commands work on top of it.
    let settle = AccountCommand::SettleTopUp {
        topup_id: TopUpId::new(),
        payment_id: "pi_nz".into(),
        amount: dec!(20),
    };
    handler.execute::<Account>(stream, settle, &admin()).await.unwrap();
}

#[tokio::test]
async fn an_undecodable_event_is_reported_with_its_position() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let stream = AccountId::new().stream_id();
    handler
        .log()
        .append(AppendRequest::single(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "AccountOpened",
                serde_json::json!({"type": "AccountOpened", "name": 7}),
            )],
        ))
        .await
        .unwrap();
    match handler.load::<Account>(&stream).await {
        Err(StorageError::Corrupt { position, stream_id, .. }) => assert_eq!((position, stream_id), (1, stream)),
        other => panic!("expected a decoding error, got {:?}", other.map(|l| l.version)),
    }
}

#[tokio::test]
async fn the_catalogue_is_loaded_from_the_fixture_files_once() {
    use domain::catalog::{Catalog, CatalogCommand, Fixtures, CATALOG_STREAM};
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
    let sync = CatalogCommand::Sync {
        fixtures,
        effective_at: handler.now(),
    };
    let first = handler.execute::<Catalog>(CATALOG_STREAM, sync.clone(), &admin()).await.unwrap();
    assert_eq!(first.value.len(), 9);
    let again = handler.execute::<Catalog>(CATALOG_STREAM, sync, &admin()).await.unwrap();
    assert!(again.value.is_empty() && again.outcome.is_none(), "a second load appends nothing");
    let catalog = handler.load::<Catalog>(CATALOG_STREAM).await.unwrap();
    assert_eq!(catalog.version, 9);
    let price = catalog
        .state
        .monthly_price(&PlanId::parse("vps-4g").unwrap(), Currency::AUD, handler.now())
        .unwrap();
    assert_eq!(price.amount, dec!(30.00));
}

/// A charge of `slot` at 7.50 a month and 10% tax, under a fresh id.
fn charge_slot(server_id: ServerId, slot: domain::HourSlot) -> AccountCommand {
    AccountCommand::ChargeSlot {
        charge_id: domain::ChargeId::new(),
        server_id,
        plan_id: PlanId::parse("vps-1g").unwrap(),
        slot,
        monthly_price: dec!(7.50),
        tax_rate: domain::TaxRate::new(dec!(0.1)).unwrap(),
    }
}

/// Every event of `stream` folded from the empty state: what any load must equal.
async fn fold_whole(handler: &CommandHandler, stream: &str) -> Account {
    let mut account = Account::default();
    for recorded in handler.log().read_stream_all(stream).await.unwrap() {
        let event: AccountEvent = domain::decode_event(&recorded.event_type, recorded.schema_version, recorded.payload).unwrap();
        cqrs_es::Aggregate::apply(&mut account, event);
    }
    account
}

#[tokio::test]
async fn a_load_reads_the_snapshot_and_the_events_after_it_and_passes_over_a_bad_snapshot() {
    let db = TestDatabase::new().await;
    let handler = handler(&db).await;
    let account_id = open_with(&handler, dec!(1000)).await;
    let stream = account_id.stream_id();
    let server_id = ServerId::new();
    let first = domain::HourSlot::containing(at("2026-03-01T00:00:00Z"));
    let mut slot = first;
    for _ in 0..(2 * app::handler::SNAPSHOT_EVERY + 30) {
        let charge = charge_slot(server_id, slot);
        handler.execute::<Account>(&stream, charge, &admin()).await.unwrap();
        slot = slot.next();
    }
    let version = handler.log().stream_version(&stream).await.unwrap();
    let (kind, snapshot_version): (String, i64) = sqlx::query_as("SELECT kind, stream_version FROM snapshots WHERE stream_id = $1")
        .bind(&stream)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kind, "Account/2");
    assert!(
        snapshot_version >= 2 * app::handler::SNAPSHOT_EVERY && snapshot_version < version,
        "snapshot at {snapshot_version} of {version}"
    );
    let whole = fold_whole(&handler, &stream).await;

    // A handler with nothing cached starts from the snapshot and reads on.
    let fresh = self::handler(&db).await;
    let loaded = fresh.load::<Account>(&stream).await.unwrap();
    assert_eq!((loaded.version, &*loaded.state), (version, &whole));
    let many = fresh.unit().load_many::<Account>(std::slice::from_ref(&stream)).await.unwrap();
    assert_eq!((many[0].version, &*many[0].state), (version, &whole));
    // A stream asked for twice in one load is whole in both places.
    let fresh = self::handler(&db).await;
    let twice = fresh.unit().load_many::<Account>(&[stream.clone(), stream.clone()]).await.unwrap();
    for loaded in &twice {
        assert_eq!((loaded.version, &*loaded.state), (version, &whole));
    }

    // A snapshot of another shape, one that does not decode, or one not tied to the stream's event
    // at its version, is passed over: the stream is folded whole (and the next load past the bound writes a good snapshot again).
    for tamper in [
        "UPDATE snapshots SET kind = 'Account/1'",
        "UPDATE snapshots SET kind = 'Account/2', state = '{\"balance\": \"999999\"}'",
        // A state that decodes but is not the log's, under a hash that is not the event's there.
        "UPDATE snapshots SET state = jsonb_set(state, '{balance}', '\"999999\"'), event_hash = decode(repeat('11', 32), 'hex')",
    ] {
        sqlx::query(tamper).execute(&db.pool).await.unwrap();
        let fresh = self::handler(&db).await;
        let loaded = fresh.load::<Account>(&stream).await.unwrap();
        assert_eq!((loaded.version, &*loaded.state), (version, &whole), "after {tamper}");
        let (kind, rewritten, state): (String, i64, serde_json::Value) =
            sqlx::query_as("SELECT kind, stream_version, state FROM snapshots WHERE stream_id = $1")
                .bind(&stream)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((kind.as_str(), rewritten), ("Account/2", version), "after {tamper}");
        assert_eq!(serde_json::from_value::<Account>(state).unwrap(), whole, "after {tamper}");
    }

    // A cache too small to hold anything still decides from the log: the slot just charged is
    // refused, the next one charged.
    let uncached = self::handler(&db).await.with_state_cache_bytes(1);
    let previous = domain::HourSlot::containing(slot.start() - chrono::Duration::hours(1));
    for (slot, charged) in [(previous, false), (slot, true)] {
        let charge = charge_slot(server_id, slot);
        let result = uncached.execute::<Account>(&stream, charge, &admin()).await;
        assert_eq!(result.is_ok(), charged, "{result:?}");
    }
}
