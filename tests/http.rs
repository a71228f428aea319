//! The HTTP API over the real `billing serve` binary: authentication and roles, problem details,
//! money as strings, accounts, adjustments, statements, the dev clock.

use std::io::BufRead;

mod support;
use support::Server;

use ledger::testing::TestDatabase;
use serde_json::{json, Value};

const ADMIN: &str = "bootstrap-admin-token-for-tests";

fn serve(db: &TestDatabase, dev: bool) -> Server {
    let args: &[&str] = if dev {
        &["serve", "--bind", "127.0.0.1:0", "--dev"]
    } else {
        &["serve", "--bind", "127.0.0.1:0"]
    };
    support::start(db, args, &[("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN))]).0
}

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, String, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("a response");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = response.text().await.unwrap();
        (status, content_type, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, String, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body)).await
    }
}

async fn key(api: &Api, role: &str, account: &str) -> String {
    let response = api
        .post(&format!("/v1/accounts/{account}/api-keys"), Some(ADMIN), json!({"role": role}))
        .await;
    assert_eq!(response.0, 201, "{response:?}");
    response.2["token"].as_str().unwrap().to_string()
}

fn problem(response: &(u16, String, Value), status: u16) {
    assert_eq!(response.0, status, "{response:?}");
    assert_eq!(response.1, "application/problem+json", "{response:?}");
    for field in ["type", "title", "status", "detail"] {
        assert!(response.2.get(field).is_some(), "problem without {field}: {response:?}");
    }
    assert_eq!(response.2["status"], status);
}

