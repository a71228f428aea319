//! The portal and the console in a real browser: Debian's chromium, headless, driven through
//! chromedriver (fantoccini) against the real binary on a fresh database. A customer signs in
//! through an invitation, tops up through the dev checkout and sees the balance change without
//! reloading, orders, sets up, is billed as the dev clock moves, cancels both ways and revokes;
//! finance finds the account and explains an invoice. Every main page, in the dark scheme the
//! portal is made for first, is checked by axe-core (no serious or critical violation) and saved
//! as a screenshot at desktop and phone widths (in `BILLING_SCREENSHOTS`, by default the target
//! folder's `tmp/screenshots`; `docs/screenshots/` holds a set of them).
//!
//! Tools: `BILLING_CHROMEDRIVER` (default `/usr/bin/chromedriver`), `BILLING_CHROMIUM` (default
//! `/usr/bin/chromium`) and `BILLING_AXE` (default `~/.cache/billing-node/node_modules/axe-core/
//! axe.min.js`); `.ci/run` installs them. Missing, the test fails under CI and says so elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(dead_code)] // shared helpers; this file uses a few
mod support;

use support::{api, invite};

use fantoccini::{Client, ClientBuilder, Locator};
use ledger::testing::TestDatabase;
use serde_json::{json, Value};

const ADMIN: &str = "browser-admin-token-for-tests";

struct Tools {
    chromedriver: PathBuf,
    chromium: PathBuf,
    axe: String,
}

fn tools() -> Option<Tools> {
    let path = |variable: &str, default: &str| {
        std::env::var_os(variable)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let home = std::env::var("HOME").unwrap_or_default();
    let chromedriver = path("BILLING_CHROMEDRIVER", "/usr/bin/chromedriver");
    let chromium = path("BILLING_CHROMIUM", "/usr/bin/chromium");
    let axe = path(
        "BILLING_AXE",
        &format!("{home}/.cache/billing-node/node_modules/axe-core/axe.min.js"),
    );
    if chromedriver.exists() && chromium.exists() && axe.exists() {
        return Some(Tools {
            chromedriver,
            chromium,
            axe: std::fs::read_to_string(axe).ok()?,
        });
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the browser tests need chromium, chromium-driver and axe-core under CI (.ci/run installs them)"
    );
    eprintln!("SKIPPED: chromium, chromedriver or axe-core is missing (see .ci/run)");
    None
}

/// chromedriver on a free port, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(tools: &Tools) -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = Driver(
        Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": tools.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900", "--blink-settings=preferredColorScheme=0"],
        }),
    );
    for _ in 0..100 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        if let Ok(client) = ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            return (driver, client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer");
}

