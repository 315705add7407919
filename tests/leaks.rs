//! Secret values in every encoding, searched for everywhere someone other than the pod could read
//! them. Canary values live in a Kubernetes store, in OpenBao (read through the create path and
//! both update paths of the managed Secret: a key added, a stale value replaced) and in a
//! credential; after successes, denials, a dry run and a sealed Vault, each is searched for raw,
//! base64 / base64url (at any alignment), JSON-escaped, `Debug`-escaped, URL-encoded and hex
//! (`support::leaks`) in:
//!
//! - every log line, in the production JSON format at TRACE for all crates (each line must also
//!   be one JSON object without a repeated key);
//! - every AdmissionReview response, decoded patch, patched pod and warning;
//! - the metrics;
//! - every object the API server holds other than Secrets (VaultConfig status conditions, pods,
//!   bundles), and every request the webhook sent it (path, query and body) other than the writes
//!   of the managed Secrets.
//!
//! The one place a Vault value may be is the managed Secret in the pod's namespace; the test also
//! checks the search finds the canaries there, so a search that could not fail would show.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrets_webhook::admission::Webhook;
use secrets_webhook::config::{Naming, Settings};
use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};
use support::fake_apiserver::{Collection, FakeApiServer, Logged, secret};
use support::leaks;
use support::openbao::{OpenBao, ROOT_TOKEN, require_bao};

const NS: &str = "iomete-system";
const TEAM: &str = "team";
const MANAGED: &str = "iomete-vault-vault-prod-finance";

/// In the finance store; never leaves it.
const STORE_CANARY: &str = "cAnary-store-\"5d1e\\9a\u{e9}-71";
/// Vault field `db_password`: the managed Secret is created with it (POST), and it replaces a
/// stale value in a managed Secret that already exists (PUT).
const VAULT_CANARY: &str = "cAnary-vault-\"0b7c\\44\u{e9}-72";
/// Vault field `api_key`: added to a managed Secret that exists (PUT, conditional on its
/// resourceVersion).
const VAULT_CANARY_ADDED: &str = "cAnary-vault-\"a4f2\\11\u{e9}-73";
/// What the pre-existing managed Secret in `team` held before the webhook updated it.
const STALE_CANARY: &str = "cAnary-stale-\"9e0d\\27\u{e9}-74";

fn fixture(name: &str, namespace: &str) -> Value {
    let path = format!("{}/tests/fixtures/pods/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut pod: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pod["metadata"]["namespace"] = json!(namespace);
    pod
}

fn driver(namespace: &str, refs: &[(&str, &str)]) -> Value {
    let mut pod = fixture("spark35-driver-submit.json", namespace);
    let annotations: serde_json::Map<String, Value> = refs
        .iter()
        .map(|(name, r)| (format!("env.secrets.iomete.com/{name}"), json!(r)))
        .collect();
    pod["metadata"]["annotations"] = Value::Object(annotations);
    pod
}

fn review(pod: &Value, user: &str, dry_run: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "4c1d0a9e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"], "operation": "CREATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": pod, "dryRun": dry_run
        }
    }))
    .unwrap()
}

/// Everything one admission returns, as texts to search: the response on the wire, the decoded
/// patch, the patched pod. Returns whether it was allowed and its message.
async fn admit(
    webhook: &Webhook,
    pod: &Value,
    user: &str,
    dry_run: bool,
    seen: &mut Vec<(String, String)>,
) -> (bool, String) {
    let raw = webhook
        .review_bytes(&review(pod, user, dry_run), None)
        .await;
    let text = String::from_utf8(raw).expect("the response is UTF-8");
    let out: Value = serde_json::from_str(&text).unwrap();
    let response = &out["response"];
    let label = format!(
        "response to {user}'s pod {}",
        pod["metadata"]["annotations"]
    );
    if let Some(b64) = response["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        seen.push((
            format!("patch of the {label}"),
            String::from_utf8(bytes).unwrap(),
        ));
        seen.push((format!("pod patched by the {label}"), patched.to_string()));
    }
    let message = response["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let allowed = response["allowed"] == json!(true);
    seen.push((label, text));
    (allowed, message)
}

fn managed_secret(api: &FakeApiServer, namespace: &str) -> Option<Value> {
    api.object(&Collection::secrets(), Some(namespace), MANAGED)
}

