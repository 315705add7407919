//! Materialize mode (DESIGN §3): values go into the webhook-managed Secret
//! `iomete-vault-{config}` in the pod's namespace, only the keys in use. Pods then reference it
//! with `secretKeyRef`.
//!
//! Anyone with `patch secrets` in that namespace can change the Secret, and its labels prove
//! nothing. So the webhook signs what it writes (an HMAC over the namespace, name, config and the
//! digest of every key, in `secrets.iomete.com/content-signature`, with the stamp signing keys) and
//! reads the Secret again for every admission that uses it: a read that started after the
//! admission arrived, shared by the admissions waiting for it. Content that does not verify was
//! changed outside the webhook: it is replaced by the values just read from Vault, and keys the
//! webhook cannot vouch for are dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};

use super::{SecretValue, VaultError};
use crate::identity::Keys;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "secrets-webhook";
/// Which VaultConfig a managed Secret materializes.
pub const CONFIG_LABEL: &str = "secrets.iomete.com/vault-config";
/// The webhook's signature over a managed Secret's content.
pub const CONTENT_SIGNATURE: &str = "secrets.iomete.com/content-signature";
const FIELD_MANAGER: &str = "secrets-webhook";
/// Domain of the signed message, so no other signature of the webhook verifies as this one.
const DOMAIN: &str = "secrets.iomete.com/managed-secret/v1";

type Digests = BTreeMap<String, [u8; 32]>;

/// What this replica last read or wrote in one managed Secret: digests (not values) per key, and
/// when that read started.
struct Known {
    read_started: Instant,
    digests: Digests,
}

/// The last known state of one Secret, behind a lock that serializes its reads and writes.
type Slot = Arc<tokio::sync::Mutex<Option<Known>>>;

pub(crate) struct SecretWriter {
    client: kube::Client,
    keys: Arc<Keys>,
    /// One lock per Secret: concurrent admissions share the read that follows their arrival.
    targets: Mutex<HashMap<(String, String), Slot>>,
}

fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// The signed message: the Secret's identity and every key's digest.
fn message(namespace: &str, name: &str, config: &str, digests: &Digests) -> Vec<u8> {
    let keys: Vec<(&str, String)> = digests
        .iter()
        .map(|(k, d)| (k.as_str(), d.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    serde_json::to_vec(&(DOMAIN, namespace, name, config, keys)).unwrap_or_default()
}

impl SecretWriter {
    pub(crate) fn new(client: kube::Client, keys: Arc<Keys>) -> Self {
        Self {
            client,
            keys,
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `namespace/name` hold `entries` (other keys the webhook wrote stay), by `deadline`.
    pub(crate) async fn ensure(
        &self,
        namespace: &str,
        name: &str,
        config: &str,
        entries: &BTreeMap<String, SecretValue>,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        let arrived = Instant::now();
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
        // Served only by a read that started after this admission arrived (it waited for it):
        // what the Secret held before is never trusted.
        if let Some(k) = known.as_ref() {
            if k.read_started >= arrived
                && wanted.iter().all(|(key, d)| k.digests.get(key) == Some(d))
            {
                return Ok(());
            }
        }
        let read_started = Instant::now();
        let digests = tokio::time::timeout_at(
            deadline.into(),
            self.write(namespace, name, config, entries),
        )
        .await
        .map_err(|_| out_of_time())?;
        match digests {
            Ok(digests) => {
                *known = Some(Known {
                    read_started,
                    digests,
                });
                Ok(())
            }
            Err(e) => {
                *known = None;
                Err(e)
            }
        }
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
        let keys = self.keys.get().ok_or_else(|| {
            failed("secrets-webhook has no signing key loaded (failing closed)".into())
        })?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let signed = |data: &BTreeMap<String, ByteString>| {
            let digests: Digests = data
                .iter()
                .map(|(k, v)| (k.clone(), digest(&v.0)))
                .collect();
            let signature = keys.sign(&message(namespace, name, config, &digests));
            (digests, signature)
        };
        // A few rounds at most: a concurrent writer (another replica) makes ours conflict.
        for _ in 0..3 {
            let existing = api
                .get_opt(name)
                .await
                .map_err(|e| failed(format!("cannot read it ({e})")))?;
            let Some(mut secret) = existing else {
                let data: BTreeMap<String, ByteString> = entries
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.expose().to_vec())))
                    .collect();
                let (digests, signature) = signed(&data);
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(managed_labels(config)),
                        annotations: Some(BTreeMap::from([(
                            CONTENT_SIGNATURE.to_string(),
                            signature,
                        )])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(data),
                    ..Secret::default()
                };
                match api.create(&params, &secret).await {
                    Ok(_) => return Ok(digests),
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(failed(format!("cannot create it ({e})"))),
                }
            };
            let managed = secret
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
            let current = secret.data.take().unwrap_or_default();
            let verified = secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CONTENT_SIGNATURE))
                .is_some_and(|sig| {
                    let (digests, _) = signed(&current);
                    keys.verify(sig, &message(namespace, name, config, &digests))
                        .is_ok()
                });
            // Content nobody can vouch for is dropped; the keys this pod needs are written again.
            let mut data = if verified {
                current.clone()
            } else {
                tracing::warn!(
                    namespace,
                    secret = name,
                    config,
                    "managed Secret was changed outside secrets-webhook (its content signature does \
                     not verify); rewriting it with the values read from Vault"
                );
                BTreeMap::new()
            };
            for (k, v) in entries {
                data.insert(k.clone(), ByteString(v.expose().to_vec()));
            }
            let (digests, signature) = signed(&data);
            if verified && data == current {
                return Ok(digests);
            }
            secret.data = Some(data);
            secret.string_data = None;
            let meta = &mut secret.metadata;
            meta.annotations
                .get_or_insert_default()
                .insert(CONTENT_SIGNATURE.to_string(), signature);
            if !verified {
                // Whatever else was set on it (an owner that would have it collected, finalizers)
                // is not the webhook's either.
                meta.labels = Some(managed_labels(config));
                meta.owner_references = None;
                meta.finalizers = None;
            }
            // Conditional on the resourceVersion just read: a concurrent change makes it conflict
            // and the next round reads again.
            match api.replace(name, &params, &secret).await {
                Ok(_) => return Ok(digests),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(failed(format!("cannot update it ({e})"))),
            }
        }
        Err(failed(
            "it kept changing while the webhook wrote it; try again".into(),
        ))
    }
}

fn managed_labels(config: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (CONFIG_LABEL.to_string(), config.to_string()),
    ])
}
