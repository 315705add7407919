//! Runtime delivery, the pure part (docs/vault.md, "Delivery: runtime mode"): how a pod whose
//! references name `runtime` Vault configs is wired to fetch its values at start from the webhook
//! (the broker, `src/broker/`), and the signed plan that says which container gets what.
//!
//! The webhook adds:
//! - a projected service-account token with audience [`TOKEN_AUDIENCE`], valid for
//!   [`TOKEN_SECONDS`] (the shortest the API server issues), which the Kubernetes API itself does
//!   not accept;
//! - a memory-backed emptyDir, and an init container from the webhook's own image that copies the
//!   static binary into it (`secrets-webhook copy-self`, no shell needed);
//! - in each wrapped container: the command `<bin> exec -- <entrypoint>` (the container's own
//!   `command`, else the entrypoint of its image from an admin table, else a denial), the two
//!   mounts and the wrapper's settings as env vars.
//!
//! Values never appear in the pod: the wrapper fetches them and puts env secrets into its own
//! environment and Spark confs into a properties file on the emptyDir before it `exec`s the
//! entrypoint. [`wire`] edits a copy of the pod and records each edit as a JSON Patch operation,
//! so the rest of the planner works on the wired pod; a second pass finds nothing to do.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use super::JsonPatch;
use crate::refs::{self, Reference, SecretObject, TargetKind};
use crate::workload::{Slot, Workload, WorkloadKind, first_arg};

/// Audience of the pod's broker token: the broker asks for it in its TokenReview, and the
/// Kubernetes API server refuses tokens issued for it.
pub const TOKEN_AUDIENCE: &str = "secrets.iomete.com";
/// Lifetime the kubelet requests for the broker token (600 s is the API server's minimum; the
/// kubelet renews it at 80 %).
pub const TOKEN_SECONDS: i64 = 600;
/// Where the emptyDir is mounted in every wrapped container (and the init container).
pub const RUNTIME_DIR: &str = "/iomete-secrets";
/// The wrapper binary, as the init container leaves it.
pub const WRAPPER: &str = "/iomete-secrets/secrets-webhook";
/// Where the broker token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/secrets.iomete.com";
/// The token file inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";
/// The emptyDir volume.
pub const BIN_VOLUME: &str = "iomete-secrets-runtime";
/// The projected token volume.
pub const TOKEN_VOLUME: &str = "iomete-secrets-token";
/// The init container that installs the wrapper.
pub const INSTALL_CONTAINER: &str = "iomete-secrets-install";
/// The binary's path in the webhook's image (the Dockerfile puts it there).
pub const IMAGE_BINARY: &str = "/secrets-webhook";
/// Size limit of the emptyDir: the static binary (about 19 MB) and the properties files.
pub const RUNTIME_DIR_LIMIT: &str = "64Mi";

/// Env var: the broker's URL.
pub const ENV_BROKER: &str = "SECRETS_WEBHOOK_BROKER";
/// Env var: the PEM CA certificate(s) the broker's serving certificate chains to (public data).
pub const ENV_BROKER_CA: &str = "SECRETS_WEBHOOK_BROKER_CA";
/// Env var: the container's own name (which container's values to fetch).
pub const ENV_CONTAINER: &str = "SECRETS_WEBHOOK_CONTAINER";
/// Env var: the pod's uid (downward API), so a token of another pod is noticed.
pub const ENV_POD_UID: &str = "SECRETS_WEBHOOK_POD_UID";
/// The wrapper's settings, in the order they are set.
pub const WRAPPER_ENV: [&str; 4] = [ENV_BROKER, ENV_BROKER_CA, ENV_CONTAINER, ENV_POD_UID];

/// The command prefix of a wrapped container.
pub fn wrapper_prefix() -> [&'static str; 3] {
    [WRAPPER, "exec", "--"]
}

/// Where the entrypoint of an image comes from when a container sets no `command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntrypointRule {
    /// An image repository without tag or digest (`apache/spark`, `quay.io/jupyter/*`); a
    /// trailing `*` matches any rest. `docker.io/` and `library/` are implied, as in Docker.
    pub image: String,
    /// The image's ENTRYPOINT.
    pub command: Vec<String>,
    /// The image's CMD, used when a container sets neither command nor args.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_args: Option<Vec<String>>,
}

