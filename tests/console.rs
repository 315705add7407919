//! The console in headless Chromium (Debian's `chromium`, driven by playwright-core from npm):
//! tests/console/console.test.mjs clicks through creating, editing and deleting a domain secret,
//! the Global tab, and a new Vault integration with Test Connection against a real OpenBao;
//! tests/console/in-use.test.mjs deletes a key live pods use (the warning, then `force`). The
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

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Chromium and playwright-core, or `None` after a loud SKIP (a panic in CI).
fn browser() -> Option<PathBuf> {
    let Some(browser) = chromium() else {
        skip("no Chromium (apt-get install -y chromium, or set CHROMIUM_BIN)");
        return None;
    };
    if !repo()
        .join("tests/console/node_modules/playwright-core")
        .is_dir()
    {
        skip("no playwright-core (npm ci in tests/console)");
        return None;
    }
    Some(browser)
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
    let Some(browser) = browser() else { return };
    let script_dir = repo().join("tests/console");
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(None, "secret", "production", json!({"db_password": "x"}))
        .await;
    bao.put_kv2(
        None,
        "secret",
        "production/team",
        json!({"token": "y", "<img src=x onerror=window.__xss=1>": "z"}),
    )
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
    let target = target_dir();
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

#[tokio::test]
async fn console_warns_before_deleting_a_key_in_use() {
    use std::sync::Arc;

    use secrets_webhook::admission::Webhook;
    use secrets_webhook::authz::Identity;
    use secrets_webhook::backends::vault::{VaultBackend, VaultOptions};
    use secrets_webhook::config::{LocalConfig, Naming, Settings};
    use secrets_webhook::identity::stamps::{Subject, stamp_annotations};
    use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
    use secrets_webhook::metrics::Metrics;
    use secrets_webhook::refs::{SecretObject, Source, SourceType};
    use support::fake_apiserver::{FakeApiServer, pod, secret};

    let Some(browser) = browser() else { return };
    const NS: &str = "iomete-system";
    let fake = FakeApiServer::start().await;
    fake.accept_token("sa-alice", "alice", &[]);
    fake.put(json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["view", "update"]}]}}));
    fake.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "v"), ("other", "v")],
    ));
    // Pods as the webhook admitted them: stamps signed with its key.
    let keys =
        Keys::fixed(KeyRing::new(b"console-tests-signing-key-0123456789abcd", None).unwrap());
    let db_password = SecretObject {
        key: "db_password".into(),
        source: Source {
            kind: SourceType::Kubernetes,
            id: "finance".into(),
        },
    };
    for name in ["driver", "exec-1"] {
        let mut p = pod(NS, name);
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(p.clone()).unwrap();
        let stamps = stamp_annotations(
            &Identity::new("alice", Vec::new()),
            [&db_password],
            &Subject::of_new_pod(&typed, NS),
            &keys.get().unwrap(),
        );
        p["metadata"]["annotations"] = json!(stamps);
        p["status"] = json!({"phase": "Running"});
        fake.put(p);
    }
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        ..Settings::default()
    };
    let client = fake.client();
    let vault = VaultBackend::in_cluster(
        client.clone(),
        settings.naming.clone(),
        Arc::clone(&keys),
        VaultOptions::default(),
    );
    let webhook = Webhook::from_cluster_parts(
        settings,
        client.clone(),
        Arc::new(Metrics::new()),
        TrustedControllers::default(),
        keys,
        Arc::clone(&vault),
    )
    .unwrap();
    for _ in 0..100 {
        if webhook.ready() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let api =
        secrets_webhook::api::cluster(&webhook, vault, client, &LocalConfig::default(), vec![])
            .unwrap();
    let api = ApiServer::serve(webhook, api).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &api.ca_pem).unwrap();
    let base = api.base.clone();
    let shots = target_dir().join("console-screenshots");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("in-use.test.mjs")
            .current_dir(repo().join("tests/console"))
            .env("CONSOLE_URL", base)
            .env("CA_PEM", &ca)
            .env("CHROMIUM_BIN", browser)
            .env("SCREENSHOT_DIR", shots)
            .env("TOKEN", "sa-alice")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "in-use console test failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = fake
        .object(
            &support::fake_apiserver::Collection::secrets(),
            Some(NS),
            "iomete-secret-store-finance",
        )
        .unwrap();
    assert!(store["data"].get("db_password").is_none() && store["data"].get("other").is_some());
}