fn decoded(secret: &Value, key: &str) -> Option<String> {
    let b64 = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

/// Writes of a managed Secret: the one request that carries a Vault value, by design.
fn is_managed_write(r: &Logged) -> bool {
    let to_managed = r.path.contains("/secrets/") && r.path.ends_with(MANAGED);
    let creates_managed = r.path.ends_with("/secrets")
        && r.body
            .as_ref()
            .is_some_and(|b| b["metadata"]["name"] == MANAGED);
    r.method != "GET" && (to_managed || creates_managed)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_reach_no_log_response_metric_or_api_object_in_any_encoding() {
    support::leaks::check_the_search();
    let _ = support::logs::captured_logs();
    let Some(bin) =
        require_bao("secret_values_reach_no_log_response_metric_or_api_object_in_any_encoding")
    else {
        return;
    };
    let canaries = [
        STORE_CANARY,
        VAULT_CANARY,
        VAULT_CANARY_ADDED,
        STALE_CANARY,
        ROOT_TOKEN,
    ];
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": VAULT_CANARY, "api_key": VAULT_CANARY_ADDED, "user": "app"}),
    )
    .await;
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", STORE_CANARY)],
    ));
    api.put(secret(NS, "vault-token", &[("token", ROOT_TOKEN)]));
    // A managed Secret that already exists in another namespace, holding a stale value.
    let mut stale = secret(TEAM, MANAGED, &[("db_password", STALE_CANARY)]);
    stale["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "secrets-webhook",
                                         "secrets.iomete.com/vault-config": "vault-prod-finance"});
    api.put(stale);
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]}]}
    }));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
        "metadata": {"name": "vault-prod-finance", "namespace": NS},
        "spec": {"resourceBundle": "finance-bundle", "host": bao.addr, "path": "/v1/secret/data/production",
                 "auth": {"token": {"secretRef": {"name": "vault-token", "key": "token"}}}}
    }));
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        ..Settings::default()
    };
    let webhook = Webhook::from_cluster(
        settings,
        api.client(),
        Arc::new(Metrics::new()),
        TrustedControllers::default(),
        Keys::fixed(KeyRing::new(b"leaks-tests-signing-key-0123456789abcdef", None).unwrap()),
    )
    .await
    .unwrap();
    eventually("ready", || webhook.ready()).await;
    let mut seen: Vec<(String, String)> = Vec::new();

    // Denied by the guard after the Vault read: nothing is written for it.
    let mut sneaky = driver(NS, &[("VDB", "vault:vault-prod-finance/db_password")]);
    sneaky["spec"]["containers"][0]["env"].as_array_mut().unwrap().push(json!({"name": "STOLEN",
        "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-finance", "key": "db_password"}}}));
    let (allowed, message) = admit(&webhook, &sneaky, "alice", false, &mut seen).await;
    assert!(
        !allowed && message.contains("iomete-secret-store-finance"),
        "{message}"
    );
    assert!(
        managed_secret(&api, NS).is_none(),
        "a denied pod's Vault value was written"
    );

    // A dry run first: answered in full, nothing written.
    let good = driver(
        NS,
        &[
            ("DB", "kubernetes:finance/db_password"),
            ("VDB", "vault:vault-prod-finance/db_password"),
        ],
    );
    let (allowed, message) = admit(&webhook, &good, "alice", true, &mut seen).await;
    assert!(allowed, "{message}");
    assert!(
        managed_secret(&api, NS).is_none(),
        "a dry run wrote the managed Secret"
    );

    // Create path: the managed Secret is created with the value.
    let (allowed, message) = admit(&webhook, &good, "alice", false, &mut seen).await;
    assert!(allowed, "{message}");
    let created = managed_secret(&api, NS).expect("the managed Secret was created");
    assert_eq!(
        decoded(&created, "db_password").as_deref(),
        Some(VAULT_CANARY)
    );

    // Update path, a key added: the existing Secret is replaced (signed content, conditional PUT).
    let patches_before = api.count("PUT", &format!("/api/v1/namespaces/{NS}/secrets/{MANAGED}"));
    let added = driver(NS, &[("VAPI", "vault:vault-prod-finance/api_key")]);
    let (allowed, message) = admit(&webhook, &added, "alice", false, &mut seen).await;
    assert!(allowed, "{message}");
    assert_eq!(
        api.count("PUT", &format!("/api/v1/namespaces/{NS}/secrets/{MANAGED}")),
        patches_before + 1,
        "the update path was not taken"
    );
    let updated = managed_secret(&api, NS).unwrap();
    assert_eq!(
        decoded(&updated, "api_key").as_deref(),
        Some(VAULT_CANARY_ADDED)
    );

    // Update path, a stale value replaced, in another namespace (Vault references work anywhere).
    let team = driver(TEAM, &[("VDB", "vault:vault-prod-finance/db_password")]);
    let (allowed, message) = admit(&webhook, &team, "alice", false, &mut seen).await;
    assert!(allowed, "{message}");
    assert_eq!(
        api.count(
            "PUT",
            &format!("/api/v1/namespaces/{TEAM}/secrets/{MANAGED}")
        ),
        1,
        "the stale value was not replaced through the update path"
    );
    let replaced = managed_secret(&api, TEAM).unwrap();
    assert_eq!(
        decoded(&replaced, "db_password").as_deref(),
        Some(VAULT_CANARY)
    );

    // Denials: no grant, a missing field (named with the fields that exist), a missing key.
    for (pod, user) in [
        (good.clone(), "bob"),
        (
            driver(NS, &[("X", "vault:vault-prod-finance/nope")]),
            "alice",
        ),
        (driver(NS, &[("X", "kubernetes:finance/nope")]), "alice"),
    ] {
        let (allowed, message) = admit(&webhook, &pod, user, false, &mut seen).await;
        assert!(!allowed, "{message}");
    }
    // A sealed Vault (a secret not read yet: values read before are served from the cache).
    bao.api("PUT", "sys/seal", None).await;
    let sealed = driver(NS, &[("Y", "vault:vault-prod-finance/elsewhere#user")]);
    let (allowed, message) = admit(&webhook, &sealed, "alice", false, &mut seen).await;
    assert!(!allowed && message.contains("sealed"), "{message}");
    // Unreadable input.
    let invalid = webhook.review_bytes(b"{\"apiVersion\": 7}", None).await;
    seen.push((
        "an invalid review's answer".into(),
        String::from_utf8(invalid).unwrap(),
    ));

    // The search finds the values where they legitimately are, in the encoding the API uses.
    let managed = [created, updated, replaced].map(|s| s.to_string());
    assert_eq!(leaks::find(&managed[0], VAULT_CANARY), Some("base64"));
    assert_eq!(leaks::find(&managed[1], VAULT_CANARY_ADDED), Some("base64"));
    assert_eq!(leaks::find(&managed[2], VAULT_CANARY), Some("base64"));
    let writes: Vec<Logged> = api
        .requests()
        .into_iter()
        .filter(is_managed_write)
        .collect();
    assert!(
        writes.iter().any(|w| w.method == "PUT"
            && leaks::find(&w.body.as_ref().unwrap().to_string(), VAULT_CANARY_ADDED).is_some()),
        "the update path carried the added value"
    );

    seen.push(("metrics".into(), webhook.metrics.encode()));
    // What the API server holds, other than Secrets (which hold values by design).
    for object in api.all_objects() {
        if object["kind"] != "Secret" {
            let name = format!(
                "API object {} {}/{}",
                object["kind"], object["metadata"]["namespace"], object["metadata"]["name"]
            );
            seen.push((name, object.to_string()));
        }
    }
    // What the webhook sent the API server, other than the managed Secret writes.
    for r in api.requests().into_iter().filter(|r| !is_managed_write(r)) {
        let body = r.body.map(|b| b.to_string()).unwrap_or_default();
        seen.push((
            format!("request {} {}", r.method, r.path),
            format!("{}?{} {body}", r.path, r.query),
        ));
    }
    // The VaultConfig's Ready condition went through too (its message is readable by anyone who
    // may read VaultConfigs).
    let config = api
        .object(
            &Collection::new("secrets.iomete.com/v1alpha1", "vaultconfigs"),
            Some(NS),
            "vault-prod-finance",
        )
        .unwrap();
    assert!(config["status"]["conditions"].is_array(), "{config}");

    // Every log line: one strict JSON object, and no value in it.
    let logs = support::logs::captured_text();
    let lines = support::logs::parse_lines(&logs);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "admission" && l["decision"] == "patched"),
        "the admission lines were captured"
    );
    for (i, line) in logs.lines().enumerate() {
        seen.push((format!("log line {i}"), line.to_owned()));
    }
    leaks::assert_no_leak(&seen, &canaries);
}
