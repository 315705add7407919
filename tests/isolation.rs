//! Tenant isolation (issue 11) on a real kube-apiserver (scripts/kube-e2e.sh, the shipped chart):
//! each attack of the attack reviews, done the way a tenant would with real kubectl, impersonation
//! and ServiceAccount tokens, against the registered webhooks and ValidatingAdmissionPolicies.
//! docs/authorization.md's threat model names these tests. Without the Kubernetes binaries every
//! test prints a SKIP line.

mod support;

use std::sync::OnceLock;

use serde_json::{Value, json};
use support::kube_e2e::{self, Cluster, NS, unique};
use support::podspec_probe::secret_naming_fields;

const MUTATING: &str = "admission webhook \"pods.secrets.iomete.com\" denied the request";
const UPDATES: &str = "admission webhook \"pod-updates.secrets.iomete.com\" denied the request";
const APPS: &str = "admission webhook \"sparkapplications.secrets.iomete.com\" denied the request";
const POLICY: &str = "ValidatingAdmissionPolicy 'secrets-webhook-data-plane-pods'";

/// The cluster, with what every test here uses: a domain store and bundle granting alice, the
/// `spark` ServiceAccount with the tenant role, the webhook's and the control plane's
/// ServiceAccounts, the subresources and workloads a tenant with a broad namespace role has, and
/// SparkApplication CRDs (the operator's, schemaless here).
fn cluster(test: &str) -> Option<&'static Cluster> {
    let k = kube_e2e::cluster(test)?;
    static FIXTURES: OnceLock<()> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        k.apply(&format!(
            "apiVersion: v1
kind: Secret
metadata: {{name: iomete-secret-store-finance, namespace: {NS}}}
stringData: {{db_password: canary-finance-db-Zq81}}
---
apiVersion: v1
kind: Secret
metadata: {{name: vault-prod-finance-credentials, namespace: {NS}}}
stringData: {{secret-id: canary-vault-cred-Zq81}}
---
apiVersion: secrets.iomete.com/v1alpha1
kind: ResourceBundle
metadata: {{name: finance-bundle, namespace: {NS}}}
spec: {{domains: [finance], grants: [{{subjects: [{{kind: User, name: alice}}], permissions: [use]}}]}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: spark, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: iomete-control-plane, namespace: {NS}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: isolation-tenant-extras}}
rules:
- apiGroups: ['']
  resources: [pods/status, pods/ephemeralcontainers]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: ['*']
- apiGroups: [batch]
  resources: [cronjobs, jobs]
  verbs: ['*']
- apiGroups: [sparkoperator.k8s.io]
  resources: [sparkapplications, scheduledsparkapplications]
  verbs: ['*']
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: isolation-tenant-extras, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: isolation-tenant-extras}}
subjects:
- {{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}}
- {{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}}
- {{kind: ServiceAccount, name: spark, namespace: {NS}}}
- {{kind: ServiceAccount, name: iomete-control-plane, namespace: {NS}}}
"
        ));
        k.bind_tenant_service_account(NS, "spark");
        for (kind, plural) in [
            ("SparkApplication", "sparkapplications"),
            ("ScheduledSparkApplication", "scheduledsparkapplications"),
        ] {
            k.apply(
                &json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                    "metadata": {"name": format!("{plural}.sparkoperator.k8s.io"),
                        // *.k8s.io groups need it; the operator's own CRD carries an approval.
                        "annotations": {"api-approved.kubernetes.io": "unapproved, a test stand-in for the Spark operator's CRD"}},
                    "spec": {"group": "sparkoperator.k8s.io", "scope": "Namespaced",
                        "names": {"kind": kind, "plural": plural},
                        "versions": [{"name": "v1beta2", "served": true, "storage": true,
                            "schema": {"openAPIV3Schema": {"type": "object",
                                "x-kubernetes-preserve-unknown-fields": true}}}]}})
                .to_string(),
            );
        }
        k.wait_until("the SparkApplication CRD is served", || {
            k.kubectl()
                .args(["get", "sparkapplications", "-A"])
                .run()
                .success
        });
    });
    Some(k)
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/pods/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The real Spark driver, renamed, in `namespace`, asking for `annotations`.
fn driver(namespace: &str, annotations: Value) -> Value {
    let mut pod = fixture("spark35-driver-submit.json");
    pod["metadata"]["name"] = json!(unique("driver"));
    pod["metadata"]["namespace"] = json!(namespace);
    pod["metadata"]["annotations"] = annotations;
    pod
}

