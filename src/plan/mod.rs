//! The pure planner: (pod, workload, resolved references, stamps) -> JSON Patch and warnings.
//! No I/O. Every edit is recorded as a JSON Patch operation against a working copy of the
//! container's env, so indices stay right, untouched env items are never rewritten, and a second
//! pass over the planner's own output finds nothing to do.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{Container, EnvVar, EnvVarSource, Pod, SecretKeySelector};
use sha2::{Digest, Sha256};

use crate::backends::KeyRef;
use crate::refs::{self, Piece, PlaceholderError, SecretObject, SourceType};
use crate::workload::{Slot, Workload, WorkloadKind};

mod env;
mod patch;
pub use patch::{JsonPatch, PatchError};

use env::{Anchor, EnvEditor, Item};

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
        // `None` while the container's own args stand; copied only when something changes them.
        let mut args: Option<Vec<String>> = None;
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
            if let Some(list) = container.args.as_deref() {
                args = resolve_arg_placeholders(
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
                let current = args.as_deref().or(container.args.as_deref());
                if let Some(next) =
                    add_driver_confs(&mut env, container, current, input.spark_confs, &mut plan)?
                {
                    args = Some(next);
                }
            } else {
                add_pyspark_confs(&mut env, container, input.spark_confs, &mut plan)?;
            }
        }
        if let Some(args) = args.filter(|a| container.args.as_deref() != Some(a.as_slice())) {
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
    // The planner's own additions are secret references, never plain values: only the pod's
    // items can hold placeholders.
    for i in 0..env.pod_len() {
        let item = Item::Pod(i);
        if env.is_removed(item) {
            continue;
        }
        let var = env.get(item);
        let value = match var.value.as_deref() {
            Some(v) if refs::has_placeholder(v) && !targeted.contains(var.name.as_str()) => {
                v.to_owned()
            }
            _ => continue,
        };
        let name = var.name.clone();
        let pieces = split(container, &format!("env {name:?}"), &value)?;
        if let [Piece::Placeholder(key)] = pieces.as_slice() {
            let key_ref = KeyRef {
                secret: global_store.to_owned(),
                key: (*key).to_owned(),
            };
            plan.wanted.insert(key_ref.clone());
            env.replace(item, secret_var(&name, &key_ref));
            continue;
        }
        let mut composed = String::with_capacity(value.len());
        for piece in &pieces {
            match piece {
                Piece::Text(text) => composed.push_str(text),
                Piece::Placeholder(key) => {
                    let (var_name, key_ref) = legacy_var(global_id, key, global_store);
                    env.declare_before(Anchor::Before(item), &var_name, &key_ref);
                    plan.wanted.insert(key_ref);
                    let _ = write!(composed, "$({var_name})");
                }
            }
        }
        // Only escaped `$${secrets.` text: nothing to rewrite. A variable that itself has a
        // generated name was replaced by the webhook's declaration: nothing left to rewrite.
        if composed != value && !env.is_removed(item) {
            env.set_value(item, composed);
        }
    }
    Ok(())
}

/// The args with their placeholders replaced by `$(VAR)`, each VAR declared (appended: args see
/// all env); `None` when no arg changes.
fn resolve_arg_placeholders(
    env: &mut EnvEditor<'_>,
    container: &Container,
    args: &[String],
    global_store: &str,
    global_id: &str,
    plan: &mut Plan,
) -> Result<Option<Vec<String>>, PlanError> {
    let mut changed: Option<Vec<String>> = None;
    for (i, arg) in args.iter().enumerate() {
        if !refs::has_placeholder(arg) {
            continue;
        }
        let mut composed = String::with_capacity(arg.len());
        for piece in split(container, &format!("args[{i}]"), arg)? {
            match piece {
                Piece::Text(text) => composed.push_str(text),
                Piece::Placeholder(key) => {
                    let (var_name, key_ref) = legacy_var(global_id, key, global_store);
                    env.declare_before(Anchor::End, &var_name, &key_ref);
                    plan.wanted.insert(key_ref);
                    let _ = write!(composed, "$({var_name})");
                }
            }
        }
        if composed != *arg {
            changed.get_or_insert_with(|| args.to_vec())[i] = composed;
        }
    }
    Ok(changed)
}

