//! Appending: optimistic concurrency, atomic multi-stream appends, duplicates, append-only.

use std::sync::Arc;

use ledger::testing::TestDatabase;
use ledger::{AppendError, AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

async fn open(db: &TestDatabase) -> EventLog {
    EventLog::open(db.pool.clone(), LogConfig::default()).await.expect("open the log")
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_writers_one_stream_exactly_one_wins_each_version() {
    const WRITERS: usize = 32;
    const ROUNDS: i64 = 40;
    let db = TestDatabase::new().await;
    // Writers spread over four logs, as if in four processes, so batches also race on the head lock.
    let mut logs = Vec::new();
    for _ in 0..4 {
        logs.push(open(&db).await);
    }
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let log = logs[writer % logs.len()].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for version in 0..ROUNDS {
                barrier.wait().await;
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let event = NewEvent::new("Incremented", json!({"writer": writer, "round": version}));
                match log.append(AppendRequest::single("counter-1", expected, vec![event])).await {
                    Ok(outcome) => {
                        assert!(!outcome.duplicate);
                        wins.push(version);
                    }
                    Err(AppendError::Conflict(conflict)) => {
                        assert_eq!(conflict.stream_id, "counter-1");
                        assert_eq!(conflict.expected, expected);
                        assert_eq!(conflict.actual, version + 1, "a loser sees the winner's version");
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            wins
        }));
    }
    let mut winners_per_round = vec![0; ROUNDS as usize];
    for task in tasks {
        for version in task.await.unwrap() {
            winners_per_round[version as usize] += 1;
        }
    }
    assert!(
        winners_per_round.iter().all(|winners| *winners == 1),
        "winners per round: {winners_per_round:?}"
    );
    let events = logs[0].read_stream_all("counter-1").await.unwrap();
    let versions: Vec<i64> = events.iter().map(|event| event.stream_version).collect();
    assert_eq!(versions, (1..=ROUNDS).collect::<Vec<_>>(), "the stream is contiguous");
    let positions: Vec<i64> = events.iter().map(|event| event.position).collect();
    assert_eq!(positions, (1..=ROUNDS).collect::<Vec<_>>(), "no position was burnt by a loser");
}

#[tokio::test]
async fn a_multi_stream_append_with_one_stale_version_stores_nothing() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    log.append(AppendRequest::single(
        "b",
        ExpectedVersion::NoStream,
        vec![NewEvent::new("Opened", json!({}))],
    ))
    .await
    .unwrap();
    let head_before = log.head().await.unwrap();

    let request = AppendRequest::default()
        .stream(
            "a",
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("Opened", json!({})),
                NewEvent::new("Credited", json!({"amount": "5.00"})),
            ],
        )
        .stream(
            "b",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Debited", json!({"amount": "5.00"}))],
        )
        .stream("c", ExpectedVersion::Any, vec![NewEvent::new("Opened", json!({}))]);
    match log.append(request).await {
        Err(AppendError::Conflict(conflict)) => {
            assert_eq!(conflict.stream_id, "b");
            assert_eq!(conflict.expected, ExpectedVersion::NoStream);
            assert_eq!(conflict.actual, 1);
            assert_eq!(conflict.to_string(), "stream b expected no stream, is at version 1");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);
    assert_eq!(log.stream_version("a").await.unwrap(), 0);
    assert_eq!(log.stream_version("c").await.unwrap(), 0);
    assert_eq!(log.head().await.unwrap(), head_before, "the head did not move");

    // The same append with the right version is stored whole, in order, atomically.
    let request = AppendRequest::default()
        .stream(
            "a",
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("Opened", json!({})),
                NewEvent::new("Credited", json!({"amount": "5.00"})),
            ],
        )
        .stream(
            "b",
            ExpectedVersion::Exact(1),
            vec![NewEvent::new("Debited", json!({"amount": "5.00"}))],
        );
    let outcome = log.append(request).await.unwrap();
    assert_eq!((outcome.first_position, outcome.last_position), (2, 4));
    assert_eq!(log.stream_version("a").await.unwrap(), 2);
    assert_eq!(log.stream_version("b").await.unwrap(), 2);
}

