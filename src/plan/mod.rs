//! The pure planner: (pod, workload, resolved references, stamps) -> JSON Patch and warnings.
//! No I/O. Every edit is recorded as a JSON Patch operation against a working copy of the
//! container's env, so indices stay right, untouched env items are never rewritten, and a second
//! pass over the planner's own output finds nothing to do.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{Container, EnvVar, EnvVarSource, Pod, SecretKeySelector};
use sha2::{Digest, Sha256};

use crate::admission::workload::{Slot, Workload, WorkloadKind, first_arg};
use crate::backends::KeyRef;
use crate::refs::{self, Piece, PlaceholderError, SecretObject, SourceType};

mod patch;
pub use patch::{JsonPatch, PatchError};

/// Whether Spark's default `spark.redaction.regex`, `(?i)secret|password|token|access[.]?key`,
/// hides this conf key in its UI and logs. Java's `(?i)` folds ASCII case only, as here.
fn spark_redacts(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "password", "token", "accesskey", "access.key"]
        .iter()
        .any(|word| key.contains(word))
}

/// Env var PySpark reads its spark-submit arguments from.
pub const PYSPARK_SUBMIT_ARGS: &str = "PYSPARK_SUBMIT_ARGS";
/// Kubernetes' longest warning that is never truncated is 120 characters.
const WARNING_MAX: usize = 120;

/// A reference the engine has checked, authorized and resolved to a Secret key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Env var name or Spark conf key.
    pub name: String,
    pub secret: SecretObject,
    pub key_ref: KeyRef,
}

/// What the planner is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub pod: &'a Pod,
    pub workload: &'a Workload,
    pub env: &'a [Resolved],
    pub spark_confs: &'a [Resolved],
    /// The global store: legacy placeholders resolve there.
    pub global_store: &'a str,
    /// Annotations the webhook owns and sets on every pod it mutates.
    pub stamps: &'a BTreeMap<String, String>,
}

/// The result: a patch (empty when the pod is already as wanted) and warnings for the client.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub patch: JsonPatch,
    pub warnings: Vec<String>,
    /// Every Secret key the planned pod reads from a managed store (the guard's allow-list).
    pub wanted: BTreeSet<KeyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
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
        "container {0}: {PYSPARK_SUBMIT_ARGS} is not a plain value, so Spark conf secrets cannot be added to it; \
         set it as a plain value or remove it"
    )]
    PysparkArgsNotPlain(String),
    #[error("container {0}: {PYSPARK_SUBMIT_ARGS} has unbalanced quotes; fix its quoting")]
    PysparkArgsUnparsable(String),
    #[error(
        "container {container}, {place}: {error}; write ${{secrets.<key>}} with a key of the global store"
    )]
    Placeholder {
        container: String,
        place: String,
        error: PlaceholderError,
    },
}

/// The global-store keys named by legacy placeholders in the env targets (env values and args).
pub fn legacy_keys(pod: &Pod, workload: &Workload) -> Result<BTreeSet<String>, PlanError> {
    let mut keys = BTreeSet::new();
    for container in target_containers(pod, workload) {
        for (place, text) in placeholder_sites(container) {
            for piece in split(container, &place, text)? {
                if let Piece::Placeholder(key) = piece {
                    keys.insert(key.to_owned());
                }
            }
        }
    }
    Ok(keys)
}

fn target_containers<'a>(
    pod: &'a Pod,
    workload: &'a Workload,
) -> impl Iterator<Item = &'a Container> {
    let spec = pod.spec.as_ref();
    workload
        .env_targets
        .iter()
        .filter_map(move |slot| spec.and_then(|s| slot.get(s)))
}

/// Every env value and arg of `container` that may hold a placeholder, with a name for messages.
fn placeholder_sites(container: &Container) -> impl Iterator<Item = (String, &str)> {
    let env = container.env.iter().flatten().filter_map(|e| {
        let value = e.value.as_deref()?;
        refs::has_placeholder(value).then(|| (format!("env {}", refs::shown_name(&e.name)), value))
    });
    let args = container.args.iter().flatten().enumerate();
    let args = args
        .filter(|(_, a)| refs::has_placeholder(a))
        .map(|(i, a)| (format!("args[{i}]"), a.as_str()));
    env.chain(args)
}