/// The entrypoints shipped with the webhook: the Apache Spark images and the Jupyter
/// docker-stacks images. Admins add their own (the config file's `runtime.entrypoints`), which
/// are looked at first.
pub fn shipped_entrypoints() -> Vec<EntrypointRule> {
    let spark = |image: &str| EntrypointRule {
        image: image.into(),
        command: vec!["/opt/entrypoint.sh".into()],
        default_args: None,
    };
    let jupyter = |image: &str| EntrypointRule {
        image: image.into(),
        command: ["tini", "-g", "--", "start.sh"].map(String::from).into(),
        default_args: Some(vec!["start-notebook.sh".into()]),
    };
    vec![
        spark("apache/spark"),
        spark("apache/spark-py"),
        spark("apache/spark-r"),
        // The Docker official image (`spark:3.5.5`) is built from the same Dockerfiles.
        spark("spark"),
        jupyter("quay.io/jupyter/*"),
        jupyter("jupyter/*"),
    ]
}

/// The config file's `runtime` section (all optional; flags win over it in `serve`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The webhook's own image (default in a cluster: its pod's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The broker's URL as pods reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_url: Option<String>,
    /// PEM CA certificate(s) of the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_ca_file: Option<std::path::PathBuf>,
    /// Entrypoints of images the webhook's table does not ship (looked at first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoints: Vec<EntrypointRule>,
}

impl RuntimeConfig {
    /// The admin's entrypoints, then the shipped ones.
    pub fn entrypoints(&self) -> Vec<EntrypointRule> {
        self.entrypoints
            .iter()
            .cloned()
            .chain(shipped_entrypoints())
            .collect()
    }
}

/// Runtime delivery settings (the admin's): the webhook's own image, where the broker is, and
/// the entrypoint table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// The image of the init container: the webhook's own (`None`: not known, runtime
    /// references are denied).
    pub image: Option<String>,
    /// The broker's URL as pods reach it.
    pub broker_url: String,
    /// PEM CA certificate(s) of the broker's serving certificate (`None`: runtime references are
    /// denied, since a pod could not verify whom it sends its token to).
    pub broker_ca: Option<String>,
    pub entrypoints: Vec<EntrypointRule>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            image: None,
            broker_url: "https://secrets-webhook.iomete-system.svc:8445".into(),
            broker_ca: None,
            entrypoints: shipped_entrypoints(),
        }
    }
}

impl RuntimeSettings {
    /// The rule for `image`, admins' entries first.
    pub fn entrypoint_for(&self, image: &str) -> Option<&EntrypointRule> {
        let repository = repository(image);
        self.entrypoints
            .iter()
            .find(|rule| matches_image(&rule.image, &repository))
    }
}

/// `registry/path` of an image reference without tag or digest, with Docker Hub's implied
/// `docker.io/` and `library/` removed: `docker.io/library/spark:3.5` → `spark`.
pub fn repository(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or_default();
    // A tag follows the last ':' after the last '/' (a ':' before it is a registry port).
    let name = match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    };
    let name = name
        .strip_prefix("docker.io/")
        .or_else(|| name.strip_prefix("index.docker.io/"))
        .unwrap_or(name);
    name.strip_prefix("library/").unwrap_or(name).to_string()
}

fn matches_image(pattern: &str, repository: &str) -> bool {
    let pattern = self::repository(pattern);
    match pattern.strip_suffix('*') {
        Some(prefix) => repository.starts_with(prefix),
        None => repository == pattern,
    }
}

/// Which prefixes of Spark conf keys Spark writes into executor pod specs, and why: in runtime
/// mode their values would land in etcd through the executor pods.
pub fn copied_into_executor_pods(key: &str) -> Option<&'static str> {
    const PREFIXES: [(&str, &str); 10] = [
        (
            "spark.executorEnv.",
            "Spark sets it as an env var of every executor pod",
        ),
        (
            "spark.kubernetes.executor.",
            "Spark writes it into every executor pod's spec",
        ),
        (
            "spark.auth",
            "Spark passes authentication settings to executor pods in their env",
        ),
        (
            "spark.ssl",
            "Spark passes SSL settings to executor pods in their env",
        ),
        (
            "spark.rpc",
            "Spark passes RPC settings to executor pods in their env",
        ),
        (
            "spark.network",
            "Spark passes network settings to executor pods in their env",
        ),
        (
            "spark.port.",
            "Spark passes port settings to executor pods in their env",
        ),
        (
            "spark.executor.extraJavaOptions",
            "Spark passes executor Java options in the executor pods' env",
        ),
        (
            "spark.executor.defaultJavaOptions",
            "Spark passes executor Java options in the executor pods' env",
        ),
        (
            "spark.executor.extra",
            "Spark passes executor class and library paths in the executor pods' env",
        ),
    ];
    if key.starts_with("spark.") && key.ends_with(".port") {
        return Some("Spark passes port settings to executor pods in their env");
    }
    PREFIXES
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map(|(_, why)| *why)
}

