//! The identity a pod is admitted for: userInfo, trusted controllers acting for a user, executors
//! inheriting their driver's identity and grants. Also the stamps the webhook writes on every pod
//! it mutates (`secrets.iomete.com/identity`, `secrets.iomete.com/granted`) and the audit
//! annotations of the AdmissionResponse. See `docs/authorization.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::authz::Identity;
use crate::authz::cache::{FlightError, SingleFlight};
use crate::config::Naming;
use crate::metrics::Metrics;
use crate::plan::JsonPatch;
use crate::refs::{SecretObject, SourceType};

/// Stamp: the identity the webhook admitted the pod for (JSON `{"user":..,"groups":[..]}`).
pub const STAMP_IDENTITY: &str = "secrets.iomete.com/identity";
/// Stamp: the references the pod was allowed to use (JSON array of short forms, sorted).
pub const STAMP_GRANTED: &str = "secrets.iomete.com/granted";
/// Both stamps; the webhook owns these keys on every pod it sees.
pub const STAMPS: [&str; 2] = [STAMP_IDENTITY, STAMP_GRANTED];
/// The webhook's own on-behalf-of annotation (the default `userAnnotation` of trusted controllers).
pub const RUN_AS: &str = "secrets.iomete.com/run-as";
/// `userInfo.extra` key the API server sets for bound service-account tokens: the requesting pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `userInfo.extra` key the API server sets for bound service-account tokens: the pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Spark's pod role label and the label naming the application.
const SPARK_ROLE: &str = "spark-role";
const SPARK_APP: &str = "spark-app-selector";
/// Admission warnings are kept short (DESIGN §6).
const MAX_WARNING: usize = 120;

/// One trusted controller as the config file writes it (`trustedControllers:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedController {
    /// The controller's username, e.g. `system:serviceaccount:jhub:hub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Or a group whose members are trusted, e.g. `system:serviceaccounts:spark-operator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Pod annotation naming the user the controller submits for.
    #[serde(default = "default_user_annotation")]
    pub user_annotation: String,
    /// Optional pod annotation with that user's groups, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_annotation: Option<String>,
}

fn default_user_annotation() -> String {
    RUN_AS.to_string()
}

/// Why the trusted-controller configuration is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedConfigError {
    #[error(
        "trustedControllers[{0}] must name exactly one of `username` or `group` (the requester to trust)"
    )]
    Requester(usize),
    #[error("trustedControllers[{0}].userAnnotation is empty")]
    EmptyAnnotation(usize),
}

/// The validated set of trusted controllers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedControllers {
    entries: Vec<TrustedController>,
    /// Every on-behalf annotation any entry reads, plus [`RUN_AS`]: ignored (with a warning) when
    /// the requester is not trusted.
    on_behalf_annotations: BTreeSet<String>,
}

impl TrustedControllers {
    pub fn new(entries: Vec<TrustedController>) -> Result<Self, TrustedConfigError> {
        let mut on_behalf_annotations = BTreeSet::from([RUN_AS.to_string()]);
        for (i, e) in entries.iter().enumerate() {
            let named = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
            if named(&e.username) == named(&e.group) {
                return Err(TrustedConfigError::Requester(i));
            }
            if e.user_annotation.is_empty() {
                return Err(TrustedConfigError::EmptyAnnotation(i));
            }
            on_behalf_annotations.insert(e.user_annotation.clone());
            if let Some(g) = e.groups_annotation.as_ref().filter(|g| !g.is_empty()) {
                on_behalf_annotations.insert(g.clone());
            }
        }
        Ok(Self {
            entries,
            on_behalf_annotations,
        })
    }

