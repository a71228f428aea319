//! The portal and the console over the real binary, as a browser without scripts uses them:
//! invitation links, sign-in and sign-out, CSRF tokens, lockout, timeouts, what a customer and
//! finance may see, and figures that equal the API's.

#[allow(dead_code)] // shared helpers; this file uses a few
mod support;

use support::{api, invite};

use ledger::testing::TestDatabase;
use reqwest::redirect::Policy;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN: &str = "web-admin-token-for-tests";

fn serve(db: &TestDatabase, extra: &[(&str, Option<&str>)]) -> support::Server {
    let mut envs = vec![("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN))];
    envs.extend_from_slice(extra);
    support::start(db, &["serve", "--bind", "127.0.0.1:0", "--dev"], &envs).0
}

/// A browser: no redirects followed, cookies kept by hand.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookies: Vec<(String, String)>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    html: String,
}

impl Page {
    /// The hidden CSRF field of the page's (first) form.
    fn csrf(&self) -> String {
        let start = self.html.find("name=\"csrf\" value=\"").expect("a form with a CSRF field") + 19;
        self.html[start..].split('"').next().unwrap().to_string()
    }
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser {
            client: reqwest::Client::builder().redirect(Policy::none()).build().unwrap(),
            base: base.to_string(),
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn keep(&mut self, response: reqwest::Response) -> Page {
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            self.cookies.retain(|(k, _)| k != name);
            if !value.is_empty() {
                self.cookies.push((name.to_string(), value.to_string()));
            }
            assert!(text.contains("HttpOnly") && text.contains("SameSite=Strict"), "{text}");
        }
        Page {
            status: response.status(),
            location: response.headers().get("location").map(|l| l.to_str().unwrap().to_string()),
            html: response.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep(response).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(response).await
    }

    /// Sets a password through a link and signs in with it.
    async fn accept_and_sign_in(&mut self, link: &str, email: &str, password: &str) {
        let form = self.get(link).await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.html);
        let set = self.post(link, &[("csrf", &form.csrf()), ("password", password)]).await;
        assert_eq!(set.status, StatusCode::OK, "{}", set.html);
        let signed_in = self.sign_in(email, password).await;
        assert_eq!(
            (signed_in.status, signed_in.location.as_deref()),
            (StatusCode::SEE_OTHER, Some("/"))
        );
    }

    async fn sign_in(&mut self, email: &str, password: &str) -> Page {
        let form = self.get("/signin").await;
        self.post("/signin", &[("csrf", &form.csrf()), ("email", email), ("password", password)])
            .await
    }
}

/// An account funded with `amount`, and its customer API token.
async fn account(base: &str, name: &str, amount: &str) -> (String, String) {
    let id = api(
        base,
        reqwest::Method::POST,
        "/v1/accounts",
        ADMIN,
        Some(json!({"name": name, "email": format!("{}@example.com", name.to_lowercase()), "currency": "AUD", "country": "AU"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api(
        base,
        reqwest::Method::POST,
        &format!("/v1/admin/accounts/{id}/adjustments"),
        ADMIN,
        Some(json!({"amount": amount, "reason": "opening credit"})),
    )
    .await;
    let token = api(
        base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{id}/api-keys"),
        ADMIN,
        Some(json!({"role": "customer"})),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    (id, token)
}

#[tokio::test]
async fn a_customer_signs_in_through_an_invitation_and_sees_their_own_account_only() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[]);
    let (mine, _) = account(&server.base, "Ada", "50.00").await;
    let (theirs, their_token) = account(&server.base, "Bo", "50.00").await;
    let their_server = api(
        &server.base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{theirs}/orders"),
        &their_token,
        Some(json!({"plan_id": "vps-1g", "location": "nyc"})),
    )
    .await["server_id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut browser = Browser::new(&server.base);
    // Before sign-in, every page leads to the sign-in form.
    assert_eq!(browser.get("/").await.location.as_deref(), Some("/signin"));
    let link = invite(&db, "ada@example.com", "customer", Some(&mine));
    browser.accept_and_sign_in(&link, "ada@example.com", "correct horse battery").await;
    // A link is used once.
    assert_eq!(browser.get(&link).await.status, StatusCode::NOT_FOUND);

    // The dashboard's figures are the API's.
    let dashboard = browser.get("/").await;
    assert_eq!(dashboard.status, StatusCode::OK);
    let figures = api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await;
    for field in ["balance", "reserved", "available"] {
        let shown = format!("{} AUD", figures[field].as_str().unwrap());
        assert!(dashboard.html.contains(&shown), "{field}: {shown} not on the dashboard");
    }
    // Another account's server does not exist to this customer, nor does the console.
    assert_eq!(browser.get(&format!("/servers/{their_server}")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(browser.get("/console").await.status, StatusCode::NOT_FOUND);

    // Signing out needs the session's CSRF token; after it, the session is gone.
    let refused = browser.post("/signout", &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let signed_out = browser.post("/signout", &[("csrf", &dashboard.csrf())]).await;
    assert_eq!(signed_out.location.as_deref(), Some("/signin"));
    assert_eq!(browser.get("/").await.location.as_deref(), Some("/signin"));
}

#[tokio::test]
async fn forms_without_their_token_are_refused_and_failed_sign_ins_lock_the_email() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[]);
    let (mine, _) = account(&server.base, "Cy", "10.00").await;
    let mut browser = Browser::new(&server.base);
    let link = invite(&db, "cy@example.com", "customer", Some(&mine));
    // Setting a password without the form's token is refused, and the link stays usable.
    browser.get(&link).await;
    assert_eq!(
        browser.post(&link, &[("password", "a good long password")]).await.status,
        StatusCode::FORBIDDEN
    );
    browser.accept_and_sign_in(&link, "cy@example.com", "a good long password").await;
    browser.cookies.clear();

    // Five wrong passwords lock the email: the right one no longer opens it.
    for _ in 0..5 {
        assert_eq!(
            browser.sign_in("cy@example.com", "not the password").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let locked = browser.sign_in("cy@example.com", "a good long password").await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS, "{}", locked.html);
    assert!(locked.html.contains("locked"));
    // A sign-in without the form's token is refused before the password is looked at.
    assert_eq!(
        browser
            .post("/signin", &[("email", "cy@example.com"), ("password", "a good long password")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn an_idle_session_is_signed_out_and_finance_finds_accounts_in_the_console() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[("BILLING_SESSION_IDLE_SECONDS", Some("2"))]);
    let (mine, _) = account(&server.base, "Dee", "25.00").await;
    let mut browser = Browser::new(&server.base);
    let link = invite(&db, "finance@example.com", "finance", None);
    browser
        .accept_and_sign_in(&link, "finance@example.com", "finance reads everything")
        .await;
    // Finance lands in the console and finds the account, its figures the API's.
    assert_eq!(browser.get("/").await.location.as_deref(), Some("/console"));
    let found = browser.get("/console?query=dee").await;
    assert!(found.html.contains(&format!("/console/accounts/{mine}")), "{}", found.html);
    let page = browser.get(&format!("/console/accounts/{mine}")).await;
    assert!(page.html.contains("25.00 AUD"), "{}", page.html);
    let as_of = browser.get(&format!("/console/accounts/{mine}?as_of=2000-01-01T00:00:00Z")).await;
    assert!(as_of.html.contains("0.00 AUD"), "{}", as_of.html);
    // Idle past the limit: signed out.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    assert_eq!(browser.get("/console").await.location.as_deref(), Some("/signin"));
}

/// The `nonce` of the page's first form.
fn nonce(page: &Page) -> String {
    let start = page.html.find("name=\"nonce\" value=\"").expect("a form with a nonce") + 20;
    page.html[start..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn a_customer_tops_up_orders_sets_up_cancels_and_revokes_from_the_portal() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[("BILLING_SIMULATED_LATENCY_MS", Some("10"))]);
    let (mine, token) = account(&server.base, "Eve", "0.05").await;
    let mut browser = Browser::new(&server.base);
    let link = invite(&db, "eve@example.com", "customer", Some(&mine));
    browser.accept_and_sign_in(&link, "eve@example.com", "eve orders servers").await;

    // An order the wallet cannot hold is explained, with the way to top up.
    let form = browser.get("/orders/new").await;
    assert!(form.html.contains("first hour held now"), "{}", form.html);
    let poor = browser
        .post(
            "/orders",
            &[
                ("csrf", &form.csrf()),
                ("nonce", &nonce(&form)),
                ("plan_id", "vps-8g"),
                ("location", "syd"),
            ],
        )
        .await;
    assert_eq!(poor.status, StatusCode::PAYMENT_REQUIRED, "{}", poor.html);
    assert!(poor.html.contains("href=\"/topup\""));

    // Top up through the (dev) card checkout: the balance is the API's after the webhook lands.
    let topup = browser.get("/topup").await;
    let checkout = browser
        .post("/topup", &[("csrf", &topup.csrf()), ("nonce", &nonce(&topup)), ("amount", "20.00")])
        .await;
    let checkout_url = checkout.location.expect("a redirect to the checkout");
    let pay_path = format!("{}/pay", checkout_url.trim_start_matches(&server.base));
    assert_eq!(browser.post(&pay_path, &[]).await.status, StatusCode::OK);
    let figures = api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await;
    assert_eq!(figures["balance"], "20.05");
    assert!(browser.get("/").await.html.contains("20.05 AUD"));

    // Order; the same form sent twice orders once.
    let form = browser.get("/orders/new").await;
    let fields = [
        ("csrf", form.csrf()),
        ("nonce", nonce(&form)),
        ("plan_id", "vps-1g".into()),
        ("location", "syd".into()),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ordered = browser.post("/orders", &fields).await;
    let again = browser.post("/orders", &fields).await;
    assert_eq!(ordered.location, again.location);
    let server_path = ordered.location.expect("the server's page");
    let server_id = server_path.trim_start_matches("/servers/").to_string();
    let servers = api(
        &server.base,
        reqwest::Method::GET,
        &format!("/v1/accounts/{mine}/servers"),
        ADMIN,
        None,
    )
    .await;
    assert_eq!(servers["items"].as_array().unwrap().len(), 1);

    // Set up once provisioned; then cancel with grace, revoke, and cancel for good.
    support::wait_for(&server.base, &token, &server_id, |status| status == "needs_setup").await;
    let page = browser.get(&server_path).await;
    assert!(page.html.contains("NEEDS SETUP"), "{}", page.html);
    let set_up = browser
        .post(
            &format!("{server_path}/setup"),
            &[
                ("csrf", &page.csrf()),
                ("nonce", &nonce(&page)),
                ("os_image", "debian-12"),
                ("hostname", "web1.example.com"),
            ],
        )
        .await;
    assert_eq!(set_up.location.as_deref(), Some(server_path.as_str()));
    let page = browser.get(&server_path).await;
    assert!(page.html.contains("RUNNING"), "{}", page.html);
    let form_with = |page: &Page, extra: (&'static str, &'static str)| {
        vec![("csrf", page.csrf()), ("nonce", nonce(page)), (extra.0, extra.1.to_string())]
    };
    let cancel = form_with(&page, ("mode", "grace"));
    let cancel: Vec<(&str, &str)> = cancel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    browser.post(&format!("{server_path}/cancellation"), &cancel).await;
    let page = browser.get(&server_path).await;
    assert!(page.html.contains("PENDING CANCELLATION"), "{}", page.html);
    browser
        .post(
            &format!("{server_path}/revocation"),
            &[("csrf", &page.csrf()), ("nonce", &nonce(&page))],
        )
        .await;
    let page = browser.get(&server_path).await;
    assert!(page.html.contains("RUNNING"), "{}", page.html);
    let status = api(&server.base, reqwest::Method::GET, &format!("/v1/servers/{server_id}"), ADMIN, None).await;
    assert_eq!(status["status"], "running");
    // The statement lists what happened, in the API's figures.
    let statement = browser.get("/transactions").await;
    let rows = api(
        &server.base,
        reqwest::Method::GET,
        &format!("/v1/accounts/{mine}/transactions"),
        ADMIN,
        None,
    )
    .await;
    for row in rows["items"].as_array().unwrap() {
        assert!(
            statement.html.contains(&format!("{} AUD", row["balance_after"].as_str().unwrap())),
            "{row}"
        );
    }
    // Filtered by server and dates; a date out of range is explained, not a failure.
    let today = chrono::Utc::now().date_naive();
    let by_server = browser
        .get(&format!("/transactions?server={server_id}&from={today}&to={today}"))
        .await;
    assert_eq!(by_server.status, StatusCode::OK);
    assert!(
        by_server.html.contains("<td>charge</td>") && !by_server.html.contains("<td>topup</td>"),
        "{}",
        by_server.html
    );
    let before = browser.get(&format!("/transactions?server={server_id}&to=2000-01-01")).await;
    assert!(before.html.contains("Nothing matches"), "{}", before.html);
    for query in [
        "to=%2B262143-12-31",
        "from=2026-13-01",
        "from=2027-01-02&to=2027-01-01",
        "server=nope",
    ] {
        let refused = browser.get(&format!("/transactions?{query}")).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert!(refused.html.contains("class=\"error\""), "{query}: {}", refused.html);
    }
    // Filtered to one kind, and downloaded as CSV with the API's figures.
    let charges = browser.get("/transactions?kind=charge").await;
    assert!(
        charges.html.contains("charge") && !charges.html.contains("<td>topup</td>"),
        "{}",
        charges.html
    );
    let csv = browser.get("/transactions.csv").await;
    assert_eq!(csv.status, StatusCode::OK);
    let lines: Vec<&str> = csv.html.lines().collect();
    assert_eq!(
        lines[0],
        "position,occurred_at,kind,amount,balance_after,currency,server_id,reference"
    );
    let items = rows["items"].as_array().unwrap();
    assert_eq!(lines.len() - 1, items.len());
    for (line, row) in lines[1..].iter().zip(items) {
        let fields: Vec<&str> = line.split(',').collect();
        let position = row["position"].to_string();
        assert_eq!(
            (fields[0], fields[3], fields[4]),
            (
                position.as_str(),
                row["amount"].as_str().unwrap(),
                row["balance_after"].as_str().unwrap()
            ),
            "{line}"
        );
    }
}

#[tokio::test]
async fn the_dashboard_hears_of_a_payment_as_it_lands() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[("BILLING_SIMULATED_LATENCY_MS", Some("10"))]);
    let clock = |body: Value| api(&server.base, reqwest::Method::POST, "/v1/dev/clock", ADMIN, Some(body));
    clock(json!({"now": "2027-05-31T21:30:00Z"})).await;
    let (mine, token) = account(&server.base, "Fay", "1.00").await;
    let mut browser = Browser::new(&server.base);
    let link = invite(&db, "fay@example.com", "customer", Some(&mine));
    browser
        .accept_and_sign_in(&link, "fay@example.com", "fay watches her balance")
        .await;
    let dashboard = browser.get("/").await;
    assert!(dashboard.html.contains("new EventSource(\"/live\")"));

    let mut live = browser
        .client
        .get(format!("{}/live", server.base))
        .header("cookie", browser.cookie_header())
        .send()
        .await
        .unwrap();
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let mut received = String::new();
    let mut read_until = async |text: &str, received: &mut String| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !received.contains(text) {
            let chunk = tokio::time::timeout_at(deadline, live.chunk())
                .await
                .expect("in time")
                .unwrap()
                .unwrap();
            received.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    read_until("\"balance\":\"1.00 AUD\"", &mut received).await;

    // Paid through the dev checkout: the open stream carries the new balance, unasked.
    let topup = browser.get("/topup").await;
    let checkout = browser
        .post("/topup", &[("csrf", &topup.csrf()), ("nonce", &nonce(&topup)), ("amount", "5.00")])
        .await;
    let pay_path = format!("{}/pay", checkout.location.unwrap().trim_start_matches(&server.base));
    browser.post(&pay_path, &[]).await;
    read_until("\"balance\":\"6.00 AUD\"", &mut received).await;
    // A server's status changes and a new invoice reach the stream too.
    let server_id = order_vps(&server.base, &mine, &token).await;
    read_until(&format!("{{\"id\":\"{server_id}\",\"status\":\"needs_setup\"}}"), &mut received).await;
    clock(json!({"now": "2027-06-01T00:30:00Z"})).await;
    read_until("\"number\":\"INV-2027-", &mut received).await;
    // Without a session there is no stream.
    let anonymous = reqwest::get(format!("{}/live", server.base)).await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn finance_explains_an_invoice_down_to_its_events_and_an_admin_adjusts_a_wallet() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[("BILLING_SIMULATED_LATENCY_MS", Some("10"))]);
    let clock = |body: Value| api(&server.base, reqwest::Method::POST, "/v1/dev/clock", ADMIN, Some(body));
    clock(json!({"now": "2027-05-31T21:30:00Z"})).await;
    let (mine, token) = account(&server.base, "Gus", "50.00").await;
    ordered_and_provisioned(&server.base, &mine, &token).await;
    clock(json!({"now": "2027-06-01T00:30:00Z"})).await;
    let invoices = api(
        &server.base,
        reqwest::Method::GET,
        &format!("/v1/accounts/{mine}/invoices"),
        ADMIN,
        None,
    )
    .await;
    let invoice_id = invoices["items"][0]["id"].as_str().expect("May's invoice").to_string();

    let mut finance = Browser::new(&server.base);
    let link = invite(&db, "audit@example.com", "finance", None);
    finance
        .accept_and_sign_in(&link, "audit@example.com", "finance explains it all")
        .await;
    let account_page = finance.get(&format!("/console/accounts/{mine}")).await;
    assert!(
        account_page.html.contains(&format!("/console/invoices/{invoice_id}")),
        "{}",
        account_page.html
    );
    let explained = finance.get(&format!("/console/invoices/{invoice_id}")).await;
    let start = explained.html.find("/console/events/").expect("the events behind the invoice") + 16;
    let position: String = explained.html[start..].chars().take_while(char::is_ascii_digit).collect();
    let segment = finance.get(&format!("/console/verify?from=1&to={position}")).await;
    assert!(segment.html.contains("CHAIN VERIFIED"), "{}", segment.html);
    for query in ["", "?from=1", "?from=one&to=2"] {
        let refused = finance.get(&format!("/console/verify{query}")).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
    }
    let event = finance.get(&format!("/console/events/{position}")).await;
    assert!(event.html.contains("CHAIN VERIFIED"), "{}", event.html);
    assert!(
        event.html.contains("HourCharged") || event.html.contains("HoldCaptured"),
        "{}",
        event.html
    );
    let books = api(&server.base, reqwest::Method::GET, "/v1/ledger/trial-balance", ADMIN, None).await;
    let trial = finance.get("/console/trial-balance").await;
    let aud = books["currencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["currency"] == "AUD")
        .unwrap();
    assert!(
        trial.html.contains(&format!("{} AUD", aud["total_debit"].as_str().unwrap())),
        "{}",
        trial.html
    );
    // Finance reads; it does not adjust.
    let refused = finance
        .post(
            &format!("/console/accounts/{mine}/adjustments"),
            &[("csrf", &account_page.csrf()), ("amount", "1.00"), ("reason", "no")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    let mut admin = Browser::new(&server.base);
    let link = invite(&db, "boss@example.com", "admin", None);
    admin.accept_and_sign_in(&link, "boss@example.com", "the admin adjusts it").await;
    let before = api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await["balance"].clone();
    let page = admin.get(&format!("/console/accounts/{mine}")).await;
    let fields = [
        ("csrf", page.csrf()),
        ("nonce", nonce(&page)),
        ("amount", "-2.50".to_string()),
        ("reason", "a duplicate credit".to_string()),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let review = admin.post(&format!("/console/accounts/{mine}/adjustments"), &fields).await;
    assert!(review.html.contains("Confirm the adjustment"), "{}", review.html);
    // Nothing moved before the confirmation.
    assert_eq!(
        api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await["balance"],
        before
    );
    let mut confirmed = fields.clone();
    confirmed.push(("confirm", "yes"));
    let done = admin.post(&format!("/console/accounts/{mine}/adjustments"), &confirmed).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.html);
    admin.post(&format!("/console/accounts/{mine}/adjustments"), &confirmed).await;
    // The same form sent again with another amount (after going back) is a new adjustment.
    let changed: Vec<(&str, &str)> = confirmed
        .iter()
        .map(|(k, v)| if *k == "amount" { (*k, "1.00") } else { (*k, *v) })
        .collect();
    admin.post(&format!("/console/accounts/{mine}/adjustments"), &changed).await;
    let after = api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await["balance"].clone();
    let amount = |value: &Value| value.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap();
    assert_eq!(
        amount(&before) - amount(&after),
        rust_decimal::Decimal::new(150, 2),
        "-2.50 once, then +1.00: {before} -> {after}"
    );
}

#[tokio::test]
async fn a_new_password_spends_every_link_ends_live_streams_and_portal_top_ups_are_rate_limited() {
    let db = TestDatabase::new().await;
    let server = serve(
        &db,
        &[
            ("BILLING_RATE_LIMIT_BURST", Some("2")),
            ("BILLING_RATE_LIMIT_PER_SECOND", Some("0.01")),
        ],
    );
    let (mine, _) = account(&server.base, "Ida", "1.00").await;
    let mut browser = Browser::new(&server.base);
    // Two links for one person: using one spends the other.
    let first = invite(&db, "ida@example.com", "customer", Some(&mine));
    let second = invite(&db, "ida@example.com", "customer", Some(&mine));
    browser.accept_and_sign_in(&first, "ida@example.com", "ida keeps one link").await;
    assert_eq!(browser.get(&second).await.status, StatusCode::NOT_FOUND);

    // A live stream ends with its session.
    let dashboard = browser.get("/").await;
    let mut live = browser
        .client
        .get(format!("{}/live", server.base))
        .header("cookie", browser.cookie_header())
        .send()
        .await
        .unwrap();
    let first_event = tokio::time::timeout(std::time::Duration::from_secs(10), live.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(first_event.is_some());
    browser.post("/signout", &[("csrf", &dashboard.csrf())]).await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        while live.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its session");

    // Top-ups from the portal are limited per person, as per API token.
    let link = invite(&db, "ida.two@example.com", "customer", Some(&mine));
    browser.accept_and_sign_in(&link, "ida.two@example.com", "ida tops up a lot").await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let form = browser.get("/topup").await;
        let answer = browser
            .post("/topup", &[("csrf", &form.csrf()), ("nonce", &nonce(&form)), ("amount", "5.00")])
            .await;
        statuses.push(answer.status);
    }
    assert_eq!(
        statuses,
        [StatusCode::SEE_OTHER, StatusCode::SEE_OTHER, StatusCode::TOO_MANY_REQUESTS]
    );
    // Signed-in pages are not kept by the browser.
    let page = browser
        .client
        .get(format!("{}/", server.base))
        .header("cookie", browser.cookie_header())
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["cache-control"], "no-store");
}

/// A `vps-1g` in Sydney ordered by the account's customer: the new server's id.
async fn order_vps(base: &str, account: &str, token: &str) -> String {
    let ordered = api(
        base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{account}/orders"),
        token,
        Some(json!({"plan_id": "vps-1g", "location": "syd"})),
    )
    .await;
    ordered["server_id"].as_str().unwrap().to_string()
}

/// A `vps-1g` ordered and provisioned (awaiting its setup): the server's id.
async fn ordered_and_provisioned(base: &str, account: &str, token: &str) -> String {
    let server_id = order_vps(base, account, token).await;
    support::wait_for(base, token, &server_id, |status| status == "needs_setup").await;
    server_id
}

/// An invitation made by an admin in the console: the page that answers it.
async fn invite_from_console(admin: &mut Browser, email: &str, role: &str) -> Page {
    let people = admin.get("/console/people").await;
    admin
        .post(
            "/console/people",
            &[("csrf", &people.csrf()), ("email", email), ("role", role), ("account", "")],
        )
        .await
}

/// The `href` of the first link on `page` that starts with `prefix`.
fn link_starting(page: &Page, prefix: &str) -> String {
    let start = page
        .html
        .find(&format!("href=\"{}", prefix.replace('&', "&amp;")))
        .unwrap_or_else(|| panic!("no link to {prefix} in {}", page.html))
        + 6;
    page.html[start..].split('"').next().unwrap().replace("&amp;", "&")
}

/// The text of the element marked `data-money="{name}"` (the first one).
fn money_marked(page: &Page, name: &str) -> String {
    let start = page
        .html
        .find(&format!("data-money=\"{name}\""))
        .unwrap_or_else(|| panic!("no {name} in {}", page.html));
    let rest = &page.html[start..];
    let mut text = &rest[rest.find('>').unwrap() + 1..];
    while text.starts_with('<') {
        text = &text[text.find('>').unwrap() + 1..];
    }
    text[..text.find('<').unwrap()].to_string()
}

#[tokio::test]
async fn an_admin_corrects_a_wallet_three_ways_each_shown_before_it_is_made() {
    let db = TestDatabase::new().await;
    let server = serve(&db, &[("BILLING_SIMULATED_LATENCY_MS", Some("10"))]);
    let (mine, token) = account(&server.base, "Ivy", "0.01").await;
    // A paid top-up (through the dev checkout) and a charge (the first hour of a server).
    let topup = api(
        &server.base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{mine}/topups"),
        &token,
        Some(json!({"amount": "30.00"})),
    )
    .await;
    let paid = reqwest::Client::new()
        .post(format!("{}/pay", topup["checkout_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert!(paid.status().is_success());
    ordered_and_provisioned(&server.base, &mine, &token).await;

    let mut admin = Browser::new(&server.base);
    let link = invite(&db, "fixer@example.com", "admin", None);
    admin.accept_and_sign_in(&link, "fixer@example.com", "the admin fixes things").await;
    let balance = || async {
        api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await["balance"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (kind, prefix, amount, expected) in [
        ("service_credit", "?kind=service_credit&target=", "0.01", "+"),
        ("card_refund", "?kind=card_refund&target=", "5", "-"),
    ] {
        let page = admin.get(&format!("/console/accounts/{mine}")).await;
        let prefilled = admin
            .get(&format!("/console/accounts/{mine}{}", link_starting(&page, prefix)))
            .await;
        let target = link_starting(&page, prefix)
            .trim_start_matches(prefix)
            .split('#')
            .next()
            .unwrap()
            .to_string();
        assert!(prefilled.html.contains(&format!("value=\"{target}\"")), "{}", prefilled.html);
        let fields = [
            ("csrf", prefilled.csrf()),
            ("nonce", nonce(&prefilled)),
            ("kind", kind.to_string()),
            ("target", target.clone()),
            ("amount", amount.to_string()),
            ("reason", format!("{kind} for the test")),
        ];
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let before = balance().await;
        let review = admin.post(&format!("/console/accounts/{mine}/corrections"), &fields).await;
        assert_eq!(review.status, StatusCode::OK, "{}", review.html);
        // The effect shown is the balance the API then reports; nothing moved before confirming.
        let predicted = money_marked(&review, "balance_after");
        assert_eq!(balance().await, before);
        let mut confirmed = fields.clone();
        confirmed.push(("confirm", "yes"));
        let done = admin.post(&format!("/console/accounts/{mine}/corrections"), &confirmed).await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{kind}: {}", done.html);
        // Sent twice, it acts once.
        admin.post(&format!("/console/accounts/{mine}/corrections"), &confirmed).await;
        let after = balance().await;
        assert_eq!(predicted, format!("{after} AUD"), "{kind}");
        let delta = (after.parse::<rust_decimal::Decimal>().unwrap() - before.parse::<rust_decimal::Decimal>().unwrap()).normalize();
        assert_eq!(
            format!("{expected}{amount}"),
            if delta.is_sign_negative() {
                format!("{delta}")
            } else {
                format!("+{delta}")
            }
        );
    }
    // A correction without a reason, or of another account's charge, is refused and moves nothing.
    let page = admin.get(&format!("/console/accounts/{mine}")).await;
    let before = balance().await;
    let no_reason = admin
        .post(
            &format!("/console/accounts/{mine}/corrections"),
            &[
                ("csrf", &page.csrf()),
                ("kind", "adjustment"),
                ("amount", "1.00"),
                ("reason", " "),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(no_reason.status, StatusCode::UNPROCESSABLE_ENTITY);
    let (other, _) = account(&server.base, "Jon", "1.00").await;
    let charge = link_starting(&page, "?kind=service_credit&target=")
        .trim_start_matches("?kind=service_credit&target=")
        .split('#')
        .next()
        .unwrap()
        .to_string();
    let elsewhere = admin
        .post(
            &format!("/console/accounts/{other}/corrections"),
            &[
                ("csrf", &page.csrf()),
                ("nonce", "n1"),
                ("kind", "service_credit"),
                ("target", &charge),
                ("amount", "0.001"),
                ("reason", "wrong account"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND, "{}", elsewhere.html);
    assert_eq!(balance().await, before);
    let others = api(&server.base, reqwest::Method::GET, &format!("/v1/accounts/{other}"), ADMIN, None).await;
    assert_eq!(others["balance"], "1.00");
}

#[tokio::test]
async fn a_revoked_key_stops_at_once_in_every_process_and_the_console_invites_and_rebuilds() {
    let db = TestDatabase::new().await;
    let first = serve(&db, &[]);
    let second = serve(&db, &[]);
    let (mine, _) = account(&first.base, "Kit", "3.00").await;
    let status = |base: String, token: String| {
        let path = format!("{base}/v1/accounts/{mine}");
        async move { reqwest::Client::new().get(path).bearer_auth(token).send().await.unwrap().status() }
    };
    let mut admin = Browser::new(&first.base);
    let link = invite(&db, "keys@example.com", "admin", None);
    admin.accept_and_sign_in(&link, "keys@example.com", "keys come and go").await;

    // A key made in the console works in the other process, and stops there the moment it is revoked here.
    let keys = admin.get("/console/keys").await;
    let made = admin
        .post(
            "/console/keys",
            &[
                ("csrf", &keys.csrf()),
                ("role", "customer"),
                ("account", &mine),
                ("label", "laptop"),
            ],
        )
        .await;
    let start = made.html.find("bl_").expect("the new token, shown once");
    let token = made.html[start..start + 67].to_string();
    assert_eq!(status(second.base.clone(), token.clone()).await, StatusCode::OK);
    let listed = api(
        &first.base,
        reqwest::Method::GET,
        &format!("/v1/admin/api-keys?account={mine}"),
        ADMIN,
        None,
    )
    .await;
    let laptop = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["label"].as_str().unwrap().starts_with("laptop"))
        .expect("the console's key, listed")
        .clone();
    assert!(laptop["revoked_at"].is_null() && laptop.get("token").is_none(), "{laptop}");
    let revoke_form = admin.get(&format!("/console/keys?account={mine}")).await;
    let revoked = admin
        .post(
            &format!("/console/keys/{}/revocation", laptop["id"].as_str().unwrap()),
            &[("csrf", &revoke_form.csrf())],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER, "{}", revoked.html);
    assert_eq!(status(second.base.clone(), token.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(first.base.clone(), token.clone()).await, StatusCode::UNAUTHORIZED);

    // Through the API, the same: revoked in one process, refused at once by the other.
    let created = api(
        &first.base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{mine}/api-keys"),
        ADMIN,
        Some(json!({"role": "customer"})),
    )
    .await;
    let other_token = created["token"].as_str().unwrap().to_string();
    assert_eq!(status(first.base.clone(), other_token.clone()).await, StatusCode::OK);
    let gone = api(
        &second.base,
        reqwest::Method::DELETE,
        &format!("/v1/admin/api-keys/{}", created["id"].as_str().unwrap()),
        ADMIN,
        None,
    )
    .await;
    assert!(gone["revoked_at"].is_string(), "{gone}");
    assert_eq!(status(first.base.clone(), other_token.clone()).await, StatusCode::UNAUTHORIZED);
    // The admin key of a request does not revoke itself (it would lock its holder out mid-work).
    let keys = api(&first.base, reqwest::Method::GET, "/v1/admin/api-keys?limit=200", ADMIN, None).await;
    let own = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["label"] == "bootstrap")
        .expect("the bootstrap key, listed")
        .clone();
    let itself = reqwest::Client::new()
        .delete(format!("{}/v1/admin/api-keys/{}", first.base, own["id"].as_str().unwrap()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(itself.status(), StatusCode::CONFLICT);
    assert_eq!(status(first.base.clone(), ADMIN.to_string()).await, StatusCode::OK);
    // A customer key may not list or revoke keys.
    let listing = reqwest::Client::new()
        .get(format!("{}/v1/admin/api-keys", first.base))
        .bearer_auth(&created["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), StatusCode::UNAUTHORIZED);

    // An invitation made in the console signs its person in.
    let invited = invite_from_console(&mut admin, "new.finance@example.com", "finance").await;
    assert_eq!(invited.status, StatusCode::OK, "{}", invited.html);
    let start = invited.html.find("/link/").expect("the invitation link");
    let link: String = invited.html[start..].chars().take_while(|c| *c != '<' && *c != '"').collect();
    let mut newcomer = Browser::new(&first.base);
    newcomer
        .accept_and_sign_in(&link, "new.finance@example.com", "a finance newcomer")
        .await;
    assert_eq!(newcomer.get("/console/keys").await.status, StatusCode::FORBIDDEN);
    // An invitation never replaces a password that is set: that would hand the inviter the login.
    let again = invite_from_console(&mut admin, "new.finance@example.com", "finance").await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", again.html);
    assert!(!again.html.contains("/link/"), "{}", again.html);
    assert_eq!(newcomer.get("/console/audit").await.status, StatusCode::OK);

    // A rebuild started from the console runs to its end; the page shows each read model's lag.
    let before = support::generation(&first.base, ADMIN, "balances").await;
    let models = admin.get("/console/projections").await;
    assert!(models.html.contains("balances"), "{}", models.html);
    let started = admin
        .post("/console/projections/balances/rebuild", &[("csrf", &models.csrf())])
        .await;
    assert_eq!(started.location.as_deref(), Some("/console/projections"));
    support::rebuilt(&first.base, ADMIN, "balances", before).await;
    let figures = api(&first.base, reqwest::Method::GET, &format!("/v1/accounts/{mine}"), ADMIN, None).await;
    assert_eq!(figures["balance"], "3.00");

    // The audit stream of the account, filtered, and exported with the same events.
    let stream = format!("account-{mine}");
    let audit = admin.get(&format!("/console/audit?stream={stream}")).await;
    assert!(
        audit.html.contains("Adjusted") && !audit.html.contains("CatalogPublished"),
        "{}",
        audit.html
    );
    let events = api(
        &first.base,
        reqwest::Method::GET,
        &format!("/v1/ledger/events?stream={stream}"),
        ADMIN,
        None,
    )
    .await;
    let csv = admin.get(&format!("/console/audit/export?stream={stream}&format=csv")).await;
    assert_eq!(csv.status, StatusCode::OK);
    assert_eq!(
        csv.html.lines().count() - 1,
        events["items"].as_array().unwrap().len(),
        "{}",
        csv.html
    );
    let jsonl = admin
        .get(&format!("/console/audit/export?stream={stream}&format=jsonl&type=Adjusted"))
        .await;
    let adjusted: Vec<Value> = jsonl.html.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(adjusted.len(), 1);
    assert_eq!(adjusted[0]["payload"]["reason"], "opening credit", "{}", adjusted[0]);
    let bad = admin.get("/console/audit/export?from=yesterday").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn outside_dev_mode_cookies_are_secure_and_bound_to_this_host() {
    let db = TestDatabase::new().await;
    let (server, _stdout) = support::start(
        &db,
        &["serve", "--bind", "127.0.0.1:0"],
        &[("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN))],
    );
    let page = reqwest::get(format!("{}/signin", server.base)).await.unwrap();
    let set = page.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("__Host-billing_form="), "{set}");
    for part in ["Secure", "Path=/", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Domain="), "{set}");
    // A cookie without the prefix (as a sibling host could plant) is not taken for the form's.
    let html = page.text().await.unwrap();
    let start = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    let token = html[start..].split('"').next().unwrap().to_string();
    let planted = reqwest::Client::new()
        .post(format!("{}/signin", server.base))
        .header("cookie", format!("billing_form={token}"))
        .form(&[("csrf", token.as_str()), ("email", "a@example.com"), ("password", "whatever it is")])
        .send()
        .await
        .unwrap();
    assert_eq!(planted.status(), StatusCode::FORBIDDEN);
}