/// How a container's Spark confs reach Spark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfsVia {
    /// A Spark driver: the args from `argsAt` on are `driver <spark-submit args>`; the wrapper
    /// hands spark-submit a properties file merged with the original `--properties-file`.
    SparkSubmit,
    /// A Jupyter pod: the wrapper adds such a file to `PYSPARK_SUBMIT_ARGS`.
    PysparkSubmitArgs,
}

/// What one container fetches at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPlan {
    pub name: String,
    /// Env var name → reference.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, SecretObject>,
    /// Spark conf key → reference.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spark_confs: BTreeMap<String, SecretObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confs_via: Option<ConfsVia>,
    /// Where the container's args start in the wrapper's argv after `--` (the entrypoint's
    /// length).
    pub args_at: usize,
}

impl ContainerPlan {
    /// Every reference of the container, once each.
    pub fn secrets(&self) -> BTreeSet<&SecretObject> {
        self.env.values().chain(self.spark_confs.values()).collect()
    }
}

/// An executor's driver, as the webhook found it at admission (name and uid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverRef {
    pub name: String,
    pub uid: String,
}

/// The signed plan (`secrets.iomete.com/runtime`): exactly what each container may fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimePlan {
    pub containers: Vec<ContainerPlan>,
    /// For an executor: the driver whose grants it inherited, checked again at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverRef>,
}

impl RuntimePlan {
    /// The annotation's value (deterministic: sorted maps, containers in pod order).
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_annotation(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    pub fn container(&self, name: &str) -> Option<&ContainerPlan> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// Why a pod cannot be wired for runtime delivery. `Display` is the denial text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "Vault config {config} delivers values at runtime, but secrets-webhook {missing}; a platform admin must \
         fix the webhook's runtime settings (docs/vault.md), or set delivery: materialize on the VaultConfig"
    )]
    NotConfigured {
        config: String,
        missing: &'static str,
    },
    #[error(
        "Spark conf {key}: {why}, so its value would be stored in etcd; Vault config {config} delivers values at \
         runtime, which keeps them out of etcd: use an env secret, or a Vault config with delivery: materialize"
    )]
    CopiedToExecutors {
        key: String,
        config: String,
        why: &'static str,
    },
    #[error(
        "container {container} sets no command and its image {image} is not in the webhook's entrypoint table, so \
         secrets-webhook cannot start it through its runtime wrapper (which fetches the values of runtime Vault \
         configs at start); set the container's command to the image's entrypoint, or ask a platform admin to \
         add the image to runtime.entrypoints in the webhook's config"
    )]
    UnknownEntrypoint { container: String, image: String },
    #[error(
        "container {container} sets neither command nor args, and the default args of its image {image} are not \
         in the webhook's entrypoint table; set the container's args"
    )]
    UnknownArgs { container: String, image: String },
    #[error(
        "Spark conf secrets need the driver container's args to start with \"driver\" (container {0} does not); \
         the Spark entrypoint passes them to spark-submit"
    )]
    NoDriverArgs(String),
    #[error(
        "Spark conf secrets apply to Spark drivers and Jupyter pods, not to {0} pods; use env secrets instead"
    )]
    SparkConfNotSupported(WorkloadKind),
    #[error(
        "{what} {name} is reserved for secrets-webhook's runtime delivery; rename the pod's own {what}"
    )]
    Reserved { what: &'static str, name: String },
    #[error(
        "container {container} already mounts something at {path}, where secrets-webhook's runtime delivery \
         mounts its {what}; move that mount"
    )]
    MountPathTaken {
        container: String,
        path: &'static str,
        what: &'static str,
    },
}

/// What [`wire`] is given.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub pod: &'a Pod,
    pub workload: &'a Workload,
    /// The references whose Vault config delivers at runtime (env and Spark confs).
    pub refs: &'a [&'a Reference],
    /// For executors: their driver.
    pub driver: Option<&'a DriverRef>,
    pub settings: &'a RuntimeSettings,
}

/// The wired pod (what the rest of the planner works on), the operations that made it, the
/// plan to sign, and warnings.
#[derive(Debug, Clone)]
pub struct Wired {
    pub pod: Pod,
    /// `workload` with init container indices moved past the install container.
    pub workload: Workload,
    pub patch: JsonPatch,
    pub plan: RuntimePlan,
    pub warnings: Vec<String>,
}