fn split<'a>(
    container: &Container,
    place: &str,
    text: &'a str,
) -> Result<Vec<Piece<'a>>, PlanError> {
    refs::split_placeholders(text).map_err(|error| PlanError::Placeholder {
        container: refs::shown_name(&container.name),
        place: place.to_owned(),
        error,
    })
}

/// Deterministic env var name for a secret: `{prefix}{12 hex digits of sha256(type, id, key)}`.
pub fn generated_name(prefix: &str, secret: &SecretObject) -> String {
    let kind = match secret.source.kind {
        SourceType::Kubernetes => "KUBERNETES",
        SourceType::Vault => "VAULT",
    };
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update([0])
        .chain_update(&secret.source.id)
        .chain_update([0])
        .chain_update(&secret.key)
        .finalize();
    // Written into one buffer: a `format!` per byte was a visible share of every admission.
    let mut name = String::with_capacity(prefix.len() + 12);
    name.push_str(prefix);
    for b in &digest[..6] {
        let _ = write!(name, "{b:02X}");
    }
    name
}

/// Env var a Spark conf secret travels in.
pub fn spark_var(secret: &SecretObject) -> String {
    generated_name("SPARK_SECRET_", secret)
}

fn legacy_var(global_id: &str, key: &str, global_store: &str) -> (String, KeyRef) {
    let secret = SecretObject {
        key: key.to_owned(),
        source: refs::Source {
            kind: SourceType::Kubernetes,
            id: global_id.to_owned(),
        },
    };
    let key_ref = KeyRef {
        secret: global_store.to_owned(),
        key: key.to_owned(),
    };
    (generated_name("IOMETE_SECRET_", &secret), key_ref)
}

fn secret_var(name: &str, key_ref: &KeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: key_ref.secret.clone(),
                key: key_ref.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

fn warning(text: String) -> String {
    if text.len() <= WARNING_MAX {
        return text;
    }
    let mut end = WARNING_MAX - 1;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The JSON Pointer tokens of `tail` inside a container's env.
fn env_path<'t>(container: &'t [String; 3], tail: &'t [&'t str]) -> impl Iterator<Item = &'t str> {
    let base = container.iter().map(String::as_str);
    base.chain(["env"]).chain(tail.iter().copied())
}

/// A container's env under edit: every change is applied to the copy and recorded as an op.
struct EnvEditor<'a> {
    /// `spec`, `containers` or `initContainers`, the index.
    path: [String; 3],
    env: Vec<EnvVar>,
    /// Generated variables already declared, so each is looked up once even on huge env lists.
    declared: HashSet<String>,
    present: bool,
    ops: &'a mut JsonPatch,
}

impl<'a> EnvEditor<'a> {
    fn new(slot: Slot, container: &Container, ops: &'a mut JsonPatch) -> Self {
        Self {
            path: ["spec".into(), slot.field().into(), slot.index.to_string()],
            env: container.env.clone().unwrap_or_default(),
            declared: HashSet::new(),
            present: container.env.is_some(),
            ops,
        }
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.env.iter().position(|e| e.name == name)
    }

    fn insert(&mut self, index: usize, var: EnvVar) {
        if !self.present {
            self.present = true;
            self.ops.add(env_path(&self.path, &[]), &[&var]);
        } else {
            let index_token = if index == self.env.len() {
                "-".to_owned()
            } else {
                index.to_string()
            };
            self.ops.add(env_path(&self.path, &[&index_token]), &var);
        }
        self.env.insert(index, var);
    }

    fn push(&mut self, var: EnvVar) {
        self.insert(self.env.len(), var);
    }

    fn replace(&mut self, index: usize, var: EnvVar) {
        self.ops
            .replace(env_path(&self.path, &[&index.to_string()]), &var);
        self.env[index] = var;
    }

    fn set_value(&mut self, index: usize, value: String) {
        self.ops
            .replace(env_path(&self.path, &[&index.to_string(), "value"]), &value);
        self.env[index].value = Some(value);
    }

