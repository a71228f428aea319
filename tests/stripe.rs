//! Top-ups are credited only by a signed Stripe webhook, once, however often it is delivered.
//! Payloads are built from Stripe's own object shapes in fixtures/stripe.

mod support;
use support::Server;

use ledger::testing::TestDatabase;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ADMIN: &str = "bootstrap-admin-token-for-tests";
const SECRET: &str = "whsec_test_secret";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");

fn serve(db: &TestDatabase, secret: Option<&str>) -> Server {
    support::start(
        db,
        &["serve", "--dev", "--bind", "127.0.0.1:0"],
        &[("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)), ("STRIPE_WEBHOOK_SECRET", secret)],
    )
    .0
}

/// The server against a Stripe double (wiremock at Stripe's HTTP boundary): Checkout Sessions
/// and refunds go there. `dev` keeps the dev clock and routes.
fn serve_with_stripe(db: &TestDatabase, stripe: &MockServer, dev: bool) -> Server {
    let uri = stripe.uri();
    let mut args = vec!["serve", "--bind", "127.0.0.1:0"];
    if dev {
        args.push("--dev");
    }
    support::start(
        db,
        &args,
        &[
            ("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)),
            ("STRIPE_WEBHOOK_SECRET", Some(SECRET)),
            ("STRIPE_SECRET_KEY", Some("sk_test_51BillingLedgerTests")),
            ("STRIPE_API_BASE", Some(&uri)),
            ("BILLING_PROVIDER_BACKOFF_MS", Some("20")),
        ],
    )
    .0
}

/// Stripe's answer to a created Checkout Session: the fixture, with the session's own fields.
fn created_session(topup_id_from: &wiremock::Request) -> Value {
    let form = form(topup_id_from);
    let mut session = fixture("checkout_session");
    session["client_reference_id"] = json!(form["client_reference_id"]);
    session["metadata"] = json!({"topup_id": form["metadata[topup_id]"], "account_id": form["metadata[account_id]"]});
    session["amount_total"] = json!(form["line_items[0][price_data][unit_amount]"].parse::<i64>().unwrap());
    session["currency"] = json!(form["line_items[0][price_data][currency]"]);
    session
}

/// A form-encoded request body as a map.
fn form(request: &wiremock::Request) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

/// Mounts Stripe's Checkout Session and refund endpoints on `stripe`, answering as Stripe does.
async fn stripe_answers(stripe: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .and(header("authorization", "Bearer sk_test_51BillingLedgerTests"))
        .respond_with(|request: &wiremock::Request| ResponseTemplate::new(200).set_body_json(created_session(request)))
        .mount(stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .and(header("authorization", "Bearer sk_test_51BillingLedgerTests"))
        .respond_with(|request: &wiremock::Request| {
            let form = form(request);
            let mut refund = fixture("refund");
            refund["id"] = json!(format!("re_{}", &form["metadata[refund_id]"].replace('-', "")[..24]));
            refund["amount"] = json!(form["amount"].parse::<i64>().unwrap());
            refund["payment_intent"] = json!(form["payment_intent"]);
            refund["metadata"] = json!({"refund_id": form["metadata[refund_id]"], "topup_id": form["metadata[topup_id]"]});
            refund["status"] = json!("pending");
            ResponseTemplate::new(200).set_body_json(refund)
        })
        .mount(stripe)
        .await;
}

/// What Stripe received at `path`, once `count` requests have arrived (bounded wait).
async fn received_at(stripe: &MockServer, at: &str, count: usize) -> Vec<wiremock::Request> {
    for _ in 0..200 {
        let requests: Vec<wiremock::Request> = stripe
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|request| request.url.path() == at)
            .collect();
        if requests.len() >= count {
            return requests;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("Stripe did not receive {count} requests at {at}");
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/{name}.json")).expect("the shared Stripe fixtures")).unwrap()
}

/// A `checkout.session.completed` event for `topup_id`, shaped like Stripe's.
fn completed_checkout(event_id: &str, topup_id: &str, amount_minor: i64, currency: &str) -> Vec<u8> {
    let mut session = fixture("checkout_session");
    session["amount_total"] = json!(amount_minor);
    session["currency"] = json!(currency);
    session["client_reference_id"] = json!(topup_id);
    session["metadata"] = json!({"topup_id": topup_id});
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    let mut event = fixture("event");
    event["id"] = json!(event_id);
    event["type"] = json!("checkout.session.completed");
    event["data"]["object"] = session;
    serde_json::to_vec(&event).unwrap()
}

fn sign(body: &[u8], secret: &str, offset_seconds: i64) -> String {
    adapters::stripe::webhook::sign(secret, body, chrono::Utc::now().timestamp() + offset_seconds)
}

async fn deliver(client: &reqwest::Client, base: &str, body: Vec<u8>, signature: Option<String>) -> (u16, Value) {
    let mut request = client
        .post(format!("{base}/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn customer_with_topup(client: &reqwest::Client, base: &str, amount: &str) -> (String, String, String) {
    let (account, token) = support::customer(base, ADMIN, "AUD", "AU").await;
    let response = client
        .post(format!("{base}/v1/accounts/{account}/topups"))
        .bearer_auth(&token)
        .json(&json!({"amount": amount}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let topup: Value = response.json().await.unwrap();
    assert_eq!(
        (topup["amount"].as_str(), topup["status"].as_str()),
        (Some(amount), Some("pending"))
    );
    let checkout_url = topup["checkout_url"].as_str().unwrap();
    assert!(
        checkout_url.starts_with(&format!("{base}/dev/checkout/")) || checkout_url.starts_with("https://checkout.stripe.com/"),
        "{checkout_url}"
    );
    (account, token, topup["topup_id"].as_str().unwrap().to_string())
}

async fn balance(client: &reqwest::Client, base: &str, account: &str, token: &str) -> String {
    let account: Value = client
        .get(format!("{base}/v1/accounts/{account}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    account["balance"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_paid_checkout_delivered_five_times_at_once_is_credited_once() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let (account, token, topup_id) = customer_with_topup(&client, &server.base, "25.00").await;
    assert_eq!(
        balance(&client, &server.base, &account, &token).await,
        "0.00",
        "the request alone credits nothing"
    );

    let body = completed_checkout("evt_1TopUpPaidOnce", &topup_id, 2_500, "aud");
    let signature = sign(&body, SECRET, 0);
    let mut deliveries = Vec::new();
    for _ in 0..5 {
        let (client, base, body, signature) = (client.clone(), server.base.clone(), body.clone(), signature.clone());
        deliveries.push(tokio::spawn(async move { deliver(&client, &base, body, Some(signature)).await }));
    }
    let mut fresh = 0;
    for delivery in deliveries {
        let (status, answer) = delivery.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        if answer["duplicate"] == false {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(balance(&client, &server.base, &account, &token).await, "25.00");
    let statement: Value = client
        .get(format!("{}/v1/accounts/{account}/transactions", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(statement["items"].as_array().unwrap().len(), 1);
    assert_eq!(statement["items"][0]["reference"], topup_id.as_str());

    // A later redelivery of the same event, and another event for the same payment, change nothing.
    assert_eq!(
        deliver(&client, &server.base, body.clone(), Some(sign(&body, SECRET, 0))).await.1["duplicate"],
        true
    );
    let again = completed_checkout("evt_1SamePaymentOtherEvent", &topup_id, 2_500, "aud");
    assert_eq!(
        deliver(&client, &server.base, again.clone(), Some(sign(&again, SECRET, 0))).await.0,
        200
    );
    assert_eq!(balance(&client, &server.base, &account, &token).await, "25.00");
}

/// A paid `checkout.session.completed` for `topup_id`, paid by `payment_intent` in
/// `amount_minor` of `currency`, with Stripe's currency conversion when it is given.
fn paid_checkout(event_id: &str, topup_id: &str, payment_intent: &str, amount_minor: i64, currency: &str, conversion: Value) -> Vec<u8> {
    let body = completed_checkout(event_id, topup_id, amount_minor, currency);
    let mut event: Value = serde_json::from_slice(&body).unwrap();
    event["data"]["object"]["payment_intent"] = json!(payment_intent);
    event["data"]["object"]["currency_conversion"] = conversion;
    serde_json::to_vec(&event).unwrap()
}

async fn topup_events(client: &reqwest::Client, base: &str, topup_id: &str) -> Vec<String> {
    let events: Value = client
        .get(format!("{base}/v1/ledger/events?stream=topup-{topup_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["event_type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_payment_in_another_currency_or_of_another_amount_is_held_for_review_and_credits_nothing() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let base = &server.base;
    // AUD 10.00 asked, 150,000 JPY paid: not 150,000 AUD, and not anything until a person looks.
    let (account, token, topup_id) = customer_with_topup(&client, base, "10.00").await;
    let body = paid_checkout("evt_1PaidInYen", &topup_id, "pi_yen", 150_000, "jpy", Value::Null);
    let (status, answer) = deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(balance(&client, base, &account, &token).await, "0.00");
    assert_eq!(
        topup_events(&client, base, &topup_id).await,
        ["TopUpRequested", "PaymentHeldForReview"]
    );
    // Redelivered, it is still held once.
    deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await;
    let again = paid_checkout("evt_1PaidInYenAgain", &topup_id, "pi_yen", 150_000, "jpy", Value::Null);
    deliver(&client, base, again.clone(), Some(sign(&again, SECRET, 0))).await;
    assert_eq!(topup_events(&client, base, &topup_id).await.len(), 2);
    assert_eq!(balance(&client, base, &account, &token).await, "0.00");
    // Resolved by an admin: accepted for at most what was asked, in the account's currency.
    let resolve = |amount: &str, token: &str| {
        let (client, base, topup_id, amount, token) = (
            client.clone(),
            base.to_string(),
            topup_id.clone(),
            amount.to_string(),
            token.to_string(),
        );
        async move {
            let response = client
                .post(format!("{base}/v1/admin/topups/{topup_id}/resolution"))
                .bearer_auth(token)
                .json(&json!({"amount": amount, "reason": "settled 10.00 AUD after review"}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    // Another held payment, refunded at Stripe instead: recorded (not refused until Stripe gives
    // up), nothing moves, and it can no longer be accepted.
    let (other_account, other_token, other_topup) = customer_with_topup(&client, base, "10.00").await;
    let body = paid_checkout(
        "evt_1HeldThenRefunded",
        &other_topup,
        "pi_held_refunded",
        150_000,
        "jpy",
        Value::Null,
    );
    assert_eq!(deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await.0, 200);
    let mut charge = fixture("charge");
    charge["payment_intent"] = json!("pi_held_refunded");
    charge["amount"] = json!(150_000);
    charge["amount_refunded"] = json!(150_000);
    charge["currency"] = json!("jpy");
    charge["refunded"] = json!(true);
    let mut event = fixture("event");
    event["id"] = json!("evt_1HeldRefundedAtStripe");
    event["type"] = json!("charge.refunded");
    event["data"]["object"] = charge;
    let body = serde_json::to_vec(&event).unwrap();
    let (status, answer) = deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        topup_events(&client, base, &other_topup).await,
        ["TopUpRequested", "PaymentHeldForReview", "HeldPaymentReturned"]
    );
    let refused = client
        .post(format!("{base}/v1/admin/topups/{other_topup}/resolution"))
        .bearer_auth(ADMIN)
        .json(&json!({"amount": "10.00", "reason": "too late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409, "a payment gone back to the card is not accepted");
    assert_eq!(balance(&client, base, &other_account, &other_token).await, "0.00");

    assert_eq!(resolve("10.00", &token).await.0, 403, "customers do not resolve their own payments");
    assert_eq!(resolve("150000.00", ADMIN).await.0, 422, "never more than was asked");
    let (status, resolved) = resolve("10.00", ADMIN).await;
    assert_eq!(
        (status, resolved["account"]["balance"].as_str()),
        (201, Some("10.00")),
        "{resolved}"
    );
    assert_eq!(resolve("10.00", ADMIN).await.0, 409, "resolved once");
    assert_eq!(balance(&client, base, &account, &token).await, "10.00");

    // More, or less, than was asked in the right currency: held too.
    for (event_id, payment, minor) in [("evt_1PaidMore", "pi_more", 100_000), ("evt_1PaidLess", "pi_less", 500)] {
        let (account, token, topup_id) = customer_with_topup(&client, base, "10.00").await;
        let body = paid_checkout(event_id, &topup_id, payment, minor, "aud", Value::Null);
        assert_eq!(deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await.0, 200);
        assert_eq!(balance(&client, base, &account, &token).await, "0.00");
        assert_eq!(topup_events(&client, base, &topup_id).await[1], "PaymentHeldForReview");
    }

    // Presented in yen, settled in the Australian dollars asked (Adaptive Pricing): credited.
    let (account, token, topup_id) = customer_with_topup(&client, base, "10.00").await;
    let conversion = json!({"amount_subtotal": 1000, "amount_total": 1000, "fx_rate": "97.5", "source_currency": "aud"});
    let body = paid_checkout("evt_1PaidConverted", &topup_id, "pi_converted", 975, "jpy", conversion);
    assert_eq!(deliver(&client, base, body.clone(), Some(sign(&body, SECRET, 0))).await.0, 200);
    assert_eq!(balance(&client, base, &account, &token).await, "10.00");
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_unknown_events() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let (account, token, topup_id) = customer_with_topup(&client, &server.base, "10.00").await;
    let body = completed_checkout("evt_1Refused", &topup_id, 1_000, "aud");
    for (signature, reason) in [
        (None, "missing"),
        (Some(sign(&body, "whsec_wrong", 0)), "no v1 signature matches"),
        (Some(sign(&body, SECRET, -301)), "more than 300 s"),
        (Some("t=abc".to_string()), "malformed"),
    ] {
        let (status, problem) = deliver(&client, &server.base, body.clone(), signature).await;
        assert_eq!(status, 400, "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains(reason), "{problem}");
    }
    // A body changed after signing is refused.
    let signature = sign(&body, SECRET, 0);
    let tampered = completed_checkout("evt_1Refused", &topup_id, 1_000_000, "aud");
    assert_eq!(deliver(&client, &server.base, tampered, Some(signature)).await.0, 400);
    assert_eq!(balance(&client, &server.base, &account, &token).await, "0.00");

    // An event type the ledger does not act on is acknowledged and recorded.
    let unknown = serde_json::to_vec(&fixture("event")).unwrap();
    let (status, answer) = deliver(&client, &server.base, unknown.clone(), Some(sign(&unknown, SECRET, 0))).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(false)));
    let recorded: (String, Value) =
        sqlx::query_as("SELECT event_type, payload FROM events WHERE stream_id = 'stripe-event-evt_1Pgc76B7WZ01zgkWwyRHS12y'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded.0, "ProviderEventReceived");
    assert_eq!(
        (recorded.1["event_type"].as_str(), recorded.1["acted_on"].as_bool()),
        (Some("plan.created"), Some(false))
    );

    // Money: amounts as strings with whole cents.
    for (amount, status) in [
        (json!(25), 422),
        (json!("0"), 422),
        (json!("10.001"), 422),
        (json!("-5"), 422),
        (json!("20000"), 422),
    ] {
        let response = client
            .post(format!("{}/v1/accounts/{account}/topups", server.base))
            .bearer_auth(&token)
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{amount}");
    }
}

#[tokio::test]
async fn the_dev_checkout_page_pays_through_a_signed_webhook() {
    let db = TestDatabase::new().await;
    let server = serve(&db, None);
    let client = reqwest::Client::new();
    let (account, token, topup_id) = customer_with_topup(&client, &server.base, "12.34").await;
    let page = client
        .get(format!("{}/dev/checkout/{topup_id}", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Pay AUD 12.34"), "{page}");
    let paid = client
        .post(format!("{}/dev/checkout/{topup_id}/pay", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(paid.status().as_u16(), 200);
    assert!(paid.text().await.unwrap().contains("was added to your wallet"));
    assert_eq!(balance(&client, &server.base, &account, &token).await, "12.34");
    // The dev secret is whsec_dev: a webhook signed with it is accepted.
    let body = completed_checkout("evt_1DevSecret", &topup_id, 1_234, "aud");
    assert_eq!(
        deliver(
            &client,
            &server.base,
            body.clone(),
            Some(adapters::stripe::webhook::sign("whsec_dev", &body, chrono::Utc::now().timestamp()))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        balance(&client, &server.base, &account, &token).await,
        "12.34",
        "the same payment again credits nothing"
    );
    // A card refund in dev mode: debited when asked, then completed by dev mode's own signed
    // `refund.updated`, as Stripe would; the wallet stays debited, once.
    let refunded = client
        .post(format!("{}/v1/admin/topups/{topup_id}/refunds", server.base))
        .bearer_auth(ADMIN)
        .json(&json!({"amount": "2.34", "reason": "duplicate order"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refunded.status().as_u16(), 201);
    let mut completed = 0i64;
    for _ in 0..100 {
        completed = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'CardRefundCompleted'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if completed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(completed, 1);
    assert_eq!(balance(&client, &server.base, &account, &token).await, "10.00");
}

#[tokio::test]
async fn declined_suspended_warned_resumed_by_a_top_up_and_terminated_when_unpaid() {
    let db = TestDatabase::new().await;
    let server = serve(&db, None);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let clock = |body: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .post(format!("{base}/v1/dev/clock"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    clock(json!({"now": "2027-08-01T09:30:00Z"})).await;
    // Two servers on 0.10 USD: vps-4g costs 0.027397 an hour (no US tax).
    let account: Value = client
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "Low", "email": "low@example.com", "currency": "USD", "country": "US"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let account = account["id"].as_str().unwrap().to_string();
    let key: Value = client
        .post(format!("{base}/v1/accounts/{account}/api-keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"role": "customer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = key["token"].as_str().unwrap().to_string();
    client
        .post(format!("{base}/v1/admin/accounts/{account}/adjustments"))
        .bearer_auth(ADMIN)
        .json(&json!({"amount": "0.10", "reason": "trial"}))
        .send()
        .await
        .unwrap();
    let order: Value = client
        .post(format!("{base}/v1/accounts/{account}/orders"))
        .bearer_auth(&token)
        .json(&json!({"plan_id": "vps-4g", "location": "nyc"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let server_id = order["server_id"].as_str().unwrap().to_string();
    support::wait_for(&base, &token, &server_id, |status| status == "needs_setup").await;
    let status = |id: String| {
        let (base, token) = (base.clone(), token.clone());
        async move { support::server_status(&base, &token, &id).await }
    };
    // 10:00 is charged, leaving 0.045206: under 24 hours of runway, one warning.
    let due = clock(json!({"now": "2027-08-01T10:10:00Z"})).await;
    assert_eq!(
        (due["due"]["slots_charged"].as_u64(), due["due"]["low_balance_warnings"].as_u64()),
        (Some(1), Some(1)),
        "{due}"
    );
    // 11:00 is affordable (0.10 - 3 * 0.027397 = 0.017809 left); 12:00 is declined.
    let due = clock(json!({"now": "2027-08-01T12:10:00Z"})).await;
    assert_eq!(
        (
            due["due"]["slots_charged"].as_u64(),
            due["due"]["slots_declined"].as_u64(),
            due["due"]["low_balance_warnings"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{due}"
    );
    assert_eq!(status(server_id.clone()).await, "suspended");
    let account_view: Value = client
        .get(format!("{base}/v1/accounts/{account}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (account_view["balance"].as_str(), account_view["low_balance"].as_bool()),
        (Some("0.017809"), Some(true)),
        "{account_view}"
    );
    // Suspended servers are not billed.
    assert_eq!(clock(json!({"advance_seconds": 3 * 3600})).await["due"]["slots_charged"], 0);

    // A top-up through the checkout resumes the server and charges the slot in progress (15:00).
    let topup: Value = client
        .post(format!("{base}/v1/accounts/{account}/topups"))
        .bearer_auth(&token)
        .json(&json!({"amount": "5.00"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let topup_id = topup["topup_id"].as_str().unwrap();
    assert_eq!(
        client
            .post(format!("{base}/dev/checkout/{topup_id}/pay"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(status(server_id.clone()).await, "needs_setup");
    let account_view: Value = client
        .get(format!("{base}/v1/accounts/{account}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account_view["balance"], "4.990412", "0.017809 + 5.00 - 0.027397");
    clock(json!({"advance_seconds": 60})).await;
    let account_view: Value = client
        .get(format!("{base}/v1/accounts/{account}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account_view["low_balance"], false, "182 hours of runway: the warning is cleared");

    // Unpaid for seven days: terminated. 4.990412 lasts 182 hours, then a week passes.
    let drained = clock(json!({"advance_seconds": 190 * 3600})).await;
    assert_eq!(drained["due"]["slots_declined"], 1, "{drained}");
    assert_eq!(status(server_id.clone()).await, "suspended");
    assert_eq!(
        clock(json!({"advance_seconds": 6 * 24 * 3600})).await["due"]["servers_terminated"],
        0
    );
    let week = clock(json!({"advance_seconds": 24 * 3600})).await;
    assert_eq!(week["due"]["servers_terminated"], 1, "{week}");
    assert_eq!(status(server_id).await, "deleted");
}

fn dispute_event(event_id: &str, kind: &str, dispute_id: &str, payment_intent: &str, amount_minor: i64, status: &str) -> Vec<u8> {
    let mut dispute = fixture("dispute");
    dispute["id"] = json!(dispute_id);
    dispute["payment_intent"] = json!(payment_intent);
    dispute["amount"] = json!(amount_minor);
    dispute["currency"] = json!("aud");
    dispute["status"] = json!(status);
    let mut event = fixture("event");
    event["id"] = json!(event_id);
    event["type"] = json!(kind);
    event["data"]["object"] = dispute;
    serde_json::to_vec(&event).unwrap()
}

/// A dispute event whose dispute lists its balance transactions: `movements` are their amounts
/// (negative: funds withdrawn; positive: funds given back).
fn dispute_with_movements(event_id: &str, kind: &str, dispute_id: &str, status: &str, movements: &[i64]) -> Vec<u8> {
    let body = dispute_event(event_id, kind, dispute_id, "pi_1PgafyB7WZ01zgkWSjxsAJo3", 1_000, status);
    let mut event: Value = serde_json::from_slice(&body).unwrap();
    let transaction = fixture("balance_transaction");
    event["data"]["object"]["balance_transactions"] = movements
        .iter()
        .map(|amount| {
            let mut transaction = transaction.clone();
            transaction["amount"] = json!(amount);
            transaction["reporting_category"] = json!(if *amount < 0 { "dispute" } else { "dispute_reversal" });
            transaction
        })
        .collect();
    serde_json::to_vec(&event).unwrap()
}

#[tokio::test]
async fn an_inquiry_withdraws_nothing_and_funds_given_back_return_whatever_the_closing_status() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "10.00").await;
    let send = |body: Vec<u8>| {
        let (client, base) = (client.clone(), base.clone());
        async move { deliver(&client, &base, body.clone(), Some(sign(&body, SECRET, 0))).await }
    };
    assert_eq!(send(completed_checkout("evt_1PaidInquiry", &topup_id, 1_000, "aud")).await.0, 200);

    // An inquiry (Stripe's `warning_*` statuses) takes no money: nothing is debited.
    let inquiry = dispute_event(
        "evt_1Inquiry",
        "charge.dispute.created",
        "dp_1Inquiry",
        "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        1_000,
        "warning_needs_response",
    );
    assert_eq!(send(inquiry).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");
    let closed = dispute_event(
        "evt_1InquiryClosed",
        "charge.dispute.closed",
        "dp_1Inquiry",
        "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        1_000,
        "warning_closed",
    );
    assert_eq!(send(closed).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");

    // A chargeback: its funds are withdrawn (the balance transaction says so) ...
    let created = dispute_with_movements(
        "evt_1Chargeback",
        "charge.dispute.created",
        "dp_1Chargeback",
        "needs_response",
        &[-1_000],
    );
    assert_eq!(send(created).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "0.00");
    // ... given back before it closes (funds_reinstated) ...
    let back = dispute_with_movements(
        "evt_1Reinstated",
        "charge.dispute.funds_reinstated",
        "dp_1Chargeback",
        "under_review",
        &[-1_000, 1_000],
    );
    assert_eq!(send(back).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");
    // ... and closed under a status that is not called "won": nothing moves again.
    let closed = dispute_with_movements(
        "evt_1ChargebackClosed",
        "charge.dispute.closed",
        "dp_1Chargeback",
        "prevented",
        &[-1_000, 1_000],
    );
    assert_eq!(send(closed).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");

    // Another, given back only at its close, whatever the status says.
    let created = dispute_with_movements("evt_1Second", "charge.dispute.created", "dp_1Second", "needs_response", &[-1_000]);
    assert_eq!(send(created).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "0.00");
    let closed = dispute_with_movements("evt_1SecondClosed", "charge.dispute.closed", "dp_1Second", "lost", &[-1_000, 1_000]);
    assert_eq!(send(closed).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");
}

#[tokio::test]
async fn disputes_debit_below_zero_suspend_and_settle_and_wait_for_their_payment() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let base = server.base.clone();
    // Everything below happens within the 10:00 slot of the simulated clock.
    client
        .post(format!("{base}/v1/dev/clock"))
        .json(&json!({"now": "2027-10-01T10:15:00Z"}))
        .send()
        .await
        .unwrap();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "10.00").await;
    let send = |body: Vec<u8>| {
        let (client, base) = (client.clone(), base.clone());
        async move { deliver(&client, &base, body.clone(), Some(sign(&body, SECRET, 0))).await }
    };

    // The dispute arrives before the payment it disputes: refused for now, nothing recorded.
    let early = dispute_event(
        "evt_1DisputeEarly",
        "charge.dispute.created",
        "dp_1Early",
        "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        2_000,
        "needs_response",
    );
    let (status, problem) = send(early.clone()).await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("not known yet"));
    // The payment settles (the checkout fixture's payment intent is pi_1PgafyB7WZ01zgkWSjxsAJo3).
    assert_eq!(send(completed_checkout("evt_1Paid", &topup_id, 1_000, "aud")).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "10.00");
    let order: Value = client
        .post(format!("{base}/v1/accounts/{account}/orders"))
        .bearer_auth(&token)
        .json(&json!({"plan_id": "vps-1g", "location": "syd"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let server_id = order["server_id"].as_str().unwrap().to_string();
    support::wait_for(&base, &token, &server_id, |status| status == "needs_setup").await;
    let status_of = |id: String| {
        let (base, token) = (base.clone(), token.clone());
        async move { support::server_status(&base, &token, &id).await }
    };
    // Redelivered, the dispute now applies: 20.00 taken back from a wallet of 9.987945.
    let (status, answer) = send(early.clone()).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(false)), "{answer}");
    assert_eq!(
        balance(&client, &base, &account, &token).await,
        "-10.012055",
        "the one way below zero"
    );
    assert_eq!(status_of(server_id.clone()).await, "suspended");
    assert_eq!(send(early).await.1["duplicate"], true);

    // Won: the money comes back and the server runs again.
    let closed = dispute_event(
        "evt_1DisputeWon",
        "charge.dispute.closed",
        "dp_1Early",
        "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        2_000,
        "won",
    );
    assert_eq!(send(closed).await.0, 200);
    assert_eq!(status_of(server_id).await, "needs_setup");
    // vps-1g in AUD: 0.010959 + 0.001096 GST for the first hour; its slot is not charged again.
    assert_eq!(balance(&client, &base, &account, &token).await, "9.987945");
}

fn refund_event(event_id: &str, refund_id: &str, topup_id: &str, amount_minor: i64, status: &str) -> Vec<u8> {
    let mut refund = fixture("refund");
    refund["amount"] = json!(amount_minor);
    refund["currency"] = json!("aud");
    refund["status"] = json!(status);
    refund["metadata"] = json!({"refund_id": refund_id, "topup_id": topup_id});
    let mut event = fixture("event");
    event["id"] = json!(event_id);
    event["type"] = json!("refund.updated");
    event["data"]["object"] = refund;
    serde_json::to_vec(&event).unwrap()
}

#[tokio::test]
async fn card_refunds_are_bounded_debited_when_asked_and_given_back_if_they_fail() {
    let db = TestDatabase::new().await;
    let stripe = MockServer::start().await;
    stripe_answers(&stripe).await;
    let server = serve_with_stripe(&db, &stripe, true);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "25.00").await;
    let send = |body: Vec<u8>| {
        let (client, base) = (client.clone(), base.clone());
        async move { deliver(&client, &base, body.clone(), Some(sign(&body, SECRET, 0))).await }
    };
    let refund = |amount: &str, token: &str| {
        let (client, base, token, topup_id, amount) = (
            client.clone(),
            base.clone(),
            token.to_string(),
            topup_id.clone(),
            amount.to_string(),
        );
        async move {
            let response = client
                .post(format!("{base}/v1/admin/topups/{topup_id}/refunds"))
                .bearer_auth(&token)
                .json(&json!({"amount": amount, "reason": "customer asked"}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(refund("5.00", ADMIN).await.0, 409, "nothing to refund before the top-up is paid");
    assert_eq!(send(completed_checkout("evt_1RefundPaid", &topup_id, 2_500, "aud")).await.0, 200);

    assert_eq!(refund("25.01", ADMIN).await.0, 422, "more than the top-up");
    assert_eq!(refund("1.001", ADMIN).await.0, 422, "not whole cents");
    assert_eq!(refund("5.00", &token).await.0, 403, "customers do not refund themselves");
    let (status, requested) = refund("10.00", ADMIN).await;
    assert_eq!(
        (status, requested["status"].as_str(), requested["account"]["balance"].as_str()),
        (201, Some("requested"), Some("15.00")),
        "{requested}"
    );
    let first_refund = requested["refund_id"].as_str().unwrap().to_string();
    // The outbox asks Stripe for it, once, with our ids and an idempotency key of its own.
    let asked = received_at(&stripe, "/v1/refunds", 1).await;
    let body = form(&asked[0]);
    assert_eq!(
        (
            body["amount"].as_str(),
            body["payment_intent"].as_str(),
            body["metadata[refund_id]"].as_str(),
            body["metadata[topup_id]"].as_str(),
            asked[0].headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
        ),
        (
            "1000",
            "pi_1PgafyB7WZ01zgkWSjxsAJo3",
            first_refund.as_str(),
            topup_id.as_str(),
            Some(format!("refund-{first_refund}").as_str())
        )
    );
    assert_eq!(
        refund("15.01", ADMIN).await.0,
        422,
        "more than the top-up less what is being refunded"
    );

    // Stripe reports the refund failed: the money comes back, once.
    let failed = refund_event("evt_1RefundFailed", &first_refund, &topup_id, 1_000, "failed");
    assert_eq!(send(failed.clone()).await.1["duplicate"], false);
    assert_eq!(balance(&client, &base, &account, &token).await, "25.00");
    assert_eq!(send(failed).await.1["duplicate"], true);
    // A later "succeeded" for a failed refund changes nothing.
    assert_eq!(
        send(refund_event("evt_1RefundLateSuccess", &first_refund, &topup_id, 1_000, "succeeded"))
            .await
            .0,
        200
    );
    assert_eq!(balance(&client, &base, &account, &token).await, "25.00");

    // Another refund succeeds: the wallet stays debited.
    let (_, second) = refund("6.50", ADMIN).await;
    let second_refund = second["refund_id"].as_str().unwrap().to_string();
    let asked = received_at(&stripe, "/v1/refunds", 2).await;
    assert_eq!(form(&asked[1])["amount"], "650");
    assert_eq!(
        send(refund_event("evt_1RefundPending", &second_refund, &topup_id, 650, "pending"))
            .await
            .1["acted_on"],
        false
    );
    assert_eq!(
        send(refund_event("evt_1RefundSucceeded", &second_refund, &topup_id, 650, "succeeded"))
            .await
            .0,
        200
    );
    assert_eq!(balance(&client, &base, &account, &token).await, "18.50");
    let statement: Value = client
        .get(format!("{base}/v1/accounts/{account}/transactions"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = statement["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["topup", "card_refund", "card_refund_failed", "card_refund"]);

    // `charge.refunded` reports the payment's total refunded. 6.50 is ours and known: nothing moves.
    let charge_refunded = |event_id: &str, payment: &str, refunded_minor: i64| {
        let mut charge = fixture("charge");
        charge["payment_intent"] = json!(payment);
        charge["amount"] = json!(2_500);
        charge["amount_refunded"] = json!(refunded_minor);
        charge["currency"] = json!("aud");
        charge["refunded"] = json!(refunded_minor == 2_500);
        let mut event = fixture("event");
        event["id"] = json!(event_id);
        event["type"] = json!("charge.refunded");
        event["data"]["object"] = charge;
        serde_json::to_vec(&event).unwrap()
    };
    let payment = "pi_1PgafyB7WZ01zgkWSjxsAJo3";
    assert_eq!(send(charge_refunded("evt_1ChargeRefundedOurs", payment, 650)).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "18.50");
    // 10.00 in all: 3.50 was refunded from Stripe's dashboard. The wallet is debited for it, once,
    // and Stripe is not asked for it again.
    let dashboard = charge_refunded("evt_1ChargeRefundedDashboard", payment, 1_000);
    assert_eq!(send(dashboard.clone()).await.1["duplicate"], false);
    assert_eq!(balance(&client, &base, &account, &token).await, "15.00");
    assert_eq!(send(dashboard).await.1["duplicate"], true);
    assert_eq!(balance(&client, &base, &account, &token).await, "15.00");
    // An earlier report arriving late knows less than the ledger: nothing moves.
    assert_eq!(send(charge_refunded("evt_1ChargeRefundedLate", payment, 650)).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "15.00");
    // Out of order: the refund of a payment arrives before the payment itself. It is refused (409)
    // so Stripe delivers it again, and acts once the top-up is paid.
    let response = client
        .post(format!("{base}/v1/accounts/{account}/topups"))
        .bearer_auth(&token)
        .json(&json!({"amount": "5.00"}))
        .send()
        .await
        .unwrap();
    let second_topup = response.json::<Value>().await.unwrap()["topup_id"].as_str().unwrap().to_string();
    let early_refund = charge_refunded("evt_1ChargeRefundedEarly", "pi_1SecondTopUp", 200);
    assert_eq!(send(early_refund.clone()).await.0, 409);
    assert_eq!(balance(&client, &base, &account, &token).await, "15.00");
    let mut paid: Value = serde_json::from_slice(&completed_checkout("evt_1SecondPaid", &second_topup, 500, "aud")).unwrap();
    paid["data"]["object"]["payment_intent"] = json!("pi_1SecondTopUp");
    assert_eq!(send(serde_json::to_vec(&paid).unwrap()).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "20.00");
    assert_eq!(send(early_refund).await.1["duplicate"], false);
    assert_eq!(balance(&client, &base, &account, &token).await, "18.00");
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let asked: Vec<_> = received_at(&stripe, "/v1/refunds", 2).await.iter().map(form).collect();
    assert_eq!(asked.len(), 2, "only the two refunds asked for: {asked:?}");
    // The read models agree with a replay of it all.
    let verify: Value = client
        .get(format!("{base}/v1/ledger/verify"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test]
async fn outside_dev_mode_a_top_up_opens_a_stripe_checkout_session_keyed_by_the_top_up() {
    let db = TestDatabase::new().await;
    let stripe = MockServer::start().await;
    stripe_answers(&stripe).await;
    let server = serve_with_stripe(&db, &stripe, false);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "25.00").await;
    let sessions = received_at(&stripe, "/v1/checkout/sessions", 1).await;
    assert_eq!(sessions.len(), 1);
    let body = form(&sessions[0]);
    let field = |name: &str| body.get(name).map(String::as_str);
    assert_eq!(
        (
            field("mode"),
            field("client_reference_id"),
            field("metadata[topup_id]"),
            field("metadata[account_id]"),
            field("line_items[0][price_data][unit_amount]"),
            field("line_items[0][price_data][currency]"),
            field("line_items[0][quantity]"),
            field("payment_intent_data[metadata][topup_id]"),
        ),
        (
            Some("payment"),
            Some(topup_id.as_str()),
            Some(topup_id.as_str()),
            Some(account.as_str()),
            Some("2500"),
            Some("aud"),
            Some("1"),
            Some(topup_id.as_str())
        )
    );
    assert_eq!(
        sessions[0].headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
        Some(format!("topup-{topup_id}").as_str())
    );
    let checkout_url: String = sqlx::query_scalar("SELECT payload->>'checkout_url' FROM events WHERE event_type = 'TopUpRequested'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checkout_url, fixture("checkout_session")["url"].as_str().unwrap());
    // Stripe's webhook pays it.
    let paid = completed_checkout("evt_1LivePaid", &topup_id, 2_500, "aud");
    assert_eq!(deliver(&client, &base, paid.clone(), Some(sign(&paid, SECRET, 0))).await.0, 200);
    assert_eq!(balance(&client, &base, &account, &token).await, "25.00");
    // No dev routes outside dev mode.
    assert_eq!(
        client
            .get(format!("{base}/dev/checkout/{topup_id}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
}

#[tokio::test]
async fn stripe_unavailable_or_refusing_a_checkout_records_nothing() {
    let db = TestDatabase::new().await;
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(json!({"error": {"type": "api_error", "message": "An unknown error occurred"}})),
        )
        .up_to_n_times(1)
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {"type": "invalid_request_error", "code": "parameter_invalid_integer", "param": "line_items[0][price_data][unit_amount]", "message": "Invalid integer: 99999999999"}})))
        .mount(&stripe)
        .await;
    let server = serve_with_stripe(&db, &stripe, false);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token) = support::customer(&base, ADMIN, "AUD", "AU").await;
    let top_up = || {
        client
            .post(format!("{base}/v1/accounts/{account}/topups"))
            .bearer_auth(&token)
            .json(&json!({"amount": "10.00"}))
            .send()
    };
    let unavailable = top_up().await.unwrap();
    assert_eq!(unavailable.status().as_u16(), 503);
    assert_eq!(
        unavailable.json::<Value>().await.unwrap()["type"]
            .as_str()
            .map(|t| t.ends_with("payments-unavailable")),
        Some(true)
    );
    let refused = top_up().await.unwrap();
    assert_eq!(refused.status().as_u16(), 502);
    let problem: Value = refused.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("Invalid integer"), "{problem}");
    let requested: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'TopUpRequested'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(requested, 0, "a top-up without a checkout is not recorded");
}

#[tokio::test]
async fn a_card_refund_stripe_refuses_fails_with_the_money_back_and_one_made_at_once_completes() {
    let db = TestDatabase::new().await;
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(|request: &wiremock::Request| ResponseTemplate::new(200).set_body_json(created_session(request)))
        .mount(&stripe)
        .await;
    // 5.00 is refused for good (Stripe's 400); 7.00 is made at once (`succeeded` in the answer).
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(|request: &wiremock::Request| {
            let form = form(request);
            if form["amount"] == "500" {
                return ResponseTemplate::new(400).set_body_json(json!({"error": {
                    "type": "invalid_request_error", "code": "charge_already_refunded",
                    "message": "Charge ch_1PgafuB7WZ01zgkWXYmPNZs8 has already been refunded."}}));
            }
            let mut refund = fixture("refund");
            refund["id"] = json!(format!("re_{}", &form["metadata[refund_id]"].replace('-', "")[..24]));
            refund["amount"] = json!(form["amount"].parse::<i64>().unwrap());
            refund["payment_intent"] = json!(form["payment_intent"]);
            refund["metadata"] = json!({"refund_id": form["metadata[refund_id]"], "topup_id": form["metadata[topup_id]"]});
            refund["status"] = json!("succeeded");
            ResponseTemplate::new(200).set_body_json(refund)
        })
        .mount(&stripe)
        .await;
    let server = serve_with_stripe(&db, &stripe, true);
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "25.00").await;
    let paid = completed_checkout("evt_1RefusedRefundPaid", &topup_id, 2_500, "aud");
    assert_eq!(deliver(&client, &base, paid.clone(), Some(sign(&paid, SECRET, 0))).await.0, 200);
    let refund = |amount: &str| {
        let (client, base, topup_id, amount) = (client.clone(), base.clone(), topup_id.clone(), amount.to_string());
        async move {
            let response = client
                .post(format!("{base}/v1/admin/topups/{topup_id}/refunds"))
                .bearer_auth(ADMIN)
                .json(&json!({"amount": amount, "reason": "customer asked"}))
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }
    };
    let events = |kind: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = $1")
                .bind(kind)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let wait_for = |kind: &'static str| {
        let events = events.clone();
        async move {
            for _ in 0..200 {
                if events(kind).await > 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            panic!("no {kind} was recorded");
        }
    };
    assert_eq!(refund("5.00").await, 201);
    wait_for("CardRefundFailed").await;
    support::settled(&base).await;
    assert_eq!(
        balance(&client, &base, &account, &token).await,
        "25.00",
        "a refused refund gives the money back"
    );

    assert_eq!(refund("7.00").await, 201);
    wait_for("CardRefundCompleted").await;
    support::settled(&base).await;
    assert_eq!(balance(&client, &base, &account, &token).await, "18.00");
    assert_eq!(events("CardRefundFailed").await, 1);
    assert_eq!(
        events("CardRefundCompleted").await,
        1,
        "completed from Stripe's answer, with no refund.updated"
    );

    // Days later Stripe reports that refund failed after all: the money goes back to the wallet, once.
    let refund_id: String = sqlx::query_scalar("SELECT payload->>'refund_id' FROM events WHERE event_type = 'CardRefundCompleted'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let failed = refund_event("evt_1RefundFailedLater", &refund_id, &topup_id, 700, "failed");
    for _ in 0..2 {
        assert_eq!(deliver(&client, &base, failed.clone(), Some(sign(&failed, SECRET, 0))).await.0, 200);
    }
    assert_eq!(balance(&client, &base, &account, &token).await, "25.00");
    assert_eq!(events("CardRefundReversed").await, 1);
}

#[tokio::test]
async fn a_refund_event_whose_top_up_cannot_be_read_is_refused_so_stripe_delivers_it_again() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let (_, _, topup_id) = customer_with_topup(&client, &server.base, "10.00").await;
    // The top-up's stream now holds an event nothing can read: reading it fails.
    let log = ledger::EventLog::open(db.pool.clone(), ledger::LogConfig::default()).await.unwrap();
    let stream = format!("topup-{topup_id}");
    let version = log.stream_version(&stream).await.unwrap();
    log.append(ledger::AppendRequest::single(
        stream,
        ledger::ExpectedVersion::Exact(version),
        vec![ledger::NewEvent::new("Unreadable", json!({"type": "Unreadable"}))],
    ))
    .await
    .unwrap();
    let refund_id = uuid::Uuid::now_v7().to_string();
    let body = refund_event("evt_1RefundUnreadable", &refund_id, &topup_id, 500, "succeeded");
    let (status, answer) = deliver(&client, &server.base, body.clone(), Some(sign(&body, SECRET, 0))).await;
    assert!(status >= 500, "a failed read must not be acknowledged: {status} {answer}");
    let received: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = 'stripe-event-evt_1RefundUnreadable'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(received, 0, "nothing recorded, so the redelivery acts");
}

#[tokio::test]
async fn a_refund_from_stripes_dashboard_below_zero_suspends_the_servers_as_a_dispute_does() {
    let db = TestDatabase::new().await;
    let server = serve(&db, Some(SECRET));
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (account, token, topup_id) = customer_with_topup(&client, &base, "10.00").await;
    let send = |body: Vec<u8>| {
        let (client, base) = (client.clone(), base.clone());
        async move { deliver(&client, &base, body.clone(), Some(sign(&body, SECRET, 0))).await }
    };
    assert_eq!(send(completed_checkout("evt_1DashboardPaid", &topup_id, 1_000, "aud")).await.0, 200);
    let order: Value = client
        .post(format!("{base}/v1/accounts/{account}/orders"))
        .bearer_auth(&token)
        .json(&json!({"plan_id": "vps-1g", "location": "syd"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let server_id = order["server_id"].as_str().unwrap().to_string();
    support::wait_for(&base, &token, &server_id, |status| status == "needs_setup").await;
    // The whole payment is refunded from Stripe's dashboard after an hour was spent of it.
    let mut charge = fixture("charge");
    charge["payment_intent"] = json!("pi_1PgafyB7WZ01zgkWSjxsAJo3");
    charge["amount"] = json!(1_000);
    charge["amount_refunded"] = json!(1_000);
    charge["currency"] = json!("aud");
    charge["refunded"] = json!(true);
    let mut event = fixture("event");
    event["id"] = json!("evt_1DashboardRefundAll");
    event["type"] = json!("charge.refunded");
    event["data"]["object"] = charge;
    let (status, answer) = send(serde_json::to_vec(&event).unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    let left = balance(&client, &base, &account, &token).await;
    assert!(left.starts_with('-'), "the wallet is below zero: {left}");
    assert_eq!(
        support::server_status(&base, &token, &server_id).await,
        "suspended",
        "a wallet below zero bills nothing more until it is paid"
    );
}
