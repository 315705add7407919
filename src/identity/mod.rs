//! The identity a pod is admitted for: the requester (`userInfo`), a user named by a trusted
//! controller, or, for a Spark executor, the identity and grants its driver was stamped with.
//! See `docs/authorization.md`.
//!
//! - [`trusted`]: trusted controllers and the on-behalf annotations they may set.
//! - [`stamps`]: the signed stamps the webhook writes on the pods it mutates.
//! - [`keys`]: the signing keys (current and previous), hot-reloaded in a cluster.
//! - [`owner`]: where an executor's driver pod is looked up.
//! - [`run_as`]: SparkApplications may only name their own requester in `run-as`.

pub mod keys;
pub mod owner;
pub mod run_as;
pub mod stamps;
pub mod trusted;

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::Pod;

use crate::authz::Identity;
use crate::backends::Naming;
use crate::refs::{SecretObject, SourceType};
pub use keys::{KeyRing, Keys};
pub use owner::{KubeOwnerLookup, LookupError, OWNER_CACHE, OwnerLookup, StaticOwner};
pub use stamps::{StampError, identity_stamp};
pub use trusted::{
    RUN_AS, RUN_AS_GROUPS, TrustedConfigError, TrustedController, TrustedControllers,
};

/// `userInfo.extra` key the API server sets for bound service-account tokens: the requesting pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `userInfo.extra` key the API server sets for bound service-account tokens: the pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Spark's pod role label.
const SPARK_ROLE: &str = "spark-role";
/// Admission warnings are kept short (DESIGN §6).
const MAX_WARNING: usize = 120;

/// How strictly executors must prove they were created by their driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutorPolicy {
    /// The requester's token must be bound to the owner driver pod: both the pod-name and the
    /// pod-uid extras present and naming the driver (default). Off, any token of the driver's
    /// service account can stand in for any driver of that account (logged at start).
    pub require_bound_token: bool,
}

impl Default for ExecutorPolicy {
    fn default() -> Self {
        Self {
            require_bound_token: true,
        }
    }
}

/// How the identity was found (for audit annotations and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The requester itself (`userInfo`).
    Requester,
    /// A trusted controller submitting for a user named in `annotation`.
    TrustedController {
        controller: String,
        annotation: String,
    },
    /// A Spark executor inheriting the stamps of its driver pod.
    SparkDriver { driver: String },
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Requester => f.write_str("request"),
            Via::TrustedController {
                controller,
                annotation,
            } => write!(f, "trusted-controller {controller} ({annotation})"),
            Via::SparkDriver { driver } => write!(f, "spark-driver {driver}"),
        }
    }
}

/// The outcome of identity resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub identity: Identity,
    pub via: Via,
    /// For executors: the short forms of the references their driver was granted.
    pub inherited: Option<BTreeSet<String>>,
    /// Admission warnings (≤120 chars), e.g. an on-behalf annotation ignored.
    pub warnings: Vec<String>,
}

impl Resolved {
    /// For executors, whether `secret` is among the driver's grants (global secrets need none).
    /// Other pods: always Ok (their grants are checked by the authorizer).
    pub fn may_inherit(&self, secret: &SecretObject, naming: &Naming) -> Result<(), IdentityError> {
        let (Some(granted), Via::SparkDriver { driver }) = (&self.inherited, &self.via) else {
            return Ok(());
        };
        if is_global(secret, naming) || granted.contains(&secret.to_string()) {
            return Ok(());
        }
        Err(IdentityError::NotInherited {
            reference: secret.to_string(),
            driver: driver.clone(),
        })
    }
}

fn is_global(secret: &SecretObject, naming: &Naming) -> bool {
    secret.source.kind == SourceType::Kubernetes && secret.source.id == naming.global_id
}

