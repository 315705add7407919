//! Authorization and identity through the real `kube::Client` against the fake API server, for
//! what a real one cannot show or produce on demand: the exact SubjectAccessReview request body,
//! SAR errors and hangs, coalescing counts, unloaded bundles, and the executor's owner-pod lookup
//! (one GET for a burst, API errors). Real RBAC deciding SARs and ResourceBundles watched from the
//! real API server are in tests/e2e.rs.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::Pod;
use secrets_webhook::authz::cache::{CacheSettings, CachedAuthorizer};
use secrets_webhook::authz::ras::RasAuthorizer;
use secrets_webhook::authz::sar::SarAuthorizer;
use secrets_webhook::authz::{Authorizer, Decision, Identity, Resource};
use secrets_webhook::identity::stamps;
use secrets_webhook::identity::{
    self, ExecutorPolicy, IdentityError, KeyRing, Keys, KubeOwnerLookup, OwnerLookup, Resolver,
    TrustedControllers, Via,
};
use secrets_webhook::refs::{SecretObject, Source, SourceType};
use serde_json::json;
use support::fake_apiserver::{Collection, FakeApiServer, Fault, SarAnswer};

const SAR_PATH: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn fixture(name: &str) -> Pod {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
    let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn vault_prod() -> Resource {
    Resource::VaultConfig {
        name: "vault-prod-finance".into(),
        bundle: Some("finance-bundle".into()),
    }
}

/// Alice as the API server describes a user with a bound token: uid and extra set.
fn alice_full() -> Identity {
    let mut alice = Identity::new(
        "alice",
        vec!["data-eng".into(), "system:authenticated".into()],
    );
    alice.uid = Some("8d3f-alice".into());
    alice.extra = BTreeMap::from([(
        "authentication.kubernetes.io/credential-id".to_string(),
        vec!["JTI=1234".to_string()],
    )]);
    alice
}

/// Allows alice on everything; denies everyone else with an RBAC-like reason.
fn rbac_like(body: &serde_json::Value) -> SarAnswer {
    if body["spec"]["user"] == "alice" {
        SarAnswer::Allow
    } else {
        SarAnswer::Deny("no RBAC policy matched".into())
    }
}

#[tokio::test]
async fn sar_request_carries_the_full_user_info_and_resource() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(rbac_like);
    let sar = SarAuthorizer::new(api.client(), "iomete-system");

    assert_eq!(
        sar.check_use(&alice_full(), &vault_prod(), soon()).await,
        Decision::Allow
    );
    assert_eq!(
        sar.check_use(&alice_full(), &Resource::Domain("finance".into()), soon())
            .await,
        Decision::Allow
    );

    let bodies = api.sar_requests();
    assert_eq!(bodies.len(), 2);
    let body = &bodies[0];
    assert_eq!(body["apiVersion"], "authorization.k8s.io/v1");
    assert_eq!(body["kind"], "SubjectAccessReview");
    let spec = &body["spec"];
    assert_eq!(spec["user"], "alice");
    assert_eq!(spec["groups"], json!(["data-eng", "system:authenticated"]));
    assert_eq!(spec["uid"], "8d3f-alice");
    assert_eq!(
        spec["extra"],
        json!({"authentication.kubernetes.io/credential-id": ["JTI=1234"]})
    );
    let attrs = &spec["resourceAttributes"];
    assert_eq!(attrs["verb"], "use");
    assert_eq!(attrs["group"], "secrets.iomete.com");
    assert_eq!(attrs["resource"], "vaultconfigs");
    assert_eq!(attrs["name"], "vault-prod-finance");
    assert_eq!(attrs["namespace"], "iomete-system");
    assert!(spec.get("nonResourceAttributes").is_none());

    let attrs = &bodies[1]["spec"]["resourceAttributes"];
    assert_eq!(attrs["resource"], "domains");
    assert_eq!(attrs["name"], "finance");
}

/// Only `allowed: true` allows. Real RBAC never sets `denied` (tests/e2e.rs has its answers, and
/// `matrix::sar_mode_allows_denies_and_reports_evaluation_errors` the fake's copies of them); an
/// authorizer webhook in front of RBAC may answer `{"allowed": false, "denied": true}` with its
/// reason, which a real control plane without such a webhook cannot produce. The reason names
/// policies and bindings: it goes to the log, and the denial reads as any other.
#[tokio::test]
async fn sar_explicit_denial_of_an_authorizer_webhook_is_a_plain_denial() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(|body| match body["spec"]["user"].as_str() {
        Some("alice") => SarAnswer::Allow,
        _ => SarAnswer::ExplicitDeny("blocked by the platform policy".into()),
    });
    let sar = SarAuthorizer::new(api.client(), "iomete-system");
    // Nothing to list first: ready at once.
    assert!(Authorizer::ready(&sar));
    let who = |name: &str| Identity::new(name, Vec::new());
    assert_eq!(
        sar.check_use(&who("alice"), &vault_prod(), soon()).await,
        Decision::Allow
    );
    assert_eq!(
        sar.check_use(&who("carol"), &vault_prod(), soon()).await,
        Decision::Deny(
            "user \"carol\" lacks Use on vault config \"vault-prod-finance\" (Kubernetes RBAC: verb \
             \"use\" on vaultconfigs.secrets.iomete.com \"vault-prod-finance\" in namespace \
             \"iomete-system\"); a platform admin can grant it with a Role and RoleBinding"
                .into()
        ),
        "the reason is logged, not shown: denials read the same whatever exists"
    );
    assert_eq!(api.sar_requests().len(), 2);
}

#[tokio::test]
async fn sar_errors_fail_closed_and_are_not_cached() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(rbac_like);
    api.inject(Fault::status("POST", SAR_PATH, 500).times(1));
    let authz = CachedAuthorizer::new(
        SarAuthorizer::new(api.client(), "iomete-system"),
        CacheSettings::default(),
    );
    let Decision::Deny(text) = authz.check_use(&alice_full(), &vault_prod(), soon()).await else {
        panic!("an API error must deny")
    };
    assert!(text.starts_with("authorizer unreachable: "), "{text}");
    assert!(text.ends_with("(failing closed)"), "{text}");
    // The error was not cached: the next check asks again and gets the real answer.
    assert_eq!(
        authz.check_use(&alice_full(), &vault_prod(), soon()).await,
        Decision::Allow
    );
    assert_eq!(api.sar_requests().len(), 2);
    // Responder-level HTTP errors (e.g. 403 for a webhook lacking RBAC to create SARs) too.
    api.set_sar_responder(|_| SarAnswer::Error(403));
    let d = authz
        .check_use(&alice_full(), &Resource::Domain("hr".into()), soon())
        .await;
    assert!(matches!(d, Decision::Deny(t) if t.contains("failing closed")));
}

