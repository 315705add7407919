//! The Kubernetes RBAC authorizer: one `SubjectAccessReview` per decision, for platforms that keep
//! RAS in RBAC. Asks whether the identity may `use` `vaultconfigs` / `domains` of the group
//! `secrets.iomete.com`, named by the config or domain id, in the data-plane namespace, with the
//! full user info forwarded.

use std::time::Instant;

use async_trait::async_trait;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::{Authorizer, AuthzError, CheckUse, Decision, Identity, Permission, Resource};

/// API group of the resources the webhook asks about.
pub const GROUP: &str = "secrets.iomete.com";
/// The verb that stands for RAS `Use`.
pub const VERB: &str = "use";

/// The RBAC verb that stands for a RAS permission: `get` (View), `update` (Update), `use` (Use).
pub fn verb_of(permission: Permission) -> &'static str {
    match permission {
        Permission::View => "get",
        Permission::Update => "update",
        Permission::Use => VERB,
    }
}

/// Asks the API server through a real `kube::Client`.
#[derive(Clone)]
pub struct SarAuthorizer {
    client: kube::Client,
    namespace: String,
}

impl SarAuthorizer {
    /// `namespace` is the data-plane namespace: a Role there (or a ClusterRole) can grant `use`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
        }
    }

    /// The review the webhook sends for one decision on `permission`.
    pub fn review_for_permission(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
    ) -> SubjectAccessReview {
        let (resource, name) = match what {
            Resource::Domain(domain) => ("domains", domain.as_str()),
            Resource::VaultConfig { name, .. } => ("vaultconfigs", name.as_str()),
        };
        SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                groups: Some(who.groups.clone()),
                uid: who.uid.clone(),
                extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(self.namespace.clone()),
                    verb: Some(verb_of(permission).into()),
                    group: Some(GROUP.into()),
                    resource: Some(resource.into()),
                    name: Some(name.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        }
    }
}

#[async_trait]
impl CheckUse for SarAuthorizer {
    async fn check(&self, who: &Identity, what: &Resource) -> Result<Decision, AuthzError> {
        self.check_permission(who, Permission::Use, what).await
    }

    async fn check_permission(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
    ) -> Result<Decision, AuthzError> {
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let verb = verb_of(permission);
        let answer = api
            .create(
                &PostParams::default(),
                &self.review_for_permission(who, permission, what),
            )
            .await
            .map_err(|e| {
                AuthzError::Unreachable(format!("SubjectAccessReview for {who} failed: {e}"))
            })?;
        let Some(status) = answer.status else {
            return Err(AuthzError::Unreachable(
                "SubjectAccessReview answer has no status".into(),
            ));
        };
        if status.allowed && status.denied != Some(true) {
            return Ok(Decision::Allow);
        }
        let (resource, name) = match what {
            Resource::Domain(d) => ("domains", d),
            Resource::VaultConfig { name, .. } => ("vaultconfigs", name),
        };
        // RBAC's reason and evaluation error name roles and bindings: logged for admins, never
        // part of the denial, which reads the same whatever exists.
        let reason = status.reason.as_deref().unwrap_or_default();
        let evaluation_error = status.evaluation_error.as_deref().unwrap_or_default();
        if !reason.is_empty() || !evaluation_error.is_empty() {
            tracing::info!(user = %who.username, %what, reason, evaluation_error, "SubjectAccessReview denied");
        }
        Ok(Decision::Deny(format!(
            "{who} lacks {permission} on {what} (Kubernetes RBAC: verb \"{verb}\" on {resource}.{GROUP} \
             {name:?} in namespace {:?}); a platform admin can grant it with a Role and RoleBinding",
            self.namespace
        )))
    }
}

#[async_trait]
impl Authorizer for SarAuthorizer {
    async fn check_use(&self, who: &Identity, what: &Resource, deadline: Instant) -> Decision {
        self.decide(who, Permission::Use, what, deadline).await
    }

    async fn decide(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
        deadline: Instant,
    ) -> Decision {
        let decided = self.check_permission(who, permission, what);
        match tokio::time::timeout_at(deadline.into(), decided).await {
            Ok(Ok(decision)) => decision,
            Ok(Err(e)) => e.into_decision(),
            Err(_) => AuthzError::Unreachable(
                "no SubjectAccessReview answer before the admission deadline".into(),
            )
            .into_decision(),
        }
    }
}
