//! The deployment manifests (manifests/, examples/) read as YAML: the webhook registration, the
//! Deployment's hardening, RBAC, and the CEL pre-filter evaluated against real pod fixtures.
//! Rendering and schema validation of the kustomizations is `scripts/validate-manifests.sh`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser as _;
use serde::Deserialize as _;
use serde_json::{Value, json};
use support::cel_policy::{self, Verdict};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn object(path: &str, kind: &str, name: &str) -> Value {
    documents(path)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {path}"))
}

/// An entry of the MutatingWebhookConfiguration, by name.
fn mutating(name: &str) -> Value {
    let config = object(
        "manifests/base/mutatingwebhookconfiguration.yaml",
        "MutatingWebhookConfiguration",
        "secrets-webhook",
    );
    let webhooks = config["webhooks"].as_array().unwrap();
    let names: Vec<&str> = webhooks
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["pods.secrets.iomete.com", "vaultconfigs.secrets.iomete.com"],
        "the pods entry stays first: the self-managed overlay's caBundle patch and `certs`'s hint \
         address entries by index"
    );
    webhooks
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no webhook {name}"))
        .clone()
}

/// The pods entry.
fn webhook() -> Value {
    mutating("pods.secrets.iomete.com")
}

fn deployment() -> Value {
    object(
        "manifests/base/deployment.yaml",
        "Deployment",
        "secrets-webhook",
    )
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn webhook_registration_is_v1_fail_closed_reinvoked_and_pods_create_only() {
    let hook = webhook();
    assert_eq!(hook["name"], "pods.secrets.iomete.com");
    assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"]);
    assert_eq!(hook["sideEffects"], "NoneOnDryRun");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["matchPolicy"], "Equivalent");
    let rules = hook["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0]["operations"]), ["CREATE"]);
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["apiVersions"]), ["v1"]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    let service = &hook["clientConfig"]["service"];
    assert_eq!(service["name"], "secrets-webhook");
    assert_eq!(service["path"], "/mutate");
    assert_eq!(service["port"], 443);
    assert_eq!(
        hook["matchConditions"].as_array().unwrap().len(),
        1,
        "matchConditions are ANDed: one expression ORs the cases"
    );
}

#[test]
fn vaultconfig_defaulting_is_create_only_fail_closed_and_side_effect_free() {
    let hook = mutating("vaultconfigs.secrets.iomete.com");
    assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"]);
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["failurePolicy"], "Fail");
    assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 5);
    assert!(hook.get("reinvocationPolicy").is_none_or(|p| p == "Never"));
    let rules = hook["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    // CREATE only: an update that omits the field keeps what is stored.
    assert_eq!(strings(&rules[0]["operations"]), ["CREATE"]);
    assert_eq!(strings(&rules[0]["apiGroups"]), ["secrets.iomete.com"]);
    assert_eq!(strings(&rules[0]["resources"]), ["vaultconfigs"]);
    let service = &hook["clientConfig"]["service"];
    assert_eq!(service["name"], "secrets-webhook");
    assert_eq!(service["path"], "/default");
    assert_eq!(hook["matchConditions"].as_array().unwrap().len(), 1);
}

/// The API server sends a VaultConfig create only when its spec names no delivery: creates that
/// name it (the management API's) never depend on the webhook being up.
#[test]
fn only_vaultconfigs_without_delivery_reach_the_defaulting_webhook() {
    let hook = mutating("vaultconfigs.secrets.iomete.com");
    let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
    let sent = |spec: Option<Value>| {
        let mut object = json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
                                "metadata": {"name": "c", "namespace": "iomete-system"}});
        if let Some(spec) = spec {
            object["spec"] = spec;
        }
        let request = json!({"operation": "CREATE"});
        cel_policy::holds(condition, &[("object", &object), ("request", &request)])
    };
    let spec = json!({"resourceBundle": "b", "host": "https://v:8200", "path": "/v1/secret/data/p",
                      "auth": {"token": {"secretRef": {"name": "s", "key": "t"}}}});
    assert!(sent(Some(spec.clone())));
    for delivery in ["runtime", "materialize", "bogus"] {
        let mut named = spec.clone();
        named["delivery"] = json!(delivery);
        assert!(!sent(Some(named)), "{delivery}");
    }
    // No spec: the CRD's schema rejects it (spec is required); the condition does not fail.
    assert!(!sent(None));
}

#[test]
fn webhook_timeout_leaves_room_for_the_servers_own_budget() {
    let timeout = webhook()["timeoutSeconds"].as_u64().unwrap();
    assert!(timeout <= 5, "small timeout: {timeout}");
    let budget = secrets_webhook::config::Settings::default().default_budget;
    assert!(
        budget.as_secs() < timeout,
        "the server must answer (deny) before the API server gives up: budget {budget:?}, timeout {timeout}s"
    );
}

#[test]
fn webhook_skips_the_control_plane_namespaces_but_not_the_data_plane() {
    let selector = &webhook()["namespaceSelector"]["matchExpressions"];
    let by_name = selector
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name")
        .unwrap();
    assert_eq!(by_name["operator"], "NotIn");
    let excluded = strings(&by_name["values"]);
    assert!(excluded.contains(&"kube-system"));
    // Spark and Jupyter pods run in the data-plane namespace: excluding it would skip the guard.
    assert!(!excluded.contains(&"iomete-system"));
    let kustomization = &documents("manifests/base/kustomization.yaml")[0];
    assert_eq!(kustomization["namespace"], "iomete-system");
}

#[test]
fn deployment_is_hardened_and_replicated() {
    let deploy = deployment();
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(pod["serviceAccountName"], "secrets-webhook");
    assert!(pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("admin"), 8080);
    assert_eq!(port("https"), 8443);
    for what in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(c["resources"][what][res].is_string(), "{what}.{res}");
        }
    }
}