/// Why no identity could be established. `Display` is the denial text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the AdmissionReview carries no userInfo.username; cannot tell who submits the pod")]
    NoRequester,
    #[error(
        "trusted controller {controller:?} set annotation {annotation} to an empty value; it must name the user the pod runs for"
    )]
    EmptyOnBehalf {
        controller: String,
        annotation: String,
    },
    #[error(
        "executor pod has no controller ownerReference to its Spark driver pod; executors must be created by their Spark driver"
    )]
    NoOwner,
    #[error(
        "executor's controller ownerReference is a {kind} {name:?}, not a Pod; executors must be owned by their Spark driver pod"
    )]
    OwnerNotPod { kind: String, name: String },
    #[error(
        "executor's owner pod {name:?} not found in namespace {namespace:?}; executors must be created by their Spark driver"
    )]
    OwnerNotFound { namespace: String, name: String },
    #[error(
        "cannot look up executor's owner pod {name:?} in namespace {namespace:?}: {reason} (failing closed)"
    )]
    OwnerLookup {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "executor's owner pod {name:?} has uid {actual}, but the ownerReference names uid {expected}: the driver was replaced"
    )]
    OwnerUid {
        name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "executor's owner pod {name:?} is not a Spark driver (label spark-role=driver missing)"
    )]
    NotADriver { name: String },
    #[error(
        "executor belongs to Spark application {executor_app:?}, but its owner pod {driver:?} is the driver of {driver_app:?}"
    )]
    OtherApplication {
        driver: String,
        executor_app: String,
        driver_app: String,
    },
    #[error(
        "executor was created by {requester:?}, but its driver {driver:?} runs as {expected:?}; executors must be created by their driver's service account"
    )]
    NotDriverAccount {
        requester: String,
        driver: String,
        expected: String,
    },
    #[error(
        "executor was created with a service-account token that is not bound to a pod (no {missing} in the request); executors must be created by their driver {driver:?} with its own mounted token, not a token from `kubectl create token`"
    )]
    UnboundToken {
        driver: String,
        missing: &'static str,
    },
    #[error(
        "executor was created from pod {requester_pod:?} (bound token), not by its driver {driver:?}"
    )]
    NotDriverPod {
        requester_pod: String,
        driver: String,
    },
    #[error("executor's driver {driver:?}: its stamps {reason}, so its executors may use none")]
    Stamps { driver: String, reason: StampError },
    #[error(
        "secrets-webhook has no signing key loaded, so it cannot {action} (failing closed); a platform admin must create the signing key Secret (docs/operations.md)"
    )]
    NoSigningKey { action: &'static str },
    #[error(
        "executor may not use {reference}: its Spark driver {driver:?} was not granted it; add the reference to the driver pod (spark.kubernetes.driver.annotation.*) and resubmit"
    )]
    NotInherited { reference: String, driver: String },
}

/// What identity resolution consults.
#[derive(Clone, Copy)]
pub struct Resolver<'a> {
    pub trusted: &'a TrustedControllers,
    pub owners: &'a dyn OwnerLookup,
    pub keys: &'a Keys,
    pub executors: ExecutorPolicy,
}

