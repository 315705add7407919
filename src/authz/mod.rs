//! Who may use which secret. The engine asks an [`Authorizer`] once per (identity, resource) a pod
//! needs; the RAS authorizer evaluates ResourceBundles in-process, the RBAC one asks Kubernetes.

use std::time::Instant;

use async_trait::async_trait;

/// The identity a pod is admitted for (after trusted-controller and executor resolution).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub username: String,
    pub groups: Vec<String>,
}

/// What a reference needs `Use` on. Global secrets need no grant and never reach the authorizer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Domain(String),
    VaultConfig { name: String, bundle: String },
}

/// The outcome of one check. A denial's text names identity, permission, resource and bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

#[async_trait]
pub trait Authorizer: Send + Sync {
    /// Whether `who` holds `Use` on `what`. Fails closed: an unreachable authorizer denies.
    async fn check_use(&self, who: &Identity, what: &Resource, deadline: Instant) -> Decision;
}
