//! The admission engine: AdmissionReview in, AdmissionReview out. It gathers every fact the pod
//! needs (references, workload, identity, store keys, Vault deliveries, grants), then hands them to
//! the pure planner, and turns the plan or the denial into a response.

mod defaults;
pub mod guard;
mod update;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, Status};

use crate::authz::cache::CacheSettings;
use crate::authz::{Authorizer, Decision, Identity, Resource};
use crate::backends::kubernetes::StoreWatch;
use crate::backends::vault::{VaultBackend, VaultOptions};
use crate::backends::{Delivered, KeyRef, Naming, StoreCheck, StoreIndex, VaultSource, VaultWant};
use crate::identity::stamps::{self, Subject};
use crate::identity::{self, ExecutorPolicy, Keys};
use crate::metrics::Metrics;
use crate::plan::runtime::{self, DriverRef, RuntimeSettings};
use crate::plan::{self, Inputs, JsonPatch, Resolved};
use crate::refs::{self, Reference, SourceType, TargetKind};
use crate::workload::{self, Selectors, WorkloadKind};

/// Everything the admission engine needs to decide, independent of where it runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub naming: Naming,
    pub selectors: Selectors,
    /// Time the engine gives itself when the API server sends no `?timeout=`.
    pub default_budget: Duration,
    /// Master switch (the product's `features.secretsV2.enabled`): off = admit untouched, guard only.
    pub enabled: bool,
    /// Who decides `Use` in a cluster: ResourceBundles (RAS) or Kubernetes RBAC.
    pub authorizer: crate::authz::AuthorizerKind,
    /// How executors prove they were created by their driver.
    pub executors: ExecutorPolicy,
    /// Runtime delivery: the webhook's image, its broker, the entrypoint table.
    pub runtime: RuntimeSettings,
    /// Most references (annotations and legacy placeholders) one pod may name.
    pub max_references: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            naming: Naming::default(),
            selectors: Selectors::default(),
            default_budget: Duration::from_secs(4),
            enabled: true,
            authorizer: crate::authz::AuthorizerKind::Ras,
            executors: ExecutorPolicy::default(),
            runtime: RuntimeSettings::default(),
            max_references: refs::DEFAULT_MAX_REFERENCES,
        }
    }
}

/// Everything the engine consults, shared by all requests.
pub struct Webhook {
    pub settings: Settings,
    pub stores: Arc<dyn StoreIndex>,
    pub vault: Option<Arc<dyn VaultSource>>,
    pub authz: Arc<dyn Authorizer>,
    /// Requesters that may submit pods on behalf of a user named in an annotation.
    pub trusted: identity::TrustedControllers,
    /// Where executors' owner driver pods are looked up.
    pub owners: Arc<dyn identity::OwnerLookup>,
    /// Keys that sign the stamps (and verify a driver's stamps for its executors).
    pub keys: Arc<Keys>,
    pub metrics: Arc<Metrics>,
}

/// Why the engine could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(String),
}

/// A refusal: the message the user sees, and a reason label from a small fixed set for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
    /// The username the pod would have been admitted for, once resolved (for the log line).
    pub identity: Option<String>,
    /// Audit annotations known at the time of the denial (the resolved identity).
    pub audit: HashMap<String, String>,
}

impl Denial {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            identity: None,
            audit: HashMap::new(),
        }
    }

    /// Records who the denied pod was admitted for.
    fn for_identity(mut self, resolved: &identity::Resolved) -> Self {
        self.identity = Some(resolved.identity.username.clone());
        self.audit = identity::audit_annotations(Some(resolved), "denied");
        self
    }
}

/// What the engine decided for one pod, before it becomes an AdmissionResponse.
#[derive(Debug, Default)]
pub struct Outcome {
    pub workload: Option<WorkloadKind>,
    pub patch: JsonPatch,
    pub warnings: Vec<String>,
    pub identity: Option<String>,
    /// `identity`, `identity-source` for the AdmissionResponse's audit annotations.
    pub audit: HashMap<String, String>,
}

/// Most distinct domains and Vault configs one pod may reference (each needs its own Use check).
const MAX_RESOURCES: usize = 64;

/// Most groups and `extra` values, and most bytes of text, of the identity a pod is admitted for;
/// and most bytes of its user name, which denial texts (cached with the decisions) quote. Each
/// check, stamp and audit annotation carries the identity; real ones are far smaller (a user in a
/// few hundred directory groups).
const MAX_IDENTITY_VALUES: usize = 1_000;
const MAX_IDENTITY_BYTES: usize = 64 * 1024;
const MAX_USERNAME_BYTES: usize = 1024;

/// The API server's `AdmissionReview` version; the only one served.
const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