/// What a page is checked for and kept as: axe-core finds no serious or critical violation, every
/// money figure on it is the API's (or says how it is derived), and it is saved at desktop and
/// phone widths.
async fn check_page(client: &Client, tools: &Tools, base: &str, name: &str) {
    check_money(client, base, name).await;
    client.execute(&tools.axe, vec![]).await.expect("axe-core injected");
    let violations = client
        .execute_async(
            "var done = arguments[arguments.length - 1];\
             axe.run(document, {resultTypes: ['violations']}).then(function (result) {\
               done(result.violations.filter(function (v) { return v.impact === 'serious' || v.impact === 'critical'; })\
                 .map(function (v) { return v.id + ' (' + v.impact + '): ' + v.nodes.map(function (n) { return n.target.join(' '); }).join(', '); }));\
             }).catch(function (error) { done(['axe failed: ' + error]); });",
            vec![],
        )
        .await
        .expect("axe-core ran");
    assert_eq!(violations, json!([]), "{name}: accessibility violations");
    let folder = std::env::var_os("BILLING_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&folder).unwrap();
    for (width, height, suffix) in [(1280, 900, "desktop"), (375, 812, "phone")] {
        client.set_window_size(width, height).await.unwrap();
        let png = client.screenshot().await.unwrap();
        std::fs::write(folder.join(format!("{name}-{suffix}.png")), png).unwrap();
    }
    client.set_window_size(1280, 900).await.unwrap();
}

/// Every text on the page that reads as money (`12.34 AUD`) sits in an element that names the API
/// object and field it shows (`data-api`, `data-field`) or says how it is derived
/// (`data-derived`); each named one equals the API's figure, fetched now.
async fn check_money(client: &Client, base: &str, name: &str) {
    let found = client
        .execute(
            "var money = /-?[0-9][0-9,]*[.][0-9]+ [A-Z]{3}\\b/;\
             var marked = [], unmarked = [];\
             document.querySelectorAll('[data-api]').forEach(function (e) {\
               marked.push([e.getAttribute('data-api'), e.getAttribute('data-field'), e.textContent.trim()]);\
             });\
             var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);\
             while (walker.nextNode()) {\
               var node = walker.currentNode;\
               if (money.test(node.textContent) && !node.parentElement.closest('[data-api],[data-derived]')) unmarked.push(node.textContent.trim());\
             }\
             return [marked, unmarked];",
            vec![],
        )
        .await
        .expect("the page's money figures");
    assert_eq!(found[1], json!([]), "{name}: money figures that name no API object");
    let mut objects: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    for figure in found[0].as_array().unwrap() {
        let (source, field, text) = (
            figure[0].as_str().unwrap(),
            figure[1].as_str().unwrap(),
            figure[2].as_str().unwrap(),
        );
        if !objects.contains_key(source) {
            let object = api(base, reqwest::Method::GET, source, ADMIN, None).await;
            objects.insert(source.to_string(), object);
        }
        let expected = objects[source]
            .pointer(field)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name}: the API's {source} has no {field}: {}", objects[source]));
        let (amount, currency) = text.split_once(' ').unwrap_or((text, ""));
        assert_eq!(amount, expected, "{name}: {field} of {source} reads {text:?}");
        assert!(currency.len() == 3, "{name}: {text:?} names its currency");
    }
}

async fn fill(client: &Client, selector: &str, text: &str) {
    let field = client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|_| panic!("no {selector}"));
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn submit(client: &Client, selector: &str) {
    client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|_| panic!("no {selector}"))
        .click()
        .await
        .unwrap();
}

async fn text_of(client: &Client, selector: &str) -> String {
    client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|_| panic!("no {selector}"))
        .text()
        .await
        .unwrap()
}

