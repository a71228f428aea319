//! A cqrs-es aggregate runs in a `CqrsFramework` over the log.

use std::collections::HashMap;

use cqrs_es::persist::{PersistedEventStore, SemanticVersionEventUpcaster};
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, DomainEvent, EventEnvelope, EventStore, Query};
use ledger::cqrs::{LedgerEventRepository, LedgerEventStore};
use ledger::testing::TestDatabase;
use ledger::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Wallet {
    opened: bool,
    balance_cents: i64,
}

#[derive(Debug)]
enum WalletCommand {
    Open,
    Deposit { cents: i64 },
    Withdraw { cents: i64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum WalletEvent {
    Opened,
    Deposited { cents: i64, balance_cents: i64 },
    Withdrawn { cents: i64, balance_cents: i64 },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            WalletEvent::Opened => "Opened",
            WalletEvent::Deposited { .. } => "Deposited",
            WalletEvent::Withdrawn { .. } => "Withdrawn",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        match self {
            WalletEvent::Deposited { .. } => "2".to_string(),
            _ => "1".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum WalletError {
    #[error("the wallet is not open")]
    NotOpen,
    #[error("the wallet is already open")]
    AlreadyOpen,
    #[error("insufficient funds")]
    InsufficientFunds,
}

impl Aggregate for Wallet {
    const TYPE: &'static str = "wallet";
    type Command = WalletCommand;
    type Event = WalletEvent;
    type Error = WalletError;
    type Services = ();

    async fn handle(&mut self, command: WalletCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), WalletError> {
        match command {
            WalletCommand::Open if self.opened => return Err(WalletError::AlreadyOpen),
            WalletCommand::Open => sink.write(WalletEvent::Opened, self).await,
            _ if !self.opened => return Err(WalletError::NotOpen),
            WalletCommand::Deposit { cents } => {
                sink.write(
                    WalletEvent::Deposited {
                        cents,
                        balance_cents: self.balance_cents + cents,
                    },
                    self,
                )
                .await
            }
            WalletCommand::Withdraw { cents } if cents > self.balance_cents => return Err(WalletError::InsufficientFunds),
            WalletCommand::Withdraw { cents } => {
                sink.write(
                    WalletEvent::Withdrawn {
                        cents,
                        balance_cents: self.balance_cents - cents,
                    },
                    self,
                )
                .await
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: WalletEvent) {
        match event {
            WalletEvent::Opened => self.opened = true,
            WalletEvent::Deposited { balance_cents, .. } | WalletEvent::Withdrawn { balance_cents, .. } => {
                self.balance_cents = balance_cents
            }
        }
    }
}

/// Version 1 of `Deposited` had no balance; version 2 carries it. Old streams hold only
/// deposits, so the balance after a v1 deposit is the running sum, which the test supplies.
fn deposited_v1_to_v2() -> SemanticVersionEventUpcaster {
    SemanticVersionEventUpcaster::new(
        "Deposited",
        "2",
        Box::new(|mut payload| {
            let body = payload.get_mut("Deposited").expect("a Deposited payload");
            let cents = body["cents"].clone();
            body["balance_cents"] = body.get("balance_after_cents").cloned().unwrap_or(cents);
            payload
        }),
    )
}

struct Recorder(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Query<Wallet> for std::sync::Arc<Recorder> {
    async fn dispatch(&self, aggregate_id: &str, events: &[EventEnvelope<Wallet>]) {
        for event in events {
            self.0
                .lock()
                .unwrap()
                .push(format!("{aggregate_id}#{} {}", event.sequence, event.payload.event_type()));
        }
    }
}

#[tokio::test]
async fn an_aggregate_round_trips_through_the_log() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let store =
        PersistedEventStore::new_event_store(LedgerEventRepository::new(log.clone())).with_upcasters(vec![Box::new(deposited_v1_to_v2())]);
    let recorder = std::sync::Arc::new(Recorder(Default::default()));
    let cqrs = CqrsFramework::new(store, vec![Box::new(recorder.clone())], ());

    cqrs.execute("w1", WalletCommand::Open).await.unwrap();
    cqrs.execute("w1", WalletCommand::Deposit { cents: 2_500 }).await.unwrap();
    let mut metadata = HashMap::new();
    metadata.insert("occurred_at".to_string(), "2026-03-01T10:00:00Z".to_string());
    metadata.insert("actor".to_string(), "admin-7".to_string());
    cqrs.execute_with_metadata("w1", WalletCommand::Withdraw { cents: 1_000 }, metadata)
        .await
        .unwrap();
    match cqrs.execute("w1", WalletCommand::Withdraw { cents: 1_501 }).await {
        Err(AggregateError::UserError(WalletError::InsufficientFunds)) => {}
        other => panic!("expected insufficient funds, got {other:?}"),
    }
    assert!(matches!(
        cqrs.execute("w2", WalletCommand::Deposit { cents: 1 }).await,
        Err(AggregateError::UserError(WalletError::NotOpen))
    ));

    // The events are in the log as stream wallet-w1, versions 1..3, with the envelope filled in.
    let events = log.read_stream_all("wallet-w1").await.unwrap();
    let summary: Vec<(i64, &str, i32)> = events
        .iter()
        .map(|e| (e.stream_version, e.event_type.as_str(), e.schema_version))
        .collect();
    assert_eq!(summary, vec![(1, "Opened", 1), (2, "Deposited", 2), (3, "Withdrawn", 1)]);
    assert_eq!(events[1].payload, json!({"Deposited": {"cents": 2500, "balance_cents": 2500}}));
    assert_eq!(events[2].occurred_at.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(events[2].metadata["actor"], "admin-7");
    assert_eq!(
        recorder.0.lock().unwrap().clone(),
        vec!["w1#1 Opened", "w1#2 Deposited", "w1#3 Withdrawn"]
    );

    // A version-1 event written by an older release replays through the upcaster.
    log.append(AppendRequest::single(
        "wallet-w1",
        ExpectedVersion::Exact(3),
        vec![NewEvent::new(
            "Deposited",
            json!({"Deposited": {"cents": 100, "balance_after_cents": 1600}}),
        )],
    ))
    .await
    .unwrap();
    let store = PersistedEventStore::<_, Wallet>::new_event_store(LedgerEventRepository::new(log.clone()))
        .with_upcasters(vec![Box::new(deposited_v1_to_v2())]);
    let mut context = store.load_aggregate("w1").await.unwrap();
    let wallet = cqrs_es::AggregateContext::aggregate(&mut context);
    assert!(wallet.opened);
    assert_eq!(wallet.balance_cents, 1_600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_never_overspend_through_the_framework() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let cqrs = std::sync::Arc::new(CqrsFramework::new(
        PersistedEventStore::<_, Wallet>::new_event_store(LedgerEventRepository::new(log.clone())),
        vec![],
        (),
    ));
    twenty_withdrawals_of_300_from_1000_accept_three(cqrs, log, "w").await;
}

/// Opens wallet `id` with 1000 and sends 20 withdrawals of 300 at once, each retried on a
/// conflict: exactly three are accepted and 100 is left in the stream.
async fn twenty_withdrawals_of_300_from_1000_accept_three<ES>(
    cqrs: std::sync::Arc<CqrsFramework<Wallet, ES>>,
    log: EventLog,
    id: &'static str,
) where
    ES: EventStore<Wallet> + 'static,
    ES::AC: Send,
{
    cqrs.execute(id, WalletCommand::Open).await.unwrap();
    cqrs.execute(id, WalletCommand::Deposit { cents: 1_000 }).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cqrs = cqrs.clone();
        tasks.push(tokio::spawn(async move {
            execute_retrying(&cqrs, id, || WalletCommand::Withdraw { cents: 300 }).await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => accepted += 1,
            Err(AggregateError::UserError(WalletError::InsufficientFunds)) => {}
            Err(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(accepted, 3, "1000 affords three withdrawals of 300");
    let mut context = PersistedEventStore::<_, Wallet>::new_event_store(LedgerEventRepository::new(log))
        .load_aggregate(id)
        .await
        .unwrap();
    assert_eq!(cqrs_es::AggregateContext::aggregate(&mut context).balance_cents, 100);
}

/// Executes `command`, retrying on a version conflict as the product's command handler does.
async fn execute_retrying<ES: EventStore<Wallet>>(
    cqrs: &CqrsFramework<Wallet, ES>,
    id: &str,
    command: impl Fn() -> WalletCommand,
) -> Result<(), AggregateError<WalletError>> {
    loop {
        match cqrs.execute(id, command()).await {
            Err(AggregateError::AggregateConflict) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_caching_store_decides_on_kept_state_and_never_on_a_stale_one() {
    let db = TestDatabase::new().await;
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    // Two processes: each with its own store and the states it keeps.
    let first = CqrsFramework::new(
        LedgerEventStore::<Wallet>::new(LedgerEventRepository::new(log.clone()), 100),
        vec![],
        (),
    );
    let second = CqrsFramework::new(
        LedgerEventStore::<Wallet>::new(LedgerEventRepository::new(log.clone()), 100),
        vec![],
        (),
    );
    first.execute("w", WalletCommand::Open).await.unwrap();
    first.execute("w", WalletCommand::Deposit { cents: 1_000 }).await.unwrap();
    // The first keeps the wallet at 1000; the second spends 800 of it behind its back.
    second.execute("w", WalletCommand::Withdraw { cents: 800 }).await.unwrap();
    // Decided on the kept 1000, the append is refused by the log's version check...
    assert!(matches!(
        first.execute("w", WalletCommand::Withdraw { cents: 500 }).await,
        Err(AggregateError::AggregateConflict)
    ));
    // ...and the retry loads the stream: 200 is left, so 500 is refused and 200 accepted.
    assert!(matches!(
        execute_retrying(&first, "w", || WalletCommand::Withdraw { cents: 500 }).await,
        Err(AggregateError::UserError(WalletError::InsufficientFunds))
    ));
    execute_retrying(&first, "w", || WalletCommand::Withdraw { cents: 200 })
        .await
        .unwrap();
    let mut context = PersistedEventStore::<_, Wallet>::new_event_store(LedgerEventRepository::new(log.clone()))
        .load_aggregate("w")
        .await
        .unwrap();
    assert_eq!(cqrs_es::AggregateContext::aggregate(&mut context).balance_cents, 0);

    // Many commands at once on one wallet through one caching store: never more than it holds.
    let shared = std::sync::Arc::new(CqrsFramework::new(
        LedgerEventStore::<Wallet>::new(LedgerEventRepository::new(log.clone()), 100),
        vec![],
        (),
    ));
    twenty_withdrawals_of_300_from_1000_accept_three(shared, log, "v").await;
}
