//! A real fixture pod, mutated structurally by the fuzzer, through the engine's pure core:
//! `classify`, `parse_annotations`, `legacy_keys`, `plan`. When `plan` succeeds, its patch must
//! apply to the pod's JSON, the result must still be a Pod, and planning the result again must
//! give an empty patch. Nothing may panic.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use secrets_webhook::workload::{
    CONTAINERS_ANNOTATION, INJECT_LABEL, SPARK_ROLE, WorkloadKind, classify,
};
use secrets_webhook::backends::KeyRef;
use secrets_webhook::config::Selectors;
use secrets_webhook::plan::{
    Inputs, PYSPARK_SUBMIT_ARGS, Resolved, generated_name, legacy_keys, plan,
};
use secrets_webhook::refs::{
    ENV_SECRETS, ENV_SHORT_PREFIX, SPARK_CONF_SECRETS, SPARK_CONF_SHORT_PREFIX, SecretObject,
    Source, SourceType, TargetKind, parse_annotations,
};
use serde_json::{Value, json};

const FIXTURE_TEXT: [&str; 3] = [
    include_str!("../../tests/fixtures/pods/spark35-driver-submit.json"),
    include_str!("../../tests/fixtures/pods/spark35-executor-submit.json"),
    include_str!("../../tests/fixtures/pods/jupyterhub-singleuser-z2jh.json"),
];
const GLOBAL_ID: &str = "global";

/// The fixtures parsed once: the pod JSON is what the fuzzer mutates.
static FIXTURES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    FIXTURE_TEXT
        .iter()
        .map(|t| serde_json::from_str(t).expect("fixture"))
        .collect()
});
const GLOBAL_STORE: &str = "iomete-secret-store";

/// A small vocabulary, so names collide with each other and with what the planner generates.
#[derive(Arbitrary, Debug, Clone)]
enum Name {
    A,
    B,
    Pyspark,
    Generated,
    /// Exactly the variable `${secrets.k}` becomes.
    GeneratedK,
    SparkUser,
    Any(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::A => "A".into(),
            Name::B => "B_2".into(),
            Name::Pyspark => PYSPARK_SUBMIT_ARGS.into(),
            // What `${secrets.k}` becomes (IOMETE_SECRET_ + sha256 of KUBERNETES, global, k).
            Name::Generated => "IOMETE_SECRET_".into(),
            Name::GeneratedK => generated_name(
                "IOMETE_SECRET_",
                &SecretObject {
                    key: "k".into(),
                    source: Source {
                        kind: SourceType::Kubernetes,
                        id: GLOBAL_ID.into(),
                    },
                },
            ),
            Name::SparkUser => "SPARK_USER".into(),
            Name::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Part {
    Text(String),
    Placeholder(SecretKey),
    /// `$$`, the kubelet's escape.
    Dollars,
    /// `$${secrets.k}`: literal text to the kubelet.
    Escaped(SecretKey),
    Open,
    Close,
    Conf(Name, SecretKey),
}

#[derive(Arbitrary, Debug, Clone)]
enum SecretKey {
    K,
    Dotted,
    Any(String),
}

impl SecretKey {
    fn text(&self) -> String {
        match self {
            SecretKey::K => "k".into(),
            SecretKey::Dotted => "a.b-c_d".into(),
            SecretKey::Any(s) => s.clone(),
        }
    }
}

fn compose(parts: &[Part]) -> String {
    let mut s = String::new();
    for p in parts {
        match p {
            Part::Text(t) => s.push_str(t),
            Part::Placeholder(k) => s.push_str(&format!("${{secrets.{}}}", k.text())),
            Part::Dollars => s.push_str("$$"),
            Part::Escaped(k) => s.push_str(&format!("$${{secrets.{}}}", k.text())),
            Part::Open => s.push_str("${secrets."),
            Part::Close => s.push('}'),
            Part::Conf(n, k) => s.push_str(&format!(" --conf spark.{}={} ", n.text(), k.text())),
        }
    }
    s
}

#[derive(Arbitrary, Debug, Clone)]
enum Target {
    Env(Name),
    Conf(Name),
}

#[derive(Arbitrary, Debug, Clone)]
struct Ref {
    target: Target,
    vault: bool,
    domain: bool,
    key: SecretKey,
    json: bool,
}

#[derive(Arbitrary, Debug, Clone)]
enum Edit {
    AddEnv {
        init: bool,
        container: u8,
        at: u8,
        name: Name,
        value: Vec<Part>,
    },
    AddEnvFromSecret {
        init: bool,
        container: u8,
        name: Name,
        store: bool,
    },
    DropEnv {
        init: bool,
        container: u8,
    },
    SetArgs {
        init: bool,
        container: u8,
        args: Vec<Vec<Part>>,
    },
    PushArg {
        init: bool,
        container: u8,
        arg: Vec<Part>,
    },
    DropArgs {
        init: bool,
        container: u8,
    },
    AddContainer {
        init: bool,
        name: Name,
        driver: bool,
    },
    Reference(Ref),
    Annotation {
        key: String,
        value: String,
    },
    DropAnnotations,
    Label {
        key: LabelKey,
        value: String,
    },
    Containers(Vec<u8>),
    ContainersRaw(String),
}

#[derive(Arbitrary, Debug, Clone)]
enum LabelKey {
    SparkRole,
    Inject,
    Component,
    Workload,
    Any(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    fixture: u8,
    edits: Vec<Edit>,
    user: String,
}

fn containers<'a>(pod: &'a mut Value, init: bool) -> &'a mut Vec<Value> {
    let field = if init { "initContainers" } else { "containers" };
    if !pod["spec"][field].is_array() {
        pod["spec"][field] = json!([]);
    }
    pod["spec"][field].as_array_mut().expect("an array")
}

fn container<'a>(pod: &'a mut Value, init: bool, index: u8) -> Option<&'a mut Value> {
    let list = containers(pod, init);
    if list.is_empty() {
        return None;
    }
    let n = list.len();
    list.get_mut(usize::from(index) % n)
}

