//! The guard (DESIGN §5): a pod must not name a managed store (`iomete-secret-store*`,
//! `iomete-vault-*`) itself, or anyone who can create a pod could skip the Use check. This module
//! lists every place a pod names a managed Secret; the engine denies those that are not part of
//! its own plan for the pod. It runs for every pod the webhook sees, so it allocates only when it
//! finds something.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::backends::KeyRef;
use crate::config::Naming;

/// Where a pod names a managed Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRef {
    /// Human path in the pod spec, e.g. `containers[0].env[DB_PASSWORD]`.
    pub path: String,
    /// The managed Secret named.
    pub secret: String,
    /// The key, for `secretKeyRef` (the only kind a plan produces); `None` for whole-Secret uses
    /// (`envFrom`, volumes), which a plan never produces.
    pub key: Option<String>,
}

impl fmt::Display for DirectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(
                f,
                "{} names key {key:?} of Secret {:?}",
                self.path, self.secret
            ),
            None => write!(f, "{} names Secret {:?}", self.path, self.secret),
        }
    }
}

impl DirectRef {
    /// The denial text for a direct reference the plan does not account for.
    pub fn denial(&self) -> String {
        format!(
            "{self}, a store managed by secrets-webhook; reference secrets with the \
             secrets.iomete.com annotations instead, so that the Use permission is checked"
        )
    }
}

/// Direct references to managed stores that the webhook's plan does not account for.
/// `Display` is the denial text (one line per reference).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(DirectRef::denial).collect::<Vec<_>>().join("; "))]
pub struct GuardError(pub Vec<DirectRef>);

/// The guard: every direct reference to a managed store must be exactly a `secretKeyRef` the
/// webhook itself planned for this pod (`planned`); whole-Secret uses are never planned.
///
/// The global store is exempt (docs/decisions.md): global secrets need no grant, and legacy
/// `${secrets.key}` placeholders become such references, which a reinvocation could no longer
/// tell from a hand-written one.
pub fn check(pod: &Pod, naming: &Naming, planned: &BTreeSet<KeyRef>) -> Result<(), GuardError> {
    let mut found = direct_store_refs(pod, naming);
    if found.is_empty() {
        return Ok(());
    }
    found.retain(|r| r.secret != naming.global_store);
    // A set lookup, not a scan of the plan: both lists grow with the pod (linear planning).
    found.retain(|r| match &r.key {
        Some(key) => !planned.contains(&KeyRef {
            secret: r.secret.clone(),
            key: key.clone(),
        }),
        None => true,
    });
    if found.is_empty() {
        Ok(())
    } else {
        Err(GuardError(found))
    }
}

/// Every place `pod` names a managed Secret: container and init-container env
/// `valueFrom.secretKeyRef` and `envFrom.secretRef`, volumes `secret.secretName`, projected volume
/// `sources[].secret.name`. Empty (no allocation) when there is none.
pub fn direct_store_refs(pod: &Pod, naming: &Naming) -> Vec<DirectRef> {
    let mut found = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return found;
    };
    scan_containers("containers", &spec.containers, naming, &mut found);
    if let Some(init) = spec.init_containers.as_deref() {
        scan_containers("initContainers", init, naming, &mut found);
    }
    if let Some(ephemeral) = spec.ephemeral_containers.as_deref() {
        for (i, c) in ephemeral.iter().enumerate() {
            scan_env(
                "ephemeralContainers",
                i,
                c.env.as_deref(),
                c.env_from.as_deref(),
                naming,
                &mut found,
            );
        }
    }
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if let Some(name) = volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            .filter(|n| naming.is_managed_secret(n))
        {
            found.push(DirectRef {
                path: format!("volumes[{}].secret", volume.name),
                secret: name.to_string(),
                key: None,
            });
        }
        let sources = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_deref())
            .unwrap_or_default();
        for (j, source) in sources.iter().enumerate() {
            if let Some(name) = source
                .secret
                .as_ref()
                .map(|s| s.name.as_str())
                .filter(|n| naming.is_managed_secret(n))
            {
                found.push(DirectRef {
                    path: format!("volumes[{}].projected.sources[{j}].secret", volume.name),
                    secret: name.to_string(),
                    key: None,
                });
            }
        }
    }
    found
}

fn scan_containers(
    kind: &str,
    containers: &[Container],
    naming: &Naming,
    out: &mut Vec<DirectRef>,
) {
    for (i, c) in containers.iter().enumerate() {
        scan_env(
            kind,
            i,
            c.env.as_deref(),
            c.env_from.as_deref(),
            naming,
            out,
        );
    }
}