/// Wires `pod` for runtime delivery. `refs` must not be empty.
pub fn wire(input: Inputs<'_>) -> Result<Wired, RuntimeError> {
    let settings = input.settings;
    let first_config = input
        .refs
        .first()
        .map(|r| r.secret.source.id.clone())
        .unwrap_or_default();
    let not_configured = |missing| RuntimeError::NotConfigured {
        config: first_config.clone(),
        missing,
    };
    let image = settings
        .image
        .as_deref()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| not_configured("does not know its own image (--runtime-image, or runtime.image in its config file)"))?;
    let ca = settings
        .broker_ca
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| not_configured("has no CA certificate for its broker (--broker-ca-file, or runtime.brokerCaFile in its config file)"))?;

    let workload = input.workload;
    let (env_refs, conf_refs): (Vec<&Reference>, Vec<&Reference>) = input
        .refs
        .iter()
        .copied()
        .partition(|r| r.kind == TargetKind::Env);
    if let Some(r) = env_refs
        .iter()
        .find(|r| WRAPPER_ENV.contains(&r.name.as_str()))
    {
        return Err(RuntimeError::Reserved {
            what: "env var name",
            name: r.name.clone(),
        });
    }
    for r in &conf_refs {
        if let Some(why) = copied_into_executor_pods(&r.name) {
            return Err(RuntimeError::CopiedToExecutors {
                key: r.name.clone(),
                config: r.secret.source.id.clone(),
                why,
            });
        }
    }
    if !conf_refs.is_empty()
        && !matches!(
            workload.kind,
            WorkloadKind::SparkDriver | WorkloadKind::Jupyter
        )
    {
        return Err(RuntimeError::SparkConfNotSupported(workload.kind));
    }

    let mut pod = input.pod.clone();
    let mut patch = JsonPatch::default();
    let mut warnings = Vec::new();
    let spec = pod.spec.get_or_insert_with(Default::default);

    // The install container runs before every other init container (a wrapped init container
    // needs the binary); the pod's own init containers move by one.
    let install = install_container(image);
    let shift = match spec.init_containers.as_mut() {
        None => {
            patch.add(["spec", "initContainers"], &[&install]);
            spec.init_containers = Some(vec![install]);
            1
        }
        Some(inits) => match inits.iter().position(|c| c.name == INSTALL_CONTAINER) {
            Some(0) => {
                if !same_container(&inits[0], &install) {
                    patch.replace(["spec", "initContainers", "0"], &install);
                    inits[0] = install;
                }
                0
            }
            Some(_) => {
                return Err(RuntimeError::Reserved {
                    what: "init container name",
                    name: INSTALL_CONTAINER.into(),
                });
            }
            None => {
                patch.add(["spec", "initContainers", "0"], &install);
                inits.insert(0, install);
                1
            }
        },
    };
    let moved = |slot: Slot| Slot {
        init: slot.init,
        index: if slot.init {
            slot.index + shift
        } else {
            slot.index
        },
    };
    let workload_out = Workload {
        kind: workload.kind,
        main: moved(workload.main),
        env_targets: workload.env_targets.iter().copied().map(moved).collect(),
    };

    for volume in [bin_volume(), token_volume()] {
        match spec.volumes.as_mut() {
            None => {
                patch.add(["spec", "volumes"], &[&volume]);
                spec.volumes = Some(vec![volume]);
            }
            Some(volumes) => match volumes.iter().find(|v| v.name == volume.name) {
                Some(v) if same_volume(v, &volume) => {}
                Some(_) => {
                    return Err(RuntimeError::Reserved {
                        what: "volume name",
                        name: volume.name.clone(),
                    });
                }
                None => {
                    patch.add(["spec", "volumes", "-"], &volume);
                    volumes.push(volume);
                }
            },
        }
    }

    // Which containers are wrapped, in pod order.
    let mut slots: Vec<Slot> = Vec::new();
    if !env_refs.is_empty() {
        slots.extend(workload_out.env_targets.iter().copied());
    }
    if !conf_refs.is_empty() && !slots.contains(&workload_out.main) {
        slots.push(workload_out.main);
    }
    slots.sort_by_key(|s| (!s.init, s.index));

    let mut plan = RuntimePlan {
        containers: Vec::new(),
        driver: input.driver.cloned(),
    };
    for slot in slots {
        let list = if slot.init {
            spec.init_containers.get_or_insert_with(Vec::new)
        } else {
            &mut spec.containers
        };
        let Some(container) = list.get_mut(slot.index) else {
            continue;
        };
        if container.name == INSTALL_CONTAINER {
            continue;
        }
        let base = [
            "spec".to_string(),
            slot.field().to_string(),
            slot.index.to_string(),
        ];
        let env: BTreeMap<String, SecretObject> = if workload_out.env_targets.contains(&slot) {
            env_refs
                .iter()
                .map(|r| (r.name.clone(), r.secret.clone()))
                .collect()
        } else {
            BTreeMap::new()
        };
        let spark_confs: BTreeMap<String, SecretObject> = if slot == workload_out.main {
            conf_refs
                .iter()
                .map(|r| (r.name.clone(), r.secret.clone()))
                .collect()
        } else {
            BTreeMap::new()
        };
        let confs_via = match (spark_confs.is_empty(), workload.kind) {
            (true, _) => None,
            (false, WorkloadKind::SparkDriver) => {
                if first_arg(container) != Some("driver") {
                    return Err(RuntimeError::NoDriverArgs(refs::shown_name(
                        &container.name,
                    )));
                }
                Some(ConfsVia::SparkSubmit)
            }
            (false, _) => Some(ConfsVia::PysparkSubmitArgs),
        };
        let (args_at, wrapped_now) = wrap_command(container, &base, settings, &mut patch)?;
        mount(container, &base, &mut patch)?;
        set_env(
            container,
            &base,
            &env,
            &settings.broker_url,
            ca,
            &mut patch,
            &mut warnings,
        );
        if wrapped_now {
            conf_warnings(container, confs_via, &spark_confs, &mut warnings);
        }
        plan.containers.push(ContainerPlan {
            name: container.name.clone(),
            env,
            spark_confs,
            confs_via,
            args_at,
        });
    }
    Ok(Wired {
        pod,
        workload: workload_out,
        patch,
        plan,
        warnings,
    })
}