/// The Deployment's args, with `$(POD_NAMESPACE)` expanded as the kubelet would, parsed by the real CLI.
fn serve_args(extra: &[&str]) -> secrets_webhook::cli::ServeArgs {
    let deploy = deployment();
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_array().unwrap();
    let ns = env.iter().find(|e| e["name"] == "POD_NAMESPACE").unwrap();
    assert_eq!(
        ns["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let mut argv = vec!["secrets-webhook".to_owned()];
    argv.extend(
        strings(&c["args"])
            .into_iter()
            .map(|a| a.replace("$(POD_NAMESPACE)", "iomete-system")),
    );
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let cli = secrets_webhook::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    match cli.command {
        secrets_webhook::cli::Command::Serve(args) => *args,
        other => panic!("not serve: {other:?}"),
    }
}

#[test]
fn deployment_args_parse_and_point_into_the_mounted_tls_directory() {
    let args = serve_args(&[]);
    assert_eq!(args.namespace, "iomete-system");
    assert!(args.enabled);
    assert_eq!(args.listen.port(), 8443);
    assert_eq!(args.admin_listen.port(), 8080);
    let deploy = deployment();
    let pod = &deploy["spec"]["template"]["spec"];
    let mount = &pod["containers"][0]["volumeMounts"][0];
    assert!(
        mount.get("subPath").is_none(),
        "subPath mounts never see Secret updates"
    );
    assert_eq!(mount["readOnly"], true);
    let dir = Path::new(mount["mountPath"].as_str().unwrap());
    assert!(args.tls_cert.starts_with(dir) && args.tls_key.starts_with(dir));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    // The Secret `secrets-webhook certs --secret-yaml` prints and cert-manager writes.
    let certs = match secrets_webhook::cli::Cli::try_parse_from(["secrets-webhook", "certs"])
        .unwrap()
        .command
    {
        secrets_webhook::cli::Command::Certs(args) => args,
        other => panic!("{other:?}"),
    };
    assert_eq!(volume["secret"]["secretName"], certs.secret_name.as_str());
    let serving = object(
        "manifests/overlays/cert-manager/certificates.yaml",
        "Certificate",
        "secrets-webhook-serving",
    );
    assert_eq!(serving["spec"]["secretName"], certs.secret_name.as_str());
    assert_eq!(
        strings(&serving["spec"]["dnsNames"]),
        secrets_webhook::certs::service_names(&certs.service, &certs.namespace)
    );
}

#[test]
fn feature_disabled_component_turns_injection_off() {
    let component = &documents("manifests/components/feature-disabled/kustomization.yaml")[0];
    let patch: Vec<Value> =
        serde_yaml::from_str(component["patches"][0]["patch"].as_str().unwrap()).unwrap();
    assert_eq!(patch[0]["path"], "/spec/template/spec/containers/0/args/-");
    let arg = patch[0]["value"].as_str().unwrap();
    assert!(!serve_args(&[arg]).enabled);
}

#[test]
fn service_and_pdb_select_the_webhook_pods() {
    let deploy = deployment();
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let service = object("manifests/base/service.yaml", "Service", "secrets-webhook");
    let pdb = object(
        "manifests/base/poddisruptionbudget.yaml",
        "PodDisruptionBudget",
        "secrets-webhook",
    );
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value);
    }
    for (key, value) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[key], value);
    }
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "https")
        .unwrap();
    assert_eq!(https["port"], 443);
    assert_eq!(https["targetPort"], "https");
}

/// (apiGroup, resource, verbs) triples of a Role or ClusterRole, one per resource.
fn grants(role: &Value) -> BTreeSet<(String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("resourceNames").is_none());
        let mut verbs: Vec<String> = strings(&rule["verbs"])
            .into_iter()
            .map(String::from)
            .collect();
        verbs.sort();
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.insert((group.to_owned(), resource.to_owned(), verbs.clone()));
            }
        }
    }
    out
}

fn grant(group: &str, resource: &str, verbs: &[&str]) -> (String, String, Vec<String>) {
    let mut verbs: Vec<String> = verbs.iter().map(|v| (*v).to_owned()).collect();
    verbs.sort();
    (group.to_owned(), resource.to_owned(), verbs)
}

#[test]
fn rbac_grants_exactly_what_the_code_does() {
    let role = object("manifests/base/rbac.yaml", "Role", "secrets-webhook");
    assert_eq!(
        grants(&role),
        BTreeSet::from([grant("", "secrets", &["get", "list", "watch"])])
    );
    let cluster = object("manifests/base/rbac.yaml", "ClusterRole", "secrets-webhook");
    assert_eq!(
        grants(&cluster),
        BTreeSet::from([
            grant("", "pods", &["get"]),
            // The broker reviews the pods' runtime-delivery tokens.
            grant("authentication.k8s.io", "tokenreviews", &["create"]),
            grant("", "secrets", &["create", "get", "update", "patch"]),
            grant(
                "secrets.iomete.com",
                "vaultconfigs",
                &["get", "list", "watch"]
            ),
            grant(
                "secrets.iomete.com",
                "resourcebundles",
                &["get", "list", "watch"]
            ),
            grant(
                "secrets.iomete.com",
                "vaultconfigs/status",
                &["patch", "update"]
            ),
        ])
    );
    for (kind, role_kind) in [
        ("RoleBinding", "Role"),
        ("ClusterRoleBinding", "ClusterRole"),
    ] {
        let binding = object("manifests/base/rbac.yaml", kind, "secrets-webhook");
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(binding["subjects"][0]["name"], "secrets-webhook");
    }
    // The management API adds exactly what it calls (src/api): delete replaced credentials
    // Secrets, write VaultConfigs, list pods for "in use", review tokens.
    let api_role = object(
        "manifests/components/management-api/rbac.yaml",
        "Role",
        "secrets-webhook-api",
    );
    assert_eq!(
        grants(&api_role),
        BTreeSet::from([
            grant("", "secrets", &["delete"]),
            grant("", "pods", &["list"]),
            grant(
                "secrets.iomete.com",
                "vaultconfigs",
                &["create", "patch", "delete"]
            ),
        ])
    );
    let api_cluster_role = object(
        "manifests/components/management-api/rbac.yaml",
        "ClusterRole",
        "secrets-webhook-api",
    );
    assert_eq!(
        grants(&api_cluster_role),
        BTreeSet::from([grant("authentication.k8s.io", "tokenreviews", &["create"])])
    );
    let sar = object(
        "manifests/components/sar-authorizer/rbac.yaml",
        "ClusterRole",
        "secrets-webhook-sar",
    );
    assert_eq!(
        grants(&sar),
        BTreeSet::from([grant(
            "authorization.k8s.io",
            "subjectaccessreviews",
            &["create"]
        )])
    );
}

