//! `POST /default`: a VaultConfig created without `spec.delivery` gets `delivery: runtime`
//! (docs/decisions.md, "Vault delivery is per VaultConfig"). Only at CREATE: a CRD schema default
//! would also be applied to stored objects as they are read, and flip existing configs on upgrade.
//! An UPDATE that omits the field keeps what is stored (absent stays materialize).

use std::time::Instant;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::{Webhook, encode_review, parse_dynamic};
use crate::backends::vault::Delivery;
use crate::plan::JsonPatch;
use crate::refs;

/// The group and kind this endpoint defaults; anything else is allowed untouched.
const GROUP: &str = "secrets.iomete.com";
const KIND: &str = "VaultConfig";

impl Webhook {
    /// Answers one request body of the defaulting webhook. Always an AdmissionReview: a body that
    /// is no AdmissionReview is `invalid` (as on `/mutate` and `/validate`); every request that is
    /// one is allowed, with the patch only for a VaultConfig CREATE whose spec does not name
    /// `delivery`. Anything the patch does not apply to (another kind, an UPDATE, a spec that is
    /// not an object) is left to the API server's own validation, whose errors are clearer than
    /// ours would be.
    pub fn default_bytes(&self, body: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let (response, outcome) = match parse_dynamic(body) {
            Ok(req) => self.default_vault_config(&req, started),
            Err(response) => (*response, "invalid"),
        };
        self.metrics
            .admission("none", outcome, started.elapsed().as_secs_f64());
        encode_review(&response)
    }

    fn default_vault_config(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        started: Instant,
    ) -> (AdmissionResponse, &'static str) {
        let mut response = AdmissionResponse::from(req);
        let patch = delivery_patch(req);
        let ops = patch.as_ref().map_or(0, JsonPatch::len);
        // The same fields as the other admission lines (docs/logging.md).
        let name =
            refs::plain_name(&req.name).map_or_else(|| refs::shape(&req.name), str::to_owned);
        let namespace = req.namespace.as_deref().unwrap_or("");
        let identity = req.user_info.username.as_deref().unwrap_or("");
        let duration_ms = || started.elapsed().as_secs_f64() * 1e3;
        let decision = match patch.map(JsonPatch::into_bytes) {
            Some(Ok(bytes)) => {
                response.patch = Some(bytes);
                response
                    .audit_annotations
                    .insert("decision".into(), "patched: delivery runtime".into());
                "patched"
            }
            None => "allowed",
            // Not expected for a constant string; fail closed rather than store the weaker mode.
            Some(Err(_)) => {
                let message = "secrets-webhook could not encode its patch; retry";
                tracing::info!(uid = %req.uid, namespace, pod = "", kind = KIND, name = %name,
                    identity, workload = "none", decision = "denied", reason = "internal",
                    denial = message, duration_ms = duration_ms(), "admission");
                self.metrics.denial("internal");
                return (response.deny(message), "denied");
            }
        };
        tracing::info!(uid = %req.uid, namespace, pod = "", kind = KIND, name = %name, identity,
            workload = "none", decision, ops, duration_ms = duration_ms(), "admission");
        (response, decision)
    }
}

