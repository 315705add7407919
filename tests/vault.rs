//! The Vault KV v2 source against a real OpenBao (`bao server -dev`): auth modes, namespaces,
//! KV v1 rejection, every failure's denial text, expiry and re-login, coalescing counted at the
//! server, `vault check`, and no secret value in any log line.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrets_webhook::backends::vault::spec::{
    ClusterAppRole, ClusterAuth, ClusterToken, SecretKeyRef,
};
use secrets_webhook::backends::vault::{
    Delivery, VaultBackend, VaultConfig, VaultConfigResourceSpec, VaultConfigSpec, VaultOptions,
    data_key,
};
use secrets_webhook::backends::{Delivered, KeyRef, VaultSource, VaultWant};
use secrets_webhook::config::{LocalConfig, Naming};
use secrets_webhook::identity::{KeyRing, Keys};
use secrets_webhook::metrics::Metrics;
use secrets_webhook::refs::{SecretObject, Source, SourceType};
use serde_json::json;
use support::fake_apiserver::{Collection, FakeApiServer, secret as k8s_secret};
use support::logs::captured_logs;
use support::metrics::{self, backend as backend_count, cache as cache_count};
use support::openbao::{OpenBao, ROOT_TOKEN, require_bao};

const CANARY: &str = "canary-9f3b7d-db-password";

fn keys() -> Arc<Keys> {
    Keys::fixed(KeyRing::new(b"vault-tests-signing-key-0123456789abcdef", None).unwrap())
}
const CANARY_NESTED: &str = "canary-41c2aa-nested";

fn vault_ref(config: &str, key: &str) -> SecretObject {
    SecretObject {
        key: key.into(),
        source: Source {
            kind: SourceType::Vault,
            id: config.into(),
        },
    }
}

async fn deliver(
    backend: &VaultBackend,
    refs: &[(&str, &str)],
    dry_run: bool,
    budget: Duration,
) -> Vec<Result<KeyRef, String>> {
    let objects: Vec<SecretObject> = refs.iter().map(|(c, k)| vault_ref(c, k)).collect();
    let wants: Vec<VaultWant<'_>> = objects.iter().map(|secret| VaultWant { secret }).collect();
    // These tests are about materialize mode; a runtime answer here is a failure.
    backend
        .deliver("spark-apps", &wants, dry_run, Instant::now() + budget)
        .await
        .into_iter()
        .map(|d| match d? {
            Delivered::Secret(key_ref) => Ok(key_ref),
            Delivered::Runtime => Err("delivered at runtime, not materialized".to_string()),
        })
        .collect()
}

async fn one(backend: &VaultBackend, config: &str, key: &str) -> Result<KeyRef, String> {
    deliver(backend, &[(config, key)], false, Duration::from_secs(4))
        .await
        .remove(0)
}

fn err_of(result: Result<KeyRef, String>) -> String {
    result.expect_err("expected a denial")
}

fn parse_configs(yaml: &str) -> Vec<VaultConfigSpec> {
    LocalConfig::parse(yaml).unwrap().vault_configs
}

fn uncached() -> VaultOptions {
    VaultOptions {
        cache_ttl: Duration::ZERO,
        negative_ttl: Duration::ZERO,
        ..VaultOptions::default()
    }
}