fn finance() -> Value {
    json!({"env.secrets.iomete.com/DB_PASSWORD": "kubernetes:finance/db_password"})
}

fn name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap()
}

fn create_as(k: &Cluster, object: &Value, user: &str) -> Result<Value, String> {
    let run = k
        .kubectl()
        .user(user, &[])
        .args(["create", "-o", "json", "-f", "-"])
        .stdin(object.to_string())
        .run();
    if run.success {
        Ok(serde_json::from_str(&run.stdout).unwrap())
    } else {
        Err(run.stderr)
    }
}

/// Creates once the webhook's watches see this test's objects (a server-side dry run first).
fn create_when_ready(k: &Cluster, object: &Value, user: &str) -> Value {
    k.eventually("admitted", || {
        let run = k
            .kubectl()
            .user(user, &[])
            .args(["create", "--dry-run=server", "-o", "name", "-f", "-"])
            .stdin(object.to_string())
            .run();
        if run.success { Ok(()) } else { Err(run.stderr) }
    });
    create_as(k, object, user).unwrap_or_else(|e| panic!("create: {e}"))
}

/// `kubectl patch` of a pod as `user` (merge patch, optionally of a subresource).
fn patch_as(
    k: &Cluster,
    namespace: &str,
    pod: &str,
    user: &str,
    subresource: Option<&str>,
    patch: Value,
) -> Result<String, String> {
    let mut args = vec![
        "patch".to_string(),
        "pod".into(),
        pod.into(),
        "--type=merge".into(),
        "-p".into(),
        patch.to_string(),
    ];
    if let Some(sub) = subresource {
        args.push(format!("--subresource={sub}"));
    }
    let run = k.kubectl().user(user, &[]).ns(namespace).args(args).run();
    if run.success {
        Ok(run.stdout)
    } else {
        Err(run.stderr)
    }
}

