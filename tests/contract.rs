//! The published contract against the server that publishes it: the OpenAPI document is valid
//! OpenAPI, and schemathesis, driving a live `billing serve --dev` with an admin token through
//! every operation and every check, finds nothing the server does that the document does not say.
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
    let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
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

    // Enough examples to reach every operation in every phase; more by hand with the variable.
    let examples = std::env::var("BILLING_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "30".into());
    let run = Command::new(tools.join("st"))
        .arg("--config-file")
        .arg(workspace().join("tests/schemathesis.toml"))
        .args(["run", &format!("{}/openapi.json", server.base)])
        .args(["--checks", "all", "--seed", "1", "--max-examples", &examples])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "schemathesis found failures:\n{report}\n{}", String::from_utf8_lossy(&run.stderr));
    // Every operation of the document was tested ("Selected: 31/31", then "Tested: 31").
    let field = |name: &str| {
        report
            .lines()
            .find_map(|line| line.trim().strip_prefix(name).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name:?} in the report:\n{report}"))
    };
    let total = field("Selected: ").rsplit('/').next().unwrap_or_default().to_string();
    assert_eq!(field("Tested: "), total, "schemathesis did not reach every operation:\n{report}");
    println!("{report}");
}