impl Webhook {
    /// In a cluster: watch caches through `client` (spawned on the current runtime). Trusted
    /// controllers come from the admin's config file (`--config`), the signing keys from their
    /// Secret (see `identity::keys::watch_dir`), everything else from the API.
    pub async fn from_cluster(
        settings: Settings,
        client: kube::Client,
        metrics: Arc<Metrics>,
        trusted: identity::TrustedControllers,
        keys: Arc<Keys>,
    ) -> Result<Self, BuildError> {
        let vault = VaultBackend::in_cluster(
            client.clone(),
            settings.naming.clone(),
            keys.clone(),
            VaultOptions {
                metrics: Some(Arc::clone(&metrics)),
                ..VaultOptions::default()
            },
        );
        Self::from_cluster_parts(settings, client, metrics, trusted, keys, vault)
    }

    /// [`Webhook::from_cluster`] with the Vault backend built by the caller (the management API
    /// shares it).
    pub fn from_cluster_parts(
        settings: Settings,
        client: kube::Client,
        metrics: Arc<Metrics>,
        trusted: identity::TrustedControllers,
        keys: Arc<Keys>,
        vault: Arc<VaultBackend>,
    ) -> Result<Self, BuildError> {
        let naming = &settings.naming;
        let stores = StoreWatch::spawn(client.clone(), naming);
        let authz = crate::authz::in_cluster(
            settings.authorizer,
            client.clone(),
            &naming.namespace,
            CacheSettings::default(),
            Arc::clone(&metrics),
        );
        let owners = Arc::new(identity::KubeOwnerLookup::counted(
            client,
            identity::KubeOwnerLookup::DEFAULT_TTL,
            Arc::clone(&metrics),
        ));
        Ok(Self {
            settings,
            stores,
            vault: Some(vault),
            authz,
            trusted,
            owners,
            keys,
            metrics,
        })
    }

    /// Ready to admit: every cache has its first listing, the authorizer can decide, and a signing
    /// key is loaded.
    pub fn ready(&self) -> bool {
        self.stores.ready()
            && self.authz.ready()
            && self.vault.as_ref().is_none_or(|v| v.ready())
            && self.keys.ready()
    }

    /// Time the engine gives itself: 4/5 of the API server's `?timeout=`, else the default budget.
    pub fn budget(&self, timeout: Option<Duration>) -> Duration {
        timeout.map_or(self.settings.default_budget, |t| t.mul_f64(0.8))
    }

    /// Answers one HTTP request body. Always an `admission.k8s.io/v1` AdmissionReview, whatever the
    /// input; `timeout` is the API server's `?timeout=`.
    pub async fn review_bytes(&self, body: &[u8], timeout: Option<Duration>) -> Vec<u8> {
        let started = Instant::now();
        let deadline = started + self.budget(timeout);
        // Boxed: a request holds two Pods inline (`object`, `oldObject`), kilobytes this future
        // would otherwise carry, and copy with it on every move.
        let parsed = parse_review(body).map(Box::new);
        let (response, workload, outcome) = match parsed {
            Ok(req) => {
                let (response, workload) = self.respond(&req, deadline).await;
                let outcome = outcome_label(&response);
                (response, workload, outcome)
            }
            Err(message) => {
                let mut response = AdmissionResponse::invalid(message);
                response.uid = uid_of(body);
                (response, None, "invalid")
            }
        };
        let workload = workload.map_or("none", WorkloadKind::as_str);
        self.metrics
            .admission(workload, outcome, started.elapsed().as_secs_f64());
        encode_review(&response)
    }

    /// Answers one request body of the validating webhooks: pod UPDATEs (owned annotations,
    /// images, ephemeral containers) and SparkApplication / ScheduledSparkApplication CREATE and
    /// UPDATE (`run-as`). Always an AdmissionReview; never a patch.
    pub async fn validate_bytes(&self, body: &[u8], timeout: Option<Duration>) -> Vec<u8> {
        let started = Instant::now();
        let deadline = started + self.budget(timeout);
        let (mut response, outcome) = match review_kind(body).as_deref() {
            Some("Pod") | None => match parse_review(body).map(Box::new) {
                // Only updates are validated here; a CREATE is the mutating webhook's, and
                // answering it here must not have its side effects (Vault writes).
                Ok(req) if req.operation != Operation::Update => {
                    (AdmissionResponse::from(req.as_ref()), "allowed")
                }
                Ok(req) => {
                    let (response, _) = self.respond(&req, deadline).await;
                    let outcome = outcome_label(&response);
                    (response, outcome)
                }
                Err(message) => {
                    let mut response = AdmissionResponse::invalid(message);
                    response.uid = uid_of(body);
                    (response, "invalid")
                }
            },
            Some(kind) => match parse_dynamic(body) {
                Ok(req) if matches!(kind, "SparkApplication" | "ScheduledSparkApplication") => {
                    self.validate_spark_application(&req, kind, started)
                }
                // Nothing else is registered; nothing to say about it.
                Ok(req) => (AdmissionResponse::from(&req), "allowed"),
                Err(response) => (*response, "invalid"),
            },
        };
        // A validating webhook's answer carries no patch.
        response.patch = None;
        self.metrics
            .admission("none", outcome, started.elapsed().as_secs_f64());
        encode_review(&response)
    }

