//! The HTTP API over the real `billing serve` binary: authentication and roles, problem details,
//! money as strings, accounts, adjustments, statements, the dev clock.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use ledger::testing::TestDatabase;
use serde_json::{json, Value};

const ADMIN: &str = "bootstrap-admin-token-for-tests";

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(db: &TestDatabase, dev: bool) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billing"));
    command
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url())
        .env("BILLING_BOOTSTRAP_ADMIN_TOKEN", ADMIN)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if dev {
        command.arg("--dev");
    }
    let mut child = command.spawn().expect("start billing serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the listening line");
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    Server {
        child,
        base: address,
    }
}

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String, Value) {
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
        (
            status,
            content_type,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, String, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }
}

async fn key(api: &Api, role: &str, account: &str) -> String {
    let response = api
        .post(
            &format!("/v1/accounts/{account}/api-keys"),
            Some(ADMIN),
            json!({"role": role}),
        )
        .await;
    assert_eq!(response.0, 201, "{response:?}");
    response.2["token"].as_str().unwrap().to_string()
}

fn problem(response: &(u16, String, Value), status: u16) {
    assert_eq!(response.0, status, "{response:?}");
    assert_eq!(response.1, "application/problem+json", "{response:?}");
    for field in ["type", "title", "status", "detail"] {
        assert!(
            response.2.get(field).is_some(),
            "problem without {field}: {response:?}"
        );
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
    assert_eq!(
        vps2["prices"]["AUD"],
        json!({"monthly": "15.00", "hourly": "0.020548"})
    );

    // Who may open an account.
    problem(&api.post("/v1/accounts", None, json!({})).await, 401);
    problem(
        &api.post("/v1/accounts", Some("not-a-token"), json!({}))
            .await,
        401,
    );
    let body =
        json!({"name": "Ada", "email": "ada@example.com", "currency": "AUD", "country": "AU"});
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
        (
            "email",
            json!({"name": "X", "email": "nope", "currency": "AUD", "country": "AU"}),
        ),
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

    let own = api
        .get(&format!("/v1/accounts/{account}"), Some(&customer))
        .await;
    assert_eq!(own.0, 200);
    assert_eq!(
        (
            own.2["balance"].as_str(),
            own.2["available"].as_str(),
            own.2["currency"].as_str()
        ),
        (Some("0.00"), Some("0.00"), Some("AUD"))
    );
    problem(
        &api.get(&format!("/v1/accounts/{account}"), Some(&other_customer))
            .await,
        404,
    );
    problem(
        &api.get("/v1/accounts/not-a-uuid", Some(&customer)).await,
        404,
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), Some(&finance))
            .await
            .0,
        200
    );
    assert_eq!(
        api.get("/v1/accounts?query=ada", Some(&finance)).await.2["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    problem(
        &api.get("/v1/accounts?query=ada", Some(&customer)).await,
        403,
    );

    // Adjustments: money as strings, a reason, never below zero.
    let adjust = |token: String, body: Value| {
        let api = &api;
        let account = account.clone();
        async move {
            api.post(
                &format!("/v1/admin/accounts/{account}/adjustments"),
                Some(&token),
                body,
            )
            .await
        }
    };
    let response = adjust(ADMIN.into(), json!({"amount": 25, "reason": "goodwill"})).await;
    problem(&response, 422);
    assert!(
        response.2["detail"]
            .as_str()
            .unwrap()
            .contains("not a JSON number"),
        "{response:?}"
    );
    problem(
        &adjust(
            ADMIN.into(),
            json!({"amount": "1.0000001", "reason": "goodwill"}),
        )
        .await,
        422,
    );
    problem(&adjust(ADMIN.into(), json!({"amount": "25.00"})).await, 422);
    problem(
        &adjust(customer.clone(), json!({"amount": "25.00", "reason": "me"})).await,
        403,
    );
    let response = adjust(
        ADMIN.into(),
        json!({"amount": "25.00", "reason": "goodwill"}),
    )
    .await;
    assert_eq!(response.0, 201, "{response:?}");
    assert_eq!(
        response.2["account"]["balance"], "25.00",
        "the response reflects its own write"
    );
    problem(
        &adjust(
            ADMIN.into(),
            json!({"amount": "-25.01", "reason": "correction"}),
        )
        .await,
        402,
    );
    assert_eq!(
        adjust(
            ADMIN.into(),
            json!({"amount": "-5.50", "reason": "correction"})
        )
        .await
        .0,
        201
    );

    // The statement, cursor-paginated.
    let page = api
        .get(
            &format!("/v1/accounts/{account}/transactions?limit=1"),
            Some(&customer),
        )
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
        (
            next.2["items"][0]["amount"].as_str(),
            next.2["items"][0]["balance_after"].as_str()
        ),
        (Some("-5.50"), Some("19.50"))
    );
    assert_eq!(next.2["next_cursor"], Value::Null);
    problem(
        &api.get(
            &format!("/v1/accounts/{account}/transactions?cursor=abc"),
            Some(&customer),
        )
        .await,
        422,
    );
    problem(
        &api.get(
            &format!("/v1/accounts/{account}/transactions"),
            Some(&other_customer),
        )
        .await,
        404,
    );

    // The books, for finance.
    let books = api.get("/v1/ledger/trial-balance", Some(&finance)).await;
    assert_eq!(books.0, 200);
    assert_eq!(books.2["total_debit"], books.2["total_credit"]);
    problem(
        &api.get("/v1/ledger/trial-balance", Some(&customer)).await,
        403,
    );
    problem(
        &api.get("/v1/ledger/trial-balance?as_of=yesterday", Some(&finance))
            .await,
        422,
    );

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
        (
            raw.status().as_u16(),
            raw.headers()["content-type"].to_str().unwrap()
        ),
        (400, "application/problem+json")
    );
    let huge =
        json!({"name": "x".repeat(100_000), "email": "a@b.co", "currency": "AUD", "country": "AU"});
    problem(&api.post("/v1/accounts", Some(ADMIN), huge).await, 413);

    // The dev clock moves forward only.
    let now = api
        .post(
            "/v1/dev/clock",
            None,
            json!({"now": "2030-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(now.0, 200, "{now:?}");
    problem(
        &api.post(
            "/v1/dev/clock",
            None,
            json!({"now": "2029-01-01T00:00:00Z"}),
        )
        .await,
        422,
    );
    assert_eq!(
        api.post("/v1/dev/clock", None, json!({"advance_seconds": 3600}))
            .await
            .2["now"],
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
    problem(
        &api.post("/v1/dev/clock", None, json!({"advance_seconds": 60}))
            .await,
        404,
    );
}