/// Runs `secrets-webhook vault check NAME --config FILE` with a hostile environment
/// (`VAULT_*`, proxies) that must not leak in; returns (success, stdout).
fn vault_check(name: &str, config: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secrets-webhook"))
        .args(["vault", "check", name, "--config"])
        .arg(config)
        .env("VAULT_ADDR", "http://127.0.0.1:1")
        .env("VAULT_TOKEN", "s.not-the-configured-token")
        .env("VAULT_NAMESPACE", "elsewhere")
        .env("HTTP_PROXY", "http://127.0.0.1:1")
        .env("HTTPS_PROXY", "http://127.0.0.1:1")
        .env("ALL_PROXY", "http://127.0.0.1:1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.success(), format!("{stdout}{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_deliver_and_deny_clearly() {
    let logs = captured_logs();
    let Some(bin) = require_bao("reads_deliver_and_deny_clearly") else {
        return;
    };
    let bao = OpenBao::start(&bin).await;

    // Seed: KV v2 secrets (live, nested, deleted, destroyed), a KV v1 mount, a namespace.
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": CANARY, "user": "app", "port": 5432}),
    )
    .await;
    bao.put_kv2(
        None,
        "secret",
        "production/team/db",
        json!({"password": CANARY_NESTED}),
    )
    .await;
    bao.put_kv2(None, "secret", "production/child", json!({"x": "1"}))
        .await;
    bao.put_kv2(None, "secret", "production/gone", json!({"a": "1"}))
        .await;
    bao.api("DELETE", "secret/data/production/gone", None).await;
    bao.put_kv2(None, "secret", "production/burned", json!({"a": "1"}))
        .await;
    bao.api(
        "POST",
        "secret/destroy/production/burned",
        Some(json!({"versions": [1]})),
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
    bao.api("POST", "sys/namespaces/team-a", None).await;
    let (status, _) = bao
        .api_ns(
            Some("team-a"),
            "POST",
            "sys/mounts/secret",
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
    assert_eq!(status, 204);
    bao.put_kv2(
        Some("team-a"),
        "secret",
        "app",
        json!({"api_key": "in-namespace"}),
    )
    .await;
    bao.policy(
        "reader",
        r#"path "secret/data/production" { capabilities = ["read"] }
           path "secret/data/production/*" { capabilities = ["read"] }
           path "secret/metadata/production" { capabilities = ["read", "list"] }
           path "secret/metadata/production/*" { capabilities = ["read", "list"] }"#,
    )
    .await;
    bao.policy(
        "lister",
        r#"path "secret/metadata/*" { capabilities = ["list"] }"#,
    )
    .await;
    let (role_id, secret_id) = bao.approle("finance", &["reader"], "1h").await;
    let secret_id_file = bao.file("secret-id", &format!("{secret_id}\n"));
    let reader_token = bao.file("reader-token", &bao.token(&["reader"], None, false).await);
    let lister_token = bao.file("lister-token", &bao.token(&["lister"], None, false).await);
    let root_token = bao.file("root-token", ROOT_TOKEN);
    let host = &bao.addr;
    let config_yaml = format!(
        r#"
vaultConfigs:
  - {{name: vault-prod-finance, host: "{host}", path: /v1/secret/data/production, delivery: materialize, resourceBundle: finance-bundle,
     auth: {{appRole: {{roleId: "{role_id}", secretIdFile: "{}"}}}}}}
  - {{name: vault-token, host: "{host}", path: /v1/secret/data/production, delivery: materialize, resourceBundle: finance-bundle,
     auth: {{token: {{file: "{}"}}}}}}
  - {{name: vault-ns, host: "{host}", path: /v1/secret/data/app, namespace: team-a, delivery: materialize, resourceBundle: b,
     auth: {{token: {{file: "{root}"}}}}}}
  - {{name: vault-no-ns, host: "{host}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b,
     auth: {{token: {{file: "{root}"}}}}}}
  - {{name: vault-kv1, host: "{host}", path: /v1/kv1/production, delivery: materialize, resourceBundle: b,
     auth: {{token: {{file: "{root}"}}}}}}
  - {{name: vault-denied, host: "{host}", path: /v1/secret/data/production, delivery: materialize, resourceBundle: b,
     auth: {{token: {{file: "{}"}}}}}}
  - {{name: vault-bad-secret-id, host: "{host}", path: /v1/secret/data/production, delivery: materialize, resourceBundle: b,
     auth: {{appRole: {{roleId: "{role_id}", secretIdFile: "{}"}}}}}}
"#,
        secret_id_file.display(),
        reader_token.display(),
        lister_token.display(),
        bao.file("wrong-secret-id", "not-the-secret-id").display(),
        root = root_token.display(),
    );
    let config_file = bao.file("config.yaml", &config_yaml);
    let specs = parse_configs(&config_yaml);
    let backend =
        VaultBackend::from_local(&specs, Naming::default(), VaultOptions::default()).unwrap();
    assert_eq!(
        backend.bundle_of("vault-prod-finance").as_deref(),
        Some("finance-bundle")
    );

    // Done means: AppRole login, the field at the path and one below it, each with its KeyRef.
    let out = deliver(
        &backend,
        &[
            ("vault-prod-finance", "db_password"),
            ("vault-prod-finance", "team/db#password"),
            ("vault-prod-finance", "port"),
        ],
        false,
        Duration::from_secs(4),
    )
    .await;
    let secret = "iomete-vault-vault-prod-finance".to_string();
    assert_eq!(
        out,
        vec![
            Ok(KeyRef {
                secret: secret.clone(),
                key: "db_password".into()
            }),
            Ok(KeyRef {
                secret: secret.clone(),
                key: data_key("team/db#password")
            }),
            Ok(KeyRef {
                secret: secret.clone(),
                key: "port".into()
            }),
        ]
    );
    let writes: Vec<String> = backend
        .take_would_be_writes()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(
        writes.contains(&format!("Secret spark-apps/{secret} key db_password")),
        "{writes:?}"
    );
    // dryRun reads and checks, and writes nothing.
    let dry = deliver(
        &backend,
        &[("vault-prod-finance", "user")],
        true,
        Duration::from_secs(4),
    )
    .await;
    assert!(dry[0].is_ok());
    assert!(backend.take_would_be_writes().is_empty());

    // Token auth and namespaces (the namespace header reaches the server on every call).
    assert!(one(&backend, "vault-token", "db_password").await.is_ok());
    assert!(one(&backend, "vault-ns", "api_key").await.is_ok());
    assert_eq!(
        err_of(one(&backend, "vault-no-ns", "api_key").await),
        "vault config vault-no-ns: no secret at secret/data/app; check the key, or create the secret in Vault"
    );

    // Each failure has its own text.
    assert_eq!(
        err_of(one(&backend, "vault-kv1", "a").await),
        "vault config vault-kv1: mount kv1/ is a KV version 1 secrets engine; only KV v2 is supported, move the secrets to a KV v2 mount"
    );
    assert_eq!(
        err_of(one(&backend, "vault-prod-finance", "nothing#x").await),
        "vault config vault-prod-finance: no secret at secret/data/production/nothing; check the key, or create the secret in Vault"
    );
    assert_eq!(
        err_of(one(&backend, "vault-prod-finance", "DB_PASSWORD").await),
        "vault config vault-prod-finance: secret secret/data/production has no field \"DB_PASSWORD\" (it has: db_password, port, user); check the key, fields are case-sensitive"
    );
    assert_eq!(
        err_of(one(&backend, "vault-prod-finance", "gone#a").await),
        "vault config vault-prod-finance: the current version (1) of secret secret/data/production/gone is deleted; undelete it or write a new version in Vault"
    );
    assert_eq!(
        err_of(one(&backend, "vault-prod-finance", "burned#a").await),
        "vault config vault-prod-finance: the current version (1) of secret secret/data/production/burned is destroyed; write a new version in Vault"
    );
    assert_eq!(
        err_of(one(&backend, "vault-denied", "db_password").await),
        "vault config vault-denied: permission denied on secret/data/production; the Vault policy of this config's role or token must allow read on it"
    );
    let login = err_of(one(&backend, "vault-bad-secret-id", "db_password").await);
    assert!(
        login.starts_with("vault config vault-bad-secret-id: AppRole login at ")
            && login
                .contains("failed: invalid role or secret ID; check the role ID and the secret ID"),
        "{login}"
    );
    assert!(err_of(one(&backend, "vault-prod-finance", "a/b").await).contains("sub/path#field"));
    assert_eq!(
        err_of(one(&backend, "unknown", "a").await),
        "no Vault config named unknown; use the name of an existing VaultConfig"
    );

    // Key listing: fields, `child#field` one level down, folders; never values.
    let keys = backend.list_keys("vault-prod-finance").await.unwrap();
    for expected in ["db_password", "port", "user", "child#x", "team/"] {
        assert!(
            keys.iter().any(|k| k == expected),
            "{expected} missing from {keys:?}"
        );
    }
    assert!(!keys.iter().any(|k| k.contains("canary")), "{keys:?}");

    // Coalescing: a burst of concurrent admissions of one app is one read per secret, one login.
    let logins_before = bao.requests_to("auth/approle/login");
    let reads_before = bao.requests_to("secret/data/production");
    let nested_before = bao.requests_to("secret/data/production/team/db");
    let metrics = Arc::new(Metrics::new());
    let counted = VaultOptions {
        metrics: Some(metrics.clone()),
        ..VaultOptions::default()
    };
    let fresh = VaultBackend::from_local(&specs, Naming::default(), counted).unwrap();
    let burst = 300;
    let results = futures::future::join_all((0..burst).map(|_| {
        let fresh = fresh.clone();
        tokio::spawn(async move {
            deliver(
                &fresh,
                &[
                    ("vault-prod-finance", "db_password"),
                    ("vault-prod-finance", "team/db#password"),
                ],
                false,
                Duration::from_secs(4),
            )
            .await
        })
    }))
    .await;
    for r in results {
        assert!(r.unwrap().iter().all(Result::is_ok));
    }
    assert_eq!(bao.requests_to("secret/data/production") - reads_before, 1);
    assert_eq!(
        bao.requests_to("secret/data/production/team/db") - nested_before,
        1
    );
    assert_eq!(bao.requests_to("auth/approle/login") - logins_before, 1);
    // Counted: 600 value lookups (each a hit, or a miss that started or joined a read); four HTTP
    // requests (login, mount lookup, two reads).
    let text = metrics.encode();
    let misses = cache_count(&text, "vault-values", "miss");
    assert!(misses >= 2.0, "{text}");
    // Every lookup may have joined a read (all misses, no hit series at all).
    assert_eq!(
        metrics::value_or_zero(&text, &metrics::cache_series("vault-values", "hit")) + misses,
        600.0,
        "{text}"
    );
    assert_eq!(backend_count(&text, "vault", "ok"), 4.0, "{text}");
    assert!(
        metrics::absent(&text, &metrics::backend_series("vault", "error")),
        "{text}"
    );
    // And later admissions within the TTL are served from the cache.
    assert!(one(&fresh, "vault-prod-finance", "user").await.is_ok());
    assert_eq!(bao.requests_to("secret/data/production") - reads_before, 1);
    let after = metrics.encode();
    assert_eq!(
        cache_count(&after, "vault-values", "miss"),
        misses,
        "{after}"
    );
    assert_eq!(
        cache_count(&after, "vault-values", "hit"),
        601.0 - misses,
        "{after}"
    );
    // A missing secret is Vault's 404 answer, not an error of Vault.
    assert!(
        one(&fresh, "vault-prod-finance", "nothing#x")
            .await
            .is_err()
    );
    let after = metrics.encode();
    assert_eq!(backend_count(&after, "vault", "not-found"), 1.0, "{after}");
    assert!(
        metrics::absent(&after, &metrics::backend_series("vault", "error")),
        "{after}"
    );

    // Test Connection, as the binary runs it, with a hostile environment.
    let (ok, out) = vault_check("vault-prod-finance", &config_file);
    assert!(ok, "{out}");
    for line in [
        "login (approle) ... ok (token ttl 3600s, renewable)",
        "mount secret/ ... kv v2 ok",
        "read production ... ok (3 fields)",
        "verdict: ok",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let (ok, out) = vault_check("vault-kv1", &config_file);
    assert!(!ok, "{out}");
    assert!(
        out.contains("verdict: FAILED: vault config vault-kv1: mount kv1/ is a KV version 1"),
        "{out}"
    );
    let (ok, out) = vault_check("vault-denied", &config_file);
    assert!(
        !ok && out
            .contains("read production ... FAILED: vault config vault-denied: permission denied"),
        "{out}"
    );
    assert!(!out.contains(CANARY));

    // No value in any log line (all crates, TRACE), while values did flow.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(!logs.is_empty());
    support::leaks::assert_no_leak(&[("the logs", &logs)], &[CANARY, CANARY_NESTED]);
    assert!(
        !logs.contains(&secret_id),
        "the AppRole secret ID reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_renew_and_log_in_again() {
    let _logs = captured_logs();
    let Some(bin) = require_bao("tokens_expire_renew_and_log_in_again") else {
        return;
    };
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(None, "secret", "app", json!({"k": "v"})).await;
    bao.policy(
        "reader",
        r#"path "secret/data/app" { capabilities = ["read"] }"#,
    )
    .await;
    let (role_id, secret_id) = bao.approle("short", &["reader"], "2s").await;
    let renewable = bao.token(&["reader"], Some("3s"), true).await;
    let fixed = bao.token(&["reader"], Some("2s"), false).await;
    let yaml = format!(
        r#"
vaultConfigs:
  - {{name: short, host: "{h}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b,
     auth: {{appRole: {{roleId: "{role_id}", secretIdFile: "{}"}}}}}}
  - {{name: renewed, host: "{h}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{}"}}}}}}
  - {{name: fixed, host: "{h}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{}"}}}}}}