/// The init container that copies the wrapper into the emptyDir: the webhook's own image and
/// binary, no shell; the restricted Pod Security profile's settings (the user is the pod's, or
/// the image's non-root 65532).
fn install_container(image: &str) -> Container {
    let quantity = |q: &str| Quantity(q.to_string());
    Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec![
            IMAGE_BINARY.into(),
            "copy-self".into(),
            WRAPPER.into(),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: BIN_VOLUME.into(),
            mount_path: RUNTIME_DIR.into(),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), quantity("10m")),
                ("memory".into(), quantity("32Mi")),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".into(), quantity("200m")),
                ("memory".into(), quantity("64Mi")),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Ours, as far as what we set goes (the API server adds defaults between two passes).
fn same_container(found: &Container, ours: &Container) -> bool {
    found.image == ours.image
        && found.command == ours.command
        && found.args == ours.args
        && found.volume_mounts == ours.volume_mounts
        && found.security_context == ours.security_context
        && found.resources == ours.resources
}

fn bin_volume() -> Volume {
    Volume {
        name: BIN_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(RUNTIME_DIR_LIMIT.into())),
        }),
        ..Default::default()
    }
}

fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: TOKEN_FILE.into(),
                }),
                ..Default::default()
            }]),
            default_mode: None,
        }),
        ..Default::default()
    }
}

/// Ours, as far as what we set goes (`defaultMode` is defaulted by the API server).
fn same_volume(found: &Volume, ours: &Volume) -> bool {
    let mut found = found.clone();
    if let Some(p) = found.projected.as_mut() {
        p.default_mode = None;
    }
    found == *ours
}

/// `command` becomes `<wrapper> exec -- <entrypoint>`; args stay. Returns where the args start in
/// the wrapper's argv after `--`, and whether the container was wrapped just now.
fn wrap_command(
    container: &mut Container,
    base: &[String; 3],
    settings: &RuntimeSettings,
    patch: &mut JsonPatch,
) -> Result<(usize, bool), RuntimeError> {
    let prefix = wrapper_prefix();
    if let Some(command) = &container.command {
        if command.len() >= prefix.len() && command.iter().zip(prefix).all(|(a, b)| a == b) {
            return Ok((command.len() - prefix.len(), false));
        }
    }
    let path = |tail: &'static str| base.iter().map(String::as_str).chain([tail]);
    let own = container.command.clone().filter(|c| !c.is_empty());
    let entrypoint = match own {
        Some(command) => command,
        None => {
            let image = container.image.as_deref().unwrap_or_default();
            let rule =
                settings
                    .entrypoint_for(image)
                    .ok_or_else(|| RuntimeError::UnknownEntrypoint {
                        container: refs::shown_name(&container.name),
                        image: shown_image(image),
                    })?;
            if container.args.is_none() {
                let args = rule
                    .default_args
                    .clone()
                    .ok_or_else(|| RuntimeError::UnknownArgs {
                        container: refs::shown_name(&container.name),
                        image: shown_image(image),
                    })?;
                patch.add(path("args"), &args);
                container.args = Some(args);
            }
            rule.command.clone()
        }
    };
    let args_at = entrypoint.len();
    let mut command: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    command.extend(entrypoint);
    if container.command.is_some() {
        patch.replace(path("command"), &command);
    } else {
        patch.add(path("command"), &command);
    }
    container.command = Some(command);
    Ok((args_at, true))
}