#[test]
fn crds_serve_v1alpha1_of_secrets_iomete_com() {
    let kustomization = &documents("manifests/base/crds/kustomization.yaml")[0];
    assert_eq!(
        strings(&kustomization["resources"]),
        ["vaultconfigs.yaml", "resourcebundles.yaml"]
    );
    for (file, kind) in [
        ("vaultconfigs.yaml", "VaultConfig"),
        ("resourcebundles.yaml", "ResourceBundle"),
    ] {
        let crd = &documents(&format!("manifests/base/crds/{file}"))[0];
        assert_eq!(crd["spec"]["group"], "secrets.iomete.com");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], kind);
        assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
        assert!(crd["spec"]["versions"][0]["additionalPrinterColumns"].is_array());
    }
}

// --- examples -------------------------------------------------------------------------------

/// Checks one reference annotation value: a JSON array of `{key, secretObject{key, source{type, id}}}`.
fn check_json_refs(what: &str, value: &str) -> Vec<(String, String, String)> {
    let items: Vec<Value> =
        serde_json::from_str(value).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
    assert!(!items.is_empty(), "{what}: empty");
    items
        .iter()
        .map(|item| {
            let object = &item["secretObject"];
            let source_type = object["source"]["type"].as_str().unwrap_or_default();
            assert!(
                ["KUBERNETES", "VAULT"].contains(&source_type),
                "{what}: type {source_type}"
            );
            for field in [&item["key"], &object["key"], &object["source"]["id"]] {
                assert!(
                    field.as_str().is_some_and(|s| !s.is_empty()),
                    "{what}: {item}"
                );
            }
            (
                source_type.to_owned(),
                object["source"]["id"].as_str().unwrap().to_owned(),
                object["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Checks every reference annotation of a map; returns the (type, id, key) it references.
fn check_annotations(what: &str, annotations: &Value) -> Vec<(String, String, String)> {
    let mut refs = Vec::new();
    for (key, value) in annotations.as_object().unwrap() {
        let value = value.as_str().unwrap();
        if key == "secrets.iomete.com/env-secrets" || key == "secrets.iomete.com/spark-conf-secrets"
        {
            refs.extend(check_json_refs(&format!("{what} {key}"), value));
        } else if key.starts_with("env.secrets.iomete.com/")
            || key.starts_with("spark-conf.secrets.iomete.com/")
        {
            let (source_type, rest) = value.split_once(':').unwrap();
            let (id, key) = rest.split_once('/').unwrap();
            assert!(
                ["kubernetes", "vault"].contains(&source_type),
                "{what} {key}"
            );
            refs.push((source_type.to_uppercase(), id.to_owned(), key.to_owned()));
        }
    }
    assert!(!refs.is_empty(), "{what}: no references");
    refs
}

#[test]
fn example_annotations_are_valid_references_to_example_objects() {
    let pod = &documents("examples/spark-driver-pod.yaml")[0];
    let mut refs = check_annotations("driver pod", &pod["metadata"]["annotations"]);
    let app = &documents("examples/sparkapplication.yaml")[0];
    refs.extend(check_annotations(
        "SparkApplication driver",
        &app["spec"]["driver"]["annotations"],
    ));
    refs.extend(check_annotations(
        "SparkApplication executor",
        &app["spec"]["executor"]["annotations"],
    ));
    let values = &documents("examples/jupyterhub-values.yaml")[0];
    refs.extend(check_annotations(
        "JupyterHub values",
        &values["singleuser"]["extraAnnotations"],
    ));

    // Every Vault id is the example VaultConfig; every domain is governed by the example bundle.
    let vault = object(
        "examples/vaultconfig.yaml",
        "VaultConfig",
        "vault-prod-finance",
    );
    let bundle = object("examples/resourcebundle.yaml", "ResourceBundle", "finance");
    assert_eq!(vault["spec"]["resourceBundle"], "finance");
    let secret_ref = &vault["spec"]["auth"]["appRole"]["secretIdRef"];
    let credentials = object(
        "examples/vaultconfig.yaml",
        "Secret",
        secret_ref["name"].as_str().unwrap(),
    );
    assert!(credentials["stringData"][secret_ref["key"].as_str().unwrap()].is_string());
    let domains = strings(&bundle["spec"]["domains"]);
    for (source_type, id, _) in &refs {
        match source_type.as_str() {
            "VAULT" => assert_eq!(id, "vault-prod-finance"),
            _ => assert!(id == "global" || domains.contains(&id.as_str()), "{id}"),
        }
    }
    // The example pod must pass the API server's pre-filter.
    assert!(admitted_by_filter(pod));
}

// --- the CEL pre-filter ------------------------------------------------------------------------

fn filter() -> cel::Program {
    let hook = webhook();
    let expression = hook["matchConditions"][0]["expression"].as_str().unwrap();
    cel::Program::compile(expression).unwrap_or_else(|e| panic!("CEL does not parse: {e}"))
}

/// Evaluates the matchCondition with `object` bound to `pod`. An evaluation error fails the test:
/// with failurePolicy Fail the API server would reject the pod.
fn admitted_by_filter(pod: &Value) -> bool {
    let mut context = cel::Context::default();
    context.add_variable_from_value("object", cel::to_value(pod).unwrap());
    match filter().execute(&context) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("matchCondition must evaluate to a bool, got {other:?} for {pod}"),
    }
}

fn fixture(name: &str) -> Value {
    let path = repo(&format!("tests/fixtures/pods/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn nginx() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27",
                                 "env": [{"name": "MODE", "value": "prod"}],
                                 "ports": [{"containerPort": 80}]}]}
    })
}

fn with(mut pod: Value, pointer: &str, value: Value) -> Value {
    // Creates missing parents (objects) along the pointer, like `kubectl patch` would.
    let mut node = &mut pod;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let part = part.replace("~1", "/").replace("~0", "~");
        if i == parts.len() - 1 {
            match node {
                Value::Array(items) => items.push(value.clone()),
                Value::Object(map) => {
                    map.insert(part, value.clone());
                }
                _ => panic!("{pointer}"),
            }
        } else {
            node = match node {
                Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
                Value::Object(map) => map.entry(part).or_insert_with(|| json!({})),
                _ => panic!("{pointer}"),
            };
        }
    }
    pod
}

