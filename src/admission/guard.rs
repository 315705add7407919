//! The guard (DESIGN §5): a pod must not name a managed store (`iomete-secret-store*`,
//! `iomete-vault-*`) itself, or anyone who can create a pod could skip the Use check. This module
//! knows every PodSpec field that names a Secret ([`visit_secrets`]); the engine denies each one
//! that names a managed store and is not part of its own plan for the pod. It runs for every pod
//! the webhook sees, so it allocates only when it finds something.
//!
//! The list of fields is checked against the k8s-openapi types by `tests/secret_fields.rs`, which
//! fails when a PodSpec field that names a Secret is unknown here.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, LocalObjectReference, Pod, PodSpec};

use crate::backends::{KeyRef, Naming};

/// Where in a PodSpec a Secret is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place<'a> {
    /// `{containers,initContainers,ephemeralContainers}[index].env[var].valueFrom.secretKeyRef`
    Env {
        containers: &'static str,
        index: usize,
        var: &'a str,
    },
    /// `{containers,initContainers,ephemeralContainers}[index].envFrom[item].secretRef`
    EnvFrom {
        containers: &'static str,
        index: usize,
        item: usize,
    },
    /// `imagePullSecrets[index]`
    ImagePullSecret { index: usize },
    /// `volumes[volume].<field>`, e.g. `secret.secretName` or `csi.nodePublishSecretRef.name`
    Volume {
        volume: &'a str,
        field: &'static str,
    },
    /// `volumes[volume].projected.sources[item].secret`
    Projected { volume: &'a str, item: usize },
}

impl Place<'_> {
    /// The field in schema notation (lists as `[]`), e.g. `volumes[].csi.nodePublishSecretRef.name`.
    pub fn schema_path(&self) -> String {
        match self {
            Place::Env { containers, .. } => {
                format!("{containers}[].env[].valueFrom.secretKeyRef.name")
            }
            Place::EnvFrom { containers, .. } => format!("{containers}[].envFrom[].secretRef.name"),
            Place::ImagePullSecret { .. } => "imagePullSecrets[].name".into(),
            Place::Volume { field, .. } => format!("volumes[].{field}"),
            Place::Projected { .. } => "volumes[].projected.sources[].secret.name".into(),
        }
    }
}

/// Names go into paths only when plain (the pod is not validated yet).
fn plain(name: &str) -> bool {
    crate::refs::plain_name(name).is_some()
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Env {
                containers,
                index,
                var,
            } if plain(var) => write!(f, "{containers}[{index}].env[{var}]"),
            Place::Env {
                containers, index, ..
            } => write!(f, "{containers}[{index}].env[an invalid name]"),
            Place::EnvFrom {
                containers,
                index,
                item,
            } => write!(f, "{containers}[{index}].envFrom[{item}]"),
            Place::ImagePullSecret { index } => write!(f, "imagePullSecrets[{index}]"),
            Place::Volume { volume, field } if plain(volume) => {
                write!(f, "volumes[{volume}].{field}")
            }
            Place::Volume { field, .. } => write!(f, "volumes[an invalid name].{field}"),
            Place::Projected { volume, item } if plain(volume) => {
                write!(f, "volumes[{volume}].projected.sources[{item}].secret")
            }
            Place::Projected { item, .. } => {
                write!(
                    f,
                    "volumes[an invalid name].projected.sources[{item}].secret"
                )
            }
        }
    }
}

