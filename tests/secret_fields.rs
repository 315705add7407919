//! Every PodSpec field that names a Secret, derived from the k8s-openapi types
//! (`support::podspec_probe`), against every place that must know them: the guard, the webhook's
//! CEL pre-filter, and the data-plane ValidatingAdmissionPolicy. A field added to PodSpec by a new
//! k8s-openapi version fails these tests until all three handle it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use secrets_webhook::admission::guard;
use secrets_webhook::backends::Naming;
use serde::Deserialize as _;
use serde_json::{Value, json};
use support::cel_policy::{self, Verdict};
use support::podspec_probe::{PROBE_VALUE, full_pod_spec, secret_naming_fields};

fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

fn object(path: &str, kind: &str, name: &str) -> Value {
    documents(path)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {path}"))
}

/// A pod naming `secret` in the field `path` and nowhere else.
fn pod_naming(path: &str, secret: &str) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "iomete-system"},
        "spec": {"serviceAccountName": "spark",
                 "containers": [{"name": "c", "image": "busybox"}]}});
    cel_policy::set_path(&mut pod["spec"], path, json!(secret));
    pod
}

#[test]
fn the_schema_probe_finds_the_known_fields() {
    let fields = secret_naming_fields();
    // The ones the attack reviews named, so an empty or broken probe cannot pass silently.
    for known in [
        "containers[].env[].valueFrom.secretKeyRef.name",
        "containers[].envFrom[].secretRef.name",
        "initContainers[].env[].valueFrom.secretKeyRef.name",
        "ephemeralContainers[].env[].valueFrom.secretKeyRef.name",
        "ephemeralContainers[].envFrom[].secretRef.name",
        "imagePullSecrets[].name",
        "volumes[].secret.secretName",
        "volumes[].projected.sources[].secret.name",
        "volumes[].csi.nodePublishSecretRef.name",
        "volumes[].cephfs.secretRef.name",
        "volumes[].iscsi.secretRef.name",
        "volumes[].rbd.secretRef.name",
        "volumes[].flexVolume.secretRef.name",
        "volumes[].azureFile.secretName",
        "volumes[].scaleIO.secretRef.name",
        "volumes[].storageos.secretRef.name",
    ] {
        assert!(fields.contains(known), "{known} not found in {fields:#?}");
    }
    // And nothing that merely sits next to a Secret reference: keys, items, volume names.
    for not_a_name in [
        "containers[].env[].valueFrom.secretKeyRef.key",
        "volumes[].secret.items[].key",
        "volumes[].name",
        "serviceAccountName",
    ] {
        assert!(!fields.contains(not_a_name), "{not_a_name}");
    }
}

#[test]
fn the_guard_knows_every_podspec_field_that_names_a_secret() {
    let expected = secret_naming_fields();
    let (spec, _) = full_pod_spec();
    let mut seen = BTreeSet::new();
    guard::visit_secrets(&spec, |place, secret, _| {
        assert_eq!(secret, PROBE_VALUE);
        seen.insert(place.schema_path());
    });
    let unknown: Vec<&String> = expected.difference(&seen).collect();
    assert!(
        unknown.is_empty(),
        "PodSpec fields that name a Secret but are unknown to the guard: {unknown:#?}"
    );
    let invented: Vec<&String> = seen.difference(&expected).collect();
    assert!(
        invented.is_empty(),
        "the guard reads fields the schema does not have: {invented:#?}"
    );

    // On the full pod every one of them is a direct reference to a managed store, denied.
    let pod = Pod {
        spec: Some(spec),
        ..Pod::default()
    };
    let denied = guard::check(&pod, &Naming::default(), &BTreeSet::new()).unwrap_err();
    let fields: BTreeSet<String> = denied.0.iter().map(|r| r.field.clone()).collect();
    assert_eq!(fields, expected);
}

#[test]
fn the_webhooks_pre_filter_sends_every_secret_naming_field_to_the_guard() {
    let hook = &object(
        "manifests/base/mutatingwebhookconfiguration.yaml",
        "MutatingWebhookConfiguration",
        "secrets-webhook",
    )["webhooks"][0];
    let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
    for field in secret_naming_fields() {
        for managed in ["iomete-secret-store-finance", "iomete-vault-vault-prod"] {
            let pod = pod_naming(&field, managed);
            assert!(
                cel_policy::holds(condition, &[("object", &pod)]),
                "{field} naming {managed} does not reach the webhook"
            );
        }
        // Any other Secret there does not make the pod matter to the webhook.
        let pod = pod_naming(&field, "my-own-secret");
        assert!(
            !cel_policy::holds(condition, &[("object", &pod)]),
            "{field}"
        );
    }
}

fn params() -> Value {
    let config = object(
        "manifests/base/data-plane-policy.yaml",
        "ConfigMap",
        "secrets-webhook-data-plane",
    );
    let mut data: BTreeMap<String, String> =
        serde_json::from_value(config["data"].clone()).unwrap();
    data.insert("secrets".into(), "regcred, spark-tls".into());
    json!({"data": data})
}

fn pod_request(user: &str, groups: &[&str]) -> Value {
    json!({"operation": "CREATE", "resource": {"group": "", "version": "v1", "resource": "pods"},
           "userInfo": {"username": user, "groups": groups}})
}

#[test]
fn the_data_plane_policy_checks_every_secret_naming_field() {
    let policy = object(
        "manifests/base/data-plane-policy.yaml",
        "ValidatingAdmissionPolicy",
        "secrets-webhook-data-plane-pods",
    );
    let tenant = pod_request(
        "system:serviceaccount:iomete-system:spark",
        &["system:serviceaccounts"],
    );
    let admin = pod_request("ops", &["system:masters"]);
    let decide = |pod: &Value, request: &Value| {
        cel_policy::evaluate(&policy, pod, &Value::Null, request, &params())
    };
    for field in secret_naming_fields() {
        for secret in [
            "vault-prod-finance-credentials",
            "secrets-webhook-signing-key",
        ] {
            let pod = pod_naming(&field, secret);
            match decide(&pod, &tenant) {
                Verdict::Denied(message) => assert!(message.contains(secret), "{field}: {message}"),
                other => panic!("{field} naming {secret}: {other:?}"),
            }
            assert_eq!(decide(&pod, &admin), Verdict::Allowed, "{field}");
        }
        // Listed Secrets are fine; managed stores are left to the webhook's guard.
        for secret in ["regcred", "iomete-secret-store-finance", "iomete-vault-x"] {
            assert_eq!(
                decide(&pod_naming(&field, secret), &tenant),
                Verdict::Allowed,
                "{field} {secret}"
            );
        }
    }
}