#[test]
fn filter_lets_through_the_real_spark_and_jupyter_pods_by_their_labels() {
    for name in [
        "spark35-driver-submit",
        "spark35-executor-submit",
        "jupyterhub-singleuser-z2jh",
    ] {
        let pod = fixture(name);
        assert!(admitted_by_filter(&pod), "{name}");
    }
    // Enterprise Gateway kernels and explicitly labelled pods.
    let kernel = with(nginx(), "/metadata/labels/component", json!("kernel"));
    assert!(admitted_by_filter(&kernel));
    let workload = with(
        nginx(),
        "/metadata/labels/secrets.iomete.com~1workload",
        json!("jupyter"),
    );
    assert!(admitted_by_filter(&workload));
    let opted_in = with(
        nginx(),
        "/metadata/labels/secrets.iomete.com~1inject",
        json!("true"),
    );
    assert!(admitted_by_filter(&opted_in));
}

#[test]
fn filter_drops_pods_that_cannot_matter() {
    assert!(!admitted_by_filter(&nginx()));
    let other_component = with(nginx(), "/metadata/labels/component", json!("proxy"));
    assert!(!admitted_by_filter(&other_component));
    let other_annotation = with(
        nginx(),
        "/metadata/annotations/example.com~1secrets",
        json!("x"),
    );
    assert!(!admitted_by_filter(&other_annotation));
    let other_secret = with(
        nginx(),
        "/spec/containers/0/env/-",
        json!({"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "password"}}}),
    );
    assert!(!admitted_by_filter(&other_secret));
    let configmap = with(
        nginx(),
        "/spec/containers/0/env/-",
        json!({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "iomete-secret-store", "key": "k"}}}),
    );
    assert!(!admitted_by_filter(&configmap));
    let dollar = with(
        nginx(),
        "/spec/containers/0/args",
        json!(["--value=$(HOME)", "${HOME}"]),
    );
    assert!(!admitted_by_filter(&dollar));
}

#[test]
fn filter_lets_through_reference_annotations_on_any_pod() {
    for (key, value) in [
        (
            "secrets.iomete.com~1env-secrets",
            r#"[{"key":"DB_PASSWORD","secretObject":{"key":"db_password","source":{"type":"KUBERNETES","id":"finance"}}}]"#,
        ),
        ("secrets.iomete.com~1spark-conf-secrets", "[]"),
        (
            "env.secrets.iomete.com~1DB_PASSWORD",
            "kubernetes:finance/db_password",
        ),
        (
            "spark-conf.secrets.iomete.com~1spark.hadoop.fs.s3a.secret.key",
            "vault:vault-prod-finance/s3_secret",
        ),
    ] {
        let pod = with(
            nginx(),
            &format!("/metadata/annotations/{key}"),
            json!(value),
        );
        assert!(admitted_by_filter(&pod), "{key}");
    }
    // The real pods without their workload labels: the annotation alone is enough.
    for name in ["spark35-driver-submit", "jupyterhub-singleuser-z2jh"] {
        let mut pod = fixture(name);
        pod["metadata"]["labels"] = json!({});
        assert!(!admitted_by_filter(&pod), "{name} without labels");
        let pod = with(
            pod,
            "/metadata/annotations/env.secrets.iomete.com~1DB_PASSWORD",
            json!("kubernetes:finance/db_password"),
        );
        assert!(
            admitted_by_filter(&pod),
            "{name} with a reference annotation"
        );
    }
}

#[test]
fn filter_lets_through_legacy_placeholders() {
    let env = with(
        nginx(),
        "/spec/containers/0/env/-",
        json!({"name": "DB_PASSWORD", "value": "${secrets.db_password}"}),
    );
    assert!(admitted_by_filter(&env));
    let embedded = with(
        nginx(),
        "/spec/containers/0/env/-",
        json!({"name": "URL", "value": "jdbc:postgresql://db/x?password=${secrets.db_password}"}),
    );
    assert!(admitted_by_filter(&embedded));
    let args = with(
        nginx(),
        "/spec/containers/0/args",
        json!(["--password", "${secrets.pw}"]),
    );
    assert!(admitted_by_filter(&args));
    let init = with(
        nginx(),
        "/spec/initContainers",
        json!([{"name": "init", "image": "busybox", "env": [{"name": "P", "value": "${secrets.p}"}]}]),
    );
    assert!(admitted_by_filter(&init));
}

