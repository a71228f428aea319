//! Faults, against the real binary and a real PostgreSQL: the database going away and coming back,
//! and `kill -9` of the process in the middle of a provider call, of webhook processing and of a
//! billing run. Whatever was acknowledged exists exactly once afterwards; holds end captured or
//! released once; the read models catch up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::testing::TestDatabase;
use serde_json::{json, Value};
use sqlx::Connection;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod support;

const ADMIN: &str = "bootstrap-admin-token-for-tests";
const SECRET: &str = "whsec_fault_tests";

fn serve(db: &TestDatabase, envs: &[(&str, Option<&str>)]) -> support::Server {
    let mut all = vec![
        ("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)),
        ("STRIPE_WEBHOOK_SECRET", Some(SECRET)),
    ];
    all.extend_from_slice(envs);
    support::start(db, &["serve", "--dev", "--bind", "127.0.0.1:0"], &all).0
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

/// Closes the test database to connections and ends every session on it, or opens it again.
async fn database_reachable(db: &TestDatabase, reachable: bool) {
    let mut admin = sqlx::PgConnection::connect_with(&db.server.options("postgres")).await.unwrap();
    let name = ledger::database::quote_identifier(&db.name);
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {reachable}"))
        .execute(&mut admin)
        .await
        .unwrap();
    if !reachable {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&db.name)
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

async fn call(client: &reqwest::Client, method: reqwest::Method, url: String, token: &str, body: Option<Value>) -> (u16, String, Value) {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_database_that_goes_away_is_a_fast_503_and_the_service_comes_back_by_itself() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[]);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, _) = support::customer(&base, ADMIN, "USD", "US").await;
    let adjust = |amount: &str| {
        call(
            &client,
            reqwest::Method::POST,
            format!("{base}/v1/admin/accounts/{account}/adjustments"),
            ADMIN,
            Some(json!({"amount": amount, "reason": "fault"})),
        )
    };
    assert_eq!(adjust("1.00").await.0, 201);

    // Load throughout: four clients crediting 0.01 at a time, before, during and after the outage.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, base, account, stop) = (client.clone(), base.clone(), account.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut acknowledged, mut unavailable, mut slowest) = (Vec::new(), 0, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let (status, _, body) = call(
                    &client,
                    reqwest::Method::POST,
                    format!("{base}/v1/admin/accounts/{account}/adjustments"),
                    ADMIN,
                    Some(json!({"amount": "0.01", "reason": "load"})),
                )
                .await;
                slowest = slowest.max(started.elapsed());
                match status {
                    201 => acknowledged.push(body["adjustment_id"].as_str().unwrap().to_string()),
                    503 => unavailable += 1,
                    other => panic!("under load the service answered {other}: {body}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, unavailable, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    database_reachable(&db, false).await;
    let cut = Instant::now();
    let checks: Vec<(&str, reqwest::Method, String, Option<Value>)> = vec![
        (
            "a read",
            reqwest::Method::GET,
            format!("{base}/v1/accounts/{account}/transactions"),
            None,
        ),
        (
            "a command",
            reqwest::Method::POST,
            format!("{base}/v1/admin/accounts/{account}/adjustments"),
            Some(json!({"amount": "2.00", "reason": "fault"})),
        ),
        (
            "the due work",
            reqwest::Method::POST,
            format!("{base}/v1/dev/clock"),
            Some(json!({"advance_seconds": 60})),
        ),
        ("readiness", reqwest::Method::GET, format!("{base}/readyz"), None),
    ];
    for (what, method, url, body) in checks {
        let started = Instant::now();
        let (status, content_type, problem) = call(&client, method, url, ADMIN, body).await;
        assert_eq!(status, 503, "{what}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{what}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            !detail.contains(&db.name) && !detail.contains("FATAL"),
            "{what} leaks the database's words: {detail}"
        );
        assert!(started.elapsed() < Duration::from_secs(12), "{what} took {:?}", started.elapsed());
    }
    // The balance may be answered from memory, but only while the database is heard from (the
    // loss of the read cache's connection noticed, or its pings unheard for 1.5 s): then a 503.
    loop {
        let (status, _, answer) = call(&client, reqwest::Method::GET, format!("{base}/v1/accounts/{account}"), ADMIN, None).await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(
            cut.elapsed() < Duration::from_secs(3),
            "the balance still answered from memory after {:?}",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back: the service recovers by itself; what was acknowledged is there, what was refused is not.
    database_reachable(&db, true).await;
    let mut recovered = false;
    for _ in 0..100 {
        let (status, _, _) = call(&client, reqwest::Method::GET, format!("{base}/v1/accounts/{account}"), ADMIN, None).await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the service did not come back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut acknowledged, mut unavailable, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for client in load {
        let (ids, refused, slow) = client.await.unwrap();
        acknowledged.extend(ids);
        unavailable += refused;
        slowest = slowest.max(slow);
    }
    assert!(unavailable > 0 && !acknowledged.is_empty(), "the load ran through the outage");
    assert!(slowest < Duration::from_secs(12), "a request under load took {slowest:?}");
    // Everything acknowledged is in the log, once.
    for id in &acknowledged {
        let stored = count(
            &db,
            &format!("SELECT count(*) FROM events WHERE event_type = 'Adjusted' AND payload->>'adjustment_id' = '{id}'"),
        )
        .await;
        assert_eq!(stored, 1, "acknowledged adjustment {id}");
    }
    assert_eq!(adjust("3.00").await.0, 201);
    let adjusted = count(&db, "SELECT count(*) FROM events WHERE event_type = 'Adjusted'").await;
    assert!(
        adjusted >= acknowledged.len() as i64 + 2,
        "{adjusted} adjustments for {} acknowledged",
        acknowledged.len()
    );
    support::settled(&base).await;
    let verify = call(&client, reqwest::Method::GET, format!("{base}/v1/ledger/verify"), ADMIN, None).await;
    assert_eq!((verify.0, verify.2["ok"].as_bool()), (200, Some(true)), "{:?}", verify.2);
}

#[tokio::test]
async fn killed_during_a_provider_call_the_server_is_made_once_and_its_hold_captured_once() {
    let virtfusion = MockServer::start().await;
    let made = Arc::new(Mutex::new(Vec::<String>::new()));
    let making = made.clone();
    // VirtFusion makes the server at once and answers after a second: the process is killed
    // while it waits, after the provider acted and before the answer was recorded.
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            making.lock().unwrap().push(body["name"].as_str().unwrap().to_string());
            ResponseTemplate::new(201)
                .set_body_json(json!({"data": {"id": 7001, "name": body["name"], "state": "queued"}}))
                .set_delay(Duration::from_millis(1_000))
        })
        .mount(&virtfusion)
        .await;
    let listing = made.clone();
    Mock::given(method("GET"))
        .and(path("/api/v1/servers/user/1"))
        .respond_with(move |_: &wiremock::Request| {
            let data: Vec<Value> = listing
                .lock()
                .unwrap()
                .iter()
                .map(|name| json!({"id": 7001, "name": name, "state": "complete"}))
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({"current_page": 1, "last_page": 1, "data": data}))
        })
        .mount(&virtfusion)
        .await;
    let uri = virtfusion.uri();
    let envs = [
        ("PROVIDER", Some("virtfusion")),
        ("VIRTFUSION_URL", Some(uri.as_str())),
        ("VIRTFUSION_TOKEN", Some("vf-token")),
        ("VIRTFUSION_TIMEOUT_MS", Some("5000")),
        ("BILLING_PROVIDER_BACKOFF_MS", Some("20")),
        ("BILLING_OUTBOX_LEASE_SECONDS", Some("2")),
    ];
    let db = TestDatabase::new().await;
    let mut first = serve(&db, &envs);
    let client = reqwest::Client::new();
    let (account, token) = support::customer(&first.base, ADMIN, "USD", "US").await;
    let credited = call(
        &client,
        reqwest::Method::POST,
        format!("{}/v1/admin/accounts/{account}/adjustments", first.base),
        ADMIN,
        Some(json!({"amount": "1.00", "reason": "fault"})),
    )
    .await;
    assert_eq!(credited.0, 201);
    let order = call(
        &client,
        reqwest::Method::POST,
        format!("{}/v1/accounts/{account}/orders", first.base),
        &token,
        Some(json!({"plan_id": "vps-1g", "location": "nyc"})),
    )
    .await;
    assert_eq!(order.0, 202, "{:?}", order.2);
    let server_id = order.2["server_id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        if !made.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(made.lock().unwrap().len(), 1, "the provider was asked");
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM events WHERE event_type IN ('HoldCaptured', 'HoldReleased')"
        )
        .await,
        0
    );

    // Restarted: once the dead process's lease runs out, the order is taken up again; the server
    // the provider made is found, not made twice, and the hold is captured once.
    let second = serve(&db, &envs);
    let status = support::wait_for(&second.base, &token, &server_id, |status| status != "provisioning").await;
    assert_eq!(status, "needs_setup");
    assert_eq!(made.lock().unwrap().len(), 1, "one server made at the provider");
    assert_eq!(count(&db, "SELECT count(*) FROM events WHERE event_type = 'HoldCaptured'").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM events WHERE event_type = 'HoldReleased'").await, 0);
    let provider_id: String =
        sqlx::query_scalar("SELECT payload->>'provider_server_id' FROM events WHERE event_type = 'ServerProvisioned'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(provider_id, "vf-7001");
}

/// A paid `checkout.session.completed` for a top-up, signed now.
fn paid(event_id: &str, topup_id: &str, payment: &str, amount_minor: i64) -> (Vec<u8>, String) {
    let event = json!({
        "id": event_id, "object": "event", "type": "checkout.session.completed", "livemode": false,
        "created": chrono::Utc::now().timestamp(), "api_version": "2024-06-20",
        "data": {"object": {
            "id": format!("cs_test_{payment}"), "object": "checkout.session", "amount_total": amount_minor, "currency": "usd",
            "client_reference_id": topup_id, "metadata": {"topup_id": topup_id}, "mode": "payment",
            "payment_intent": payment, "payment_status": "paid", "status": "complete"}}
    });
    let body = serde_json::to_vec(&event).unwrap();
    let signature = adapters::stripe::webhook::sign(SECRET, &body, chrono::Utc::now().timestamp());
    (body, signature)
}

#[tokio::test]
async fn killed_while_webhooks_are_processed_every_acknowledged_payment_is_credited_once() {
    const TOPUPS: usize = 30;
    let db = TestDatabase::new().await;
    let mut first = serve(&db, &[]);
    let client = reqwest::Client::new();
    let mut topups = Vec::new();
    for index in 0..TOPUPS {
        let (account, token) = support::customer(&first.base, ADMIN, "USD", "US").await;
        let topup = call(
            &client,
            reqwest::Method::POST,
            format!("{}/v1/accounts/{account}/topups", first.base),
            &token,
            Some(json!({"amount": "10.00"})),
        )
        .await;
        assert_eq!(topup.0, 201, "{:?}", topup.2);
        topups.push((index, topup.2["topup_id"].as_str().unwrap().to_string()));
    }
    let deliver = |base: String, index: usize, topup_id: String| {
        let client = client.clone();
        async move {
            let (body, signature) = paid(&format!("evt_fault_{index}"), &topup_id, &format!("pi_fault_{index}"), 1_000);
            let response = client
                .post(format!("{base}/v1/webhooks/stripe"))
                .header("content-type", "application/json")
                .header("stripe-signature", signature)
                .body(body)
                .send()
                .await;
            matches!(response, Ok(response) if response.status().is_success())
        }
    };
    // Delivered a few milliseconds apart; the process is killed once eight were acknowledged,
    // with others in flight and the rest not yet sent.
    let acknowledgements = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deliveries: Vec<_> = topups
        .iter()
        .map(|(index, topup_id)| {
            let (delivery, acknowledgements, index) = (
                deliver(first.base.clone(), *index, topup_id.clone()),
                acknowledgements.clone(),
                *index,
            );
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(8 * index as u64)).await;
                let acknowledged = delivery.await;
                if acknowledged {
                    acknowledgements.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                acknowledged
            })
        })
        .collect();
    let started = Instant::now();
    while acknowledgements.load(std::sync::atomic::Ordering::SeqCst) < 8 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let mut acknowledged = Vec::new();
    for (delivery, (index, _)) in deliveries.into_iter().zip(&topups) {
        if delivery.await.unwrap() {
            acknowledged.push(*index);
        }
    }
    eprintln!("{} of {TOPUPS} deliveries acknowledged before the kill", acknowledged.len());
    assert!((8..TOPUPS).contains(&acknowledged.len()), "the kill came mid-way: {acknowledged:?}");
    for index in &acknowledged {
        let credited = count(
            &db,
            &format!("SELECT count(*) FROM events WHERE event_type = 'TopUpSettled' AND payload->>'payment_id' = 'pi_fault_{index}'"),
        )
        .await;
        assert_eq!(credited, 1, "acknowledged payment {index} was not credited");
    }

    // Restarted, Stripe delivers every event again (the unacknowledged ones, and some twice).
    let second = serve(&db, &[]);
    for (index, topup_id) in &topups {
        assert!(deliver(second.base.clone(), *index, topup_id.clone()).await, "redelivery {index}");
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM events WHERE event_type = 'TopUpSettled'").await,
        TOPUPS as i64,
        "every payment credited exactly once"
    );
    support::settled(&second.base).await;
    let balances = count(&db, "SELECT count(*) FROM rm.balances WHERE balance = 10").await;
    assert_eq!(balances, TOPUPS as i64, "the read models caught up");
}

#[tokio::test]
async fn a_billing_run_killed_mid_run_and_rerun_charges_each_slot_once() {
    use app::flows::Flows;
    use app::handler::{CommandHandler, Metadata};
    use domain::{AccountId, Country, Currency, Location, ManualClock, OrderId, PlanId, ServerId};
    let db = TestDatabase::new().await;
    let start = chrono::DateTime::parse_from_rfc3339("2026-05-01T09:10:00Z").unwrap().to_utc();
    let clock = Arc::new(ManualClock::new(start));
    let flows = Flows::new(CommandHandler::new(
        ledger::EventLog::open(db.pool.clone(), ledger::LogConfig::default()).await.unwrap(),
        clock.clone(),
    ));
    let admin = Metadata::actor("admin", "fault");
    let fixtures = domain::catalog::Fixtures::parse(include_str!("../fixtures/plans.toml"), include_str!("../fixtures/tax.toml")).unwrap();
    flows.sync_catalog(fixtures, &admin).await.unwrap();
    const SERVERS: i64 = 120;
    for index in 0..SERVERS {
        let account = AccountId::new();
        flows
            .open_account(
                account,
                "Fault",
                "f@example.com",
                Currency::USD,
                Country::parse("US").unwrap(),
                &admin,
            )
            .await
            .unwrap();
        flows
            .adjust(account, rust_decimal::Decimal::from(20), "credit", &admin)
            .await
            .unwrap();
        let order = OrderId::new();
        flows
            .place_order(
                account,
                PlanId::parse("vps-1g").unwrap(),
                Location::parse("nyc").unwrap(),
                order,
                ServerId::new(),
                &admin,
            )
            .await
            .unwrap();
        flows.complete_provisioning(order, &format!("sim-{index}"), &admin).await.unwrap();
    }
    // A week without a run: 168 slots a server, 20,160 in all. Killed mid-run twice, then run to
    // the end.
    const SLOTS: i64 = 168;
    let until = "2026-05-08T09:30:00Z";
    let mut interrupted: Vec<i64> = Vec::new();
    // Killed twice, each time the moment its first batch of charges has landed (batches are bounded,
    // so a run over twice `BILL_BATCH_EVENTS` commits more than one): mid-run whatever this
    // machine's speed.
    assert!(SERVERS * (SLOTS + 1) > 2 * app::workers::BILL_BATCH_EVENTS as i64);
    for _ in 0..2 {
        let before = count(&db, "SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await;
        let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
            .args(["bill", "--until", until])
            .env("DATABASE_URL", db.url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while count(&db, "SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await == before
            && std::time::Instant::now() < deadline
            && run.try_wait().unwrap().is_none()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = run.kill();
        run.wait().unwrap();
        interrupted.push(count(&db, "SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await);
    }
    eprintln!("charges after each kill: {interrupted:?} of {}", SERVERS * SLOTS);
    assert!(
        interrupted.iter().any(|charged| (1..SERVERS * SLOTS).contains(charged)),
        "no kill came mid-run: {interrupted:?}"
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(["bill", "--until", until])
        .env("DATABASE_URL", db.url())
        .status()
        .unwrap();
    assert!(status.success());
    let twice = count(
        &db,
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE event_type = 'HourCharged' \
         GROUP BY payload->>'server_id', payload->>'slot' HAVING count(*) > 1) t",
    )
    .await;
    assert_eq!(twice, 0, "a slot was charged twice");
    assert_eq!(
        count(&db, "SELECT count(*) FROM events WHERE event_type = 'HourCharged'").await,
        SERVERS * SLOTS,
        "every slot from 10:00 on the 1st to 09:00 on the 8th, once"
    );
}
