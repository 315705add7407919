//! "In use": how many live pods were granted a key. The webhook stamps every pod it admits with
//! the references it granted (`secrets.iomete.com/granted`); a domain key can only be used by pods
//! in the data-plane namespace (where the stores are), so that is where pods are counted.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::identity::{Keys, stamps};
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

/// The grants of a pod whose stamps verify with the webhook's keys (`namespace`: where the pods
/// are listed); `None` for stamps added or edited by hand, or while no key is loaded. A forged
/// stamp then neither makes a key look used nor hides a use.
pub fn verified_grants(keys: Arc<Keys>, namespace: String) -> GrantsOf {
    Arc::new(move |pod: &Pod| {
        let keys = keys.get()?;
        stamps::verify(pod, &namespace, &keys)
            .ok()
            .map(|stamped| stamped.granted)
    })
}

/// Counts live pods (not Succeeded or Failed, not being deleted) in the data-plane namespace.
pub struct LivePods {
    pods: Api<Pod>,
    grants: GrantsOf,
}

impl LivePods {
    /// `grants` reads a pod's stamps and verifies them ([`verified_grants`]).
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
