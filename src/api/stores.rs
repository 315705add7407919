//! The Kubernetes secret stores as the management API writes them: one Secret per domain
//! (`iomete-secret-store-<domain>`) and the global one, in the data-plane namespace.
//!
//! A [`StoreBackend`] offers three primitives with optimistic concurrency on the Secret's
//! `resourceVersion` (the API's ETag); [`create_key`], [`update_key`] and [`delete_key`] build the
//! API's semantics on them, once, for both backends:
//! - [`KubeStores`]: the real Secrets, through the Kubernetes API (values only ever go out);
//! - [`MemoryStores`]: `--dev`, in memory; it is also the engine's [`StoreIndex`], so a key
//!   created through the API is usable by pods at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::backends::kubernetes::SecretKeys;
use crate::backends::vault::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, SecretValue};
use crate::backends::{StoreCheck, StoreIndex};
use crate::config::{LocalConfig, Naming};

/// A store as the API sees it: its version (the ETag) and key names. Never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    pub version: String,
    pub keys: BTreeSet<String>,
}

/// Why a primitive did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The version given is no longer current (someone else wrote in between).
    Conflict,
    /// `create`: the store exists already.
    Exists,
    /// The Kubernetes API refused the change itself (size, immutability).
    Rejected(String),
    /// The Kubernetes API could not be reached or answered an error.
    Unavailable(String),
}

#[async_trait]
pub trait StoreBackend: Send + Sync {
    /// The store's version and keys; `None` when the Secret does not exist.
    async fn read(&self, store: &str) -> Result<Option<StoreState>, WriteError>;
    /// Creates the store holding one key; [`WriteError::Exists`] if it exists. Returns the version.
    async fn create(
        &self,
        store: &str,
        key: &str,
        value: &SecretValue,
    ) -> Result<String, WriteError>;
    /// Sets (`Some`) or removes (`None`) one key if the store is still at `version`.
    async fn patch(
        &self,
        store: &str,
        version: &str,
        key: &str,
        value: Option<&SecretValue>,
    ) -> Result<String, WriteError>;
}

/// What a key operation ended in, for the handlers to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The store or the key does not exist.
    Missing,
    /// `create`: the key exists already.
    Exists,
    /// `If-Match` names a version that is not current.
    Stale,
    /// Another writer kept winning; nothing was written.
    Busy,
    Rejected(String),
    Unavailable(String),
}

impl From<WriteError> for KeyError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Conflict | WriteError::Exists => KeyError::Busy,
            WriteError::Rejected(why) => KeyError::Rejected(why),
            WriteError::Unavailable(why) => KeyError::Unavailable(why),
        }
    }
}

/// Tries of a read-check-write loop that lost a race to another writer of the same store.
const ATTEMPTS: usize = 8;