/// Attack 1: `kubectl annotate` of one's own driver with identity and grants (through the main
/// resource or pods/status), and the other updates that would run new code next to granted
/// secrets (attack 4: ephemeral containers; a new image).
#[test]
fn a_pods_admission_cannot_be_undone_by_updates() {
    let Some(k) = cluster("a_pods_admission_cannot_be_undone_by_updates") else {
        return;
    };
    let _shared = k.shared();
    let stored = create_when_ready(k, &driver(NS, finance()), "alice");
    let pod = name(&stored).to_owned();
    let annotations = &stored["metadata"]["annotations"];
    assert_eq!(
        annotations["secrets.iomete.com/granted"],
        r#"["kubernetes:finance/db_password"]"#
    );
    assert!(
        annotations["secrets.iomete.com/signature"]
            .as_str()
            .unwrap()
            .starts_with("v1.n."),
        "{annotations}"
    );

    for (key, value) in [
        (
            "secrets.iomete.com/granted",
            json!(r#"["kubernetes:finance/db_password","kubernetes:hr/salaries"]"#),
        ),
        (
            "secrets.iomete.com/identity",
            json!(r#"{"user":"root","groups":["system:masters"]}"#),
        ),
        ("secrets.iomete.com/signature", Value::Null),
    ] {
        for subresource in [None, Some("status")] {
            let error = patch_as(
                k,
                NS,
                &pod,
                "alice",
                subresource,
                json!({"metadata": {"annotations": {key: value.clone()}}}),
            )
            .unwrap_err();
            assert!(error.contains(UPDATES), "{key} {subresource:?}: {error}");
            assert!(
                error.contains("cannot be added, changed or removed"),
                "{error}"
            );
        }
    }
    // Added to a pod that never had them.
    let plain = create_when_ready(k, &driver(NS, json!({})), "alice");
    let error = patch_as(
        k,
        NS,
        name(&plain),
        "alice",
        None,
        json!({"metadata": {"annotations": {"secrets.iomete.com/granted": r#"["kubernetes:finance/db_password"]"#}}}),
    )
    .unwrap_err();
    assert!(error.contains(UPDATES), "{error}");
    // Other metadata updates of the granted pod are fine (and never reach the webhook).
    patch_as(
        k,
        NS,
        &pod,
        "alice",
        None,
        json!({"metadata": {"labels": {"team": "x"}}}),
    )
    .unwrap();

    // A new image for a pod holding granted secrets: denied; for the plain pod: fine.
    let image = |pod: &str| {
        k.kubectl()
            .user("bob", &[])
            .ns(NS)
            .args([
                "set",
                "image",
                &format!("pod/{pod}"),
                "spark-kubernetes-driver=evil:1",
            ])
            .run()
    };
    let error = image(&pod).err();
    assert!(
        error.contains(UPDATES) && error.contains(".image cannot change"),
        "{error}"
    );
    assert!(image(name(&plain)).success);

    // Ephemeral containers: none on a pod holding granted secrets.
    let debug = |pod: &str, env: Value| {
        let patch = json!({"spec": {"ephemeralContainers": [
            {"name": unique("debug"), "image": "busybox", "targetContainerName": "spark-kubernetes-driver",
             "env": env}]}});
        k.kubectl()
            .user("bob", &[])
            .ns(NS)
            .args([
                "patch",
                &format!("pod/{pod}"),
                "--subresource=ephemeralcontainers",
                "--type=strategic",
                "-p",
                &patch.to_string(),
            ])
            .run()
    };
    let error = debug(&pod, json!([])).err();
    assert!(
        error.contains(UPDATES) && error.contains("ephemeral containers cannot be added"),
        "{error}"
    );
    // On another pod: fine without secrets, denied when one names a managed store directly.
    assert!(debug(name(&plain), json!([])).success);
    let error = debug(
        name(&plain),
        json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-finance", "key": "db_password"}}}]),
    )
    .err();
    assert!(error.contains(UPDATES), "{error}");
    assert!(
        error.contains("a store managed by secrets-webhook"),
        "{error}"
    );
}

/// Attack 2: `kubectl create token <driver SA>` (not bound to a pod) creates an executor that
/// inherits any driver of that account; so does a token bound to another pod.
#[test]
fn executors_need_the_token_of_their_own_driver() {
    let Some(k) = cluster("executors_need_the_token_of_their_own_driver") else {
        return;
    };
    let _shared = k.shared();
    let granted = create_when_ready(k, &driver(NS, finance()), "alice");
    let other = create_when_ready(k, &driver(NS, json!({})), "bob");
    let executor = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": unique("exec"), "namespace": NS,
            "labels": {"spark-role": "executor",
                       "spark-app-selector": granted["metadata"]["labels"]["spark-app-selector"]},
            "annotations": finance(),
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "controller": true,
                                 "name": name(&granted), "uid": granted["metadata"]["uid"]}]},
        "spec": {"serviceAccountName": "spark",
                 "containers": [{"name": "spark-kubernetes-executor", "image": "spark", "args": ["executor"]}]}});
    let create_with = |token: &str| {
        k.kubectl_with_token(token)
            .args(["create", "-o", "json", "-f", "-"])
            .stdin(executor.to_string())
            .run()
    };
    let unbound = k.token(NS, "spark", None);
    let error = create_with(&unbound).err();
    assert!(error.contains(MUTATING), "{error}");
    assert!(error.contains("not bound to a pod"), "{error}");
    let elsewhere = k.token(NS, "spark", Some(name(&other)));
    let error = create_with(&elsewhere).err();
    assert!(
        error.contains(&format!("created from pod \"{}\"", name(&other))),
        "{error}"
    );
    // The driver's own token: admitted, for alice, with exactly the driver's grants.
    let own = k.token(NS, "spark", Some(name(&granted)));
    let admitted = create_with(&own).json();
    let stamp = admitted["metadata"]["annotations"]["secrets.iomete.com/identity"]
        .as_str()
        .unwrap();
    assert!(stamp.starts_with(r#"{"user":"alice","#), "{admitted}");
}

/// A pod in the data-plane namespace naming `secret` in the field `path` (valid for the API
/// server: each volume type with its required fields).
fn pod_naming(namespace: &str, path: &str, secret: &str) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": unique("named"), "namespace": namespace},
        "spec": {"automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "busybox"}]}});
    if namespace == NS {
        pod["spec"]["serviceAccountName"] = json!("spark");
    }
    let spec = &mut pod["spec"];
    let reference = json!({"name": secret});
    match path {
        "containers[].env[].valueFrom.secretKeyRef.name" => {
            spec["containers"][0]["env"] =
                json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}])
        }
        "containers[].envFrom[].secretRef.name" => {
            spec["containers"][0]["envFrom"] = json!([{"secretRef": reference}])
        }
        "initContainers[].env[].valueFrom.secretKeyRef.name" => {
            spec["initContainers"] = json!([{"name": "i", "image": "busybox",
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}])
        }
        "initContainers[].envFrom[].secretRef.name" => {
            spec["initContainers"] =
                json!([{"name": "i", "image": "busybox", "envFrom": [{"secretRef": reference}]}])
        }
        "imagePullSecrets[].name" => spec["imagePullSecrets"] = json!([reference]),
        _ if path.starts_with("ephemeralContainers") => return Value::Null,
        _ => {
            let volume = match path {
                "volumes[].secret.secretName" => json!({"secret": {"secretName": secret}}),
                "volumes[].projected.sources[].secret.name" => {
                    json!({"projected": {"sources": [{"secret": reference}]}})
                }
                "volumes[].azureFile.secretName" => {
                    json!({"azureFile": {"secretName": secret, "shareName": "s"}})
                }
                "volumes[].cephfs.secretRef.name" => {
                    json!({"cephfs": {"monitors": ["10.0.0.1:6789"], "secretRef": reference}})
                }
                "volumes[].cinder.secretRef.name" => {
                    json!({"cinder": {"volumeID": "v", "secretRef": reference}})
                }
                "volumes[].csi.nodePublishSecretRef.name" => {
                    json!({"csi": {"driver": "csi.example.com", "nodePublishSecretRef": reference}})
                }
                "volumes[].flexVolume.secretRef.name" => {
                    json!({"flexVolume": {"driver": "example.com/flex", "secretRef": reference}})
                }
                "volumes[].iscsi.secretRef.name" => {
                    json!({"iscsi": {"targetPortal": "10.0.0.1:3260",
                    "iqn": "iqn.2001-04.com.example:storage", "lun": 0, "secretRef": reference}})
                }
                "volumes[].rbd.secretRef.name" => {
                    json!({"rbd": {"monitors": ["10.0.0.1:6789"], "image": "i", "secretRef": reference}})
                }
                "volumes[].scaleIO.secretRef.name" => {
                    json!({"scaleIO": {"gateway": "https://gw", "system": "s", "volumeName": "v", "secretRef": reference}})
                }
                "volumes[].storageos.secretRef.name" => {
                    json!({"storageos": {"volumeName": "v", "secretRef": reference}})
                }
                other => panic!("{other}: a PodSpec field naming a Secret without an example here"),
            };
            let mut volume = volume;
            volume["name"] = json!("v");
            spec["volumes"] = json!([volume]);
        }
    }
    pod
}

