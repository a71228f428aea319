//! The deploy saga against VirtFusion (wiremock at its HTTP boundary, answering as its API does):
//! retried while locked (423), unavailable (503) or slow; released when refused or given up;
//! the hold captured or released exactly once.

use std::time::Duration;

use ledger::testing::TestDatabase;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod support;

const ADMIN: &str = "bootstrap-admin-token-for-tests";

/// VirtFusion's answer to a created server (trimmed to what the adapter reads, shaped as its API).
fn created(id: u64) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({"data": {"id": id, "ownerId": 1, "hypervisorId": 5, "name": "server", "hostname": null, "commissionStatus": 0, "uuid": "8f2d8a0e-6e4c-4c52-9b1f-3a4b5c6d7e8f", "state": "queued"}}))
}

async fn order_against(virtfusion: &MockServer) -> (TestDatabase, support::Server, String, String, String) {
    let db = TestDatabase::new().await;
    let uri = virtfusion.uri();
    let (server, _) = support::start(
        &db,
        &["serve", "--dev", "--bind", "127.0.0.1:0"],
        &[
            ("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)),
            ("PROVIDER", Some("virtfusion")),
            ("VIRTFUSION_URL", Some(&uri)),
            ("VIRTFUSION_TOKEN", Some("vf-token")),
            ("VIRTFUSION_TIMEOUT_MS", Some("300")),
            ("BILLING_PROVIDER_ATTEMPTS", Some("4")),
            ("BILLING_PROVIDER_BACKOFF_MS", Some("20")),
            ("BILLING_ORPHAN_SCAN_SECONDS", Some("1")),
        ],
    );
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token) = support::customer(&base, ADMIN, "USD", "US").await;
    client
        .post(format!("{base}/v1/admin/accounts/{account}/adjustments"))
        .bearer_auth(ADMIN)
        .json(&json!({"amount": "1.00", "reason": "saga"}))
        .send()
        .await
        .unwrap();
    let order = client
        .post(format!("{base}/v1/accounts/{account}/orders"))
        .bearer_auth(&token)
        .json(&json!({"plan_id": "vps-1g", "location": "nyc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status().as_u16(), 202);
    let order: Value = order.json().await.unwrap();
    (db, server, account, token, order["server_id"].as_str().unwrap().to_string())
}

async fn settle(base: &str, token: &str, server_id: &str) -> String {
    support::wait_for(base, token, server_id, |status| status != "provisioning").await
}

async fn hold_events(db: &TestDatabase) -> (i64, i64) {
    let captured: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldCaptured'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let released: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldReleased'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (captured, released)
}

async fn balance(base: &str, token: &str, account: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}/v1/accounts/{account}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn locked_twice_then_created_captures_the_hold_once() {
    let virtfusion = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .and(header("authorization", "Bearer vf-token"))
        .respond_with(ResponseTemplate::new(423).set_body_json(json!({"errors": ["resource locked"]})))
        .up_to_n_times(2)
        .expect(2)
        .mount(&virtfusion)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(created(4242))
        .expect(1)
        .mount(&virtfusion)
        .await;
    let (db, server, account, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "needs_setup");
    assert_eq!(hold_events(&db).await, (1, 0));
    let view = balance(&server.base, &token, &account).await;
    assert_eq!(
        (view["balance"].as_str(), view["reserved"].as_str()),
        (Some("0.993151"), Some("0.00")),
        "1.00 less the first hour, 0.006849"
    );
    let provider_id: String =
        sqlx::query_scalar("SELECT payload->>'provider_server_id' FROM events WHERE event_type = 'ServerProvisioned'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(provider_id, "vf-4242");
    let first_create = virtfusion
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|request| request.method.as_str() == "POST")
        .unwrap();
    let request: Value = serde_json::from_slice(&first_create.body).unwrap();
    assert_eq!(
        (
            request["packageId"].as_u64(),
            request["hypervisorId"].as_u64(),
            request["name"].as_str()
        ),
        (Some(1), Some(5), Some(server_id.as_str()))
    );
}

#[tokio::test]
async fn a_refusal_releases_the_hold_in_full_once() {
    let virtfusion = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({"errors": ["package unavailable"]})))
        .expect(1)
        .mount(&virtfusion)
        .await;
    let (db, server, account, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "failed");
    assert_eq!(hold_events(&db).await, (0, 1));
    let view = balance(&server.base, &token, &account).await;
    assert_eq!(
        (view["balance"].as_str(), view["available"].as_str(), view["reserved"].as_str()),
        (Some("1.00"), Some("1.00"), Some("0.00"))
    );
    let reason: String = sqlx::query_scalar("SELECT payload->>'reason' FROM events WHERE event_type = 'HoldReleased'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(reason.contains("422") && reason.contains("package unavailable"), "{reason}");
}

#[tokio::test]
async fn a_provider_that_keeps_timing_out_is_given_up_and_the_hold_released() {
    let virtfusion = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(created(1).set_delay(Duration::from_secs(2)))
        .expect(4)
        .mount(&virtfusion)
        .await;
    let (db, server, _, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "failed");
    assert_eq!(hold_events(&db).await, (0, 1));
    let reason: String = sqlx::query_scalar("SELECT payload->>'reason' FROM events WHERE event_type = 'HoldReleased'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(reason.starts_with("gave up after 4 attempts"), "{reason}");
}

#[tokio::test]
async fn unavailable_then_created_captures_once() {
    let virtfusion = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .expect(3)
        .mount(&virtfusion)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(created(77))
        .expect(1)
        .mount(&virtfusion)
        .await;
    let (db, server, _, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "needs_setup");
    assert_eq!(hold_events(&db).await, (1, 0));
}

/// Polls what VirtFusion received until `done` holds (bounded).
async fn received_until(virtfusion: &MockServer, done: impl Fn(&[wiremock::Request]) -> bool) -> Vec<wiremock::Request> {
    for _ in 0..200 {
        let requests = virtfusion.received_requests().await.unwrap();
        if done(&requests) {
            return requests;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "VirtFusion never received what was expected: {:?}",
        virtfusion.received_requests().await
    );
}

#[tokio::test]
async fn setup_power_and_deletion_reach_the_provider_once_each_in_order() {
    let virtfusion = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(created(9001))
        .expect(1)
        .mount(&virtfusion)
        .await;
    // The build is refused once as locked (a task is running on the server), then accepted.
    Mock::given(method("POST"))
        .and(path("/api/v1/servers/9001/build"))
        .respond_with(ResponseTemplate::new(423).set_body_json(json!({"errors": ["server is locked"]})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&virtfusion)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers/9001/build"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"data": {"id": 9001, "name": "web1", "hostname": "web1.example.com", "commissionStatus": 1, "state": "queued"}}),
        ))
        .expect(1)
        .mount(&virtfusion)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/servers/9001/power/shutdown"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": {"queueId": 318, "action": "shutdown"}})))
        .expect(1)
        .mount(&virtfusion)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v1/servers/9001"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&virtfusion)
        .await;
    let (db, server, _, token, server_id) = order_against(&virtfusion).await;
    let base = server.base.clone();
    assert_eq!(settle(&base, &token, &server_id).await, "needs_setup");
    let client = reqwest::Client::new();
    let setup = client
        .post(format!("{base}/v1/servers/{server_id}/setup"))
        .bearer_auth(&token)
        .json(&json!({"os_image": "ubuntu-24.04", "hostname": "web1.example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(setup.status().as_u16(), 200, "{:?}", setup.text().await);
    // The power action waits for the build: a server's actions reach the provider in order.
    let power = client
        .post(format!("{base}/v1/servers/{server_id}/power"))
        .bearer_auth(&token)
        .json(&json!({"action": "shutdown"}))
        .send()
        .await
        .unwrap();
    assert_eq!(power.status().as_u16(), 200, "{:?}", power.text().await);
    let cancel = client
        .post(format!("{base}/v1/servers/{server_id}/cancellation"))
        .bearer_auth(&token)
        .json(&json!({"mode": "immediate"}))
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success(), "{:?}", cancel.text().await);
    // An immediate cancellation deletes within five minutes: the due-work run deletes it, and
    // the outbox tells VirtFusion.
    let advanced: Value = client
        .post(format!("{base}/v1/dev/clock"))
        .json(&json!({"advance_seconds": 300}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row: (String, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as("SELECT status, cancellation_effective_at FROM rm.servers")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let events: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT event_type, occurred_at FROM events ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        advanced["due"]["servers_deleted"].as_u64(),
        Some(1),
        "{advanced} {row:?} {events:?}"
    );
    let requests = received_until(&virtfusion, |requests| requests.iter().any(|r| r.method.as_str() == "DELETE")).await;
    // (Lists of the user's servers, read before creating and when looking for orphans, aside.)
    let requests: Vec<wiremock::Request> = requests
        .into_iter()
        .filter(|r| !r.url.path().starts_with("/api/v1/servers/user/"))
        .collect();
    let calls: Vec<String> = requests
        .iter()
        .map(|r| {
            format!(
                "{} {}{}",
                r.method,
                r.url.path(),
                r.url.query().map(|q| format!("?{q}")).unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            "POST /api/v1/servers",
            "POST /api/v1/servers/9001/build",
            "POST /api/v1/servers/9001/build",
            "POST /api/v1/servers/9001/power/shutdown",
            "DELETE /api/v1/servers/9001?delay=0",
        ]
    );
    let build: Value = serde_json::from_slice(&requests[2].body).unwrap();
    assert_eq!(
        (build["operatingSystemId"].as_u64(), build["hostname"].as_str()),
        (Some(1), Some("web1.example.com"))
    );
    let outbox: Vec<(String, i32)> = sqlx::query_as("SELECT status, attempts FROM outbox WHERE target = 'provider' ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    // The order's provisioning, the build (twice asked), the shutdown and the deletion.
    assert_eq!(
        outbox,
        [
            ("done".to_string(), 1),
            ("done".to_string(), 2),
            ("done".to_string(), 1),
            ("done".to_string(), 1)
        ]
    );
    // Nothing more is sent later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acted = virtfusion
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| !r.url.path().starts_with("/api/v1/servers/user/"))
        .count();
    assert_eq!(acted, 5);
}

/// VirtFusion's list of the user's servers, as `GET /servers/user/{id}` answers it: the servers
/// made so far (their names are the names sent when they were made).
fn listed(made: &std::sync::Mutex<Vec<(u64, String)>>) -> ResponseTemplate {
    let data: Vec<Value> = made
        .lock()
        .unwrap()
        .iter()
        .map(|(id, name)| json!({"id": id, "ownerId": 1, "hypervisorId": 5, "name": name, "hostname": null, "state": "complete"}))
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({"current_page": 1, "last_page": 1, "data": data}))
}

#[tokio::test]
async fn a_server_made_by_an_attempt_whose_answer_was_lost_is_found_not_made_twice() {
    let virtfusion = MockServer::start().await;
    let made = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    // VirtFusion makes the server but answers after the adapter has given up waiting (300 ms).
    let making = made.clone();
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            making.lock().unwrap().push((4242, body["name"].as_str().unwrap().to_string()));
            created(4242).set_delay(Duration::from_secs(2))
        })
        .mount(&virtfusion)
        .await;
    let listing = made.clone();
    Mock::given(method("GET"))
        .and(path("/api/v1/servers/user/1"))
        .respond_with(move |_: &wiremock::Request| listed(&listing))
        .mount(&virtfusion)
        .await;
    let (db, server, _, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "needs_setup");
    let creates = virtfusion
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|request| request.method == wiremock::http::Method::POST && request.url.path() == "/api/v1/servers")
        .count();
    assert_eq!(creates, 1, "the retry found the server instead of making a second one");
    let provider_id: String =
        sqlx::query_scalar("SELECT payload->>'provider_server_id' FROM events WHERE event_type = 'ServerProvisioned'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(provider_id, "vf-4242");
    assert_eq!(hold_events(&db).await, (1, 0));
}

#[tokio::test]
async fn a_server_the_provider_holds_for_a_failed_order_is_deleted_as_an_orphan() {
    let virtfusion = MockServer::start().await;
    let made = std::sync::Arc::new(std::sync::Mutex::new(vec![(6_u64, "someone-elses-server".to_string())]));
    // VirtFusion refuses the order's server, yet made it (or an earlier attempt did).
    let making = made.clone();
    Mock::given(method("POST"))
        .and(path("/api/v1/servers"))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            making.lock().unwrap().push((5151, body["name"].as_str().unwrap().to_string()));
            ResponseTemplate::new(422).set_body_json(json!({"errors": ["the hypervisor group is full"]}))
        })
        .mount(&virtfusion)
        .await;
    let listing = made.clone();
    Mock::given(method("GET"))
        .and(path("/api/v1/servers/user/1"))
        .respond_with(move |_: &wiremock::Request| listed(&listing))
        .mount(&virtfusion)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v1/servers/5151"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&virtfusion)
        .await;
    let (db, server, _, token, server_id) = order_against(&virtfusion).await;
    assert_eq!(settle(&server.base, &token, &server_id).await, "failed");
    assert_eq!(hold_events(&db).await, (0, 1));
    let mut deletes = Vec::new();
    for _ in 0..200 {
        deletes = virtfusion
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|request| request.method == wiremock::http::Method::DELETE)
            .map(|request| request.url.path().to_string())
            .collect();
        if !deletes.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deletes, ["/api/v1/servers/5151"], "only the orphan is deleted");
}
