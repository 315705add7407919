//! Authorization and identity through the real `kube::Client` against the fake API server:
//! SubjectAccessReview mode (request body, allow, deny, errors, coalescing), ResourceBundle CRDs
//! watched in-cluster, and the executor's owner-pod lookup (one GET for a burst).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::Pod;
use secrets_webhook::admission::identity::{
    self, IdentityError, KubeOwnerLookup, OwnerLookup, TrustedControllers, Via,
};
use secrets_webhook::authz::cache::{CacheSettings, CachedAuthorizer};
use secrets_webhook::authz::ras::{
    Grant, Permission, RasAuthorizer, ResourceBundle, ResourceBundleSpec, Subject, SubjectKind,
};
use secrets_webhook::authz::sar::SarAuthorizer;
use secrets_webhook::authz::{Authorizer, Decision, Identity, Resource};
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
        bundle: "finance-bundle".into(),
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

#[tokio::test]
async fn sar_denial_names_user_permission_resource_and_reason() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(rbac_like);
    let sar = SarAuthorizer::new(api.client(), "iomete-system");
    let bob = Identity::new("bob", Vec::new());
    let Decision::Deny(text) = sar.check_use(&bob, &vault_prod(), soon()).await else {
        panic!("bob must be denied")
    };
    assert_eq!(
        text,
        "user \"bob\" lacks Use on vault config \"vault-prod-finance\" (Kubernetes RBAC: verb \
         \"use\" on vaultconfigs.secrets.iomete.com \"vault-prod-finance\" in namespace \
         \"iomete-system\"; reason: no RBAC policy matched); a platform admin can grant it with a \
         Role and RoleBinding"
    );
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

fn bundle(name: &str, domains: &[&str], users: &[&str]) -> ResourceBundle {
    let mut rb = ResourceBundle::new(
        name,
        ResourceBundleSpec {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            grants: vec![Grant {
                subjects: users
                    .iter()
                    .map(|u| Subject {
                        kind: SubjectKind::User,
                        name: u.to_string(),
                    })
                    .collect(),
                permissions: vec![Permission::Use],
            }],
        },
    );
    rb.metadata.namespace = Some("iomete-system".into());
    rb
}

#[tokio::test]
async fn resource_bundle_crds_are_watched() {
    let api = FakeApiServer::start().await;
    api.put_typed(&bundle("finance-bundle", &["finance"], &["alice"]));
    // A bundle in another namespace does not count.
    let mut elsewhere = bundle("finance-bundle", &["finance"], &["bob"]);
    elsewhere.metadata.namespace = Some("other".into());
    api.put_typed(&elsewhere);

    let ras = RasAuthorizer::in_cluster(api.client(), "iomete-system");
    let alice = Identity::new("alice", Vec::new());
    let bob = Identity::new("bob", Vec::new());
    let finance = Resource::Domain("finance".into());
    assert_eq!(
        ras.check_use(&alice, &finance, soon()).await,
        Decision::Allow
    );
    assert!(ras.ready());
    assert!(matches!(
        ras.check_use(&bob, &vault_prod(), soon()).await,
        Decision::Deny(t) if t.contains("(resource bundle \"finance-bundle\")")
    ));

    // Revoking alice and granting bob reaches the authorizer through the watch.
    api.put_typed(&bundle("finance-bundle", &["finance"], &["bob"]));
    let until = Instant::now() + Duration::from_secs(5);
    while ras.check_use(&bob, &finance, soon()).await != Decision::Allow {
        assert!(Instant::now() < until, "the update never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        ras.check_use(&alice, &finance, soon()).await,
        Decision::Deny(_)
    ));
    assert!(
        api.requests()
            .iter()
            .all(|r| r.path.contains("/namespaces/iomete-system/resourcebundles")),
        "watched outside the data-plane namespace"
    );
}

#[tokio::test]
async fn unloaded_bundles_fail_closed() {
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
    let wrapped = secrets_webhook::authz::in_cluster(
        secrets_webhook::authz::AuthorizerKind::Ras,
        api.client(),
        "iomete-system",
        CacheSettings::default(),
    );
    assert!(
        !wrapped.ready(),
        "/readyz must see that bundles are not loaded"
    );
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

/// Stores the fixture driver as the webhook admitted it (stamped) and returns the executor
/// fixture pointing at the stored driver's uid.
fn stored_driver_and_executor(api: &FakeApiServer) -> Pod {
    let mut driver = fixture("spark35-driver-submit.json");
    let alice = Identity::new("alice", vec!["data-eng".into()]);
    driver
        .metadata
        .annotations
        .get_or_insert_default()
        .extend(identity::stamp_annotations(&alice, [&finance_db()]));
    let stored = api.put_typed(&driver);
    let mut executor = fixture("spark35-executor-submit.json");
    let owners = executor.metadata.owner_references.as_mut().unwrap();
    owners[0].uid = stored["metadata"]["uid"].as_str().unwrap().to_string();
    executor
}

fn driver_sa() -> UserInfo {
    UserInfo {
        username: Some("system:serviceaccount:default:spark".into()),
        groups: Some(vec!["system:serviceaccounts".into()]),
        uid: None,
        extra: Some(BTreeMap::from([(
            identity::EXTRA_POD_NAME.to_string(),
            vec!["spark-pi-143984a22158e5b5-driver".to_string()],
        )])),
    }
}

#[tokio::test]
async fn two_hundred_executors_cost_one_pod_get() {
    let api = FakeApiServer::start().await;
    let executor = Arc::new(stored_driver_and_executor(&api));
    let owners: Arc<dyn OwnerLookup> = Arc::new(KubeOwnerLookup::new(
        api.client(),
        KubeOwnerLookup::DEFAULT_TTL,
    ));
    let trusted = Arc::new(TrustedControllers::default());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (executor, owners, trusted) = (executor.clone(), owners.clone(), trusted.clone());
            tokio::spawn(async move {
                identity::resolve(
                    &driver_sa(),
                    &executor,
                    "default",
                    true,
                    &trusted,
                    owners.as_ref(),
                    soon(),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.identity, Identity::new("alice", vec!["data-eng".into()]));
        assert_eq!(
            r.via,
            Via::SparkDriver {
                driver: "spark-pi-143984a22158e5b5-driver".into()
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
    let executor = stored_driver_and_executor(&api);
    let owners = KubeOwnerLookup::new(api.client(), KubeOwnerLookup::DEFAULT_TTL);
    let trusted = TrustedControllers::default();
    let driver_path = "/api/v1/namespaces/default/pods/spark-pi-143984a22158e5b5-driver";

    // API error: fail closed, and the error is not cached.
    api.inject(Fault::status("GET", driver_path, 500).times(1));
    let e = identity::resolve(
        &driver_sa(),
        &executor,
        "default",
        true,
        &trusted,
        &owners,
        soon(),
    )
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
    let e = identity::resolve(
        &driver_sa(),
        &executor,
        "default",
        true,
        &trusted,
        &owners,
        soon(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor's owner pod \"spark-pi-143984a22158e5b5-driver\" not found in namespace \
         \"default\"; executors must be created by their Spark driver"
    );
    assert_eq!(api.count("GET", driver_path), 2);
}