#[tokio::test]
async fn a_duplicate_event_id_is_stored_once_and_reported() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let event = NewEvent::new("TopUpSettled", json!({"amount": "25.00"}));
    let request = AppendRequest::single("account-1", ExpectedVersion::NoStream, vec![event.clone()]);
    let first = log.append(request.clone()).await.unwrap();
    assert!(!first.duplicate);
    // A retry with the same expected version (now stale) is still recognised as the same append.
    let retry = log.append(request).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.first_position, retry.last_position),
        (first.first_position, first.last_position)
    );
    // The same id under another stream is also the same event.
    let elsewhere = log
        .append(AppendRequest::single("account-2", ExpectedVersion::Any, vec![event.clone()]))
        .await
        .unwrap();
    assert!(elsewhere.duplicate);
    // Under a new stream whose check holds: only the unique index can tell, and still the answer
    // is the stored event.
    let new_stream = log
        .append(AppendRequest::single("account-3", ExpectedVersion::NoStream, vec![event.clone()]))
        .await
        .unwrap();
    assert!(new_stream.duplicate);
    assert_eq!(new_stream.first_position, first.first_position);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);

    // Some stored, some new: refused whole, nothing stored.
    let fresh = NewEvent::new("TopUpSettled", json!({"amount": "1.00"}));
    match log
        .append(AppendRequest::single("account-1", ExpectedVersion::Any, vec![fresh, event.clone()]))
        .await
    {
        Err(AppendError::PartialDuplicate { stored_event_ids }) => {
            assert_eq!(stored_event_ids, vec![event.event_id])
        }
        other => panic!("expected a partial duplicate, got {other:?}"),
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_event_store_it_once() {
    let db = TestDatabase::new().await;
    let logs = [open(&db).await, open(&db).await];
    let event_id = Uuid::new_v4();
    let mut tasks = Vec::new();
    for attempt in 0..20 {
        let log = logs[attempt % 2].clone();
        tasks.push(tokio::spawn(async move {
            let event = NewEvent::new("WebhookReceived", json!({"id": "evt_1"})).with_id(event_id);
            log.append(AppendRequest::single("webhooks", ExpectedVersion::Any, vec![event]))
                .await
                .unwrap()
        }));
    }
    let mut stored = 0;
    for task in tasks {
        if !task.await.unwrap().duplicate {
            stored += 1;
        }
    }
    assert_eq!(stored, 1, "exactly one attempt stored the event");
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);
}