    /// `run-as` on SparkApplications: see `identity::run_as`.
    fn validate_spark_application(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        kind: &str,
        started: Instant,
    ) -> (AdmissionResponse, &'static str) {
        let value =
            |o: &Option<DynamicObject>| o.as_ref().and_then(|o| serde_json::to_value(o).ok());
        let (object, old) = (value(&req.object), value(&req.old_object));
        let old = match req.operation {
            Operation::Update => old,
            _ => None,
        };
        let checked = match req.operation {
            Operation::Create | Operation::Update => identity::run_as::check(
                kind,
                object.as_ref(),
                old.as_ref(),
                &req.user_info,
                &self.trusted,
            ),
            _ => Ok(()),
        };
        let mut response = AdmissionResponse::from(req);
        // The same fields as a pod's admission line (docs/logging.md), plus `kind` and `name`; the
        // denial in `denial`: a field named `message` would repeat the line's own key.
        let name =
            refs::plain_name(&req.name).map_or_else(|| refs::shape(&req.name), str::to_owned);
        let name = name.as_str();
        let namespace = req.namespace.as_deref().unwrap_or("");
        let identity = req.user_info.username.as_deref().unwrap_or("");
        let duration_ms = || started.elapsed().as_secs_f64() * 1e3;
        match checked {
            Ok(()) => {
                tracing::info!(uid = %req.uid, namespace, pod = "", kind, name, identity,
                    workload = "none", decision = "allowed", ops = 0, duration_ms = duration_ms(),
                    "admission");
                (response, "allowed")
            }
            Err(errors) => {
                let message = lines(errors.iter().map(ToString::to_string));
                tracing::info!(uid = %req.uid, namespace, pod = "", kind, name, identity,
                    workload = "none", decision = "denied", reason = "run-as", denial = %message,
                    duration_ms = duration_ms(), "admission");
                self.metrics.denial("run-as");
                response.allowed = false;
                response.result = Status::failure(&message, "Forbidden").with_code(403);
                response
                    .audit_annotations
                    .insert("decision".into(), "denied: run-as".into());
                (response, "denied")
            }
        }
    }