fn scan_env(
    kind: &str,
    index: usize,
    env: Option<&[k8s_openapi::api::core::v1::EnvVar]>,
    env_from: Option<&[k8s_openapi::api::core::v1::EnvFromSource]>,
    naming: &Naming,
    out: &mut Vec<DirectRef>,
) {
    for var in env.unwrap_or_default() {
        if let Some(r) = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .filter(|r| naming.is_managed_secret(&r.name))
        {
            out.push(DirectRef {
                path: format!("{kind}[{index}].env[{}]", var.name),
                secret: r.name.clone(),
                key: Some(r.key.clone()),
            });
        }
    }
    for (j, from) in env_from.unwrap_or_default().iter().enumerate() {
        if let Some(r) = from
            .secret_ref
            .as_ref()
            .filter(|r| naming.is_managed_secret(&r.name))
        {
            out.push(DirectRef {
                path: format!("{kind}[{index}].envFrom[{j}]"),
                secret: r.name.clone(),
                key: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn finds_every_kind_of_direct_reference() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "main", "env": [
                        {"name": "OK", "value": "x"},
                        {"name": "MINE", "valueFrom": {"secretKeyRef": {"name": "my-secret", "key": "k"}}},
                        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "iomete-secret-store-finance", "key": "db_password"}}}
                    ]},
                    {"name": "side", "envFrom": [
                        {"configMapRef": {"name": "iomete-secret-store"}},
                        {"secretRef": {"name": "iomete-secret-store"}}
                    ]}
                ],
                "initContainers": [
                    {"name": "init", "env": [
                        {"name": "S3", "valueFrom": {"secretKeyRef": {"name": "iomete-vault-prod", "key": "s3"}}}
                    ]}
                ],
                "volumes": [
                    {"name": "plain", "secret": {"secretName": "tls"}},
                    {"name": "store", "secret": {"secretName": "iomete-secret-store-hr"}},
                    {"name": "proj", "projected": {"sources": [
                        {"configMap": {"name": "iomete-vault-x"}},
                        {"secret": {"name": "iomete-vault-prod-finance"}}
                    ]}}
                ]
            }
        }));
        let found = direct_store_refs(&p, &Naming::default());
        let paths: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            paths,
            vec![
                "containers[0].env[DB_PASSWORD] names key \"db_password\" of Secret \"iomete-secret-store-finance\"",
                "containers[1].envFrom[1] names Secret \"iomete-secret-store\"",
                "initContainers[0].env[S3] names key \"s3\" of Secret \"iomete-vault-prod\"",
                "volumes[store].secret names Secret \"iomete-secret-store-hr\"",
                "volumes[proj].projected.sources[1].secret names Secret \"iomete-vault-prod-finance\"",
            ]
        );
        assert_eq!(found[0].key.as_deref(), Some("db_password"));
        assert!(found[0].denial().contains("secrets.iomete.com annotations"));
    }

    #[test]
    fn only_planned_key_references_pass_the_guard() {
        let p = pod(serde_json::json!({
            "spec": {"containers": [{"name": "c",
                "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef":
                    {"name": "iomete-secret-store-finance", "key": "db_password"}}}],
                "envFrom": [{"secretRef": {"name": "iomete-secret-store-finance"}}]
            }]}
        }));
        let naming = Naming::default();
        let planned = BTreeSet::from([KeyRef {
            secret: "iomete-secret-store-finance".into(),
            key: "db_password".into(),
        }]);
        // The planned secretKeyRef passes; the envFrom of the same store never does.
        let err = check(&p, &naming, &planned).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].path, "containers[0].envFrom[0]");
        // Without a plan, both are denied, in one message.
        let err = check(&p, &naming, &BTreeSet::new()).unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert!(
            err.to_string()
                .contains("; containers[0].envFrom[0] names Secret")
        );
        // The global store is exempt, whole or by key.
        let global = pod(serde_json::json!({
            "spec": {"containers": [{"name": "c",
                "env": [{"name": "T", "valueFrom": {"secretKeyRef":
                    {"name": "iomete-secret-store", "key": "api_token"}}}],
                "envFrom": [{"secretRef": {"name": "iomete-secret-store"}}]
            }]}
        }));
        assert_eq!(direct_store_refs(&global, &naming).len(), 2);
        assert!(check(&global, &naming, &BTreeSet::new()).is_ok());
        // Another key of the same store is not covered by the plan.
        let other = BTreeSet::from([KeyRef {
            secret: "iomete-secret-store-finance".into(),
            key: "other".into(),
        }]);
        assert_eq!(check(&p, &naming, &other).unwrap_err().0.len(), 2);
    }

    #[test]
    fn real_pods_without_store_references_pass() {
        for f in [
            "spark35-driver-submit.json",
            "spark35-executor-submit.json",
            "jupyterhub-singleuser-z2jh.json",
        ] {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            let p: Pod = serde_json::from_str(&text).unwrap();
            assert!(direct_store_refs(&p, &Naming::default()).is_empty(), "{f}");
            assert!(check(&p, &Naming::default(), &BTreeSet::new()).is_ok());
        }
    }

    #[test]
    fn honours_configured_names() {
        let naming = Naming {
            global_store: "acme-store".into(),
            vault_secret_prefix: "acme-vault-".into(),
            ..Naming::default()
        };
        let p = pod(serde_json::json!({
            "spec": {"containers": [{"name": "c", "envFrom": [
                {"secretRef": {"name": "iomete-secret-store"}},
                {"secretRef": {"name": "acme-store-finance"}}
            ]}]}
        }));
        let found = direct_store_refs(&p, &naming);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].secret, "acme-store-finance");
    }
}
