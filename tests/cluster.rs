//! The engine as `serve` builds it in a cluster (`Webhook::from_cluster`): store watch, ResourceBundle
//! and VaultConfig watches and the executor owner lookup, all through the real `kube::Client`
//! against the fake API server. Removals (a key, a store, a grant, a bundle, a VaultConfig) are
//! seen and denied; a dry run writes nothing.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrets_webhook::admission::Webhook;
use secrets_webhook::config::{Naming, Settings};
use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};
use support::fake_apiserver::{Collection, FakeApiServer, Fault, secret};
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
    // Every executor may have joined the one GET (all misses, no hit series at all).
    let owners = metrics::value_or_zero(&text, &metrics::cache_series("owner-pods", "hit"))
        + metrics::cache(&text, "owner-pods", "miss");
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

/// Admits `body` until it is denied with a message containing `expect`, within `limit`; every
/// answer before that must be an admission (not some other denial). Returns how long it took.
async fn denied_within(webhook: &Webhook, body: &[u8], expect: &str, limit: Duration) -> Duration {
    denied_within_any(webhook, body, &[expect], limit).await
}

/// [`denied_within`] with several acceptable denials.
async fn denied_within_any(
    webhook: &Webhook,
    body: &[u8],
    expect: &[&str],
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let (allowed, message, _) = admit(webhook, body).await;
        if !allowed {
            assert!(
                expect.iter().any(|e| message.contains(e)),
                "denied for another reason: {message}"
            );
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "still admitted {limit:?} after the removal (expected a denial containing {expect:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bundle(users: &[&str]) -> Value {
    let subjects: Vec<Value> = users
        .iter()
        .map(|u| json!({"kind": "User", "name": u}))
        .collect();
    json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": NS},
        "spec": {"domains": ["finance"], "grants": [{"subjects": subjects, "permissions": ["use"]}]}
    })
}

/// A key deleted from a store and a store deleted: the store watch sees each within moments, and
/// the next pod that needs them is denied with the key or store named. The other keys stay usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_or_store_is_denied_once_the_watch_sees_it() {
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "x"), ("s3_secret_key", "y")],
    ));
    api.put(bundle(&["alice"]));
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;
    assert!(api.wait_for_watches(3, Duration::from_secs(5)).await);
    let s3 = review(
        &with_refs(
            fixture("spark35-driver-submit.json"),
            &[("S3", "kubernetes:finance/s3_secret_key")],
        ),
        "alice",
        json!({}),
    );
    let db = review(
        &with_refs(
            fixture("spark35-driver-submit.json"),
            &[("DB", "kubernetes:finance/db_password")],
        ),
        "alice",
        json!({}),
    );
    let (allowed, message, _) = admit(&webhook, &s3).await;
    assert!(allowed, "{message}");

    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "x")],
    ));
    let took = denied_within(
        &webhook,
        &s3,
        "domain \"finance\" has no key \"s3_secret_key\" (Secret iomete-secret-store-finance in \
         namespace iomete-system); create the secret or fix the key",
        Duration::from_secs(5),
    )
    .await;
    eprintln!("removed key denied after {took:?}");
    let (allowed, message, _) = admit(&webhook, &db).await;
    assert!(allowed, "the key that stayed: {message}");

    api.remove(
        &Collection::secrets(),
        Some(NS),
        "iomete-secret-store-finance",
    );
    let took = denied_within(
        &webhook,
        &db,
        "domain \"finance\" has no secret store (Secret iomete-secret-store-finance in namespace \
         iomete-system)",
        Duration::from_secs(5),
    )
    .await;
    eprintln!("removed store denied after {took:?}");
}

/// A grant taken out of a ResourceBundle, and a bundle deleted: the bundle watch sees each, and
/// once the cached decision expires (10 s, docs/authorization.md) the user is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_grant_or_bundle_is_denied_within_the_decision_cache_time() {
    const LIMIT: Duration = Duration::from_secs(12);
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "x")],
    ));
    api.put(bundle(&["alice", "dave"]));
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;
    let pod = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("DB", "kubernetes:finance/db_password")],
    );
    let (alice, dave) = (
        review(&pod, "alice", json!({})),
        review(&pod, "dave", json!({})),
    );
    for body in [&alice, &dave] {
        let (allowed, message, _) = admit(&webhook, body).await;
        assert!(allowed, "{message}");
    }

    api.put(bundle(&["dave"]));
    let took = denied_within(
        &webhook,
        &alice,
        "user \"alice\" lacks Use on domain \"finance\"; a platform admin can grant Use",
        LIMIT,
    )
    .await;
    eprintln!("removed grant denied after {took:?}");
    let (allowed, message, _) = admit(&webhook, &dave).await;
    assert!(allowed, "the grant that stayed: {message}");

    api.remove(
        &Collection::new("secrets.iomete.com/v1alpha1", "resourcebundles"),
        Some(NS),
        "finance-bundle",
    );
    let took = denied_within(
        &webhook,
        &dave,
        // The same denial as for a grant taken out: denials do not tell what exists.
        "user \"dave\" lacks Use on domain \"finance\"; a platform admin can grant Use",
        LIMIT,
    )
    .await;
    eprintln!("removed bundle denied after {took:?}");
}