"#,
        bao.file("sid", &secret_id).display(),
        bao.file("renewable", &renewable).display(),
        bao.file("fixed", &fixed).display(),
        h = bao.addr,
    );
    let backend =
        VaultBackend::from_local(&parse_configs(&yaml), Naming::default(), uncached()).unwrap();

    for name in ["short", "renewed", "fixed"] {
        assert!(one(&backend, name, "k").await.is_ok(), "{name}");
    }
    assert_eq!(bao.requests_to("auth/approle/login"), 1);
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // The AppRole token expired (max TTL 2 s): the next read logs in again.
    assert!(one(&backend, "short", "k").await.is_ok());
    assert_eq!(bao.requests_to("auth/approle/login"), 2);
    // The renewable token was kept alive in the background.
    assert!(one(&backend, "renewed", "k").await.is_ok());
    assert!(bao.requests_to("auth/token/renew-self") >= 1);
    // A token that cannot be renewed ends; that is a clear denial, not a hang.
    assert_eq!(
        err_of(one(&backend, "fixed", "k").await),
        format!(
            "vault config fixed: Vault at {} rejected the token (invalid, expired or revoked); put a valid token into the credentials Secret",
            bao.addr
        )
    );

    // A token revoked behind our back: 403, one fresh login, then the read succeeds.
    bao.api("POST", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await;
    let logins = bao.requests_to("auth/approle/login");
    assert!(one(&backend, "short", "k").await.is_ok());
    assert_eq!(bao.requests_to("auth/approle/login"), logins + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_stopped_and_silent_vaults_deny_within_the_budget() {
    let _logs = captured_logs();
    let Some(bin) = require_bao("sealed_stopped_and_silent_vaults_deny_within_the_budget") else {
        return;
    };
    let mut bao = OpenBao::start(&bin).await;
    bao.put_kv2(None, "secret", "app", json!({"k": "v"})).await;
    // A listener that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let yaml = format!(
        r#"
vaultConfigs:
  - {{name: v, host: "{}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{token}"}}}}}}
  - {{name: silent, host: "http://{}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{token}"}}}}}}