    /// The entries that trust this requester, in configuration order.
    fn matching<'a>(
        &'a self,
        username: &'a str,
        groups: &'a [String],
    ) -> impl Iterator<Item = &'a TrustedController> + 'a {
        self.entries.iter().filter(move |e| {
            e.username.as_deref() == Some(username)
                || e.group
                    .as_deref()
                    .is_some_and(|g| groups.iter().any(|x| x == g))
        })
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
        "executor was created from pod {requester_pod:?} (bound token), not by its driver {driver:?}"
    )]
    NotDriverPod {
        requester_pod: String,
        driver: String,
    },
    #[error(
        "executor's driver {driver:?} carries no {annotation} stamp: it was not admitted with secret references by this webhook, so its executors may use none"
    )]
    NoStamp {
        driver: String,
        annotation: &'static str,
    },
    #[error("executor's driver {driver:?} has an unreadable {annotation} stamp: {reason}")]
    BadStamp {
        driver: String,
        annotation: &'static str,
        reason: String,
    },
    #[error(
        "executor may not use {reference}: its Spark driver {driver:?} was not granted it; add the reference to the driver pod (spark.kubernetes.driver.annotation.*) and resubmit"
    )]
    NotInherited { reference: String, driver: String },
}

/// Why an owner lookup failed (not "not found": that is `Ok(None)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Fetches the owner pod of an executor.
#[async_trait]
pub trait OwnerLookup: Send + Sync {
    /// The pod `namespace/name`, `Ok(None)` if it does not exist. Finishes by `deadline`.
    async fn owner_pod(
        &self,
        namespace: &str,
        name: &str,
        deadline: Instant,
    ) -> Result<Option<Arc<Pod>>, LookupError>;
}

type OwnerOutcome = Result<Option<Arc<Pod>>, LookupError>;

/// Owner lookups through the real `kube::Client` (Pod GET), cached briefly and coalesced: a burst
/// of executors of one driver costs one GET. Found pods are cached for `ttl`; "not found" and
/// errors are not cached (only shared between concurrent callers).
pub struct KubeOwnerLookup {
    client: kube::Client,
    flights: Arc<SingleFlight<(String, String), OwnerOutcome>>,
    metrics: Option<Arc<Metrics>>,
}

/// The `cache` label of owner-pod lookups.
pub const OWNER_CACHE: &str = "owner-pods";

impl KubeOwnerLookup {
    /// Default cache time for found driver pods.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self::build(client, ttl, None)
    }

    /// [`KubeOwnerLookup::new`] that counts its lookups (cache `owner-pods`, hit or miss) and
    /// each Pod GET (backend `kubernetes`, outcome `found`, `not-found` or `error`).
    pub fn counted(client: kube::Client, ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Self::build(client, ttl, Some(metrics))
    }

    fn build(client: kube::Client, ttl: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        let keep_for = move |outcome: &OwnerOutcome| matches!(outcome, Ok(Some(_))).then_some(ttl);
        let flights = match &metrics {
            Some(m) => SingleFlight::counted(10_000, Arc::clone(m), OWNER_CACHE, keep_for),
            None => SingleFlight::new(10_000, keep_for),
        };
        Self {
            client,
            flights,
            metrics,
        }
    }
}

#[async_trait]
impl OwnerLookup for KubeOwnerLookup {
    async fn owner_pod(&self, namespace: &str, name: &str, deadline: Instant) -> OwnerOutcome {
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let pod_name = name.to_string();
        let metrics = self.metrics.clone();
        // The shared GET gets a budget of its own so a caller with a short deadline does not
        // shorten it for the others.
        let start = move || -> BoxFuture<'static, OwnerOutcome> {
            Box::pin(async move {
                let outcome = get_owner(&api, &pod_name).await;
                if let Some(metrics) = metrics {
                    let label = match &outcome {
                        Ok(Some(_)) => "found",
                        Ok(None) => "not-found",
                        Err(_) => "error",
                    };
                    metrics.backend_call("kubernetes", label);
                }
                outcome
            })
        };
        match self
            .flights
            .get((namespace.to_string(), name.to_string()), deadline, start)
            .await
        {
            Ok(outcome) => outcome,
            Err(FlightError::Deadline) => Err(LookupError(
                "no answer from the Kubernetes API before the admission deadline".into(),
            )),
            Err(FlightError::Lost) => Err(LookupError("the lookup was aborted".into())),
        }
    }
}

