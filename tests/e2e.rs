//! End to end through a real kube-apiserver (scripts/kube-e2e.sh, started once for this binary):
//! the shipped manifests registered with the API server, which calls the webhook with its own
//! AdmissionReviews; real kubectl, impersonation and ServiceAccount tokens; the webhook running
//! with exactly the shipped RBAC. Without the Kubernetes binaries every test prints a SKIP line.

mod support;

use std::sync::OnceLock;

use serde_json::{Value, json};
use support::kube_e2e::{self, Cluster, NS, unique};

const DENIED: &str = "admission webhook \"pods.secrets.iomete.com\" denied the request: ";

/// The cluster, with the fixtures every test may use: the global store and the `spark`
/// ServiceAccount that Spark pods name.
fn cluster(test: &str) -> Option<&'static Cluster> {
    let k = kube_e2e::cluster(test)?;
    static FIXTURES: OnceLock<()> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        k.apply(&format!(
            "apiVersion: v1
kind: Secret
metadata: {{name: iomete-secret-store, namespace: {NS}}}
stringData: {{warehouse_path: canary-global-wh-Zq81, legacy_token: canary-global-tok-Zq81}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: spark, namespace: {NS}}}
"
        ));
    });
    Some(k)
}

/// A domain with a store holding `keys` (values are canaries that must never show up) and a
/// bundle granting Use on it to `subjects` (`User:alice`, `Group:data-eng`).
fn domain(k: &Cluster, keys: &[&str], subjects: &[&str]) -> String {
    let domain = unique("d");
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|key| (key.to_string(), json!(canary(&domain, key))))
        .collect();
    let subjects: Vec<Value> = subjects
        .iter()
        .map(|s| {
            let (kind, name) = s.split_once(':').unwrap();
            json!({"kind": kind, "name": name})
        })
        .collect();
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": format!("iomete-secret-store-{domain}"), "namespace": NS},
         "stringData": data},
        {"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
         "metadata": {"name": format!("{domain}-bundle"), "namespace": NS},
         "spec": {"domains": [domain], "grants": [{"subjects": subjects, "permissions": ["use", "view"]}]}}
    ]});
    k.apply(&objects.to_string());
    domain
}

fn canary(domain: &str, key: &str) -> String {
    format!("canary-{domain}-{key}-Zq81")
}

/// The real Spark 3.5 driver pod (tests/fixtures), renamed, in the data-plane namespace.
fn spark_driver(annotations: Value) -> Value {
    let path = format!(
        "{}/tests/fixtures/pods/spark35-driver-submit.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut pod: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pod["metadata"]["name"] = json!(unique("driver"));
    pod["metadata"]["namespace"] = json!(NS);
    pod["metadata"]["annotations"] = annotations;
    pod
}

fn name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap()
}

/// `kubectl create -f -` as `user`; the stored pod, or kubectl's error.
fn create_as(k: &Cluster, pod: &Value, user: &str, groups: &[&str]) -> Result<Value, String> {
    let run = k
        .kubectl()
        .user(user, groups)
        .args(["create", "-o", "json", "-f", "-"])
        .stdin(pod.to_string())
        .run();
    if run.success {
        Ok(serde_json::from_str(&run.stdout).unwrap())
    } else {
        Err(run.stderr)
    }
}

/// Creates the pod as `user` once the webhook's watches have seen the objects a test just
/// created (a server-side dry run is retried until admitted; it writes nothing).
fn create_when_ready(k: &Cluster, pod: &Value, user: &str, groups: &[&str]) -> Value {
    k.eventually("the webhook admits the pod", || {
        let run = k
            .kubectl()
            .user(user, groups)
            .args(["create", "--dry-run=server", "-o", "name", "-f", "-"])
            .stdin(pod.to_string())
            .run();
        if run.success { Ok(()) } else { Err(run.stderr) }
    });
    create_as(k, pod, user, groups).unwrap_or_else(|e| panic!("create: {e}"))
}

fn env_of<'a>(pod: &'a Value, container: usize, var: &str) -> &'a Value {
    pod["spec"]["containers"][container]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == var)
        .unwrap_or_else(|| panic!("no env {var} in {}", pod["spec"]["containers"][container]))
}

fn secret_key_ref(pod: &Value, var: &str) -> (String, String) {
    let r = &env_of(pod, 0, var)["valueFrom"]["secretKeyRef"];
    (
        r["name"].as_str().unwrap().to_owned(),
        r["key"].as_str().unwrap().to_owned(),
    )
}

fn assert_no_canary(what: &str, text: &str) {
    assert!(
        !text.contains("-Zq81"),
        "{what} carries a secret value: {text}"
    );
}