"#,
        bao.addr,
        silent.local_addr().unwrap(),
        token = bao.file("root", ROOT_TOKEN).display(),
    );
    let config_file = bao.file("config.yaml", &yaml);
    let backend =
        VaultBackend::from_local(&parse_configs(&yaml), Naming::default(), uncached()).unwrap();
    assert!(one(&backend, "v", "k").await.is_ok());

    // Rate limited (429): retried with backoff (100 + 200 + 400 ms), then a clear denial.
    bao.api(
        "POST",
        "sys/quotas/rate-limit/slow",
        Some(json!({"path": "secret/", "rate": 1, "interval": "30s"})),
    )
    .await;
    let _ = one(&backend, "v", "k").await;
    let started = Instant::now();
    let limited = err_of(one(&backend, "v", "k").await);
    assert_eq!(
        limited,
        format!(
            "vault config v: Vault at {} kept answering HTTP 429 (rate limit or not ready); try again later",
            bao.addr
        )
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    bao.api("DELETE", "sys/quotas/rate-limit/slow", None).await;
    // Recovery: a transient failure is not cached; once the quota is gone, reads work again.
    assert!(
        one(&backend, "v", "k").await.is_ok(),
        "no recovery after the rate limit cleared"
    );

    bao.api("PUT", "sys/seal", None).await;
    let started = Instant::now();
    let sealed = err_of(one(&backend, "v", "k").await);
    assert_eq!(
        sealed,
        format!(
            "vault config v: Vault at {} is sealed; ask the Vault operators to unseal it",
            bao.addr
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (ok, out) = vault_check("v", &config_file);
    assert!(!ok && out.contains("is sealed"), "{out}");

    bao.stop();
    let started = Instant::now();
    let down = err_of(one(&backend, "v", "k").await);
    assert!(
        down.starts_with(&format!(
            "vault config v: Vault at {} is unreachable (",
            bao.addr // A pooled connection may see the server go away mid-request before the next one is refused.
        )) && (down.contains("onnection refused") || down.contains("connection closed")),
        "{down}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let budget = Duration::from_millis(1500);
    let out = deliver(&backend, &[("silent", "k")], false, budget).await;
    let elapsed = started.elapsed();
    assert!(
        err_of(out.into_iter().next().unwrap()).ends_with(
            "did not answer within the admission time budget; try again, and check Vault's health if it persists"
        )
    );
    assert!(
        elapsed >= budget && elapsed < budget + Duration::from_millis(500),
        "{elapsed:?}"
    );
}

fn vault_config(name: &str, host: &str, path: &str, auth: ClusterAuth) -> VaultConfig {
    let mut config = VaultConfig::new(
        name,
        VaultConfigResourceSpec {
            resource_bundle: "finance-bundle".into(),
            host: host.into(),
            path: path.into(),
            namespace: None,
            ca_cert: None,
            auth,
            delivery: Delivery::Materialize,
        },
    );
    config.metadata.namespace = Some("iomete-system".into());
    config
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn secret_data(api: &FakeApiServer, namespace: &str, name: &str) -> Option<serde_json::Value> {
    api.object(&Collection::secrets(), Some(namespace), name)
}

fn decoded(object: &serde_json::Value, key: &str) -> Option<String> {
    use base64::Engine;
    let b64 = object["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

fn ready_condition(api: &FakeApiServer, name: &str) -> Option<serde_json::Value> {
    let object = api.object(
        &Collection::of::<VaultConfig>(),
        Some("iomete-system"),
        name,
    )?;
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_configs_materialize_into_managed_secrets() {
    let logs = captured_logs();
    let Some(bin) = require_bao("in_cluster_configs_materialize_into_managed_secrets") else {
        return;
    };
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": CANARY, "user": "app"}),
    )
    .await;
    bao.policy(
        "reader",
        r#"path "secret/data/production*" { capabilities = ["read"] }"#,
    )
    .await;
    let (role_id, secret_id) = bao.approle("finance", &["reader"], "1h").await;
    bao.api(
        "POST",
        "sys/mounts/kv1",
        Some(json!({"type": "kv", "options": {"version": "1"}})),
    )
    .await;

    let api = FakeApiServer::start().await;
    api.put(k8s_secret(
        "iomete-system",
        "vault-prod-finance-credentials",
        &[("secret-id", &secret_id)],
    ));
    api.put(k8s_secret(
        "iomete-system",
        "root-token",
        &[("token", ROOT_TOKEN)],
    ));
    let approle = ClusterAuth {
        app_role: Some(ClusterAppRole {
            role_id: role_id.clone(),
            secret_id_ref: SecretKeyRef {
                name: "vault-prod-finance-credentials".into(),
                key: "secret-id".into(),
            },
            mount: None,
        }),
        token: None,
    };
    let root = ClusterAuth {
        app_role: None,
        token: Some(ClusterToken {
            secret_ref: SecretKeyRef {
                name: "root-token".into(),
                key: "token".into(),
            },
        }),
    };
    api.put_typed(&vault_config(
        "vault-prod-finance",
        &bao.addr,
        "/v1/secret/data/production",
        approle,
    ));
    api.put_typed(&vault_config(
        "vault-kv1",
        &bao.addr,
        "/v1/kv1/production",
        root,
    ));
    // Credentials may not be taken from a guarded store.
    let from_store = ClusterAuth {
        app_role: None,
        token: Some(ClusterToken {
            secret_ref: SecretKeyRef {
                name: "iomete-secret-store-finance".into(),
                key: "db_password".into(),
            },
        }),
    };
    api.put_typed(&vault_config(
        "vault-from-store",
        &bao.addr,
        "/v1/secret/data/production",
        from_store,
    ));
    // A same-named Secret someone else owns must not be taken over.
    api.put(k8s_secret(
        "squatter",
        "iomete-vault-vault-prod-finance",
        &[("x", "y")],
    ));

    let options = VaultOptions {
        cache_ttl: Duration::ZERO,
        recheck_interval: Duration::from_millis(300),
        ..VaultOptions::default()
    };
    let backend = VaultBackend::in_cluster(api.client(), Naming::default(), keys(), options);
    eventually("the VaultConfig listing", || backend.ready()).await;
    assert_eq!(
        backend.bundle_of("vault-prod-finance").as_deref(),
        Some("finance-bundle")
    );

    // Test Connection results land in status.conditions (type Ready).
    eventually("Ready conditions", || {
        ready_condition(&api, "vault-prod-finance").is_some()
            && ready_condition(&api, "vault-kv1").is_some()
    })
    .await;
    let ready = ready_condition(&api, "vault-prod-finance").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Connected")),
        "{ready}"
    );
    assert_eq!(ready["observedGeneration"], 1);
    let kv1 = ready_condition(&api, "vault-kv1").unwrap();
    assert_eq!(
        (kv1["status"].as_str(), kv1["reason"].as_str()),
        (Some("False"), Some("KvV1Unsupported")),
        "{kv1}"
    );

    let writes = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| {
                r.path.starts_with("/api/v1/")
                    && r.path.contains("/secrets")
                    && matches!(r.method.as_str(), "POST" | "PATCH" | "PUT")
            })
            .count()
    };
    let managed = "iomete-vault-vault-prod-finance";

    // dryRun: read and check, write nothing.
    let dry = deliver(
        &backend,
        &[("vault-prod-finance", "db_password")],
        true,
        Duration::from_secs(4),
    )
    .await;
    assert!(dry[0].is_ok(), "{dry:?}");
    assert_eq!(writes(&api), 0);
    assert!(secret_data(&api, "spark-apps", managed).is_none());

    // One reference fails: the pod is denied, so no value is copied into its namespace.
    let partial = deliver(
        &backend,
        &[
            ("vault-prod-finance", "db_password"),
            ("vault-prod-finance", "no_such_field"),
        ],
        false,
        Duration::from_secs(4),
    )
    .await;
    assert!(partial[1].is_err(), "{partial:?}");
    assert_eq!(writes(&api), 0);
    assert!(secret_data(&api, "spark-apps", managed).is_none());

    // The pod's reference: the managed Secret is created, labelled, holds the value read from Vault.
    let out = one(&backend, "vault-prod-finance", "db_password").await;
    assert_eq!(
        out,
        Ok(KeyRef {
            secret: managed.into(),
            key: "db_password".into()
        })
    );
    let object = secret_data(&api, "spark-apps", managed).expect("managed Secret written");
    assert_eq!(decoded(&object, "db_password").as_deref(), Some(CANARY));
    assert_eq!(
        object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "secrets-webhook"
    );
    assert_eq!(
        object["metadata"]["labels"]["secrets.iomete.com/vault-config"],
        "vault-prod-finance"
    );
    assert_eq!(
        object["data"].as_object().unwrap().len(),
        1,
        "only the keys in use"
    );
    assert_eq!(writes(&api), 1);

    // Same value again: no write. A new key: merged in, the old one kept.
    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    assert_eq!(writes(&api), 1);
    assert!(one(&backend, "vault-prod-finance", "user").await.is_ok());
    assert_eq!(writes(&api), 2);
    let object = secret_data(&api, "spark-apps", managed).unwrap();
    assert_eq!(decoded(&object, "user").as_deref(), Some("app"));
    assert_eq!(decoded(&object, "db_password").as_deref(), Some(CANARY));

    // A changed value in Vault is written once.
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": "rotated-value", "user": "app"}),
    )
    .await;
    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    assert_eq!(writes(&api), 3);
    let object = secret_data(&api, "spark-apps", managed).unwrap();
    assert_eq!(
        decoded(&object, "db_password").as_deref(),
        Some("rotated-value")
    );

    // Denials in a cluster: KV v1, and a Secret the webhook does not manage.
    assert!(err_of(one(&backend, "vault-kv1", "a").await).contains("KV version 1"));
    let objects = [vault_ref("vault-prod-finance", "user")];
    let wants = [VaultWant {
        secret: &objects[0],
    }];
    let squatted = backend
        .deliver(
            "squatter",
            &wants,
            false,
            Instant::now() + Duration::from_secs(4),
        )
        .await;
    assert_eq!(
        squatted[0].as_ref().unwrap_err(),
        "vault config vault-prod-finance: Secret squatter/iomete-vault-vault-prod-finance exists but is not managed by secrets-webhook; delete or rename it so the webhook can manage it"
    );

    assert_eq!(
        err_of(one(&backend, "vault-from-store", "db_password").await),
        "vault config vault-from-store is invalid: its credentials may not come from the webhook-managed Secret iomete-secret-store-finance; use a dedicated Secret; fix the VaultConfig"
    );
    eventually("the invalid config's condition", || {
        ready_condition(&api, "vault-from-store").is_some()
    })
    .await;
    assert_eq!(
        ready_condition(&api, "vault-from-store").unwrap()["reason"],
        "InvalidConfig"
    );

    // Deleting the VaultConfig removes it.
    api.remove(
        &Collection::of::<VaultConfig>(),
        Some("iomete-system"),
        "vault-kv1",
    );
    eventually("the deletion", || backend.bundle_of("vault-kv1").is_none()).await;

    // The condition follows Vault: sealed now, so the periodic test turns Ready False.
    bao.api("PUT", "sys/seal", None).await;
    eventually("Ready to turn False", || {
        ready_condition(&api, "vault-prod-finance").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let sealed = ready_condition(&api, "vault-prod-finance").unwrap();
    assert_eq!(sealed["reason"], "Sealed", "{sealed}");
    assert!(sealed["message"].as_str().unwrap().contains("is sealed"));

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    support::leaks::assert_no_leak(&[("the logs", &logs)], &[CANARY, "rotated-value"]);
}

/// Attack: someone with `patch secrets` in a namespace swaps the value the webhook materialized
/// there, within the 30 s the webhook used to trust its own memo of what it wrote, so the next
/// pods of other users receive it. And: a Secret created beforehand with the "managed" label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_managed_secrets_are_detected_and_rewritten() {
    let logs = captured_logs();
    let Some(bin) = require_bao("tampered_managed_secrets_are_detected_and_rewritten") else {
        return;
    };
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": CANARY, "user": "app"}),
    )
    .await;
    let api = FakeApiServer::start().await;
    api.put(k8s_secret(
        "iomete-system",
        "root-token",
        &[("token", ROOT_TOKEN)],
    ));
    let root = ClusterAuth {
        app_role: None,
        token: Some(ClusterToken {
            secret_ref: SecretKeyRef {
                name: "root-token".into(),
                key: "token".into(),
            },
        }),
    };
    api.put_typed(&vault_config(
        "vault-prod-finance",
        &bao.addr,
        "/v1/secret/data/production",
        root,
    ));
    // The defaults: values cached for 30 s, as in production.
    let backend = VaultBackend::in_cluster(
        api.client(),
        Naming::default(),
        keys(),
        VaultOptions::default(),
    );
    eventually("the VaultConfig listing", || backend.ready()).await;
    let managed = "iomete-vault-vault-prod-finance";
    let secret = |api: &FakeApiServer| secret_data(api, "spark-apps", managed).unwrap();

    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    assert!(one(&backend, "vault-prod-finance", "user").await.is_ok());
    let written = secret(&api);
    assert!(
        written["metadata"]["annotations"]["secrets.iomete.com/content-signature"].is_string(),
        "{written}"
    );
    // Unchanged: read again (one GET per admission), nothing written.
    let gets = api.count(
        "GET",
        &format!("/api/v1/namespaces/spark-apps/secrets/{managed}"),
    );
    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    assert_eq!(
        api.count(
            "GET",
            &format!("/api/v1/namespaces/spark-apps/secrets/{managed}")
        ),
        gets + 1
    );
    assert_eq!(
        secret(&api)["metadata"]["resourceVersion"],
        written["metadata"]["resourceVersion"]
    );

    // The swap: the next admission, a second later, finds it and writes the real value back.
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let mut swapped = secret(&api);
    swapped["data"]["db_password"] = json!(b64("attacker-controlled"));
    swapped["data"]["extra"] = json!(b64("planted"));
    api.put(swapped);
    assert!(
        one(&backend, "vault-prod-finance", "db_password")
            .await
            .is_ok()
    );
    let restored = secret(&api);
    assert_eq!(decoded(&restored, "db_password").as_deref(), Some(CANARY));
    // Nothing the webhook cannot vouch for survives: the planted key and the key written for
    // another admission (it comes back with the next admission that needs it).
    assert_eq!(restored["data"].as_object().unwrap().len(), 1, "{restored}");
    assert!(one(&backend, "vault-prod-finance", "user").await.is_ok());
    assert_eq!(decoded(&secret(&api), "user").as_deref(), Some("app"));

    // A forged signature (copied from another version of the content) does not help.
    let mut forged = secret(&api);
    forged["data"]["user"] = json!(b64("attacker"));
    api.put(forged);
    assert!(one(&backend, "vault-prod-finance", "user").await.is_ok());
    assert_eq!(decoded(&secret(&api), "user").as_deref(), Some("app"));

    // Squatting: a Secret created beforehand with the "managed" label and an owner that would
    // have it collected is taken over with real values and cleaned.
    let mut squat = k8s_secret(
        "squat-ns",
        managed,
        &[("db_password", "attacker-controlled")],
    );
    squat["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "secrets-webhook"});
    squat["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
        "name": "mine", "uid": "1", "controller": false}]);
    api.put(squat);
    let objects = [vault_ref("vault-prod-finance", "db_password")];
    let wants = [VaultWant {
        secret: &objects[0],
    }];
    let out = backend
        .deliver(
            "squat-ns",
            &wants,
            false,
            Instant::now() + Duration::from_secs(4),
        )
        .await;
    assert!(out[0].is_ok(), "{out:?}");
    let taken = secret_data(&api, "squat-ns", managed).unwrap();
    assert_eq!(decoded(&taken, "db_password").as_deref(), Some(CANARY));
    assert!(taken["metadata"]["ownerReferences"].is_null(), "{taken}");

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(logs.contains("changed outside secrets-webhook"), "{logs}");
    support::leaks::assert_no_leak(&[("the logs", &logs)], &[CANARY, "attacker-controlled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_configured_ca() {
    let _logs = captured_logs();
    let Some(bin) = require_bao("tls_needs_the_configured_ca") else {
        return;
    };
    let bao = OpenBao::start_tls(&bin).await;
    assert!(bao.addr.starts_with("https://"));
    bao.put_kv2(None, "secret", "app", json!({"k": "v"})).await;
    let yaml = format!(
        r#"
vaultConfigs:
  - {{name: with-ca, host: "{h}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, caCertFile: "{ca}",
     auth: {{token: {{file: "{token}"}}}}}}
  - {{name: without-ca, host: "{h}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b,
     auth: {{token: {{file: "{token}"}}}}}}
"#,
        h = bao.addr,
        ca = bao.ca_file().display(),
        token = bao.file("root", ROOT_TOKEN).display(),
    );
    let backend =
        VaultBackend::from_local(&parse_configs(&yaml), Naming::default(), uncached()).unwrap();
    assert!(one(&backend, "with-ca", "k").await.is_ok());
    let untrusted = err_of(one(&backend, "without-ca", "k").await);
    assert!(
        untrusted.starts_with(&format!(
            "vault config without-ca: Vault at {} is unreachable (",
            bao.addr
        )) && untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );
}

/// Definitive answers (here: no such secret) are served again for `negative_ttl` without asking
/// Vault; after it, Vault is asked again and a secret created meanwhile is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitive_failures_are_cached_for_the_negative_ttl_only() {
    let _logs = captured_logs();
    let Some(bin) = require_bao("definitive_failures_are_cached_for_the_negative_ttl_only") else {
        return;
    };
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(None, "secret", "app", json!({"k": "v"})).await;
    let yaml = format!(
        r#"
vaultConfigs:
  - {{name: v, host: "{}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{}"}}}}}}
