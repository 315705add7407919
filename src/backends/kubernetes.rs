//! Watch cache of the Kubernetes secret stores (key names only).
//!
//! [`StoreWatch`] watches the Secrets of the data-plane namespace with `kube::runtime::watcher`
//! (which lists, watches, relists after `410 Gone` and backs off on errors) and keeps, for each
//! store Secret (`{global_store}` and `{global_store}-{domain}`, see [`Naming`]), the set of its key
//! names. Nothing else is kept.
//!
//! Values: Kubernetes has no key-only view of a Secret. The keys are the keys of `data`, so a
//! metadata-only watch (`PartialObjectMeta`) cannot see them and the values cross the wire with
//! every list and watch event. They are never turned into owned data here: [`SecretKeys`]
//! deserializes `data` as `key -> IgnoredAny`, so a value only exists in kube's response buffer
//! while the JSON is parsed. Helm release and service-account token Secrets, which are never
//! stores and are the large ones, are filtered out on the server with a field selector.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::{StoreCheck, StoreIndex};
use crate::backends::Naming;

/// Secret types that are never stores; excluded server-side to keep large values off the wire.
const NOT_STORES: &str = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token";

/// Key names of the secret stores, kept current by a background watch.
///
/// The watch task runs on the Tokio runtime that called [`StoreWatch::spawn`] and is aborted when
/// the `StoreWatch` is dropped (the last `Arc`). `Debug` shows store and key names only.
pub struct StoreWatch {
    shared: Arc<Shared>,
    task: AbortHandle,
}

struct Shared {
    global_store: String,
    /// store name -> key names. Replaced whole on every (re)list, edited on watch events.
    stores: RwLock<HashMap<String, BTreeSet<String>>>,
    /// True once the first full listing has been applied; stays true across relists.
    ready: watch::Sender<bool>,
}

impl Shared {
    fn is_store(&self, name: &str) -> bool {
        name == self.global_store
            || name
                .strip_prefix(self.global_store.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|domain| !domain.is_empty())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, BTreeSet<String>>> {
        // A panic while holding the lock cannot leave the map half-edited (single insert/remove),
        // so a poisoned lock is still consistent.
        self.stores.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.stores.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoreWatch {
    /// Start watching Secrets in `naming.namespace`. Must be called inside a Tokio runtime.
    pub fn spawn(client: kube::Client, naming: &Naming) -> Arc<StoreWatch> {
        let shared = Arc::new(Shared {
            global_store: naming.global_store.clone(),
            stores: RwLock::new(HashMap::new()),
            ready: watch::channel(false).0,
        });
        let api: Api<SecretKeys> = Api::namespaced(client, &naming.namespace);
        let task = tokio::spawn(run(api, naming.namespace.clone(), shared.clone()));
        Arc::new(StoreWatch {
            shared,
            task: task.abort_handle(),
        })
    }

    /// Key names of `store`, sorted; `None` if there is no such store (or not yet listed).
    pub fn keys(&self, store: &str) -> Option<Vec<String>> {
        let stores = self.shared.read();
        stores.get(store).map(|keys| keys.iter().cloned().collect())
    }

    /// Names of the stores currently known, sorted.
    pub fn stores(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// Wait until the first full listing has been applied.
    pub async fn wait_ready(&self) {
        let mut ready = self.shared.ready.subscribe();
        // Only fails if the sender is dropped, which cannot happen while `self` holds it.
        let _ = ready.wait_for(|r| *r).await;
    }
}

impl StoreIndex for StoreWatch {
    fn ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    fn check(&self, store: &str, key: &str) -> StoreCheck {
        match self.shared.read().get(store) {
            None => StoreCheck::MissingStore,
            Some(keys) if keys.contains(key) => StoreCheck::Present,
            Some(_) => StoreCheck::MissingKey,
        }
    }
}

impl Drop for StoreWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for StoreWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stores: BTreeMap<String, BTreeSet<String>> = self
            .shared
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        f.debug_struct("StoreWatch")
            .field("ready", &*self.shared.ready.borrow())
            .field("stores", &stores)
            .finish()
    }
}

async fn run(api: Api<SecretKeys>, namespace: String, shared: Arc<Shared>) {
    let config = watcher::Config::default().fields(NOT_STORES);
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    // Stores seen since the last `Init`; swapped in whole at `InitDone` so readers never see a
    // half-listed state.
    let mut listing: HashMap<String, BTreeSet<String>> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(secret)) => {
                if let Some((name, keys)) = secret.into_store(&shared) {
                    listing.insert(name, keys);
                }
            }
            Ok(Event::InitDone) => {
                let count = listing.len();
                *shared.write() = std::mem::take(&mut listing);
                shared.ready.send_replace(true);
                tracing::info!(%namespace, stores = count, "secret stores listed");
            }
            Ok(Event::Apply(secret)) => {
                if let Some((name, keys)) = secret.into_store(&shared) {
                    tracing::debug!(store = %name, keys = keys.len(), "secret store updated");
                    shared.write().insert(name, keys);
                }
            }
            Ok(Event::Delete(secret)) => {
                let name = secret.metadata.name.unwrap_or_default();
                if shared.write().remove(&name).is_some() {
                    tracing::info!(store = %name, "secret store deleted");
                }
            }
            // kube's errors carry the API server's message or a JSON position, never a value:
            // values are never deserialized into anything that could fail (see `SecretKeys`).
            Err(error) => {
                tracing::warn!(%namespace, %error, "watch of secret stores failed; retrying")
            }
        }
    }
    tracing::error!(%namespace, "watch of secret stores ended");
}

/// A Secret as this module (and the management API) reads it: metadata and the key names of
/// `data`, values skipped.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct SecretKeys {
    pub(crate) metadata: ObjectMeta,
    #[serde(default, deserialize_with = "key_names")]
    pub(crate) data: BTreeSet<String>,
}

impl SecretKeys {
    fn into_store(self, shared: &Shared) -> Option<(String, BTreeSet<String>)> {
        let name = self.metadata.name?;
        shared.is_store(&name).then_some((name, self.data))
    }
}

fn key_names<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<String>, D::Error> {
    let data: Option<BTreeMap<String, IgnoredAny>> = Option::deserialize(d)?;
    Ok(data.map(|m| m.into_keys().collect()).unwrap_or_default())
}

impl kube::Resource for SecretKeys {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Secret".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "secrets".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_key_names_and_drops_values() {
        let json = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"},
                       "data":{"a":"Y2FuYXJ5","b":"eA=="},"type":"Opaque"}"#;
        let secret: SecretKeys = serde_json::from_str(json).unwrap();
        assert_eq!(
            secret.data,
            BTreeSet::from(["a".to_owned(), "b".to_owned()])
        );
        assert!(!format!("{secret:?}").contains("Y2FuYXJ5"));
        let empty: SecretKeys =
            serde_json::from_str(r#"{"metadata":{"name":"s"},"data":null}"#).unwrap();
        assert!(empty.data.is_empty());
    }

    #[test]
    fn store_names_follow_naming() {
        let naming = Naming {
            global_store: "store".into(),
            ..Naming::default()
        };
        let shared = Shared {
            global_store: naming.global_store.clone(),
            stores: RwLock::default(),
            ready: watch::channel(false).0,
        };
        assert!(shared.is_store("store"));
        assert!(shared.is_store("store-finance"));
        assert!(!shared.is_store("store-"));
        assert!(!shared.is_store("storex"));
        assert!(!shared.is_store("iomete-secret-store"));
    }
}