/// Attack 3: a pod in the data-plane namespace running as a privileged service account, or naming
/// a VaultConfig's credential Secret (or any Secret) directly, in any field. Attack 5: a managed
/// store named in a field the guard did not know, in any namespace.
#[test]
fn the_data_plane_namespace_is_locked_down_in_every_secret_field() {
    let Some(k) = cluster("the_data_plane_namespace_is_locked_down_in_every_secret_field") else {
        return;
    };
    let _shared = k.shared();
    let tenant_ns = k.namespace("tenant");
    for field in secret_naming_fields() {
        // The VaultConfig's credentials, in the data-plane namespace: the policy.
        let pod = pod_naming(NS, &field, "vault-prod-finance-credentials");
        if pod.is_null() {
            continue; // ephemeral containers: only through the subresource, tested above
        }
        let error = create_as(k, &pod, "bob").unwrap_err();
        assert!(error.contains(POLICY), "{field}: {error}");
        assert!(
            error.contains("vault-prod-finance-credentials"),
            "{field}: {error}"
        );
        // A managed store, in the data-plane namespace and in a tenant's: the webhook's guard
        // (the pre-filter sent it there).
        for namespace in [NS, tenant_ns.as_str()] {
            let pod = pod_naming(namespace, &field, "iomete-secret-store-finance");
            let error = create_as(k, &pod, "bob").unwrap_err();
            assert!(error.contains(MUTATING), "{field} in {namespace}: {error}");
            assert!(
                error.contains("a store managed by secrets-webhook"),
                "{error}"
            );
        }
        // Any Secret in a tenant's own namespace is the tenant's business.
        let mine = pod_naming(&tenant_ns, &field, "my-own-secret");
        create_as(k, &mine, "bob").unwrap_or_else(|e| panic!("{field}: {e}"));
    }

    let with_sa = |sa: &str| {
        let mut pod = driver(NS, json!({}));
        pod["spec"]["serviceAccountName"] = json!(sa);
        pod["spec"]["serviceAccount"] = json!(sa);
        pod
    };
    for sa in ["secrets-webhook", "iomete-control-plane"] {
        let error = create_as(k, &with_sa(sa), "alice").unwrap_err();
        assert!(error.contains(POLICY), "{error}");
        assert!(
            error.contains(&format!("service account {sa} is not")),
            "{error}"
        );
    }
    // The same through a Deployment (its pods would be made by the controllers): the template.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": unique("deploy"), "namespace": NS},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "x"}},
                 "template": {"metadata": {"labels": {"app": "x"}},
                              "spec": {"serviceAccountName": "secrets-webhook",
                                       "containers": [{"name": "c", "image": "busybox"}]}}}});
    let error = create_as(k, &deployment, "alice").unwrap_err();
    assert!(error.contains("ValidatingAdmissionPolicy"), "{error}");
    // A CronJob's template sits deeper; it is checked all the same.
    let cronjob = json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": unique("cron"), "namespace": NS},
        "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never", "serviceAccountName": "spark",
            "containers": [{"name": "c", "image": "busybox",
                "envFrom": [{"secretRef": {"name": "vault-prod-finance-credentials"}}]}]}}}}}});
    let error = create_as(k, &cronjob, "alice").unwrap_err();
    assert!(error.contains(POLICY), "{error}");
    assert!(error.contains("vault-prod-finance-credentials"), "{error}");
    // Admins may (the webhook's own Deployment is one).
    k.kubectl()
        .args(["create", "-f", "-"])
        .stdin(deployment.to_string())
        .run()
        .ok();
}