#[test]
fn filter_lets_through_direct_references_to_managed_secrets_for_the_guard() {
    let cases = [
        (
            "/spec/containers/0/env/-",
            json!({"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-finance", "key": "db_password"}}}),
        ),
        (
            "/spec/containers/0/env/-",
            json!({"name": "G", "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store", "key": "g"}}}),
        ),
        (
            "/spec/containers/0/envFrom",
            json!([{"secretRef": {"name": "iomete-vault-vault-prod-finance"}}]),
        ),
        (
            "/spec/volumes",
            json!([{"name": "s", "secret": {"secretName": "iomete-secret-store-finance"}}]),
        ),
        (
            "/spec/volumes",
            json!([{"name": "p", "projected": {"sources": [
                {"configMap": {"name": "x"}},
                {"secret": {"name": "iomete-vault-x"}}]}}]),
        ),
        (
            "/spec/initContainers",
            json!([{"name": "init", "image": "busybox",
                    "envFrom": [{"secretRef": {"name": "iomete-secret-store-finance"}}]}]),
        ),
    ];
    for (pointer, value) in cases {
        let pod = with(nginx(), pointer, value.clone());
        assert!(admitted_by_filter(&pod), "{pointer} {value}");
    }
    // Field shapes the API server accepts but that omit optional names must not make CEL fail.
    let unnamed = with(
        nginx(),
        "/spec/volumes",
        json!([{"name": "s", "secret": {}}, {"name": "e", "emptyDir": {}},
               {"name": "p", "projected": {"sources": [{"secret": {}}]}}]),
    );
    let unnamed = with(
        unnamed,
        "/spec/containers/0/envFrom",
        json!([{"secretRef": {}}, {"configMapRef": {"name": "c"}}]),
    );
    let unnamed = with(
        unnamed,
        "/spec/containers/0/env/-",
        json!({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    );
    // Admission runs before validation, so even a nameless secretKeyRef reaches the condition.
    let unnamed = with(
        unnamed,
        "/spec/containers/0/env/-",
        json!({"name": "S", "valueFrom": {"secretKeyRef": {"key": "k"}}}),
    );
    assert!(!admitted_by_filter(&unnamed));
}

#[test]
fn vaultconfig_crd_rule_requires_exactly_one_auth_method() {
    let crd = &documents("manifests/base/crds/vaultconfigs.yaml")[0];
    let auth = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["auth"];
    let rule = auth["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap();
    let program = cel::Program::compile(rule).unwrap();
    let holds = |value: &Value| {
        let mut context = cel::Context::default();
        context.add_variable_from_value("self", cel::to_value(value).unwrap());
        program.execute(&context).unwrap() == cel::Value::Bool(true)
    };
    let example = object(
        "examples/vaultconfig.yaml",
        "VaultConfig",
        "vault-prod-finance",
    );
    assert!(holds(&example["spec"]["auth"]));
    let token = json!({"token": {"secretRef": {"name": "t", "key": "token"}}});
    assert!(holds(&token));
    let both = json!({"token": token["token"], "appRole": example["spec"]["auth"]["appRole"]});
    assert!(!holds(&both));
    assert!(!holds(&json!({})));
}

/// Every property path under `.spec` (and `.status`) of a CRD's schema, e.g. `spec.auth.token.secretRef.name`.
fn schema_paths(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            let path = format!("{prefix}.{name}");
            out.insert(path.clone());
            schema_paths(sub, &path, out);
        }
    }
    if schema["items"].is_object() {
        schema_paths(&schema["items"], &format!("{prefix}[]"), out);
    }
}

fn crd_paths(crd: &Value) -> BTreeSet<String> {
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut out = BTreeSet::new();
    schema_paths(&schema["properties"]["spec"], "spec", &mut out);
    out
}

/// The shipped CRDs (hand-written for their printer columns and descriptions) accept exactly the
/// fields the code reads: no drift between `manifests/` and the Rust types.
#[test]
fn shipped_crds_have_the_fields_of_the_rust_types() {
    use kube::CustomResourceExt as _;
    let generated = [
        (
            "manifests/base/crds/vaultconfigs.yaml",
            serde_json::to_value(secrets_webhook::backends::vault::VaultConfig::crd()).unwrap(),
        ),
        (
            "manifests/base/crds/resourcebundles.yaml",
            serde_json::to_value(secrets_webhook::authz::ras::ResourceBundle::crd()).unwrap(),
        ),
    ];
    for (path, generated) in generated {
        let shipped = &documents(path)[0];
        assert_eq!(
            shipped["metadata"]["name"], generated["metadata"]["name"],
            "{path}"
        );
        assert_eq!(
            shipped["spec"]["versions"][0]["name"], generated["spec"]["versions"][0]["name"],
            "{path}"
        );
        assert_eq!(
            crd_paths(shipped),
            crd_paths(&generated),
            "{path}: fields differ from the Rust type"
        );
    }
}

/// The shipped config file is what `serve` reads at start in a cluster: it must load, and its
/// trusted controllers must be valid (or the webhook would not start).
#[test]
fn shipped_config_file_loads_with_valid_trusted_controllers() {
    let config =
        secrets_webhook::config::LocalConfig::load(&repo("manifests/base/config.yaml")).unwrap();
    assert!(!config.trusted_controllers.is_empty());
    secrets_webhook::identity::TrustedControllers::new(config.trusted_controllers).unwrap();
    let dev =
        secrets_webhook::config::LocalConfig::load(&repo("examples/dev-config.yaml")).unwrap();
    secrets_webhook::identity::TrustedControllers::new(dev.trusted_controllers).unwrap();
}

// --- the validating webhooks: updates that could undo an admission, SparkApplications ---------

fn validating(name: &str) -> Value {
    let config = object(
        "manifests/base/validatingwebhookconfiguration.yaml",
        "ValidatingWebhookConfiguration",
        "secrets-webhook",
    );
    config["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no webhook {name}"))
        .clone()
}

