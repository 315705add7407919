//! Materialize mode (DESIGN §3): values go into the webhook-managed Secret
//! `iomete-vault-{config}` in the pod's namespace, only the keys in use, written only when a value
//! changed. Pods then reference it with `secretKeyRef`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use sha2::{Digest, Sha256};

use super::{SecretValue, VaultError};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "secrets-webhook";
/// Which VaultConfig a managed Secret materializes.
pub const CONFIG_LABEL: &str = "secrets.iomete.com/vault-config";
const FIELD_MANAGER: &str = "secrets-webhook";

type Digests = BTreeMap<String, [u8; 32]>;

/// What this replica last saw in one managed Secret: digests (not values) per key.
struct Known {
    at: Instant,
    digests: Digests,
}

/// The last known state of one Secret, behind a lock that serializes its writes.
type Slot = Arc<tokio::sync::Mutex<Option<Known>>>;

pub(crate) struct SecretWriter {
    client: kube::Client,
    /// How long a confirmed state spares the next admission a GET (the value cache TTL).
    memo_ttl: Duration,
    /// One lock per Secret: concurrent admissions wait for the first write, then find it done.
    targets: Mutex<HashMap<(String, String), Slot>>,
}

fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

impl SecretWriter {
    pub(crate) fn new(client: kube::Client, memo_ttl: Duration) -> Self {
        Self {
            client,
            memo_ttl,
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `namespace/name` hold `entries` (other keys stay), by `deadline`.
    pub(crate) async fn ensure(
        &self,
        namespace: &str,
        name: &str,
        config: &str,
        entries: &BTreeMap<String, SecretValue>,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        let out_of_time = || VaultError::Write {
            config: config.to_string(),
            namespace: namespace.to_string(),
            secret: name.to_string(),
            reason: "the Kubernetes API did not answer within the admission time budget".into(),
        };
        let target = {
            let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            targets
                .entry((namespace.to_string(), name.to_string()))
                .or_default()
                .clone()
        };
        let mut known = tokio::time::timeout_at(deadline.into(), target.lock())
            .await
            .map_err(|_| out_of_time())?;
        let wanted: Digests = entries
            .iter()
            .map(|(k, v)| (k.clone(), digest(v.expose())))
            .collect();
        if let Some(k) = known.as_ref() {
            let fresh = k.at + self.memo_ttl > Instant::now();
            if fresh && wanted.iter().all(|(key, d)| k.digests.get(key) == Some(d)) {
                return Ok(());
            }
        }
        let digests = tokio::time::timeout_at(
            deadline.into(),
            self.write(namespace, name, config, entries),
        )
        .await
        .map_err(|_| out_of_time())??;
        *known = Some(Known {
            at: Instant::now(),
            digests,
        });
        Ok(())
    }

    async fn write(
        &self,
        namespace: &str,
        name: &str,
        config: &str,
        entries: &BTreeMap<String, SecretValue>,
    ) -> Result<Digests, VaultError> {
        let failed = |reason: String| VaultError::Write {
            config: config.to_string(),
            namespace: namespace.to_string(),
            secret: name.to_string(),
            reason,
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        // Twice at most: a concurrent creator (another replica) turns our create into a patch.
        for _ in 0..2 {
            let existing = api
                .get_opt(name)
                .await
                .map_err(|e| failed(format!("cannot read it ({e})")))?;
            let Some(existing) = existing else {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(BTreeMap::from([
                            (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                            (CONFIG_LABEL.to_string(), config.to_string()),
                        ])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(
                        entries
                            .iter()
                            .map(|(k, v)| (k.clone(), ByteString(v.expose().to_vec())))
                            .collect(),
                    ),
                    ..Secret::default()
                };
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                match api.create(&params, &secret).await {
                    Ok(_) => {
                        return Ok(entries
                            .iter()
                            .map(|(k, v)| (k.clone(), digest(v.expose())))
                            .collect());
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(failed(format!("cannot create it ({e})"))),
                }
            };
            let managed = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|v| v == MANAGED_BY_VALUE);
            if !managed {
                return Err(VaultError::NotManaged {
                    config: config.to_string(),
                    namespace: namespace.to_string(),
                    secret: name.to_string(),
                });
            }
            let mut digests: Digests = existing
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, digest(&v.0)))
                .collect();
            let changed: BTreeMap<&String, &SecretValue> = entries
                .iter()
                .filter(|(k, v)| digests.get(*k) != Some(&digest(v.expose())))
                .collect();
            if changed.is_empty() {
                return Ok(digests);
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            let data: serde_json::Map<String, serde_json::Value> = changed
                .iter()
                .map(|(k, v)| ((*k).clone(), b64.encode(v.expose()).into()))
                .collect();
            let patch = serde_json::json!({ "data": data });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            api.patch(name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| failed(format!("cannot update it ({e})")))?;
            for (k, v) in changed {
                digests.insert(k.clone(), digest(v.expose()));
            }
            return Ok(digests);
        }
        Err(failed(
            "it was created and removed concurrently; try again".into(),
        ))
    }
}
