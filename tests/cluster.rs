//! The engine as `serve` builds it in a cluster (`Webhook::from_cluster`): store watch, ResourceBundle
//! and VaultConfig watches and the executor owner lookup, all through the real `kube::Client`
//! against the fake API server.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrets_webhook::admission::Webhook;
use secrets_webhook::admission::identity::TrustedControllers;
use secrets_webhook::config::{Naming, Settings};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};
use support::fake_apiserver::{FakeApiServer, Fault, secret};

const NS: &str = "iomete-system";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/pods/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut pod: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pod["metadata"]["namespace"] = json!(NS);
    pod
}

fn review(pod: &Value, user: &str, extra: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "c1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS, "operation": "CREATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"], "extra": extra},
            "object": pod, "dryRun": false
        }
    }))
    .unwrap()
}

/// (allowed, message, decoded patch)
async fn admit(webhook: &Webhook, body: &[u8]) -> (bool, String, Option<json_patch::Patch>) {
    let out: Value = serde_json::from_slice(&webhook.review_bytes(body, None).await).unwrap();
    let response = &out["response"];
    let patch = response["patch"].as_str().map(|b64| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    });
    let message = response["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (response["allowed"] == json!(true), message, patch)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster_webhook(api: &FakeApiServer) -> Webhook {
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        ..Settings::default()
    };
    Webhook::from_cluster(
        settings,
        api.client(),
        Arc::new(Metrics::new()),
        TrustedControllers::default(),
    )
    .await
    .unwrap()
}

fn with_refs(mut pod: Value, refs: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = refs
        .iter()
        .map(|(name, r)| (format!("env.secrets.iomete.com/{name}"), json!(r)))
        .collect();
    pod["metadata"]["annotations"] = Value::Object(annotations);
    pod
}

#[tokio::test]
async fn from_cluster_admits_with_watched_stores_bundles_and_owner_lookups() {
    let api = FakeApiServer::start().await;
    api.inject(Fault::status(
        "GET",
        &format!("/api/v1/namespaces/{NS}/secrets"),
        500,
    ));
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "canary-db-7Hq")],
    ));
    api.put(secret(
        NS,
        "iomete-secret-store",
        &[("warehouse_path", "canary-wh-7Hq")],
    ));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]}]}
    }));
    let webhook = cluster_webhook(&api).await;

    // Not ready while the stores cannot be listed; a pod needing them is told to retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!webhook.ready());
    let driver = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("DB_PASSWORD", "kubernetes:finance/db_password")],
    );
    let (allowed, message, _) = admit(&webhook, &review(&driver, "alice", json!({}))).await;
    assert!(!allowed && message.contains("retry"), "{message}");
    api.clear_faults();
    eventually("ready once listed", || webhook.ready()).await;

    // The granted user gets the reference; the key check comes from the watch cache.
    let (allowed, message, patch) = admit(&webhook, &review(&driver, "alice", json!({}))).await;
    assert!(allowed, "{message}");
    let mut admitted = driver.clone();
    json_patch::patch(&mut admitted, &patch.unwrap()).unwrap();
    assert!(
        !admitted.to_string().contains("canary"),
        "no value in the pod"
    );
    let (allowed, message, _) = admit(&webhook, &review(&driver, "bob", json!({}))).await;
    assert!(
        !allowed && message.contains("user \"bob\" lacks Use on domain \"finance\""),
        "{message}"
    );

    // A key added to the store is seen through the watch.
    let late = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("API", "kubernetes:finance/api_key")],
    );
    let (allowed, message, _) = admit(&webhook, &review(&late, "alice", json!({}))).await;
    assert!(
        !allowed && message.contains("has no key \"api_key\""),
        "{message}"
    );
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "x"), ("api_key", "y")],
    ));
    let mut seen = false;
    for _ in 0..200 {
        if admit(&webhook, &review(&late, "alice", json!({}))).await.0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "the new key never reached the watch cache");

    // An executor of the admitted driver: identity and grants from the driver, looked up once.
    let stored = api.put(admitted.clone());
    let executor_of = |refs: &[(&str, &str)]| {
        let mut pod = with_refs(fixture("spark35-executor-submit.json"), refs);
        pod["metadata"]["ownerReferences"][0]["uid"] = stored["metadata"]["uid"].clone();
        pod
    };
    let executor = executor_of(&[("DB_PASSWORD", "kubernetes:finance/db_password")]);
    let driver_sa = "system:serviceaccount:iomete-system:spark";
    let extra =
        json!({"authentication.kubernetes.io/pod-name": ["spark-pi-143984a22158e5b5-driver"]});
    let driver_path = format!("/api/v1/namespaces/{NS}/pods/spark-pi-143984a22158e5b5-driver");
    let before = api.count("GET", &driver_path);
    let body = review(&executor, driver_sa, extra.clone());
    let answers = futures::future::join_all((0..50).map(|_| admit(&webhook, &body))).await;
    for (allowed, message, patch) in answers {
        assert!(allowed && patch.is_some(), "{message}");
    }
    assert_eq!(
        api.count("GET", &driver_path) - before,
        1,
        "one driver lookup for a burst of executors"
    );
    let greedy = executor_of(&[
        ("WH", "kubernetes:global/warehouse_path"),
        ("API", "kubernetes:finance/api_key"),
    ]);
    let (allowed, message, _) = admit(&webhook, &review(&greedy, driver_sa, extra)).await;
    assert!(
        !allowed && message.contains("kubernetes:finance/api_key"),
        "{message}"
    );

    // No VaultConfig objects: a Vault reference names the missing config.
    let vault = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("V", "vault:vault-prod/k")],
    );
    let (allowed, message, _) = admit(&webhook, &review(&vault, "alice", json!({}))).await;
    assert!(
        !allowed && message.contains("there is no Vault config \"vault-prod\""),
        "{message}"
    );
}