#[test]
fn updates_and_spark_applications_are_registered_fail_closed() {
    let pods = validating("pod-updates.secrets.iomete.com");
    let apps = validating("sparkapplications.secrets.iomete.com");
    for hook in [&pods, &apps] {
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"]);
        assert_eq!(hook["clientConfig"]["service"]["path"], "/validate");
        assert_eq!(hook["clientConfig"]["service"]["name"], "secrets-webhook");
        assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 5);
        assert_eq!(hook["matchConditions"].as_array().unwrap().len(), 1);
    }
    let rule = &pods["rules"][0];
    assert_eq!(strings(&rule["operations"]), ["UPDATE"]);
    assert_eq!(
        strings(&rule["resources"]),
        ["pods", "pods/status", "pods/ephemeralcontainers"]
    );
    let rule = &apps["rules"][0];
    assert_eq!(strings(&rule["operations"]), ["CREATE", "UPDATE"]);
    assert_eq!(strings(&rule["apiGroups"]), ["sparkoperator.k8s.io"]);
    assert_eq!(
        strings(&rule["resources"]),
        ["sparkapplications", "scheduledsparkapplications"]
    );
    // The same namespaces as the mutating webhook: an update in a namespace where pods were
    // admitted is checked there too.
    assert_eq!(pods["namespaceSelector"], webhook()["namespaceSelector"]);
}

fn stamped_driver() -> Value {
    let mut pod = fixture("spark35-driver-submit");
    pod["metadata"]["annotations"] = json!({
        "secrets.iomete.com/identity": r#"{"user":"alice","groups":[]}"#,
        "secrets.iomete.com/granted": r#"["kubernetes:finance/db_password"]"#,
        "secrets.iomete.com/signature": "v1.n.0123456789abcdef.mac",
    });
    pod
}

fn update_reaches_webhook(old: &Value, new: &Value, sub_resource: &str) -> bool {
    let hook = validating("pod-updates.secrets.iomete.com");
    let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
    // As the API server sends it: no subResource for the main resource.
    let request = if sub_resource.is_empty() {
        json!({"operation": "UPDATE"})
    } else {
        json!({"operation": "UPDATE", "subResource": sub_resource})
    };
    cel_policy::holds(
        condition,
        &[("object", new), ("oldObject", old), ("request", &request)],
    )
}

