//! The console in headless Chromium (Debian's `chromium`, driven by playwright-core from npm):
//! tests/console/console.test.mjs clicks through creating, editing and deleting a domain secret,
//! the Global tab, and a new Vault integration with Test Connection against a real OpenBao. The
//! screenshots are kept in target/console-screenshots/. Without Chromium or the npm package the
//! test prints a loud SKIP line, unless CI is set: then it fails (.ci/run installs both).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::api::{ApiServer, CONFIG};
use support::openbao::{OpenBao, require_bao};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> Option<PathBuf> {
    std::env::var_os("CHROMIUM_BIN")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")))
        .filter(|p| p.is_file())
}

fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("console test: {why}; CI must install it (.ci/run)");
    }
    eprintln!("\n*** SKIP console test: {why}; the console test did NOT run ***\n");
}

#[tokio::test]
async fn console_creates_a_secret_and_tests_a_vault_connection_in_chromium() {
    let Some(bin) = require_bao("console test") else {
        return;
    };
    let Some(browser) = chromium() else {
        return skip("no Chromium (apt-get install -y chromium, or set CHROMIUM_BIN)");
    };
    let script_dir = repo().join("tests/console");
    if !script_dir.join("node_modules/playwright-core").is_dir() {
        return skip("no playwright-core (npm ci in tests/console)");
    }
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(None, "secret", "production", json!({"db_password": "x"}))
        .await;
    bao.put_kv2(None, "secret", "production/team", json!({"token": "y"}))
        .await;
    bao.api(
        "POST",
        "sys/mounts/kv1",
        Some(json!({"type": "kv", "options": {"version": "1"}})),
    )
    .await;
    bao.api("POST", "kv1/production", Some(json!({"a": "b"})))
        .await;
    bao.policy("read", "path \"secret/*\" { capabilities = [\"read\", \"list\"] }\npath \"kv1/*\" { capabilities = [\"read\", \"list\"] }").await;
    let (role_id, secret_id) = bao.approle("console", &["read"], "1h").await;
    let api = ApiServer::dev(CONFIG).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &api.ca_pem).unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let shots = target.join("console-screenshots");
    let canary = "cOnSoLe-CaNaRy-value-314";
    let base = api.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("console.test.mjs")
            .current_dir(&script_dir)
            .env("CONSOLE_URL", base)
            .env("CA_PEM", &ca)
            .env("CHROMIUM_BIN", browser)
            .env("SCREENSHOT_DIR", &shots)
            .env("TOKEN_ALICE", "t-alice")
            .env("TOKEN_ADMIN", "t-admin")
            .env("VAULT_HOST", &bao.addr)
            .env("VAULT_ROLE_ID", role_id)
            .env("CANARY_VALUE", canary)
            .env("CANARY_SECRET_ID", secret_id)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console test failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ok:"), "{stdout}");
    // What the clicks did, seen through the API.
    let keys = api
        .get("/api/v1/domains/finance/secrets", "t-alice")
        .await
        .json();
    let names: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["console_key"]);
    let config = api
        .get("/api/v1/vault-configs/vault-console", "t-admin")
        .await
        .json();
    assert_eq!(config["path"], json!("/v1/secret/data/production/team"));
    assert_eq!(config["auth"]["roleId"].as_str().map(str::len), Some(36));
    for shot in [
        "01-new-domain-secret.png",
        "03-vault-test-connection.png",
        "05-domain-secrets.png",
    ] {
        let path = target.join("console-screenshots").join(shot);
        assert!(
            std::fs::metadata(&path)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{}",
            path.display()
        );
    }
}