    /// Decides one request and logs the decision (never a value).
    pub async fn respond(
        &self,
        req: &AdmissionRequest<Pod>,
        deadline: Instant,
    ) -> (AdmissionResponse, Option<WorkloadKind>) {
        let started = Instant::now();
        let mut response = AdmissionResponse::from(req);
        let decided = match tokio::time::timeout_at(deadline.into(), self.admit(req, deadline))
            .await
        {
            Ok(decided) => decided,
            Err(_) => Err(Denial::new(
                "timeout",
                format!(
                    "secrets-webhook could not decide within its time budget ({:.1}s); retry, and check the \
                     webhook's Vault and API server connectivity",
                    self.budget(None).as_secs_f64()
                ),
            )),
        };
        // Not validated by the API server yet: logged only when it has the form of a name.
        let pod_name = req
            .object
            .as_ref()
            .and_then(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .or(p.metadata.generate_name.as_deref())
            })
            .map(|n| refs::plain_name(n).map_or_else(|| refs::shape(n), str::to_owned))
            .unwrap_or_default();
        let namespace = req.namespace.as_deref().unwrap_or_default();
        let workload = match decided {
            Ok(outcome) => {
                tracing::info!(
                    uid = %req.uid, namespace, pod = %pod_name,
                    identity = outcome.identity.as_deref().unwrap_or(""),
                    workload = outcome.workload.map_or("none", WorkloadKind::as_str),
                    decision = if outcome.patch.is_empty() { "allowed" } else { "patched" },
                    ops = outcome.patch.len(),
                    duration_ms = started.elapsed().as_secs_f64() * 1e3,
                    "admission"
                );
                response.audit_annotations.extend(outcome.audit);
                let decision = if outcome.patch.is_empty() {
                    "allowed"
                } else {
                    "patched"
                };
                response
                    .audit_annotations
                    .insert("decision".into(), decision.into());
                if !outcome.warnings.is_empty() {
                    response.warnings = Some(outcome.warnings);
                }
                // `encode_review` writes `patchType` with it (kube keeps that field private).
                if !outcome.patch.is_empty() {
                    match outcome.patch.into_bytes() {
                        Ok(bytes) => response.patch = Some(bytes),
                        Err(_) => {
                            response = AdmissionResponse::from(req)
                                .deny("secrets-webhook could not encode its patch")
                        }
                    }
                }
                outcome.workload
            }
            Err(denial) => {
                // The workload as classified, even when the denial came before or without it.
                let workload = req.object.as_ref().and_then(|pod| {
                    let classified = workload::classify(pod, &self.settings.selectors);
                    classified.ok().flatten().map(|w| w.kind)
                });
                tracing::info!(
                    uid = %req.uid, namespace, pod = %pod_name,
                    identity = denial.identity.as_deref().unwrap_or(""),
                    workload = workload.map_or("none", WorkloadKind::as_str),
                    decision = "denied", reason = denial.reason, denial = %denial.message,
                    duration_ms = started.elapsed().as_secs_f64() * 1e3,
                    "admission"
                );
                self.metrics.denial(denial.reason);
                response.allowed = false;
                response.result = Status::failure(&denial.message, "Forbidden").with_code(403);
                response.audit_annotations.extend(denial.audit);
                response
                    .audit_annotations
                    .insert("decision".into(), format!("denied: {}", denial.reason));
                workload
            }
        };
        (response, workload)
    }

    /// The decision for one pod: a patch (maybe empty) and warnings, or a denial.
    pub async fn admit(
        &self,
        req: &AdmissionRequest<Pod>,
        deadline: Instant,
    ) -> Result<Outcome, Denial> {
        match req.operation {
            Operation::Create => {}
            Operation::Update => {
                update::check(req, &self.settings.naming)?;
                return Ok(Outcome::default());
            }
            _ => return Ok(Outcome::default()),
        }
        let Some(pod) = req.object.as_ref() else {
            return Err(Denial::new(
                "malformed",
                "the AdmissionReview carries no pod object",
            ));
        };
        let naming = &self.settings.naming;
        let namespace = req
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        let empty = BTreeMap::new();
        let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
        if !self.settings.enabled {
            self.guard(pod, namespace, &BTreeSet::new())?;
            return self.untouched(req, pod, namespace, None, deadline).await;
        }
        let max = self.settings.max_references;
        let named = refs::count_references(annotations);
        if named > max {
            return Err(too_many_references(named, max));
        }
        let refs = refs::parse_annotations(annotations, &naming.global_id).map_err(|errors| {
            Denial::new("malformed", lines(errors.iter().map(ToString::to_string)))
        })?;
        let workload = workload::classify(pod, &self.settings.selectors)
            .map_err(|e| Denial::new("malformed", e.to_string()))?;
        let Some(workload) = workload else {
            if let Some(r) = refs.first() {
                return Err(Denial::new(
                    "not-a-workload",
                    format!(
                        "annotation {} asks for {}, but this pod is not a Spark or Jupyter pod; label it \
                         secrets.iomete.com/inject=true to receive env secrets",
                        r.origin, r.secret
                    ),
                ));
            }
            self.guard(pod, namespace, &BTreeSet::new())?;
            return self.untouched(req, pod, namespace, None, deadline).await;
        };
        let legacy = plan::legacy_keys(pod, &workload)
            .map_err(|e| Denial::new("malformed", e.to_string()))?;
        if refs.len() + legacy.len() > max {
            return Err(too_many_references(refs.len() + legacy.len(), max));
        }
        // Each env reference is written into every container it targets: bound the product too,
        // or a small pod listing thousands of containers asks for a patch of gigabytes.
        let env_refs = refs.iter().filter(|r| r.kind == TargetKind::Env).count();
        let containers = workload.env_targets.len();
        let entries = env_refs.saturating_mul(containers) + (refs.len() - env_refs) + legacy.len();
        if entries > max {
            return Err(too_many_env_entries(env_refs, containers, entries, max));
        }
        if refs.is_empty() && legacy.is_empty() {
            self.guard(pod, namespace, &BTreeSet::new())?;
            return self
                .untouched(req, pod, namespace, Some(workload.kind), deadline)
                .await;
        }
        // Executors take their driver's identity and grants; only needed when a reference needs a
        // grant (global secrets need none, so they cost no driver lookup).
        let is_executor = workload.kind == WorkloadKind::SparkExecutor
            && refs.iter().any(|r| {
                !(r.secret.source.kind == SourceType::Kubernetes
                    && r.secret.source.id == naming.global_id)
            });
        let who = self
            .identify(req, pod, namespace, is_executor, deadline)
            .await?;
        let identity = &who.identity;
        // Executors get the driver's SparkConf over RPC: only env secrets are theirs.
        let refs: Vec<Reference> = refs
            .into_iter()
            .filter(|r| {
                !(workload.kind == WorkloadKind::SparkExecutor && r.kind == TargetKind::SparkConf)
            })
            .collect();
        // An executor may only use what its driver was granted (global secrets excepted).
        let not_inherited: Vec<String> = refs
            .iter()
            .filter_map(|r| who.may_inherit(&r.secret, naming).err())
            .map(|e| e.to_string())
            .collect();
        if !not_inherited.is_empty() {
            return Err(Denial::new("forbidden", lines(not_inherited)).for_identity(&who));
        }
        // Use first: whether a store, a key or a Vault config exists is told only to someone who
        // may use it.
        self.authorize(identity, &refs, deadline)
            .await
            .map_err(|d| d.for_identity(&who))?;
        self.check_stores(&refs, &legacy, namespace)
            .map_err(|d| d.for_identity(&who))?;
        // Read and check first, write nothing: the plan or the guard may still deny the pod.
        let delivered = self.resolve(&refs, namespace, true, deadline).await?;
        let mut env: Vec<Resolved> = Vec::new();
        let mut spark_confs: Vec<Resolved> = Vec::new();
        let mut at_runtime: Vec<&Reference> = Vec::new();
        for (r, delivered) in refs.iter().zip(delivered) {
            let key_ref = match delivered {
                Delivered::Secret(key_ref) => key_ref,
                Delivered::Runtime => {
                    at_runtime.push(r);
                    continue;
                }
            };
            let resolved = Resolved {
                name: r.name.clone(),
                secret: r.secret.clone(),
                key_ref,
            };
            match r.kind {
                TargetKind::Env => env.push(resolved),
                TargetKind::SparkConf => spark_confs.push(resolved),
            }
        }
        // Runtime references: the pod is wired to fetch them at start; the rest of the plan
        // works on the wired pod.
        let wired = if at_runtime.is_empty() {
            None
        } else {
            let driver = match &who.via {
                identity::Via::SparkDriver { driver, uid } => Some(DriverRef {
                    name: driver.clone(),
                    uid: uid.clone(),
                }),
                _ => None,
            };
            let wired = runtime::wire(runtime::Inputs {
                pod,
                workload: &workload,
                refs: &at_runtime,
                driver: driver.as_ref(),
                settings: &self.settings.runtime,
            })
            .map_err(|e| Denial::new("runtime", e.to_string()).for_identity(&who))?;
            Some(wired)
        };
        let runtime_plan = wired.as_ref().map(|w| w.plan.to_annotation());
        let stamps = self.stamps(
            identity,
            refs.iter().map(|r| &r.secret),
            runtime_plan.as_deref(),
            pod,
            namespace,
        )?;
        let (planned_pod, planned_workload) = match &wired {
            Some(w) => (&w.pod, &w.workload),
            None => (pod, &workload),
        };
        let plan = plan::plan(
            Inputs {
                pod: planned_pod,
                workload: planned_workload,
                env: &env,
                spark_confs: &spark_confs,
                global_store: &naming.global_store,
                stamps: &stamps,
            },
            &naming.global_id,
        )
        .map_err(|e| Denial::new("malformed", e.to_string()))?;
        self.guard(pod, namespace, &plan.wanted)
            .map_err(|d| d.for_identity(&who))?;
        let (patch, mut warnings) = match wired {
            Some(w) => {
                let mut patch = w.patch;
                patch.append(plan.patch);
                (patch, w.warnings)
            }
            None => (plan.patch, Vec::new()),
        };
        let needs_vault = refs
            .iter()
            .any(|r| r.secret.source.kind == SourceType::Vault);
        if needs_vault && !req.dry_run {
            // Admitted: now materialize the Vault values (served from the read just made).
            self.resolve(&refs, namespace, false, deadline).await?;
        }
        warnings.splice(0..0, who.warnings.iter().cloned());
        warnings.extend(plan.warnings);
        Ok(Outcome {
            workload: Some(workload.kind),
            patch,
            warnings,
            identity: Some(identity.username.clone()),
            audit: identity::audit_annotations(Some(&who), ""),
        })
    }

    /// A pod the webhook does not mutate. No patch, unless it carries stamp annotations: the
    /// webhook owns them, so they are reset to the requester's identity with nothing granted (a
    /// forged driver stamp would otherwise hand grants to its executors). That is also what the
    /// first pass stamped on a pod whose only references were legacy placeholders, so a
    /// reinvocation stays a no-op.
    async fn untouched(
        &self,
        req: &AdmissionRequest<Pod>,
        pod: &Pod,
        namespace: &str,
        workload: Option<WorkloadKind>,
        deadline: Instant,
    ) -> Result<Outcome, Denial> {
        let mut outcome = Outcome {
            workload,
            ..Outcome::default()
        };
        if stamps::client_stamps(pod).is_empty() {
            return Ok(outcome);
        }
        let who = self.identify(req, pod, namespace, false, deadline).await?;
        let stamps = self.stamps(&who.identity, std::iter::empty(), None, pod, namespace)?;
        outcome.patch = stamps::stamp_ops(pod, &stamps);
        outcome.audit = identity::audit_annotations(Some(&who), "");
        Ok(outcome)
    }

    /// The signed stamps for `pod`, admitted for `identity` with `granted`. No key, no stamps:
    /// the pod is denied rather than stamped with something executors could not verify.
    fn stamps<'a>(
        &self,
        identity: &Identity,
        granted: impl IntoIterator<Item = &'a refs::SecretObject>,
        runtime: Option<&str>,
        pod: &Pod,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, Denial> {
        let keys = self.keys.get().ok_or_else(|| {
            Denial::new(
                "not-ready",
                identity::IdentityError::NoSigningKey {
                    action: "stamp the pod",
                }
                .to_string(),
            )
        })?;
        Ok(stamps::stamps_with_runtime(
            identity,
            granted,
            runtime,
            &Subject::of_new_pod(pod, namespace),
            &keys,
        ))
    }

    /// Whom the pod is admitted for (an executor: its driver's identity and grants).
    async fn identify(
        &self,
        req: &AdmissionRequest<Pod>,
        pod: &Pod,
        namespace: &str,
        is_executor: bool,
        deadline: Instant,
    ) -> Result<identity::Resolved, Denial> {
        let resolver = identity::Resolver {
            trusted: &self.trusted,
            owners: self.owners.as_ref(),
            keys: &self.keys,
            executors: self.settings.executors,
        };
        let resolved = resolver
            .resolve(&req.user_info, pod, namespace, is_executor, deadline)
            .await
            .map_err(|e| Denial::new("identity", e.to_string()))?;
        identity_within_bounds(&resolved.identity)?;
        Ok(resolved)
    }

    /// Kubernetes references: the store is in this namespace and holds the key.
    fn check_stores(
        &self,
        refs: &[Reference],
        legacy: &BTreeSet<String>,
        namespace: &str,
    ) -> Result<(), Denial> {
        let naming = &self.settings.naming;
        let k8s_refs = refs
            .iter()
            .filter(|r| r.secret.source.kind == SourceType::Kubernetes);
        let mut problems = Vec::new();
        let mut any = false;
        for r in k8s_refs {
            any = true;
            let store = naming.store_for(&r.secret.source.id);
            if let Some(problem) = self.store_problem(&store, &r.secret.key, &r.secret.source.id) {
                problems.push(format!(
                    "annotation {}: {} {:?}: {}: {problem}",
                    r.origin, r.kind, r.name, r.secret
                ));
            }
        }
        for key in legacy {
            any = true;
            if let Some(problem) = self.store_problem(&naming.global_store, key, &naming.global_id)
            {
                problems.push(format!("placeholder ${{secrets.{key}}}: {problem}"));
            }
        }
        if any && namespace != naming.namespace {
            return Err(Denial::new(
                "wrong-namespace",
                format!(
                    "Kubernetes secret stores live in namespace {:?}; this pod is in {namespace:?}. Run the \
                     workload in {:?}, or use a Vault reference",
                    naming.namespace, naming.namespace
                ),
            ));
        }
        if !any {
            return Ok(());
        }
        if !self.stores.ready() {
            return Err(Denial::new(
                "not-ready",
                "secrets-webhook has not finished loading the secret stores; retry in a few seconds",
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Denial::new("missing-key", lines(problems)))
        }
    }

    fn store_problem(&self, store: &str, key: &str, id: &str) -> Option<String> {
        let ns = &self.settings.naming.namespace;
        let scope = if id == self.settings.naming.global_id {
            "the global store".to_owned()
        } else {
            format!("domain {id:?}")
        };
        match self.stores.check(store, key) {
            StoreCheck::Present => None,
            StoreCheck::MissingKey => Some(format!(
                "{scope} has no key {key:?} (Secret {store} in namespace {ns}); create the secret or fix the key"
            )),
            StoreCheck::MissingStore => Some(format!(
                "{scope} has no secret store (Secret {store} in namespace {ns}); create a secret in that domain \
                 first, or fix source.id"
            )),
        }
    }

    /// `Use` on every domain and Vault config the pod names; global secrets need no grant.
    async fn authorize(
        &self,
        identity: &Identity,
        refs: &[Reference],
        deadline: Instant,
    ) -> Result<(), Denial> {
        let mut needed: BTreeMap<Resource, &Reference> = BTreeMap::new();
        for r in refs {
            let id = &r.secret.source.id;
            let resource = match r.secret.source.kind {
                SourceType::Kubernetes if *id == self.settings.naming.global_id => continue,
                SourceType::Kubernetes => Resource::Domain(id.clone()),
                // A config that does not exist has no bundle: nobody holds Use on it, and the
                // denial reads as for one that exists.
                SourceType::Vault => Resource::VaultConfig {
                    name: id.clone(),
                    bundle: self.vault.as_ref().and_then(|v| v.bundle_of(id)),
                },
            };
            needed.entry(resource).or_insert(r);
        }
        // Each distinct resource may cost a SubjectAccessReview: a pod cannot make thousands.
        if needed.len() > MAX_RESOURCES {
            return Err(Denial::new(
                "malformed",
                format!(
                    "the pod references {} different domains and Vault configs; at most {MAX_RESOURCES} \
                     per pod",
                    needed.len()
                ),
            ));
        }
        let checks = needed.iter().map(|(resource, r)| async move {
            match self.authz.check_use(identity, resource, deadline).await {
                Decision::Allow => None,
                Decision::Deny(why) => {
                    Some(format!("annotation {}: {}: {why}", r.origin, r.secret))
                }
            }
        });
        let denials: Vec<String> = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        if denials.is_empty() {
            Ok(())
        } else {
            Err(Denial::new("forbidden", lines(denials)))
        }
    }

    /// How each reference's value reaches the pod, in order: where the kubelet finds it, or at
    /// runtime from the broker.
    async fn resolve(
        &self,
        refs: &[Reference],
        namespace: &str,
        dry_run: bool,
        deadline: Instant,
    ) -> Result<Vec<Delivered>, Denial> {
        let naming = &self.settings.naming;
        let wants: Vec<VaultWant<'_>> = refs
            .iter()
            .filter(|r| r.secret.source.kind == SourceType::Vault)
            .map(|r| VaultWant { secret: &r.secret })
            .collect();
        let mut delivered = match (&self.vault, wants.is_empty()) {
            (_, true) => Vec::new(),
            (Some(vault), false) => vault.deliver(namespace, &wants, dry_run, deadline).await,
            (None, false) => {
                let first = refs
                    .iter()
                    .find(|r| r.secret.source.kind == SourceType::Vault);
                return Err(first.map_or_else(
                    || Denial::new("vault", "Vault source not configured"),
                    vault_not_configured,
                ));
            }
        }
        .into_iter();
        let mut out = Vec::with_capacity(refs.len());
        let mut problems = Vec::new();
        for r in refs {
            match r.secret.source.kind {
                SourceType::Kubernetes => out.push(Delivered::Secret(KeyRef {
                    secret: naming.store_for(&r.secret.source.id),
                    key: r.secret.key.clone(),
                })),
                SourceType::Vault => match delivered.next() {
                    Some(Ok(delivered)) => out.push(delivered),
                    Some(Err(why)) => {
                        problems.push(format!("annotation {}: {}: {why}", r.origin, r.secret))
                    }
                    None => problems.push(format!(
                        "annotation {}: {}: the Vault backend gave no answer",
                        r.origin, r.secret
                    )),
                },
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(Denial::new("vault", lines(problems)))
        }
    }

    /// Guard (DESIGN §5): a direct reference to a managed store must come from this webhook's plan,
    /// or anyone who can create a pod could skip the Use check. Global secrets need no grant, so
    /// the global store is exempt (legacy placeholders become such references).
    fn guard(&self, pod: &Pod, _namespace: &str, wanted: &BTreeSet<KeyRef>) -> Result<(), Denial> {
        guard::check(pod, &self.settings.naming, wanted)
            .map_err(|e| Denial::new("direct-store-reference", e.to_string()))
    }
}

/// Work per pod grows with its references; a bound keeps one pod from occupying the webhook.
fn too_many_references(named: usize, max: usize) -> Denial {
    Denial::new(
        "too-many-references",
        format!(
            "the pod names {named} secret references (annotations and ${{secrets.…}} placeholders), more \
             than the {max} secrets-webhook accepts per pod; remove unused references, or ask a platform \
             admin to raise --max-references"
        ),
    )
}

/// Denies an identity too large to carry through the checks (described by its size, not quoted).
fn identity_within_bounds(identity: &Identity) -> Result<(), Denial> {
    let extra = identity.extra.iter();
    let values = identity.groups.len() + extra.clone().map(|(_, v)| v.len()).sum::<usize>();
    let bytes = identity.username.len()
        + identity.uid.as_ref().map_or(0, String::len)
        + identity.groups.iter().map(String::len).sum::<usize>()
        + extra
            .map(|(k, v)| k.len() + v.iter().map(String::len).sum::<usize>())
            .sum::<usize>();
    let problem = if identity.username.len() > MAX_USERNAME_BYTES {
        format!(
            "its user name has {} bytes, more than {MAX_USERNAME_BYTES}",
            identity.username.len()
        )
    } else if values > MAX_IDENTITY_VALUES {
        format!("it has {values} groups and extra values, more than {MAX_IDENTITY_VALUES}")
    } else if bytes > MAX_IDENTITY_BYTES {
        format!(
            "it has {bytes} bytes of names, groups and extra values, more than {MAX_IDENTITY_BYTES}"
        )
    } else {
        return Ok(());
    };
    Err(Denial::new(
        "identity",
        format!(
            "the identity this pod is admitted for is larger than secrets-webhook accepts: {problem}; \
             submit the pod as an identity with fewer groups"
        ),
    ))
}

fn too_many_env_entries(env_refs: usize, containers: usize, entries: usize, max: usize) -> Denial {
    Denial::new(
        "too-many-references",
        format!(
            "the pod's {env_refs} env secret references go into each of the {containers} containers named in \
             {}: {entries} secret entries with its other references, more than the {max} \
             secrets-webhook writes per pod; name fewer containers or references, or ask a platform admin \
             to raise --max-references",
            workload::CONTAINERS_ANNOTATION
        ),
    )
}

fn vault_not_configured(r: &Reference) -> Denial {
    Denial::new(
        "vault",
        format!(
            "annotation {}: {} {:?}: {}: Vault source not configured in this webhook; use a Kubernetes \
             source, or ask a platform admin to configure Vault",
            r.origin, r.kind, r.name, r.secret
        ),
    )
}

/// Problems one per line; a pod with thousands of bad references gets the first few and a count.
fn lines(problems: impl IntoIterator<Item = String>) -> String {
    const SHOWN: usize = 10;
    let mut out = Vec::with_capacity(SHOWN + 1);
    let mut more = 0usize;
    for problem in problems {
        if out.len() < SHOWN {
            out.push(problem);
        } else {
            more += 1;
        }
    }
    if more > 0 {
        out.push(format!("… and {more} more"));
    }
    out.join("\n")
}

fn outcome_label(response: &AdmissionResponse) -> &'static str {
    match (response.allowed, response.patch.is_some()) {
        (true, true) => "patched",
        (true, false) => "allowed",
        (false, _) => "denied",
    }
}