/// OpenBao with one secret, and the objects a cluster holds for it: token Secret, bundle,
/// VaultConfig.
async fn vault_cluster(test: &str) -> Option<(support::openbao::OpenBao, FakeApiServer)> {
    let bin = support::openbao::require_bao(test)?;
    let bao = support::openbao::OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": "v", "user": "app"}),
    )
    .await;
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "vault-token",
        &[("token", support::openbao::ROOT_TOKEN)],
    ));
    api.put(bundle(&["alice"]));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
        "metadata": {"name": "vault-prod-finance", "namespace": NS},
        "spec": {"resourceBundle": "finance-bundle", "host": bao.addr, "path": "/v1/secret/data/production",
                 "auth": {"token": {"secretRef": {"name": "vault-token", "key": "token"}}}}
    }));
    Some((bao, api))
}

/// A VaultConfig deleted: its watch drops it (and its cached values with it), and the next pod
/// naming it is denied with the config named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_vault_config_is_denied_once_the_watch_sees_it() {
    let Some((_bao, api)) =
        vault_cluster("a_removed_vault_config_is_denied_once_the_watch_sees_it").await
    else {
        return;
    };
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;
    let body = review(
        &with_refs(
            fixture("spark35-driver-submit.json"),
            &[("V", "vault:vault-prod-finance/db_password")],
        ),
        "alice",
        json!({}),
    );
    let (allowed, message, _) = admit(&webhook, &body).await;
    assert!(allowed, "{message}");
    api.remove(
        &Collection::new("secrets.iomete.com/v1alpha1", "vaultconfigs"),
        Some(NS),
        "vault-prod-finance",
    );
    // Seen by the grant check (no config, no bundle: the same denial as without Use, so that
    // denials do not tell what exists), or, removed between the two, by the Vault backend itself.
    let took = denied_within_any(
        &webhook,
        &body,
        &[
            "annotation env.secrets.iomete.com/V: vault:vault-prod-finance/db_password: user \"alice\" \
             lacks Use on vault config \"vault-prod-finance\"; a platform admin can grant Use to the \
             user or one of its groups in the resource bundle of that Vault config",
            "annotation env.secrets.iomete.com/V: vault:vault-prod-finance/db_password: no Vault config \
             named vault-prod-finance; use the name of an existing VaultConfig",
        ],
        Duration::from_secs(5),
    )
    .await;
    eprintln!("removed VaultConfig denied after {took:?}");
}

/// A dry run through the engine, as the first admission of a fresh webhook (no earlier identical
/// write the Secret writer could remember): allowed with the full patch, and nothing written to
/// the API server. The same pod for real then creates the managed Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_writes_nothing_even_as_the_first_admission() {
    let Some((_bao, api)) =
        vault_cluster("a_dry_run_writes_nothing_even_as_the_first_admission").await
    else {
        return;
    };
    let webhook = cluster_webhook(&api).await;
    eventually("ready", || webhook.ready()).await;
    let pod = with_refs(
        fixture("spark35-driver-submit.json"),
        &[("V", "vault:vault-prod-finance/db_password")],
    );
    let mut dry: Value = serde_json::from_slice(&review(&pod, "alice", json!({}))).unwrap();
    dry["request"]["dryRun"] = json!(true);
    let secrets_path = format!("/api/v1/namespaces/{NS}/secrets");
    let writes = |api: &FakeApiServer| {
        api.requests()
            .into_iter()
            .filter(|r| r.method != "GET" && r.path.starts_with(&secrets_path))
            .count()
    };
    let (allowed, message, dry_patch) = admit(&webhook, &serde_json::to_vec(&dry).unwrap()).await;
    assert!(allowed, "{message}");
    let dry_patch = dry_patch.expect("a dry run answers with the patch");
    let managed = "iomete-vault-vault-prod-finance";
    assert!(
        api.object(&Collection::secrets(), Some(NS), managed)
            .is_none()
    );
    assert_eq!(writes(&api), 0, "a dry run wrote to the API server");

    let (allowed, message, patch) = admit(&webhook, &review(&pod, "alice", json!({}))).await;
    assert!(allowed, "{message}");
    assert_eq!(
        patch,
        Some(dry_patch),
        "the dry run's patch is the real one"
    );
    assert!(
        api.object(&Collection::secrets(), Some(NS), managed)
            .is_some()
    );
    assert_eq!(writes(&api), 1);
}