"#,
        bao.addr,
        bao.file("root", ROOT_TOKEN).display(),
    );
    let negative_ttl = Duration::from_millis(1500);
    let metrics = Arc::new(Metrics::new());
    let opts = VaultOptions {
        negative_ttl,
        metrics: Some(metrics.clone()),
        ..VaultOptions::default()
    };
    let backend = VaultBackend::from_local(&parse_configs(&yaml), Naming::default(), opts).unwrap();
    let path = "secret/data/app/later";

    let missing = err_of(one(&backend, "v", "later#x").await);
    let first_read = Instant::now();
    assert_eq!(
        missing,
        "vault config v: no secret at secret/data/app/later; check the key, or create the secret in Vault"
    );
    assert_eq!(bao.requests_to(path), 1);

    // Created in Vault now: within the negative TTL the cached answer stands, Vault is not asked.
    bao.put_kv2(None, "secret", "app/later", json!({"x": "1"}))
        .await;
    let written = bao.requests_to(path); // the audit log counts the write too
    assert_eq!(err_of(one(&backend, "v", "later#x").await), missing);
    assert!(
        first_read.elapsed() < negative_ttl,
        "the test ran too slowly to tell"
    );
    assert_eq!(
        bao.requests_to(path),
        written,
        "a definitive failure was not cached"
    );
    let text = metrics.encode();
    assert_eq!(cache_count(&text, "vault-values", "hit"), 1.0, "{text}");
    assert_eq!(backend_count(&text, "vault", "not-found"), 1.0, "{text}");

    // Past the TTL: asked again, and found.
    tokio::time::sleep((first_read + negative_ttl + Duration::from_millis(200)) - Instant::now())
        .await;
    assert!(one(&backend, "v", "later#x").await.is_ok());
    assert_eq!(bao.requests_to(path), written + 1);
}