/// An image reference from a pod spec, for a message: quoted when it looks like one.
fn shown_image(image: &str) -> String {
    let plain = !image.is_empty()
        && image.len() <= 255
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'));
    if plain {
        format!("{image:?}")
    } else {
        format!("({})", refs::shape(image))
    }
}

fn mount(
    container: &mut Container,
    base: &[String; 3],
    patch: &mut JsonPatch,
) -> Result<(), RuntimeError> {
    for (volume, path, read_only, what) in [
        (BIN_VOLUME, RUNTIME_DIR, None, "wrapper directory"),
        (TOKEN_VOLUME, TOKEN_DIR, Some(true), "token"),
    ] {
        let ours = VolumeMount {
            name: volume.into(),
            mount_path: path.into(),
            read_only,
            ..Default::default()
        };
        let mounts_path = base.iter().map(String::as_str).chain(["volumeMounts"]);
        let Some(mounts) = container.volume_mounts.as_mut() else {
            patch.add(mounts_path, &[&ours]);
            container.volume_mounts = Some(vec![ours]);
            continue;
        };
        if let Some(i) = mounts.iter().position(|m| m.name == volume) {
            if mounts[i] != ours {
                let index = i.to_string();
                patch.replace(mounts_path.chain([index.as_str()]), &ours);
                mounts[i] = ours;
            }
            continue;
        }
        if mounts
            .iter()
            .any(|m| m.mount_path.trim_end_matches('/') == path)
        {
            return Err(RuntimeError::MountPathTaken {
                container: refs::shown_name(&container.name),
                path,
                what,
            });
        }
        patch.add(mounts_path.chain(["-"]), &ours);
        mounts.push(ours);
    }
    Ok(())
}

/// The pod's own items for the runtime env secrets go (the reference wins, with a warning); the
/// wrapper's settings are set (they belong to the webhook).
fn set_env(
    container: &mut Container,
    base: &[String; 3],
    env: &BTreeMap<String, SecretObject>,
    broker: &str,
    ca: &str,
    patch: &mut JsonPatch,
    warnings: &mut Vec<String>,
) {
    let env_path = |tail: Option<&str>| {
        base.iter()
            .map(String::as_str)
            .chain(["env"])
            .chain(tail)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let plain = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    let wanted = [
        plain(ENV_BROKER, broker),
        plain(ENV_BROKER_CA, ca),
        plain(ENV_CONTAINER, &container.name),
        EnvVar {
            name: ENV_POD_UID.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".into()),
                    field_path: "metadata.uid".into(),
                }),
                ..Default::default()
            }),
        },
    ];
    let items = container.env.get_or_insert_with(Vec::new);
    let mut replaced: BTreeSet<&str> = BTreeSet::new();
    // Removed back to front, so the indices of the operations stay right.
    for i in (0..items.len()).rev() {
        let name = items[i].name.as_str();
        let ours = wanted.iter().find(|w| w.name == name);
        let stale = match ours {
            Some(w) => items[i] != *w || items.iter().filter(|e| e.name == name).count() > 1,
            None => env.contains_key(name),
        };
        if !stale {
            continue;
        }
        if let Some((key, secret)) = env.get_key_value(name) {
            if replaced.insert(key.as_str()) {
                warnings.push(super::warning(format!(
                    "env {key}: the secret reference {secret} replaces the value set in the pod"
                )));
            }
        }
        let index = i.to_string();
        let path = env_path(Some(&index));
        patch.remove(path.iter().map(String::as_str));
        items.remove(i);
    }
    for w in wanted {
        if items.iter().any(|e| e.name == w.name) {
            continue;
        }
        // `add` of the whole list also stands when the pod has none yet.
        if items.is_empty() {
            patch.add(env_path(None).iter().map(String::as_str), &[&w]);
        } else {
            patch.add(env_path(Some("-")).iter().map(String::as_str), &w);
        }
        items.push(w);
    }
}