/// One Pod GET, within 5 s.
async fn get_owner(api: &kube::Api<Pod>, name: &str) -> OwnerOutcome {
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await {
        Ok(Ok(pod)) => Ok(pod.map(Arc::new)),
        Ok(Err(e)) => Err(LookupError(format!("Kubernetes API: {e}"))),
        Err(_) => Err(LookupError(
            "Kubernetes API gave no answer within 5 s".into(),
        )),
    }
}

/// The `review --owner DRIVER.json` stand-in: the one driver pod given on the command line.
#[derive(Debug, Clone, Default)]
pub struct StaticOwner {
    pod: Option<Arc<Pod>>,
}

impl StaticOwner {
    /// `None`: no owner given; executor lookups then fail with a hint to pass `--owner`.
    pub fn new(pod: Option<Pod>) -> Self {
        Self {
            pod: pod.map(Arc::new),
        }
    }
}

#[async_trait]
impl OwnerLookup for StaticOwner {
    async fn owner_pod(&self, namespace: &str, name: &str, _deadline: Instant) -> OwnerOutcome {
        let Some(pod) = &self.pod else {
            return Err(LookupError(
                "no cluster to ask; pass the driver pod as the webhook admitted it with `review --owner DRIVER.json`"
                    .into(),
            ));
        };
        let same_name = pod.metadata.name.as_deref() == Some(name);
        // A pod file without a namespace stands for the executor's namespace.
        let same_ns = pod
            .metadata
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == namespace);
        Ok((same_name && same_ns).then(|| Arc::clone(pod)))
    }
}

/// Resolves the identity `pod` is admitted for.
///
/// - Executors (`is_executor`): the identity and grants stamped on the owner driver pod, after
///   checking that the requester is that driver (see `docs/authorization.md`).
/// - A requester that is a trusted controller, on a pod carrying its user annotation: that user
///   (and the groups annotation, if configured and present).
/// - Anyone else: the requester; on-behalf annotations are ignored with a warning.
pub async fn resolve(
    req_user: &UserInfo,
    pod: &Pod,
    namespace: &str,
    is_executor: bool,
    trusted: &TrustedControllers,
    owners: &dyn OwnerLookup,
    deadline: Instant,
) -> Result<Resolved, IdentityError> {
    let requester = req_user
        .username
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or(IdentityError::NoRequester)?;
    let req_groups = req_user.groups.as_deref().unwrap_or_default();
    if is_executor {
        return resolve_executor(req_user, requester, pod, namespace, owners, deadline).await;
    }
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));

    for entry in trusted.matching(requester, req_groups) {
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
    let trusted_requester = trusted.matching(requester, req_groups).next().is_some();
    let warnings = trusted
        .on_behalf_annotations
        .iter()
        .filter(|key| annotation(key).is_some())
        .map(|key| {
            let why = if trusted_requester {
                "not read for this controller"
            } else {
                "not a trusted controller"
            };
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
    req_user: &UserInfo,
    requester: &str,
    pod: &Pod,
    namespace: &str,
    owners: &dyn OwnerLookup,
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
    let driver = owners
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
    let label = |p: &Pod, key: &str| p.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    if label(&driver, SPARK_ROLE).as_deref() != Some("driver") {
        return Err(IdentityError::NotADriver {
            name: driver_name.to_string(),
        });
    }
    // Spark labels both pods of an application alike; a missing label on either side must not
    // skip the comparison.
    let (executor_app, driver_app) = (label(pod, SPARK_APP), label(&driver, SPARK_APP));
    if executor_app != driver_app {
        return Err(IdentityError::OtherApplication {
            driver: driver_name.to_string(),
            executor_app: executor_app.unwrap_or_default(),
            driver_app: driver_app.unwrap_or_default(),
        });
    }
    let spec = driver.spec.as_ref();
    let account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let expected = format!("system:serviceaccount:{namespace}:{account}");
    if requester != expected {
        return Err(IdentityError::NotDriverAccount {
            requester: requester.to_string(),
            driver: driver_name.to_string(),
            expected,
        });
    }
    let extra = |key: &str| {
        req_user
            .extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
    };
    if let Some(requester_pod) = extra(EXTRA_POD_NAME) {
        if requester_pod != driver_name {
            return Err(IdentityError::NotDriverPod {
                requester_pod: requester_pod.clone(),
                driver: driver_name.to_string(),
            });
        }
    }
    if let Some(requester_uid) = extra(EXTRA_POD_UID) {
        if !driver_uid.is_empty() && requester_uid != driver_uid {
            return Err(IdentityError::NotDriverPod {
                requester_pod: format!("{driver_name} (uid {requester_uid})"),
                driver: driver_name.to_string(),
            });
        }
    }

    let stamp = |annotation: &'static str| {
        driver
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation))
            .ok_or_else(|| IdentityError::NoStamp {
                driver: driver_name.to_string(),
                annotation,
            })
    };
    let bad = |annotation: &'static str| {
        move |e: StampError| IdentityError::BadStamp {
            driver: driver_name.to_string(),
            annotation,
            reason: e.to_string(),
        }
    };
    let identity = parse_identity_stamp(stamp(STAMP_IDENTITY)?).map_err(bad(STAMP_IDENTITY))?;
    let granted = parse_granted_stamp(stamp(STAMP_GRANTED)?).map_err(bad(STAMP_GRANTED))?;
    Ok(Resolved {
        identity,
        via: Via::SparkDriver {
            driver: driver_name.to_string(),
        },
        inherited: Some(granted),
        warnings: Vec::new(),
    })
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