/// The patch for a VaultConfig CREATE whose `spec` is an object without `delivery` (or with a
/// null one, which the API server would drop and store as absent): `add /spec/delivery runtime`.
/// `add` also replaces a null member (RFC 6902). `None` for everything else.
fn delivery_patch(req: &AdmissionRequest<DynamicObject>) -> Option<JsonPatch> {
    if req.operation != Operation::Create || req.kind.group != GROUP || req.kind.kind != KIND {
        return None;
    }
    let spec = req.object.as_ref()?.data.get("spec")?.as_object()?;
    if spec.get("delivery").is_some_and(|d| !d.is_null()) {
        return None;
    }
    let mut patch = JsonPatch::default();
    patch.add(["spec", "delivery"], Delivery::Runtime.as_str());
    Some(patch)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::Engine as _;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::{LocalConfig, Settings};
    use crate::metrics::Metrics;

    fn webhook() -> Webhook {
        let config = LocalConfig::parse("namespace: iomete-system\n").unwrap();
        Webhook::from_local(Settings::default(), &config, Arc::new(Metrics::new())).unwrap()
    }

    fn review(operation: &str, kind: (&str, &str), spec: Value) -> Value {
        let (group, kind) = kind;
        let object = json!({
            "apiVersion": format!("{group}/v1alpha1"), "kind": kind,
            "metadata": {"name": "prod", "namespace": "iomete-system"}, "spec": spec,
        });
        let mut request = json!({
            "uid": "7f0c8a52-1b1e-4c1e-9d1a-2f7a4b9c0d11",
            "kind": {"group": group, "version": "v1alpha1", "kind": kind},
            "resource": {"group": group, "version": "v1alpha1", "resource": "vaultconfigs"},
            "name": "prod", "namespace": "iomete-system", "operation": operation,
            "userInfo": {"username": "admin", "groups": ["system:masters"]},
            "object": object, "dryRun": false,
        });
        if operation == "UPDATE" {
            request["oldObject"] = request["object"].clone();
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }

    fn spec() -> Value {
        json!({"resourceBundle": "b", "host": "https://vault:8200", "path": "/v1/secret/data/p",
               "auth": {"token": {"secretRef": {"name": "t", "key": "token"}}}})
    }

    /// The response and its decoded patch.
    fn answer(body: &[u8]) -> (Value, Option<Value>) {
        let out: Value = serde_json::from_slice(&webhook().default_bytes(body)).unwrap();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        let response = out["response"].clone();
        let patch = response["patch"].as_str().map(|b64| {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        });
        (response, patch)
    }

    fn run(review: &Value) -> (Value, Option<Value>) {
        answer(&serde_json::to_vec(review).unwrap())
    }

    const VAULT_CONFIG: (&str, &str) = ("secrets.iomete.com", "VaultConfig");

    #[test]
    fn a_create_without_delivery_gets_runtime() {
        let (response, patch) = run(&review("CREATE", VAULT_CONFIG, spec()));
        assert_eq!(response["allowed"], true);
        assert_eq!(response["uid"], "7f0c8a52-1b1e-4c1e-9d1a-2f7a4b9c0d11");
        assert_eq!(
            patch,
            Some(json!([{"op": "add", "path": "/spec/delivery", "value": "runtime"}]))
        );
        // Applied, the object names runtime and nothing else changed.
        let mut object = review("CREATE", VAULT_CONFIG, spec())["request"]["object"].clone();
        let ops: json_patch::Patch = serde_json::from_value(patch.unwrap()).unwrap();
        json_patch::patch(&mut object, &ops).unwrap();
        let mut want = spec();
        want["delivery"] = json!("runtime");
        assert_eq!(object["spec"], want);
    }

    #[test]
    fn a_null_delivery_is_absent_and_gets_runtime() {
        let mut with_null = spec();
        with_null["delivery"] = Value::Null;
        let (response, patch) = run(&review("CREATE", VAULT_CONFIG, with_null.clone()));
        assert_eq!(response["allowed"], true);
        let mut object = json!({"spec": with_null});
        let ops: json_patch::Patch = serde_json::from_value(patch.unwrap()).unwrap();
        json_patch::patch(&mut object, &ops).unwrap();
        assert_eq!(object["spec"]["delivery"], "runtime");
    }

    #[test]
    fn a_named_delivery_is_kept_whatever_it_is() {
        // An unknown value too: the CRD's enum rejects it with its own message.
        for delivery in ["runtime", "materialize", "bogus"] {
            let mut named = spec();
            named["delivery"] = json!(delivery);
            let (response, patch) = run(&review("CREATE", VAULT_CONFIG, named));
            assert_eq!(response["allowed"], true, "{delivery}");
            assert_eq!(patch, None, "{delivery}");
        }
    }

    #[test]
    fn updates_and_deletes_are_never_defaulted() {
        for operation in ["UPDATE", "DELETE", "CONNECT"] {
            let (response, patch) = run(&review(operation, VAULT_CONFIG, spec()));
            assert_eq!(response["allowed"], true, "{operation}");
            assert_eq!(patch, None, "{operation}");
        }
    }

    #[test]
    fn other_kinds_and_groups_are_allowed_untouched() {
        for kind in [
            ("secrets.iomete.com", "ResourceBundle"),
            ("example.com", "VaultConfig"),
            ("", "Pod"),
        ] {
            let (response, patch) = run(&review("CREATE", kind, spec()));
            assert_eq!(response["allowed"], true, "{kind:?}");
            assert_eq!(patch, None, "{kind:?}");
        }
    }

    #[test]
    fn a_spec_that_is_not_an_object_is_left_to_the_api_servers_validation() {
        for spec in [Value::Null, json!("a string"), json!([1, 2]), json!(7)] {
            let (response, patch) = run(&review("CREATE", VAULT_CONFIG, spec.clone()));
            assert_eq!(response["allowed"], true, "{spec}");
            assert_eq!(patch, None, "{spec}");
        }
        let mut without = review("CREATE", VAULT_CONFIG, Value::Null);
        without["request"]["object"]
            .as_object_mut()
            .unwrap()
            .remove("spec");
        assert_eq!(run(&without).1, None);
        without["request"].as_object_mut().unwrap().remove("object");
        let (response, patch) = run(&without);
        assert_eq!(response["allowed"], true);
        assert_eq!(patch, None);
    }

    #[test]
    fn garbage_is_an_invalid_review_never_a_panic() {
        for body in [
            &b"{not json"[..],
            &b""[..],
            &b"[]"[..],
            &b"null"[..],
            &b"{\"kind\":\"AdmissionReview\"}"[..],
            &b"{\"request\":{\"uid\":\"u-1\",\"operation\":7}}"[..],
            &[0xff, 0xfe, 0x00][..],
        ] {
            let (response, patch) = answer(body);
            assert_eq!(response["allowed"], false, "{body:?}");
            assert_eq!(patch, None, "{body:?}");
            let message = response["status"]["message"].as_str().unwrap();
            assert!(message.contains("AdmissionReview"), "{message}");
        }
        // The uid is kept when it can be read, so the API server can match the answer.
        let (response, _) = answer(b"{\"request\":{\"uid\":\"u-1\",\"operation\":7}}");
        assert_eq!(response["uid"], "u-1");
    }
}