/// Warnings given when a container is wrapped: plain `--conf` values of referenced keys (the
/// wrapper drops them, the reference wins) and keys Spark would show in its UI.
fn conf_warnings(
    container: &Container,
    confs_via: Option<ConfsVia>,
    confs: &BTreeMap<String, SecretObject>,
    warnings: &mut Vec<String>,
) {
    let keys: BTreeSet<&str> = confs.keys().map(String::as_str).collect();
    let plain = match confs_via {
        Some(ConfsVia::SparkSubmit) => container
            .args
            .as_deref()
            .is_some_and(|args| drop_confs(args, &keys).1 > 0),
        Some(ConfsVia::PysparkSubmitArgs) => container
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == super::PYSPARK_SUBMIT_ARGS)
            .filter_map(|e| e.value.as_deref())
            .filter_map(shlex::split)
            .any(|tokens| drop_confs(&tokens, &keys).1 > 0),
        None => false,
    };
    if plain {
        warnings.push(super::warning(
            "a --conf in the pod was replaced by its secret reference".to_owned(),
        ));
    }
    for key in keys {
        if !super::spark_redacts(key) {
            warnings.push(super::warning(format!(
                "Spark conf {key} does not match spark.redaction.regex: its value may show in the Spark UI"
            )));
        }
    }
}