    /// Makes sure `name` is declared before position `before` (the kubelet only expands `$(X)`
    /// from earlier vars); returns how many items were inserted in front of `before`.
    fn declare_before(&mut self, before: usize, name: &str, key_ref: &KeyRef) -> usize {
        if !self.declared.insert(name.to_owned()) {
            return 0;
        }
        let desired = secret_var(name, key_ref);
        match self.position(name) {
            Some(i) if i < before && self.env[i] == desired => 0,
            // Generated names belong to the webhook: a pod's own variable of that name (or one
            // declared too late to be expanded) is replaced by the webhook's, before its use.
            Some(i) if i < before => {
                self.replace(i, desired);
                0
            }
            Some(i) => {
                self.remove(i);
                self.insert(before, desired);
                1
            }
            None => {
                self.insert(before, desired);
                1
            }
        }
    }

    fn remove(&mut self, index: usize) {
        self.ops.remove(env_path(&self.path, &[&index.to_string()]));
        self.env.remove(index);
    }
}

/// Plans the mutation. Errors are denials the engine returns as they are.
pub fn plan(input: Inputs<'_>, global_id: &str) -> Result<Plan, PlanError> {
    let workload = input.workload;
    let mut plan = Plan::default();
    let Some(spec) = input.pod.spec.as_ref() else {
        return Ok(plan);
    };
    if !input.spark_confs.is_empty()
        && !matches!(
            workload.kind,
            WorkloadKind::SparkDriver | WorkloadKind::Jupyter
        )
    {
        return Err(PlanError::SparkConfNotSupported(workload.kind));
    }
    let mut slots: Vec<Slot> = workload.env_targets.clone();
    if !input.spark_confs.is_empty() && !slots.contains(&workload.main) {
        slots.push(workload.main);
    }
    let targeted: BTreeSet<&str> = input.env.iter().map(|r| r.name.as_str()).collect();
    for slot in slots {
        let Some(container) = slot.get(spec) else {
            continue;
        };
        let mut ops = JsonPatch::default();
        let mut args = container.args.clone();
        let mut env = EnvEditor::new(slot, container, &mut ops);
        if workload.env_targets.contains(&slot) {
            resolve_env_placeholders(
                &mut env,
                container,
                &targeted,
                input.global_store,
                global_id,
                &mut plan,
            )?;
            if let Some(list) = args.as_mut() {
                resolve_arg_placeholders(
                    &mut env,
                    container,
                    list,
                    input.global_store,
                    global_id,
                    &mut plan,
                )?;
            }
            for r in input.env {
                set_reference(&mut env, r, &mut plan);
            }
        }
        if slot == workload.main && !input.spark_confs.is_empty() {
            if workload.kind == WorkloadKind::SparkDriver {
                add_driver_confs(&mut env, container, &mut args, input.spark_confs, &mut plan)?;
            } else {
                add_pyspark_confs(&mut env, container, input.spark_confs, &mut plan)?;
            }
        }
        if args != container.args {
            let path = ["spec", slot.field(), &slot.index.to_string(), "args"];
            if container.args.is_some() {
                ops.replace(path, &args);
            } else {
                ops.add(path, &args);
            }
        }
        plan.patch.append(ops);
    }
    set_stamps(input.pod, input.stamps, &mut plan);
    Ok(plan)
}

fn resolve_env_placeholders(
    env: &mut EnvEditor<'_>,
    container: &Container,
    targeted: &BTreeSet<&str>,
    global_store: &str,
    global_id: &str,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let mut index = 0;
    while index < env.env.len() {
        let var = &env.env[index];
        let value = match var.value.as_deref() {
            Some(v) if refs::has_placeholder(v) && !targeted.contains(var.name.as_str()) => {
                v.to_owned()
            }
            _ => {
                index += 1;
                continue;
            }
        };
        let name = var.name.clone();
        let pieces = split(container, &format!("env {name:?}"), &value)?;
        if let [Piece::Placeholder(key)] = pieces.as_slice() {
            let key_ref = KeyRef {
                secret: global_store.to_owned(),
                key: (*key).to_owned(),
            };
            plan.wanted.insert(key_ref.clone());
            env.replace(index, secret_var(&name, &key_ref));
            index += 1;
            continue;
        }
        let mut composed = String::with_capacity(value.len());
        for piece in &pieces {
            match piece {
                Piece::Text(text) => composed.push_str(text),
                Piece::Placeholder(key) => {
                    let (var_name, key_ref) = legacy_var(global_id, key, global_store);
                    index += env.declare_before(index, &var_name, &key_ref);
                    plan.wanted.insert(key_ref);
                    composed.push_str(&format!("$({var_name})"));
                }
            }
        }
        // Only escaped `$${secrets.` text: nothing to rewrite.
        if composed != value {
            env.set_value(index, composed);
        }
        index += 1;
    }
    Ok(())
}

