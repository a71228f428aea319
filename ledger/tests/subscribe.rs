//! A subscriber reading `position > checkpoint` never misses or repeats an event, whatever
//! commits concurrently.

use std::collections::HashSet;
use std::time::Duration;

use ledger::testing::TestDatabase;
use ledger::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use rand::{Rng, SeedableRng};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_sees_every_event_exactly_once_in_order_while_many_writers_commit() {
    const PROCESSES: usize = 6;
    const WRITERS: usize = 48;
    const APPENDS_PER_WRITER: usize = 60;
    let db = TestDatabase::new().await;
    // Several logs stand for several processes; slow commits keep batches' transactions open
    // while other batches wait on the head and the subscriber reads.
    let config = LogConfig {
        pause_before_commit_max: Duration::from_millis(4),
        ..LogConfig::default()
    };
    let mut logs = Vec::new();
    for _ in 0..PROCESSES {
        logs.push(EventLog::open(db.pool.clone(), config.clone()).await.unwrap());
    }
    let reader_log = EventLog::open(
        db.pool.clone(),
        LogConfig {
            poll_interval: Duration::from_millis(50),
            ..config.clone()
        },
    )
    .await
    .unwrap();

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let log = logs[writer % PROCESSES].clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(writer as u64);
            let mut written = 0usize;
            for append in 0..APPENDS_PER_WRITER {
                let streams = rng.gen_range(1..=3);
                let mut request = AppendRequest::default();
                for stream in 0..streams {
                    let events = (0..rng.gen_range(1..=3))
                        .map(|n| NewEvent::new("Tick", json!({"w": writer, "a": append, "n": n})))
                        .collect::<Vec<_>>();
                    written += events.len();
                    request = request.stream(format!("w{writer}-s{stream}"), ExpectedVersion::Any, events);
                }
                log.append(request).await.expect("append");
                tokio::time::sleep(Duration::from_micros(rng.gen_range(0..3_000))).await;
            }
            written
        }));
    }

    let reader = tokio::spawn(async move {
        let mut subscription = reader_log.subscribe(0, 97);
        let mut seen = Vec::new();
        let mut idle_rounds = 0;
        // Reads until the writers are done and the log is drained (signalled by an idle period).
        loop {
            match tokio::time::timeout(Duration::from_millis(1_500), subscription.next_batch()).await {
                Ok(batch) => {
                    idle_rounds = 0;
                    seen.extend(batch.unwrap());
                }
                Err(_) => {
                    idle_rounds += 1;
                    if idle_rounds >= 2 {
                        return (seen, reader_log);
                    }
                }
            }
        }
    });

    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    let (seen, reader_log) = reader.await.unwrap();

    assert!(written > 5_000, "the test means thousands of events, wrote {written}");
    let positions: Vec<i64> = seen.iter().map(|event| event.position).collect();
    let unique: HashSet<i64> = positions.iter().copied().collect();
    assert_eq!(unique.len(), positions.len(), "no event was delivered twice");
    assert!(
        positions.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "delivered in position order without a gap"
    );
    assert_eq!(seen.len(), written, "every committed event was delivered");

    let mut full = Vec::new();
    let mut after = 0;
    loop {
        let page = reader_log.read_all(after, 1_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        full.extend(page);
    }
    assert_eq!(seen, full, "the subscriber's view equals a final full read");
}

#[tokio::test]
async fn a_subscriber_is_woken_promptly_by_an_append_from_another_process() {
    let db = TestDatabase::new().await;
    // The reader would poll only every minute: a prompt delivery must come from NOTIFY.
    let reader = EventLog::open(
        db.pool.clone(),
        LogConfig {
            poll_interval: Duration::from_secs(60),
            ..LogConfig::default()
        },
    )
    .await
    .unwrap();
    let writer = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    let mut subscription = reader.subscribe(0, 10);
    let waiting = tokio::spawn(async move { subscription.next_batch().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await; // the listener is connected by now
    writer
        .append(AppendRequest::single(
            "s",
            ExpectedVersion::Any,
            vec![NewEvent::new("E", json!({}))],
        ))
        .await
        .unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken within seconds, not after the poll interval")
        .unwrap();
    assert_eq!(batch.len(), 1);
}

#[tokio::test]
async fn a_checkpoint_moves_with_its_rows_and_never_back() {
    let db = TestDatabase::new().await;
    sqlx::query("CREATE TABLE seen (position BIGINT PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(ledger::checkpoint::load(&db.pool, "p").await.unwrap(), 0);

    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(ledger::checkpoint::lock(&mut tx, "p").await.unwrap(), 0);
    sqlx::query("INSERT INTO seen VALUES (1), (2)").execute(&mut *tx).await.unwrap();
    ledger::checkpoint::store(&mut tx, "p", 2).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        ledger::checkpoint::load(&db.pool, "p").await.unwrap(),
        0,
        "a rolled back batch moves nothing"
    );

    let mut tx = db.pool.begin().await.unwrap();
    ledger::checkpoint::lock(&mut tx, "p").await.unwrap();
    ledger::checkpoint::store(&mut tx, "p", 2).await.unwrap();
    // A second instance of the projector waits for the first.
    let pool = db.pool.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        ledger::checkpoint::lock(&mut tx, "p").await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "the second locker waits");
    tx.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), 2, "and then sees the committed position");
}

#[tokio::test]
#[should_panic(expected = "would move back")]
async fn moving_a_checkpoint_back_is_a_bug() {
    let db = TestDatabase::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    ledger::checkpoint::store(&mut tx, "p", 5).await.unwrap();
    ledger::checkpoint::store(&mut tx, "p", 4).await.unwrap();
}