#[tokio::test]
async fn a_hanging_api_server_is_cut_by_the_check_budget() {
    let api = FakeApiServer::start().await;
    api.inject(Fault::hang("POST", SAR_PATH));
    let settings = CacheSettings {
        check_budget: Duration::from_millis(200),
        ..CacheSettings::default()
    };
    let authz = CachedAuthorizer::new(SarAuthorizer::new(api.client(), "iomete-system"), settings);
    let started = Instant::now();
    let d = authz.check_use(&alice_full(), &vault_prod(), soon()).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        d,
        Decision::Deny("authorizer unreachable: no answer within 200 ms (failing closed)".into())
    );
}

#[tokio::test]
async fn two_hundred_concurrent_checks_send_one_sar() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(rbac_like);
    let authz: Arc<dyn Authorizer> = Arc::new(CachedAuthorizer::new(
        SarAuthorizer::new(api.client(), "iomete-system"),
        CacheSettings::default(),
    ));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let authz = Arc::clone(&authz);
            tokio::spawn(async move { authz.check_use(&alice_full(), &vault_prod(), soon()).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Decision::Allow);
    }
    assert_eq!(api.count("POST", SAR_PATH), 1);
    // Cached afterwards, for allow and deny alike.
    let bob = Identity::new("bob", Vec::new());
    for _ in 0..3 {
        authz.check_use(&alice_full(), &vault_prod(), soon()).await;
        authz.check_use(&bob, &vault_prod(), soon()).await;
    }
    assert_eq!(api.count("POST", SAR_PATH), 2);
}