#[test]
fn updates_that_could_undo_an_admission_reach_the_webhook_and_no_others() {
    let old = stamped_driver();
    // Attack: `kubectl annotate` (or a pods/status patch) of the stamps: added, changed, removed.
    for key in [
        "secrets.iomete.com/identity",
        "secrets.iomete.com/granted",
        "secrets.iomete.com/signature",
    ] {
        let mut changed = old.clone();
        changed["metadata"]["annotations"][key] = json!("forged");
        assert!(update_reaches_webhook(&old, &changed, ""), "{key} changed");
        assert!(
            update_reaches_webhook(&old, &changed, "status"),
            "{key} via status"
        );
        let mut removed = old.clone();
        removed["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(key);
        assert!(update_reaches_webhook(&old, &removed, ""), "{key} removed");
        let plain = fixture("spark35-driver-submit");
        let mut added = plain.clone();
        added["metadata"]["annotations"] = json!({key: "forged"});
        assert!(update_reaches_webhook(&plain, &added, ""), "{key} added");
    }
    // Attack: a new image for a pod that holds granted secrets.
    let mut swapped = old.clone();
    swapped["spec"]["containers"][0]["image"] = json!("evil:latest");
    assert!(update_reaches_webhook(&old, &swapped, ""));
    // Ephemeral containers, always.
    assert!(update_reaches_webhook(&old, &old, "ephemeralcontainers"));
    let plain = fixture("spark35-driver-submit");
    assert!(update_reaches_webhook(
        &plain,
        &plain,
        "ephemeralcontainers"
    ));

    // Everything else never depends on the webhook: the kubelet's status, labels, other
    // annotations, an image change of a pod without grants.
    let mut status = old.clone();
    status["status"] = json!({"phase": "Running"});
    assert!(!update_reaches_webhook(&old, &status, "status"));
    let mut labelled = old.clone();
    labelled["metadata"]["labels"]["x"] = json!("y");
    labelled["metadata"]["annotations"]["other"] = json!("z");
    assert!(!update_reaches_webhook(&old, &labelled, ""));
    let mut ungranted = old.clone();
    ungranted["metadata"]["annotations"]["secrets.iomete.com/granted"] = json!("[]");
    let mut ungranted_swapped = ungranted.clone();
    ungranted_swapped["spec"]["containers"][0]["image"] = json!("other:1");
    assert!(!update_reaches_webhook(&ungranted, &ungranted_swapped, ""));
    assert!(!update_reaches_webhook(&plain, &plain, ""));
}

#[test]
fn spark_application_spec_changes_reach_the_webhook_metadata_changes_do_not() {
    let hook = validating("sparkapplications.secrets.iomete.com");
    let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
    let app = json!({"metadata": {"name": "a"}, "spec": {"driver": {"annotations": {"x": "y"}}}});
    let reaches = |old: &Value, new: &Value, op: &str| {
        cel_policy::holds(
            condition,
            &[
                ("object", new),
                ("oldObject", old),
                ("request", &json!({"operation": op})),
            ],
        )
    };
    assert!(reaches(&Value::Null, &app, "CREATE"));
    let mut changed = app.clone();
    changed["spec"]["driver"]["annotations"]["secrets.iomete.com/run-as"] = json!("bob");
    assert!(reaches(&app, &changed, "UPDATE"));
    let mut finalized = app.clone();
    finalized["metadata"]["finalizers"] = json!(["sparkoperator.k8s.io/finalizer"]);
    assert!(!reaches(&app, &finalized, "UPDATE"));
}

// --- the data-plane ValidatingAdmissionPolicies ---------------------------------------------------

fn data_plane(kind: &str, name: &str) -> Value {
    object("manifests/base/data-plane-policy.yaml", kind, name)
}

fn data_plane_params() -> Value {
    data_plane("ConfigMap", "secrets-webhook-data-plane")
}

fn request(resource: &str, operation: &str, user: &str, groups: &[&str]) -> Value {
    // No subResource: the API server leaves it out for the main resource.
    json!({"operation": operation, "resource": {"resource": resource},
           "userInfo": {"username": user, "groups": groups}})
}

const TENANT: &str = "system:serviceaccount:iomete-system:spark";

#[test]
fn data_plane_pods_run_only_as_listed_service_accounts() {
    let policy = data_plane(
        "ValidatingAdmissionPolicy",
        "secrets-webhook-data-plane-pods",
    );
    let params = data_plane_params();
    let decide = |pod: &Value, user: &str, groups: &[&str]| {
        cel_policy::evaluate(
            &policy,
            pod,
            &Value::Null,
            &request("pods", "CREATE", user, groups),
            &params,
        )
    };
    let with_sa = |sa: Option<&str>| {
        let mut pod = fixture("spark35-driver-submit");
        let spec = pod["spec"].as_object_mut().unwrap();
        spec.remove("serviceAccount");
        spec.remove("serviceAccountName");
        if let Some(sa) = sa {
            spec.insert("serviceAccountName".into(), json!(sa));
        }
        pod
    };
    // The real Spark driver runs as spark: fine. No service account means default: fine.
    assert_eq!(
        decide(&with_sa(Some("spark")), TENANT, &[]),
        Verdict::Allowed
    );
    assert_eq!(decide(&with_sa(None), TENANT, &[]), Verdict::Allowed);
    // Attack: a pod running as the webhook's or the control plane's service account.
    for sa in [
        "secrets-webhook",
        "iomete-control-plane",
        "cluster-admin-sa",
    ] {
        match decide(&with_sa(Some(sa)), TENANT, &["system:serviceaccounts"]) {
            Verdict::Denied(m) => {
                assert!(m.contains(&format!("service account {sa} is not")), "{m}")
            }
            other => panic!("{sa}: {other:?}"),
        }
        // Admins (and the controllers that copy admin-written templates) may.
        assert_eq!(
            decide(&with_sa(Some(sa)), "ops", &["system:masters"]),
            Verdict::Allowed
        );
        assert_eq!(
            decide(
                &with_sa(Some(sa)),
                "system:serviceaccount:kube-system:replicaset-controller",
                &[]
            ),
            Verdict::Allowed
        );
    }
    // "Never" means never: listing a forbidden account does not allow it.
    let mut listed = params.clone();
    listed["data"]["serviceAccounts"] = json!("spark,secrets-webhook");
    assert!(matches!(
        cel_policy::evaluate(
            &policy,
            &with_sa(Some("secrets-webhook")),
            &Value::Null,
            &request("pods", "CREATE", TENANT, &[]),
            &listed
        ),
        Verdict::Denied(_)
    ));
}

#[test]
fn data_plane_workload_templates_are_checked_and_their_metadata_updates_are_not() {
    let policy = data_plane(
        "ValidatingAdmissionPolicy",
        "secrets-webhook-data-plane-pods",
    );
    let params = data_plane_params();
    let template = json!({"metadata": {"labels": {"a": "b"}},
        "spec": {"serviceAccountName": "secrets-webhook", "containers": [{"name": "c", "image": "x"}]}});
    let workloads = [
        (
            "deployments",
            json!({"spec": {"template": template.clone()}}),
        ),
        (
            "replicasets",
            json!({"spec": {"template": template.clone()}}),
        ),
        (
            "statefulsets",
            json!({"spec": {"template": template.clone()}}),
        ),
        (
            "daemonsets",
            json!({"spec": {"template": template.clone()}}),
        ),
        ("jobs", json!({"spec": {"template": template.clone()}})),
        (
            "replicationcontrollers",
            json!({"spec": {"template": template.clone()}}),
        ),
        (
            "cronjobs",
            json!({"spec": {"jobTemplate": {"spec": {"template": template.clone()}}}}),
        ),
        ("podtemplates", json!({"template": template.clone()})),
    ];
    for (resource, object) in workloads {
        let tenant = request(resource, "CREATE", "alice", &["system:authenticated"]);
        assert!(
            matches!(
                cel_policy::evaluate(&policy, &object, &Value::Null, &tenant, &params),
                Verdict::Denied(_)
            ),
            "{resource}"
        );
        let admin = request(resource, "CREATE", "ops", &["system:masters"]);
        assert_eq!(
            cel_policy::evaluate(&policy, &object, &Value::Null, &admin, &params),
            Verdict::Allowed,
            "{resource}"
        );
        // An update that leaves the template alone (the garbage collector, a label) is not
        // checked again; one that changes it is.
        let mut labelled = object.clone();
        labelled["metadata"] = json!({"labels": {"x": "y"}});
        let update = request(
            resource,
            "UPDATE",
            "system:serviceaccount:kube-system:generic-garbage-collector",
            &[],
        );
        assert_eq!(
            cel_policy::evaluate(&policy, &labelled, &object, &update, &params),
            Verdict::NotMatched,
            "{resource}"
        );
    }
    // Pods: only CREATE and ephemeral containers; their other updates are never re-checked.
    let pod = json!({"spec": {"serviceAccountName": "secrets-webhook", "containers": []}});
    let relabel = request("pods", "UPDATE", TENANT, &[]);
    assert_eq!(
        cel_policy::evaluate(&policy, &pod, &pod, &relabel, &params),
        Verdict::NotMatched
    );
    let mut debug = relabel.clone();
    debug["subResource"] = json!("ephemeralcontainers");
    let mut with_ephemeral = json!({"spec": {"serviceAccountName": "spark", "containers": [],
        "ephemeralContainers": [{"name": "d", "envFrom": [{"secretRef": {"name": "vault-prod-finance-credentials"}}]}]}});
    assert!(matches!(
        cel_policy::evaluate(&policy, &with_ephemeral, &pod, &debug, &params),
        Verdict::Denied(m) if m.contains("vault-prod-finance-credentials")
    ));
    with_ephemeral["spec"]["ephemeralContainers"][0]["envFrom"] = json!([]);
    assert_eq!(
        cel_policy::evaluate(&policy, &with_ephemeral, &pod, &debug, &params),
        Verdict::Allowed
    );
}

#[test]
fn vault_credentials_may_not_be_secrets_pods_may_name() {
    let policy = data_plane(
        "ValidatingAdmissionPolicy",
        "secrets-webhook-vault-credentials",
    );
    let mut params = data_plane_params();
    params["data"]["secrets"] = json!("regcred, shared-creds");
    let config = |name: &str, approle: bool| {
        if approle {
            json!({"spec": {"auth": {"appRole": {"roleId": "r", "secretIdRef": {"name": name, "key": "k"}}}}})
        } else {
            json!({"spec": {"auth": {"token": {"secretRef": {"name": name, "key": "k"}}}}})
        }
    };
    let req = request("vaultconfigs", "CREATE", "ops", &["system:masters"]);
    for approle in [true, false] {
        assert_eq!(
            cel_policy::evaluate(
                &policy,
                &config("vault-creds", approle),
                &Value::Null,
                &req,
                &params
            ),
            Verdict::Allowed
        );
        assert!(matches!(
            cel_policy::evaluate(
                &policy,
                &config("shared-creds", approle),
                &Value::Null,
                &req,
                &params
            ),
            Verdict::Denied(_)
        ));
    }
}

#[test]
fn data_plane_policies_are_bound_to_the_data_plane_namespace_with_their_params() {
    let namespace = documents("manifests/base/kustomization.yaml")[0]["namespace"].clone();
    for name in [
        "secrets-webhook-data-plane-pods",
        "secrets-webhook-vault-credentials",
    ] {
        let policy = data_plane("ValidatingAdmissionPolicy", name);
        assert_eq!(policy["spec"]["failurePolicy"], "Fail", "{name}");
        assert_eq!(policy["spec"]["paramKind"]["kind"], "ConfigMap", "{name}");
        let binding = data_plane("ValidatingAdmissionPolicyBinding", name);
        assert_eq!(binding["spec"]["policyName"], name);
        assert_eq!(strings(&binding["spec"]["validationActions"]), ["Deny"]);
        let param = &binding["spec"]["paramRef"];
        assert_eq!(param["name"], "secrets-webhook-data-plane");
        assert_eq!(
            param["namespace"], namespace,
            "kustomize does not rewrite paramRef"
        );
        assert_eq!(param["parameterNotFoundAction"], "Deny");
        assert_eq!(
            binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            namespace
        );
    }
    // The webhook's own Secrets are never allowed, whatever is listed.
    let params = data_plane_params();
    let forbidden = params["data"]["forbiddenSecrets"].as_str().unwrap();
    let deploy = deployment();
    for volume in deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
    {
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            assert!(forbidden.contains(secret), "{secret}");
        }
    }
    let sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    assert!(
        params["data"]["forbiddenServiceAccounts"]
            .as_str()
            .unwrap()
            .contains(sa)
    );
}