#[tokio::test]
async fn accounts_keys_adjustments_and_statements_over_http() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };

    assert_eq!(api.get("/healthz", None).await.0, 200);
    let plans = api.get("/v1/plans", None).await;
    assert_eq!(plans.0, 200);
    let vps2 = plans.2["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|plan| plan["id"] == "vps-2g")
        .unwrap();
    assert_eq!(vps2["prices"]["AUD"], json!({"monthly": "15.00", "hourly": "0.020548"}));

    // Who may open an account.
    problem(&api.post("/v1/accounts", None, json!({})).await, 401);
    problem(&api.post("/v1/accounts", Some("not-a-token"), json!({})).await, 401);
    let body = json!({"name": "Ada", "email": "ada@example.com", "currency": "AUD", "country": "AU"});
    let created = api.post("/v1/accounts", Some(ADMIN), body.clone()).await;
    assert_eq!(created.0, 201, "{created:?}");
    let account = created.2["id"].as_str().unwrap().to_string();
    let other = api
        .post(
            "/v1/accounts",
            Some(ADMIN),
            json!({"name": "Bo", "email": "bo@example.com", "currency": "USD", "country": "US"}),
        )
        .await
        .2["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (field, bad) in [
        (
            "currency",
            json!({"name": "X", "email": "x@example.com", "currency": "XYZ", "country": "AU"}),
        ),
        (
            "country",
            json!({"name": "X", "email": "x@example.com", "currency": "AUD", "country": "Australia"}),
        ),
        ("email", json!({"name": "X", "email": "nope", "currency": "AUD", "country": "AU"})),
    ] {
        let response = api.post("/v1/accounts", Some(ADMIN), bad).await;
        problem(&response, 422);
        assert_eq!(response.2["field"], field, "{response:?}");
    }

    let customer = key(&api, "customer", &account).await;
    let other_customer = key(&api, "customer", &other).await;
    let finance = key(&api, "finance", &account).await;
    problem(
        &api.post(
            &format!("/v1/accounts/{account}/api-keys"),
            Some(&customer),
            json!({"role": "admin"}),
        )
        .await,
        403,
    );

    let own = api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await;
    assert_eq!(own.0, 200);
    assert_eq!(
        (own.2["balance"].as_str(), own.2["available"].as_str(), own.2["currency"].as_str()),
        (Some("0.00"), Some("0.00"), Some("AUD"))
    );
    problem(&api.get(&format!("/v1/accounts/{account}"), Some(&other_customer)).await, 404);
    problem(&api.get("/v1/accounts/not-a-uuid", Some(&customer)).await, 404);
    assert_eq!(api.get(&format!("/v1/accounts/{account}"), Some(&finance)).await.0, 200);
    assert_eq!(
        api.get("/v1/accounts?query=ada", Some(&finance)).await.2["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    problem(&api.get("/v1/accounts?query=ada", Some(&customer)).await, 403);

    // Adjustments: money as strings, a reason, never below zero.
    let adjust = |token: String, body: Value| {
        let api = &api;
        let account = account.clone();
        async move {
            api.post(&format!("/v1/admin/accounts/{account}/adjustments"), Some(&token), body)
                .await
        }
    };
    let response = adjust(ADMIN.into(), json!({"amount": 25, "reason": "goodwill"})).await;
    problem(&response, 422);
    assert!(response.2["detail"].as_str().unwrap().contains("not a JSON number"), "{response:?}");
    problem(
        &adjust(ADMIN.into(), json!({"amount": "1.0000001", "reason": "goodwill"})).await,
        422,
    );
    problem(&adjust(ADMIN.into(), json!({"amount": "25.00"})).await, 422);
    problem(&adjust(customer.clone(), json!({"amount": "25.00", "reason": "me"})).await, 403);
    let response = adjust(ADMIN.into(), json!({"amount": "25.00", "reason": "goodwill"})).await;
    assert_eq!(response.0, 201, "{response:?}");
    assert_eq!(response.2["account"]["balance"], "25.00", "the response reflects its own write");
    problem(
        &adjust(ADMIN.into(), json!({"amount": "-25.01", "reason": "correction"})).await,
        402,
    );
    assert_eq!(
        adjust(ADMIN.into(), json!({"amount": "-5.50", "reason": "correction"})).await.0,
        201
    );

    // The statement, cursor-paginated.
    let page = api
        .get(&format!("/v1/accounts/{account}/transactions?limit=1"), Some(&customer))
        .await;
    assert_eq!(page.0, 200);
    assert_eq!(page.2["items"][0]["amount"], "25.00");
    assert_eq!(page.2["items"][0]["balance_after"], "25.00");
    let cursor = page.2["next_cursor"].as_str().unwrap().to_string();
    let next = api
        .get(
            &format!("/v1/accounts/{account}/transactions?limit=1&cursor={cursor}"),
            Some(&customer),
        )
        .await;
    assert_eq!(
        (next.2["items"][0]["amount"].as_str(), next.2["items"][0]["balance_after"].as_str()),
        (Some("-5.50"), Some("19.50"))
    );
    assert_eq!(next.2["next_cursor"], Value::Null);
    problem(
        &api.get(&format!("/v1/accounts/{account}/transactions?cursor=abc"), Some(&customer))
            .await,
        422,
    );
    problem(
        &api.get(&format!("/v1/accounts/{account}/transactions"), Some(&other_customer))
            .await,
        404,
    );

    // The books, for finance.
    let books = api.get("/v1/ledger/trial-balance", Some(&finance)).await;
    assert_eq!(books.0, 200);
    let currencies = books.2["currencies"].as_array().expect("the books per currency");
    assert!(!currencies.is_empty());
    for currency in currencies {
        assert_eq!(currency["total_debit"], currency["total_credit"], "{currency}");
    }
    problem(&api.get("/v1/ledger/trial-balance", Some(&customer)).await, 403);
    problem(&api.get("/v1/ledger/trial-balance?as_of=yesterday", Some(&finance)).await, 422);

    // Malformed and oversized bodies.
    let raw = api
        .client
        .post(format!("{}/v1/accounts", api.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (raw.status().as_u16(), raw.headers()["content-type"].to_str().unwrap()),
        (400, "application/problem+json")
    );
    let huge = json!({"name": "x".repeat(100_000), "email": "a@b.co", "currency": "AUD", "country": "AU"});
    problem(&api.post("/v1/accounts", Some(ADMIN), huge).await, 413);

    // The dev clock moves forward only.
    let now = api.post("/v1/dev/clock", None, json!({"now": "2030-01-01T00:00:00Z"})).await;
    assert_eq!(now.0, 200, "{now:?}");
    problem(&api.post("/v1/dev/clock", None, json!({"now": "2029-01-01T00:00:00Z"})).await, 422);
    assert_eq!(
        api.post("/v1/dev/clock", None, json!({"advance_seconds": 3600})).await.2["now"],
        "2030-01-01T01:00:00Z"
    );
    problem(&api.get("/v1/no-such-route", None).await, 404);
}

#[tokio::test]
async fn outside_dev_mode_the_dev_routes_do_not_exist() {
    let db = TestDatabase::new().await;
    let server = serve(&db, false);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    problem(&api.post("/v1/dev/clock", None, json!({"advance_seconds": 60})).await, 404);
}

async fn funded_customer(api: &Api, currency: &str, country: &str, amount: &str) -> (String, String) {
    let (account, token) = support::customer(&api.base, ADMIN, currency, country).await;
    let credited = api
        .post(
            &format!("/v1/admin/accounts/{account}/adjustments"),
            Some(ADMIN),
            json!({"amount": amount, "reason": "opening credit"}),
        )
        .await;
    assert_eq!(credited.0, 201, "{credited:?}");
    (account, token)
}

async fn wait_for_status(api: &Api, server: &str, token: &str, status: &str) -> Value {
    support::wait_for(&api.base, token, server, |current| current == status).await;
    api.get(&format!("/v1/servers/{server}"), Some(token)).await.2
}

#[tokio::test]
async fn a_customer_orders_sets_up_is_billed_hourly_and_cancels_with_a_pro_rata_refund() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let (account, customer) = funded_customer(&api, "AUD", "AU", "10.00").await;
    assert_eq!(api.post("/v1/dev/clock", None, json!({"now": "2027-05-04T10:15:00Z"})).await.0, 200);

    problem(
        &api.post(
            &format!("/v1/accounts/{account}/orders"),
            Some(&customer),
            json!({"plan_id": "vps-99g", "location": "syd"}),
        )
        .await,
        422,
    );
    problem(
        &api.post(
            &format!("/v1/accounts/{account}/orders"),
            Some(&customer),
            json!({"plan_id": "vps-2g", "location": "mars"}),
        )
        .await,
        422,
    );
    problem(
        &api.post(
            &format!("/v1/accounts/{account}/orders"),
            Some(ADMIN),
            json!({"plan_id": "vps-2g", "location": "syd"}),
        )
        .await,
        403,
    );
    let order = api
        .post(
            &format!("/v1/accounts/{account}/orders"),
            Some(&customer),
            json!({"plan_id": "vps-2g", "location": "syd"}),
        )
        .await;
    assert_eq!(order.0, 202, "{order:?}");
    assert_eq!(order.2["status"], "provisioning");
    let server_id = order.2["server_id"].as_str().unwrap().to_string();

    let provisioned = wait_for_status(&api, &server_id, &customer, "needs_setup").await;
    assert_eq!(provisioned["month_to_date_net"], "0.020548");
    assert_eq!(provisioned["next_charge_at"], "2027-05-04T11:00:00Z");
    // The first hour (0.020548 + 10% GST 0.002055) was held at the order and captured at provisioning.
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.2["balance"],
        "9.977397"
    );

    problem(
        &api.post(
            &format!("/v1/servers/{server_id}/setup"),
            Some(&customer),
            json!({"os_image": "debian-12", "hostname": "-bad-"}),
        )
        .await,
        422,
    );
    let setup = api
        .post(
            &format!("/v1/servers/{server_id}/setup"),
            Some(&customer),
            json!({"os_image": "debian-12", "hostname": "web1.example.com"}),
        )
        .await;
    assert_eq!(
        (setup.0, setup.2["status"].as_str(), setup.2["hostname"].as_str()),
        (200, Some("running"), Some("web1.example.com"))
    );
    problem(
        &api.post(
            &format!("/v1/servers/{server_id}/setup"),
            Some(&customer),
            json!({"os_image": "debian-12", "hostname": "web2"}),
        )
        .await,
        409,
    );

    // Three hours pass: the slots of 11:00, 12:00 and 13:00 are charged, once each.
    let advanced = api.post("/v1/dev/clock", None, json!({"advance_seconds": 3 * 3600})).await;
    assert_eq!(advanced.2["due"]["slots_charged"], 3, "{advanced:?}");
    assert_eq!(
        api.post("/v1/dev/clock", None, json!({"advance_seconds": 0})).await.2["due"]["slots_charged"],
        0
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.2["balance"],
        "9.909588"
    );

    // Cancelled 15 minutes into the 13:00 slot: 2,700 of its 3,600 seconds come back.
    let cancelled = api
        .post(
            &format!("/v1/servers/{server_id}/cancellation"),
            Some(&customer),
            json!({"mode": "immediate"}),
        )
        .await;
    assert_eq!(
        (cancelled.0, cancelled.2["status"].as_str()),
        (200, Some("deleting")),
        "{cancelled:?}"
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.2["balance"],
        "9.92654",
        "exact, trailing zeros beyond the cents dropped"
    );
    problem(
        &api.call(
            reqwest::Method::DELETE,
            &format!("/v1/servers/{server_id}/cancellation"),
            Some(&customer),
            None,
        )
        .await,
        409,
    );
    let advanced = api.post("/v1/dev/clock", None, json!({"advance_seconds": 300})).await;
    assert_eq!(
        (
            advanced.2["due"]["servers_deleted"].as_u64(),
            advanced.2["due"]["slots_charged"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert_eq!(
        api.get(&format!("/v1/servers/{server_id}"), Some(&customer)).await.2["status"],
        "deleted"
    );

    let statement = api.get(&format!("/v1/accounts/{account}/transactions"), Some(&customer)).await.2;
    let kinds: Vec<&str> = statement["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["adjustment", "charge", "charge", "charge", "charge", "cancellation_refund"]);
    assert_eq!(statement["items"][5]["amount"], "0.016952");

    // May ends: its invoice is issued with the next run, numbered first in 2027's series.
    let month_end = api.post("/v1/dev/clock", None, json!({"now": "2027-06-01T00:05:00Z"})).await;
    assert_eq!(month_end.2["due"]["invoices_issued"], 1, "{month_end:?}");
    let invoices = api.get(&format!("/v1/accounts/{account}/invoices"), Some(&customer)).await.2;
    let invoice = &invoices["items"][0];
    assert_eq!(invoice["number"], "INV-2027-000001");
    assert_eq!(
        (invoice["period_start"].as_str(), invoice["period_end"].as_str()),
        (Some("2027-05-01T00:00:00Z"), Some("2027-06-01T00:00:00Z"))
    );
    // Four hours of vps-2g (0.020548 net + 0.002055 GST each) less 2,700 seconds of the last.
    assert_eq!(invoice["lines"][0]["hours"], 4);
    assert_eq!(
        (invoice["lines"][0]["net"].as_str(), invoice["lines"][0]["tax"].as_str()),
        (Some("0.082192"), Some("0.00822"))
    );
    assert_eq!(
        (invoice["lines"][1]["net"].as_str(), invoice["lines"][1]["tax"].as_str()),
        (Some("-0.015411"), Some("-0.001541"))
    );
    assert_eq!(
        (invoice["net"].as_str(), invoice["tax"].as_str(), invoice["total"].as_str()),
        (Some("0.066781"), Some("0.006679"), Some("0.07346"))
    );
    assert_eq!(invoice["display"], json!({"net": "0.07", "tax": "0.00", "total": "0.07"}));
    let invoice_id = invoice["id"].as_str().unwrap();
    let html = api
        .client
        .get(format!("{}/v1/invoices/{invoice_id}", api.base))
        .bearer_auth(&customer)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("<h1>Invoice INV-2027-000001</h1>") && html.contains("Total 0.07"),
        "{html}"
    );
    assert_eq!(
        api.post("/v1/dev/clock", None, json!({"advance_seconds": 60})).await.2["due"]["invoices_issued"],
        0,
        "an invoice is issued once"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_orders_on_a_wallet_that_affords_ten() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = std::sync::Arc::new(Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    });
    // vps-1g in USD is 0.006849 an hour with no US tax: 0.068490 affords exactly ten first hours.
    let (account, customer) = funded_customer(&api, "USD", "US", "0.068490").await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let api = api.clone();
        let (account, customer) = (account.clone(), customer.clone());
        tasks.push(tokio::spawn(async move {
            api.post(
                &format!("/v1/accounts/{account}/orders"),
                Some(&customer),
                json!({"plan_id": "vps-1g", "location": "nyc"}),
            )
            .await
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        let response = task.await.unwrap();
        if response.0 != 202 {
            problem(&response, 402);
        }
        *statuses.entry(response.0).or_insert(0) += 1;
    }
    assert_eq!(statuses, std::collections::BTreeMap::from([(202, 10), (402, 90)]));
    let servers = api.get(&format!("/v1/accounts/{account}/servers"), Some(&customer)).await.2;
    assert_eq!(servers["items"].as_array().unwrap().len(), 10);
    for item in servers["items"].as_array().unwrap() {
        wait_for_status(&api, item["id"].as_str().unwrap(), &customer, "needs_setup").await;
    }
    let account = api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.2;
    assert_eq!(
        (account["balance"].as_str(), account["reserved"].as_str()),
        (Some("0.00"), Some("0.00")),
        "ten holds captured, nothing left over"
    );
}

#[tokio::test]
async fn the_demo_loads_history_prints_working_tokens_and_serves_in_dev_mode() {
    let db = TestDatabase::new().await;
    // A small fleet beside the shipped history keeps the test quick; the demo's default is 240.
    let (server, mut stdout) = support::start(
        &db,
        &["demo", "--bind", "127.0.0.1:0"],
        &[("BILLING_BOOTSTRAP_ADMIN_TOKEN", None), ("BILLING_DEMO_ACCOUNTS", Some("12"))],
    );
    // The first line (the address) was read by `start`; the banner follows.
    let mut banner = vec![String::new()];
    for _ in 0..6 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        banner.push(line.trim().to_string());
    }
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    assert!(banner[1].starts_with("demo: 15 accounts, "), "{banner:?}");
    assert!(banner[1].contains("(2123 new from the March 2026 history)"), "{banner:?}");
    let token = |prefix: &str| {
        banner
            .iter()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let (admin, finance, customer) = (token("admin token:"), token("finance token:"), token("customer token:"));
    let account = banner[4].split("(account ").nth(1).unwrap().trim_end_matches(')').to_string();

    let own = api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await;
    assert_eq!(
        (own.0, own.2["name"].as_str(), own.2["balance"].as_str()),
        (200, Some("Acme Hosting Pty Ltd"), Some("78.733037"))
    );
    assert_eq!(api.get("/v1/ledger/trial-balance", Some(&finance)).await.0, 200);
    // The fleet was billed through March and invoiced at its end, through the command path.
    let fleet: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.invoices WHERE period_start = '2026-03-01T00:00:00Z'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(fleet > 3, "March invoices beyond the three of the history: {fleet}");
    let verify = api.get("/v1/ledger/verify", Some(&finance)).await;
    assert_eq!(verify.2["ok"], true, "{verify:?}");
    assert_eq!(api.get("/v1/admin/projections", Some(&admin)).await.0, 200);
    // The clock starts where the history ends; an hour later the two running servers are charged.
    let advanced = api.post("/v1/dev/clock", None, json!({"advance_seconds": 3600})).await;
    assert_eq!(advanced.2["now"], "2026-04-02T11:00:00Z", "{advanced:?}");
    assert!(advanced.2["due"]["slots_charged"].as_u64().unwrap() >= 2, "{advanced:?}");
}

#[tokio::test]
async fn idempotency_keys_replay_refuse_a_different_body_and_make_one_effect_under_races() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = std::sync::Arc::new(Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    });
    let (account, customer) = funded_customer(&api, "USD", "US", "1.00").await;
    let order = |key: &str, location: &str| {
        let api = api.clone();
        let (account, customer, key, location) = (account.clone(), customer.clone(), key.to_string(), location.to_string());
        async move {
            let response = api
                .client
                .post(format!("{}/v1/accounts/{account}/orders", api.base))
                .bearer_auth(&customer)
                .header("idempotency-key", key)
                .json(&json!({"plan_id": "vps-1g", "location": location}))
                .send()
                .await
                .unwrap();
            let replayed = response.headers().get("idempotent-replayed").is_some();
            (response.status().as_u16(), replayed, response.json::<Value>().await.unwrap())
        }
    };
    let first = order("order-1", "nyc").await;
    let again = order("order-1", "nyc").await;
    assert_eq!((first.0, first.1), (202, false));
    assert_eq!((again.0, again.1), (202, true));
    assert_eq!(first.2, again.2, "the stored response is replayed");
    let different = order("order-1", "syd").await;
    assert_eq!(different.0, 422, "{different:?}");
    assert_eq!(different.2["field"], "Idempotency-Key");

    // Ten concurrent requests with one new key: one order.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(order("order-2", "fra")));
    }
    let mut order_ids = std::collections::BTreeSet::new();
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, 202, "{body}");
        order_ids.insert(body["order_id"].as_str().unwrap().to_string());
    }
    assert_eq!(order_ids.len(), 1, "one effect, one answer");
    let servers = api.get(&format!("/v1/accounts/{account}/servers"), Some(&customer)).await.2;
    assert_eq!(servers["items"].as_array().unwrap().len(), 2);
    // Keys are per caller: another caller's identical key is its own.
    let admin = api
        .client
        .post(format!("{}/v1/accounts", api.base))
        .bearer_auth(ADMIN)
        .header("idempotency-key", "order-1")
        .json(&json!({"name": "K", "email": "k@example.com", "currency": "USD", "country": "US"}))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status().as_u16(), 201);
}