/// A stamp that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StampError(String);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityStamp {
    user: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// `secrets.iomete.com/identity`: `{"user":"alice","groups":["data-eng"]}` (groups sorted). Only
/// the user and groups: what an executor needs to be checked as its driver's user.
pub fn identity_stamp(identity: &Identity) -> String {
    let mut groups = identity.groups.clone();
    groups.sort();
    groups.dedup();
    let stamp = IdentityStamp {
        user: identity.username.clone(),
        groups,
    };
    // Serializing two strings and a list of strings cannot fail.
    serde_json::to_string(&stamp).unwrap_or_default()
}

/// Reads a `secrets.iomete.com/identity` stamp back.
pub fn parse_identity_stamp(text: &str) -> Result<Identity, StampError> {
    let stamp: IdentityStamp = serde_json::from_str(text)
        .map_err(|e| StampError(format!("expected {{\"user\":..,\"groups\":[..]}}: {e}")))?;
    if stamp.user.is_empty() {
        return Err(StampError("empty user".into()));
    }
    Ok(Identity::new(stamp.user, stamp.groups))
}

/// `secrets.iomete.com/granted`: the short forms of the references, sorted, de-duplicated, as a
/// JSON array (keys may hold any character, so no separator is safe), e.g.
/// `["kubernetes:finance/db_password","vault:vault-prod-finance/s3_secret"]`.
pub fn granted_stamp<'a>(granted: impl IntoIterator<Item = &'a SecretObject>) -> String {
    let set: BTreeSet<String> = granted.into_iter().map(ToString::to_string).collect();
    serde_json::to_string(&set).unwrap_or_default()
}

/// Reads a `secrets.iomete.com/granted` stamp back.
pub fn parse_granted_stamp(text: &str) -> Result<BTreeSet<String>, StampError> {
    serde_json::from_str(text)
        .map_err(|e| StampError(format!("expected a JSON array of references: {e}")))
}

/// The stamp annotations for a pod admitted for `identity` with `granted` references.
pub fn stamp_annotations<'a>(
    identity: &Identity,
    granted: impl IntoIterator<Item = &'a SecretObject>,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (STAMP_IDENTITY.to_string(), identity_stamp(identity)),
        (STAMP_GRANTED.to_string(), granted_stamp(granted)),
    ])
}