/// Not ready and denying while bundles cannot be listed; ready through every trait, and as `serve`
/// wraps it (`/readyz`), once they are.
#[tokio::test]
async fn unloaded_bundles_fail_closed_until_listed() {
    let api = FakeApiServer::start().await;
    api.inject(Fault::status("GET", "/apis/secrets.iomete.com", 503));
    let ras = RasAuthorizer::in_cluster(api.client(), "iomete-system");
    let d = ras
        .check_use(
            &Identity::new("alice", Vec::new()),
            &Resource::Domain("finance".into()),
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert_eq!(
        d,
        Decision::Deny(
            "authorizer unreachable: resource bundles are not loaded yet from the Kubernetes API \
             (failing closed)"
                .into()
        )
    );
    assert!(!ras.ready());
    assert!(!Authorizer::ready(&ras));
    let wrapped = secrets_webhook::authz::in_cluster(
        secrets_webhook::authz::AuthorizerKind::Ras,
        api.client(),
        "iomete-system",
        CacheSettings::default(),
        Arc::new(secrets_webhook::metrics::Metrics::new()),
    );
    assert!(
        !wrapped.ready(),
        "/readyz must see that bundles are not loaded"
    );
    assert!(!secrets_webhook::authz::CheckUse::ready(&ras));

    api.clear_faults();
    let until = Instant::now() + Duration::from_secs(10);
    while !(wrapped.ready() && ras.ready()) {
        assert!(Instant::now() < until, "never ready after the listing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(Authorizer::ready(&ras));
    assert!(secrets_webhook::authz::CheckUse::ready(&ras));
}

/// A check that arrives before the first listing waits for it (within its deadline) rather than
/// denying at once: right after start, both the direct and the cached path answer from the bundles.
#[tokio::test]
async fn a_check_before_the_first_listing_waits_for_it() {
    let api = FakeApiServer::start().await;
    api.put(json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": "finance-bundle", "namespace": "iomete-system"},
        "spec": {"domains": ["finance"],
                 "grants": [{"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]}]}}));
    let alice = Identity::new("alice", Vec::new());
    let finance = Resource::Domain("finance".into());
    // The watch task has not run yet (single-threaded test runtime): nothing is listed.
    let ras = RasAuthorizer::in_cluster(api.client(), "iomete-system");
    assert!(!ras.ready());
    assert_eq!(
        ras.check_use(&alice, &finance, soon()).await,
        Decision::Allow
    );
    let cached = CachedAuthorizer::new(
        RasAuthorizer::in_cluster(api.client(), "iomete-system"),
        CacheSettings::default(),
    );
    assert!(!Authorizer::ready(&cached));
    assert_eq!(
        cached.check_use(&alice, &finance, soon()).await,
        Decision::Allow
    );
}

/// RBAC's reason and an authorizer's evaluation error name roles and bindings: they go to the log
/// for admins (`SubjectAccessReview denied`), never into the denial; a bare denial logs no such line.
#[tokio::test]
async fn sar_reasons_and_evaluation_errors_are_logged_for_admins() {
    support::logs::captured_logs();
    let api = FakeApiServer::start().await;
    api.set_sar_responder(|body| match body["spec"]["user"].as_str() {
        Some("sar-log-reasoned") => {
            SarAnswer::Deny("RBAC: role.rbac.authorization.k8s.io \"x\" not found".into())
        }
        Some("sar-log-failed") => SarAnswer::EvaluationError("authorizer webhook down".into()),
        _ => SarAnswer::Deny(String::new()),
    });
    let sar = SarAuthorizer::new(api.client(), "iomete-system");
    for user in ["sar-log-reasoned", "sar-log-failed", "sar-log-bare"] {
        let d = sar
            .check_use(&Identity::new(user, Vec::new()), &vault_prod(), soon())
            .await;
        let Decision::Deny(text) = d else {
            panic!("{user} must be denied")
        };
        assert!(
            !text.contains("not found") && !text.contains("webhook down"),
            "{text}"
        );
    }
    let lines = support::logs::parse_lines(&support::logs::captured_text());
    let logged = |user: &str| {
        lines
            .iter()
            .filter(|l| l["message"] == "SubjectAccessReview denied" && l["user"] == user)
            .cloned()
            .collect::<Vec<_>>()
    };
    let reasoned = logged("sar-log-reasoned");
    assert_eq!(reasoned.len(), 1, "{reasoned:?}");
    assert_eq!(
        reasoned[0]["reason"],
        "RBAC: role.rbac.authorization.k8s.io \"x\" not found"
    );
    assert_eq!(reasoned[0]["what"], "vault config \"vault-prod-finance\"");
    let failed = logged("sar-log-failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["evaluation_error"], "authorizer webhook down");
    let bare = logged("sar-log-bare");
    assert!(bare.is_empty(), "nothing to tell admins: {bare:?}");
}

// ----- executors: the owner lookup through the real client -----

fn finance_db() -> SecretObject {
    SecretObject {
        key: "db_password".into(),
        source: Source {
            kind: SourceType::Kubernetes,
            id: "finance".into(),
        },
    }
}

fn keys() -> Arc<Keys> {
    Keys::fixed(KeyRing::new(b"authz-tests-signing-key-0123456789abcdef", None).unwrap())
}

/// Stores the fixture driver as the webhook admitted it (signed stamps) and returns the executor
/// fixture pointing at the stored driver's uid, and that uid.
fn stored_driver_and_executor(api: &FakeApiServer, keys: &Keys) -> (Pod, String) {
    let mut driver = fixture("spark35-driver-submit.json");
    let alice = Identity::new("alice", vec!["data-eng".into()]);
    let stamps = stamps::stamp_annotations(
        &alice,
        [&finance_db()],
        &stamps::Subject::of_new_pod(&driver, "default"),
        &keys.get().unwrap(),
    );
    driver
        .metadata
        .annotations
        .get_or_insert_default()
        .extend(stamps);
    let stored = api.put_typed(&driver);
    let uid = stored["metadata"]["uid"].as_str().unwrap().to_string();
    let mut executor = fixture("spark35-executor-submit.json");
    let owners = executor.metadata.owner_references.as_mut().unwrap();
    owners[0].uid = uid.clone();
    (executor, uid)
}

/// The driver's service account, with a token bound to the driver pod `uid`.
fn driver_sa(uid: &str) -> UserInfo {
    UserInfo {
        username: Some("system:serviceaccount:default:spark".into()),
        groups: Some(vec!["system:serviceaccounts".into()]),
        uid: None,
        extra: Some(BTreeMap::from([
            (
                identity::EXTRA_POD_NAME.to_string(),
                vec!["spark-pi-143984a22158e5b5-driver".to_string()],
            ),
            (identity::EXTRA_POD_UID.to_string(), vec![uid.to_string()]),
        ])),
    }
}

async fn resolve_executor(
    executor: &Pod,
    uid: &str,
    owners: &dyn OwnerLookup,
    keys: &Keys,
) -> Result<identity::Resolved, IdentityError> {
    let trusted = TrustedControllers::default();
    Resolver {
        trusted: &trusted,
        owners,
        keys,
        executors: ExecutorPolicy::default(),
    }
    .resolve(&driver_sa(uid), executor, "default", true, soon())
    .await
}

#[tokio::test]
async fn two_hundred_executors_cost_one_pod_get() {
    let api = FakeApiServer::start().await;
    let keys = keys();
    let (executor, uid) = stored_driver_and_executor(&api, &keys);
    let executor = Arc::new(executor);
    let owners: Arc<dyn OwnerLookup> = Arc::new(KubeOwnerLookup::new(
        api.client(),
        KubeOwnerLookup::DEFAULT_TTL,
    ));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (executor, owners, keys, uid) =
                (executor.clone(), owners.clone(), keys.clone(), uid.clone());
            tokio::spawn(
                async move { resolve_executor(&executor, &uid, owners.as_ref(), &keys).await },
            )
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.identity, Identity::new("alice", vec!["data-eng".into()]));
        assert_eq!(
            r.via,
            Via::SparkDriver {
                driver: "spark-pi-143984a22158e5b5-driver".into(),
                uid: uid.clone()
            }
        );
        assert!(r.may_inherit(&finance_db(), &Default::default()).is_ok());
    }
    let driver_path = "/api/v1/namespaces/default/pods/spark-pi-143984a22158e5b5-driver";
    assert_eq!(api.count("GET", driver_path), 1);
}

#[tokio::test]
async fn missing_driver_and_api_errors_deny() {
    let api = FakeApiServer::start().await;
    let keys = keys();
    let (executor, uid) = stored_driver_and_executor(&api, &keys);
    let owners = KubeOwnerLookup::new(api.client(), KubeOwnerLookup::DEFAULT_TTL);
    let driver_path = "/api/v1/namespaces/default/pods/spark-pi-143984a22158e5b5-driver";

    // API error: fail closed, and the error is not cached.
    api.inject(Fault::status("GET", driver_path, 500).times(1));
    let e = resolve_executor(&executor, &uid, &owners, &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::OwnerLookup { .. }), "{e}");
    assert!(e.to_string().ends_with("(failing closed)"), "{e}");

    // Driver deleted: "not found" (a 404 through the real client), not cached either.
    api.remove(
        &Collection::pods(),
        Some("default"),
        "spark-pi-143984a22158e5b5-driver",
    );
    let e = resolve_executor(&executor, &uid, &owners, &keys)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor's owner pod \"spark-pi-143984a22158e5b5-driver\" not found in namespace \
         \"default\"; executors must be created by their Spark driver"
    );
    assert_eq!(api.count("GET", driver_path), 2);
}

/// Attack: stamps added to a running driver (an UPDATE the webhook never saw) and a driver
/// replaced by another pod of the same name: the executor's lookup through the real client finds
/// stamps that do not verify, or a uid its bound token does not name.
#[tokio::test]
async fn drivers_changed_behind_the_webhooks_back_give_executors_nothing() {
    let api = FakeApiServer::start().await;
    let keys = keys();
    let (executor, uid) = stored_driver_and_executor(&api, &keys);
    let owners = KubeOwnerLookup::new(api.client(), Duration::ZERO);
    assert!(
        resolve_executor(&executor, &uid, &owners, &keys)
            .await
            .is_ok()
    );

    // `kubectl annotate --overwrite` of the grants, straight into storage.
    let mut stored = api
        .object(
            &Collection::pods(),
            Some("default"),
            "spark-pi-143984a22158e5b5-driver",
        )
        .unwrap();
    stored["metadata"]["annotations"][stamps::STAMP_GRANTED] =
        json!(r#"["kubernetes:finance/db_password","kubernetes:hr/salary_db"]"#);
    api.put(stored);
    let e = resolve_executor(&executor, &uid, &owners, &keys)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("its signature does not match"),
        "{e}"
    );
}

// ----- the matrix, through the engine (`Webhook::review_bytes`, what the HTTPS server calls) -----

mod matrix {
    use std::sync::Arc;

    use base64::Engine as _;
    use k8s_openapi::api::core::v1::Pod;
    use secrets_webhook::admission::Webhook;
    use secrets_webhook::authz::cache::CacheSettings;
    use secrets_webhook::authz::{AuthorizerKind, in_cluster};
    use secrets_webhook::config::{LocalConfig, Settings};
    use secrets_webhook::identity::{KubeOwnerLookup, StaticOwner};
    use secrets_webhook::metrics::Metrics;
    use serde_json::{Value, json};

    use super::support::fake_apiserver::{FakeApiServer, SarAnswer};
    use super::support::metrics;

    const CONFIG: &str = r#"
namespace: iomete-system
stores:
  global: [api_token]
  domains: {finance: [db_password, s3_secret_key], hr: [salary_db, db_password]}
resourceBundles:
  - {name: finance-bundle, domains: [finance],
     grants: [{subjects: [{kind: User, name: alice}, {kind: Group, name: data-eng}], permissions: [use, view]}]}
  - {name: hr-bundle, domains: [hr], grants: [{subjects: [{kind: User, name: harriet}], permissions: [use]}]}
trustedControllers:
  - {username: "system:serviceaccount:jhub:hub", userAnnotation: hub.jupyter.org/username}
signingKeys: {current: matrix-tests-signing-key-0123456789abcdef}
"#;
    const NS: &str = "iomete-system";
    const DRIVER_UID: &str = "08082eb2-d2d1-43f3-bd01-8ca76964fc04";
    const DRIVER: &str = "spark-pi-143984a22158e5b5-driver";
    const DRIVER_SA: &str = "system:serviceaccount:iomete-system:spark";
    const HUB: &str = "system:serviceaccount:jhub:hub";
    const STAMP_IDENTITY: &str = "secrets.iomete.com/identity";
    const STAMP_GRANTED: &str = "secrets.iomete.com/granted";

    fn webhook() -> Webhook {
        let config = LocalConfig::parse(CONFIG).unwrap();
        Webhook::from_local(Settings::default(), &config, Arc::new(Metrics::new())).unwrap()
    }

    fn fixture(name: &str) -> Value {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        let mut pod: Value = serde_json::from_str(&text).unwrap();
        pod["metadata"]["namespace"] = json!(NS);
        pod
    }

    fn with(mut pod: Value, annotations: &[(&str, &str)]) -> Value {
        if pod["metadata"]["annotations"].is_null() {
            pod["metadata"]["annotations"] = json!({});
        }
        for (k, v) in annotations {
            pod["metadata"]["annotations"][*k] = json!(v);
        }
        pod
    }

    /// A plain pod in the data-plane namespace (no Spark or Jupyter labels, no annotations).
    fn plain_pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "plain", "namespace": NS},
               "spec": {"containers": [{"name": "main", "image": "busybox"}]}})
    }

    fn driver(annotations: &[(&str, &str)]) -> Value {
        with(fixture("spark35-driver-submit.json"), annotations)
    }

    fn executor(annotations: &[(&str, &str)]) -> Value {
        with(fixture("spark35-executor-submit.json"), annotations)
    }

    const FINANCE: (&str, &str) = (
        "env.secrets.iomete.com/DB_PASSWORD",
        "kubernetes:finance/db_password",
    );
    const HR: (&str, &str) = (
        "env.secrets.iomete.com/SALARY_DB",
        "kubernetes:hr/salary_db",
    );
    const FINANCE_S3: (&str, &str) = (
        "env.secrets.iomete.com/S3_SECRET",
        "kubernetes:finance/s3_secret_key",
    );
    const GLOBAL: (&str, &str) = (
        "env.secrets.iomete.com/API_TOKEN",
        "kubernetes:global/api_token",
    );

    struct Answer {
        response: Value,
        patch: Option<json_patch::Patch>,
    }

    impl Answer {
        fn allowed(&self) -> bool {
            self.response["allowed"] == json!(true)
        }
        fn message(&self) -> String {
            self.response["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
        fn audit(&self, key: &str) -> String {
            self.response["auditAnnotations"][key]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
        fn warnings(&self) -> Vec<String> {
            serde_json::from_value(self.response["warnings"].clone()).unwrap_or_default()
        }
        /// The pod after the patch.
        fn apply(&self, pod: &Value) -> Value {
            let mut pod = pod.clone();
            if let Some(patch) = &self.patch {
                json_patch::patch(&mut pod, patch).unwrap();
            }
            let _: Pod = serde_json::from_value(pod.clone()).expect("still a Pod");
            pod
        }
    }

    fn review(pod: &Value, user: &str, groups: &[&str], extra: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "b2b8d3a4-0000-4000-8000-000000000001",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": NS, "operation": "CREATE",
                "userInfo": {"username": user, "groups": groups, "extra": extra},
                "object": pod, "dryRun": false
            }
        }))
        .unwrap()
    }

    /// The driver's token, bound to the driver pod with `uid`.
    fn bound_to_driver(uid: &str) -> Value {
        json!({"authentication.kubernetes.io/pod-name": [DRIVER],
               "authentication.kubernetes.io/pod-uid": [uid]})
    }

    async fn admit_as(webhook: &Webhook, pod: &Value, user: &str, groups: &[&str]) -> Answer {
        let extra = if user == DRIVER_SA {
            bound_to_driver(DRIVER_UID)
        } else {
            json!({})
        };
        admit_with(webhook, pod, user, groups, extra).await
    }

    async fn admit_with(
        webhook: &Webhook,
        pod: &Value,
        user: &str,
        groups: &[&str],
        extra: Value,
    ) -> Answer {
        let out = webhook
            .review_bytes(&review(pod, user, groups, extra), None)
            .await;
        let answer: Value = serde_json::from_slice(&out).unwrap();
        let response = answer["response"].clone();
        let patch = response["patch"].as_str().map(|b64| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        });
        Answer { response, patch }
    }

    async fn admit(pod: &Value, user: &str, groups: &[&str]) -> Answer {
        admit_as(&webhook(), pod, user, groups).await
    }

    async fn admit_with_extra(webhook: &Webhook, pod: &Value, user: &str, extra: Value) -> Answer {
        let out = webhook
            .review_bytes(&review(pod, user, &[], extra), None)
            .await;
        let answer: Value = serde_json::from_slice(&out).unwrap();
        let response = answer["response"].clone();
        let patch = response["patch"].as_str().map(|b64| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        });
        Answer { response, patch }
    }

    fn env_ref(pod: &Value, name: &str) -> Value {
        pod["spec"]["containers"][0]["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn allowed_user_gets_the_reference_stamps_and_audit() {
        let pod = driver(&[FINANCE]);
        let a = admit(&pod, "alice", &["system:authenticated"]).await;
        assert!(a.allowed(), "{}", a.message());
        let mutated = a.apply(&pod);
        assert_eq!(
            env_ref(&mutated, "DB_PASSWORD")["valueFrom"]["secretKeyRef"],
            json!({"name": "iomete-secret-store-finance", "key": "db_password", "optional": false})
        );
        let ann = &mutated["metadata"]["annotations"];
        assert_eq!(
            ann[STAMP_IDENTITY],
            r#"{"user":"alice","groups":["system:authenticated"]}"#
        );
        assert_eq!(ann[STAMP_GRANTED], r#"["kubernetes:finance/db_password"]"#);
        assert_eq!(
            a.audit("identity"),
            r#"{"user":"alice","groups":["system:authenticated"]}"#
        );
        assert_eq!(a.audit("identity-source"), "request");
        assert_eq!(a.audit("decision"), "patched");
    }

    #[tokio::test]
    async fn repeated_decisions_are_served_from_the_cache_and_counted() {
        let webhook = webhook();
        let pod = driver(&[FINANCE]);
        for _ in 0..2 {
            let a = admit_as(&webhook, &pod, "alice", &["system:authenticated"]).await;
            assert!(a.allowed(), "{}", a.message());
        }
        let text = webhook.metrics.encode();
        assert_eq!(
            metrics::cache(&text, "authz-decisions", "miss"),
            1.0,
            "{text}"
        );
        assert_eq!(
            metrics::cache(&text, "authz-decisions", "hit"),
            1.0,
            "{text}"
        );
        assert_eq!(metrics::backend(&text, "ras", "allow"), 1.0, "{text}");
        let a = admit_as(&webhook, &pod, "bob", &[]).await;
        assert!(!a.allowed());
        let text = webhook.metrics.encode();
        assert_eq!(metrics::backend(&text, "ras", "deny"), 1.0, "{text}");
        assert_eq!(
            metrics::cache(&text, "authz-decisions", "miss"),
            2.0,
            "{text}"
        );
    }

    #[tokio::test]
    async fn allowed_via_group() {
        let a = admit(&driver(&[FINANCE]), "carol", &["data-eng"]).await;
        assert!(a.allowed(), "{}", a.message());
    }

    #[tokio::test]
    async fn denied_user_is_told_what_is_missing() {
        let a = admit(&driver(&[FINANCE]), "bob", &["system:authenticated"]).await;
        assert!(!a.allowed());
        assert_eq!(
            a.message(),
            "annotation env.secrets.iomete.com/DB_PASSWORD: kubernetes:finance/db_password: user \"bob\" \
             lacks Use on domain \"finance\"; a platform admin can grant Use to the user or one of its \
             groups in a resource bundle that lists the domain"
        );
        assert_eq!(a.response["status"]["code"], 403);
        assert_eq!(a.audit("decision"), "denied: forbidden");
        assert_eq!(
            a.audit("identity"),
            r#"{"user":"bob","groups":["system:authenticated"]}"#
        );
    }

    #[tokio::test]
    async fn forged_run_as_from_an_untrusted_requester_is_ignored() {
        let pod = driver(&[FINANCE, ("secrets.iomete.com/run-as", "alice")]);
        let a = admit(&pod, "bob", &[]).await;
        assert!(!a.allowed());
        assert!(
            a.message().contains("user \"bob\" lacks Use"),
            "{}",
            a.message()
        );
        // With a global reference it is admitted, as bob, and told why.
        let pod = driver(&[GLOBAL, ("secrets.iomete.com/run-as", "alice")]);
        let a = admit(&pod, "bob", &[]).await;
        assert!(a.allowed(), "{}", a.message());
        assert_eq!(
            a.warnings(),
            [
                "annotation secrets.iomete.com/run-as ignored: \"bob\" is not a trusted controller; admitted as \"bob\""
            ]
        );
        let mutated = a.apply(&pod);
        assert_eq!(
            mutated["metadata"]["annotations"][STAMP_IDENTITY],
            r#"{"user":"bob","groups":[]}"#
        );
    }

    #[tokio::test]
    async fn trusted_hub_submits_for_alice_and_not_for_mallory() {
        let notebook = with(fixture("jupyterhub-singleuser-z2jh.json"), &[FINANCE]);
        let a = admit(&notebook, HUB, &["system:serviceaccounts"]).await;
        assert!(a.allowed(), "{}", a.message());
        assert_eq!(a.audit("identity"), r#"{"user":"alice","groups":[]}"#);
        assert_eq!(
            a.audit("identity-source"),
            "trusted-controller system:serviceaccount:jhub:hub (hub.jupyter.org/username)"
        );

        let mallory = with(notebook, &[("hub.jupyter.org/username", "mallory")]);
        let a = admit(&mallory, HUB, &["system:serviceaccounts"]).await;
        assert!(!a.allowed());
        assert!(
            a.message()
                .contains("user \"mallory\" lacks Use on domain \"finance\""),
            "{}",
            a.message()
        );
    }

    /// The driver as the API server stores it after admission (patched, with a uid).
    async fn admitted_driver(annotations: &[(&str, &str)]) -> Value {
        let pod = driver(annotations);
        let a = admit(&pod, "alice", &["data-eng"]).await;
        assert!(a.allowed(), "{}", a.message());
        let mut stored = a.apply(&pod);
        stored["metadata"]["uid"] = json!(DRIVER_UID);
        stored
    }

    fn with_owner(driver: &Value) -> Webhook {
        let mut webhook = webhook();
        let pod: Pod = serde_json::from_value(driver.clone()).unwrap();
        webhook.owners = Arc::new(StaticOwner::new(Some(pod)));
        webhook
    }

    #[tokio::test]
    async fn executors_inherit_exactly_their_drivers_grants() {
        let stored = admitted_driver(&[FINANCE]).await;
        let webhook = with_owner(&stored);

        // Executor of a granted driver.
        let exec = executor(&[FINANCE]);
        let a = admit_as(&webhook, &exec, DRIVER_SA, &["system:serviceaccounts"]).await;
        assert!(a.allowed(), "{}", a.message());
        assert_eq!(
            a.audit("identity"),
            r#"{"user":"alice","groups":["data-eng"]}"#
        );
        assert_eq!(a.audit("identity-source"), format!("spark-driver {DRIVER}"));
        let mutated = a.apply(&exec);
        assert_eq!(
            mutated["metadata"]["annotations"][STAMP_IDENTITY],
            r#"{"user":"alice","groups":["data-eng"]}"#
        );

        // Asking for more than the driver.
        let a = admit_as(&webhook, &executor(&[FINANCE, HR]), DRIVER_SA, &[]).await;
        assert!(!a.allowed());
        assert_eq!(
            a.message(),
            format!(
                "executor may not use kubernetes:hr/salary_db: its Spark driver \"{DRIVER}\" was not \
                 granted it; add the reference to the driver pod (spark.kubernetes.driver.annotation.*) \
                 and resubmit"
            )
        );

        // Another key of the driver's own domain: the driver's user holds Use on the domain (so the
        // authorizer alone would allow it), but the driver was granted only db_password.
        let own_user = admit(&driver(&[FINANCE_S3]), "alice", &["data-eng"]).await;
        assert!(own_user.allowed(), "{}", own_user.message());
        let a = admit_as(&webhook, &executor(&[FINANCE, FINANCE_S3]), DRIVER_SA, &[]).await;
        assert!(
            !a.allowed(),
            "an executor got a secret its driver was not granted"
        );
        assert_eq!(
            a.message(),
            format!(
                "executor may not use kubernetes:finance/s3_secret_key: its Spark driver \"{DRIVER}\" was \
                 not granted it; add the reference to the driver pod (spark.kubernetes.driver.annotation.*) \
                 and resubmit"
            )
        );
        // The granted secret under another variable name is the same secret: allowed.
        let renamed = executor(&[("env.secrets.iomete.com/OTHER_NAME", FINANCE.1)]);
        let a = admit_as(&webhook, &renamed, DRIVER_SA, &[]).await;
        assert!(a.allowed(), "{}", a.message());

        // Created by a service account that is not the driver's.
        let a = admit_as(
            &webhook,
            &exec,
            "system:serviceaccount:iomete-system:other",
            &[],
        )
        .await;
        assert!(!a.allowed());
        assert!(
            a.message()
                .contains("executors must be created by their driver's service account"),
            "{}",
            a.message()
        );

        // A global reference needs no grant: no driver lookup, admitted for the requester.
        let a = admit(&executor(&[GLOBAL]), DRIVER_SA, &[]).await;
        assert!(a.allowed(), "{}", a.message());
    }

    /// A bound service-account token names the pod that holds it (`userInfo.extra`): an executor
    /// created with the driver's account from another pod (its uid differs) is denied.
    #[tokio::test]
    async fn executors_from_another_pod_with_the_drivers_account_are_denied() {
        let stored = admitted_driver(&[FINANCE]).await;
        let webhook = with_owner(&stored);
        let uid = stored["metadata"]["uid"].as_str().unwrap();
        let from = |name: &str, uid: &str| {
            json!({"authentication.kubernetes.io/pod-name": [name],
                   "authentication.kubernetes.io/pod-uid": [uid]})
        };
        let exec = executor(&[FINANCE]);
        let a = admit_with_extra(&webhook, &exec, DRIVER_SA, from(DRIVER, uid)).await;
        assert!(a.allowed(), "{}", a.message());

        let a = admit_with_extra(
            &webhook,
            &exec,
            DRIVER_SA,
            from(DRIVER, "9e1c0a55-0000-4000-8000-00000000dead"),
        )
        .await;
        assert!(!a.allowed(), "a pod with another uid passed as the driver");
        assert_eq!(
            a.message(),
            format!(
                "executor was created from pod \"{DRIVER} (uid 9e1c0a55-0000-4000-8000-00000000dead)\" \
                 (bound token), not by its driver \"{DRIVER}\""
            )
        );
        let a = admit_with_extra(&webhook, &exec, DRIVER_SA, from("attacker-pod", uid)).await;
        assert!(!a.allowed());
        assert_eq!(
            a.message(),
            format!(
                "executor was created from pod \"attacker-pod\" (bound token), not by its driver \"{DRIVER}\""
            )
        );
    }

    #[tokio::test]
    async fn executors_of_another_app_or_of_a_non_driver_are_denied() {
        let stored = admitted_driver(&[FINANCE]).await;

        let mut other_app = stored.clone();
        other_app["metadata"]["labels"]["spark-app-selector"] = json!("spark-0000other");
        let a = admit_as(
            &with_owner(&other_app),
            &executor(&[FINANCE]),
            DRIVER_SA,
            &[],
        )
        .await;
        assert!(!a.allowed());
        assert_eq!(
            a.message(),
            format!(
                "executor belongs to Spark application \"spark-e0efabfc26c84987aadfed69aece1a87\", but its \
                 owner pod \"{DRIVER}\" is the driver of \"spark-0000other\""
            )
        );

        let mut not_driver = stored.clone();
        not_driver["metadata"]["labels"]["spark-role"] = json!("executor");
        let a = admit_as(
            &with_owner(&not_driver),
            &executor(&[FINANCE]),
            DRIVER_SA,
            &[],
        )
        .await;
        assert!(!a.allowed());
        assert_eq!(
            a.message(),
            format!(
                "executor's owner pod \"{DRIVER}\" is not a Spark driver (label spark-role=driver missing)"
            )
        );

        let a = admit(&executor(&[FINANCE]), DRIVER_SA, &[]).await;
        assert!(!a.allowed(), "no owner to look up must deny");
    }

    #[tokio::test]
    async fn client_supplied_stamps_are_replaced() {
        let forged = [
            (
                STAMP_IDENTITY,
                r#"{"user":"root","groups":["system:masters"]}"#,
            ),
            (STAMP_GRANTED, r#"["kubernetes:hr/salary_db"]"#),
        ];
        // On a pod the webhook mutates.
        let pod = driver(&[FINANCE, forged[0], forged[1]]);
        let a = admit(&pod, "alice", &[]).await;
        assert!(a.allowed(), "{}", a.message());
        let ann = a.apply(&pod)["metadata"]["annotations"].clone();
        assert_eq!(ann[STAMP_IDENTITY], r#"{"user":"alice","groups":[]}"#);
        assert_eq!(ann[STAMP_GRANTED], r#"["kubernetes:finance/db_password"]"#);

        // On a pod without references: reset to the requester, nothing granted ...
        let pod = driver(&forged);
        let a = admit(&pod, DRIVER_SA, &[]).await;
        assert!(a.allowed(), "{}", a.message());
        let mut stored = a.apply(&pod);
        let ann = &stored["metadata"]["annotations"];
        assert_eq!(
            ann[STAMP_IDENTITY],
            format!(r#"{{"user":"{DRIVER_SA}","groups":[]}}"#)
        );
        assert_eq!(ann[STAMP_GRANTED], "[]");
        // ... a second pass is a no-op ...
        assert!(admit(&stored, DRIVER_SA, &[]).await.patch.is_none());
        // ... and its executors get nothing from the forgery.
        stored["metadata"]["uid"] = json!(DRIVER_UID);
        let a = admit_as(&with_owner(&stored), &executor(&[HR]), DRIVER_SA, &[]).await;
        assert!(!a.allowed());
        assert!(
            a.message().contains("was not granted it"),
            "{}",
            a.message()
        );
    }

    #[tokio::test]
    async fn direct_references_to_managed_stores_are_denied() {
        let cases = [
            (
                json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-hr", "key": "salary_db"}}}),
                Value::Null,
                Value::Null,
                "containers[0].env[X] names key \"salary_db\" of Secret \"iomete-secret-store-hr\"",
            ),
            (
                Value::Null,
                json!({"secretRef": {"name": "iomete-secret-store-finance"}}),
                Value::Null,
                "containers[0].envFrom[0] names Secret \"iomete-secret-store-finance\"",
            ),
            (
                Value::Null,
                Value::Null,
                json!({"name": "v", "secret": {"secretName": "iomete-vault-vault-prod-finance"}}),
                "volumes[v].secret.secretName names Secret \"iomete-vault-vault-prod-finance\"",
            ),
            (
                Value::Null,
                Value::Null,
                json!({"name": "p", "projected": {"sources": [{"secret": {"name": "iomete-secret-store-hr"}}]}}),
                "volumes[p].projected.sources[0].secret names Secret \"iomete-secret-store-hr\"",
            ),
        ];
        for (env, env_from, volume, want) in cases {
            // No annotations at all, and a plain (non-Spark) pod: the guard still runs.
            for mut pod in [fixture("spark35-driver-submit.json"), plain_pod()] {
                let c = &mut pod["spec"]["containers"][0];
                if !env.is_null() {
                    c["env"] = json!([env.clone()]);
                }
                if !env_from.is_null() {
                    c["envFrom"] = json!([env_from.clone()]);
                }
                if !volume.is_null() {
                    pod["spec"]["volumes"] = json!([volume.clone()]);
                }
                let a = admit(&pod, "alice", &[]).await;
                assert!(!a.allowed(), "{want}");
                assert!(a.message().starts_with(want), "{}", a.message());
                assert!(
                    a.message()
                        .contains("so that the Use permission is checked")
                );
            }
        }
        // Alice's own, planned reference passes (and a second pass too).
        let pod = driver(&[FINANCE]);
        let a = admit(&pod, "alice", &[]).await;
        let again = admit(&a.apply(&pod), "alice", &[]).await;
        assert!(
            again.allowed() && again.patch.is_none(),
            "{}",
            again.message()
        );
        // Bob copying alice's admitted pod spec is stopped by the Use check, not let through.
        let copied = a.apply(&pod);
        let b = admit(&copied, "bob", &[]).await;
        assert!(!b.allowed());
    }

    /// A pod's direct reference is exempt only when it is exactly a reference the plan made for
    /// this pod: the same Secret and the same key. The same key name in another domain's store or
    /// in a Vault-managed Secret is not (no OpenBao needed: the guard runs before any Vault use).
    #[tokio::test]
    async fn the_guard_exempts_the_planned_secret_not_a_key_of_the_same_name() {
        for (secret, want) in [
            (
                "iomete-secret-store-hr",
                "containers[0].env[STOLEN] names key \"db_password\" of Secret \"iomete-secret-store-hr\"",
            ),
            (
                "iomete-vault-vault-prod-finance",
                "containers[0].env[STOLEN] names key \"db_password\" of Secret \"iomete-vault-vault-prod-finance\"",
            ),
        ] {
            let mut pod = driver(&[FINANCE]);
            let env = pod["spec"]["containers"][0]["env"].as_array_mut().unwrap();
            env.push(json!({"name": "STOLEN",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "db_password"}}}));
            let a = admit(&pod, "alice", &["data-eng"]).await;
            assert!(
                !a.allowed(),
                "{secret}: a direct reference rode on the planned key name"
            );
            assert_eq!(
                a.message(),
                format!(
                    "{want}, a store managed by secrets-webhook; reference secrets with the \
                     secrets.iomete.com annotations instead, so that the Use permission is checked"
                )
            );
            // Also for a user who holds Use on both domains: the guard does not ask the authorizer.
            let a = admit(&pod, "harriet", &["data-eng"]).await;
            assert!(!a.allowed(), "{secret}: {}", a.message());
        }
    }

    /// `enabled: false` (the product's feature switch) leaves pods untouched, but the guard still
    /// runs: a direct reference to a managed store is denied, on any pod.
    #[tokio::test]
    async fn the_guard_runs_with_the_feature_switched_off() {
        let config = LocalConfig::parse(CONFIG).unwrap();
        let off = Settings {
            enabled: false,
            ..Settings::default()
        };
        let webhook = Webhook::from_local(off, &config, Arc::new(Metrics::new())).unwrap();
        // References are not served: the pod passes untouched.
        let a = admit_as(&webhook, &driver(&[FINANCE]), "alice", &[]).await;
        assert!(a.allowed() && a.patch.is_none(), "{}", a.message());
        let stolen = json!({"name": "STOLEN",
            "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-hr", "key": "salary_db"}}});
        for mut pod in [driver(&[]), driver(&[FINANCE]), executor(&[]), plain_pod()] {
            let c = &mut pod["spec"]["containers"][0];
            if c["env"].is_null() {
                c["env"] = json!([]);
            }
            c["env"].as_array_mut().unwrap().push(stolen.clone());
            let a = admit_as(&webhook, &pod, "alice", &[]).await;
            assert!(!a.allowed(), "the guard did not run with the feature off");
            assert!(
                a.message().starts_with(
                    "containers[0].env[STOLEN] names key \"salary_db\" of Secret \"iomete-secret-store-hr\""
                ),
                "{}",
                a.message()
            );
        }
        let mut volume = plain_pod();
        volume["spec"]["volumes"] =
            json!([{"name": "v", "secret": {"secretName": "iomete-vault-vault-prod-finance"}}]);
        let a = admit_as(&webhook, &volume, "alice", &[]).await;
        assert!(!a.allowed(), "{}", a.message());
        // The global store stays exempt.
        let mut global = plain_pod();
        global["spec"]["containers"][0]["envFrom"] =
            json!([{"secretRef": {"name": "iomete-secret-store"}}]);
        let a = admit_as(&webhook, &global, "alice", &[]).await;
        assert!(a.allowed(), "{}", a.message());
    }

    /// SubjectAccessReview mode through the engine: RBAC's allowed, its plain `{"allowed": false}`
    /// (no `denied` field) and an `evaluationError` each give the answer and the text they should.
    #[tokio::test]
    async fn sar_mode_allows_denies_and_reports_evaluation_errors() {
        let api = FakeApiServer::start().await;
        api.set_sar_responder(|body| match body["spec"]["user"].as_str() {
            Some("alice") => SarAnswer::Allow,
            Some("bob") => SarAnswer::Deny(String::new()),
            _ => SarAnswer::EvaluationError(
                "Post \"https://authz.example:8443/authorize\": connection refused".into(),
            ),
        });
        let mut webhook = webhook();
        webhook.authz = in_cluster(
            AuthorizerKind::Rbac,
            api.client(),
            NS,
            CacheSettings::default(),
            webhook.metrics.clone(),
        );
        // Nothing to list first: ready at once.
        assert!(webhook.ready());
        let pod = driver(&[FINANCE]);
        let a = admit_as(&webhook, &pod, "alice", &[]).await;
        assert!(a.allowed() && a.patch.is_some(), "{}", a.message());
        let rbac =
            "annotation env.secrets.iomete.com/DB_PASSWORD: kubernetes:finance/db_password: user";
        let a = admit_as(&webhook, &pod, "bob", &[]).await;
        assert!(!a.allowed(), "RBAC's {{\"allowed\": false}} admitted bob");
        let bob = a.message();
        assert_eq!(
            bob,
            format!(
                "{rbac} \"bob\" lacks Use on domain \"finance\" (Kubernetes RBAC: verb \"use\" on \
                 domains.secrets.iomete.com \"finance\" in namespace \"iomete-system\"); a platform admin \
                 can grant it with a Role and RoleBinding"
            )
        );
        let a = admit_as(&webhook, &pod, "erin", &[]).await;
        assert!(!a.allowed(), "an evaluation error admitted erin");
        // The evaluation error (an authorizer that failed) is logged for admins, not shown.
        assert_eq!(a.message(), bob.replace("\"bob\"", "\"erin\""));
        let text = webhook.metrics.encode();
        assert_eq!(
            metrics::backend(&text, "subject-access-review", "allow"),
            1.0,
            "{text}"
        );
        assert_eq!(
            metrics::backend(&text, "subject-access-review", "deny"),
            2.0,
            "{text}"
        );
        assert!(
            metrics::absent(
                &text,
                &metrics::backend_series("subject-access-review", "error")
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn global_secrets_are_allowed_for_everyone() {
        for user in ["alice", "bob", "nobody"] {
            let a = admit(&driver(&[GLOBAL]), user, &[]).await;
            assert!(a.allowed(), "{user}: {}", a.message());
            assert!(a.patch.is_some());
        }
    }

    /// The matrix again, as the API server sends it: HTTPS (rustls) to the real server on
    /// 127.0.0.1:0, `POST /mutate?timeout=10s`.
    #[tokio::test]
    async fn the_matrix_holds_through_the_real_tls_server() {
        use super::support::tls::{CertDir, Pki, https_client, init};
        use secrets_webhook::server::{ServerOptions, bind};

        init();
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new("authz matrix CA");
        let pair = pki.serving_pair();
        let dir = CertDir::new(tmp.path(), &pair.chain_pem, &pair.key_pem);
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let options = ServerOptions::new(loopback, loopback, dir.cert(), dir.key());
        let stored = admitted_driver(&[FINANCE]).await;
        let bound = bind(options, Arc::new(with_owner(&stored))).await.unwrap();
        let url = format!(
            "https://localhost:{}/mutate?timeout=10s",
            bound.addr().port()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        let client = https_client(&pki.ca_pem());

        let hub_for = |user: &str| {
            with(
                with(fixture("jupyterhub-singleuser-z2jh.json"), &[FINANCE]),
                &[("hub.jupyter.org/username", user)],
            )
        };
        let mut direct = plain_pod();
        direct["spec"]["containers"][0]["envFrom"] =
            json!([{"secretRef": {"name": "iomete-secret-store-finance"}}]);
        let forged_stamps = driver(&[FINANCE, (STAMP_GRANTED, r#"["kubernetes:hr/salary_db"]"#)]);
        // (pod, user, groups, allowed, a piece of the answer's JSON text)
        let cases: Vec<(Value, &str, &[&str], bool, &str)> = vec![
            (driver(&[FINANCE]), "alice", &[], true, r#""patch""#),
            (
                driver(&[FINANCE]),
                "carol",
                &["data-eng"],
                true,
                r#""patch""#,
            ),
            (
                driver(&[FINANCE]),
                "bob",
                &[],
                false,
                r#"user \"bob\" lacks Use on domain \"finance\""#,
            ),
            (
                driver(&[FINANCE, ("secrets.iomete.com/run-as", "alice")]),
                "bob",
                &[],
                false,
                r#"user \"bob\" lacks Use"#,
            ),
            (hub_for("alice"), HUB, &[], true, "trusted-controller"),
            (
                hub_for("mallory"),
                HUB,
                &[],
                false,
                r#"user \"mallory\" lacks Use"#,
            ),
            (executor(&[FINANCE]), DRIVER_SA, &[], true, "spark-driver"),
            (
                executor(&[FINANCE, HR]),
                DRIVER_SA,
                &[],
                false,
                "was not granted it",
            ),
            (
                executor(&[FINANCE]),
                "system:serviceaccount:iomete-system:other",
                &[],
                false,
                "executors must be created by their driver's service account",
            ),
            (forged_stamps, "alice", &[], true, r#""patch""#),
            (
                direct,
                "alice",
                &[],
                false,
                "a store managed by secrets-webhook",
            ),
            (driver(&[GLOBAL]), "nobody", &[], true, r#""patch""#),
        ];
        for (pod, user, groups, allowed, needle) in cases {
            let extra = if user == DRIVER_SA {
                bound_to_driver(DRIVER_UID)
            } else {
                json!({})
            };
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(review(&pod, user, groups, extra))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let text = response.text().await.unwrap();
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["response"]["allowed"], allowed, "{user}: {text}");
            assert!(text.contains(needle), "{user}: {needle} not in {text}");
            if body["response"]["patch"].is_string() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(body["response"]["patch"].as_str().unwrap())
                    .unwrap();
                let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
                let answer = Answer {
                    response: body["response"].clone(),
                    patch: Some(patch),
                };
                let mutated = answer.apply(&pod);
                // Whatever the client sent, the stamps are the webhook's.
                let granted = &mutated["metadata"]["annotations"][STAMP_GRANTED];
                assert!(
                    !granted.as_str().unwrap().contains("hr/salary_db"),
                    "{granted}"
                );
            }
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    /// SubjectAccessReview mode and the owner lookup through the real client, under a burst.
    #[tokio::test]
    async fn a_burst_of_200_executors_costs_one_sar_and_one_driver_get() {
        let api = FakeApiServer::start().await;
        api.set_sar_responder(|body| {
            let attrs = &body["spec"]["resourceAttributes"];
            if body["spec"]["user"] == "alice"
                && attrs["resource"] == "domains"
                && attrs["name"] == "finance"
            {
                SarAnswer::Allow
            } else {
                SarAnswer::Deny("no RBAC policy matched".into())
            }
        });
        let mut admitted = admitted_driver(&[FINANCE]).await;
        admitted["metadata"].as_object_mut().unwrap().remove("uid");
        let stored = api.put(admitted);
        let mut exec = executor(&[FINANCE]);
        exec["metadata"]["ownerReferences"][0]["uid"] = stored["metadata"]["uid"].clone();

        let mut webhook = webhook();
        webhook.authz = in_cluster(
            AuthorizerKind::Rbac,
            api.client(),
            NS,
            CacheSettings::default(),
            webhook.metrics.clone(),
        );
        webhook.owners = Arc::new(KubeOwnerLookup::counted(
            api.client(),
            KubeOwnerLookup::DEFAULT_TTL,
            webhook.metrics.clone(),
        ));
        let webhook = Arc::new(webhook);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (webhook, exec) = (webhook.clone(), exec.clone());
                let extra = bound_to_driver(
                    exec["metadata"]["ownerReferences"][0]["uid"]
                        .as_str()
                        .unwrap(),
                );
                tokio::spawn(
                    async move { admit_with(&webhook, &exec, DRIVER_SA, &[], extra).await },
                )
            })
            .collect();
        for t in tasks {
            let a = t.await.unwrap();
            assert!(a.allowed(), "{}", a.message());
        }
        assert_eq!(
            api.count("GET", &format!("/api/v1/namespaces/{NS}/pods/{DRIVER}")),
            1
        );
        assert_eq!(api.sar_requests().len(), 1);
        let sar = &api.sar_requests()[0];
        assert_eq!(sar["spec"]["user"], "alice");
        assert_eq!(sar["spec"]["groups"], json!(["data-eng"]));
        // 200 lookups each: one GET and one SAR, every other lookup joined them or hit the cache.
        let text = webhook.metrics.encode();
        assert_eq!(
            metrics::backend(&text, "kubernetes", "found"),
            1.0,
            "{text}"
        );
        assert_eq!(
            metrics::backend(&text, "subject-access-review", "allow"),
            1.0,
            "{text}"
        );
        for cache in ["owner-pods", "authz-decisions"] {
            // Every caller may have joined the one call (all misses, no hit series at all).
            let (hits, misses) = (
                metrics::value_or_zero(&text, &metrics::cache_series(cache, "hit")),
                metrics::cache(&text, cache, "miss"),
            );
            assert!(misses >= 1.0 && hits + misses == 200.0, "{cache}: {text}");
        }

        // Denied and unreachable, in SAR mode, through the engine.
        let a = admit_as(&webhook, &driver(&[FINANCE]), "bob", &[]).await;
        assert!(!a.allowed());
        assert!(
            a.message().contains(
                "(Kubernetes RBAC: verb \"use\" on domains.secrets.iomete.com \"finance\""
            ),
            "{}",
            a.message()
        );
        api.set_sar_responder(|_| SarAnswer::Error(500));
        let a = admit_as(&webhook, &driver(&[FINANCE]), "dave", &[]).await;
        assert!(!a.allowed());
        assert!(
            a.message().contains("authorizer unreachable: "),
            "{}",
            a.message()
        );
        assert!(a.message().contains("(failing closed)"), "{}", a.message());
        let text = webhook.metrics.encode();
        assert_eq!(
            metrics::backend(&text, "subject-access-review", "deny"),
            1.0,
            "{text}"
        );
        assert_eq!(
            metrics::backend(&text, "subject-access-review", "error"),
            1.0,
            "{text}"
        );
    }
}
