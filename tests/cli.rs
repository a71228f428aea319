//! The `billing` commands over a realistic history: import, verify with read models, rebuild,
//! export in both formats.

use std::process::Output;

use ledger::testing::TestDatabase;

const HISTORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/histories/march-2026.jsonl");

fn billing(db: &TestDatabase, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("RUST_LOG")
        .output()
        .expect("run billing")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn import_verify_tamper_rebuild_and_export() {
    let db = TestDatabase::new().await;
    let output = billing(&db, &["import", HISTORY]);
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains("imported 2123 events"), "{}", text(&output.stdout));

    let output = billing(&db, &["verify"]);
    assert!(output.status.success(), "{}{}", text(&output.stdout), text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.starts_with("ok: 2123 events checked"), "{stdout}");
    for name in ["balances", "statement", "servers", "invoices", "journal", "metrics"] {
        assert!(
            stdout.contains(&format!("ok: read model {name} matches a replay up to position 2123")),
            "{stdout}"
        );
    }

    // Importing the same file again stores nothing.
    let output = billing(&db, &["import", HISTORY]);
    assert!(text(&output.stdout).contains("imported 0 events"), "{}", text(&output.stdout));

    // A read-model row changed behind the projector's back is named.
    sqlx::query("UPDATE rm.servers SET status = 'running' WHERE status = 'deleted'")
        .execute(&db.pool)
        .await
        .unwrap();
    let output = billing(&db, &["verify", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let servers = report["read_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "servers")
        .unwrap();
    assert_eq!(servers["differences"].as_array().unwrap().len(), 1, "{servers}");
    assert_eq!(servers["differences"][0]["key"], "c6f8827b-56e3-5edd-8efd-622199430558");

    // A rebuild repairs it.
    let output = billing(&db, &["rebuild", "servers"]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stdout).starts_with("rebuilt servers: 2123 events to position 2123"),
        "{}",
        text(&output.stdout)
    );
    assert!(billing(&db, &["verify"]).status.success());
    let output = billing(&db, &["rebuild", "--all"]);
    assert!(output.status.success() && text(&output.stdout).lines().count() == 7, "{output:?}");

    // Bad input: a clear message and a non-zero exit.
    let output = billing(&db, &["rebuild", "ledgers"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("no read model named \"ledgers\""),
        "{}",
        text(&output.stderr)
    );
    let output = billing(&db, &["export", "--from", "yesterday"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("neither a position nor an RFC 3339 instant"),
        "{}",
        text(&output.stderr)
    );

    // Exports: JSONL lines carry positions and hashes; CSV has a header and one row per event.
    let output = billing(&db, &["export", "--from", "10", "--to", "19", "--format", "jsonl"]);
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!((lines[0]["position"].as_i64(), lines[9]["position"].as_i64()), (Some(10), Some(19)));
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"], "the chain is visible in the export");
    let output = billing(&db, &["export", "--format", "csv", "--to", "2026-01-01T00:00:00Z"]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout).trim(),
        "position,stream_id,stream_version,event_id,event_type,schema_version,payload,metadata,recorded_at,occurred_at,prev_hash,hash"
    );
    let output = billing(&db, &["export", "--format", "csv"]);
    let mut reader = csv::Reader::from_reader(output.stdout.as_slice());
    assert_eq!(reader.records().count(), 2123);
}

#[tokio::test]
async fn bill_charges_what_is_due_once_and_refuses_the_future() {
    let db = TestDatabase::new().await;
    assert!(billing(&db, &["import", HISTORY]).status.success());
    // The history billed March; the first six hours of April are due at 05:30.
    let output = billing(&db, &["bill", "--until", "2026-04-01T05:30:00Z"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'HourCharged' AND (payload->>'slot')::timestamptz >= '2026-04-01T00:00:00Z'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.servers WHERE status IN ('running', 'stopped', 'needs_setup')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(running > 0);
    assert_eq!(charged, running * 6, "six hours of every billable server");
    assert!(
        stdout.starts_with(&format!(
            "billed up to the hour starting 2026-04-01 05:00:00 UTC: {charged} slots charged, 0 declined"
        )),
        "{stdout}"
    );
    // Again: nothing more is due for those hours.
    let again = text(&billing(&db, &["bill", "--until", "2026-04-01T05:59:59Z"]).stdout);
    assert!(again.contains(": 0 slots charged"), "{again}");
    // The hours of the future are not billed.
    let future = billing(&db, &["bill", "--until", "2999-01-01T00:00:00Z"]);
    assert_eq!(future.status.code(), Some(2));
    assert!(text(&future.stderr).contains("is in the future"), "{}", text(&future.stderr));
    let verify = billing(&db, &["verify"]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
}

#[tokio::test]
async fn a_setting_that_is_set_wrong_stops_the_server_with_its_name() {
    let db = TestDatabase::new().await;
    for (name, value, says) in [
        ("PROVIDER", "", "PROVIDER is simulated or virtfusion"),
        ("BILLING_PROVIDER_ATTEMPTS", "many", "BILLING_PROVIDER_ATTEMPTS is a number"),
        ("BILLING_UNPAID_DAYS", "a week", "BILLING_UNPAID_DAYS is a number"),
        ("BILLING_BOOTSTRAP_ADMIN_TOKEN", "", "at least 16 characters"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("DATABASE_URL", db.url())
            .env(name, value)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name}={value:?}: {output:?}");
        assert!(text(&output.stderr).contains(says), "{name}={value:?}: {}", text(&output.stderr));
    }
}