/// Calls `found(place, secret, key)` for every Secret `spec` names; `key` is set for
/// `secretKeyRef` (the only kind a plan produces), `None` for whole-Secret uses.
pub fn visit_secrets<'a>(
    spec: &'a PodSpec,
    mut found: impl FnMut(Place<'a>, &'a str, Option<&'a str>),
) {
    for (index, c) in spec.containers.iter().enumerate() {
        visit_env(
            "containers",
            index,
            c.env.as_deref(),
            c.env_from.as_deref(),
            &mut found,
        );
    }
    for (index, c) in spec.init_containers.iter().flatten().enumerate() {
        visit_env(
            "initContainers",
            index,
            c.env.as_deref(),
            c.env_from.as_deref(),
            &mut found,
        );
    }
    for (index, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        visit_env(
            "ephemeralContainers",
            index,
            c.env.as_deref(),
            c.env_from.as_deref(),
            &mut found,
        );
    }
    for (index, r) in spec.image_pull_secrets.iter().flatten().enumerate() {
        found(Place::ImagePullSecret { index }, &r.name, None);
    }
    for v in spec.volumes.iter().flatten() {
        let volume = v.name.as_str();
        let mut at = |field: &'static str, name: Option<&'a str>| {
            if let Some(name) = name {
                found(Place::Volume { volume, field }, name, None);
            }
        };
        let local = |r: Option<&'a LocalObjectReference>| r.map(|r| r.name.as_str());
        at(
            "secret.secretName",
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
        );
        at(
            "azureFile.secretName",
            v.azure_file.as_ref().map(|a| a.secret_name.as_str()),
        );
        at(
            "cephfs.secretRef.name",
            local(v.cephfs.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        at(
            "cinder.secretRef.name",
            local(v.cinder.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        at(
            "csi.nodePublishSecretRef.name",
            local(
                v.csi
                    .as_ref()
                    .and_then(|s| s.node_publish_secret_ref.as_ref()),
            ),
        );
        at(
            "flexVolume.secretRef.name",
            local(v.flex_volume.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        at(
            "iscsi.secretRef.name",
            local(v.iscsi.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        at(
            "rbd.secretRef.name",
            local(v.rbd.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        at(
            "scaleIO.secretRef.name",
            local(v.scale_io.as_ref().map(|s| &s.secret_ref)),
        );
        at(
            "storageos.secretRef.name",
            local(v.storageos.as_ref().and_then(|s| s.secret_ref.as_ref())),
        );
        let sources = v.projected.as_ref().and_then(|p| p.sources.as_deref());
        for (item, source) in sources.unwrap_or_default().iter().enumerate() {
            if let Some(s) = source.secret.as_ref() {
                found(Place::Projected { volume, item }, &s.name, None);
            }
        }
    }
}

fn visit_env<'a>(
    containers: &'static str,
    index: usize,
    env: Option<&'a [EnvVar]>,
    env_from: Option<&'a [EnvFromSource]>,
    found: &mut impl FnMut(Place<'a>, &'a str, Option<&'a str>),
) {
    for var in env.unwrap_or_default() {
        if let Some(r) = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            let place = Place::Env {
                containers,
                index,
                var: &var.name,
            };
            found(place, &r.name, Some(&r.key));
        }
    }
    for (item, from) in env_from.unwrap_or_default().iter().enumerate() {
        if let Some(r) = from.secret_ref.as_ref() {
            let place = Place::EnvFrom {
                containers,
                index,
                item,
            };
            found(place, &r.name, None);
        }
    }
}

/// Where a pod names a managed Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRef {
    /// Human path in the pod spec, e.g. `containers[0].env[DB_PASSWORD]`.
    pub path: String,
    /// The field in schema notation, e.g. `containers[].env[].valueFrom.secretKeyRef.name`.
    pub field: String,
    /// The managed Secret named.
    pub secret: String,
    /// The key, for `secretKeyRef` in `containers` and `initContainers` (what a plan produces);
    /// `None` for whole-Secret uses and ephemeral containers, which a plan never produces.
    pub key: Option<String>,
}

impl fmt::Display for DirectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys of managed stores are only named when they look like keys (they are not validated
        // here).
        match &self.key {
            Some(key) if plain(key) => write!(
                f,
                "{} names key {key:?} of Secret {:?}",
                self.path, self.secret
            ),
            _ => write!(f, "{} names Secret {:?}", self.path, self.secret),
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

/// Every place `pod` names a managed Secret, in any field that names a Secret. Empty (no
/// allocation) when there is none.
pub fn direct_store_refs(pod: &Pod, naming: &Naming) -> Vec<DirectRef> {
    let mut found = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return found;
    };
    visit_secrets(spec, |place, secret, key| {
        if !naming.is_managed_secret(secret) {
            return;
        }
        // A plan only writes secretKeyRefs into containers and init containers.
        let key = match place {
            Place::Env { containers, .. } if containers != "ephemeralContainers" => key,
            _ => None,
        };
        found.push(DirectRef {
            path: place.to_string(),
            field: place.schema_path(),
            secret: secret.to_string(),
            key: key.map(str::to_string),
        });
    });
    found
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
                "ephemeralContainers": [
                    {"name": "debug", "env": [
                        {"name": "S3", "valueFrom": {"secretKeyRef": {"name": "iomete-vault-prod", "key": "s3"}}}
                    ]}
                ],
                "imagePullSecrets": [{"name": "registry"}, {"name": "iomete-secret-store-finance"}],
                "volumes": [
                    {"name": "plain", "secret": {"secretName": "tls"}},
                    {"name": "store", "secret": {"secretName": "iomete-secret-store-hr"}},
                    {"name": "proj", "projected": {"sources": [
                        {"configMap": {"name": "iomete-vault-x"}},
                        {"secret": {"name": "iomete-vault-prod-finance"}}
                    ]}},
                    {"name": "csi", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "iomete-secret-store-finance"}}},
                    {"name": "af", "azureFile": {"secretName": "iomete-vault-a", "shareName": "s"}}
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
                "ephemeralContainers[0].env[S3] names Secret \"iomete-vault-prod\"",
                "imagePullSecrets[1] names Secret \"iomete-secret-store-finance\"",
                "volumes[store].secret.secretName names Secret \"iomete-secret-store-hr\"",
                "volumes[proj].projected.sources[1].secret names Secret \"iomete-vault-prod-finance\"",
                "volumes[csi].csi.nodePublishSecretRef.name names Secret \"iomete-secret-store-finance\"",
                "volumes[af].azureFile.secretName names Secret \"iomete-vault-a\"",
            ]
        );
        assert_eq!(found[0].key.as_deref(), Some("db_password"));
        assert_eq!(found[3].key, None, "ephemeral containers are never planned");
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
        // A planned key in an ephemeral container is still denied.
        let ephemeral = pod(serde_json::json!({
            "spec": {"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "e",
                "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef":
                    {"name": "iomete-secret-store-finance", "key": "db_password"}}}]}]}
        }));
        assert!(check(&ephemeral, &naming, &planned).is_err());
    }

    #[test]
    fn names_that_may_hold_anything_are_not_quoted() {
        let p = pod(serde_json::json!({
            "spec": {"containers": [{"name": "c",
                "env": [{"name": "hunter2 pasted", "valueFrom": {"secretKeyRef":
                    {"name": "iomete-secret-store-finance", "key": "s3cr3t value"}}}]}],
                "volumes": [{"name": "my password", "secret": {"secretName": "iomete-vault-x"}},
                    {"name": "pasted t0ken", "projected": {"sources": [
                        {"secret": {"name": "iomete-secret-store-finance"}}]}}]}
        }));
        let text = check(&p, &Naming::default(), &BTreeSet::new())
            .unwrap_err()
            .to_string();
        assert!(
            !text.contains("hunter2")
                && !text.contains("s3cr3t")
                && !text.contains("password")
                && !text.contains("t0ken"),
            "{text}"
        );
        for place in [
            "containers[0].env[an invalid name]",
            "volumes[an invalid name].secret",
            "volumes[an invalid name].projected.sources[0].secret",
        ] {
            assert!(text.contains(place), "{place}: {text}");
        }
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
