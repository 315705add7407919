//! Keeps the backend's configs in step with the VaultConfig objects of the data-plane namespace,
//! and records each new generation's Test Connection result in `status.conditions` (`Ready`).

use std::collections::BTreeSet;
use std::sync::Weak;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::{Entry, VaultBackend, VaultConfig, VaultConfigCondition, check_conn};

const READY: &str = "Ready";

pub(super) fn spawn(backend: Weak<VaultBackend>, client: kube::Client, namespace: String) {
    tokio::spawn(async move {
        let api: Api<VaultConfig> = Api::namespaced(client.clone(), &namespace);
        let mut events = watcher::watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed: Vec<VaultConfig> = Vec::new();
        while let Some(event) = events.next().await {
            let Some(backend) = backend.upgrade() else {
                return;
            };
            match event {
                Ok(Event::Init) => listed.clear(),
                Ok(Event::InitApply(object)) => listed.push(object),
                Ok(Event::InitDone) => {
                    let names: BTreeSet<String> = listed
                        .iter()
                        .filter_map(|o| o.metadata.name.clone())
                        .collect();
                    for object in listed.drain(..) {
                        apply(&backend, &api, &client, object);
                    }
                    backend.retain(&names);
                    backend.set_ready();
                }
                Ok(Event::Apply(object)) => apply(&backend, &api, &client, object),
                Ok(Event::Delete(object)) => {
                    if let Some(name) = object.metadata.name.as_deref() {
                        backend.remove(name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "VaultConfig watch failed; retrying"),
            }
        }
    });
}

fn apply(
    backend: &VaultBackend,
    api: &Api<VaultConfig>,
    client: &kube::Client,
    object: VaultConfig,
) {
    let Some(name) = object.metadata.name.clone() else {
        return;
    };
    let entry = backend.upsert(&name, &object.spec, client);
    let generation = object.metadata.generation;
    let previous = object
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .cloned();
    // Test each generation once; our own status updates come back as events too.
    if previous
        .as_ref()
        .is_some_and(|c| c.observed_generation == generation && generation.is_some())
    {
        return;
    }
    let api = api.clone();
    let budget = backend.opts.read_budget;
    tokio::spawn(async move {
        let (ok, reason, message) = match &entry {
            Entry::Invalid { error, .. } => (false, error.reason(), error.to_string()),
            Entry::Ready { conn, .. } => {
                let report = check_conn(conn, budget).await;
                match report.error() {
                    None => (true, "Connected", report.summary()),
                    Some(e) => (false, e.reason(), e.to_string()),
                }
            }
        };
        let status = if ok { "True" } else { "False" };
        let last_transition_time = match &previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now(),
        };
        let condition = VaultConfigCondition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: generation,
        };
        let patch = serde_json::json!({ "status": { "conditions": [condition] } });
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(config = %name, error = %e, "cannot record the VaultConfig's Ready condition");
        }
    });
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