/// Creates `key` (it must not exist). Writes to other keys of the store meanwhile are retried over,
/// so concurrent creates of different keys all land.
pub async fn create_key(
    stores: &dyn StoreBackend,
    store: &str,
    key: &str,
    value: &SecretValue,
) -> Result<String, KeyError> {
    for _ in 0..ATTEMPTS {
        let written = match stores.read(store).await? {
            Some(state) if state.keys.contains(key) => return Err(KeyError::Exists),
            Some(state) => stores.patch(store, &state.version, key, Some(value)).await,
            None => stores.create(store, key, value).await,
        };
        match written {
            Ok(version) => return Ok(version),
            Err(WriteError::Conflict | WriteError::Exists) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(KeyError::Busy)
}

/// Changes `key` if the store is still at `if_match`.
pub async fn update_key(
    stores: &dyn StoreBackend,
    store: &str,
    key: &str,
    value: &SecretValue,
    if_match: &[String],
) -> Result<String, KeyError> {
    let state = stores.read(store).await?.ok_or(KeyError::Missing)?;
    if !if_match.contains(&state.version) {
        return Err(KeyError::Stale);
    }
    if !state.keys.contains(key) {
        return Err(KeyError::Missing);
    }
    match stores.patch(store, &state.version, key, Some(value)).await {
        Ok(version) => Ok(version),
        Err(WriteError::Conflict | WriteError::Exists) => Err(KeyError::Stale),
        Err(e) => Err(e.into()),
    }
}

/// Removes `key`, if the store is at one of `if_match` (when given). `allow` sees the current state
/// first and may refuse (the in-use check).
pub async fn delete_key<F, Fut>(
    stores: &dyn StoreBackend,
    store: &str,
    key: &str,
    if_match: Option<&[String]>,
    allow: F,
) -> Result<String, DeleteError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), super::problem::Problem>>,
{
    let mut checked = false;
    for _ in 0..ATTEMPTS {
        let state = stores
            .read(store)
            .await
            .map_err(|e| DeleteError::Key(e.into()))?
            .ok_or(DeleteError::Key(KeyError::Missing))?;
        if let Some(versions) = if_match {
            if !versions.contains(&state.version) {
                return Err(DeleteError::Key(KeyError::Stale));
            }
        }
        if !state.keys.contains(key) {
            return Err(DeleteError::Key(KeyError::Missing));
        }
        if !checked {
            allow().await.map_err(DeleteError::Refused)?;
            checked = true;
        }
        match stores.patch(store, &state.version, key, None).await {
            Ok(version) => return Ok(version),
            Err(WriteError::Conflict | WriteError::Exists) if if_match.is_none() => continue,
            Err(WriteError::Conflict | WriteError::Exists) => {
                return Err(DeleteError::Key(KeyError::Stale));
            }
            Err(e) => return Err(DeleteError::Key(e.into())),
        }
    }
    Err(DeleteError::Key(KeyError::Busy))
}

/// Why a delete did not happen.
#[derive(Debug)]
pub enum DeleteError {
    Key(KeyError),
    /// The check refused (e.g. the key is in use).
    Refused(super::problem::Problem),
}

// ---- in memory (`--dev`) ----------------------------------------------------------------------

struct MemoryStore {
    version: u64,
    values: BTreeMap<String, SecretValue>,
}

/// The stores in memory, seeded with the config file's key names (empty values). Lost at exit.
pub struct MemoryStores {
    stores: Mutex<HashMap<String, MemoryStore>>,
    next_version: Mutex<u64>,
}

impl MemoryStores {
    pub fn new(config: &LocalConfig, naming: &Naming) -> Self {
        let empty = |keys: &[String]| MemoryStore {
            version: 1,
            values: keys
                .iter()
                .map(|k| (k.clone(), SecretValue::new(Vec::new())))
                .collect(),
        };
        let mut stores = HashMap::new();
        stores.insert(naming.global_store.clone(), empty(&config.stores.global));
        for (domain, keys) in &config.stores.domains {
            stores.insert(naming.store_for(domain), empty(keys));
        }
        Self {
            stores: Mutex::new(stores),
            next_version: Mutex::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryStore>> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) -> u64 {
        let mut next = self.next_version.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        *next
    }
}

impl std::fmt::Debug for MemoryStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stores = self.lock();
        let keys: BTreeMap<&String, Vec<&String>> = stores
            .iter()
            .map(|(name, s)| (name, s.values.keys().collect()))
            .collect();
        f.debug_struct("MemoryStores").field("keys", &keys).finish()
    }
}

impl StoreIndex for MemoryStores {
    fn ready(&self) -> bool {
        true
    }

    fn check(&self, store: &str, key: &str) -> StoreCheck {
        match self.lock().get(store) {
            None => StoreCheck::MissingStore,
            Some(s) if s.values.contains_key(key) => StoreCheck::Present,
            Some(_) => StoreCheck::MissingKey,
        }
    }
}

#[async_trait]
impl StoreBackend for MemoryStores {
    async fn read(&self, store: &str) -> Result<Option<StoreState>, WriteError> {
        Ok(self.lock().get(store).map(|s| StoreState {
            version: s.version.to_string(),
            keys: s.values.keys().cloned().collect(),
        }))
    }

    async fn create(
        &self,
        store: &str,
        key: &str,
        value: &SecretValue,
    ) -> Result<String, WriteError> {
        let version = self.bump();
        let mut stores = self.lock();
        if stores.contains_key(store) {
            return Err(WriteError::Exists);
        }
        stores.insert(
            store.to_string(),
            MemoryStore {
                version,
                values: BTreeMap::from([(key.to_string(), value.clone())]),
            },
        );
        Ok(version.to_string())
    }

    async fn patch(
        &self,
        store: &str,
        version: &str,
        key: &str,
        value: Option<&SecretValue>,
    ) -> Result<String, WriteError> {
        let next = self.bump();
        let mut stores = self.lock();
        let Some(s) = stores.get_mut(store) else {
            return Err(WriteError::Conflict);
        };
        if s.version.to_string() != version {
            return Err(WriteError::Conflict);
        }
        match value {
            Some(v) => {
                s.values.insert(key.to_string(), v.clone());
            }
            None => {
                s.values.remove(key);
            }
        }
        s.version = next;
        Ok(next.to_string())
    }
}