#[test]
fn the_signing_key_is_mounted_where_serve_reads_it_and_never_defaulted() {
    let deploy = deployment();
    let pod = &deploy["spec"]["template"]["spec"];
    let parsed = serve_args(&[]);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "signing-key")
        .unwrap();
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()),
        parsed.signing_key_dir
    );
    assert!(mount.get("subPath").is_none());
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "signing-key")
        .unwrap();
    assert_eq!(
        volume["secret"]["secretName"],
        "secrets-webhook-signing-key"
    );
    // Optional: without it the webhook starts but is not ready (tested in tls_server.rs).
    assert_eq!(volume["secret"]["optional"], true);
    assert!(!parsed.allow_unbound_executor_tokens);
    // The cluster config file carries no key.
    let config =
        secrets_webhook::config::LocalConfig::load(&repo("manifests/base/config.yaml")).unwrap();
    assert!(config.signing_keys.is_none());
}

#[test]
fn the_webhooks_own_objects_are_written_by_admins_only() {
    let policy = data_plane("ValidatingAdmissionPolicy", "secrets-webhook-own-objects");
    let params = data_plane_params();
    let req = |resource: &str, name: &str, operation: &str, user: &str, groups: &[&str]| {
        json!({"operation": operation, "name": name, "resource": {"resource": resource},
               "userInfo": {"username": user, "groups": groups}})
    };
    let decide =
        |request: &Value| cel_policy::evaluate(&policy, &json!({}), &json!({}), request, &params);
    // Attack: code in a driver (whose account must write ConfigMaps) widens the lists, or makes
    // itself a trusted controller, or replaces the signing key.
    for (resource, name) in [
        ("configmaps", "secrets-webhook-data-plane"),
        ("configmaps", "secrets-webhook-config-5hm2t9bk"),
        ("configmaps", "secrets-webhook-config"),
        ("secrets", "secrets-webhook-signing-key"),
        ("services", "secrets-webhook"),
    ] {
        for operation in ["CREATE", "UPDATE", "DELETE"] {
            let tenant = req(
                resource,
                name,
                operation,
                TENANT,
                &["system:serviceaccounts"],
            );
            assert!(
                matches!(decide(&tenant), Verdict::Denied(m) if m.contains(name)),
                "{operation} {resource}/{name}"
            );
            let admin = req(resource, name, operation, "ops", &["system:masters"]);
            assert_eq!(
                decide(&admin),
                Verdict::Allowed,
                "{operation} {resource}/{name}"
            );
        }
    }
    // Everything else is left to RBAC: Spark's own ConfigMaps, other Secrets (the TLS Secret is
    // written by cert-manager).
    for (resource, name) in [
        ("configmaps", "spark-drv-7f3c-conf-map"),
        ("secrets", "secrets-webhook-tls"),
        ("secrets", "iomete-secret-store-finance"),
    ] {
        let tenant = req(resource, name, "UPDATE", TENANT, &[]);
        assert_eq!(decide(&tenant), Verdict::NotMatched, "{resource}/{name}");
    }
}