/// The response on the wire. kube's own serializer writes the patch as an array of numbers; the
/// API server also takes that, but the documented form (and every other webhook's) is base64.
fn encode_review(response: &AdmissionResponse) -> Vec<u8> {
    use base64::Engine as _;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire<'a> {
        uid: &'a str,
        allowed: bool,
        status: &'a Status,
        #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
        audit_annotations: &'a std::collections::HashMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        warnings: Option<&'a Vec<String>>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope<'a> {
        api_version: &'static str,
        kind: &'static str,
        response: Wire<'a>,
    }
    const FAILED: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":false}}"#;
    let review = Envelope {
        api_version: REVIEW_API_VERSION,
        kind: "AdmissionReview",
        response: Wire {
            uid: &response.uid,
            allowed: response.allowed,
            status: &response.result,
            audit_annotations: &response.audit_annotations,
            warnings: response.warnings.as_ref(),
        },
    };
    let patch_len = response.patch.as_ref().map_or(0, |p| p.len());
    let mut out = Vec::with_capacity(512 + patch_len.div_ceil(3) * 4);
    if serde_json::to_writer(&mut out, &review).is_err() {
        return FAILED.to_vec();
    }
    // The patch (often several KiB) is base64-encoded straight into the output, before the two
    // closing braces: base64 needs no JSON escaping, and a separate string plus an escaping pass
    // over it was a large share of every patched admission (docs/performance.md).
    if let Some(patch) = &response.patch {
        if !out.ends_with(b"}}") {
            return FAILED.to_vec();
        }
        out.truncate(out.len() - 2);
        out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
        let start = out.len();
        out.resize(start + patch.len().div_ceil(3) * 4, 0);
        match base64::engine::general_purpose::STANDARD.encode_slice(patch, &mut out[start..]) {
            Ok(written) => out.truncate(start + written),
            Err(_) => return FAILED.to_vec(),
        }
        out.extend_from_slice(br#""}}"#);
    }
    out
}

