//! The management API in cluster shape, through the real `kube::Client` against the fake API
//! server (until the real control plane lands): TokenReview, writes to the real store Secrets with
//! their resourceVersion as ETag, concurrent edits, in-use deletion from live pods' granted stamps,
//! and VaultConfig objects whose credentials go into a dedicated Secret and never come back.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use secrets_webhook::admission::Webhook;
use secrets_webhook::authz::Identity;
use secrets_webhook::backends::vault::{VaultBackend, VaultOptions};
use secrets_webhook::config::{LocalConfig, Naming, Settings};
use secrets_webhook::identity::stamps::{Subject, stamp_annotations};
use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
use secrets_webhook::metrics::Metrics;
use secrets_webhook::refs::{SecretObject, Source, SourceType};
use serde_json::{Value, json};
use support::api::ApiServer;
use support::fake_apiserver::{Collection, FakeApiServer, Fault, pod, secret};
use support::logs::captured_logs;

const NS: &str = "iomete-system";
const FINANCE: &str = "/api/v1/domains/finance/secrets";

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bundle(name: &str, domains: &[&str], grants: Value) -> Value {
    json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
           "metadata": {"name": name, "namespace": NS}, "spec": {"domains": domains, "grants": grants}})
}

/// The API as `serve --api-listen` builds it in a cluster, over `fake`.
async fn cluster_api(fake: &FakeApiServer) -> ApiServer {
    fake.accept_token("sa-alice", "alice", &["data-eng"]);
    fake.accept_token("sa-bob", "bob", &[]);
    fake.accept_token("sa-admin", "root", &["platform-admins"]);
    fake.put(bundle(
        "finance-bundle",
        &["finance"],
        json!([
        {"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["view", "update", "use"]},
        {"subjects": [{"kind": "User", "name": "bob"}], "permissions": ["view"]}]),
    ));
    fake.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "canary-db-Zq9")],
    ));
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        ..Settings::default()
    };
    let client = fake.client();
    let metrics = Arc::new(Metrics::new());
    let vault = VaultBackend::in_cluster(
        client.clone(),
        settings.naming.clone(),
        keys(),
        VaultOptions::default(),
    );
    let webhook = Webhook::from_cluster_parts(
        settings,
        client.clone(),
        metrics,
        TrustedControllers::default(),
        keys(),
        Arc::clone(&vault),
    )
    .unwrap();
    eventually("ready", || webhook.ready()).await;
    let config = LocalConfig::parse("apiAdmins: [{kind: Group, name: platform-admins}]").unwrap();
    let api = secrets_webhook::api::cluster(&webhook, vault, client, &config, vec![]).unwrap();
    ApiServer::serve(webhook, api).await
}

fn store(fake: &FakeApiServer) -> Value {
    fake.object(
        &Collection::secrets(),
        Some(NS),
        "iomete-secret-store-finance",
    )
    .unwrap()
}

