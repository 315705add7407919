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

/// A plain pod that cannot matter to the webhook (no reference, no workload label).
fn plain_pod(namespace: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": unique("plain"), "namespace": namespace},
           "spec": {"containers": [{"name": "c", "image": "busybox", "env": [{"name": "A", "value": "b"}]}]}})
}

/// An opted-in pod (`secrets.iomete.com/inject=true`) with env references.
fn opted_in_pod(namespace: &str, refs: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = refs
        .iter()
        .map(|(var, r)| (format!("env.secrets.iomete.com/{var}"), json!(r)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": unique("app"), "namespace": namespace,
                        "labels": {"secrets.iomete.com/inject": "true"}, "annotations": annotations},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

/// The webhook's log lines (JSON) about pod `name`.
fn admissions_of(k: &Cluster, name: &str) -> Vec<Value> {
    k.webhook_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "admission" && l["fields"]["pod"] == name)
        .collect()
}

fn admissions_total(k: &Cluster) -> f64 {
    k.metrics()
        .lines()
        .filter(|l| l.starts_with("secrets_webhook_admissions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn crds_and_custom_resources_meet_the_real_schema_validation() {
    let Some(k) = cluster("crds_and_custom_resources_meet_the_real_schema_validation") else {
        return;
    };
    let _shared = k.shared();
    // The CRDs were installed by the chart and are served.
    for crd in [
        "resourcebundles.secrets.iomete.com",
        "vaultconfigs.secrets.iomete.com",
    ] {
        let crd = k.get("crd", "", crd).expect("CRD installed");
        let established = crd["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        assert!(established, "{crd}");
    }
    // The shipped examples are accepted as written (server-side, strict field validation).
    for example in ["examples/resourcebundle.yaml", "examples/vaultconfig.yaml"] {
        let path = format!("{}/{example}", env!("CARGO_MANIFEST_DIR"));
        k.kubectl()
            .args(["apply", "--dry-run=server", "--validate=strict", "-f", &path])
            .run()
            .ok();
    }
    let name = unique("vc");
    let vault_config = |auth: Value, extra: Value| {
        let mut spec = json!({"resourceBundle": "b", "host": "http://127.0.0.1:1",
                              "path": "/v1/secret/data/x", "auth": auth});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
               "metadata": {"name": name, "namespace": NS}, "spec": spec})
        .to_string()
    };
    let create = |body: String| {
        k.kubectl()
            .args(["create", "--validate=strict", "-f", "-"])
            .stdin(body)
            .run()
    };
    // Both auth methods: the CRD's CEL rule, evaluated by the API server.
    let both = json!({"token": {"secretRef": {"name": "s", "key": "t"}},
                      "appRole": {"roleId": "r", "secretIdRef": {"name": "s", "key": "id"}}});
    let error = create(vault_config(both, json!({}))).err();
    assert!(
        error.contains("set exactly one of auth.appRole and auth.token"),
        "{error}"
    );
    // An unknown field: strict validation rejects it.
    let token = json!({"token": {"secretRef": {"name": "s", "key": "t"}}});
    let error = create(vault_config(token.clone(), json!({"password": "x"}))).err();
    assert!(error.contains("unknown field"), "{error}");
    // A wrong type.
    let error = create(vault_config(token.clone(), json!({"host": 5}))).err();
    assert!(error.contains("spec.host"), "{error}");
    // A ResourceBundle with a grant missing its subjects.
    let bundle = json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
                        "metadata": {"name": unique("rb"), "namespace": NS},
                        "spec": {"domains": ["x"], "grants": [{"permissions": ["use"]}]}});
    let error = create(bundle.to_string()).err();
    assert!(error.contains("subjects"), "{error}");
    // Status is a subresource: a client's status in the main resource is dropped.
    let mut with_status: Value = serde_json::from_str(&vault_config(token, json!({}))).unwrap();
    with_status["status"] =
        json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Forged",
                               "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    let stored = k
        .kubectl()
        .args(["create", "-o", "json", "-f", "-"])
        .stdin(with_status.to_string())
        .run()
        .json();
    let forged = stored["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["reason"] == "Forged");
    assert!(!forged, "status written through the main resource: {stored}");
    k.kubectl()
        .ns(NS)
        .args(["delete", "vaultconfig", &name, "--wait=false"])
        .run()
        .ok();
}

#[test]
fn pods_that_cannot_matter_never_reach_the_webhook() {
    let Some(k) = cluster("pods_that_cannot_matter_never_reach_the_webhook") else {
        return;
    };
    // Exclusive: no other test's pods move the admission counters meanwhile.
    let _exclusive = k.exclusive();
    let ns = k.namespace("plain");
    let before = admissions_total(k);
    let mut names = Vec::new();
    for namespace in [NS, ns.as_str()] {
        for _ in 0..3 {
            let pod = plain_pod(namespace);
            names.push(name(&pod).to_owned());
            create_as(k, &pod, "alice", &[]).unwrap();
        }
    }
    // A pod that does match (an opted-in pod without references) is counted: the counters move.
    let matching = opted_in_pod(&ns, &[]);
    create_as(k, &matching, "alice", &[]).unwrap();
    k.wait_until("the matching pod is counted", || {
        admissions_total(k) >= before + 1.0
    });
    assert_eq!(
        admissions_total(k),
        before + 1.0,
        "only the matching pod reached the webhook"
    );
    for name in &names {
        assert!(admissions_of(k, name).is_empty(), "{name} reached the webhook");
    }
    assert_eq!(admissions_of(k, name(&matching)).len(), 1);
}

#[test]
fn failure_policy_fail_rejects_matching_pods_while_the_webhook_is_down() {
    let Some(k) = cluster("failure_policy_fail_rejects_matching_pods_while_the_webhook_is_down")
    else {
        return;
    };
    let _exclusive = k.exclusive();
    let d = domain(k, &["db_password"], &["User:alice"]);
    let pod = opted_in_pod(NS, &[("DB_PASSWORD", &format!("kubernetes:{d}/db_password"))]);
    create_when_ready(k, &pod, "alice", &[]);

    k.stop_webhook();
    let mut again = pod.clone();
    again["metadata"]["name"] = json!(unique("app"));
    let error = create_as(k, &again, "alice", &[]).unwrap_err();
    assert!(
        error.contains("failed calling webhook \"pods.secrets.iomete.com\""),
        "{error}"
    );
    assert!(k.get("pod", NS, name(&again)).is_none());
    // Pods the pre-filter drops are still created.
    create_as(k, &plain_pod(NS), "alice", &[]).unwrap();
    // The guard's pods too are rejected, never admitted unchecked.
    let mut direct = plain_pod(NS);
    direct["spec"]["containers"][0]["env"] = json!([{"name": "X", "valueFrom":
        {"secretKeyRef": {"name": format!("iomete-secret-store-{d}"), "key": "db_password"}}}]);
    let error = create_as(k, &direct, "alice", &[]).unwrap_err();
    assert!(error.contains("failed calling webhook"), "{error}");

    k.start_webhook();
    let stored = create_when_ready(k, &again, "alice", &[]);
    assert_eq!(
        secret_key_ref(&stored, "DB_PASSWORD"),
        (format!("iomete-secret-store-{d}"), "db_password".into())
    );
}