/// Waits until `selector`'s text is `expected`, without reloading (at most 10 s).
async fn until_text(client: &Client, selector: &str, expected: &str) {
    for _ in 0..100 {
        if text_of(client, selector).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{selector} never read {expected:?} (reads {:?})", text_of(client, selector).await);
}

/// Waits until the page is at `prefix` (a form's answer has loaded): that path exactly, or below
/// it for a prefix that ends with a slash (other than `/` itself).
async fn until_path(client: &Client, prefix: &str) -> (String, String) {
    for _ in 0..100 {
        let url = client.current_url().await.unwrap();
        let below = prefix.len() > 1 && prefix.ends_with('/') && url.path().starts_with(prefix);
        if url.path() == prefix || below {
            return (url.to_string(), url.path().to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never reached {prefix} (at {})", client.current_url().await.unwrap());
}

/// Waits until the (first) badge reads `status` (at most 10 s).
async fn until_badge(client: &Client, status: &str) {
    for _ in 0..100 {
        if let Ok(badge) = client.find(Locator::Css(".badge")).await {
            if badge.text().await.unwrap_or_default().contains(status) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the badge never read {status}");
}

/// Waits until the page holds `text` (a form's answer has loaded; at most 10 s).
async fn until_source(client: &Client, text: &str) {
    for _ in 0..100 {
        if client.source().await.unwrap_or_default().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the page never showed {text:?}");
}

async fn sign_in_through(client: &Client, base: &str, link: &str, email: &str, password: &str) {
    client.goto(&format!("{base}{link}")).await.unwrap();
    fill(client, "input[name=password]", password).await;
    submit(client, "button[type=submit]").await;
    until_source(client, "Your password is set").await;
    client.goto(&format!("{base}/signin")).await.unwrap();
    fill(client, "input[name=email]", email).await;
    fill(client, "input[name=password]", password).await;
    submit(client, "form.card button[type=submit]").await;
    // Signed in: the answer leads away from the sign-in page.
    for _ in 0..100 {
        if client.current_url().await.unwrap().path() != "/signin" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("signing in as {email} never left the sign-in page");
}

#[tokio::test]
async fn the_portal_and_the_console_in_a_browser() {
    let Some(tools) = tools() else { return };
    let db = TestDatabase::new().await;
    let (server, _stdout) = support::start(
        &db,
        &["serve", "--bind", "127.0.0.1:0", "--dev"],
        &[
            ("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN)),
            ("BILLING_SIMULATED_LATENCY_MS", Some("10")),
        ],
    );
    let base = server.base.clone();
    api(
        &base,
        reqwest::Method::POST,
        "/v1/dev/clock",
        ADMIN,
        Some(json!({"now": "2027-05-31T21:30:00Z"})),
    )
    .await;
    let account = api(
        &base,
        reqwest::Method::POST,
        "/v1/accounts",
        ADMIN,
        Some(json!({"name": "Hal Browser", "email": "hal@example.com", "currency": "AUD", "country": "AU"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api(
        &base,
        reqwest::Method::POST,
        &format!("/v1/admin/accounts/{account}/adjustments"),
        ADMIN,
        Some(json!({"amount": "1.00", "reason": "opening credit"})),
    )
    .await;
    let (_driver, client) = browser(&tools).await;

    // Sign in through the invitation; the dashboard's figures are the API's.
    let link = invite(&db, "hal@example.com", "customer", Some(&account));
    sign_in_through(&client, &base, &link, "hal@example.com", "hal uses a browser").await;
    until_path(&client, "/").await;
    until_text(&client, "[data-figure=balance]", "1.00 AUD").await;
    check_page(&client, &tools, &base, "dashboard").await;

    // Top up: the checkout opens; the payment lands while the dashboard is open, and the balance
    // changes there without a reload.
    client.goto(&format!("{base}/topup")).await.unwrap();
    check_page(&client, &tools, &base, "topup").await;
    fill(&client, "input[name=amount]", "20.00").await;
    submit(&client, "form.card button[type=submit]").await;
    let (checkout, _) = until_path(&client, "/dev/checkout/").await;
    client.goto(&format!("{base}/")).await.unwrap();
    let paid = reqwest::Client::new().post(format!("{checkout}/pay")).send().await.unwrap();
    assert!(paid.status().is_success());
    until_text(&client, "[data-figure=balance]", "21.00 AUD").await;

    // Order a server: the first hour is shown before confirming; then set it up.
    client.goto(&format!("{base}/orders/new")).await.unwrap();
    check_page(&client, &tools, &base, "order").await;
    submit(&client, "input[name=plan_id][value=vps-1g]").await;
    submit(&client, "form.card button[type=submit]").await;
    let (server_url, server_path) = until_path(&client, "/servers/").await;
    let server_id = server_path.trim_start_matches("/servers/").to_string();
    let customer_token = api(
        &base,
        reqwest::Method::POST,
        &format!("/v1/accounts/{account}/api-keys"),
        ADMIN,
        Some(json!({"role": "customer"})),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    support::wait_for(&base, &customer_token, &server_id, |status| status == "needs_setup").await;
    client.goto(&server_url).await.unwrap();
    fill(&client, "input[name=hostname]", "web1.example.com").await;
    submit(&client, "form.card button[type=submit]").await;
    until_badge(&client, "RUNNING").await;
    check_page(&client, &tools, &base, "server").await;

    // Two hours pass: the page shows the API's month-to-date figure.
    api(
        &base,
        reqwest::Method::POST,
        "/v1/dev/clock",
        ADMIN,
        Some(json!({"advance_seconds": 7200})),
    )
    .await;
    client.goto(&server_url).await.unwrap();
    let server = api(&base, reqwest::Method::GET, &format!("/v1/servers/{server_id}"), ADMIN, None).await;
    let page = client.source().await.unwrap();
    assert!(
        page.contains(&format!("{} AUD", server["month_to_date_net"].as_str().unwrap())),
        "{server}"
    );

    // Cancel with grace, revoke, then delete for good.
    submit(&client, "button[name=mode][value=grace]").await;
    until_badge(&client, "PENDING CANCELLATION").await;
    submit(&client, "form[action$=revocation] button").await;
    until_badge(&client, "RUNNING").await;
    submit(&client, "button[name=mode][value=immediate]").await;
    until_badge(&client, "DELETING").await;

    client.goto(&format!("{base}/transactions")).await.unwrap();
    check_page(&client, &tools, &base, "transactions").await;
    // June begins: May's invoice is issued.
    api(
        &base,
        reqwest::Method::POST,
        "/v1/dev/clock",
        ADMIN,
        Some(json!({"now": "2027-06-01T00:30:00Z"})),
    )
    .await;
    // A service credit against one of May's (invoiced) charges: a credit note, listed with the invoices.
    let movements = api(
        &base,
        reqwest::Method::GET,
        &format!("/v1/accounts/{account}/transactions?limit=200"),
        ADMIN,
        None,
    )
    .await;
    let charge = movements["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["kind"] == "charge")
        .expect("a charge")["reference"]
        .as_str()
        .unwrap()
        .to_string();
    api(
        &base,
        reqwest::Method::POST,
        &format!("/v1/admin/charges/{charge}/refunds"),
        ADMIN,
        Some(json!({"amount": "0.001", "reason": "a slow hour"})),
    )
    .await;
    client.goto(&format!("{base}/invoices")).await.unwrap();
    until_source(&client, "CN-2027-").await;
    check_page(&client, &tools, &base, "invoices").await;
    submit(&client, "td a").await;
    until_path(&client, "/invoices/").await;
    assert!(client.source().await.unwrap().contains("Invoice INV-2027-"));
    check_page(&client, &tools, &base, "invoice").await;
    // Its PDF, fetched by the signed-in page: a PDF document that carries the API's total.
    let invoice_path = client.current_url().await.unwrap().path().to_string();
    let invoice = api(&base, reqwest::Method::GET, &format!("/v1{invoice_path}"), ADMIN, None).await;
    let pdf = client
        .execute_async(
            "var done = arguments[arguments.length - 1];\
             fetch(arguments[0]).then(function (r) {\
               return r.arrayBuffer().then(function (b) {\
                 done([r.status, r.headers.get('content-type'), new TextDecoder('latin1').decode(b)]);\
               });\
             });",
            vec![json!(format!("{invoice_path}/pdf"))],
        )
        .await
        .unwrap();
    assert_eq!((pdf[0].as_u64(), pdf[1].as_str()), (Some(200), Some("application/pdf")));
    let document = pdf[2].as_str().unwrap();
    assert!(document.starts_with("%PDF-") && document.trim_end().ends_with("%%EOF"));
    for figure in [&invoice["number"], &invoice["display"]["total"]] {
        assert!(document.contains(figure.as_str().unwrap()), "the PDF shows {figure}");
    }

    // The statement filtered by kind: the table is replaced in place (htmx), the page is not
    // reloaded, and the address keeps the filter.
    client.goto(&format!("{base}/transactions")).await.unwrap();
    client.execute("window.stayed = true;", vec![]).await.unwrap();
    client
        .find(Locator::Css("select[name=kind] option[value=charge]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for _ in 0..100 {
        if client
            .current_url()
            .await
            .unwrap()
            .query()
            .unwrap_or_default()
            .contains("kind=charge")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows: Vec<String> = client
        .execute(
            "return Array.from(document.querySelectorAll('#statement tbody tr td:nth-child(2)')).map(function (td) { return td.textContent; });",
            vec![],
        )
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|text| text.as_str().unwrap().to_string())
        .collect();
    assert!(!rows.is_empty() && rows.iter().all(|kind| kind == "charge"), "{rows:?}");
    assert_eq!(client.execute("return window.stayed === true;", vec![]).await.unwrap(), json!(true));
    check_page(&client, &tools, &base, "transactions-filtered").await;

    // Finance: a session of its own finds the account and explains the invoice.
    client.delete_all_cookies().await.unwrap();
    let link = invite(&db, "ivy@example.com", "finance", None);
    sign_in_through(&client, &base, &link, "ivy@example.com", "ivy audits the books").await;
    client.goto(&format!("{base}/console?query=hal")).await.unwrap();
    check_page(&client, &tools, &base, "console-search").await;
    submit(&client, "td a").await;
    until_path(&client, "/console/accounts/").await;
    check_page(&client, &tools, &base, "console-account").await;
    submit(&client, "a[href^='/console/invoices/']").await;
    until_path(&client, "/console/invoices/").await;
    submit(&client, "a[href^='/console/events/']").await;
    until_path(&client, "/console/events/").await;
    assert!(client.source().await.unwrap().contains("CHAIN VERIFIED"));
    check_page(&client, &tools, &base, "console-event").await;
    client.goto(&format!("{base}/console/trial-balance")).await.unwrap();
    assert!(client.source().await.unwrap().contains("Revenue per day, AUD"));
    check_page(&client, &tools, &base, "console-trial-balance").await;
    client
        .goto(&format!("{base}/console/audit?stream=account-{account}"))
        .await
        .unwrap();
    check_page(&client, &tools, &base, "console-audit").await;

    // An admin: corrects a wallet (the effect shown first), and sees the keys, the people and the
    // read models; a rebuild shows its progress and ends.
    client.delete_all_cookies().await.unwrap();
    let link = invite(&db, "root@example.com", "admin", None);
    sign_in_through(&client, &base, &link, "root@example.com", "root keeps the books").await;
    client.goto(&format!("{base}/console/accounts/{account}")).await.unwrap();
    fill(&client, "input[name=amount]", "2.50").await;
    fill(&client, "input[name=reason]", "goodwill").await;
    submit(&client, "form.card button[type=submit]").await;
    until_source(&client, "Confirm the adjustment").await;
    check_page(&client, &tools, &base, "console-confirm").await;
    let before = api(&base, reqwest::Method::GET, &format!("/v1/accounts/{account}"), ADMIN, None).await["balance"].clone();
    submit(&client, "main form button[type=submit]").await;
    until_path(&client, &format!("/console/accounts/{account}")).await;
    let after = api(&base, reqwest::Method::GET, &format!("/v1/accounts/{account}"), ADMIN, None).await["balance"].clone();
    let amount = |value: &Value| value.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap();
    assert_eq!(amount(&after) - amount(&before), rust_decimal::Decimal::new(250, 2));
    check_page(&client, &tools, &base, "console-account-admin").await;
    for (path, name) in [("/console/keys", "console-keys"), ("/console/people", "console-people")] {
        client.goto(&format!("{base}{path}")).await.unwrap();
        check_page(&client, &tools, &base, name).await;
    }
    client.goto(&format!("{base}/console/projections")).await.unwrap();
    check_page(&client, &tools, &base, "console-read-models").await;
    let before = support::generation(&base, ADMIN, "statement").await;
    submit(&client, "button[aria-label='Rebuild statement']").await;
    until_path(&client, "/console/projections").await;
    support::rebuilt(&base, ADMIN, "statement", before).await;

    // A customer of another account finds nothing of this one's; a form whose CSRF token is taken
    // out is refused; and a session left idle past its timeout is signed out (a second server on
    // the same database, with a two-second idle timeout).
    client.delete_all_cookies().await.unwrap();
    let other = api(
        &base,
        reqwest::Method::POST,
        "/v1/accounts",
        ADMIN,
        Some(json!({"name": "Mallory", "email": "mallory@example.com", "currency": "AUD", "country": "AU"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (short, _short_stdout) = support::start(
        &db,
        &["serve", "--bind", "127.0.0.1:0", "--dev"],
        &[("BILLING_SESSION_IDLE_SECONDS", Some("2"))],
    );
    let link = invite(&db, "mallory@example.com", "customer", Some(&other));
    sign_in_through(&client, &short.base, &link, "mallory@example.com", "mallory pries around").await;
    for path in [format!("/servers/{server_id}"), format!("{invoice_path}/pdf"), invoice_path.clone()] {
        client.goto(&format!("{}{path}", short.base)).await.unwrap();
        let title = client.title().await.unwrap();
        assert!(title.starts_with("Not found"), "{path}: {title}");
    }
    client.goto(&format!("{}/topup", short.base)).await.unwrap();
    client
        .execute("document.querySelector('form.card input[name=csrf]').remove();", vec![])
        .await
        .unwrap();
    fill(&client, "input[name=amount]", "5.00").await;
    submit(&client, "form.card button[type=submit]").await;
    until_source(&client, "did not come from this site").await;
    assert_eq!(
        api(
            &base,
            reqwest::Method::GET,
            &format!("/v1/accounts/{other}/transactions"),
            ADMIN,
            None
        )
        .await["items"],
        json!([])
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.goto(&format!("{}/", short.base)).await.unwrap();
    until_path(&client, "/signin").await;
    client.close().await.unwrap();
}