/// The Vault client follows no redirect: a 3xx would send the token (or an AppRole secret ID) to
/// wherever `Location` points. A Vault address that redirects is a clear denial, and the target
/// of the redirect never hears from the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_from_vault_are_not_followed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let target_hits = Arc::new(AtomicUsize::new(0));
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let hits = target_hits.clone();
    let target_app = axum::Router::new().fallback(move || {
        hits.fetch_add(1, Ordering::SeqCst);
        async { axum::Json(json!({"data": {"data": {"k": "stolen"}}})) }
    });
    let target_task = tokio::spawn(async move { axum::serve(target, target_app).await });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector_addr = redirector.local_addr().unwrap();
    let redirector_hits = Arc::new(AtomicUsize::new(0));
    let hits = redirector_hits.clone();
    let redirect_app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        hits.fetch_add(1, Ordering::SeqCst);
        let location = format!("http://{target_addr}{uri}");
        async move {
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, location)],
            )
        }
    });
    let redirector_task = tokio::spawn(async move { axum::serve(redirector, redirect_app).await });

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s.token-that-must-stay-home").unwrap();
    let secret_id = dir.path().join("secret-id");
    std::fs::write(&secret_id, "secret-id-that-must-stay-home").unwrap();
    let yaml = format!(
        r#"
vaultConfigs:
  - {{name: tok, host: "http://{redirector_addr}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{token: {{file: "{}"}}}}}}
  - {{name: role, host: "http://{redirector_addr}", path: /v1/secret/data/app, delivery: materialize, resourceBundle: b, auth: {{appRole: {{roleId: r, secretIdFile: "{}"}}}}}}
"#,
        token.display(),
        secret_id.display(),
    );
    let backend =
        VaultBackend::from_local(&parse_configs(&yaml), Naming::default(), uncached()).unwrap();
    for config in ["tok", "role"] {
        let denial = err_of(one(&backend, config, "k").await);
        assert_eq!(
            denial,
            format!(
                "vault config {config}: Vault at http://{redirector_addr} answered with a redirect \
                 (HTTP 307), which is not followed (it would carry the credentials to another \
                 address); set the VaultConfig host to the address that serves requests itself (the \
                 active node or its load balancer)"
            )
        );
    }
    assert!(
        redirector_hits.load(Ordering::SeqCst) >= 2,
        "Vault was asked"
    );
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "a redirect was followed: the token went to another address"
    );
    target_task.abort();
    redirector_task.abort();
}
