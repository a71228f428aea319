//! Starting the real `billing` binary for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use ledger::testing::TestDatabase;

/// A running `billing` process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `billing <args>` against `db` with `envs` (a `None` value removes the variable), and
/// waits for its "listening on http://ADDR" line. Returns the server and the rest of its stdout.
pub fn start(db: &TestDatabase, args: &[&str], envs: &[(&str, Option<&str>)]) -> (Server, BufReader<ChildStdout>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billing"));
    command
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped());
    for (name, value) in envs {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let mut child = command.spawn().expect("start billing");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (Server { child, base }, stdout)
}

/// The status of a server as its customer sees it.
pub async fn server_status(base: &str, token: &str, server_id: &str) -> String {
    let server: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/servers/{server_id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in {server}"))
        .to_string()
}

/// Polls until the server's status satisfies `done` (at most 10 s); returns that status.
pub async fn wait_for(base: &str, token: &str, server_id: &str, done: impl Fn(&str) -> bool) -> String {
    for _ in 0..400 {
        let status = server_status(base, token, server_id).await;
        if done(&status) {
            settled(base).await;
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("server {server_id} never reached the awaited status");
}

/// Waits (at most 5 s) until every read model has caught up with the log, as `/readyz` reports:
/// each follows the log on its own, so one (servers) may show a change a moment before another
/// (balances) does.
pub async fn settled(base: &str) {
    for _ in 0..200 {
        let ready: serde_json::Value = reqwest::get(format!("{base}/readyz")).await.unwrap().json().await.unwrap();
        if ready["projector_lag"] == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the read models did not catch up with the log");
}

/// Opens an account as `admin` and makes a customer key for it; returns the account id and token.
pub async fn customer(base: &str, admin: &str, currency: &str, country: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let account: serde_json::Value = client
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": "Customer", "email": "customer@example.com", "currency": currency, "country": country}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let account = account["id"].as_str().unwrap().to_string();
    let key: serde_json::Value = client
        .post(format!("{base}/v1/accounts/{account}/api-keys"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"role": "customer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (account, key["token"].as_str().unwrap().to_string())
}

/// The generation of read model `name` (how many times it has been rebuilt and swapped in).
#[allow(dead_code)] // the web and browser tests use it
pub async fn generation(base: &str, admin: &str, name: &str) -> i64 {
    let statuses: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/admin/projections"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    statuses["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|status| status["name"] == name)
        .unwrap_or_else(|| panic!("no read model {name} in {statuses}"))["generation"]
        .as_i64()
        .unwrap()
}

/// Waits (at most 10 s) until read model `name` has been rebuilt and swapped in: its generation
/// has passed `before`.
#[allow(dead_code)] // the web and browser tests use it
pub async fn rebuilt(base: &str, admin: &str, name: &str, before: i64) {
    for _ in 0..200 {
        if generation(base, admin, name).await > before {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{name} was not rebuilt");
}

/// An API call as `token` that must succeed: its JSON answer.
#[allow(dead_code)] // the web and browser tests use it
pub async fn api(base: &str, method: reqwest::Method, path: &str, token: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let mut request = reqwest::Client::new().request(method, format!("{base}{path}")).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

/// `billing people invite`: the one-time link it prints.
#[allow(dead_code)] // the web and browser tests use it
pub fn invite(db: &TestDatabase, email: &str, role: &str, account: Option<&str>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billing"));
    command
        .args(["people", "invite", "--email", email, "--role", role])
        .env("DATABASE_URL", db.url());
    if let Some(account) = account {
        command.args(["--account", account]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}
