use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;
use crate::refs::Source;

const DRIVER: &str = "spark-pi-143984a22158e5b5-driver";
const DRIVER_UID: &str = "08082eb2-d2d1-43f3-bd01-8ca76964fc04";

fn fixture(name: &str) -> Pod {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
    let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        username: Some(name.into()),
        groups: Some(groups.iter().map(|g| g.to_string()).collect()),
        uid: Some("uid-1".into()),
        extra: None,
    }
}

fn trusted() -> TrustedControllers {
    let entries: Vec<TrustedController> = serde_yaml::from_str(
        r#"
- {username: "system:serviceaccount:jhub:hub", userAnnotation: hub.jupyter.org/username}
- {group: "system:serviceaccounts:platform", groupsAnnotation: secrets.iomete.com/run-as-groups}
"#,
    )
    .unwrap();
    TrustedControllers::new(entries).unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn keys() -> Arc<Keys> {
    Keys::fixed(KeyRing::new(b"identity-tests-key-0123456789abcdef012345", None).unwrap())
}

use std::sync::Arc;

fn secret(kind: SourceType, id: &str, key: &str) -> SecretObject {
    SecretObject {
        key: key.into(),
        source: Source {
            kind,
            id: id.into(),
        },
    }
}

/// The Spark fixture driver as the webhook admitted it: uid set, signed stamps on.
fn admitted_driver(granted: &[SecretObject], keys: &Keys) -> Pod {
    let mut pod = fixture("spark35-driver-submit.json");
    let alice = Identity::new("alice", vec!["data-eng".to_string()]);
    let stamps = stamps::stamp_annotations(
        &alice,
        granted,
        &stamps::Subject::of_new_pod(&pod, "default"),
        &keys.get().unwrap(),
    );
    pod.metadata.uid = Some(DRIVER_UID.into());
    pod.metadata
        .annotations
        .get_or_insert_default()
        .extend(stamps);
    pod
}

fn finance_db() -> SecretObject {
    secret(SourceType::Kubernetes, "finance", "db_password")
}

async fn resolve_as(
    req: &UserInfo,
    pod: &Pod,
    namespace: &str,
    is_executor: bool,
    driver: Option<Pod>,
    keys: &Keys,
    executors: ExecutorPolicy,
) -> Result<Resolved, IdentityError> {
    let owners = StaticOwner::new(driver);
    let trusted = trusted();
    let resolver = Resolver {
        trusted: &trusted,
        owners: &owners,
        keys,
        executors,
    };
    resolver
        .resolve(req, pod, namespace, is_executor, soon())
        .await
}

async fn resolve(req: &UserInfo, pod: &Pod, namespace: &str) -> Result<Resolved, IdentityError> {
    resolve_as(
        req,
        pod,
        namespace,
        false,
        None,
        &keys(),
        ExecutorPolicy::default(),
    )
    .await
}

async fn resolve_exec(
    req: &UserInfo,
    executor: &Pod,
    driver: Option<Pod>,
    keys: &Keys,
) -> Result<Resolved, IdentityError> {
    resolve_as(
        req,
        executor,
        "default",
        true,
        driver,
        keys,
        ExecutorPolicy::default(),
    )
    .await
}

/// The driver's service account with a token bound to the driver pod.
fn driver_sa() -> UserInfo {
    let mut sa = user(
        "system:serviceaccount:default:spark",
        &["system:serviceaccounts"],
    );
    sa.extra = Some(BTreeMap::from([
        (EXTRA_POD_NAME.to_string(), vec![DRIVER.to_string()]),
        (EXTRA_POD_UID.to_string(), vec![DRIVER_UID.to_string()]),
    ]));
    sa
}

#[test]
fn config_needs_exactly_one_requester() {
    let both = TrustedController {
        username: Some("a".into()),
        group: Some("b".into()),
        user_annotation: RUN_AS.into(),
        groups_annotation: None,
    };
    assert_eq!(
        TrustedControllers::new(vec![both]),
        Err(TrustedConfigError::Requester(0))
    );
    let none: TrustedController = serde_yaml::from_str("{}").unwrap();
    assert!(TrustedControllers::new(vec![none]).is_err());
}

#[tokio::test]
async fn plain_requester_is_the_identity_with_uid_and_extra() {
    let mut bob = user("bob", &["eng", "eng", "a"]);
    bob.extra = Some(BTreeMap::from([("scopes".into(), vec!["x".into()])]));
    let pod = fixture("spark35-driver-submit.json");
    let r = resolve(&bob, &pod, "default").await.unwrap();
    assert_eq!(r.identity.username, "bob");
    assert_eq!(r.identity.groups, vec!["a", "eng"]);
    assert_eq!(r.identity.uid.as_deref(), Some("uid-1"));
    assert_eq!(r.identity.extra["scopes"], vec!["x"]);
    assert_eq!(r.via, Via::Requester);
    assert!(r.warnings.is_empty());
}

#[tokio::test]
async fn run_as_from_an_untrusted_requester_is_ignored_with_a_warning() {
    let mut pod = fixture("jupyterhub-singleuser-z2jh.json");
    let annotations = pod.metadata.annotations.get_or_insert_default();
    annotations.insert(RUN_AS.into(), "alice".into());
    annotations.insert(RUN_AS_GROUPS.into(), "finance".into());
    let r = resolve(&user("mallory", &[]), &pod, "jhub").await.unwrap();
    assert_eq!(r.identity.username, "mallory");
    assert_eq!(
        r.warnings,
        vec![
            "annotation hub.jupyter.org/username ignored: \"mallory\" is not a trusted controller; admitted as \"mallory\"",
            "annotation secrets.iomete.com/run-as ignored: \"mallory\" is not a trusted controller; admitted as \"mallory\"",
            "annotation secrets.iomete.com/run-as-groups ignored: \"mallory\" is not a trusted controller; admitted as \"mallory\"",
        ]
    );
    assert!(r.warnings.iter().all(|w| w.len() <= MAX_WARNING));
}

#[tokio::test]
async fn trusted_hub_submits_for_the_annotated_user() {
    let pod = fixture("jupyterhub-singleuser-z2jh.json");
    let hub = user(
        "system:serviceaccount:jhub:hub",
        &["system:serviceaccounts"],
    );
    let r = resolve(&hub, &pod, "jhub").await.unwrap();
    assert_eq!(r.identity, Identity::new("alice", Vec::new()));
    assert_eq!(
        r.via,
        Via::TrustedController {
            controller: "system:serviceaccount:jhub:hub".into(),
            annotation: "hub.jupyter.org/username".into()
        }
    );
}

#[tokio::test]
async fn trusted_group_member_uses_run_as_and_groups_annotation() {
    let mut pod = fixture("spark35-driver-submit.json");
    pod.metadata.annotations = Some(BTreeMap::from([
        (RUN_AS.to_string(), "alice".to_string()),
        (RUN_AS_GROUPS.to_string(), "finance, data-eng".to_string()),
    ]));
    let cp = user(
        "system:serviceaccount:platform:cp",
        &["system:serviceaccounts:platform"],
    );
    let r = resolve(&cp, &pod, "default").await.unwrap();
    assert_eq!(
        r.identity,
        Identity::new("alice", vec!["data-eng".into(), "finance".into()])
    );
    // The hub is trusted for hub.jupyter.org/username only, not for run-as.
    let hub = user("system:serviceaccount:jhub:hub", &[]);
    let r = resolve(&hub, &pod, "default").await.unwrap();
    assert_eq!(r.identity.username, "system:serviceaccount:jhub:hub");
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
}

#[tokio::test]
async fn trusted_controller_with_empty_user_is_denied() {
    let mut pod = fixture("jupyterhub-singleuser-z2jh.json");
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert("hub.jupyter.org/username".into(), " ".into());
    let hub = user("system:serviceaccount:jhub:hub", &[]);
    let e = resolve(&hub, &pod, "jhub").await.unwrap_err();
    assert!(matches!(e, IdentityError::EmptyOnBehalf { .. }));
}

#[tokio::test]
async fn executor_inherits_its_drivers_stamps() {
    let keys = keys();
    let executor = fixture("spark35-executor-submit.json");
    let r = resolve_exec(
        &driver_sa(),
        &executor,
        Some(admitted_driver(&[finance_db()], &keys)),
        &keys,
    )
    .await
    .unwrap();
    assert_eq!(r.identity, Identity::new("alice", vec!["data-eng".into()]));
    assert_eq!(
        r.inherited,
        Some(BTreeSet::from([
            "kubernetes:finance/db_password".to_string()
        ]))
    );
    let naming = Naming::default();
    assert!(r.may_inherit(&finance_db(), &naming).is_ok());
    assert!(
        r.may_inherit(&secret(SourceType::Kubernetes, "global", "x"), &naming)
            .is_ok()
    );
    // Only the global store is free: another domain's store, or a Vault config that happens to be
    // called `global`, needs the driver's grant like any other reference.
    for other in [
        secret(SourceType::Kubernetes, "marketing", "x"),
        secret(SourceType::Vault, "global", "x"),
    ] {
        assert!(r.may_inherit(&other, &naming).is_err(), "{other}");
    }
    let more = secret(SourceType::Vault, "vault-prod-finance", "s3_secret");
    assert_eq!(
        r.may_inherit(&more, &naming).unwrap_err().to_string(),
        "executor may not use vault:vault-prod-finance/s3_secret: its Spark driver \
         \"spark-pi-143984a22158e5b5-driver\" was not granted it; add the reference to the \
         driver pod (spark.kubernetes.driver.annotation.*) and resubmit"
    );
}

#[tokio::test]
async fn executor_rules_deny_with_clear_messages() {
    let keys = keys();
    let executor = fixture("spark35-executor-submit.json");
    let driver = || Some(admitted_driver(&[finance_db()], &keys));

    // Driver missing.
    let e = resolve_exec(&driver_sa(), &executor, None, &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::OwnerLookup { .. }), "{e}");
    let mut other = admitted_driver(&[], &keys);
    other.metadata.name = Some("someone-else".into());
    let e = resolve_exec(&driver_sa(), &executor, Some(other), &keys)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor's owner pod \"spark-pi-143984a22158e5b5-driver\" not found in namespace \
         \"default\"; executors must be created by their Spark driver"
    );

    // Not created by the driver's service account.
    let e = resolve_exec(&user("bob", &[]), &executor, driver(), &keys)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor was created by \"bob\", but its driver \"spark-pi-143984a22158e5b5-driver\" \
         runs as \"system:serviceaccount:default:spark\"; executors must be created by their \
         driver's service account"
    );

    // Bound token of another pod, by name or by uid.
    let mut sa = driver_sa();
    sa.extra
        .as_mut()
        .unwrap()
        .insert(EXTRA_POD_NAME.to_string(), vec!["other-driver".to_string()]);
    let e = resolve_exec(&sa, &executor, driver(), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::NotDriverPod { .. }), "{e}");
    let mut sa = driver_sa();
    sa.extra
        .as_mut()
        .unwrap()
        .insert(EXTRA_POD_UID.to_string(), vec!["other-uid".to_string()]);
    let e = resolve_exec(&sa, &executor, driver(), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::NotDriverPod { .. }), "{e}");
    // ... and of the driver itself.
    assert!(
        resolve_exec(&driver_sa(), &executor, driver(), &keys)
            .await
            .is_ok()
    );

    // Owner is not a driver.
    let mut not_driver = admitted_driver(&[], &keys);
    not_driver
        .metadata
        .labels
        .get_or_insert_default()
        .insert("spark-role".into(), "executor".into());
    let e = resolve_exec(&driver_sa(), &executor, Some(not_driver), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::NotADriver { .. }), "{e}");

    // Owner is another application's driver.
    let mut other_app = admitted_driver(&[], &keys);
    other_app
        .metadata
        .labels
        .get_or_insert_default()
        .insert("spark-app-selector".into(), "spark-other".into());
    let e = resolve_exec(&driver_sa(), &executor, Some(other_app), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::OtherApplication { .. }), "{e}");

    // An executor that drops the application label does not skip the comparison.
    let mut unlabelled = executor.clone();
    unlabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove("spark-app-selector");
    let e = resolve_exec(&driver_sa(), &unlabelled, driver(), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::OtherApplication { .. }), "{e}");

    // Replaced driver (uid differs).
    let mut replaced = admitted_driver(&[], &keys);
    replaced.metadata.uid = Some("new-uid".into());
    let e = resolve_exec(&driver_sa(), &executor, Some(replaced), &keys)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::OwnerUid { .. }), "{e}");

    // Driver without stamps.
    let mut unstamped = admitted_driver(&[], &keys);
    unstamped.metadata.annotations = None;
    let e = resolve_exec(&driver_sa(), &executor, Some(unstamped), &keys)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor's driver \"spark-pi-143984a22158e5b5-driver\": its stamps are missing \
         (secrets.iomete.com/identity): it was not admitted with secret references by this \
         webhook, so its executors may use none"
    );

    // No controller owner.
    let mut orphan = executor.clone();
    orphan.metadata.owner_references = Some(vec![OwnerReference {
        controller: Some(false),
        ..OwnerReference::default()
    }]);
    let e = resolve_exec(&driver_sa(), &orphan, driver(), &keys)
        .await
        .unwrap_err();
    assert_eq!(e, IdentityError::NoOwner);

    // A controller owner that is not a core/v1 Pod, even with the driver's name and uid: both the
    // kind and the API version must match.
    for (api_version, kind) in [("v1", "ReplicaSet"), ("apps/v1", "Pod")] {
        let mut foreign = executor.clone();
        for owner in foreign.metadata.owner_references.iter_mut().flatten() {
            owner.api_version = api_version.into();
            owner.kind = kind.into();
        }
        let e = resolve_exec(&driver_sa(), &foreign, driver(), &keys)
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::OwnerNotPod { .. }), "{e}");
    }
}

