//! `billing verify` against a real log: exit 0 when untouched, non-zero naming the position when a
//! superuser changed or removed an event behind the triggers' back, and anchors.

use std::process::Output;

use ledger::testing::TestDatabase;
use ledger::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use serde_json::{json, Value};

fn billing(db: &TestDatabase, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("RUST_LOG")
        .output()
        .expect("run the billing binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn log_with_events(db: &TestDatabase, count: usize) -> EventLog {
    let log = EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap();
    for index in 0..count {
        let event = NewEvent::new("Charged", json!({"amount": format!("0.{index:06}"), "slot": index}));
        log.append(AppendRequest::single(
            format!("account-{}", index % 3),
            ExpectedVersion::Any,
            vec![event],
        ))
        .await
        .unwrap();
    }
    log
}

async fn tamper(db: &TestDatabase, statement: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let changed = sqlx::query(statement).execute(&mut *tx).await.unwrap();
    assert_eq!(changed.rows_affected(), 1, "{statement}");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn verify_passes_an_untouched_log_and_an_empty_one() {
    let db = TestDatabase::new().await;
    let output = billing(&db, &["verify"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).starts_with("ok: 0 events checked"), "{}", stdout(&output));

    log_with_events(&db, 25).await;
    let output = billing(&db, &["verify", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["events_checked"], 25);
    assert_eq!(report["head_position"], 25);
    assert!(report.get("first_bad_position").is_none());
}

#[tokio::test]
async fn verify_names_the_position_of_a_changed_payload() {
    let db = TestDatabase::new().await;
    log_with_events(&db, 30).await;
    tamper(
        &db,
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{amount}', '\"9.999999\"')::json WHERE position = 17",
    )
    .await;

    let output = billing(&db, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.starts_with("FAILED at position 17:"), "{text}");
    assert!(text.contains("changed after it was written"), "{text}");

    let report: Value = serde_json::from_str(&stdout(&billing(&db, &["verify", "--json"]))).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_bad_position"], 17);
    assert_eq!(report["events_checked"], 16);
}

#[tokio::test]
async fn verify_detects_a_changed_envelope_field_and_a_removed_event() {
    let db = TestDatabase::new().await;
    log_with_events(&db, 12).await;
    tamper(
        &db,
        "UPDATE events SET occurred_at = occurred_at - interval '1 day' WHERE position = 4",
    )
    .await;
    let report: Value = serde_json::from_str(&stdout(&billing(&db, &["verify", "--json"]))).unwrap();
    assert_eq!(report["first_bad_position"], 4);

    let db = TestDatabase::new().await;
    log_with_events(&db, 12).await;
    tamper(&db, "DELETE FROM events WHERE position = 6").await;
    let output = billing(&db, &["verify"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("position 6 is missing"), "{}", stdout(&output));

    // Removing the tail is caught by the recorded head.
    let db = TestDatabase::new().await;
    log_with_events(&db, 12).await;
    tamper(&db, "DELETE FROM events WHERE position = 12").await;
    let report: Value = serde_json::from_str(&stdout(&billing(&db, &["verify", "--json"]))).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_bad_position"], 12);
}

#[tokio::test]
async fn verify_checks_an_anchor_recorded_outside_the_database() {
    let db = TestDatabase::new().await;
    let log = log_with_events(&db, 10).await;
    let (position, hash) = log.head().await.unwrap();
    let anchor = format!("{position}:{}", hex_of(&hash));
    assert!(billing(&db, &["verify", "--anchor", &anchor]).status.success());

    let wrong = format!("{position}:{}", "00".repeat(32));
    let output = billing(&db, &["verify", "--anchor", &wrong]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("FAILED at position 10: the anchor says"),
        "{}",
        stdout(&output)
    );

    let beyond = format!("11:{}", hex_of(&hash));
    let output = billing(&db, &["verify", "--anchor", &beyond]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("the log ends at 10"), "{}", stdout(&output));

    // A malformed anchor is a usage error with a message, not a verification result.
    let output = billing(&db, &["verify", "--anchor", "ten:abc"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a whole number"), "{output:?}");
}

#[tokio::test]
async fn migrate_is_idempotent_and_verify_on_an_unmigrated_database_says_what_to_do() {
    let db = TestDatabase::new().await;
    let output = billing(&db, &["migrate"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("up to date"));

    sqlx::query("CREATE DATABASE \"verify_unmigrated_probe\"")
        .execute(&db.pool)
        .await
        .ok();
    let url = db.server.url("verify_unmigrated_probe");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .arg("verify")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    sqlx::query("DROP DATABASE IF EXISTS \"verify_unmigrated_probe\" WITH (FORCE)")
        .execute(&db.pool)
        .await
        .ok();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("run `billing migrate` first"),
        "{output:?}"
    );
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test]
async fn verify_of_a_log_that_grows_meanwhile_checks_one_snapshot() {
    let db = TestDatabase::new().await;
    let log = log_with_events(&db, 300).await;
    // A writer keeps appending while the chain is recomputed, as on a serving system.
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for index in 0..300 {
                log.append(AppendRequest::single(
                    format!("growing-{index}"),
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new("Grown", json!({"index": index}))],
                ))
                .await
                .unwrap();
            }
        })
    };
    let mut checked = Vec::new();
    while !writer.is_finished() {
        let report = ledger::verify::verify_chain(&db.pool, None, |_, _| {}).await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.events_checked as i64, report.head_position);
        checked.push(report.head_position);
    }
    writer.await.unwrap();
    assert!(checked.len() > 1, "verified while the log grew: {checked:?}");
}

#[tokio::test]
async fn a_stretch_of_the_chain_is_verified_on_its_own_and_a_missing_tail_is_not_passed_over() {
    use ledger::verify::verify_segment;
    let db = TestDatabase::new().await;
    log_with_events(&db, 40).await;
    let report = verify_segment(&db.pool, 10, 20).await.unwrap();
    assert!(report.ok && !report.cut, "{report:?}");
    assert_eq!((report.from, report.to, report.events_checked), (10, 20, 11));
    // Past the head, the stretch is cut there and says so.
    let report = verify_segment(&db.pool, 30, 90).await.unwrap();
    assert!(report.ok && report.cut && report.to == 40, "{report:?}");
    // Nonsense bounds neither panic nor check nothing silently.
    let report = verify_segment(&db.pool, i64::MAX - 3, i64::MAX).await.unwrap();
    assert!(report.cut, "{report:?}");

    // A changed event inside the stretch, and the event before it changed.
    tamper(
        &db,
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{amount}', '\"9.999999\"')::json WHERE position = 15",
    )
    .await;
    let report = verify_segment(&db.pool, 10, 20).await.unwrap();
    assert_eq!((report.ok, report.first_bad_position), (false, Some(15)), "{report:?}");
    assert!(
        verify_segment(&db.pool, 16, 20).await.unwrap().ok,
        "a stretch after it links to its stored hash"
    );
    let report = verify_segment(&db.pool, 1, 14).await.unwrap();
    assert!(report.ok, "{report:?}");

    // The last events removed: the head says the log reaches further.
    for position in [38, 39, 40] {
        tamper(&db, &format!("DELETE FROM events WHERE position = {position}")).await;
    }
    let report = verify_segment(&db.pool, 30, 40).await.unwrap();
    assert_eq!((report.ok, report.first_bad_position), (false, Some(38)), "{report:?}");
}

/// Since payloads are kept as the text hashed (`json`), verify checks the text too: text that
/// parses to the same value but reads otherwise (a key given twice, an escape) is named, while
/// jsonb's rendering of the value (as events stored before that change hold it) passes.
#[tokio::test]
async fn verify_names_an_event_whose_text_was_rewritten_to_the_same_value() {
    use ledger::verify::verify_segment;
    let db = TestDatabase::new().await;
    log_with_events(&db, 30).await;
    // jsonb's rendering of the same value: what a log migrated from jsonb holds.
    for position in 1..=12 {
        tamper(
            &db,
            &format!(
                "UPDATE events SET payload = payload::jsonb::text::json, metadata = metadata::jsonb::text::json WHERE position = {position}"
            ),
        )
        .await;
    }
    let rendered: String = sqlx::query_scalar("SELECT payload::text FROM events WHERE position = 3")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rendered, r#"{"slot": 2, "amount": "0.000002"}"#);
    let output = billing(&db, &["verify"]);
    assert!(output.status.success(), "{output:?}");
    assert!(verify_segment(&db.pool, 1, 30).await.unwrap().ok);

    // The amount given twice: the value parsed (the last wins) still hashes as stored.
    tamper(
        &db,
        r#"UPDATE events SET payload = ('{"amount":"9.999999",' || substr(payload::text, 2))::json WHERE position = 17"#,
    )
    .await;
    let output = billing(&db, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.starts_with("FAILED at position 17:"), "{text}");
    assert!(text.contains("stored as other text than was hashed"), "{text}");
    let report = verify_segment(&db.pool, 10, 20).await.unwrap();
    assert_eq!((report.ok, report.first_bad_position), (false, Some(17)), "{report:?}");
    assert_eq!(report.events_checked, 7, "{report:?}");

    // An escape in a key, earlier in the log, is found first.
    tamper(
        &db,
        r#"UPDATE events SET payload = replace(payload::text, '"amount"', '"\u0061mount"')::json WHERE position = 14"#,
    )
    .await;
    let output = billing(&db, &["verify"]);
    assert!(stdout(&output).starts_with("FAILED at position 14:"), "{}", stdout(&output));
}

/// Text that `jsonb` cannot hold (a number beyond `numeric`'s range, which `json` stores and
/// serde reads as a float) is named by its position, not left as an error of the whole check.
#[tokio::test]
async fn verify_names_an_event_whose_text_jsonb_refuses() {
    use ledger::verify::verify_segment;
    let db = TestDatabase::new().await;
    log_with_events(&db, 30).await;
    tamper(&db, "UPDATE events SET payload = payload::jsonb::text::json WHERE position = 5").await;
    tamper(
        &db,
        r#"UPDATE events SET payload = ('{"amount":1e-20000,' || substr(payload::text, 2))::json WHERE position = 20"#,
    )
    .await;
    let output = billing(&db, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.starts_with("FAILED at position 20:"), "{text}");
    assert!(text.contains("stored as other text than was hashed"), "{text}");
    let report = verify_segment(&db.pool, 1, 30).await.unwrap();
    assert_eq!((report.ok, report.first_bad_position), (false, Some(20)), "{report:?}");
}