fn resolve_arg_placeholders(
    env: &mut EnvEditor<'_>,
    container: &Container,
    args: &mut [String],
    global_store: &str,
    global_id: &str,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    for (i, arg) in args.iter_mut().enumerate() {
        if !refs::has_placeholder(arg) {
            continue;
        }
        let mut composed = String::with_capacity(arg.len());
        for piece in split(container, &format!("args[{i}]"), arg)? {
            match piece {
                Piece::Text(text) => composed.push_str(text),
                Piece::Placeholder(key) => {
                    let (var_name, key_ref) = legacy_var(global_id, key, global_store);
                    env.declare_before(env.env.len(), &var_name, &key_ref);
                    plan.wanted.insert(key_ref);
                    composed.push_str(&format!("$({var_name})"));
                }
            }
        }
        *arg = composed;
    }
    Ok(())
}

/// The reference wins over a plain value (or another source) of the same variable, with a warning.
fn set_reference(env: &mut EnvEditor<'_>, r: &Resolved, plan: &mut Plan) {
    plan.wanted.insert(r.key_ref.clone());
    let desired = secret_var(&r.name, &r.key_ref);
    let existing: Vec<usize> = (0..env.env.len())
        .filter(|&i| env.env[i].name == r.name)
        .collect();
    if existing.is_empty() {
        env.push(desired);
        return;
    }
    let mut replaced = false;
    for i in existing {
        if env.env[i] != desired {
            env.replace(i, desired.clone());
            replaced = true;
        }
    }
    if replaced {
        plan.warnings.push(warning(format!(
            "env {}: the secret reference {} replaces the value set in the pod",
            r.name, r.secret
        )));
    }
}

/// Warnings for conf keys Spark would show in its UI; given only when the confs are (re)written,
/// so a reinvocation does not repeat them.
fn redaction_warnings(confs: &[Resolved], plan: &mut Plan) {
    for r in confs {
        if !spark_redacts(&r.name) {
            plan.warnings.push(warning(format!(
                "Spark conf {} does not match spark.redaction.regex: its value may show in the Spark UI",
                r.name
            )));
        }
    }
}

/// Driver: `--conf key=$(SPARK_SECRET_x)` right after `args[0] == "driver"`; other `--conf` for
/// the same keys are dropped so the reference wins (spark-submit keeps the last one).
fn add_driver_confs(
    env: &mut EnvEditor<'_>,
    container: &Container,
    args: &mut Option<Vec<String>>,
    confs: &[Resolved],
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let Some(list) = args
        .as_mut()
        .filter(|a| a.first().map(String::as_str) == Some("driver"))
    else {
        return Err(PlanError::NoDriverArgs(refs::shown_name(&container.name)));
    };
    debug_assert_eq!(first_arg(container), Some("driver"));
    let ours = conf_args(env, confs, plan);
    let (rest, dropped) = without_confs(&list[1..], confs);
    let mut next = Vec::with_capacity(1 + ours.len() + rest.len());
    next.push("driver".to_owned());
    next.extend(ours.iter().cloned());
    next.extend(rest);
    if dropped
        .iter()
        .any(|pair| !ours.windows(2).any(|w| w == pair.as_slice()))
    {
        plan.warnings.push(warning(
            "a --conf in the driver's args was replaced by its secret reference".to_owned(),
        ));
    }
    if *list != next {
        redaction_warnings(confs, plan);
        *list = next;
    }
    Ok(())
}

