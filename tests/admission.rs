//! The admission engine end to end through `Webhook::review_bytes` (the bytes the HTTPS server
//! hands it), on the real pod fixtures wrapped in AdmissionReviews, with the local config.

use std::sync::Arc;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use secrets_webhook::admission::Webhook;
use secrets_webhook::config::{LocalConfig, Settings};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};

const CONFIG: &str = r#"
namespace: iomete-system
stores:
  global: [warehouse_path, api_token]
  domains: {finance: [db_password, s3_secret_key], marketing: [ga_token]}
resourceBundles:
  - {name: alice-bundle, domains: [finance, hr, marketing],
     grants: [{subjects: [{kind: User, name: alice}], permissions: [use]}]}
signingKeys: {current: admission-tests-signing-key-0123456789abcdef}
"#;

fn webhook() -> Webhook {
    let config = LocalConfig::parse(CONFIG).unwrap();
    Webhook::from_local(Settings::default(), &config, Arc::new(Metrics::new())).unwrap()
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/pods/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut pod: Value = serde_json::from_str(&text).unwrap();
    pod["metadata"]["namespace"] = json!("iomete-system");
    pod
}

fn review(pod: &Value, user: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"], "operation": "CREATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": pod, "dryRun": false
        }
    })
}

struct Answer {
    response: Value,
    patch: Option<json_patch::Patch>,
}

impl Answer {
    fn allowed(&self) -> bool {
        self.response["allowed"] == json!(true)
    }
    fn message(&self) -> &str {
        self.response["status"]["message"]
            .as_str()
            .unwrap_or_default()
    }
    fn warnings(&self) -> Vec<String> {
        serde_json::from_value(self.response["warnings"].clone()).unwrap_or_default()
    }
}

async fn admit_bytes(body: &[u8]) -> Answer {
    let out = webhook().review_bytes(body, None).await;
    let answer: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    let patch = response["patch"].as_str().map(|b64| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    });
    Answer { response, patch }
}

async fn admit(pod: &Value) -> Answer {
    let answer = admit_bytes(&serde_json::to_vec(&review(pod, "alice")).unwrap()).await;
    assert_eq!(
        answer.response["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    answer
}

/// Applies the patch, checks the result is still a Pod, and that a second pass patches nothing.
async fn admit_and_apply(pod: &Value) -> (Value, Answer) {
    let answer = admit(pod).await;
    assert!(answer.allowed(), "denied: {}", answer.message());
    let mut mutated = pod.clone();
    json_patch::patch(&mut mutated, answer.patch.as_ref().expect("a patch")).unwrap();
    let _: Pod = serde_json::from_value(mutated.clone()).expect("still a Pod");
    let again = admit(&mutated).await;
    assert!(again.allowed(), "second pass denied: {}", again.message());
    assert!(
        again.patch.is_none(),
        "second pass patched: {:?}",
        again.patch
    );
    (mutated, answer)
}

fn annotate(pod: &mut Value, key: &str, value: &str) {
    if pod["metadata"]["annotations"].is_null() {
        pod["metadata"]["annotations"] = json!({});
    }
    pod["metadata"]["annotations"][key] = json!(value);
}

fn env(pod: &Value) -> Vec<Value> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn fixtures_without_references_pass_untouched() {
    for name in [
        "spark35-driver-submit.json",
        "spark35-executor-submit.json",
        "jupyterhub-singleuser-z2jh.json",
    ] {
        let answer = admit(&fixture(name)).await;
        assert!(answer.allowed(), "{name}: {}", answer.message());
        assert!(answer.patch.is_none(), "{name}");
    }
}

#[tokio::test]
async fn global_references_are_injected_into_every_workload_kind() {
    for name in [
        "spark35-driver-submit.json",
        "spark35-executor-submit.json",
        "jupyterhub-singleuser-z2jh.json",
    ] {
        let mut pod = fixture(name);
        annotate(
            &mut pod,
            "env.secrets.iomete.com/WAREHOUSE",
            "kubernetes:global/warehouse_path",
        );
        let (mutated, _) = admit_and_apply(&pod).await;
        let want = json!({"name": "WAREHOUSE", "valueFrom": {"secretKeyRef":
            {"name": "iomete-secret-store", "key": "warehouse_path", "optional": false}}});
        assert!(env(&mutated).contains(&want), "{name}");
        assert_eq!(
            mutated["metadata"]["annotations"]["secrets.iomete.com/identity"],
            r#"{"user":"alice","groups":["system:authenticated"]}"#
        );
    }
}

#[tokio::test]
async fn legacy_placeholders_resolve_from_the_global_store() {
    let mut pod = fixture("spark35-driver-submit.json");
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "TOKEN_HEADER", "value": "Bearer ${secrets.api_token}"}));
    let (mutated, _) = admit_and_apply(&pod).await;
    let env = env(&mutated);
    let header = env.iter().find(|e| e["name"] == "TOKEN_HEADER").unwrap();
    let value = header["value"].as_str().unwrap();
    assert!(value.starts_with("Bearer $(IOMETE_SECRET_"), "{value}");

    let mut pod = fixture("spark35-driver-submit.json");
    pod["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!("${secrets.nope}"));
    let answer = admit(&pod).await;
    assert!(!answer.allowed());
    assert_eq!(
        answer.message(),
        "placeholder ${secrets.nope}: the global store has no key \"nope\" (Secret iomete-secret-store in \
         namespace iomete-system); create the secret or fix the key"
    );
}

