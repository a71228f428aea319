//! The published contract against the server that publishes it: the OpenAPI document is valid
//! OpenAPI, and schemathesis, driving a live `billing serve --dev` through every operation and
//! every check (with an admin token, then with a funded customer's), finds nothing the server
//! does that the document does not say.
//! Operations that may answer a status for a rule a schema cannot express are listed, each with
//! its reason, in tests/schemathesis.toml.
//!
//! The Python tools (tests/python-tools.txt) live in a virtualenv: `BILLING_PYTHON_TOOLS` names
//! its bin folder (default `~/.cache/billing-venv/bin`). If they are missing the test makes the
//! virtualenv; where that cannot be done it fails under CI and says so elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)] // shared helpers; this file only starts the server
mod support;

use ledger::testing::TestDatabase;

const ADMIN: &str = "contract-admin-token-for-tests";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// The virtualenv's bin folder with schemathesis and openapi-spec-validator, made if missing.
fn python_tools() -> Option<PathBuf> {
    let bin = match std::env::var_os("BILLING_PYTHON_TOOLS") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/billing-venv/bin"),
    };
    if bin.join("st").exists() && bin.join("openapi-spec-validator").exists() {
        return Some(bin);
    }
    let venv = bin.parent()?.to_path_buf();
    eprintln!("making the Python tools' virtualenv at {}", venv.display());
    let made = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(bin.join("pip"))
            .args(["install", "--quiet", "-r"])
            .arg(workspace().join("tests/python-tools.txt"))
            .status()
            .is_ok_and(|s| s.success());
    made.then_some(bin)
}

fn tools_or_skip() -> Option<PathBuf> {
    let tools = python_tools();
    if tools.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is required in CI: install python3-venv, or set BILLING_PYTHON_TOOLS"
        );
        eprintln!("SKIPPED: no python3 virtualenv for schemathesis (install python3-venv to run this test)");
    }
    tools
}

#[test]
fn schemathesis_finds_no_difference_between_the_contract_and_the_server() {
    let Some(tools) = tools_or_skip() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDatabase::new());
    let (server, _stdout) = support::start(
        &db,
        &["serve", "--bind", "127.0.0.1:0", "--dev"],
        &[("BILLING_BOOTSTRAP_ADMIN_TOKEN", Some(ADMIN))],
    );

    let document = runtime
        .block_on(async { reqwest::get(format!("{}/openapi.json", server.base)).await?.text().await })
        .unwrap();
    let file = std::env::temp_dir().join(format!("billing-openapi-{}.json", std::process::id()));
    std::fs::write(&file, &document).unwrap();
    let validated = Command::new(tools.join("openapi-spec-validator")).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        validated.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    // As the admin, then as a customer of a funded account (its id in every `{id}`), so that the
    // owner's operations (orders, top-ups, servers) run for real and not only to a 403.
    schemathesis(&tools, &server.base, ADMIN, None);
    let (account, customer) = runtime.block_on(funded_customer(&server.base));
    schemathesis(&tools, &server.base, &customer, Some(&account));
}

/// Opens an account, funds it by an adjustment and makes its customer key, as the admin.
async fn funded_customer(base: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let post = |path: String, body: serde_json::Value| {
        let request = client.post(format!("{base}{path}")).bearer_auth(ADMIN).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{path}: {}", response.status());
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let account = post(
        "/v1/accounts".into(),
        serde_json::json!({"name": "Contract Customer", "email": "contract@example.com", "currency": "AUD", "country": "AU"}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        format!("/v1/admin/accounts/{account}/adjustments"),
        serde_json::json!({"amount": "500.00", "reason": "funds for the contract test"}),
    )
    .await;
    let token = post(format!("/v1/accounts/{account}/api-keys"), serde_json::json!({"role": "customer"})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    (account, token)
}

/// One schemathesis run with `token`; with `account`, every `{id}` is that account's id.
fn schemathesis(tools: &Path, base: &str, token: &str, account: Option<&str>) {
    let mut config = std::fs::read_to_string(workspace().join("tests/schemathesis.toml")).unwrap();
    if let Some(account) = account {
        config = format!("[parameters]\n\"id\" = \"{account}\"\n\n{config}");
    }
    let config_file = std::env::temp_dir().join(format!("billing-schemathesis-{}-{}.toml", std::process::id(), account.is_some()));
    std::fs::write(&config_file, config).unwrap();
    // Enough examples to reach every operation in every phase; more by hand with the variable.
    let examples = std::env::var("BILLING_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "30".into());
    let run = Command::new(tools.join("st"))
        .arg("--config-file")
        .arg(&config_file)
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--checks", "all", "--seed", "1", "--max-examples", &examples])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config_file);
    let report = String::from_utf8_lossy(&run.stdout);
    let who = if account.is_some() { "a customer" } else { "the admin" };
    assert!(
        run.status.success(),
        "schemathesis as {who} found failures:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Every operation of the document was tested ("Selected: 31/31", then "Tested: 31").
    let field = |name: &str| {
        report
            .lines()
            .find_map(|line| line.trim().strip_prefix(name).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name:?} in the report:\n{report}"))
    };
    let total = field("Selected: ").rsplit('/').next().unwrap_or_default().to_string();
    assert_eq!(
        field("Tested: "),
        total,
        "schemathesis as {who} did not reach every operation:\n{report}"
    );
    println!("as {who}:\n{report}");
}