/// Attack: `kubectl create token <driver SA>` stands in for any driver of that account.
#[tokio::test]
async fn executors_need_a_token_bound_to_their_driver() {
    let keys = keys();
    let executor = fixture("spark35-executor-submit.json");
    let driver = || Some(admitted_driver(&[finance_db()], &keys));
    let mut unbound = driver_sa();
    unbound.extra = None;
    let e = resolve_exec(&unbound, &executor, driver(), &keys)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "executor was created with a service-account token that is not bound to a pod (no \
         pod-name and pod-uid extras in the request); executors must be created by their driver \
         \"spark-pi-143984a22158e5b5-driver\" with its own mounted token, not a token from \
         `kubectl create token`"
    );
    // Half-bound is not bound: both extras are needed.
    for (present, missing) in [
        (EXTRA_POD_NAME, "pod-uid extra"),
        (EXTRA_POD_UID, "pod-name extra"),
    ] {
        let mut half = driver_sa();
        half.extra.as_mut().unwrap().retain(|k, _| k == present);
        let e = resolve_exec(&half, &executor, driver(), &keys)
            .await
            .unwrap_err();
        assert_eq!(
            e,
            IdentityError::UnboundToken {
                driver: DRIVER.into(),
                missing
            }
        );
    }
    // Relaxed by configuration: unbound tokens pass, a token bound elsewhere still does not.
    let relaxed = ExecutorPolicy {
        require_bound_token: false,
    };
    let exec = |who: UserInfo| {
        let keys = keys.clone();
        let executor = executor.clone();
        let driver = driver();
        async move { resolve_as(&who, &executor, "default", true, driver, &keys, relaxed).await }
    };
    assert!(exec(unbound.clone()).await.is_ok());
    let mut elsewhere = driver_sa();
    elsewhere
        .extra
        .as_mut()
        .unwrap()
        .insert(EXTRA_POD_NAME.to_string(), vec!["x".to_string()]);
    assert!(matches!(
        exec(elsewhere).await,
        Err(IdentityError::NotDriverPod { .. })
    ));
}