#[tokio::test]
async fn tokens_are_reviewed_by_the_api_server_and_failures_fail_closed() {
    let fake = FakeApiServer::start().await;
    let api = cluster_api(&fake).await;
    let ok = api.get(FINANCE, "sa-alice").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(
        ok.json(),
        json!([{"key": "db_password", "source": {"type": "KUBERNETES", "id": "finance"}}])
    );
    assert_eq!(
        api.get(FINANCE, "sa-nobody").await.status,
        StatusCode::UNAUTHORIZED
    );
    // The review was a real TokenReview POST.
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/apis/authentication.k8s.io/v1/tokenreviews")
    );
    // The API server failing: 503, never a guess; and no cached failure afterwards.
    fake.inject(Fault::status("POST", "/apis/authentication.k8s.io", 500));
    let down = api.get(FINANCE, "sa-new-token").await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        down.text
    );
    assert!(
        down.json()["detail"]
            .as_str()
            .unwrap()
            .contains("failing closed")
    );
    fake.clear_faults();
    fake.accept_token("sa-new-token", "alice", &[]);
    assert_eq!(
        api.get(FINANCE, "sa-new-token").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn writes_go_to_the_store_secret_with_its_resource_version_as_etag() {
    let _ = captured_logs();
    let fake = FakeApiServer::start().await;
    let api = cluster_api(&fake).await;
    let listed = api.get(FINANCE, "sa-alice").await;
    let rv = store(&fake)["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(listed.etag(), format!("\"{rv}\""));
    let canary = "cAnArY-cluster-8x/+=";
    let created = api
        .put(
            &format!("{FINANCE}/api_key"),
            "sa-alice",
            &[("if-none-match", "*")],
            json!({"value": canary}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let s = store(&fake);
    use base64::Engine as _;
    assert_eq!(
        s["data"]["api_key"],
        json!(base64::engine::general_purpose::STANDARD.encode(canary))
    );
    assert_eq!(
        s["data"]["db_password"],
        json!(base64::engine::general_purpose::STANDARD.encode("canary-db-Zq9"))
    );
    assert_eq!(
        created.etag(),
        format!("\"{}\"", s["metadata"]["resourceVersion"].as_str().unwrap())
    );
    // bob (View) cannot write: nothing reaches the Secret.
    let before = fake.resource_version();
    assert_eq!(
        api.put(
            &format!("{FINANCE}/x"),
            "sa-bob",
            &[("if-none-match", "*")],
            json!({"value": "v"})
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(fake.resource_version(), before);
    // Two edits from one read race: the API server's optimistic concurrency lets one through.
    let etag = created.etag();
    let precondition = [("if-match", etag.as_str())];
    let path = format!("{FINANCE}/api_key");
    let (a, b) = tokio::join!(
        api.put(&path, "sa-alice", &precondition, json!({"value": "one"})),
        api.put(&path, "sa-alice", &precondition, json!({"value": "two"})),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
        "{} / {}",
        a.text,
        b.text
    );
    let winner = if a.status == StatusCode::OK {
        "one"
    } else {
        "two"
    };
    assert_eq!(
        store(&fake)["data"]["api_key"],
        json!(base64::engine::general_purpose::STANDARD.encode(winner))
    );
    // Concurrent creates of different keys all land (the store is re-read on conflict).
    let api = Arc::new(api);
    let creates = (0..8).map(|i| {
        let api = api.clone();
        tokio::spawn(async move {
            api.put(
                &format!("{FINANCE}/c{i}"),
                "sa-alice",
                &[("if-none-match", "*")],
                json!({"value": "v"}),
            )
            .await
            .status
        })
    });
    for status in futures::future::join_all(creates).await {
        assert_eq!(status.unwrap(), StatusCode::CREATED);
    }
    let keys: Vec<String> = store(&fake)["data"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for i in 0..8 {
        assert!(keys.contains(&format!("c{i}")), "c{i} lost: {keys:?}");
    }
    // A new domain's store is created on its first key (labelled as written by the webhook).
    fake.put(bundle(
        "hr-bundle",
        &["hr"],
        json!([{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["update"]}]),
    ));
    // The bundle reaches the watch, then the decision cache (10 s) is not in the way: first ask.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hr = api
        .put(
            "/api/v1/domains/hr/secrets/k",
            "sa-alice",
            &[("if-none-match", "*")],
            json!({"value": "v"}),
        )
        .await;
    assert_eq!(hr.status, StatusCode::CREATED, "{}", hr.text);
    let hr_store = fake
        .object(&Collection::secrets(), Some(NS), "iomete-secret-store-hr")
        .unwrap();
    assert_eq!(
        hr_store["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        json!("secrets-webhook")
    );
    let log = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    support::leaks::assert_no_leak(&[("the log", &log)], &[canary]);
}

/// The webhook's signing keys (every replica and the API read the same Secret).
fn keys() -> Arc<Keys> {
    static KEYS: std::sync::OnceLock<Arc<Keys>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        Keys::fixed(KeyRing::new(b"api-cluster-tests-signing-key-0123456789ab", None).unwrap())
    })
    .clone()
}

/// A pod as the webhook admitted it: stamps signed with the webhook's key.
fn stamped(name: &str, granted: &[&str], phase: &str) -> Value {
    let mut p = pod(NS, name);
    let secrets: Vec<SecretObject> = granted
        .iter()
        .map(|r| {
            let (kind, rest) = r.split_once(':').unwrap();
            let (id, key) = rest.split_once('/').unwrap();
            SecretObject {
                key: key.into(),
                source: Source {
                    kind: if kind == "vault" {
                        SourceType::Vault
                    } else {
                        SourceType::Kubernetes
                    },
                    id: id.into(),
                },
            }
        })
        .collect();
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(p.clone()).unwrap();
    let ring = keys().get().unwrap();
    let stamps = stamp_annotations(
        &Identity::new("alice", Vec::new()),
        &secrets,
        &Subject::of_new_pod(&typed, NS),
        &ring,
    );
    p["metadata"]["annotations"] = json!(stamps);
    p["status"] = json!({"phase": phase});
    p
}

#[tokio::test]
async fn deleting_a_key_in_use_answers_409_with_the_pod_count_unless_forced() {
    let fake = FakeApiServer::start().await;
    let api = cluster_api(&fake).await;
    fake.put(stamped(
        "driver-1",
        &["kubernetes:finance/db_password", "kubernetes:global/x"],
        "Running",
    ));
    fake.put(stamped(
        "exec-1",
        &["kubernetes:finance/db_password"],
        "Pending",
    ));
    fake.put(stamped(
        "done-1",
        &["kubernetes:finance/db_password"],
        "Succeeded",
    ));
    fake.put(stamped(
        "other",
        &["kubernetes:finance/other_key"],
        "Running",
    ));
    // Stamps added by hand (an UPDATE the webhook did not see, a forged signature) count for
    // nothing: they can neither block a deletion nor hide a use.
    let mut forged = stamped("forged", &["kubernetes:finance/other_key"], "Running");
    forged["metadata"]["annotations"]["secrets.iomete.com/granted"] =
        json!(r#"["kubernetes:finance/db_password"]"#);
    fake.put(forged);
    let key = format!("{FINANCE}/db_password");
    let refused = api.delete(&key, "sa-alice", &[]).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.text);
    let p = refused.json();
    assert_eq!(p["pods"], json!(2));
    assert_eq!(p["field"], json!("force"));
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("2 live pods were granted it"),
        "{p}"
    );
    assert!(store(&fake)["data"].get("db_password").is_some());
    // The listing asked the API server for live pods only.
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.path == format!("/api/v1/namespaces/{NS}/pods")
                && r.query.contains("status.phase"))
    );
    // Pods that cannot be counted: 503, nothing deleted (unless forced).
    fake.inject(Fault::status(
        "GET",
        &format!("/api/v1/namespaces/{NS}/pods"),
        500,
    ));
    assert_eq!(
        api.delete(&key, "sa-alice", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    fake.clear_faults();
    let forced = api
        .call(
            Method::DELETE,
            &format!("{key}?force=true"),
            Some("sa-alice"),
            &[],
            None,
        )
        .await;
    assert_eq!(forced.status, StatusCode::NO_CONTENT, "{}", forced.text);
    assert!(store(&fake)["data"].get("db_password").is_none());
}

#[tokio::test]
async fn vault_config_credentials_go_into_their_own_secret_and_never_come_back() {
    let fake = FakeApiServer::start().await;
    let api = cluster_api(&fake).await;
    let configs = Collection::new("secrets.iomete.com/v1alpha1", "vaultconfigs");
    let body = json!({"resourceBundle": "finance-bundle", "host": "http://127.0.0.1:9", "path": "/v1/secret/data/prod",
                      "auth": {"method": "appRole", "roleId": "role-1", "secretId": "canary-sid-Q7"}});
    let created = api
        .put(
            "/api/v1/vault-configs/vp",
            "sa-admin",
            &[("if-none-match", "*")],
            body.clone(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert!(!created.text.contains("canary-sid-Q7"));
    let object = fake.object(&configs, Some(NS), "vp").unwrap();
    assert!(!object.to_string().contains("canary-sid-Q7"));
    // A new config that names no delivery is written as runtime, explicitly (a stored config
    // without the field means materialize).
    assert_eq!(object["spec"]["delivery"], json!("runtime"));
    let secret_name = object["spec"]["auth"]["appRole"]["secretIdRef"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        secret_name.starts_with("iomete-vault-credentials.vp."),
        "{secret_name}"
    );
    let cred = fake
        .object(&Collection::secrets(), Some(NS), &secret_name)
        .unwrap();
    assert_eq!(cred["immutable"], json!(true));
    assert_eq!(
        cred["metadata"]["ownerReferences"][0]["kind"],
        json!("VaultConfig")
    );
    assert_eq!(
        created.etag(),
        format!(
            "\"{}\"",
            object["metadata"]["resourceVersion"].as_str().unwrap()
        )
    );
    // Read back: everything but the credential. The config watcher records the Ready condition
    // on its own schedule, and a status write changes the representation and so the ETag: read
    // once the condition is there, as an admin who saw it would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let got = loop {
        let got = api.get("/api/v1/vault-configs/vp", "sa-alice").await;
        assert_eq!(got.status, StatusCode::OK);
        if !got.json()["status"].is_null() || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        !got.json()["status"].is_null(),
        "the watcher records the config's Ready condition: {}",
        got.text
    );
    assert_eq!(
        got.json()["auth"],
        json!({"method": "appRole", "roleId": "role-1"})
    );
    // A new credential: a new Secret, the old one deleted.
    let mut rotated = body.clone();
    rotated["auth"]["secretId"] = json!("canary-sid-R8");
    let updated = api
        .put(
            "/api/v1/vault-configs/vp",
            "sa-admin",
            &[("if-match", &got.etag())],
            rotated,
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    let object = fake.object(&configs, Some(NS), "vp").unwrap();
    let new_name = object["spec"]["auth"]["appRole"]["secretIdRef"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_name, secret_name);
    assert!(
        fake.object(&Collection::secrets(), Some(NS), &secret_name)
            .is_none()
    );
    // A stale If-Match changes nothing.
    let stale = api
        .put(
            "/api/v1/vault-configs/vp",
            "sa-admin",
            &[("if-match", &got.etag())],
            body.clone(),
        )
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text
    );
    // Delete: the config and its credentials Secret.
    assert_eq!(
        api.delete("/api/v1/vault-configs/vp", "sa-admin", &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(fake.object(&configs, Some(NS), "vp").is_none());
    assert!(
        fake.object(&Collection::secrets(), Some(NS), &new_name)
            .is_none()
    );
}

#[tokio::test]
async fn with_subject_access_review_view_is_verb_get_and_update_is_verb_update() {
    use support::fake_apiserver::SarAnswer;
    let fake = FakeApiServer::start().await;
    fake.accept_token("sa-bob", "bob", &["viewers"]);
    fake.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "v")],
    ));
    // RBAC (as the fake's responder): bob may `get` domains/finance, nothing else.
    fake.set_sar_responder(|review| {
        let attrs = &review["spec"]["resourceAttributes"];
        if review["spec"]["user"] == "bob"
            && attrs["verb"] == "get"
            && attrs["resource"] == "domains"
            && attrs["name"] == "finance"
            && attrs["group"] == "secrets.iomete.com"
        {
            SarAnswer::Allow
        } else {
            SarAnswer::Deny("no RBAC rule".into())
        }
    });
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        authorizer: secrets_webhook::authz::AuthorizerKind::Rbac,
        ..Settings::default()
    };
    let client = fake.client();
    let vault = VaultBackend::in_cluster(
        client.clone(),
        settings.naming.clone(),
        keys(),
        VaultOptions::default(),
    );
    let webhook = Webhook::from_cluster_parts(
        settings,
        client.clone(),
        Arc::new(Metrics::new()),
        TrustedControllers::default(),
        keys(),
        Arc::clone(&vault),
    )
    .unwrap();
    eventually("ready", || webhook.ready()).await;
    let api =
        secrets_webhook::api::cluster(&webhook, vault, client, &LocalConfig::default(), vec![])
            .unwrap();
    let api = ApiServer::serve(webhook, api).await;
    assert_eq!(api.get(FINANCE, "sa-bob").await.status, StatusCode::OK);
    let denied = api
        .put(
            &format!("{FINANCE}/k"),
            "sa-bob",
            &[("if-none-match", "*")],
            json!({"value": "v"}),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert!(
        denied.json()["detail"]
            .as_str()
            .unwrap()
            .contains("verb \"update\" on domains.secrets.iomete.com"),
        "{}",
        denied.text
    );
    let verbs: Vec<String> = fake
        .sar_requests()
        .iter()
        .map(|r| {
            r["spec"]["resourceAttributes"]["verb"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        verbs.contains(&"get".to_string()) && verbs.contains(&"update".to_string()),
        "{verbs:?}"
    );
    // The selector asks for `use`: bob has none, so only... no domain keys.
    let keys = api
        .get("/api/v1/secret-keys?domain=finance", "sa-bob")
        .await
        .json();
    assert_eq!(keys, json!([]));
}
