//! Where secret values live. The admission engine asks these before it plans; the planner itself
//! never does I/O.
//!
//! - [`StoreIndex`]: which keys each Kubernetes secret store holds (key names only).
//!   [`local::LocalStores`] serves the config file; [`kubernetes::StoreWatch`] a watch cache.
//! - [`VaultSource`]: reads Vault KV v2 fields and makes them reachable through a Secret.

pub mod kubernetes;
pub mod local;
mod naming;
pub mod vault;

pub use naming::Naming;

use std::time::Instant;

use async_trait::async_trait;

use crate::refs::SecretObject;

/// Where the kubelet finds a value: `valueFrom.secretKeyRef{name: secret, key}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef {
    pub secret: String,
    pub key: String,
}

/// Answer of a store lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCheck {
    Present,
    MissingKey,
    MissingStore,
}

/// Key names of the Kubernetes secret stores in the data-plane namespace.
pub trait StoreIndex: Send + Sync {
    /// False until the first full listing is known.
    fn ready(&self) -> bool;
    /// Whether `store` exists and holds `key`.
    fn check(&self, store: &str, key: &str) -> StoreCheck;
}

/// A Vault reference the engine wants delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultWant<'a> {
    pub secret: &'a SecretObject,
}

/// The Vault backend, as the admission engine sees it.
#[async_trait]
pub trait VaultSource: Send + Sync {
    /// False until the Vault configs are known (in a cluster: the first listing of the CRDs).
    fn ready(&self) -> bool {
        true
    }

    /// The resource bundle that governs `config`, or `None` if no such Vault config exists.
    fn bundle_of(&self, config: &str) -> Option<String>;

    /// Read every wanted field (cached, coalesced) and make each reachable from `namespace` through
    /// a [`KeyRef`]; write nothing when `dry_run`. One result per want, in order. Finishes by
    /// `deadline`. Error texts name what failed and the fix, never a value.
    async fn deliver(
        &self,
        namespace: &str,
        wants: &[VaultWant<'_>],
        dry_run: bool,
        deadline: Instant,
    ) -> Vec<Result<KeyRef, String>>;
}
