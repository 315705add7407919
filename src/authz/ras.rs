//! The RAS authorizer: `ResourceBundle` grants evaluated in-process.
//!
//! A bundle holds grants (subjects × permissions) and lists the domains whose secrets it governs; a
//! Vault config names its bundle. `Use` on a Vault config needs `use` in the config's bundle; `Use`
//! on a domain needs `use` in any bundle that lists the domain. Bundles come from the local config
//! file or, in a cluster, from `ResourceBundle` objects watched in the data-plane namespace.

use std::collections::BTreeMap;
use std::time::Instant;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use kube::CustomResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Authorizer, AuthzError, CheckUse, Decision, Identity, Resource};

/// A permission: `view`, `update` or `use` (only `use` lets a workload reference the secrets).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    View,
    Update,
    Use,
}

impl std::fmt::Display for Permission {
    /// `View`, `Update`, `Use`: the product's names, as denials write them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Permission::View => "View",
            Permission::Update => "Update",
            Permission::Use => "Use",
        })
    }
}

/// Whether a subject names a user or a group.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum SubjectKind {
    User,
    Group,
}

/// A user or a group, as the Kubernetes API server names them (`userInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    pub kind: SubjectKind,
    pub name: String,
}

/// Gives every listed subject every listed permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub subjects: Vec<Subject>,
    pub permissions: Vec<Permission>,
}

// In a cluster this is the `ResourceBundle` custom resource (`resourcebundles.secrets.iomete.com`,
// namespaced, in the data-plane namespace); `ResourceBundle::crd()` (from `kube::CustomResourceExt`)
// gives its CustomResourceDefinition for `manifests/`. Doc comments here end up in the CRD schema
// (`kubectl explain`), so they speak to platform admins.
/// A resource bundle: who holds which permission on the secrets of its domains and of the Vault
/// configs that name it.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "secrets.iomete.com",
    version = "v1alpha1",
    kind = "ResourceBundle",
    plural = "resourcebundles",
    shortname = "rb",
    namespaced,
    doc = "Grants View / Update / Use on the secrets of the listed domains and of the Vault configs that name this bundle."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceBundleSpec {
    /// Domains whose secrets this bundle governs.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Who holds which permission (subjects × permissions).
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// A bundle as the local config file writes it (`resourceBundles:`): the name next to the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalResourceBundle {
    pub name: String,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub grants: Vec<Grant>,
}

impl ResourceBundleSpec {
    /// Whether any grant gives `permission` to the identity's user or one of its groups.
    pub fn grants_to(&self, who: &Identity, permission: Permission) -> bool {
        self.grants.iter().any(|grant| {
            grant.permissions.contains(&permission)
                && grant.subjects.iter().any(|s| match s.kind {
                    SubjectKind::User => s.name == who.username,
                    SubjectKind::Group => who.groups.contains(&s.name),
                })
        })
    }
}

/// Where the bundles come from.
enum Bundles {
    Local(BTreeMap<String, ResourceBundleSpec>),
    Watched(Store<ResourceBundle>),
}

/// Evaluates `ResourceBundle` grants. Cheap (no I/O per check); wrap it in
/// [`super::cache::CachedAuthorizer`] anyway for the shared budget and metrics of one code path.
pub struct RasAuthorizer {
    bundles: Bundles,
}

impl RasAuthorizer {
    /// Bundles from the local config file, fixed at start.
    pub fn from_local(bundles: &[LocalResourceBundle]) -> Self {
        let map = bundles
            .iter()
            .map(|b| {
                let spec = ResourceBundleSpec {
                    domains: b.domains.clone(),
                    grants: b.grants.clone(),
                };
                (b.name.clone(), spec)
            })
            .collect();
        Self {
            bundles: Bundles::Local(map),
        }
    }

    /// Bundles watched in `namespace` through `client` (the watch runs on the current runtime for
    /// as long as the process). Checks before the first listing fail closed.
    pub fn in_cluster(client: kube::Client, namespace: &str) -> Self {
        let api = kube::Api::<ResourceBundle>::namespaced(client, namespace);
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching ResourceBundles failed; retrying");
                }
            }
        });
        Self {
            bundles: Bundles::Watched(reader),
        }
    }

    /// True once the bundles are known (always for local bundles).
    pub fn ready(&self) -> bool {
        match &self.bundles {
            Bundles::Local(_) => true,
            Bundles::Watched(store) => {
                matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
            }
        }
    }

    /// Waits (bounded by the caller) until the first listing of watched bundles is in.
    async fn wait_ready(&self) {
        if let Bundles::Watched(store) = &self.bundles {
            // An error means the watch task is gone; `evaluate` then reports "not loaded".
            let _ = store.wait_until_ready().await;
        }
    }

    /// The decision on `Use` with the current bundles, or an error while they are not known yet.
    pub fn evaluate(&self, who: &Identity, what: &Resource) -> Result<Decision, AuthzError> {
        self.evaluate_permission(who, Permission::Use, what)
    }

    /// The decision on `permission` with the current bundles.
    pub fn evaluate_permission(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
    ) -> Result<Decision, AuthzError> {
        match &self.bundles {
            Bundles::Local(map) => Ok(decide(
                who,
                permission,
                what,
                map.iter().map(|(name, spec)| (name.as_str(), spec)),
            )),
            Bundles::Watched(store) => {
                if !self.ready() {
                    return Err(AuthzError::Unreachable(
                        "resource bundles are not loaded yet from the Kubernetes API".into(),
                    ));
                }
                let all = store.state();
                Ok(decide(
                    who,
                    permission,
                    what,
                    all.iter()
                        .map(|rb| (rb.metadata.name.as_deref().unwrap_or_default(), &rb.spec)),
                ))
            }
        }
    }
}