/// Variant of attack 3: Spark's service account must write ConfigMaps in the data-plane namespace,
/// so code in a driver could widen the policy's lists or make itself a trusted controller.
#[test]
fn the_webhooks_own_objects_are_written_by_admins_only() {
    let Some(k) = cluster("the_webhooks_own_objects_are_written_by_admins_only") else {
        return;
    };
    let _shared = k.shared();
    let token = k.token(NS, "spark", None);
    let widen = k
        .kubectl_with_token(&token)
        .args([
            "-n",
            NS,
            "patch",
            "configmap",
            "secrets-webhook-data-plane",
            "--type=merge",
            "-p",
            r#"{"data":{"serviceAccounts":"default,spark,secrets-webhook"}}"#,
        ])
        .run()
        .err();
    assert!(
        widen.contains("ValidatingAdmissionPolicy 'secrets-webhook-own-objects'"),
        "{widen}"
    );
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "secrets-webhook-config-evil", "namespace": NS},
        "data": {"config.yaml": "trustedControllers: [{username: \"system:serviceaccount:iomete-system:spark\"}]"}});
    let create = k
        .kubectl_with_token(&token)
        .args(["create", "-f", "-"])
        .stdin(config.to_string())
        .run()
        .err();
    assert!(create.contains("secrets-webhook-own-objects"), "{create}");
    // Spark's own ConfigMaps are unaffected.
    let own = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": unique("spark-drv-conf-map"), "namespace": NS}, "data": {"k": "v"}});
    k.kubectl_with_token(&token)
        .args(["create", "-f", "-"])
        .stdin(own.to_string())
        .run()
        .ok();
}

