//! Which kind of pod this is, and which containers receive secrets (DESIGN §4). Container names
//! are never trusted: pod templates and Enterprise Gateway rename them.

use std::collections::{HashMap, HashSet};
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

/// Label Spark puts on its pods: `driver` or `executor`.
pub const SPARK_ROLE: &str = "spark-role";
/// Opt-in label for any other pod that carries references.
pub const INJECT_LABEL: &str = "secrets.iomete.com/inject";
/// Names (comma-separated) of exactly the containers, init containers included, that get env secrets.
pub const CONTAINERS_ANNOTATION: &str = "secrets.iomete.com/containers";

/// Label selectors that classify Jupyter pods (DESIGN §4); each entry is `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    pub jupyter: Vec<(String, String)>,
}

impl Default for Selectors {
    fn default() -> Self {
        Self {
            jupyter: vec![
                ("component".into(), "singleuser-server".into()),
                ("component".into(), "kernel".into()),
                ("secrets.iomete.com/workload".into(), "jupyter".into()),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    SparkDriver,
    SparkExecutor,
    Jupyter,
    OptedIn,
}

impl WorkloadKind {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::SparkDriver => "spark-driver",
            WorkloadKind::SparkExecutor => "spark-executor",
            WorkloadKind::Jupyter => "jupyter",
            WorkloadKind::OptedIn => "opted-in",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container by position: `spec.containers[i]` or `spec.initContainers[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub init: bool,
    pub index: usize,
}

impl Slot {
    pub fn field(self) -> &'static str {
        if self.init {
            "initContainers"
        } else {
            "containers"
        }
    }

    pub fn get(self, spec: &PodSpec) -> Option<&Container> {
        if self.init {
            spec.init_containers.as_ref()?.get(self.index)
        } else {
            spec.containers.get(self.index)
        }
    }
}

/// How the webhook treats a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// The Spark / notebook container: Spark confs go here.
    pub main: Slot,
    /// Containers that receive env secrets and whose legacy placeholders are resolved.
    pub env_targets: Vec<Slot>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("the pod has no containers")]
    NoContainers,
    #[error(
        "annotation {CONTAINERS_ANNOTATION} names container {0}, which the pod does not have; \
         list existing container names, comma-separated"
    )]
    UnknownContainer(String),
}

/// Classifies a pod; `None` when it is none of ours (no Spark/Jupyter labels, no opt-in).
pub fn classify(pod: &Pod, selectors: &Selectors) -> Result<Option<Workload>, WorkloadError> {
    let labels = pod.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let Some(spec) = pod.spec.as_ref() else {
        return Err(WorkloadError::NoContainers);
    };
    if spec.containers.is_empty() {
        return Err(WorkloadError::NoContainers);
    }
    let is_jupyter = || {
        selectors
            .jupyter
            .iter()
            .any(|(k, v)| label(k) == Some(v.as_str()))
    };
    let (kind, main) = match label(SPARK_ROLE) {
        Some("driver") => (WorkloadKind::SparkDriver, by_first_arg(spec, "driver")),
        Some("executor") => (WorkloadKind::SparkExecutor, by_first_arg(spec, "executor")),
        _ if is_jupyter() => (WorkloadKind::Jupyter, by_name(spec, "notebook")),
        _ if label(INJECT_LABEL) == Some("true") => (WorkloadKind::OptedIn, 0),
        _ => return Ok(None),
    };
    let main = Slot {
        init: false,
        index: main,
    };
    let named = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONTAINERS_ANNOTATION));
    let env_targets = match named {
        Some(names) => named_slots(spec, names)?,
        None => vec![main],
    };
    Ok(Some(Workload {
        kind,
        main,
        env_targets,
    }))
}

/// The container whose `args[0]` is `role` (Spark's entrypoint convention), else the first.
fn by_first_arg(spec: &PodSpec, role: &str) -> usize {
    spec.containers
        .iter()
        .position(|c| first_arg(c) == Some(role))
        .unwrap_or(0)
}

fn by_name(spec: &PodSpec, name: &str) -> usize {
    spec.containers
        .iter()
        .position(|c| c.name == name)
        .unwrap_or(0)
}

pub fn first_arg(container: &Container) -> Option<&str> {
    container.args.as_ref()?.first().map(String::as_str)
}

/// The slots `names` lists, in its order, each once. Linear: the annotation can list hundreds of
/// thousands of names (repeated) against thousands of containers.
fn named_slots(spec: &PodSpec, names: &str) -> Result<Vec<Slot>, WorkloadError> {
    // A name that is both a container and an init container means the container.
    let mut by_name: HashMap<&str, Slot> = HashMap::new();
    let init = spec.init_containers.as_deref().unwrap_or_default();
    for (list, is_init) in [(spec.containers.as_slice(), false), (init, true)] {
        for (index, c) in list.iter().enumerate() {
            by_name.entry(c.name.as_str()).or_insert(Slot {
                init: is_init,
                index,
            });
        }
    }
    let mut slots = Vec::new();
    let mut seen = HashSet::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let slot = *by_name
            .get(name)
            .ok_or_else(|| WorkloadError::UnknownContainer(crate::refs::shown_name(name)))?;
        if seen.insert(slot) {
            slots.push(slot);
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: serde_json::Value, containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": labels},
            "spec": {"containers": containers, "initContainers": [{"name": "init"}]}
        }))
        .unwrap()
    }

    fn kind_and_main(p: &Pod) -> Option<(WorkloadKind, usize)> {
        classify(p, &Selectors::default())
            .unwrap()
            .map(|w| (w.kind, w.main.index))
    }

    #[test]
    fn spark_target_is_found_by_args_not_by_name() {
        let containers =
            json!([{"name": "istio-proxy"}, {"name": "renamed", "args": ["driver", "--x"]}]);
        let p = pod(json!({"spark-role": "driver"}), containers);
        assert_eq!(kind_and_main(&p), Some((WorkloadKind::SparkDriver, 1)));
        let containers = json!([{"name": "a"}, {"name": "b", "args": ["executor"]}]);
        let p = pod(json!({"spark-role": "executor"}), containers);
        assert_eq!(kind_and_main(&p), Some((WorkloadKind::SparkExecutor, 1)));
        let p = pod(json!({"spark-role": "driver"}), json!([{"name": "x"}]));
        assert_eq!(kind_and_main(&p), Some((WorkloadKind::SparkDriver, 0)));
    }

    #[test]
    fn jupyter_by_any_selector_notebook_container_preferred() {
        let containers = json!([{"name": "sidecar"}, {"name": "notebook"}]);
        for labels in [
            json!({"component": "singleuser-server"}),
            json!({"component": "kernel"}),
            json!({"secrets.iomete.com/workload": "jupyter"}),
        ] {
            let p = pod(labels, containers.clone());
            assert_eq!(kind_and_main(&p), Some((WorkloadKind::Jupyter, 1)));
        }
    }

    #[test]
    fn other_pods_need_the_opt_in_label() {
        let p = pod(json!({"app": "nginx"}), json!([{"name": "nginx"}]));
        assert_eq!(kind_and_main(&p), None);
        let p = pod(
            json!({"secrets.iomete.com/inject": "true"}),
            json!([{"name": "nginx"}]),
        );
        assert_eq!(kind_and_main(&p), Some((WorkloadKind::OptedIn, 0)));
        let p = pod(json!({"spark-role": "shuffle"}), json!([{"name": "x"}]));
        assert_eq!(kind_and_main(&p), None);
    }

    #[test]
    fn containers_annotation_lists_exactly_the_env_targets() {
        let mut p = pod(
            json!({"secrets.iomete.com/inject": "true"}),
            json!([{"name": "app"}, {"name": "side"}]),
        );
        p.metadata.annotations =
            Some([(CONTAINERS_ANNOTATION.to_owned(), "side, init".to_owned())].into());
        let w = classify(&p, &Selectors::default()).unwrap().unwrap();
        assert_eq!(
            w.env_targets,
            vec![
                Slot {
                    init: false,
                    index: 1
                },
                Slot {
                    init: true,
                    index: 0
                }
            ]
        );
        p.metadata.annotations =
            Some([(CONTAINERS_ANNOTATION.to_owned(), "nope".to_owned())].into());
        assert_eq!(
            classify(&p, &Selectors::default()),
            Err(WorkloadError::UnknownContainer("\"nope\"".into()))
        );
        // A name that is not a name is described, not quoted.
        p.metadata.annotations =
            Some([(CONTAINERS_ANNOTATION.to_owned(), "my password".to_owned())].into());
        let e = classify(&p, &Selectors::default()).unwrap_err().to_string();
        assert!(!e.contains("password"), "{e}");
        assert!(
            e.contains("a value of 11 characters: letters, whitespace"),
            "{e}"
        );
    }

    /// Each container once, in the annotation's order; a name shared by a container and an init
    /// container means the container (as before the lookup was indexed).
    #[test]
    fn containers_annotation_repeats_and_shared_names() {
        let mut p = pod(
            json!({"secrets.iomete.com/inject": "true"}),
            json!([{"name": "app"}, {"name": "init"}, {"name": "app"}]),
        );
        let names = ["init", "app"].repeat(1000).join(",");
        p.metadata.annotations = Some([(CONTAINERS_ANNOTATION.to_owned(), names)].into());
        let w = classify(&p, &Selectors::default()).unwrap().unwrap();
        let slot = |index| Slot { init: false, index };
        assert_eq!(w.env_targets, vec![slot(1), slot(0)]);
    }

    #[test]
    fn a_pod_without_containers_is_an_error() {
        let p = pod(json!({"spark-role": "driver"}), json!([]));
        assert_eq!(
            classify(&p, &Selectors::default()),
            Err(WorkloadError::NoContainers)
        );
    }
}
