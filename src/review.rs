//! `secrets-webhook review`: run one Pod or AdmissionReview through the same engine the server uses
//! and print what the API server would receive (or the decoded patch, or the mutated pod).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::admission::Webhook;
use crate::cli::ReviewArgs;
use crate::config::{LocalConfig, Settings, local_vault};
use crate::metrics::Metrics;

/// `secrets-webhook review`. Exit status: 0 when allowed, an error (non-zero) when denied.
pub fn run(args: ReviewArgs) -> anyhow::Result<()> {
    let input = read_document(&args.file)?;
    let config = LocalConfig::load(&args.config)?;
    let metrics = Arc::new(Metrics::new());
    let vault = local_vault(&Settings::default(), &config, Arc::clone(&metrics))?;
    let mut webhook =
        Webhook::from_local_parts(Settings::default(), &config, metrics, vault.clone())?;
    if let Some(path) = &args.owner {
        // The driver pod as the webhook admitted it stands in for the executor's owner lookup.
        let driver: k8s_openapi::api::core::v1::Pod = serde_json::from_value(read_document(path)?)
            .with_context(|| format!("{} is not a Pod", path.display()))?;
        webhook.owners = Arc::new(crate::identity::StaticOwner::new(Some(driver)));
    }
    let review = as_review(input, &args, &webhook.settings.naming.namespace)?;
    let body = serde_json::to_vec(&review)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Updates and other kinds (SparkApplications) go where the API server sends them: the
    // validating webhooks.
    let validating = review["request"]["operation"] != "CREATE"
        || review["request"]["kind"]["kind"]
            .as_str()
            .is_some_and(|k| k != "Pod");
    let answer = if validating {
        runtime.block_on(webhook.validate_bytes(&body, None))
    } else {
        runtime.block_on(webhook.review_bytes(&body, None))
    };
    let answer: Value = serde_json::from_slice(&answer)?;
    let response = &answer["response"];
    let patch = decode_patch(response)?;
    let mut out = std::io::stdout().lock();
    if args.patch {
        writeln!(out, "{}", serde_json::to_string_pretty(&patch)?)?;
    } else if args.pod {
        let mut pod = review["request"]["object"].clone();
        let ops: json_patch::Patch = serde_json::from_value(patch)?;
        json_patch::patch(&mut pod, &ops)
            .context("the webhook's patch does not apply to the pod")?;
        writeln!(out, "{}", serde_json::to_string_pretty(&pod)?)?;
    } else {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
    }
    // In a cluster the webhook would write these Vault values into managed Secrets; here there
    // is nowhere to write, so say which (names only, never values).
    let mut err = std::io::stderr().lock();
    for write in vault.iter().flat_map(|v| v.take_would_be_writes()) {
        writeln!(err, "would write: {write}")?;
    }
    if response["allowed"] != Value::Bool(true) {
        bail!(
            "denied: {}",
            response["status"]["message"]
                .as_str()
                .unwrap_or("(no message)")
        );
    }
    Ok(())
}

/// A JSON or YAML document from a file, or from standard input for `-`.
fn read_document(path: &Path) -> anyhow::Result<Value> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    serde_yaml::from_str(&text)
        .with_context(|| format!("{} is neither JSON nor YAML", path.display()))
}

/// An AdmissionReview as given, or a Pod wrapped in one as the API server would send it.
fn as_review(input: Value, args: &ReviewArgs, default_namespace: &str) -> anyhow::Result<Value> {
    match input["kind"].as_str() {
        Some("AdmissionReview") => Ok(input),
        Some("Pod") => {
            let namespace = input["metadata"]["namespace"]
                .as_str()
                .unwrap_or(default_namespace)
                .to_owned();
            let name = input["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut extra = serde_json::Map::new();
            for (key, value) in &args.extra {
                let values = extra.entry(key.clone()).or_insert_with(|| json!([]));
                if let Some(list) = values.as_array_mut() {
                    list.push(json!(value));
                }
            }
            let pod_kind = json!({"group": "", "version": "v1", "kind": "Pod"});
            let pods = json!({"group": "", "version": "v1", "resource": "pods"});
            Ok(json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "00000000-0000-0000-0000-000000000000",
                    "kind": pod_kind, "resource": pods,
                    "requestKind": pod_kind, "requestResource": pods,
                    "name": name, "namespace": namespace, "operation": "CREATE",
                    "userInfo": {"username": args.user.clone().unwrap_or_else(|| "review".into()), "groups": args.groups,
                                 "extra": extra},
                    "object": input, "oldObject": null, "dryRun": args.dry_run,
                }
            }))
        }
        other => bail!("expected a Pod or an AdmissionReview, got kind {other:?}"),
    }
}

/// The response's base64 JSON Patch, decoded (an empty array when there is none).
fn decode_patch(response: &Value) -> anyhow::Result<Value> {
    match response["patch"].as_str() {
        None => Ok(json!([])),
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
            Ok(serde_json::from_slice(&bytes)?)
        }
    }
}