#[tokio::test]
async fn denials_name_the_reference_and_the_fix() {
    let cases = [
        (
            "env.secrets.iomete.com/X",
            "kubernetes:global/missing",
            "annotation env.secrets.iomete.com/X: env var \"X\": kubernetes:global/missing: the global store has no \
             key \"missing\" (Secret iomete-secret-store in namespace iomete-system); create the secret or fix the key",
        ),
        (
            "env.secrets.iomete.com/X",
            "kubernetes:hr/k",
            "annotation env.secrets.iomete.com/X: env var \"X\": kubernetes:hr/k: domain \"hr\" has no secret store \
             (Secret iomete-secret-store-hr in namespace iomete-system); create a secret in that domain first, or fix source.id",
        ),
        (
            "env.secrets.iomete.com/X",
            "vault:vault-prod-finance/db",
            "annotation env.secrets.iomete.com/X: vault:vault-prod-finance/db: user \"alice\" lacks Use on vault \
             config \"vault-prod-finance\"; a platform admin can grant Use to the user or one of its groups in the \
             resource bundle of that Vault config",
        ),
        (
            "secrets.iomete.com/env-secrets",
            "{",
            "annotation secrets.iomete.com/env-secrets: not a JSON array of references (invalid type: map, expected \
             a sequence at line 1 column 0); write a JSON array like [{\"key\":\"NAME\",\"secretObject\":{\"key\":\"secret_key\",\
             \"source\":{\"type\":\"KUBERNETES\",\"id\":\"my-domain\"}}}]",
        ),
    ];
    for (key, value, expected) in cases {
        let mut pod = fixture("spark35-driver-submit.json");
        annotate(&mut pod, key, value);
        let answer = admit(&pod).await;
        assert!(!answer.allowed());
        assert_eq!(answer.message(), expected);
        assert_eq!(answer.response["status"]["code"], 403);
    }
}

#[tokio::test]
async fn kubernetes_stores_are_only_reachable_from_the_data_plane_namespace() {
    let mut pod = fixture("spark35-driver-submit.json");
    pod["metadata"]["namespace"] = json!("default");
    annotate(
        &mut pod,
        "env.secrets.iomete.com/X",
        "kubernetes:global/warehouse_path",
    );
    let answer = admit(&pod).await;
    assert!(!answer.allowed());
    assert!(answer.message().contains(
        "Kubernetes secret stores live in namespace \"iomete-system\"; this pod is in \"default\""
    ));
}

#[tokio::test]
async fn a_pod_with_references_that_is_no_workload_is_told_to_opt_in() {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "iomete-system"},
        "spec": {"containers": [{"name": "web", "image": "nginx"}]}});
    annotate(
        &mut pod,
        "env.secrets.iomete.com/X",
        "kubernetes:global/warehouse_path",
    );
    let answer = admit(&pod).await;
    assert!(
        answer
            .message()
            .contains("label it secrets.iomete.com/inject=true"),
        "{}",
        answer.message()
    );
    pod["metadata"]["labels"] = json!({"secrets.iomete.com/inject": "true"});
    let (mutated, _) = admit_and_apply(&pod).await;
    assert_eq!(env(&mutated)[0]["name"], "X");
}