/// Attack: `kubectl annotate` a driver with identity and grants; its executors inherit them.
#[tokio::test]
async fn forged_or_edited_driver_stamps_give_executors_nothing() {
    let keys = keys();
    let executor = fixture("spark35-executor-submit.json");

    // Stamps added by hand (no signature, or a made-up one).
    let mut forged = fixture("spark35-driver-submit.json");
    forged.metadata.uid = Some(DRIVER_UID.into());
    forged.metadata.annotations = Some(BTreeMap::from([
        (
            stamps::STAMP_IDENTITY.to_string(),
            r#"{"user":"alice","groups":["data-eng"]}"#.to_string(),
        ),
        (
            stamps::STAMP_GRANTED.to_string(),
            r#"["kubernetes:finance/db_password"]"#.to_string(),
        ),
    ]));
    let e = resolve_exec(&driver_sa(), &executor, Some(forged.clone()), &keys)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            IdentityError::Stamps {
                reason: StampError::Missing(stamps::STAMP_SIGNATURE),
                ..
            }
        ),
        "{e}"
    );
    forged.metadata.annotations.as_mut().unwrap().insert(
        stamps::STAMP_SIGNATURE.to_string(),
        "v1.n.0123456789abcdef.AAAA".to_string(),
    );
    let e = resolve_exec(&driver_sa(), &executor, Some(forged), &keys)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("key id 0123456789abcdef"), "{e}");

    // Real stamps with more grants edited in.
    let mut edited = admitted_driver(&[], &keys);
    edited.metadata.annotations.as_mut().unwrap().insert(
        stamps::STAMP_GRANTED.to_string(),
        r#"["kubernetes:finance/db_password"]"#.to_string(),
    );
    let e = resolve_exec(&driver_sa(), &executor, Some(edited), &keys)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("do not verify: its signature does not match"),
        "{e}"
    );

    // Genuine stamps made with a key the webhook no longer holds.
    let other =
        Keys::fixed(KeyRing::new(b"an-old-key-that-was-rotated-out-0123456", None).unwrap());
    let e = resolve_exec(
        &driver_sa(),
        &executor,
        Some(admitted_driver(&[finance_db()], &other)),
        &keys,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("rotated out"), "{e}");

    // No key loaded at all: fail closed.
    let e = resolve_exec(
        &driver_sa(),
        &executor,
        Some(admitted_driver(&[finance_db()], &keys)),
        &Keys::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, IdentityError::NoSigningKey { .. }), "{e}");
}

#[test]
fn audit_annotations_name_identity_and_decision() {
    let r = Resolved {
        identity: Identity::new("alice", Vec::new()),
        via: Via::SparkDriver {
            driver: "d".into(),
            uid: "u".into(),
        },
        inherited: None,
        warnings: Vec::new(),
    };
    let a = audit_annotations(Some(&r), "allowed");
    assert_eq!(a["identity"], r#"{"user":"alice","groups":[]}"#);
    assert_eq!(a["identity-source"], "spark-driver d");
    assert_eq!(a["decision"], "allowed");
}

#[test]
fn long_warnings_are_cut() {
    let w = short("é".repeat(100));
    assert!(w.len() <= MAX_WARNING && w.ends_with("..."));
    // As long as the limit allows: at the limit a warning is whole, one byte over it is cut to
    // the limit (the ellipsis included).
    let exact = "w".repeat(MAX_WARNING);
    assert_eq!(short(exact.clone()), exact);
    let cut = short("w".repeat(MAX_WARNING + 1));
    assert_eq!(cut.len(), MAX_WARNING);
    assert_eq!(cut, format!("{}...", "w".repeat(MAX_WARNING - 3)));
}