/// The reference wins over a plain value (or another source) of the same variable, with a warning.
fn set_reference(env: &mut EnvEditor<'_>, r: &Resolved, plan: &mut Plan) {
    plan.wanted.insert(r.key_ref.clone());
    let desired = secret_var(&r.name, &r.key_ref);
    let existing = env.all_named(&r.name);
    if existing.is_empty() {
        env.push(desired);
        return;
    }
    let mut replaced = false;
    for item in existing {
        if *env.get(item) != desired {
            env.replace(item, desired.clone());
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
    args: Option<&[String]>,
    confs: &[Resolved],
    plan: &mut Plan,
) -> Result<Option<Vec<String>>, PlanError> {
    let Some(list) = args.filter(|a| a.first().map(String::as_str) == Some("driver")) else {
        return Err(PlanError::NoDriverArgs(refs::shown_name(&container.name)));
    };
    let ours = conf_args(env, confs, plan);
    let (rest, dropped) = without_confs(&list[1..], confs);
    let mut next = Vec::with_capacity(1 + ours.len() + rest.len());
    next.push("driver".to_owned());
    next.extend(ours.iter().cloned());
    next.extend(rest);
    // `ours` is `--conf`, `k=$(VAR)` pairs: a dropped pair is ours when its `k=v` is one of them.
    let kept: HashSet<&str> = ours.iter().skip(1).step_by(2).map(String::as_str).collect();
    if dropped.iter().any(|[_, kv]| !kept.contains(kv.as_str())) {
        plan.warnings.push(warning(
            "a --conf in the driver's args was replaced by its secret reference".to_owned(),
        ));
    }
    if list == next.as_slice() {
        return Ok(None);
    }
    redaction_warnings(confs, plan);
    Ok(Some(next))
}

/// `--conf`, `key=$(VAR)` pairs, sorted by key; declares each VAR (appended: args see all env).
fn conf_args(env: &mut EnvEditor<'_>, confs: &[Resolved], plan: &mut Plan) -> Vec<String> {
    let mut sorted: Vec<&Resolved> = confs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut args = Vec::with_capacity(sorted.len() * 2);
    for r in sorted {
        let var = spark_var(&r.secret);
        env.declare_before(Anchor::End, &var, &r.key_ref);
        plan.wanted.insert(r.key_ref.clone());
        args.push("--conf".to_owned());
        args.push(format!("{}=$({var})", r.name));
    }
    args
}

/// Drops `--conf k=v`, `-c k=v` and `--conf=k=v` for the keys in `confs`; returns the rest and the
/// dropped pairs (normalized to `--conf`, `k=v`).
fn without_confs(args: &[String], confs: &[Resolved]) -> (Vec<String>, Vec<[String; 2]>) {
    let keys: HashSet<&str> = confs.iter().map(|r| r.name.as_str()).collect();
    let ours = |kv: &str| kv.split_once('=').is_some_and(|(k, _)| keys.contains(k));
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
    let current = match existing.map(|item| env.get(item)) {
        Some(var) => match (&var.value, &var.value_from) {
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
    let at = existing.map_or(Anchor::End, Anchor::Before);
    let mut sorted: Vec<&Resolved> = confs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ours = Vec::with_capacity(sorted.len() * 2);
    for r in sorted {
        let var = spark_var(&r.secret);
        env.declare_before(at, &var, &r.key_ref);
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
        Some(item) if env.get(item).value.as_deref() == Some(value.as_str()) => return Ok(()),
        Some(item) => env.set_value(item, value),
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