// ---- Kubernetes ------------------------------------------------------------------------------

/// The real store Secrets in the data-plane namespace. Reads take key names only (values are
/// skipped while parsing); writes are JSON merge patches that carry the expected
/// `resourceVersion`, so the API server rejects a write based on a stale read.
pub struct KubeStores {
    keys: Api<SecretKeys>,
    secrets: Api<Secret>,
}

const FIELD_MANAGER: &str = "secrets-webhook-api";

impl KubeStores {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            keys: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
        }
    }
}

fn version_of(meta: &ObjectMeta) -> Result<String, WriteError> {
    meta.resource_version.clone().ok_or_else(|| {
        WriteError::Unavailable("the Secret came back without a resourceVersion".into())
    })
}

fn write_error(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => WriteError::Exists,
        kube::Error::Api(s) if s.code == 409 || s.code == 404 => WriteError::Conflict,
        // The API server's message may describe the data; say what was refused, not how.
        kube::Error::Api(s) if s.code == 422 || s.code == 413 => WriteError::Rejected(format!(
            "the Kubernetes API refused the store Secret (HTTP {} {}): it may be immutable, or \
             larger than the 1 MiB a Secret may hold",
            s.code, s.reason
        )),
        _ => WriteError::Unavailable(super::auth::kube_reason(&e)),
    }
}

#[async_trait]
impl StoreBackend for KubeStores {
    async fn read(&self, store: &str) -> Result<Option<StoreState>, WriteError> {
        let found = self.keys.get_opt(store).await.map_err(write_error)?;
        found
            .map(|s| {
                Ok(StoreState {
                    version: version_of(&s.metadata)?,
                    keys: s.data,
                })
            })
            .transpose()
    }

    async fn create(
        &self,
        store: &str,
        key: &str,
        value: &SecretValue,
    ) -> Result<String, WriteError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(store.to_string()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_string(),
                    MANAGED_BY_VALUE.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.expose().to_vec()),
            )])),
            ..Secret::default()
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let created = self
            .secrets
            .create(&params, &secret)
            .await
            .map_err(write_error)?;
        version_of(&created.metadata)
    }

    async fn patch(
        &self,
        store: &str,
        version: &str,
        key: &str,
        value: Option<&SecretValue>,
    ) -> Result<String, WriteError> {
        let data = match value {
            Some(v) => json!(base64::engine::general_purpose::STANDARD.encode(v.expose())),
            None => serde_json::Value::Null,
        };
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "data": {key: data},
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        // The answer is read as key names only.
        let patched = self
            .keys
            .patch(store, &params, &Patch::Merge(&patch))
            .await
            .map_err(write_error)?;
        version_of(&patched.metadata)
    }
}

impl From<KeyError> for DeleteError {
    fn from(e: KeyError) -> Self {
        DeleteError::Key(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> MemoryStores {
        let config = LocalConfig::parse("stores: {domains: {finance: [a]}}").unwrap();
        MemoryStores::new(&config, &Naming::default())
    }

    fn v(s: &str) -> SecretValue {
        SecretValue::new(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn create_update_delete_follow_versions() {
        let m = memory();
        let store = "iomete-secret-store-finance";
        assert_eq!(
            create_key(&m, store, "a", &v("x")).await,
            Err(KeyError::Exists)
        );
        let v1 = create_key(&m, store, "b", &v("x")).await.unwrap();
        assert_eq!(
            update_key(&m, store, "b", &v("y"), &["0".into()]).await,
            Err(KeyError::Stale)
        );
        let v2 = update_key(&m, store, "b", &v("y"), std::slice::from_ref(&v1))
            .await
            .unwrap();
        assert_ne!(v1, v2);
        assert_eq!(
            update_key(&m, store, "b", &v("z"), &[v1]).await,
            Err(KeyError::Stale)
        );
        let gone = delete_key(&m, store, "b", None, || async { Ok(()) }).await;
        assert!(gone.is_ok());
        assert_eq!(m.check(store, "b"), StoreCheck::MissingKey);
        // A new domain's store is created with its first key.
        create_key(&m, "iomete-secret-store-hr", "k", &v("canary-value-7"))
            .await
            .unwrap();
        assert_eq!(m.check("iomete-secret-store-hr", "k"), StoreCheck::Present);
        let shown = format!("{m:?}");
        assert!(
            shown.contains("\"k\"") && !shown.contains("canary"),
            "{shown}"
        );
    }
}