fn annotations(pod: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !pod["metadata"]["annotations"].is_object() {
        pod["metadata"]["annotations"] = json!({});
    }
    pod["metadata"]["annotations"]
        .as_object_mut()
        .expect("an object")
}

fn add_reference(pod: &mut Value, r: &Ref) {
    let (kind, name) = match &r.target {
        Target::Env(n) => (TargetKind::Env, n.text()),
        Target::Conf(n) => (TargetKind::SparkConf, format!("spark.{}", n.text())),
    };
    let (source, id) = match (r.vault, r.domain) {
        (true, _) => ("vault", "vault-prod"),
        (false, true) => ("kubernetes", "finance"),
        (false, false) => ("kubernetes", GLOBAL_ID),
    };
    let key = r.key.text();
    let ann = annotations(pod);
    if r.json {
        let list = if kind == TargetKind::Env {
            ENV_SECRETS
        } else {
            SPARK_CONF_SECRETS
        };
        let mut items: Vec<Value> = ann
            .get(list)
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        items.push(json!({"key": name, "secretObject": {"key": key,
            "source": {"type": source.to_uppercase(), "id": id}}}));
        ann.insert(list.into(), json!(Value::Array(items).to_string()));
    } else {
        let prefix = if kind == TargetKind::Env {
            ENV_SHORT_PREFIX
        } else {
            SPARK_CONF_SHORT_PREFIX
        };
        ann.insert(
            format!("{prefix}{name}"),
            json!(format!("{source}:{id}/{key}")),
        );
    }
}

fn apply(pod: &mut Value, edit: &Edit) {
    match edit {
        Edit::AddEnv {
            init,
            container: c,
            at,
            name,
            value,
        } => {
            if let Some(c) = container(pod, *init, *c) {
                if !c["env"].is_array() {
                    c["env"] = json!([]);
                }
                let env = c["env"].as_array_mut().expect("an array");
                let at = usize::from(*at) % (env.len() + 1);
                env.insert(at, json!({"name": name.text(), "value": compose(value)}));
            }
        }
        Edit::AddEnvFromSecret {
            init,
            container: c,
            name,
            store,
        } => {
            if let Some(c) = container(pod, *init, *c) {
                if !c["env"].is_array() {
                    c["env"] = json!([]);
                }
                let secret = if *store { GLOBAL_STORE } else { "other" };
                c["env"]
                    .as_array_mut()
                    .expect("an array")
                    .push(json!({"name": name.text(),
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}));
            }
        }
        Edit::DropEnv { init, container: c } => {
            if let Some(c) = container(pod, *init, *c).and_then(Value::as_object_mut) {
                c.remove("env");
            }
        }
        Edit::SetArgs {
            init,
            container: c,
            args,
        } => {
            if let Some(c) = container(pod, *init, *c) {
                c["args"] = args.iter().map(|a| compose(a)).collect();
            }
        }
        Edit::PushArg {
            init,
            container: c,
            arg,
        } => {
            if let Some(c) = container(pod, *init, *c) {
                if !c["args"].is_array() {
                    c["args"] = json!([]);
                }
                c["args"]
                    .as_array_mut()
                    .expect("an array")
                    .push(json!(compose(arg)));
            }
        }
        Edit::DropArgs { init, container: c } => {
            if let Some(c) = container(pod, *init, *c).and_then(Value::as_object_mut) {
                c.remove("args");
            }
        }
        Edit::AddContainer { init, name, driver } => {
            let mut c = json!({"name": name.text(), "image": "x"});
            if *driver {
                c["args"] = json!(["driver"]);
            }
            containers(pod, *init).push(c);
        }
        Edit::Reference(r) => add_reference(pod, r),
        Edit::Annotation { key, value } => {
            annotations(pod).insert(key.clone(), json!(value));
        }
        Edit::DropAnnotations => {
            if let Some(m) = pod["metadata"].as_object_mut() {
                m.remove("annotations");
            }
        }
        Edit::Label { key, value } => {
            let key = match key {
                LabelKey::SparkRole => SPARK_ROLE.to_owned(),
                LabelKey::Inject => INJECT_LABEL.to_owned(),
                LabelKey::Component => "component".to_owned(),
                LabelKey::Workload => "secrets.iomete.com/workload".to_owned(),
                LabelKey::Any(s) => s.clone(),
            };
            if !pod["metadata"]["labels"].is_object() {
                pod["metadata"]["labels"] = json!({});
            }
            pod["metadata"]["labels"][key] = json!(value);
        }
        Edit::Containers(picks) => {
            let mut names: Vec<String> = Vec::new();
            for p in picks {
                let init = p & 0x80 != 0;
                if let Some(c) = container(pod, init, p & 0x7f) {
                    names.push(c["name"].as_str().unwrap_or_default().to_owned());
                }
            }
            annotations(pod).insert(CONTAINERS_ANNOTATION.into(), json!(names.join(",")));
        }
        Edit::ContainersRaw(s) => {
            annotations(pod).insert(CONTAINERS_ANNOTATION.into(), json!(s));
        }
    }
}