/// `--conf`, `key=$(VAR)` pairs, sorted by key; declares each VAR (appended: args see all env).
fn conf_args(env: &mut EnvEditor<'_>, confs: &[Resolved], plan: &mut Plan) -> Vec<String> {
    let mut sorted: Vec<&Resolved> = confs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut args = Vec::with_capacity(sorted.len() * 2);
    for r in sorted {
        let var = spark_var(&r.secret);
        env.declare_before(env.env.len(), &var, &r.key_ref);
        plan.wanted.insert(r.key_ref.clone());
        args.push("--conf".to_owned());
        args.push(format!("{}=$({var})", r.name));
    }
    args
}

/// Drops `--conf k=v`, `-c k=v` and `--conf=k=v` for the keys in `confs`; returns the rest and the
/// dropped pairs (normalized to `--conf`, `k=v`).
fn without_confs(args: &[String], confs: &[Resolved]) -> (Vec<String>, Vec<[String; 2]>) {
    let ours = |kv: &str| {
        confs
            .iter()
            .any(|r| kv.split_once('=').is_some_and(|(k, _)| k == r.name))
    };
    let mut rest = Vec::with_capacity(args.len());
    let mut dropped = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if (arg == "--conf" || arg == "-c") && args.get(i + 1).is_some_and(|kv| ours(kv)) {
            dropped.push(["--conf".to_owned(), args[i + 1].clone()]);
            i += 2;
            continue;
        }
        if let Some(kv) = arg.strip_prefix("--conf=").filter(|kv| ours(kv)) {
            dropped.push(["--conf".to_owned(), kv.to_owned()]);
        } else {
            rest.push(arg.clone());
        }
        i += 1;
    }
    (rest, dropped)
}

/// Jupyter: Spark confs travel in `PYSPARK_SUBMIT_ARGS` (`--conf k=$(X) ... pyspark-shell`), each
/// `X` declared before it.
fn add_pyspark_confs(
    env: &mut EnvEditor<'_>,
    container: &Container,
    confs: &[Resolved],
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let existing = env.position(PYSPARK_SUBMIT_ARGS);
    let current = match existing {
        Some(i) => match (&env.env[i].value, &env.env[i].value_from) {
            (_, Some(_)) => {
                return Err(PlanError::PysparkArgsNotPlain(refs::shown_name(
                    &container.name,
                )));
            }
            (value, None) => value.clone().unwrap_or_default(),
        },
        None => String::new(),
    };
    let tokens = shlex::split(&current)
        .ok_or_else(|| PlanError::PysparkArgsUnparsable(refs::shown_name(&container.name)))?;
    let mut at = existing.unwrap_or(env.env.len());
    let mut sorted: Vec<&Resolved> = confs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ours = Vec::with_capacity(sorted.len() * 2);
    for r in sorted {
        let var = spark_var(&r.secret);
        at += env.declare_before(at, &var, &r.key_ref);
        plan.wanted.insert(r.key_ref.clone());
        ours.push("--conf".to_owned());
        ours.push(format!("{}=$({var})", r.name));
    }
    let (mut rest, _) = without_confs(&tokens, confs);
    let shell = rest.last().map(String::as_str) == Some("pyspark-shell");
    if shell {
        rest.pop();
    }
    let words = rest
        .iter()
        .chain(&ours)
        .map(String::as_str)
        .chain(["pyspark-shell"]);
    let value = shlex::try_join(words)
        .map_err(|_| PlanError::PysparkArgsUnparsable(refs::shown_name(&container.name)))?;
    match existing {
        Some(_) if env.env[at].value.as_deref() == Some(value.as_str()) => return Ok(()),
        Some(_) => env.set_value(at, value),
        None => env.push(EnvVar {
            name: PYSPARK_SUBMIT_ARGS.to_owned(),
            value: Some(value),
            value_from: None,
        }),
    }
    redaction_warnings(confs, plan);
    Ok(())
}

fn set_stamps(pod: &Pod, stamps: &BTreeMap<String, String>, plan: &mut Plan) {
    let current = pod.metadata.annotations.as_ref();
    if current.is_none() {
        if !stamps.is_empty() {
            plan.patch.add(["metadata", "annotations"], stamps);
        }
        return;
    }
    for (key, value) in stamps {
        if current.and_then(|a| a.get(key)) != Some(value) {
            plan.patch
                .add(["metadata", "annotations", key.as_str()], value);
        }
    }
}

#[cfg(test)]
mod tests;