#[tokio::test]
async fn the_authorization_matrix() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let (account, owner) = funded_customer(&api, "USD", "US", "5.00").await;
    let (_, stranger) = funded_customer(&api, "USD", "US", "5.00").await;
    let finance = key(&api, "finance", &account).await;
    let order = api
        .post(
            &format!("/v1/accounts/{account}/orders"),
            Some(&owner),
            json!({"plan_id": "vps-1g", "location": "nyc"}),
        )
        .await;
    let server_id = order.2["server_id"].as_str().unwrap().to_string();
    wait_for_status(&api, &server_id, &owner, "needs_setup").await;
    let setup = api
        .post(
            &format!("/v1/servers/{server_id}/setup"),
            Some(&owner),
            json!({"os_image": "debian-12", "hostname": "matrix"}),
        )
        .await;
    assert_eq!(setup.0, 200, "{setup:?}");

    // A paid top-up and a charge, for the admin refund routes.
    let topup = api
        .post(&format!("/v1/accounts/{account}/topups"), Some(&owner), json!({"amount": "3.00"}))
        .await;
    let topup_id = topup.2["topup_id"].as_str().unwrap().to_string();
    let paid = api
        .call(reqwest::Method::POST, &format!("/dev/checkout/{topup_id}/pay"), None, None)
        .await;
    assert_eq!(paid.0, 200, "{paid:?}");
    let statement = api.get(&format!("/v1/accounts/{account}/transactions"), Some(&owner)).await.2;
    let charge_id = statement["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["kind"] == "charge")
        .and_then(|item| item["reference"].as_str())
        .expect("the first hour's charge")
        .to_string();
    let invoice_id = uuid::Uuid::new_v4();

    use reqwest::Method as M;
    // (method, path, body, who may: owner, finance, admin). Another customer's token always gets
    // a 404 for an account's objects; a role that may not is a 403; no token is a 401.
    let routes: Vec<(M, String, Option<Value>, [bool; 3])> = vec![
        (M::GET, format!("/v1/accounts/{account}"), None, [true, true, true]),
        (M::GET, format!("/v1/accounts/{account}/transactions"), None, [true, true, true]),
        (M::GET, format!("/v1/accounts/{account}/servers"), None, [true, true, true]),
        (M::GET, format!("/v1/servers/{server_id}"), None, [true, true, true]),
        (
            M::POST,
            format!("/v1/accounts/{account}/topups"),
            Some(json!({"amount": "5.00"})),
            [true, false, false],
        ),
        (
            M::POST,
            format!("/v1/accounts/{account}/orders"),
            Some(json!({"plan_id": "vps-1g", "location": "nyc"})),
            [true, false, false],
        ),
        (
            M::POST,
            format!("/v1/servers/{server_id}/power"),
            Some(json!({"action": "reboot"})),
            [true, false, false],
        ),
        (
            M::POST,
            format!("/v1/accounts/{account}/api-keys"),
            Some(json!({"role": "customer"})),
            [false, false, true],
        ),
        (
            M::POST,
            format!("/v1/admin/accounts/{account}/adjustments"),
            Some(json!({"amount": "1.00", "reason": "matrix"})),
            [false, false, true],
        ),
        (
            M::POST,
            "/v1/accounts".to_string(),
            Some(json!({"name": "M", "email": "m@example.com", "currency": "USD", "country": "US"})),
            [false, false, true],
        ),
        (M::GET, "/v1/accounts?query=j".to_string(), None, [false, true, true]),
        (M::GET, "/v1/ledger/events".to_string(), None, [false, true, true]),
        (M::GET, "/v1/ledger/trial-balance".to_string(), None, [false, true, true]),
        (M::GET, "/v1/admin/projections".to_string(), None, [false, false, true]),
        (M::GET, "/v1/ledger/verify?chain_only=true".to_string(), None, [false, true, true]),
        (M::GET, format!("/v1/accounts/{account}/invoices"), None, [true, true, true]),
        (
            M::POST,
            format!("/v1/admin/charges/{charge_id}/refunds"),
            Some(json!({"amount": "0.001", "reason": "matrix"})),
            [false, false, true],
        ),
        (
            M::POST,
            format!("/v1/admin/topups/{topup_id}/refunds"),
            Some(json!({"amount": "0.01", "reason": "matrix"})),
            [false, false, true],
        ),
        (
            M::POST,
            format!("/v1/servers/{server_id}/cancellation"),
            Some(json!({"mode": "grace"})),
            [true, false, false],
        ),
        (
            M::DELETE,
            format!("/v1/servers/{server_id}/cancellation"),
            None,
            [true, false, false],
        ),
        (
            M::POST,
            "/v1/admin/projections/metrics/rebuild".to_string(),
            None,
            [false, false, true],
        ),
    ];
    for (method, path, body, allowed) in routes {
        let anonymous = api.call(method.clone(), &path, None, body.clone()).await;
        assert_eq!(anonymous.0, 401, "{method} {path} without a token: {anonymous:?}");
        let account_scoped = path.contains(&account) || path.contains(&server_id);
        let other = api.call(method.clone(), &path, Some(&stranger), body.clone()).await;
        let expected_other = if account_scoped { 404 } else { 403 };
        assert_eq!(other.0, expected_other, "{method} {path} with another customer's token: {other:?}");
        for (token, may, who) in [
            (&owner, allowed[0], "owner"),
            (&finance, allowed[1], "finance"),
            (&ADMIN.to_string(), allowed[2], "admin"),
        ] {
            let response = api.call(method.clone(), &path, Some(token), body.clone()).await;
            if may {
                assert!(response.0 < 400, "{method} {path} as {who}: {response:?}");
            } else {
                assert_eq!(response.0, 403, "{method} {path} as {who}: {response:?}");
            }
        }
    }
    // A malformed query string is a problem naming it, not plain text.
    for path in ["/v1/ledger/verify?chain_only=perhaps", "/v1/ledger/events?limit=many"] {
        let malformed = api.get(path, Some(&finance)).await;
        assert_eq!(
            (malformed.0, malformed.2["field"].as_str()),
            (422, Some("query")),
            "{path}: {malformed:?}"
        );
    }
    // The catalogue is public; an unknown invoice is a 404 to everyone with a token, and a
    // 401 without one.
    assert_eq!(api.get("/v1/plans", None).await.0, 200);
    assert_eq!(api.get(&format!("/v1/invoices/{invoice_id}"), None).await.0, 401);
    for token in [&owner, &stranger, &finance, &ADMIN.to_string()] {
        assert_eq!(api.get(&format!("/v1/invoices/{invoice_id}"), Some(token)).await.0, 404);
    }
    assert_eq!(
        api.call(M::POST, "/v1/admin/projections/nonesuch/rebuild", Some(&ADMIN.to_string()), None)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn service_credits_against_a_charge_are_bounded_by_its_gross() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let (account, customer) = funded_customer(&api, "AUD", "AU", "1.00").await;
    let order = api
        .post(
            &format!("/v1/accounts/{account}/orders"),
            Some(&customer),
            json!({"plan_id": "vps-2g", "location": "syd"}),
        )
        .await;
    wait_for_status(&api, order.2["server_id"].as_str().unwrap(), &customer, "needs_setup").await;
    let statement = api.get(&format!("/v1/accounts/{account}/transactions"), Some(&customer)).await.2;
    let charge = statement["items"][1]["reference"].as_str().unwrap().to_string();
    assert_eq!(statement["items"][1]["amount"], "-0.022603");

    let path = format!("/v1/admin/charges/{charge}/refunds");
    let credit = |amount: &str| api.post(&path, Some(ADMIN), json!({"amount": amount, "reason": "outage"}));
    let first = credit("0.02").await;
    assert_eq!(
        (first.0, first.2["account"]["balance"].as_str()),
        (201, Some("0.997397")),
        "{first:?}"
    );
    let too_much = credit("0.002604").await;
    problem(&too_much, 422);
    assert!(
        too_much.2["detail"].as_str().unwrap().contains("0.002603 refundable"),
        "{too_much:?}"
    );
    assert_eq!(credit("0.002603").await.0, 201);
    problem(&credit("0.000001").await, 422);
    problem(
        &api.post(
            &format!("/v1/admin/charges/{charge}/refunds"),
            Some(ADMIN),
            json!({"amount": "0.01"}),
        )
        .await,
        422,
    );
    problem(
        &api.post(
            &format!("/v1/admin/charges/{charge}/refunds"),
            Some(&customer),
            json!({"amount": "0.01", "reason": "me"}),
        )
        .await,
        403,
    );
    problem(
        &api.post(
            &format!("/v1/admin/charges/{}/refunds", uuid::Uuid::new_v4()),
            Some(ADMIN),
            json!({"amount": "0.01", "reason": "x"}),
        )
        .await,
        404,
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.2["balance"],
        "1.00",
        "refunded in full, and no more"
    );
}

#[tokio::test]
async fn two_instances_charge_every_slot_exactly_once() {
    let db = TestDatabase::new().await;
    let first = serve(&db, true);
    let second = serve(&db, true);
    let one = std::sync::Arc::new(Api {
        client: reqwest::Client::new(),
        base: first.base.clone(),
    });
    let two = std::sync::Arc::new(Api {
        client: reqwest::Client::new(),
        base: second.base.clone(),
    });
    let start = json!({"now": "2027-09-01T00:30:00Z"});
    assert_eq!(one.post("/v1/dev/clock", None, start.clone()).await.0, 200);
    assert_eq!(two.post("/v1/dev/clock", None, start).await.0, 200);
    let (account, customer) = funded_customer(&one, "EUR", "DE", "50.00").await;
    let mut servers = Vec::new();
    for plan in ["vps-1g", "vps-2g", "vps-4g"] {
        let order = one
            .post(
                &format!("/v1/accounts/{account}/orders"),
                Some(&customer),
                json!({"plan_id": plan, "location": "fra"}),
            )
            .await;
        assert_eq!(order.0, 202, "{order:?}");
        servers.push(order.2["server_id"].as_str().unwrap().to_string());
    }
    for server in &servers {
        wait_for_status(&one, server, &customer, "needs_setup").await;
    }
    // Twelve simulated hours; each hour both instances run their due work at the same moment.
    const HOURS: usize = 12;
    for _ in 0..HOURS {
        let (a, b) = (one.clone(), two.clone());
        let advance = json!({"advance_seconds": 3600});
        let (x, y) = tokio::join!(
            a.post("/v1/dev/clock", None, advance.clone()),
            b.post("/v1/dev/clock", None, advance)
        );
        assert_eq!((x.0, y.0), (200, 200), "{x:?} {y:?}");
    }
    let charged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT payload->>'server_id', count(*) FROM events WHERE event_type IN ('HourCharged', 'HoldCaptured') GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(charged.len(), 3);
    for (server, count) in &charged {
        assert_eq!(
            *count,
            1 + HOURS as i64,
            "server {server}: the first hour at provisioning, then one charge per slot"
        );
    }
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payload->>'server_id', payload->>'slot' FROM events WHERE event_type IN ('HourCharged', 'HoldCaptured') GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(duplicates, 0, "no (server, slot) charged twice");
}

#[tokio::test]
async fn rate_limits_request_ids_and_metrics() {
    let db = TestDatabase::new().await;
    let (server, _) = support::start(
        &db,
        &["serve", "--dev", "--bind", "127.0.0.1:0"],
        &[
            ("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)),
            ("BILLING_RATE_LIMIT_BURST", Some("3")),
            ("BILLING_RATE_LIMIT_PER_SECOND", Some("0.01")),
        ],
    );
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let (account, customer) = funded_customer(&api, "USD", "US", "5.00").await;
    let orders = format!("/v1/accounts/{account}/orders");
    let order = || api.post(&orders, Some(&customer), json!({"plan_id": "vps-1g", "location": "nyc"}));
    for _ in 0..3 {
        assert_eq!(order().await.0, 202);
    }
    let limited = api
        .client
        .post(format!("{}/v1/accounts/{account}/orders", api.base))
        .bearer_auth(&customer)
        .json(&json!({"plan_id": "vps-1g", "location": "nyc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status().as_u16(), 429);
    assert!(limited.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(limited.headers()["content-type"], "application/problem+json");
    // Reads are not limited, nor are other tokens.
    assert_eq!(api.get(&format!("/v1/accounts/{account}"), Some(&customer)).await.0, 200);

    // A request id is echoed, and kept in the metadata of the events the request caused.
    let response = api
        .client
        .post(format!("{}/v1/admin/accounts/{account}/adjustments", api.base))
        .bearer_auth(ADMIN)
        .header("x-request-id", "req-trace-42")
        .json(&json!({"amount": "1.00", "reason": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-trace-42");
    let metadata: Value = sqlx::query_scalar("SELECT metadata FROM events WHERE event_type = 'Adjusted' AND payload->>'reason' = 'traced'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (metadata["request_id"].as_str(), metadata["actor_kind"].as_str()),
        (Some("req-trace-42"), Some("admin"))
    );
    let generated = api.client.get(format!("{}/healthz", api.base)).send().await.unwrap();
    assert_eq!(generated.headers()["x-request-id"].to_str().unwrap().len(), 36);

    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("billing_http_requests_total{method=\"POST\",status=\"429\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("billing_http_request_duration_seconds_count"), "{metrics}");
    assert!(
        metrics.contains("billing_projector_lag_events{projection=\"balances\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("billing_active_servers"), "{metrics}");
    // The same token spelled with extra spaces is the same caller, with the same bucket.
    for spelling in [format!("Bearer  {customer}"), format!("Bearer {customer}  ")] {
        let respelled = api
            .client
            .post(format!("{}/v1/accounts/{account}/orders", api.base))
            .header("authorization", spelling)
            .json(&json!({"plan_id": "vps-1g", "location": "nyc"}))
            .send()
            .await
            .unwrap();
        assert_eq!(respelled.status().as_u16(), 429);
    }
    // Metrics label at most the methods HTTP defines: an invented one counts as "other".
    let invented = api
        .client
        .request(reqwest::Method::from_bytes(b"BREW").unwrap(), format!("{}/v1/plans", api.base))
        .send()
        .await
        .unwrap();
    assert!(invented.status().is_client_error());
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let document = api.get("/openapi.json", None).await;
    assert_eq!(document.0, 200);
    assert!(document.2["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document.2["paths"].as_object().unwrap();
    for (method, path) in [
        ("get", "/v1/plans"),
        ("post", "/v1/accounts"),
        ("get", "/v1/accounts"),
        ("get", "/v1/accounts/{id}"),
        ("post", "/v1/accounts/{id}/api-keys"),
        ("get", "/v1/accounts/{id}/transactions"),
        ("get", "/v1/accounts/{id}/invoices"),
        ("get", "/v1/invoices/{id}"),
        ("get", "/v1/accounts/{id}/servers"),
        ("get", "/v1/servers/{id}"),
        ("post", "/v1/accounts/{id}/topups"),
        ("post", "/v1/accounts/{id}/orders"),
        ("post", "/v1/servers/{id}/setup"),
        ("post", "/v1/servers/{id}/power"),
        ("post", "/v1/servers/{id}/cancellation"),
        ("delete", "/v1/servers/{id}/cancellation"),
        ("post", "/v1/webhooks/stripe"),
        ("post", "/v1/admin/accounts/{id}/adjustments"),
        ("post", "/v1/admin/charges/{id}/refunds"),
        ("post", "/v1/admin/topups/{id}/resolution"),
        ("post", "/v1/admin/topups/{id}/refunds"),
        ("get", "/v1/ledger/events"),
        ("get", "/v1/ledger/trial-balance"),
        ("get", "/v1/admin/projections"),
        ("post", "/v1/admin/projections/{name}/rebuild"),
        ("get", "/v1/ledger/verify"),
        ("post", "/v1/dev/clock"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ] {
        let operation = &paths.get(path).unwrap_or_else(|| panic!("{path} is not documented"))[method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        assert!(
            operation["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} has no responses"
        );
    }
    let order = &paths["/v1/accounts/{id}/orders"]["post"]["responses"];
    for status in ["202", "401", "402", "403", "404", "422", "429"] {
        assert!(order.get(status).is_some(), "orders: {status} is not documented");
    }
    // Problems are documented as what they are served as.
    assert_eq!(
        order["402"]["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
}

#[tokio::test]
async fn the_books_are_kept_per_currency_and_never_add_currencies_together() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let mut wallets = Vec::new();
    for (currency, country, amount) in [("AUD", "AU", "10.00"), ("USD", "US", "20.00"), ("EUR", "DE", "30.00")] {
        let body = json!({"name": currency, "email": "books@example.com", "currency": currency, "country": country});
        let opened = api.post("/v1/accounts", Some(ADMIN), body).await;
        let account = opened.2["id"].as_str().unwrap().to_string();
        let adjusted = api
            .post(
                &format!("/v1/admin/accounts/{account}/adjustments"),
                Some(ADMIN),
                json!({"amount": amount, "reason": "opening credit"}),
            )
            .await;
        assert_eq!(adjusted.0, 201, "{adjusted:?}");
        wallets.push((currency, format!("liabilities:wallets:{account}"), amount));
    }
    let books = api.get("/v1/ledger/trial-balance", Some(ADMIN)).await;
    assert_eq!(books.0, 200, "{books:?}");
    let currencies = books.2["currencies"].as_array().expect("books per currency");
    assert_eq!(
        currencies.iter().map(|c| c["currency"].as_str().unwrap()).collect::<Vec<_>>(),
        ["AUD", "EUR", "USD"]
    );
    for (currency, wallet, amount) in &wallets {
        let books = currencies.iter().find(|c| c["currency"] == *currency).unwrap();
        let accounts = books["accounts"].as_array().unwrap();
        let line = |name: &str| accounts.iter().find(|line| line["account"] == name).cloned();
        // Each currency's books hold its own wallet and its own adjustment expense, nothing else's.
        assert_eq!(line(wallet).unwrap()["credit"], *amount, "{currency}");
        assert_eq!(line("expenses:adjustments").unwrap()["debit"], *amount, "{currency}");
        assert_eq!(accounts.len(), 2, "{currency}: {accounts:?}");
        assert_eq!(
            (books["total_debit"].as_str(), books["total_credit"].as_str()),
            (Some(*amount), Some(*amount))
        );
    }
}

#[tokio::test]
async fn a_request_whose_answer_was_lost_acts_once_on_retry_and_a_dead_claim_never_jams_its_key() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = std::sync::Arc::new(Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    });
    let (account, customer) = funded_customer(&api, "USD", "US", "1.00").await;
    let post = |path: String, token: String, key: &str, body: Value| {
        let (api, key) = (api.clone(), key.to_string());
        async move {
            let response = api
                .client
                .post(format!("{}{path}", api.base))
                .bearer_auth(token)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let count = |sql: String| {
        let pool = db.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap() }
    };
    let adjust = || {
        post(
            format!("/v1/admin/accounts/{account}/adjustments"),
            ADMIN.to_string(),
            "adjust-1",
            json!({"amount": "5.00", "reason": "goodwill"}),
        )
    };
    let first = adjust().await;
    assert_eq!(first.0, 201, "{first:?}");
    // The answer is lost after the command committed (a 5xx, or a crash before it was stored):
    // the retry must find the effect, not make a second one.
    sqlx::query("DELETE FROM idempotency_keys WHERE key = 'adjust-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let retry = adjust().await;
    assert_eq!(retry.0, 201, "{retry:?}");
    assert_eq!(retry.1["adjustment_id"], first.1["adjustment_id"]);
    assert_eq!(retry.1["account"]["balance"], "6.00", "credited once");
    // A claim whose request died without answering is taken over once its lease has run out.
    sqlx::query(
        "UPDATE idempotency_keys SET status = NULL, body = NULL, claimed_until = now() - interval '1 second' WHERE key = 'adjust-1'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let taken_over = adjust().await;
    assert_eq!(taken_over.0, 201, "{taken_over:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(taken_over.1["account"]["balance"], "6.00");
    assert_eq!(count("SELECT count(*) FROM events WHERE event_type = 'Adjusted'".into()).await, 2);

    // An order whose answer was lost: one hold, one server, the same ids.
    let order = || {
        post(
            format!("/v1/accounts/{account}/orders"),
            customer.clone(),
            "order-1",
            json!({"plan_id": "vps-1g", "location": "nyc"}),
        )
    };
    let placed = order().await;
    assert_eq!(placed.0, 202, "{placed:?}");
    sqlx::query("DELETE FROM idempotency_keys WHERE key = 'order-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = order().await;
    assert_eq!(again.0, 202, "{again:?}");
    assert_eq!(
        (&again.1["order_id"], &again.1["server_id"]),
        (&placed.1["order_id"], &placed.1["server_id"])
    );
    assert_eq!(count("SELECT count(*) FROM events WHERE event_type = 'HoldPlaced'".into()).await, 1);
    let server_id = placed.1["server_id"].as_str().unwrap().to_string();
    support::wait_for(&api.base, &customer, &server_id, |status| status == "needs_setup").await;

    // A cancellation whose answer was lost: the retry answers as the first did, once.
    let cancel = || {
        post(
            format!("/v1/servers/{server_id}/cancellation"),
            customer.clone(),
            "cancel-1",
            json!({"mode": "grace"}),
        )
    };
    assert_eq!(cancel().await.0, 200);
    sqlx::query("DELETE FROM idempotency_keys WHERE key = 'cancel-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = cancel().await;
    assert_eq!(
        (again.0, again.1["status"].as_str()),
        (200, Some("pending_cancellation")),
        "{again:?}"
    );
    assert_eq!(
        count("SELECT count(*) FROM events WHERE event_type = 'CancellationRequested'".into()).await,
        1
    );

    // Keys are written for authenticated callers only.
    let anonymous = post(
        format!("/v1/admin/accounts/{account}/adjustments"),
        "not-a-token".into(),
        "anonymous-1",
        json!({"amount": "5.00", "reason": "x"}),
    )
    .await;
    assert_eq!(anonymous.0, 401);
    assert_eq!(
        count("SELECT count(*) FROM idempotency_keys WHERE key = 'anonymous-1'".into()).await,
        0
    );

    // Stored keys expire after their retention (24 h), with the due work.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'adjust-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let clock = api.post("/v1/dev/clock", None, json!({"advance_seconds": 1})).await;
    assert_eq!(clock.0, 200, "{clock:?}");
    assert_eq!(
        count("SELECT count(*) FROM idempotency_keys WHERE key = 'adjust-1'".into()).await,
        0
    );
    assert_eq!(count("SELECT count(*) FROM idempotency_keys WHERE key = 'order-1'".into()).await, 1);
}

#[tokio::test]
async fn every_list_pages_by_its_cursor_and_a_cursor_of_another_account_names_nothing() {
    let db = TestDatabase::new().await;
    let server = serve(&db, true);
    let api = Api {
        client: reqwest::Client::new(),
        base: server.base.clone(),
    };
    let (account, customer) = funded_customer(&api, "AUD", "AU", "50.00").await;
    let (other, other_customer) = funded_customer(&api, "AUD", "AU", "50.00").await;
    let order = |account: String, token: String| {
        let api = &api;
        async move {
            let placed = api
                .post(
                    &format!("/v1/accounts/{account}/orders"),
                    Some(&token),
                    json!({"plan_id": "vps-1g", "location": "nyc"}),
                )
                .await;
            assert_eq!(placed.0, 202, "{placed:?}");
            placed.2["server_id"].as_str().unwrap().to_string()
        }
    };
    let first = order(account.clone(), customer.clone()).await;
    let second = order(account.clone(), customer.clone()).await;
    let theirs = order(other.clone(), other_customer.clone()).await;

    // Page by page, each server once, in the order they were ordered.
    let servers = format!("/v1/accounts/{account}/servers");
    let page = api.get(&format!("{servers}?limit=1"), Some(&customer)).await;
    assert_eq!(page.0, 200, "{page:?}");
    assert_eq!(page.2["items"][0]["id"], first.as_str());
    let cursor = page.2["next_cursor"].as_str().unwrap().to_string();
    let next = api.get(&format!("{servers}?limit=1&cursor={cursor}"), Some(&customer)).await;
    assert_eq!(next.2["items"][0]["id"], second.as_str());
    // The last page says so: no cursor, rather than a cursor to an empty page.
    assert_eq!(
        (next.2["items"].as_array().map(Vec::len), &next.2["next_cursor"]),
        (Some(1), &Value::Null)
    );

    // Another account's server as a cursor is as unknown as a server that does not exist: the
    // answer tells nothing of whether it exists.
    let foreign = api.get(&format!("{servers}?cursor={theirs}"), Some(&customer)).await;
    let unknown = api
        .get(&format!("{servers}?cursor={}", uuid::Uuid::new_v4()), Some(&customer))
        .await;
    problem(&foreign, 404);
    problem(&unknown, 404);
    assert_eq!(foreign.2["detail"], unknown.2["detail"]);
    // A limit outside 1..=200 is refused, not silently capped.
    problem(&api.get(&format!("{servers}?limit=201"), Some(&customer)).await, 422);
    problem(&api.get(&format!("{servers}?limit=0"), Some(&customer)).await, 422);
}
