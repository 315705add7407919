//! "In use": how many live pods were granted a key. The webhook stamps every pod it admits with
//! the references it granted (`secrets.iomete.com/granted`); a domain key can only be used by pods
//! in the data-plane namespace (where the stores are), so that is where pods are counted.

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

/// Counts live pods (not Succeeded or Failed) in the data-plane namespace, from their metadata.
pub struct LivePods {
    pods: Api<Pod>,
}

impl LivePods {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
        }
    }
}

/// The references a pod's stamps say it was granted.
///
/// SIGNATURE HOOK: stamps are written by the webhook at admission; the tenant-isolation work
/// signs them (HMAC). Until that lands this reads the stamp as is: a forged stamp can only make a
/// key look used by one more pod (a 409 that `?force=true` overrides), never hide a real use.
/// Once signatures exist, verify them here and skip pods whose stamps do not verify.
fn granted(meta: &kube::api::ObjectMeta) -> Option<std::collections::BTreeSet<String>> {
    let stamp = meta.annotations.as_ref()?.get(STAMP_GRANTED)?;
    parse_granted_stamp(stamp).ok()
}

#[async_trait]
impl Usage for LivePods {
    async fn pods_using(&self, secret: &SecretObject) -> Result<usize, String> {
        let wanted = secret.to_string();
        let params = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let mut count = 0;
        let mut params = params.limit(500);
        loop {
            let page = self
                .pods
                .list_metadata(&params)
                .await
                .map_err(|e| super::auth::kube_reason(&e))?;
            count += page
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| granted(&p.metadata).is_some_and(|g| g.contains(&wanted)))
                .count();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Ok(count)
    }
}