/// Stamp annotations a client put on the incoming pod. The webhook owns them: on a pod it mutates
/// they are overwritten; on any other pod the engine must remove them (or deny), otherwise a forged
/// driver stamp would hand its executors grants nobody checked.
pub fn client_stamps(pod: &Pod) -> Vec<&'static str> {
    let Some(annotations) = pod.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    STAMPS
        .into_iter()
        .filter(|k| annotations.contains_key(*k))
        .collect()
}

/// JSON Patch operations that make the pod's stamps exactly `stamps`: set (add or replace) the
/// given ones, remove client-supplied stamps not among them (`stamps` empty: remove all). Nothing
/// when the pod already carries exactly these values, so a second pass is a no-op.
pub fn stamp_ops(pod: &Pod, stamps: &BTreeMap<String, String>) -> JsonPatch {
    let current = pod.metadata.annotations.as_ref();
    let pointer = |key| ["metadata", "annotations", key];
    let mut ops = JsonPatch::default();
    if current.is_none() && !stamps.is_empty() {
        ops.add(
            ["metadata", "annotations"],
            &BTreeMap::<String, String>::new(),
        );
    }
    for (key, value) in stamps {
        match current.and_then(|a| a.get(key)) {
            Some(existing) if existing == value => {}
            Some(_) => ops.replace(pointer(key), value),
            None => ops.add(pointer(key), value),
        }
    }
    for key in client_stamps(pod) {
        if !stamps.contains_key(key) {
            ops.remove(pointer(key));
        }
    }
    ops
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
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;
    use crate::refs::Source;

    fn fixture(name: &str) -> Pod {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            uid: Some("uid-1".into()),
            extra: None,
        }
    }

    fn trusted() -> TrustedControllers {
        let entries: Vec<TrustedController> = serde_yaml::from_str(
            r#"
- {username: "system:serviceaccount:jhub:hub", userAnnotation: hub.jupyter.org/username}
- {group: "system:serviceaccounts:platform", groupsAnnotation: secrets.iomete.com/run-as-groups}
"#,
        )
        .unwrap();
        TrustedControllers::new(entries).unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn secret(kind: SourceType, id: &str, key: &str) -> SecretObject {
        SecretObject {
            key: key.into(),
            source: Source {
                kind,
                id: id.into(),
            },
        }
    }

    /// The Spark fixture driver as the webhook admitted it: uid set, stamps on.
    fn admitted_driver(granted: &[SecretObject]) -> Pod {
        let mut pod = fixture("spark35-driver-submit.json");
        pod.metadata.uid = Some("08082eb2-d2d1-43f3-bd01-8ca76964fc04".into());
        let alice = Identity::new("alice", vec!["data-eng".to_string()]);
        pod.metadata
            .annotations
            .get_or_insert_default()
            .extend(stamp_annotations(&alice, granted));
        pod
    }

    fn finance_db() -> SecretObject {
        secret(SourceType::Kubernetes, "finance", "db_password")
    }

    async fn resolve_exec(
        req: &UserInfo,
        executor: &Pod,
        driver: Option<Pod>,
    ) -> Result<Resolved, IdentityError> {
        let owners = StaticOwner::new(driver);
        resolve(req, executor, "default", true, &trusted(), &owners, soon()).await
    }

    fn driver_sa() -> UserInfo {
        user(
            "system:serviceaccount:default:spark",
            &["system:serviceaccounts"],
        )
    }

    #[test]
    fn config_needs_exactly_one_requester() {
        let both = TrustedController {
            username: Some("a".into()),
            group: Some("b".into()),
            user_annotation: RUN_AS.into(),
            groups_annotation: None,
        };
        assert_eq!(
            TrustedControllers::new(vec![both]),
            Err(TrustedConfigError::Requester(0))
        );
        let none: TrustedController = serde_yaml::from_str("{}").unwrap();
        assert!(TrustedControllers::new(vec![none]).is_err());
    }

    #[tokio::test]
    async fn plain_requester_is_the_identity_with_uid_and_extra() {
        let mut bob = user("bob", &["eng", "eng", "a"]);
        bob.extra = Some(BTreeMap::from([("scopes".into(), vec!["x".into()])]));
        let pod = fixture("spark35-driver-submit.json");
        let r = resolve(
            &bob,
            &pod,
            "default",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap();
        assert_eq!(r.identity.username, "bob");
        assert_eq!(r.identity.groups, vec!["a", "eng"]);
        assert_eq!(r.identity.uid.as_deref(), Some("uid-1"));
        assert_eq!(r.identity.extra["scopes"], vec!["x"]);
        assert_eq!(r.via, Via::Requester);
        assert!(r.warnings.is_empty());
    }

    #[tokio::test]
    async fn run_as_from_an_untrusted_requester_is_ignored_with_a_warning() {
        let mut pod = fixture("jupyterhub-singleuser-z2jh.json");
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(RUN_AS.into(), "alice".into());
        let r = resolve(
            &user("mallory", &[]),
            &pod,
            "jhub",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap();
        assert_eq!(r.identity.username, "mallory");
        assert_eq!(
            r.warnings,
            vec![
                "annotation hub.jupyter.org/username ignored: \"mallory\" is not a trusted controller; admitted as \"mallory\"",
                "annotation secrets.iomete.com/run-as ignored: \"mallory\" is not a trusted controller; admitted as \"mallory\"",
            ]
        );
        assert!(r.warnings.iter().all(|w| w.len() <= MAX_WARNING));
    }

    #[tokio::test]
    async fn trusted_hub_submits_for_the_annotated_user() {
        let pod = fixture("jupyterhub-singleuser-z2jh.json");
        let hub = user(
            "system:serviceaccount:jhub:hub",
            &["system:serviceaccounts"],
        );
        let r = resolve(
            &hub,
            &pod,
            "jhub",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap();
        assert_eq!(r.identity, Identity::new("alice", Vec::new()));
        assert_eq!(
            r.via,
            Via::TrustedController {
                controller: "system:serviceaccount:jhub:hub".into(),
                annotation: "hub.jupyter.org/username".into()
            }
        );
    }

    #[tokio::test]
    async fn trusted_group_member_uses_run_as_and_groups_annotation() {
        let mut pod = fixture("spark35-driver-submit.json");
        pod.metadata.annotations = Some(BTreeMap::from([
            (RUN_AS.to_string(), "alice".to_string()),
            (
                "secrets.iomete.com/run-as-groups".to_string(),
                "finance, data-eng".to_string(),
            ),
        ]));
        let cp = user(
            "system:serviceaccount:platform:cp",
            &["system:serviceaccounts:platform"],
        );
        let r = resolve(
            &cp,
            &pod,
            "default",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap();
        assert_eq!(
            r.identity,
            Identity::new("alice", vec!["data-eng".into(), "finance".into()])
        );
        // The hub is trusted for hub.jupyter.org/username only, not for run-as.
        let hub = user("system:serviceaccount:jhub:hub", &[]);
        let r = resolve(
            &hub,
            &pod,
            "default",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap();
        assert_eq!(r.identity.username, "system:serviceaccount:jhub:hub");
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    }

    #[tokio::test]
    async fn trusted_controller_with_empty_user_is_denied() {
        let mut pod = fixture("jupyterhub-singleuser-z2jh.json");
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("hub.jupyter.org/username".into(), " ".into());
        let hub = user("system:serviceaccount:jhub:hub", &[]);
        let e = resolve(
            &hub,
            &pod,
            "jhub",
            false,
            &trusted(),
            &StaticOwner::default(),
            soon(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, IdentityError::EmptyOnBehalf { .. }));
    }

    #[tokio::test]
    async fn executor_inherits_its_drivers_stamps() {
        let executor = fixture("spark35-executor-submit.json");
        let r = resolve_exec(
            &driver_sa(),
            &executor,
            Some(admitted_driver(&[finance_db()])),
        )
        .await
        .unwrap();
        assert_eq!(r.identity, Identity::new("alice", vec!["data-eng".into()]));
        assert_eq!(
            r.inherited,
            Some(BTreeSet::from([
                "kubernetes:finance/db_password".to_string()
            ]))
        );
        let naming = Naming::default();
        assert!(r.may_inherit(&finance_db(), &naming).is_ok());
        assert!(
            r.may_inherit(&secret(SourceType::Kubernetes, "global", "x"), &naming)
                .is_ok()
        );
        let more = secret(SourceType::Vault, "vault-prod-finance", "s3_secret");
        assert_eq!(
            r.may_inherit(&more, &naming).unwrap_err().to_string(),
            "executor may not use vault:vault-prod-finance/s3_secret: its Spark driver \
             \"spark-pi-143984a22158e5b5-driver\" was not granted it; add the reference to the \
             driver pod (spark.kubernetes.driver.annotation.*) and resubmit"
        );
    }

    #[tokio::test]
    async fn executor_rules_deny_with_clear_messages() {
        let executor = fixture("spark35-executor-submit.json");
        let driver = || Some(admitted_driver(&[finance_db()]));

        // Driver missing.
        let e = resolve_exec(&driver_sa(), &executor, None)
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::OwnerLookup { .. }), "{e}");
        let mut other = admitted_driver(&[]);
        other.metadata.name = Some("someone-else".into());
        let e = resolve_exec(&driver_sa(), &executor, Some(other))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "executor's owner pod \"spark-pi-143984a22158e5b5-driver\" not found in namespace \
             \"default\"; executors must be created by their Spark driver"
        );

        // Not created by the driver's service account.
        let e = resolve_exec(&user("bob", &[]), &executor, driver())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "executor was created by \"bob\", but its driver \"spark-pi-143984a22158e5b5-driver\" \
             runs as \"system:serviceaccount:default:spark\"; executors must be created by their \
             driver's service account"
        );

        // Bound token of another pod.
        let mut sa = driver_sa();
        sa.extra = Some(BTreeMap::from([(
            EXTRA_POD_NAME.to_string(),
            vec!["other-driver".to_string()],
        )]));
        let e = resolve_exec(&sa, &executor, driver()).await.unwrap_err();
        assert!(matches!(e, IdentityError::NotDriverPod { .. }), "{e}");
        // ... and of the driver itself.
        sa.extra = Some(BTreeMap::from([(
            EXTRA_POD_NAME.to_string(),
            vec!["spark-pi-143984a22158e5b5-driver".to_string()],
        )]));
        assert!(resolve_exec(&sa, &executor, driver()).await.is_ok());

        // Owner is not a driver.
        let mut not_driver = admitted_driver(&[]);
        not_driver
            .metadata
            .labels
            .get_or_insert_default()
            .insert("spark-role".into(), "executor".into());
        let e = resolve_exec(&driver_sa(), &executor, Some(not_driver))
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::NotADriver { .. }), "{e}");

        // Owner is another application's driver.
        let mut other_app = admitted_driver(&[]);
        other_app
            .metadata
            .labels
            .get_or_insert_default()
            .insert("spark-app-selector".into(), "spark-other".into());
        let e = resolve_exec(&driver_sa(), &executor, Some(other_app))
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::OtherApplication { .. }), "{e}");

        // An executor that drops the application label does not skip the comparison.
        let mut unlabelled = executor.clone();
        unlabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("spark-app-selector");
        let e = resolve_exec(&driver_sa(), &unlabelled, driver())
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::OtherApplication { .. }), "{e}");

        // Replaced driver (uid differs).
        let mut replaced = admitted_driver(&[]);
        replaced.metadata.uid = Some("new-uid".into());
        let e = resolve_exec(&driver_sa(), &executor, Some(replaced))
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::OwnerUid { .. }), "{e}");

        // Driver without stamps.
        let mut unstamped = admitted_driver(&[]);
        unstamped.metadata.annotations = None;
        let e = resolve_exec(&driver_sa(), &executor, Some(unstamped))
            .await
            .unwrap_err();
        assert!(matches!(e, IdentityError::NoStamp { .. }), "{e}");

        // No controller owner.
        let mut orphan = executor.clone();
        orphan.metadata.owner_references = Some(vec![OwnerReference {
            controller: Some(false),
            ..OwnerReference::default()
        }]);
        let e = resolve_exec(&driver_sa(), &orphan, driver())
            .await
            .unwrap_err();
        assert_eq!(e, IdentityError::NoOwner);
    }

    #[test]
    fn stamps_round_trip_and_are_deterministic() {
        let id = Identity::new("alice", vec!["z".into(), "a".into(), "a".into()]);
        let s = identity_stamp(&id);
        assert_eq!(s, r#"{"user":"alice","groups":["a","z"]}"#);
        assert_eq!(parse_identity_stamp(&s).unwrap(), id);

        let refs = [
            secret(SourceType::Vault, "vault-prod-finance", "s3,secret"),
            finance_db(),
            finance_db(),
        ];
        let g = granted_stamp(&refs);
        assert_eq!(
            g,
            r#"["kubernetes:finance/db_password","vault:vault-prod-finance/s3,secret"]"#
        );
        let back = parse_granted_stamp(&g).unwrap();
        assert_eq!(back.len(), 2);
        assert!(back.contains("vault:vault-prod-finance/s3,secret"));
        assert!(parse_identity_stamp("alice").is_err());
        assert!(parse_granted_stamp("kubernetes:a/b").is_err());
    }

    #[test]
    fn client_supplied_stamps_are_detected() {
        let mut pod = fixture("spark35-driver-submit.json");
        assert!(client_stamps(&pod).is_empty());
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(STAMP_GRANTED.into(), "[]".into());
        assert_eq!(client_stamps(&pod), vec![STAMP_GRANTED]);
    }

    fn apply(pod: &Pod, ops: JsonPatch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &ops.operations().unwrap()).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn stamp_ops_replace_forged_stamps_and_are_idempotent() {
        let alice = Identity::new("alice", Vec::new());
        let stamps = stamp_annotations(&alice, &[finance_db()]);

        // No annotations at all: parent first.
        let mut bare = fixture("spark35-driver-submit.json");
        bare.metadata.annotations = None;
        let stamped = apply(&bare, stamp_ops(&bare, &stamps));
        assert_eq!(stamped.metadata.annotations.as_ref(), Some(&stamps));
        assert!(stamp_ops(&stamped, &stamps).is_empty());

        // Forged values are replaced.
        let mut forged = fixture("spark35-driver-submit.json");
        forged.metadata.annotations = Some(BTreeMap::from([
            (STAMP_IDENTITY.to_string(), r#"{"user":"root"}"#.to_string()),
            ("keep".to_string(), "me".to_string()),
        ]));
        let fixed = apply(&forged, stamp_ops(&forged, &stamps));
        let a = fixed.metadata.annotations.unwrap();
        assert_eq!(a[STAMP_IDENTITY], stamps[STAMP_IDENTITY]);
        assert_eq!(a[STAMP_GRANTED], stamps[STAMP_GRANTED]);
        assert_eq!(a["keep"], "me");

        // A pod the webhook does not stamp loses client-supplied stamps.
        let cleaned = apply(&forged, stamp_ops(&forged, &BTreeMap::new()));
        let a = cleaned.metadata.annotations.unwrap();
        assert!(!a.contains_key(STAMP_IDENTITY));
        assert_eq!(a["keep"], "me");
        assert!(stamp_ops(&bare, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn audit_annotations_name_identity_and_decision() {
        let r = Resolved {
            identity: Identity::new("alice", Vec::new()),
            via: Via::SparkDriver { driver: "d".into() },
            inherited: None,
            warnings: Vec::new(),
        };
        let a = audit_annotations(Some(&r), "allowed");
        assert_eq!(a["identity"], r#"{"user":"alice","groups":[]}"#);
        assert_eq!(a["identity-source"], "spark-driver d");
        assert_eq!(a["decision"], "allowed");
    }

    #[test]
    fn long_warnings_are_cut() {
        let w = short("é".repeat(100));
        assert!(w.len() <= MAX_WARNING && w.ends_with("..."));
    }
}
