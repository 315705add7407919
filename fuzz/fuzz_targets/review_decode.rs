//! Arbitrary bytes as an HTTP request body: `Webhook::review_bytes` never panics and always
//! answers with an `admission.k8s.io/v1` AdmissionReview whose `response` has a `uid` and
//! `allowed`. When it admits with a patch, the patch applies to the pod and leaves a Pod.
#![no_main]

use std::sync::{Arc, LazyLock};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use secrets_webhook::admission::{Webhook, parse_review};
use secrets_webhook::config::{LocalConfig, Settings};
use secrets_webhook::metrics::Metrics;
use serde_json::Value;

const CONFIG: &str = r#"
namespace: iomete-system
stores:
  global: [warehouse_path, api_token]
  domains: {finance: [db_password, s3_secret_key], marketing: [ga_token]}
"#;

struct Harness {
    runtime: tokio::runtime::Runtime,
    webhook: Webhook,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let config = LocalConfig::parse(CONFIG).expect("config");
    let webhook = runtime.block_on(async {
        Webhook::from_local(Settings::default(), &config, Arc::new(Metrics::new()))
            .expect("webhook")
    });
    Harness { runtime, webhook }
});

fuzz_target!(|body: &[u8]| {
    let h = &*HARNESS;
    let out = h.runtime.block_on(h.webhook.review_bytes(body, None));
    let answer: Value = serde_json::from_slice(&out).expect("the answer is JSON");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    let uid = response["uid"].as_str().expect("response.uid is a string");
    let allowed = response["allowed"]
        .as_bool()
        .expect("response.allowed is a bool");

    let request = parse_review(body).ok();
    if let Some(req) = &request {
        assert_eq!(uid, req.uid, "the uid of a readable review is echoed");
    } else {
        assert!(!allowed, "an unreadable review is never allowed");
        assert!(uid.chars().count() <= 64, "the echoed uid is clipped");
    }
    if let Some(message) = response["status"]["message"].as_str() {
        assert!(
            message.len() < 16 * 1024,
            "denial of {} bytes",
            message.len()
        );
    }

    let Some(b64) = response["patch"].as_str() else {
        return;
    };
    assert!(allowed, "a patch only comes with an allowed answer");
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the patch is base64");
    let patch: json_patch::Patch =
        serde_json::from_slice(&bytes).expect("the patch is a JSON Patch");
    // The pod as JSON; a lone surrogate escape (`"\ud800"`) in a field serde skips makes the whole
    // body unreadable as a `Value`, then the pod as the engine read it stands in.
    let mut pod = match serde_json::from_slice::<Value>(body) {
        Ok(review) => review["request"]["object"].clone(),
        Err(_) => {
            let req = request.expect("a patched review was readable");
            serde_json::to_value(req.object).expect("the pod serializes")
        }
    };
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");
    let _: Pod = serde_json::from_value(pod).expect("the patched pod is still a Pod");
});
