//! "In use": how many live pods were granted a key. The webhook stamps every pod it admits with
//! the references it granted (`secrets.iomete.com/granted`); a domain key can only be used by pods
//! in the data-plane namespace (where the stores are), so that is where pods are counted.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::admission::identity::{STAMP_GRANTED, parse_granted_stamp};
use crate::refs::SecretObject;

#[async_trait]
pub trait Usage: Send + Sync {
    /// Live pods whose granted stamp names `secret`, or why they could not be counted.
    async fn pods_using(&self, secret: &SecretObject) -> Result<usize, String>;
}

/// `--dev`: there is no cluster, so no pod runs anything.
pub struct NoPods;

#[async_trait]
impl Usage for NoPods {
    async fn pods_using(&self, _secret: &SecretObject) -> Result<usize, String> {
        Ok(0)
    }
}

/// The references a pod's stamps grant it, or `None` when it has none that can be trusted.
pub type GrantsOf = Arc<dyn Fn(&Pod) -> Option<BTreeSet<String>> + Send + Sync>;

/// SIGNATURE HOOK: the stamps as written, unverified. Stamps are written by the webhook at
/// admission and signed by the tenant-isolation work (HMAC); until that lands this reads them as
/// they are. A forged stamp can only make a key look used by one more pod (a 409 that
/// `?force=true` overrides), never hide a real use. With signatures, build [`LivePods`] with
/// [`LivePods::with_grants`] and a function that verifies them and returns `None` otherwise.
pub fn unverified_grants(pod: &Pod) -> Option<BTreeSet<String>> {
    let stamp = pod.metadata.annotations.as_ref()?.get(STAMP_GRANTED)?;
    parse_granted_stamp(stamp).ok()
}

/// Counts live pods (not Succeeded or Failed, not being deleted) in the data-plane namespace.
pub struct LivePods {
    pods: Api<Pod>,
    grants: GrantsOf,
}

impl LivePods {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self::with_grants(client, namespace, Arc::new(unverified_grants))
    }

    /// `grants` reads (and verifies) a pod's stamps.
    pub fn with_grants(client: kube::Client, namespace: &str, grants: GrantsOf) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            grants,
        }
    }
}

#[async_trait]
impl Usage for LivePods {
    async fn pods_using(&self, secret: &SecretObject) -> Result<usize, String> {
        let wanted = secret.to_string();
        let mut params = ListParams::default()
            .fields("status.phase!=Succeeded,status.phase!=Failed")
            .limit(500);
        let mut count = 0;
        loop {
            let page = self
                .pods
                .list(&params)
                .await
                .map_err(|e| super::auth::kube_reason(&e))?;
            count += page
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| (self.grants)(p).is_some_and(|g| g.contains(&wanted)))
                .count();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Ok(count)
    }
}
