//! Who may use which secret. The engine asks an [`Authorizer`] once per (identity, resource) a pod
//! needs; the RAS authorizer ([`ras`]) evaluates ResourceBundles in-process, the RBAC one ([`sar`])
//! asks Kubernetes with a SubjectAccessReview. [`cache::CachedAuthorizer`] puts a short decision
//! cache, request coalescing and a time budget in front of either. See `docs/authorization.md`.

pub mod cache;
pub mod ras;
pub mod sar;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::metrics::Metrics;
pub use ras::Permission;

/// The identity a pod is admitted for (after trusted-controller and executor resolution).
///
/// `uid` and `extra` come from the AdmissionReview's `userInfo` when the requester is the identity
/// itself; they are empty for identities named by a trusted controller or inherited by executors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub username: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    /// A user with groups (sorted and de-duplicated, so equal identities compare and cache equal).
    pub fn new(username: impl Into<String>, groups: impl IntoIterator<Item = String>) -> Self {
        let mut groups: Vec<String> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        groups.sort();
        groups.dedup();
        Self {
            username: username.into(),
            groups,
            uid: None,
            extra: BTreeMap::new(),
        }
    }
}

impl fmt::Display for Identity {
    /// `user "alice"`: the form every denial text uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {:?}", self.username)
    }
}

/// What a reference needs `Use` on. Global secrets need no grant and never reach the authorizer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Domain(String),
    /// A Vault config and the bundle that governs it (`None`: the config does not exist, so
    /// nobody holds Use on it; the denial does not say so).
    VaultConfig {
        name: String,
        bundle: Option<String>,
    },
}

impl fmt::Display for Resource {
    /// `domain "finance"` / `vault config "vault-prod-finance"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Domain(d) => write!(f, "domain {d:?}"),
            Resource::VaultConfig { name, .. } => write!(f, "vault config {name:?}"),
        }
    }
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

    /// Whether `who` holds `permission` on `what` (the management API asks View and Update too).
    /// Fails closed. No default: each authorizer answers every permission itself.
    async fn decide(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
        deadline: Instant,
    ) -> Decision;

    /// False while the authorizer cannot decide yet (e.g. bundles not listed); for `/readyz`.
    fn ready(&self) -> bool {
        true
    }
}

/// Why an authorizer could not decide. Never cached; always turned into a fail-closed denial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    #[error("authorizer unreachable: {0} (failing closed)")]
    Unreachable(String),
}

impl AuthzError {
    /// The denial an undecided check turns into.
    pub fn into_decision(self) -> Decision {
        Decision::Deny(self.to_string())
    }
}

/// An authorizer that may fail to decide: the building block [`cache::CachedAuthorizer`] wraps.
/// Errors are kept apart from denials so that they are never cached.
#[async_trait]
pub trait CheckUse: Send + Sync {
    /// Whether `who` holds `Use` on `what`, or why that could not be decided.
    async fn check(&self, who: &Identity, what: &Resource) -> Result<Decision, AuthzError>;

    /// Whether `who` holds `permission` on `what`; only Use unless the authorizer says otherwise.
    async fn check_permission(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
    ) -> Result<Decision, AuthzError> {
        match permission {
            Permission::Use => self.check(who, what).await,
            _ => Err(AuthzError::Unreachable(format!(
                "this authorizer cannot decide {permission}"
            ))),
        }
    }

    /// False while it cannot decide yet.
    fn ready(&self) -> bool {
        true
    }
}

/// Which authorizer decides (`--authorizer`): RAS bundles in-process, or Kubernetes RBAC via
/// SubjectAccessReview.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthorizerKind {
    /// `ResourceBundle` grants, evaluated in-process (the default).
    #[default]
    Ras,
    /// One SubjectAccessReview per decision (verb `use`, group `secrets.iomete.com`).
    #[value(name = "subject-access-review", alias = "rbac")]
    Rbac,
}

impl AuthorizerKind {
    /// The `backend` label of its calls in `secrets_webhook_backend_calls_total`.
    pub fn label(self) -> &'static str {
        match self {
            AuthorizerKind::Ras => "ras",
            AuthorizerKind::Rbac => "subject-access-review",
        }
    }
}

/// The authorizer for running without a cluster: the config file's bundles, cached like in a
/// cluster so that both paths behave the same. Decisions and checks are counted in `metrics`.
pub fn local(
    bundles: &[ras::LocalResourceBundle],
    settings: cache::CacheSettings,
    metrics: Arc<Metrics>,
) -> Arc<dyn Authorizer> {
    Arc::new(cache::CachedAuthorizer::counted(
        ras::RasAuthorizer::from_local(bundles),
        settings,
        metrics,
        AuthorizerKind::Ras.label(),
    ))
}

/// The authorizer in a cluster: `ResourceBundle`s watched in `namespace`, or SubjectAccessReviews.
/// Decisions and checks are counted in `metrics`. Must be called on a Tokio runtime (the RAS watch
/// is spawned).
pub fn in_cluster(
    kind: AuthorizerKind,
    client: kube::Client,
    namespace: &str,
    settings: cache::CacheSettings,
    metrics: Arc<Metrics>,
) -> Arc<dyn Authorizer> {
    match kind {
        AuthorizerKind::Ras => Arc::new(cache::CachedAuthorizer::counted(
            ras::RasAuthorizer::in_cluster(client, namespace),
            settings,
            metrics,
            kind.label(),
        )),
        AuthorizerKind::Rbac => Arc::new(cache::CachedAuthorizer::counted(
            sar::SarAuthorizer::new(client, namespace),
            settings,
            metrics,
            kind.label(),
        )),
    }
}