#[tokio::test]
async fn bad_appends_are_refused_with_a_reason() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let cases = [
        (AppendRequest::default(), "at least one event"),
        (
            AppendRequest::single("", ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))]),
            "stream id",
        ),
        (
            AppendRequest::single("s", ExpectedVersion::Any, vec![NewEvent::new("", json!({}))]),
            "event type",
        ),
        (
            AppendRequest::single("s", ExpectedVersion::Exact(-1), vec![NewEvent::new("E", json!({}))]),
            "negative",
        ),
        (
            AppendRequest::single(
                "s",
                ExpectedVersion::Any,
                vec![NewEvent::new("E", json!({})).with_schema_version(0)],
            ),
            "schema version",
        ),
        (
            AppendRequest::single(
                "s",
                ExpectedVersion::Any,
                vec![NewEvent::new("E", json!({})).with_metadata(json!([1]))],
            ),
            "metadata",
        ),
        (
            AppendRequest::default()
                .stream("s", ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
                .stream("s", ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))]),
            "appears twice",
        ),
    ];
    for (request, reason) in cases {
        match log.append(request).await {
            Err(AppendError::Invalid(message)) => assert!(message.contains(reason), "{message:?} should mention {reason:?}"),
            other => panic!("expected an invalid append ({reason}), got {other:?}"),
        }
    }
    let id = Uuid::new_v4();
    let twice = vec![NewEvent::new("E", json!({})).with_id(id), NewEvent::new("E", json!({})).with_id(id)];
    assert!(matches!(
        log.append(AppendRequest::single("s", ExpectedVersion::Any, twice)).await,
        Err(AppendError::Invalid(_))
    ));
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_database_refuses_does_not_sink_its_batch() {
    let db = TestDatabase::new().await;
    // Something only the database refuses: a trigger of this test's own, for one stream.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_s17() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse_s17 BEFORE INSERT ON events FOR EACH ROW \
         WHEN (NEW.stream_id = 's-17') EXECUTE FUNCTION refuse_s17();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let log = open(&db).await;
    let mut tasks = Vec::new();
    for index in 0..50 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(AppendRequest::single(
                format!("s-{index}"),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({"index": index}))],
            ))
            .await
        }));
    }
    let mut refused = 0;
    for (index, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => assert_ne!(index, 17),
            Err(AppendError::Database(_)) => {
                assert_eq!(index, 17);
                refused += 1;
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!(refused, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 49);
    assert_eq!(
        count(&db, "SELECT max(position) FROM events").await,
        49,
        "positions stay contiguous"
    );
}

#[tokio::test]
async fn the_events_table_refuses_update_delete_and_truncate_even_for_a_superuser() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    log.append(AppendRequest::single(
        "s",
        ExpectedVersion::NoStream,
        vec![NewEvent::new("E", json!({"a": 1}))],
    ))
    .await
    .unwrap();
    let is_superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(is_superuser, "this test means to show that even a superuser is refused");
    for statement in [
        "UPDATE events SET payload = '{\"a\": 2}'",
        "DELETE FROM events",
        "DELETE FROM events WHERE position = 999",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement).execute(&db.pool).await.expect_err(statement);
        let message = error.to_string();
        assert!(message.contains("append-only"), "{statement}: {message}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);

    // The application role may read and append, and nothing else.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE billing_app").execute(&mut *tx).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(rows, 1);
    let error = sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only")
        .execute(&mut *tx)
        .await
        .expect_err("not the owner");
    assert!(error.to_string().contains("must be owner"), "{error}");
}

#[tokio::test]
async fn a_stream_without_events_guards_an_append_by_its_version() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let event = |kind: &str| NewEvent::new(kind, json!({}));
    log.append(AppendRequest::single("server-1", ExpectedVersion::NoStream, vec![event("Ordered")]))
        .await
        .unwrap();
    // Decided while server-1 was at version 1: stored, and server-1 gains nothing.
    let guarded = AppendRequest::single("account-1", ExpectedVersion::NoStream, vec![event("Charged")]).stream(
        "server-1",
        ExpectedVersion::Exact(1),
        vec![],
    );
    log.append(guarded).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM events WHERE stream_id = 'server-1'").await, 1);
    // server-1 moves on; an append that read it at version 1 is refused whole.
    log.append(AppendRequest::single(
        "server-1",
        ExpectedVersion::Exact(1),
        vec![event("Cancelled")],
    ))
    .await
    .unwrap();
    let stale = AppendRequest::single("account-1", ExpectedVersion::Exact(1), vec![event("Charged")]).stream(
        "server-1",
        ExpectedVersion::Exact(1),
        vec![],
    );
    match log.append(stale).await {
        Err(AppendError::Conflict(conflict)) => assert_eq!((conflict.stream_id.as_str(), conflict.actual), ("server-1", 2)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events WHERE stream_id = 'account-1'").await, 1);
    // A guard that checks nothing, or an append of guards alone, is refused as malformed.
    let unchecked = AppendRequest::single("account-1", ExpectedVersion::Exact(1), vec![event("Charged")]).stream(
        "server-1",
        ExpectedVersion::Any,
        vec![],
    );
    assert!(matches!(log.append(unchecked).await, Err(AppendError::Invalid(_))));
    let guards_only = AppendRequest::single("server-1", ExpectedVersion::Exact(2), vec![]);
    assert!(matches!(log.append(guards_only).await, Err(AppendError::Invalid(_))));
}

/// A payload as the domain's events are: a struct with an internally tagged enum, decimals as
/// strings, options, floats and a map, written by `Json::of` without a `Value`.
#[derive(serde::Serialize)]
struct Typed {
    zeta: usize,
    text: String,
    amount: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<u8>,
    missing: Option<u8>,
    ratio: f64,
    kind: Kind,
    by_number: std::collections::HashMap<u32, Vec<Kind>>,
}

#[derive(serde::Serialize)]
#[serde(tag = "type")]
enum Kind {
    Plain { b: bool, a: i64 },
    Other,
}

impl Typed {
    fn new(index: usize, text: String, n: usize) -> Typed {
        Typed {
            zeta: index,
            text,
            amount: "-0.000001",
            skipped: None,
            missing: None,
            ratio: 0.5,
            kind: Kind::Plain {
                b: n % 2 == 0,
                a: -(index as i64),
            },
            by_number: [(10, vec![Kind::Other]), (9, vec![]), (100, vec![Kind::Plain { b: true, a: 1 }])].into(),
        }
    }
}

/// The rows go to PostgreSQL in `COPY`'s binary form, in chunks: every field of every event must
/// read back exactly as appended, across chunk boundaries, and the chain must verify.
#[tokio::test]
async fn every_field_reads_back_as_appended_across_copy_chunks() {
    use chrono::DateTime;
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let instant = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
    let occurred = [
        instant("1999-12-31T23:59:59.999999Z"),
        instant("2000-01-01T00:00:00Z"),
        instant("2026-11-30T10:11:12.345678Z"),
        instant("2199-06-01T00:00:00.000001Z"),
    ];
    // 3 requests of 2,500 events over 2 streams each: about 2.5 MB of rows, many chunks.
    let mut requests = Vec::new();
    for request in 0..3 {
        let mut append = AppendRequest::default();
        for stream in 0..2 {
            let events = (0..1_250)
                .map(|n| {
                    let index = request * 10_000 + stream * 1_250 + n;
                    let text = format!("quote \" backslash \\ newline \n tab \t ünïcødé 日本 🦀 {index}");
                    // Half the payloads as JSON values, half written canonically from typed values.
                    let payload: ledger::Json = if index % 2 == 0 {
                        json!({
                            "index": index,
                            "text": text,
                            "amount": "12345678901234567890.123456",
                            "nested": {"z": [1, 2.5, null, true], "a": {"deep": "x".repeat(n % 40)}},
                        })
                        .into()
                    } else {
                        ledger::Json::of(&Typed::new(index, text, n)).unwrap()
                    };
                    NewEvent::new(format!("Typé-{}", index % 3), payload)
                        .with_metadata(json!({"request_id": format!("r-{request}"), "idempotency_key": format!("k-{index}")}))
                        .with_schema_version(1 + (index % 5) as i32)
                        .occurred_at(occurred[index % occurred.len()])
                })
                .collect();
            append = append.stream(format!("strëam-{request}-{stream}"), ExpectedVersion::NoStream, events);
        }
        requests.push(append);
    }
    let appends: Vec<_> = requests.iter().cloned().map(|request| log.append(request)).collect();
    for outcome in futures::future::join_all(appends).await {
        outcome.expect("append");
    }
    let mut stored = Vec::new();
    while stored.len() < 7_500 {
        let after = stored.last().map(|event: &ledger::RecordedEvent| event.position).unwrap_or(0);
        let page = log.read_all(after, 10_000).await.unwrap();
        assert!(!page.is_empty(), "read {} of 7,500 events", stored.len());
        stored.extend(page);
    }
    assert_eq!(stored.len(), 7_500);
    let mut by_id = std::collections::HashMap::new();
    for event in &stored {
        by_id.insert(event.event_id, event);
    }
    for request in &requests {
        for stream in &request.streams {
            for (version, event) in (1..).zip(&stream.events) {
                let read = by_id.get(&event.event_id).expect("every event stored");
                assert_eq!(read.stream_id, stream.stream_id);
                assert_eq!(read.stream_version, version);
                assert_eq!(read.event_type, event.event_type);
                assert_eq!(read.schema_version, event.schema_version);
                assert_eq!(event.payload, read.payload);
                assert_eq!(event.metadata, read.metadata);
                assert_eq!(read.occurred_at, event.occurred_at.unwrap());
            }
        }
    }
    let positions: Vec<i64> = stored.iter().map(|event| event.position).collect();
    assert_eq!(positions, (1..=7_500).collect::<Vec<i64>>(), "positions gapless and in order");
    assert!(
        stored.windows(2).all(|pair| pair[0].recorded_at <= pair[1].recorded_at),
        "recorded_at never goes back along the log"
    );
    let report = ledger::verify::verify_chain(&db.pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
    // The partial index on idempotency keys took every row's key.
    assert_eq!(
        count(&db, "SELECT count(*) FROM events WHERE metadata->>'idempotency_key' LIKE 'k-%'").await,
        7_500
    );
}

/// Retries of stored appends batched with new ones: the unique index refuses the batch's first
/// attempt, the batch is decided again with every id looked up, and each request gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_batched_with_new_appends_are_duplicates_and_the_new_ones_are_stored() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let stored: Vec<AppendRequest> = (0..50)
        .map(|index| {
            AppendRequest::single(
                format!("old-{index}"),
                ExpectedVersion::Any,
                vec![NewEvent::new("E", json!({"index": index}))],
            )
        })
        .collect();
    let mut first_positions = Vec::new();
    for request in &stored {
        first_positions.push(log.append(request.clone()).await.unwrap().first_position);
    }
    let mut tasks = Vec::new();
    for index in 0..200 {
        let log = log.clone();
        let request = if index % 4 == 0 {
            // Any version, so only the index knows it is a retry; or an exact (stale) version.
            let mut retry = stored[index / 4].clone();
            if index % 8 == 0 {
                retry.streams[0].expected = ExpectedVersion::Exact(0);
            }
            retry
        } else {
            AppendRequest::single(
                format!("new-{index}"),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({"index": index}))],
            )
        };
        tasks.push(tokio::spawn(async move { log.append(request).await }));
    }
    for (index, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap().expect("every request answered");
        if index % 4 == 0 {
            assert!(outcome.duplicate, "request {index} is a retry");
            assert_eq!(outcome.first_position, first_positions[index / 4]);
        } else {
            assert!(!outcome.duplicate, "request {index} is new");
        }
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 50 + 150);
    assert_eq!(
        count(&db, "SELECT max(position) FROM events").await,
        200,
        "positions stay contiguous"
    );
    let report = ledger::verify::verify_chain(&db.pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
}

/// The product's connections compile no query to machine code: its set-wise reads (a billing
/// batch's wallets and servers) pass PostgreSQL's `jit_above_cost` and would spend far longer
/// compiling than running.
#[tokio::test]
async fn the_products_connections_run_without_jit() {
    let db = TestDatabase::new().await;
    let jit: String = sqlx::query_scalar("SHOW jit").fetch_one(&db.pool).await.unwrap();
    assert_eq!(jit, "off");
    let options = ledger::database::session_settings(sqlx::postgres::PgConnectOptions::new());
    assert!(
        options.get_options().is_some_and(|options| options.contains("jit=off")),
        "{:?}",
        options.get_options()
    );
}

/// The head a read of `stream_id` reported, with the version it read.
async fn read_at(log: &EventLog, stream_id: &str) -> (i64, ledger::SeenAt) {
    let mut version = 0;
    let seen_at = log
        .read_streams_each::<sqlx::Error>(&[(stream_id.to_string(), 0)], |event| {
            version = event.stream_version;
            Ok(())
        })
        .await
        .unwrap();
    (version, seen_at)
}

/// An append that says at which head its versions were read (`StreamAppend::seen_at`) is not
/// looked up again only while the writer knows nothing touched those streams since: a stream that
/// this process or another appended to after the read is still a conflict, guard or not, and one
/// that nobody touched goes through.
#[tokio::test]
async fn a_version_read_at_a_head_is_trusted_only_while_nothing_touched_the_stream() {
    use ledger::StreamAppend;
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let other_process = open(&db).await;
    let event = |kind: &str| NewEvent::new(kind, json!({}));
    for stream in ["server-1", "server-2", "account-1"] {
        log.append(AppendRequest::single(stream, ExpectedVersion::NoStream, vec![event("Opened")]))
            .await
            .unwrap();
    }
    let guarded = |version: i64, seen_at: ledger::SeenAt, server: &str| AppendRequest {
        streams: vec![
            StreamAppend::new("account-1", ExpectedVersion::Any, vec![event("Charged")]),
            StreamAppend::new(server, ExpectedVersion::Exact(version), vec![]).seen_at(seen_at),
        ],
    };

    // Read, then this process appends to other streams: the guard holds without a lookup.
    let (version, seen_at) = read_at(&log, "server-1").await;
    log.append(AppendRequest::single("server-2", ExpectedVersion::Exact(1), vec![event("Renamed")]))
        .await
        .unwrap();
    log.append(guarded(version, seen_at, "server-1")).await.unwrap();

    // Read, then this process appends to the stream itself: a conflict.
    let (version, seen_at) = read_at(&log, "server-1").await;
    log.append(AppendRequest::single("server-1", ExpectedVersion::Exact(1), vec![event("Resized")]))
        .await
        .unwrap();
    match log.append(guarded(version, seen_at, "server-1")).await {
        Err(AppendError::Conflict(conflict)) => assert_eq!((conflict.stream_id.as_str(), conflict.actual), ("server-1", 2)),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // Read, then another process appends to the stream: a conflict, though this writer never saw it.
    let (version, seen_at) = read_at(&log, "server-2").await;
    other_process
        .append(AppendRequest::single(
            "server-2",
            ExpectedVersion::Exact(2),
            vec![event("Cancelled")],
        ))
        .await
        .unwrap();
    match log.append(guarded(version, seen_at, "server-2")).await {
        Err(AppendError::Conflict(conflict)) => assert_eq!((conflict.stream_id.as_str(), conflict.actual), ("server-2", 3)),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // Read, then another process appends elsewhere: looked up, and it holds.
    let (version, seen_at) = read_at(&log, "server-2").await;
    other_process
        .append(AppendRequest::single("server-3", ExpectedVersion::NoStream, vec![event("Opened")]))
        .await
        .unwrap();
    log.append(guarded(version, seen_at, "server-2")).await.unwrap();

    // Events appended after a read that said so land at the next versions, contiguous.
    let (version, seen_at) = read_at(&log, "server-2").await;
    log.append(AppendRequest {
        streams: vec![StreamAppend::new("server-2", ExpectedVersion::Exact(version), vec![event("Renamed")]).seen_at(seen_at)],
    })
    .await
    .unwrap();
    let versions: Vec<i64> = log
        .read_stream_all("server-2")
        .await
        .unwrap()
        .iter()
        .map(|event| event.stream_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert_eq!(count(&db, "SELECT count(*) FROM events WHERE stream_id = 'account-1'").await, 3);
    let report = ledger::verify::verify_chain(&db.pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
}

/// A read asked to go on from a version its stream does not have (the reader holds more of the
/// stream than the log does) fails, rather than report a head for a version it never read.
#[tokio::test]
async fn a_read_asked_to_go_on_from_a_version_the_stream_lacks_fails() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    for _ in 0..3 {
        let version = log.stream_version("server-1").await.unwrap();
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        log.append(AppendRequest::single(
            "server-1",
            expected,
            vec![NewEvent::new("Renamed", json!({}))],
        ))
        .await
        .unwrap();
    }
    let mut read = Vec::new();
    log.read_streams_each::<sqlx::Error>(&[("server-1".into(), 2), ("server-2".into(), 0)], |event| {
        read.push(event.stream_version);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(read, vec![3]);
    let error = log
        .read_streams_each::<sqlx::Error>(&[("server-2".into(), 0), ("server-1".into(), 5)], |_| Ok(()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("stream server-1 has no version 5"), "{error}");
}

/// An append's outcome says at which head the streams it wrote stand at the versions it left
/// them; an append that says so is a conflict once the stream moved on, and goes through
/// while it has not.
#[tokio::test]
async fn an_appends_outcome_vouches_for_the_versions_it_left_until_they_move() {
    use ledger::StreamAppend;
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    let event = || NewEvent::new("Renamed", json!({}));
    let outcome = log
        .append(AppendRequest::single("server-1", ExpectedVersion::NoStream, vec![event()]))
        .await
        .unwrap();
    let seen_at = outcome.seen_at.expect("a lone append's streams stand at its batch's head");
    assert_eq!(seen_at.position(), outcome.last_position);
    let after = |version: i64, seen_at: ledger::SeenAt| AppendRequest {
        streams: vec![StreamAppend::new("server-1", ExpectedVersion::Exact(version), vec![event()]).seen_at(seen_at)],
    };
    let outcome = log.append(after(1, seen_at)).await.unwrap();
    let seen_at = outcome.seen_at.unwrap();
    log.append(AppendRequest::single("server-1", ExpectedVersion::Exact(2), vec![event()]))
        .await
        .unwrap();
    match log.append(after(2, seen_at)).await {
        Err(AppendError::Conflict(conflict)) => assert_eq!(conflict.actual, 3),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let versions: Vec<i64> = log
        .read_stream_all("server-1")
        .await
        .unwrap()
        .iter()
        .map(|event| event.stream_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_nul_character_is_refused_before_the_database_and_a_backslash_u0000_text_is_not() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    for (stream, payload, metadata) in [
        ("nul-payload", json!({"text": "nul\u{0000}here"}), json!({})),
        ("nul-metadata", json!({}), json!({"actor": "a\u{0000}"})),
        ("nul-key", json!({"k\u{0000}": 1}), json!({})),
    ] {
        let refused = log
            .append(AppendRequest::single(
                stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", payload).with_metadata(metadata)],
            ))
            .await;
        match refused {
            Err(AppendError::Invalid(message)) => assert!(message.contains("NUL"), "{message}"),
            other => panic!("{stream}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 0);
    // The six characters `\u0000` are text like any other, stored and read back by `->>`.
    log.append(AppendRequest::single(
        "text",
        ExpectedVersion::NoStream,
        vec![NewEvent::new("E", json!({"text": "\\u0000"}))],
    ))
    .await
    .unwrap();
    let text: String = sqlx::query_scalar("SELECT payload->>'text' FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(text, "\\u0000");
}

/// A log written before payloads and metadata were kept as `json` (migration 0017 converts them
/// from `jsonb` in place): its events read back as they were, every hash still verifies, and
/// appends go on after them.
#[tokio::test]
async fn a_log_stored_as_jsonb_reads_back_and_verifies_after_its_columns_become_json() {
    use ledger::chain::{Envelope, GENESIS_HASH};
    use sqlx::Connection;

    let db = TestDatabase::new().await;
    let name = format!("billing_upgrade_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect_with(&db.server.options("postgres")).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
    let pool = sqlx::PgPool::connect_with(db.server.options(&name)).await.unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(ledger::MIGRATOR.migrations.iter().filter(|m| m.version < 17).cloned().collect()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();

    // Five events as the log stored them then: the canonical text hashed, the value kept as jsonb.
    let at = chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456Z")
        .unwrap()
        .to_utc();
    let mut prev_hash = GENESIS_HASH;
    let mut scratch = Vec::new();
    for position in 1..=5i64 {
        let payload = format!(r#"{{"amount":"1.50","nested":{{"b":[1,2.5,"x"],"a":null}},"n":{position}}}"#);
        let payload = ledger::chain::canonical_json(&serde_json::from_str(&payload).unwrap());
        let metadata = r#"{"actor_id":"before","actor_kind":"system"}"#;
        let event_id = Uuid::new_v4();
        let hash = Envelope {
            position,
            stream_id: "s-old",
            stream_version: position,
            event_id,
            event_type: "E",
            schema_version: 1,
            payload_json: &payload,
            metadata_json: metadata,
            recorded_at: at,
            occurred_at: at,
        }
        .hash(&prev_hash, &mut scratch);
        sqlx::query(
            "INSERT INTO events (position, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata, \
             recorded_at, occurred_at, prev_hash, hash) VALUES ($1, 's-old', $1, $2, 'E', 1, $3::jsonb, $4::jsonb, $5, $5, $6, $7)",
        )
        .bind(position)
        .bind(event_id)
        .bind(&payload)
        .bind(metadata)
        .bind(at)
        .bind(&prev_hash[..])
        .bind(&hash[..])
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("UPDATE ledger_head SET position = $1, hash = $2")
            .bind(position)
            .bind(&hash[..])
            .execute(&pool)
            .await
            .unwrap();
        prev_hash = hash;
    }

    ledger::MIGRATOR.run(&pool).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT payload::text FROM events WHERE position = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stored.contains("\": "), "the stored text keeps jsonb's rendering: {stored}");
    let report = ledger::verify::verify_chain(&pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok && report.events_checked == 5, "{report:?}");

    let log = EventLog::open(pool.clone(), LogConfig::default()).await.unwrap();
    let read = log.read_stream("s-old", 0, 10).await.unwrap();
    assert_eq!(read.len(), 5);
    assert_eq!(
        read[2].payload,
        json!({"amount": "1.50", "nested": {"a": null, "b": [1, 2.5, "x"]}, "n": 3})
    );
    log.append(AppendRequest::single(
        "s-old",
        ExpectedVersion::Exact(5),
        vec![NewEvent::new("E", json!({"amount": "2.00", "n": 6}))],
    ))
    .await
    .unwrap();
    let stored: String = sqlx::query_scalar("SELECT payload::text FROM events WHERE position = 6")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        stored, r#"{"amount":"2.00","n":6}"#,
        "new events are stored as the canonical text hashed"
    );
    let report = ledger::verify::verify_chain(&pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok && report.events_checked == 6, "{report:?}");

    drop(log);
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Small batches are written by one `INSERT`, large ones by `COPY`: rows written either way are
/// the same fields as appended, chain on from each other and verify.
#[tokio::test]
async fn rows_written_by_insert_and_by_copy_are_the_events_appended_and_chain_on() {
    let db = TestDatabase::new().await;
    let log = open(&db).await;
    use chrono::SubsecRound;
    let occurred = chrono::DateTime::parse_from_rfc3339("2026-05-01T08:30:00.1234567Z")
        .unwrap()
        .to_utc();
    let events = |count: usize, tag: &str| -> Vec<NewEvent> {
        (0..count)
            .map(|index| {
                NewEvent::new("E", json!({"tag": tag, "index": index, "text": "ü \"q\" \\ /"}))
                    .with_schema_version(2)
                    .with_metadata(json!({"idempotency_key": format!("{tag}-{index}")}))
                    .occurred_at(occurred)
            })
            .collect()
    };
    // One event (INSERT), 300 (COPY), 40 over two streams (INSERT), 300 again (COPY).
    for (stream, count, tag) in [("a", 1, "one"), ("b", 300, "copy"), ("c", 40, "insert"), ("d", 300, "copy2")] {
        let mut appended = events(count, tag);
        let streams = if stream == "c" {
            let rest = appended.split_off(count / 2);
            vec![
                ledger::StreamAppend::new("c1", ExpectedVersion::NoStream, appended),
                ledger::StreamAppend::new("c2", ExpectedVersion::NoStream, rest),
            ]
        } else {
            vec![ledger::StreamAppend::new(stream, ExpectedVersion::NoStream, appended)]
        };
        log.append(AppendRequest { streams }).await.unwrap();
    }
    let rows: Vec<(i64, String, i64, i32, String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT position, stream_id, stream_version, schema_version, payload::text, metadata::text, occurred_at FROM events ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 641);
    for (index, (position, stream_id, version, schema_version, payload, metadata, occurred_at)) in rows.iter().enumerate() {
        assert_eq!(*position, index as i64 + 1);
        assert_eq!(*schema_version, 2);
        assert_eq!(*occurred_at, occurred.trunc_subsecs(6));
        let (tag, at) = match stream_id.as_str() {
            "a" => ("one", version - 1),
            "b" => ("copy", version - 1),
            "c1" => ("insert", version - 1),
            "c2" => ("insert", version - 1 + 20),
            "d" => ("copy2", version - 1),
            other => panic!("stream {other}"),
        };
        assert_eq!(
            *payload,
            format!(r#"{{"index":{at},"tag":"{tag}","text":"ü \"q\" \\ /"}}"#),
            "position {position}"
        );
        assert_eq!(*metadata, format!(r#"{{"idempotency_key":"{tag}-{at}"}}"#));
    }
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE metadata->>'idempotency_key' = 'insert-25'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(found, 1);
    let report = ledger::verify::verify_chain(&db.pool, None, |_, _| {}).await.unwrap();
    assert!(report.ok && report.events_checked == 641, "{report:?}");
}