/// Reads an `admission.k8s.io/v1` AdmissionReview of a Pod. The error is the `invalid` message.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<Pod>, String> {
    let not_a_review = |e: &dyn std::fmt::Display| {
        format!("the body is not an admission.k8s.io/v1 AdmissionReview of a Pod ({e})")
    };
    // JSON is UTF-8 (RFC 8259); serde_json validates only the strings it keeps, so invalid bytes
    // in a field it skips would otherwise be admitted.
    let text = std::str::from_utf8(body).map_err(|e| not_a_review(&e))?;
    let review: AdmissionReview<Pod> = serde_json::from_str(text).map_err(|e| not_a_review(&e))?;
    if review.types.api_version != REVIEW_API_VERSION || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion {REVIEW_API_VERSION}, kind AdmissionReview; got {}, {}",
            shown(&review.types.api_version),
            shown(&review.types.kind)
        ));
    }
    let req: AdmissionRequest<Pod> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_owned())?;
    if req.uid.is_empty() {
        return Err("the AdmissionReview request has no uid".into());
    }
    Ok(req)
}

/// An AdmissionReview of any kind; the `invalid` answer when it cannot be read.
fn parse_dynamic(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionResponse>> {
    std::str::from_utf8(body)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            serde_json::from_str::<AdmissionReview<DynamicObject>>(text).map_err(|e| e.to_string())
        })
        .and_then(|review| {
            review
                .try_into()
                .map_err(|_| "the AdmissionReview has no request".to_string())
        })
        .map_err(|e| {
            let mut response = AdmissionResponse::invalid(format!(
                "the body is not an admission.k8s.io/v1 AdmissionReview ({e})"
            ));
            response.uid = uid_of(body);
            Box::new(response)
        })
}

/// The `request.kind.kind` of a review, read without building the object.
fn review_kind(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Option<Request>,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        kind: Option<Kind>,
    }
    #[derive(serde::Deserialize)]
    struct Kind {
        kind: String,
    }
    serde_json::from_slice::<Review>(body)
        .ok()?
        .request?
        .kind
        .map(|k| k.kind)
}

/// Best effort: the uid of a review that did not parse, so the API server can match the answer.
fn uid_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Uid {
        request: Option<UidOnly>,
    }
    #[derive(serde::Deserialize)]
    struct UidOnly {
        uid: Option<String>,
    }
    serde_json::from_slice::<Uid>(body)
        .ok()
        .and_then(|r| r.request?.uid)
        .map(|uid| clip(&uid).to_owned())
        .unwrap_or_default()
}

/// An apiVersion or kind that is not the expected one: quoted only when it has the form of one.
fn shown(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-'));
    if plain {
        format!("{s:?}")
    } else {
        refs::shape(s)
    }
}

fn clip(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(i, _)| &s[..i])
}
