//! The engine as `serve` builds it in a cluster (`Webhook::from_cluster`): store watch, ResourceBundle
//! and VaultConfig watches and the executor owner lookup, all through the real `kube::Client`
//! against the fake API server.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrets_webhook::admission::Webhook;
use secrets_webhook::config::{Naming, Settings};
use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};
use support::fake_apiserver::{FakeApiServer, Fault, secret};
use support::logs::captured_logs;
use support::metrics;

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
        Keys::fixed(KeyRing::new(b"cluster-tests-signing-key-0123456789abcd", None).unwrap()),
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
    let extra = json!({"authentication.kubernetes.io/pod-name": ["spark-pi-143984a22158e5b5-driver"],
                       "authentication.kubernetes.io/pod-uid": [stored["metadata"]["uid"].clone()]});
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
    // Counted: the one GET, 50 owner lookups (hits, or misses that started or joined it), and
    // the RAS decisions for alice and bob.
    let text = webhook.metrics.encode();
    assert_eq!(
        metrics::backend(&text, "kubernetes", "found"),
        1.0,
        "{text}"
    );
    let owners =
        metrics::cache(&text, "owner-pods", "hit") + metrics::cache(&text, "owner-pods", "miss");
    assert_eq!(owners, 50.0, "{text}");
    assert!(metrics::backend(&text, "ras", "allow") >= 1.0, "{text}");
    assert_eq!(metrics::backend(&text, "ras", "deny"), 1.0, "{text}");
    assert!(
        metrics::cache(&text, "authz-decisions", "hit") >= 1.0,
        "{text}"
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

    // No VaultConfig objects: nobody holds Use on a config that does not exist, and the denial
    // does not say whether it exists.
    let vault = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("V", "vault:vault-prod/k")],
    );
    let (allowed, message, _) = admit(&webhook, &review(&vault, "alice", json!({}))).await;
    assert!(
        !allowed && message.contains("user \"alice\" lacks Use on vault config \"vault-prod\";"),
        "{message}"
    );
}

/// Canary values seeded in a Kubernetes store and in OpenBao appear nowhere but in the
/// materialized Secret: not in a log line (TRACE, all crates), a response, a patch, a warning, an
/// error text or a metric — over successes, denials, dry runs and a sealed Vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_reach_no_log_response_or_metric() {
    const STORE_CANARY: &str = "canary-store-5d1e9a";
    const VAULT_CANARY: &str = "canary-vault-0b7c44";
    let logs = captured_logs();
    let Some(bin) = support::openbao::require_bao("secret_values_reach_no_log_response_or_metric")
    else {
        return;
    };
    let bao = support::openbao::OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": VAULT_CANARY, "user": "app"}),
    )
    .await;
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", STORE_CANARY)],
    ));
    api.put(secret(
        NS,
        "vault-token",
        &[("token", support::openbao::ROOT_TOKEN)],
    ));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]}]}
    }));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
        "metadata": {"name": "vault-prod-finance", "namespace": NS},
        "spec": {"resourceBundle": "finance-bundle", "host": bao.addr, "path": "/v1/secret/data/production",
                 "delivery": "materialize",
                 "auth": {"token": {"secretRef": {"name": "vault-token", "key": "token"}}}}
    }));
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;

    let mut seen = Vec::new();
    let managed_secret = |api: &FakeApiServer| {
        api.objects(&support::fake_apiserver::Collection::secrets())
            .into_iter()
            .find(|s| s["metadata"]["name"] == "iomete-vault-vault-prod-finance")
    };
    // Denied by the guard after the Vault read: nothing may be written for it.
    let mut sneaky = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("VDB", "vault:vault-prod-finance/db_password")],
    );
    sneaky["spec"]["containers"][0]["env"].as_array_mut().unwrap().push(json!({"name": "STOLEN",
        "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-finance", "key": "db_password"}}}));
    let (allowed, message, _) = admit(&webhook, &review(&sneaky, "alice", json!({}))).await;
    assert!(
        !allowed && message.contains("iomete-secret-store-finance"),
        "{message}"
    );
    assert!(
        managed_secret(&api).is_none(),
        "a denied pod's Vault value was written"
    );
    seen.push(message);

    let refs = [
        ("DB", "kubernetes:finance/db_password"),
        ("VDB", "vault:vault-prod-finance/db_password"),
    ];
    let good = with_refs(fixture("spark35-driver-submit.json"), &refs);
    let (allowed, message, patch) = admit(&webhook, &review(&good, "alice", json!({}))).await;
    assert!(allowed, "{message}");
    seen.push(format!("{message} {patch:?}"));
    let bodies = [
        review(&good, "bob", json!({})),
        review(
            &with_refs(
                fixture("spark35-driver-submit.json"),
                &[("X", "vault:vault-prod-finance/nope")],
            ),
            "alice",
            json!({}),
        ),
        review(
            &with_refs(
                fixture("spark35-driver-submit.json"),
                &[("X", "kubernetes:finance/nope")],
            ),
            "alice",
            json!({}),
        ),
    ];
    for body in &bodies {
        seen.push(String::from_utf8(webhook.review_bytes(body, None).await).unwrap());
    }
    let mut dry: Value = serde_json::from_slice(&review(&good, "alice", json!({}))).unwrap();
    dry["request"]["dryRun"] = json!(true);
    seen.push(
        String::from_utf8(
            webhook
                .review_bytes(&serde_json::to_vec(&dry).unwrap(), None)
                .await,
        )
        .unwrap(),
    );
    bao.api("PUT", "sys/seal", None).await;
    let sealed = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("Y", "vault:vault-prod-finance/user")],
    );
    seen.push(
        String::from_utf8(
            webhook
                .review_bytes(&review(&sealed, "alice", json!({})), None)
                .await,
        )
        .unwrap(),
    );
    seen.push(webhook.metrics.encode());

    // The one place a Vault value may be: the managed Secret in the pod's namespace.
    let managed = managed_secret(&api).expect("the managed Secret was written");
    let stored = base64::engine::general_purpose::STANDARD
        .decode(managed["data"]["db_password"].as_str().unwrap())
        .unwrap();
    assert_eq!(stored, VAULT_CANARY.as_bytes());

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(logs.contains("admission"), "the logs were captured");
    seen.push(logs);
    for text in &seen {
        for canary in [STORE_CANARY, VAULT_CANARY] {
            let b64 = base64::engine::general_purpose::STANDARD.encode(canary);
            assert!(
                !text.contains(canary) && !text.contains(&b64),
                "{canary} leaked into: {}",
                &text[..text.len().min(2000)]
            );
        }
    }
}