/// The RAS rule over a set of named bundles. A denial is the same whether or not the Vault config,
/// its bundle or a bundle listing the domain exists, and names no bundle: someone without the
/// permission learns nothing about what exists (docs/authorization.md).
fn decide<'a>(
    who: &Identity,
    permission: Permission,
    what: &Resource,
    mut bundles: impl Iterator<Item = (&'a str, &'a ResourceBundleSpec)>,
) -> Decision {
    let allowed = match what {
        Resource::VaultConfig { bundle, .. } => bundles
            .any(|(name, spec)| Some(name) == bundle.as_deref() && spec.grants_to(who, permission)),
        Resource::Domain(domain) => bundles.any(|(_, spec)| {
            spec.domains.iter().any(|d| d == domain) && spec.grants_to(who, permission)
        }),
    };
    if allowed {
        return Decision::Allow;
    }
    let fix = match what {
        Resource::VaultConfig { .. } => "the resource bundle of that Vault config",
        Resource::Domain(_) => "a resource bundle that lists the domain",
    };
    Decision::Deny(format!(
        "{who} lacks {permission} on {what}; a platform admin can grant {permission} to the user or one of its groups in {fix}"
    ))
}

#[async_trait]
impl CheckUse for RasAuthorizer {
    async fn check(&self, who: &Identity, what: &Resource) -> Result<Decision, AuthzError> {
        self.wait_ready().await;
        self.evaluate(who, what)
    }

    async fn check_permission(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
    ) -> Result<Decision, AuthzError> {
        self.wait_ready().await;
        self.evaluate_permission(who, permission, what)
    }

    fn ready(&self) -> bool {
        RasAuthorizer::ready(self)
    }
}

#[async_trait]
impl Authorizer for RasAuthorizer {
    async fn check_use(&self, who: &Identity, what: &Resource, deadline: Instant) -> Decision {
        let _ = tokio::time::timeout_at(deadline.into(), self.wait_ready()).await;
        self.evaluate(who, what)
            .unwrap_or_else(AuthzError::into_decision)
    }

    async fn decide(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
        deadline: Instant,
    ) -> Decision {
        let _ = tokio::time::timeout_at(deadline.into(), self.wait_ready()).await;
        self.evaluate_permission(who, permission, what)
            .unwrap_or_else(AuthzError::into_decision)
    }