/// The engine's planning step, as `Webhook::admit` does it once the stores and grants say yes.
/// `None` when the pod is not planned (not ours, or a denial).
fn plan_pod(pod: &Pod, user: &str) -> Option<(json_patch::Patch, WorkloadKind)> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let refs = parse_annotations(annotations, GLOBAL_ID);
    let workload = classify(pod, &Selectors::default());
    let legacy = workload
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .map(|w| legacy_keys(pod, w));
    let (Ok(refs), Ok(Some(workload)), Some(Ok(legacy))) = (refs, workload, legacy) else {
        return None;
    };
    if refs.is_empty() && legacy.is_empty() {
        return Some((json_patch::Patch(Vec::new()), workload.kind));
    }
    let refs: Vec<_> = refs
        .into_iter()
        .filter(|r| {
            !(workload.kind == WorkloadKind::SparkExecutor && r.kind == TargetKind::SparkConf)
        })
        .collect();
    let resolved = |kind| -> Vec<Resolved> {
        refs.iter()
            .filter(|r| r.kind == kind)
            .map(|r| Resolved {
                name: r.name.clone(),
                secret: r.secret.clone(),
                key_ref: KeyRef {
                    secret: format!("store-{}", r.secret.source.id),
                    key: r.secret.key.clone(),
                },
            })
            .collect()
    };
    let env = resolved(TargetKind::Env);
    let confs = resolved(TargetKind::SparkConf);
    let granted: BTreeSet<String> = refs.iter().map(|r| r.secret.to_string()).collect();
    let stamps = BTreeMap::from([
        ("secrets.iomete.com/identity".to_owned(), user.to_owned()),
        (
            "secrets.iomete.com/granted".to_owned(),
            granted.into_iter().collect::<Vec<_>>().join(","),
        ),
    ]);
    let planned = plan(
        Inputs {
            pod,
            workload: &workload,
            env: &env,
            spark_confs: &confs,
            global_store: GLOBAL_STORE,
            stamps: &stamps,
        },
        GLOBAL_ID,
    )
    .ok()?;
    for w in &planned.warnings {
        assert!(w.len() <= 4 * 120, "warning of {} bytes", w.len());
    }
    let patch = planned
        .patch
        .operations()
        .expect("the planned patch is a JSON Patch document");
    Some((patch, workload.kind))
}

fuzz_target!(|input: Input| {
    let mut json = FIXTURES[usize::from(input.fixture) % FIXTURES.len()].clone();
    for edit in &input.edits {
        apply(&mut json, edit);
    }
    let Ok(pod) = serde_json::from_value::<Pod>(json.clone()) else {
        return;
    };
    let Some((patch, kind)) = plan_pod(&pod, &input.user) else {
        return;
    };
    let mut patched = json.clone();
    if let Err(e) = json_patch::patch(&mut patched, &patch) {
        panic!(
            "the patch does not apply: {e}\npatch: {}",
            serde_json::to_string(&patch).unwrap_or_default()
        );
    }
    let again: Pod =
        serde_json::from_value(patched.clone()).expect("the patched pod is still a Pod");
    let (second, kind_again) =
        plan_pod(&again, &input.user).expect("the patched pod is planned again without denial");
    assert_eq!(kind, kind_again, "the patch changed the workload kind");
    assert!(
        second.0.is_empty(),
        "planning the patched pod again is not a no-op: {}",
        serde_json::to_string(&second).unwrap_or_default()
    );
});