/// Faults on the API server while executors arrive: a hanging or failing driver lookup is a clear
/// denial within the admission budget, never a hang; the next admission after the fault clears works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_faults_deny_within_the_budget_and_recover() {
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "x")],
    ));
    api.put(secret(
        NS,
        "iomete-secret-store",
        &[("warehouse_path", "y")],
    ));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]}]}
    }));
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;
    let refs = [("DB", "kubernetes:finance/db_password")];
    let driver = with_refs(fixture("spark35-driver-submit.json"), &refs);
    let (allowed, message, patch) = admit(&webhook, &review(&driver, "alice", json!({}))).await;
    assert!(allowed, "{message}");
    let mut admitted = driver.clone();
    json_patch::patch(&mut admitted, &patch.unwrap()).unwrap();
    let stored = api.put(admitted);
    let mut executor = with_refs(fixture("spark35-executor-submit.json"), &refs);
    executor["metadata"]["ownerReferences"][0]["uid"] = stored["metadata"]["uid"].clone();
    let extra = json!({"authentication.kubernetes.io/pod-name": ["spark-pi-143984a22158e5b5-driver"],
                       "authentication.kubernetes.io/pod-uid": [stored["metadata"]["uid"].clone()]});
    let body = review(
        &executor,
        "system:serviceaccount:iomete-system:spark",
        extra,
    );
    let driver_path = format!("/api/v1/namespaces/{NS}/pods/spark-pi-143984a22158e5b5-driver");
    let timeout = Duration::from_secs(2); // the API server's ?timeout=; the budget is 80 % of it

    for (fault, expect) in [
        (
            Fault::hang("GET", &driver_path),
            "before the admission deadline",
        ),
        (Fault::status("GET", &driver_path, 500), "owner pod"),
    ] {
        // A fresh engine each time: found driver pods are cached for a few seconds.
        let webhook = cluster_webhook(&api).await;
        eventually("ready", || webhook.ready()).await;
        api.inject(fault);
        let started = Instant::now();
        let out: Value =
            serde_json::from_slice(&webhook.review_bytes(&body, Some(timeout)).await).unwrap();
        let took = started.elapsed();
        let message = out["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(out["response"]["allowed"], false, "{message}");
        assert!(message.contains(expect), "{message}");
        assert!(
            took < timeout,
            "answered after {took:?}, past the API server's timeout"
        );
        api.clear_faults();
        // Recovery: failures are not cached. A GET already hanging is shared by later callers
        // until its own 5 s bound, so recovery may take that long, never longer.
        let cleared = Instant::now();
        loop {
            let (allowed, message, _) = admit(&webhook, &body).await;
            if allowed {
                break;
            }
            assert!(
                cleared.elapsed() < Duration::from_secs(7),
                "no recovery: {message}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