#[tokio::test]
async fn unreadable_input_is_an_invalid_review_not_an_error() {
    let answer = admit_bytes(b"{not json").await;
    assert!(!answer.allowed());
    assert!(
        answer
            .message()
            .starts_with("the body is not an admission.k8s.io/v1 AdmissionReview")
    );
    assert_eq!(answer.response["status"]["reason"], "InvalidRequest");

    let mut wrong = review(&fixture("spark35-driver-submit.json"), "alice");
    wrong["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let answer = admit_bytes(&serde_json::to_vec(&wrong).unwrap()).await;
    assert!(!answer.allowed());
    assert_eq!(
        answer.response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
        "uid echoed when readable"
    );
    assert!(
        answer
            .message()
            .contains("expected apiVersion admission.k8s.io/v1")
    );

    let answer =
        admit_bytes(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).await;
    assert!(!answer.allowed());
}

#[tokio::test]
async fn dry_run_and_non_create_operations() {
    let mut pod = fixture("spark35-executor-submit.json");
    annotate(
        &mut pod,
        "env.secrets.iomete.com/W",
        "kubernetes:global/warehouse_path",
    );
    let mut r = review(&pod, "alice");
    r["request"]["dryRun"] = json!(true);
    let answer = admit_bytes(&serde_json::to_vec(&r).unwrap()).await;
    assert!(
        answer.allowed() && answer.patch.is_some(),
        "dry run still answers with the patch"
    );
    r["request"]["operation"] = json!("UPDATE");
    r["request"]["oldObject"] = r["request"]["object"].clone();
    let answer = admit_bytes(&serde_json::to_vec(&r).unwrap()).await;
    assert!(
        answer.allowed() && answer.patch.is_none(),
        "{}",
        answer.message()
    );
    r["request"]["operation"] = json!("DELETE");
    let answer = admit_bytes(&serde_json::to_vec(&r).unwrap()).await;
    assert!(
        answer.allowed() && answer.patch.is_none(),
        "{}",
        answer.message()
    );
    // An update without the old object cannot be checked: denied, not waved through.
    r["request"]["operation"] = json!("UPDATE");
    r["request"]["oldObject"] = Value::Null;
    let answer = admit_bytes(&serde_json::to_vec(&r).unwrap()).await;
    assert!(!answer.allowed());
    assert!(
        answer.message().contains("no object or no oldObject"),
        "{}",
        answer.message()
    );
}

#[tokio::test]
async fn warnings_come_back_to_the_client() {
    let mut pod = fixture("spark35-driver-submit.json");
    annotate(
        &mut pod,
        "spark-conf.secrets.iomete.com/spark.myapp.endpoint",
        "kubernetes:global/api_token",
    );
    let (_, answer) = admit_and_apply(&pod).await;
    assert_eq!(
        answer.warnings(),
        [
            "Spark conf spark.myapp.endpoint does not match spark.redaction.regex: its value may show in the Spark UI"
        ]
    );
}

/// Hostile AdmissionReviews: each gets a clear denial or an `invalid` answer, quickly, never a panic.
#[tokio::test]
async fn hostile_reviews_get_clear_answers_in_bounded_time() {
    let driver = fixture("spark35-driver-submit.json");
    let good = review(&driver, "alice");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = good.clone();
        f(&mut r);
        serde_json::to_vec(&r).unwrap()
    };
    let annotated = |key: &str, value: &str| {
        let key = key.to_owned();
        let value = value.to_owned();
        with(&move |r: &mut Value| {
            r["request"]["object"]["metadata"]["annotations"] =
                json!({ key.clone(): value.clone() });
        })
    };
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut invalid_utf8 = serde_json::to_vec(&good).unwrap();
    let at = invalid_utf8.windows(5).position(|w| w == b"alice").unwrap();
    invalid_utf8[at] = 0xff;
    let mut invalid_utf8_unknown = with(&|r| r["request"]["object"]["spec"]["x"] = json!("a?b"));
    let at = invalid_utf8_unknown
        .windows(3)
        .position(|w| w == b"a?b")
        .unwrap();
    invalid_utf8_unknown[at + 1] = 0xf8;
    let many_env: Vec<Value> = (0..10_000)
        .map(|i| json!({"name": format!("V{i}"), "value": "x ${secrets.warehouse_path} y"}))
        .collect();
    let huge_json_refs: Vec<Value> = (0..50_000)
        .map(|i| json!({"key": format!("V{i}"), "secretObject": {"key": "k", "source": {"type": "KUBERNETES", "id": "no-such"}}}))
        .collect();
    // Distinct domains, each a Use check (a SubjectAccessReview in RBAC mode): capped, within
    // the bound on references per pod.
    let many_domains: Vec<Value> = (0..900)
        .map(|i| json!({"key": format!("V{i}"), "secretObject": {"key": "k", "source": {"type": "KUBERNETES", "id": format!("d{i}")}}}))
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong kind", with(&|r| r["kind"] = json!("Pod")), "expected apiVersion admission.k8s.io/v1, kind AdmissionReview"),
        ("v1beta1", with(&|r| r["apiVersion"] = json!("admission.k8s.io/v1beta1")), "expected apiVersion"),
        ("missing uid", with(&|r| r["request"].as_object_mut().unwrap().remove("uid").map(drop).unwrap_or(())), "not an admission.k8s.io/v1 AdmissionReview"),
        ("empty uid", with(&|r| r["request"]["uid"] = json!("")), "has no uid"),
        ("null object", with(&|r| r["request"]["object"] = Value::Null), "carries no pod object"),
        ("object not a pod", with(&|r| r["request"]["object"] = json!([1, 2])), "not an admission.k8s.io/v1 AdmissionReview"),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "has no request"),
        ("empty body", Vec::new(), "not an admission.k8s.io/v1 AdmissionReview"),
        ("deeply nested", nested.into_bytes(), "not an admission.k8s.io/v1 AdmissionReview"),
        ("invalid utf-8", invalid_utf8, "not an admission.k8s.io/v1 AdmissionReview"),
        // Found by the review_decode fuzz target: serde skips unknown fields without checking them.
        ("invalid utf-8 in an unknown field", invalid_utf8_unknown, "invalid utf-8 sequence"),
        (
            "duplicate keys",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"a","uid":"b"}}"#.to_vec(),
            "duplicate field `uid`",
        ),
        ("enormous annotation", annotated("secrets.iomete.com/env-secrets", &"x".repeat(3 << 20)), "not a JSON array of references"),
        // Refused by the bound on references per pod before any of them is parsed.
        ("fifty thousand references", annotated("secrets.iomete.com/env-secrets", &serde_json::to_string(&huge_json_refs).unwrap()), "names 50000 secret references"),
        ("nine hundred domains", annotated("secrets.iomete.com/env-secrets", &serde_json::to_string(&many_domains).unwrap()), "the pod references 900 different domains and Vault configs; at most 64 per pod"),
        ("invalid env name", annotated("env.secrets.iomete.com/A=B", "kubernetes:global/warehouse_path"), "is not a valid environment variable name"),
        ("path traversal", annotated("env.secrets.iomete.com/X", "vault:cfg/../../sys/raw#x"), "is not a valid Vault key"),
        ("control characters", annotated("env.secrets.iomete.com/X", "kubernetes:global/a\u{7}b"), "is not a valid Kubernetes secret key"),
        ("bad source id", annotated("env.secrets.iomete.com/X", "kubernetes:../kube-system/k"), "is not a valid name"),
        (
            "ten thousand env vars and a missing placeholder key",
            with(&|r| {
                let mut env = many_env.clone();
                env.push(json!({"name": "LAST", "value": "${secrets.nope}"}));
                r["request"]["object"]["spec"]["containers"][0]["env"] = json!(env);
            }),
            "the global store has no key \"nope\"",
        ),
        ("no containers", with(&|r| r["request"]["object"]["spec"]["containers"] = json!([])), "the pod has no containers"),
        // Each resource check held copies of the identity: 150,000 groups on 64 domains took 560 MB.
        (
            "a hundred thousand groups",
            with(&|r| {
                r["request"]["userInfo"]["groups"] = (0..100_000).map(|i| json!(format!("g{i}"))).collect();
                r["request"]["object"]["metadata"]["annotations"] = json!({"env.secrets.iomete.com/A": "kubernetes:finance/db_password"});
            }),
            "the identity this pod is admitted for is larger than secrets-webhook accepts: it has 100000 groups and extra values, more than 1000",
        ),
        (
            "a long user name",
            with(&|r| {
                r["request"]["userInfo"]["username"] = json!("u".repeat(5000));
                r["request"]["object"]["metadata"]["annotations"] = json!({"env.secrets.iomete.com/A": "kubernetes:finance/db_password"});
            }),
            "its user name has 5000 bytes, more than 1024",
        ),
        (
            "long extra values",
            with(&|r| {
                r["request"]["userInfo"]["extra"] = json!({"k": (0..100).map(|_| "x".repeat(1000)).collect::<Vec<_>>()});
                r["request"]["object"]["metadata"]["annotations"] = json!({"env.secrets.iomete.com/A": "kubernetes:finance/db_password"});
            }),
            "bytes of names, groups and extra values, more than 65536",
        ),
        // 110 KB that asked for a 450 MB patch: every env reference goes into every container.
        (
            "six hundred references into two thousand containers",
            with(&|r| {
                let pod = &mut r["request"]["object"];
                let names: Vec<String> = (0..2000).map(|i| format!("c{i}")).collect();
                let mut annotations: serde_json::Map<String, Value> = (0..600)
                    .map(|i| (format!("env.secrets.iomete.com/V{i}"), json!("kubernetes:global/warehouse_path")))
                    .collect();
                annotations.insert("secrets.iomete.com/containers".into(), json!(names.join(",")));
                pod["metadata"]["annotations"] = Value::Object(annotations);
                pod["spec"]["containers"] = names.iter().map(|n| json!({"name": n})).collect();
            }),
            "the pod's 600 env secret references go into each of the 2000 containers named in secrets.iomete.com/containers: 1200000 secret entries",
        ),
    ];
    for (name, body, expected) in cases {
        let started = std::time::Instant::now();
        let answer = admit_bytes(&body).await;
        let elapsed = started.elapsed();
        assert!(!answer.allowed(), "{name}: allowed");
        assert!(
            answer.message().contains(expected),
            "{name}: {:?}",
            answer.message()
        );
        assert!(
            answer.message().len() < 8 * 1024,
            "{name}: message of {} bytes",
            answer.message().len()
        );
        assert!(
            elapsed < std::time::Duration::from_secs(5),
            "{name}: took {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn ten_thousand_env_vars_with_placeholders_are_planned_quickly() {
    let mut pod = fixture("spark35-driver-submit.json");
    let vars: Vec<Value> = (0..10_000)
        .map(|i| json!({"name": format!("V{i}"), "value": format!("{i}:${{secrets.warehouse_path}}")}))
        .collect();
    pod["spec"]["containers"][0]["env"] = json!(vars);
    let started = std::time::Instant::now();
    let (mutated, _) = admit_and_apply(&pod).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let env = env(&mutated);
    assert_eq!(env.len(), 10_001, "one generated var shared by all");
    assert!(
        env[0]["name"]
            .as_str()
            .unwrap()
            .starts_with("IOMETE_SECRET_")
    );
}

/// The validating endpoint (`/validate`) the API server calls for pod updates and
/// SparkApplications, through the engine: never a patch, and the decisions of
/// docs/authorization.md §6 and §10.
#[tokio::test]
async fn the_validating_endpoint_checks_updates_and_spark_applications() {
    let webhook = webhook();
    let validate = |body: Value| {
        let webhook = &webhook;
        async move {
            let out = webhook
                .validate_bytes(&serde_json::to_vec(&body).unwrap(), None)
                .await;
            let answer: Value = serde_json::from_slice(&out).unwrap();
            assert!(answer["response"]["patch"].is_null(), "{answer}");
            answer["response"].clone()
        }
    };
    let allowed = |r: &Value| r["allowed"] == json!(true);
    let message = |r: &Value| {
        r["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    // The driver as alice's CREATE left it: mutated, stamped, signed.
    let mut driver = fixture("spark35-driver-submit.json");
    annotate(
        &mut driver,
        "env.secrets.iomete.com/DB",
        "kubernetes:finance/db_password",
    );
    let (stored, _) = admit_and_apply(&driver).await;
    let update = |old: &Value, new: &Value, sub: Option<&str>| {
        let mut r = review(new, "bob");
        r["request"]["operation"] = json!("UPDATE");
        r["request"]["oldObject"] = old.clone();
        if let Some(sub) = sub {
            r["request"]["subResource"] = json!(sub);
        }
        r
    };

    let mut forged = stored.clone();
    forged["metadata"]["annotations"]["secrets.iomete.com/granted"] =
        json!(r#"["kubernetes:finance/db_password","kubernetes:hr/salaries"]"#);
    let r = validate(update(&stored, &forged, None)).await;
    assert!(!allowed(&r));
    assert_eq!(
        message(&r),
        "annotation secrets.iomete.com/granted is set by secrets-webhook when the pod is created and \
         cannot be added, changed or removed afterwards, by anyone"
    );
    let r = validate(update(&stored, &forged, Some("status"))).await;
    assert!(!allowed(&r));

    let mut swapped = stored.clone();
    swapped["spec"]["containers"][0]["image"] = json!("evil:1");
    let r = validate(update(&stored, &swapped, None)).await;
    assert!(!allowed(&r));
    assert!(
        message(&r).contains("containers[\"spark-kubernetes-driver\"].image cannot change"),
        "{}",
        message(&r)
    );

    let mut debugged = stored.clone();
    debugged["spec"]["ephemeralContainers"] = json!([{"name": "d", "image": "busybox"}]);
    let r = validate(update(&stored, &debugged, Some("ephemeralcontainers"))).await;
    assert!(
        message(&r).contains("ephemeral containers cannot be added"),
        "{}",
        message(&r)
    );

    // A pod without grants: ephemeral containers fine, unless they name a store.
    let plain = fixture("spark35-driver-submit.json");
    let mut with_debug = plain.clone();
    with_debug["spec"]["ephemeralContainers"] = json!([{"name": "d", "image": "busybox"}]);
    assert!(allowed(
        &validate(update(&plain, &with_debug, Some("ephemeralcontainers"))).await
    ));
    with_debug["spec"]["ephemeralContainers"][0]["envFrom"] =
        json!([{"secretRef": {"name": "iomete-secret-store-finance"}}]);
    let r = validate(update(&plain, &with_debug, Some("ephemeralcontainers"))).await;
    assert!(
        message(&r).contains("ephemeralContainers[0].envFrom[0] names Secret"),
        "{}",
        message(&r)
    );
    // Labels: fine.
    let mut labelled = stored.clone();
    labelled["metadata"]["labels"]["team"] = json!("x");
    assert!(allowed(&validate(update(&stored, &labelled, None)).await));

    // A CREATE sent here is the mutating webhook's: allowed untouched, no side effects.
    let r = validate(review(&driver, "alice")).await;
    assert!(allowed(&r));

    // SparkApplications.
    let app = |run_as: &str| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "a1", "operation": "CREATE", "name": "pi", "namespace": "iomete-system",
                "kind": {"group": "sparkoperator.k8s.io", "version": "v1beta2", "kind": "SparkApplication"},
                "resource": {"group": "sparkoperator.k8s.io", "version": "v1beta2", "resource": "sparkapplications"},
                "userInfo": {"username": "bob", "groups": ["system:authenticated"]},
                "object": {"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
                    "metadata": {"name": "pi", "namespace": "iomete-system"},
                    "spec": {"driver": {"annotations": {"secrets.iomete.com/run-as": run_as}}}},
                "oldObject": null, "dryRun": false}})
    };
    let r = validate(app("alice")).await;
    assert!(!allowed(&r));
    assert_eq!(r["uid"], "a1");
    assert!(
        message(&r).contains("to a user other than its requester \"bob\""),
        "{}",
        message(&r)
    );
    assert!(allowed(&validate(app("bob")).await));
    // Any other kind: nothing to say.
    let mut other = app("alice");
    other["request"]["kind"]["kind"] = json!("ConfigMap");
    assert!(allowed(&validate(other).await));
}