    fn ready(&self) -> bool {
        RasAuthorizer::ready(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundles() -> Vec<LocalResourceBundle> {
        serde_yaml::from_str(
            r#"
- {name: finance-bundle, domains: [finance],
   grants: [{subjects: [{kind: User, name: alice}, {kind: Group, name: data-eng}], permissions: [use, view]}]}
- {name: viewers, domains: [finance, marketing],
   grants: [{subjects: [{kind: User, name: bob}], permissions: [view, update]}]}
- {name: marketing-bundle, domains: [marketing],
   grants: [{subjects: [{kind: Group, name: marketing}], permissions: [use]}]}
"#,
        )
        .unwrap()
    }

    fn vault(name: &str, bundle: &str) -> Resource {
        Resource::VaultConfig {
            name: name.into(),
            bundle: Some(bundle.into()),
        }
    }

    fn user(name: &str, groups: &[&str]) -> Identity {
        Identity::new(name, groups.iter().map(|g| g.to_string()))
    }

    #[test]
    fn user_granted_use_on_vault_config_is_allowed() {
        let ras = RasAuthorizer::from_local(&bundles());
        let d = ras.evaluate(
            &user("alice", &[]),
            &vault("vault-prod-finance", "finance-bundle"),
        );
        assert_eq!(d, Ok(Decision::Allow));
    }

    #[test]
    fn group_grant_allows_a_member() {
        let ras = RasAuthorizer::from_local(&bundles());
        let carol = user("carol", &["staff", "data-eng"]);
        assert_eq!(
            ras.evaluate(&carol, &Resource::Domain("finance".into())),
            Ok(Decision::Allow)
        );
        assert_eq!(
            ras.evaluate(&carol, &vault("v", "finance-bundle")),
            Ok(Decision::Allow)
        );
    }

    #[test]
    fn view_and_update_do_not_give_use() {
        let ras = RasAuthorizer::from_local(&bundles());
        let d = ras
            .evaluate(&user("bob", &[]), &vault("vault-prod-finance", "viewers"))
            .unwrap();
        assert_eq!(
            d,
            Decision::Deny(
                "user \"bob\" lacks Use on vault config \"vault-prod-finance\"; a platform admin \
                 can grant Use to the user or one of its groups in the resource bundle of that Vault \
                 config"
                    .into()
            )
        );
    }

    #[test]
    fn domain_use_in_any_listing_bundle_is_enough() {
        let ras = RasAuthorizer::from_local(&bundles());
        let m = user("mia", &["marketing"]);
        assert_eq!(
            ras.evaluate(&m, &Resource::Domain("marketing".into())),
            Ok(Decision::Allow)
        );
        // bob holds view/update in "viewers" (lists finance) but Use nowhere.
        let Ok(Decision::Deny(text)) =
            ras.evaluate(&user("bob", &[]), &Resource::Domain("finance".into()))
        else {
            panic!("bob must be denied")
        };
        assert_eq!(
            text,
            "user \"bob\" lacks Use on domain \"finance\"; a platform admin can grant Use to the \
             user or one of its groups in a resource bundle that lists the domain"
        );
    }

    /// Attack: probing which domains, Vault configs and bundles exist through denial texts.
    #[test]
    fn denials_do_not_tell_what_exists() {
        let ras = RasAuthorizer::from_local(&bundles());
        let bob = user("bob", &[]);
        let deny = |what: Resource| match ras.evaluate(&bob, &what) {
            Ok(Decision::Deny(text)) => text
                .replace("\"finance\"", "\"X\"")
                .replace("\"hr\"", "\"X\"")
                .replace("\"vault-x\"", "\"X\"")
                .replace("\"vault-prod-finance\"", "\"X\""),
            other => panic!("{other:?}"),
        };
        // A domain some bundles list, and one no bundle lists.
        assert_eq!(
            deny(Resource::Domain("finance".into())),
            deny(Resource::Domain("hr".into()))
        );
        // A config whose bundle exists, one whose bundle does not, one that does not exist.
        let existing = deny(vault("vault-prod-finance", "finance-bundle"));
        assert_eq!(existing, deny(vault("vault-x", "gone-bundle")));
        assert_eq!(
            existing,
            deny(Resource::VaultConfig {
                name: "vault-x".into(),
                bundle: None
            })
        );
        assert!(
            !existing.contains("bundle \""),
            "no bundle is named: {existing}"
        );
        // Nobody holds Use on a config that does not exist.
        assert!(matches!(
            ras.evaluate(
                &user("alice", &[]),
                &Resource::VaultConfig {
                    name: "vault-x".into(),
                    bundle: None
                }
            ),
            Ok(Decision::Deny(_))
        ));
    }

    #[test]
    fn a_user_subject_does_not_match_a_group_of_the_same_name() {
        let ras = RasAuthorizer::from_local(&bundles());
        // "alice" as a group name must not match the User subject alice.
        let d = ras.evaluate(&user("eve", &["alice"]), &vault("v", "finance-bundle"));
        assert!(matches!(d, Ok(Decision::Deny(_))));
    }

    #[test]
    fn the_config_file_schema_parses() {
        let config = crate::config::LocalConfig::parse(
            r#"
resourceBundles:
  - {name: finance-bundle, domains: [finance],
     grants: [{subjects: [{kind: User, name: alice}, {kind: Group, name: data-eng}], permissions: [use, view]}]}
trustedControllers:
  - {username: "system:serviceaccount:jhub:hub", userAnnotation: hub.jupyter.org/username}
  - {group: "system:serviceaccounts:spark-operator", groupsAnnotation: secrets.iomete.com/run-as-groups}
"#,
        )
        .unwrap();
        assert_eq!(config.resource_bundles[0].name, "finance-bundle");
        assert_eq!(
            config.resource_bundles[0].grants[0].permissions,
            vec![Permission::Use, Permission::View]
        );
        assert_eq!(
            config.trusted_controllers[1].user_annotation,
            "secrets.iomete.com/run-as"
        );
        // A typo in a permission is an error, not a silently missing grant.
        assert!(
            crate::config::LocalConfig::parse(
                "resourceBundles: [{name: b, grants: [{subjects: [], permissions: [usee]}]}]"
            )
            .is_err()
        );
    }

    #[test]
    fn crd_has_the_expected_names() {
        use kube::CustomResourceExt;
        let crd = ResourceBundle::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("resourcebundles.secrets.iomete.com")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(crd.spec.versions[0].schema.is_some());
    }
}