/// `args` without `--conf k=v`, `-c k=v` and `--conf=k=v` for the keys in `keys`, and how many
/// were dropped. spark-submit keeps the last value of a key and `--conf` beats a properties file,
/// so a plain value left in the args would win over the reference.
pub fn drop_confs(args: &[String], keys: &BTreeSet<&str>) -> (Vec<String>, usize) {
    let ours = |kv: &str| kv.split_once('=').is_some_and(|(k, _)| keys.contains(k));
    let mut rest = Vec::with_capacity(args.len());
    let mut dropped = 0;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if (arg == "--conf" || arg == "-c") && args.get(i + 1).is_some_and(|kv| ours(kv)) {
            dropped += 1;
            i += 2;
            continue;
        }
        if arg.strip_prefix("--conf=").is_some_and(ours) {
            dropped += 1;
        } else {
            rest.push(arg.clone());
        }
        i += 1;
    }
    (rest, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::{Source, SourceType};
    use crate::workload::{Selectors, classify};

    const DRIVER: &str = include_str!("../../tests/fixtures/pods/spark35-driver-submit.json");

    fn settings() -> RuntimeSettings {
        RuntimeSettings {
            image: Some("registry.example/secrets-webhook:1.0".into()),
            broker_ca: Some("-----BEGIN CERTIFICATE-----\n...\n".into()),
            ..RuntimeSettings::default()
        }
    }

    fn reference(kind: TargetKind, name: &str, key: &str) -> Reference {
        Reference {
            kind,
            name: name.into(),
            secret: SecretObject {
                key: key.into(),
                source: Source {
                    kind: SourceType::Vault,
                    id: "vault-prod".into(),
                },
            },
            origin: "env.secrets.iomete.com/X".into(),
        }
    }

    fn wire_pod(
        pod: &Pod,
        refs: &[Reference],
        settings: &RuntimeSettings,
    ) -> Result<Wired, RuntimeError> {
        let workload = classify(pod, &Selectors::default()).unwrap().unwrap();
        let refs: Vec<&Reference> = refs.iter().collect();
        wire(Inputs {
            pod,
            workload: &workload,
            refs: &refs,
            driver: None,
            settings,
        })
    }

    fn driver() -> Pod {
        serde_json::from_str(DRIVER).unwrap()
    }

    fn apply(pod: &Pod, patch: &JsonPatch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &patch.operations().unwrap()).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn a_spark_driver_is_wired_to_fetch_its_values_and_a_second_pass_changes_nothing() {
        let pod = driver();
        let refs = [
            reference(TargetKind::Env, "DB_PASSWORD", "db_password"),
            reference(
                TargetKind::SparkConf,
                "spark.hadoop.fs.s3a.secret.key",
                "s3",
            ),
        ];
        let wired = wire_pod(&pod, &refs, &settings()).unwrap();
        let patched = apply(&pod, &wired.patch);
        assert_eq!(patched, wired.pod, "the patch makes the wired pod");
        let spec = patched.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        assert_eq!(
            c.command.as_deref().unwrap(),
            [WRAPPER, "exec", "--", "/opt/entrypoint.sh"]
        );
        assert_eq!(c.args.as_ref().unwrap()[0], "driver");
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.name, INSTALL_CONTAINER);
        assert_eq!(
            init.image.as_deref(),
            Some("registry.example/secrets-webhook:1.0")
        );
        assert_eq!(
            init.command.as_deref().unwrap(),
            [IMAGE_BINARY, "copy-self", WRAPPER]
        );
        let volumes = spec.volumes.as_ref().unwrap();
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some(TOKEN_AUDIENCE));
        assert!(projection.expiration_seconds.unwrap() <= 600);
        let bin = volumes.iter().find(|v| v.name == BIN_VOLUME).unwrap();
        assert_eq!(
            bin.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        // The plan names references only; nothing in the pod is a value.
        let plan = &wired.plan;
        let container = plan.container("spark-kubernetes-driver").unwrap();
        assert_eq!(container.env["DB_PASSWORD"].key, "db_password");
        assert_eq!(
            container.spark_confs["spark.hadoop.fs.s3a.secret.key"].key,
            "s3"
        );
        assert_eq!(container.args_at, 1);
        assert_eq!(
            RuntimePlan::from_annotation(&plan.to_annotation()).as_ref(),
            Some(plan)
        );
        // Reinvoked on the wired pod: nothing more to do, the same plan.
        let again = wire_pod(&patched, &refs, &settings()).unwrap();
        assert!(again.patch.is_empty(), "{:?}", again.patch);
        assert_eq!(again.plan, wired.plan);
    }

    #[test]
    fn an_image_without_a_known_entrypoint_is_denied_with_the_fix() {
        let mut pod = driver();
        pod.spec.as_mut().unwrap().containers[0].image = Some("example.com/custom/spark:1".into());
        let refs = [reference(TargetKind::Env, "DB_PASSWORD", "db_password")];
        let e = wire_pod(&pod, &refs, &settings()).unwrap_err();
        assert!(matches!(e, RuntimeError::UnknownEntrypoint { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("set the container's command"), "{text}");
        assert!(text.contains("runtime.entrypoints"), "{text}");
        // With a command of its own, the table is not needed.
        pod.spec.as_mut().unwrap().containers[0].command = Some(vec!["/opt/entrypoint.sh".into()]);
        let wired = wire_pod(&pod, &refs, &settings()).unwrap();
        assert_eq!(
            wired.pod.spec.unwrap().containers[0]
                .command
                .as_deref()
                .unwrap(),
            [WRAPPER, "exec", "--", "/opt/entrypoint.sh"]
        );
        // An admin's entry for the image works too.
        let mut pod = driver();
        pod.spec.as_mut().unwrap().containers[0].image = Some("example.com/custom/spark:1".into());
        let mut own = settings();
        own.entrypoints.insert(
            0,
            EntrypointRule {
                image: "example.com/custom/*".into(),
                command: vec!["/entry".into()],
                default_args: None,
            },
        );
        assert!(wire_pod(&pod, &refs, &own).is_ok());
    }

    #[test]
    fn confs_spark_copies_into_executor_pods_are_denied_in_runtime_mode() {
        for key in [
            "spark.executorEnv.DB_PASSWORD",
            "spark.authenticate.secret",
            "spark.ssl.keyPassword",
            "spark.kubernetes.executor.secrets.x",
        ] {
            let refs = [reference(TargetKind::SparkConf, key, "k")];
            let e = wire_pod(&driver(), &refs, &settings()).unwrap_err();
            assert!(
                matches!(e, RuntimeError::CopiedToExecutors { .. }),
                "{key}: {e}"
            );
            assert!(e.to_string().contains("stored in etcd"), "{e}");
        }
        assert!(copied_into_executor_pods("spark.sql.catalog.token").is_none());
    }

    #[test]
    fn without_the_webhooks_image_or_ca_runtime_references_are_denied() {
        let refs = [reference(TargetKind::Env, "DB_PASSWORD", "db_password")];
        for settings in [
            RuntimeSettings {
                image: None,
                ..settings()
            },
            RuntimeSettings {
                broker_ca: None,
                ..settings()
            },
        ] {
            let e = wire_pod(&driver(), &refs, &settings).unwrap_err();
            assert!(matches!(e, RuntimeError::NotConfigured { .. }), "{e}");
            assert!(e.to_string().contains("delivery: materialize"), "{e}");
        }
    }
}