#[test]
fn alice_creates_a_spark_driver_with_every_reference_form_and_bob_is_denied() {
    let Some(k) =
        cluster("alice_creates_a_spark_driver_with_every_reference_form_and_bob_is_denied")
    else {
        return;
    };
    let _shared = k.shared();
    let d = domain(
        k,
        &["db_password", "s3_secret", "api_key", "conf_secret"],
        &["User:alice"],
    );
    let mut driver = spark_driver(json!({
        "secrets.iomete.com/env-secrets": json!([
            {"key": "DB_PASSWORD", "secretObject": {"key": "db_password", "source": {"type": "KUBERNETES", "id": d}}}
        ]).to_string(),
        "secrets.iomete.com/spark-conf-secrets": json!([
            {"key": "spark.hadoop.fs.s3a.secret.key", "secretObject": {"key": "s3_secret", "source": {"type": "KUBERNETES", "id": d}}}
        ]).to_string(),
        "env.secrets.iomete.com/API_KEY": format!("kubernetes:{d}/api_key"),
        "env.secrets.iomete.com/WAREHOUSE": "kubernetes:global/warehouse_path",
        "spark-conf.secrets.iomete.com/spark.sql.catalog.token": format!("kubernetes:{d}/conf_secret"),
    }));
    // Legacy placeholders: a whole value, and inside a longer value.
    let env = driver["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    env.push(json!({"name": "LEGACY_TOKEN", "value": "${secrets.legacy_token}"}));
    env.push(json!({"name": "LEGACY_URL", "value": "s3://bucket/${secrets.warehouse_path}/x"}));

    let stored = create_when_ready(k, &driver, "alice", &[]);
    // What the API server stored, read back.
    let stored_again = k.get("pod", NS, name(&driver)).expect("stored pod");
    assert_eq!(stored["metadata"]["uid"], stored_again["metadata"]["uid"]);
    let store = format!("iomete-secret-store-{d}");
    assert_eq!(
        secret_key_ref(&stored_again, "DB_PASSWORD"),
        (store.clone(), "db_password".into())
    );
    assert_eq!(
        secret_key_ref(&stored_again, "API_KEY"),
        (store.clone(), "api_key".into())
    );
    assert_eq!(
        secret_key_ref(&stored_again, "WAREHOUSE"),
        ("iomete-secret-store".into(), "warehouse_path".into())
    );
    assert_eq!(
        secret_key_ref(&stored_again, "LEGACY_TOKEN"),
        ("iomete-secret-store".into(), "legacy_token".into())
    );
    // A placeholder inside a longer value: composed by the kubelet from a generated variable.
    let url = env_of(&stored_again, 0, "LEGACY_URL")["value"]
        .as_str()
        .unwrap();
    let generated = url
        .strip_prefix("s3://bucket/$(")
        .and_then(|rest| rest.strip_suffix(")/x"))
        .unwrap_or_else(|| panic!("LEGACY_URL not composed: {url}"));
    assert_eq!(
        secret_key_ref(&stored_again, generated),
        ("iomete-secret-store".into(), "warehouse_path".into())
    );
    // Spark confs: `--conf key=$(VAR)` right after `driver`, VAR a secretKeyRef.
    let args: Vec<&str> = stored_again["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "driver");
    for (conf, key) in [
        ("spark.hadoop.fs.s3a.secret.key", "s3_secret"),
        ("spark.sql.catalog.token", "conf_secret"),
    ] {
        let at = args
            .iter()
            .position(|a| a.starts_with(&format!("{conf}=$(")))
            .unwrap_or_else(|| panic!("no --conf {conf} in {args:?}"));
        assert_eq!(args[at - 1], "--conf");
        assert!(
            at <= 4,
            "--conf {conf} must come right after `driver`: {args:?}"
        );
        let var = args[at]
            .strip_prefix(&format!("{conf}=$("))
            .and_then(|v| v.strip_suffix(')'))
            .unwrap();
        assert_eq!(
            secret_key_ref(&stored_again, var),
            (store.clone(), key.into())
        );
    }
    // Stamps: who was checked, and what was granted.
    let annotations = &stored_again["metadata"]["annotations"];
    let identity: Value =
        serde_json::from_str(annotations["secrets.iomete.com/identity"].as_str().unwrap()).unwrap();
    assert_eq!(identity["user"], "alice");
    let granted = annotations["secrets.iomete.com/granted"].as_str().unwrap();
    for r in [
        format!("kubernetes:{d}/db_password"),
        format!("kubernetes:{d}/conf_secret"),
    ] {
        assert!(granted.contains(&r), "granted lacks {r}: {granted}");
    }
    assert_no_canary("the stored pod", &stored_again.to_string());

    // bob holds no grant: kubectl prints the webhook's denial, naming the reference and the fix.
    let mut for_bob = driver.clone();
    for_bob["metadata"]["name"] = json!(unique("driver"));
    let error = create_as(k, &for_bob, "bob", &["analysts"]).unwrap_err();
    assert!(error.contains(DENIED), "{error}");
    assert!(
        error.contains(&format!("user \"bob\" lacks Use on domain \"{d}\"")),
        "{error}"
    );
    assert!(error.contains("grant Use"), "{error}");
    assert_no_canary("the denial", &error);
    assert!(k.get("pod", NS, name(&for_bob)).is_none());
    assert_no_canary("the webhook log", &k.webhook_log());
}
