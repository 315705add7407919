//! Keeps the backend's configs in step with the VaultConfig objects of the data-plane namespace,
//! and records Test Connection results in each one's `status.conditions` (type `Ready`): for each
//! new generation, and again every `recheck_interval` so the condition follows Vault's state.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::{Entry, VaultBackend, VaultConfig, VaultConfigCondition, check_conn};

const READY: &str = "Ready";

pub(super) fn spawn(backend: Weak<VaultBackend>, client: kube::Client, namespace: String) {
    let api: Api<VaultConfig> = Api::namespaced(client.clone(), &namespace);
    let recorder = Arc::new(Recorder {
        api: api.clone(),
        last: Mutex::new(HashMap::new()),
    });
    spawn_rechecks(backend.clone(), recorder.clone());
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
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
                        apply(&backend, &recorder, &client, object);
                    }
                    backend.retain(&names);
                    recorder.retain(&names);
                    backend.set_ready();
                }
                Ok(Event::Apply(object)) => apply(&backend, &recorder, &client, object),
                Ok(Event::Delete(object)) => {
                    if let Some(name) = object.metadata.name.as_deref() {
                        backend.remove(name);
                        recorder.forget(name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "VaultConfig watch failed; retrying"),
            }
        }
    });
}

fn apply(
    backend: &Arc<VaultBackend>,
    recorder: &Arc<Recorder>,
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
    recorder.seed(&name, previous.clone());
    // Test each generation once here; our own status updates come back as events too.
    if previous
        .as_ref()
        .is_some_and(|c| c.observed_generation == generation && generation.is_some())
    {
        return;
    }
    let (backend, recorder) = (backend.clone(), recorder.clone());
    tokio::spawn(async move {
        let outcome = test(&backend, &entry).await;
        recorder.record(&name, generation, outcome).await;
    });
}

/// Re-tests every config that has a recorded condition, every `recheck_interval`.
fn spawn_rechecks(backend: Weak<VaultBackend>, recorder: Arc<Recorder>) {
    tokio::spawn(async move {
        let Some(every) = backend.upgrade().map(|b| b.opts.recheck_interval) else {
            return;
        };
        if every.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(backend) = backend.upgrade() else {
                return;
            };
            for (name, generation) in recorder.known() {
                let entry = backend.read_configs().get(&name).cloned();
                if let Some(entry) = entry {
                    let outcome = test(&backend, &entry).await;
                    recorder.record(&name, generation, outcome).await;
                }
            }
        }
    });
}

/// Test Connection for one entry: (ok, reason, message).
async fn test(backend: &VaultBackend, entry: &Entry) -> (bool, &'static str, String) {
    match entry {
        Entry::Invalid { error, .. } => (false, error.reason(), error.to_string()),
        Entry::Ready { conn, .. } => {
            let report = check_conn(conn, backend.opts.read_budget).await;
            match report.error() {
                None => (true, "Connected", report.summary()),
                Some(e) => (false, e.reason(), e.to_string()),
            }
        }
    }
}

/// Writes `Ready` conditions, only when they change; remembers the last one per config.
struct Recorder {
    api: Api<VaultConfig>,
    last: Mutex<HashMap<String, VaultConfigCondition>>,
}

impl Recorder {
    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<String, VaultConfigCondition>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns the condition an object already carries (e.g. written by another replica).
    fn seed(&self, name: &str, condition: Option<VaultConfigCondition>) {
        if let Some(condition) = condition {
            self.last().insert(name.to_string(), condition);
        }
    }

    fn forget(&self, name: &str) {
        self.last().remove(name);
    }

    fn retain(&self, names: &BTreeSet<String>) {
        self.last().retain(|name, _| names.contains(name));
    }

    fn known(&self) -> Vec<(String, Option<i64>)> {
        self.last()
            .iter()
            .map(|(name, c)| (name.clone(), c.observed_generation))
            .collect()
    }

    async fn record(
        &self,
        name: &str,
        generation: Option<i64>,
        (ok, reason, message): (bool, &str, String),
    ) {
        let status = if ok { "True" } else { "False" };
        let previous = self.last().get(name).cloned();
        let unchanged = previous.as_ref().is_some_and(|c| {
            c.status == status
                && c.reason == reason
                && c.message == message
                && c.observed_generation == generation
        });
        if unchanged {
            return;
        }
        let condition = VaultConfigCondition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: match previous {
                Some(c) if c.status == status => c.last_transition_time,
                _ => now(),
            },
            observed_generation: generation,
        };
        let patch = serde_json::json!({ "status": { "conditions": [&condition] } });
        match self
            .api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last().insert(name.to_string(), condition);
            }
            Err(e) => {
                tracing::warn!(config = %name, error = %e, "cannot record the VaultConfig's Ready condition");
            }
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