impl Resolver<'_> {
    /// Resolves the identity `pod` is admitted for.
    ///
    /// - Executors (`is_executor`): the identity and grants stamped on the owner driver pod, after
    ///   checking that the requester is that driver and that the stamps verify.
    /// - A requester that is a trusted controller, on a pod carrying its user annotation: that
    ///   user (and the groups annotation, if configured and present).
    /// - Anyone else: the requester; on-behalf annotations are ignored with a warning.
    pub async fn resolve(
        &self,
        req_user: &UserInfo,
        pod: &Pod,
        namespace: &str,
        is_executor: bool,
        deadline: Instant,
    ) -> Result<Resolved, IdentityError> {
        let requester = req_user
            .username
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or(IdentityError::NoRequester)?;
        let req_groups = req_user.groups.as_deref().unwrap_or_default();
        if is_executor {
            return self
                .resolve_executor(req_user, requester, pod, namespace, deadline)
                .await;
        }
        let annotations = pod.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));

        for entry in self.trusted.matching(requester, req_groups) {
            let Some(user) = annotation(&entry.user_annotation) else {
                continue;
            };
            let user = user.trim();
            if user.is_empty() {
                return Err(IdentityError::EmptyOnBehalf {
                    controller: requester.to_string(),
                    annotation: entry.user_annotation.clone(),
                });
            }
            let groups = entry
                .groups_annotation
                .as_deref()
                .and_then(annotation)
                .map(|g| {
                    g.split(',')
                        .map(|s| s.trim().to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            return Ok(Resolved {
                identity: Identity::new(user, groups),
                via: Via::TrustedController {
                    controller: requester.to_string(),
                    annotation: entry.user_annotation.clone(),
                },
                inherited: None,
                warnings: Vec::new(),
            });
        }

        let mut identity = Identity::new(requester, req_groups.iter().cloned());
        identity.uid = req_user.uid.clone().filter(|u| !u.is_empty());
        identity.extra = req_user.extra.clone().unwrap_or_default();
        let why = if self.trusted.trusts(requester, req_groups) {
            "not read for this controller"
        } else {
            "not a trusted controller"
        };
        let warnings = self
            .trusted
            .on_behalf_annotations()
            .filter(|key| annotation(key).is_some())
            .map(|key| {
                short(format!(
                    "annotation {key} ignored: {requester:?} is {why}; admitted as {requester:?}"
                ))
            })
            .collect();
        Ok(Resolved {
            identity,
            via: Via::Requester,
            inherited: None,
            warnings,
        })
    }

    async fn resolve_executor(
        &self,
        req_user: &UserInfo,
        requester: &str,
        pod: &Pod,
        namespace: &str,
        deadline: Instant,
    ) -> Result<Resolved, IdentityError> {
        let owner = pod
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|o| o.controller == Some(true))
            .ok_or(IdentityError::NoOwner)?;
        if owner.kind != "Pod" || owner.api_version != "v1" {
            return Err(IdentityError::OwnerNotPod {
                kind: format!("{}/{}", owner.api_version, owner.kind),
                name: owner.name.clone(),
            });
        }
        let driver_name = owner.name.as_str();
        let driver = self
            .owners
            .owner_pod(namespace, driver_name, deadline)
            .await
            .map_err(|e| IdentityError::OwnerLookup {
                namespace: namespace.to_string(),
                name: driver_name.to_string(),
                reason: e.0,
            })?
            .ok_or_else(|| IdentityError::OwnerNotFound {
                namespace: namespace.to_string(),
                name: driver_name.to_string(),
            })?;

        let driver_uid = driver.metadata.uid.as_deref().unwrap_or_default();
        if !owner.uid.is_empty() && !driver_uid.is_empty() && owner.uid != driver_uid {
            return Err(IdentityError::OwnerUid {
                name: driver_name.to_string(),
                expected: owner.uid.clone(),
                actual: driver_uid.to_string(),
            });
        }
        let label =
            |p: &Pod, key: &str| p.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
        if label(&driver, SPARK_ROLE).as_deref() != Some("driver") {
            return Err(IdentityError::NotADriver {
                name: driver_name.to_string(),
            });
        }
        // Spark labels both pods of an application alike; a missing label on either side must
        // not skip the comparison.
        let (executor_app, driver_app) = (
            label(pod, stamps::SPARK_APP),
            label(&driver, stamps::SPARK_APP),
        );
        if executor_app != driver_app {
            return Err(IdentityError::OtherApplication {
                driver: driver_name.to_string(),
                executor_app: executor_app.unwrap_or_default(),
                driver_app: driver_app.unwrap_or_default(),
            });
        }
        let expected = format!(
            "system:serviceaccount:{namespace}:{}",
            stamps::service_account(&driver)
        );
        if requester != expected {
            return Err(IdentityError::NotDriverAccount {
                requester: requester.to_string(),
                driver: driver_name.to_string(),
                expected,
            });
        }
        self.check_bound_token(req_user, driver_name, driver_uid)?;
        let keys = self.keys.get().ok_or(IdentityError::NoSigningKey {
            action: "verify the driver's stamps",
        })?;
        let stamped =
            stamps::verify(&driver, namespace, &keys).map_err(|reason| IdentityError::Stamps {
                driver: driver_name.to_string(),
                reason,
            })?;
        Ok(Resolved {
            identity: stamped.identity,
            via: Via::SparkDriver {
                driver: driver_name.to_string(),
            },
            inherited: Some(stamped.granted),
            warnings: Vec::new(),
        })
    }

    /// The requester's token must be bound to the driver pod: its pod-name and pod-uid extras name
    /// the driver. Without `require_bound_token`, extras are only compared when present.
    fn check_bound_token(
        &self,
        req_user: &UserInfo,
        driver_name: &str,
        driver_uid: &str,
    ) -> Result<(), IdentityError> {
        let extra = |key: &str| {
            req_user
                .extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
        };
        let (bound_name, bound_uid) = (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID));
        if self.executors.require_bound_token {
            let missing = match (bound_name, bound_uid) {
                (None, None) => Some("pod-name and pod-uid extras"),
                (None, Some(_)) => Some("pod-name extra"),
                (Some(_), None) => Some("pod-uid extra"),
                (Some(_), Some(_)) => None,
            };
            if let Some(missing) = missing {
                return Err(IdentityError::UnboundToken {
                    driver: driver_name.to_string(),
                    missing,
                });
            }
        }
        if let Some(requester_pod) = bound_name.filter(|p| *p != driver_name) {
            return Err(IdentityError::NotDriverPod {
                requester_pod: requester_pod.clone(),
                driver: driver_name.to_string(),
            });
        }
        // A driver without a known uid cannot match a token bound to some pod's uid.
        if let Some(requester_uid) = bound_uid.filter(|u| *u != driver_uid) {
            return Err(IdentityError::NotDriverPod {
                requester_pod: format!("{driver_name} (uid {requester_uid})"),
                driver: driver_name.to_string(),
            });
        }
        Ok(())
    }
}

/// Cuts a warning to the admission limit on a character boundary.
fn short(mut text: String) -> String {
    if text.len() > MAX_WARNING {
        let mut end = MAX_WARNING - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// `auditAnnotations` for the AdmissionResponse: `identity` (the stamp form, plus how it was
/// resolved) and `decision` (e.g. `allowed`, `patched`, `denied: <reason>`).
pub fn audit_annotations(resolved: Option<&Resolved>, decision: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(r) = resolved {
        out.insert("identity".to_string(), identity_stamp(&r.identity));
        out.insert("identity-source".to_string(), r.via.to_string());
    }
    out.insert("decision".to_string(), decision.to_string());
    out
}

#[cfg(test)]
mod tests;