/// Attack 6: with the Spark operator trusted, anyone who can create a SparkApplication picks any
/// identity through an annotation route the operator copies onto the driver pod.
#[test]
fn spark_applications_name_only_their_own_requester_in_run_as() {
    let Some(k) = cluster("spark_applications_name_only_their_own_requester_in_run_as") else {
        return;
    };
    let _shared = k.shared();
    let app = |spec: Value| {
        json!({"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
               "metadata": {"name": unique("app"), "namespace": NS},
               "spec": spec})
    };
    let routes = [
        json!({"driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}),
        json!({"sparkConf": {"spark.kubernetes.driver.annotation.secrets.iomete.com/run-as": "alice"}}),
        json!({"driver": {"template": {"metadata": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}}}),
        json!({"driver": {"annotations": {"secrets.iomete.com/run-as": "bob",
                                          "secrets.iomete.com/run-as-groups": "finance-admins"}}}),
        json!({"sparkConf": {"spark.kubernetes.driver.podTemplateFile": "s3a://bucket/t.yaml"}}),
    ];
    for spec in routes {
        let error = k.eventually(
            "the SparkApplication webhook is called",
            || match create_as(k, &app(spec.clone()), "bob") {
                Err(e) if e.contains(APPS) => Ok(e),
                other => Err(format!("{other:?}")),
            },
        );
        assert!(
            !error.contains("\"alice\""),
            "the value is not quoted: {error}"
        );
    }
    // Naming oneself is fine; so is the platform's control plane naming anyone.
    let own = create_as(
        k,
        &app(json!({"driver": {"annotations": {"secrets.iomete.com/run-as": "bob"}}})),
        "bob",
    )
    .unwrap();
    let platform = k
        .kubectl()
        .user(
            "system:serviceaccount:iomete-system:iomete-control-plane",
            &[],
        )
        .args(["create", "-o", "json", "-f", "-"])
        .stdin(
            app(json!({"driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}))
                .to_string(),
        )
        .run()
        .json();
    // bob may not put new code under alice's name; metadata changes are not checked.
    let alices = name(&platform);
    let error = k
        .kubectl()
        .user("bob", &[])
        .ns(NS)
        .args([
            "patch",
            "sparkapplication",
            alices,
            "--type=merge",
            "-p",
            r#"{"spec":{"mainApplicationFile":"s3a://bob/steal.jar"}}"#,
        ])
        .run()
        .err();
    assert!(error.contains(APPS), "{error}");
    k.kubectl()
        .user("bob", &[])
        .ns(NS)
        .args(["label", "sparkapplication", alices, "team=x"])
        .run()
        .ok();
    assert_eq!(
        own["spec"]["driver"]["annotations"]["secrets.iomete.com/run-as"],
        "bob"
    );
    // A ScheduledSparkApplication's template is checked the same way.
    let scheduled = json!({"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "ScheduledSparkApplication",
        "metadata": {"name": unique("scheduled"), "namespace": NS},
        "spec": {"schedule": "@daily", "template": {"driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}}});
    let error = create_as(k, &scheduled, "bob").unwrap_err();
    assert!(error.contains(APPS), "{error}");
}

/// Without a signing key the webhook signs nothing and admits no pod that needs stamps: it
/// fails closed (and reports not ready), never signing with a default key.
#[test]
fn without_a_signing_key_nothing_is_stamped() {
    let Some(k) = cluster("without_a_signing_key_nothing_is_stamped") else {
        return;
    };
    let _exclusive = k.exclusive();
    let key = k
        .get("secret", NS, "secrets-webhook-signing-key")
        .expect("the install created the key");
    k.kubectl()
        .ns(NS)
        .args(["delete", "secret", "secrets-webhook-signing-key"])
        .run()
        .ok();
    k.stop_webhook();
    // start_webhook waits for /readyz, which must not come: start by hand.
    let started = std::process::Command::new("bash")
        .arg(format!(
            "{}/scripts/kube-e2e.sh",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg("webhook-start")
        .env("KUBE_E2E_DIR", &k.dir)
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let error = k.eventually("the keyless webhook answers", || {
        match create_as(k, &driver(NS, finance()), "alice") {
            Err(e) if e.contains(MUTATING) => Ok(e),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(error.contains("no signing key loaded"), "{error}");
    assert!(
        !support::kube_e2e::http_get(&k.webhook_admin, "/readyz").contains("ok"),
        "ready without a key"
    );
    // Pods that need no stamp are unaffected.
    create_as(k, &driver(NS, json!({})), "alice").unwrap();

    let mut restored = key.clone();
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
    ] {
        restored["metadata"].as_object_mut().unwrap().remove(field);
    }
    k.apply(&restored.to_string());
    k.stop_webhook();
    k.start_webhook();
    create_when_ready(k, &driver(NS, finance()), "alice");
}
