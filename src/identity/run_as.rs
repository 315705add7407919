//! `run-as` is set only by the platform. The Spark operator creates driver pods from a
//! SparkApplication and copies its annotations onto them; when the operator is a trusted
//! controller, whatever user a SparkApplication names in `secrets.iomete.com/run-as` is the user
//! its pods are admitted for. So a SparkApplication (or the template of a
//! ScheduledSparkApplication) may only name its own requester there, unless the requester is a
//! trusted controller itself, and the operator then copies a verified value.
//!
//! Every route the operator copies pod annotations from is checked: `spec.{driver,executor}.
//! annotations`, `spec.sparkConf["spark.kubernetes.{driver,executor}.annotation.*"]`, and the pod
//! templates `spec.{driver,executor}.template.metadata.annotations`. A pod template *file*
//! (`spark.kubernetes.*.podTemplateFile`, which Spark also reads from remote storage) cannot be
//! inspected, so only trusted requesters may set it.

use k8s_openapi::api::authentication::v1::UserInfo;
use serde_json::Value;

use super::trusted::TrustedControllers;

/// Spark conf prefixes whose suffix becomes a pod annotation.
const CONF_ANNOTATION_PREFIXES: [&str; 2] = [
    "spark.kubernetes.driver.annotation.",
    "spark.kubernetes.executor.annotation.",
];
/// Spark confs naming a pod template file, which the webhook cannot read.
const CONF_TEMPLATE_FILES: [&str; 2] = [
    "spark.kubernetes.driver.podTemplateFile",
    "spark.kubernetes.executor.podTemplateFile",
];

/// One way a SparkApplication's spec ends up as a pod annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where, e.g. `spec.driver.annotations` or `spec.sparkConf[spark.kubernetes.driver.annotation.X]`.
    pub path: String,
    pub annotation: String,
    pub value: String,
}

/// Why a SparkApplication is refused. `Display` is the denial text; it never quotes the value
/// that failed (only the requester's own name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error(
        "{kind} {path} sets {annotation} to a user other than its requester {requester:?}; only trusted controllers submit on behalf of others: remove it or set it to your own user name"
    )]
    OtherUser {
        kind: String,
        path: String,
        annotation: String,
        requester: String,
    },
    #[error(
        "{kind} {path} sets {annotation} to groups {requester:?} is not a member of; remove it, or list only your own groups"
    )]
    OtherGroups {
        kind: String,
        path: String,
        annotation: String,
        requester: String,
    },
    #[error(
        "{kind} spec.sparkConf sets {conf}: a pod template file cannot be checked for run-as annotations; use spec.driver.template / spec.executor.template instead"
    )]
    TemplateFile { kind: String, conf: String },
    #[error("the AdmissionReview carries no {kind} object")]
    NoObject { kind: String },
}

/// The SparkApplication spec inside an object of `kind`: its own `spec`, or a
/// ScheduledSparkApplication's `spec.template`.
fn app_spec<'a>(kind: &str, object: &'a Value) -> Option<&'a Value> {
    match kind {
        "ScheduledSparkApplication" => object.pointer("/spec/template"),
        _ => object.get("spec"),
    }
}

/// Every route by which `spec` (a SparkApplication spec) sets one of `annotations` on a pod,
/// plus the pod template file confs it sets.
pub fn routes(spec: &Value, annotations: &[&str]) -> (Vec<Route>, Vec<String>) {
    let mut found = Vec::new();
    let mut template_files = Vec::new();
    for role in ["driver", "executor"] {
        for (pointer, path) in [
            (
                format!("/{role}/annotations"),
                format!("spec.{role}.annotations"),
            ),
            (
                format!("/{role}/template/metadata/annotations"),
                format!("spec.{role}.template.metadata.annotations"),
            ),
        ] {
            let Some(map) = spec.pointer(&pointer).and_then(Value::as_object) else {
                continue;
            };
            for (key, value) in map {
                if annotations.contains(&key.as_str()) {
                    found.push(Route {
                        path: path.clone(),
                        annotation: key.clone(),
                        value: text(value),
                    });
                }
            }
        }
    }
    if let Some(confs) = spec.get("sparkConf").and_then(Value::as_object) {
        for (conf, value) in confs {
            if CONF_TEMPLATE_FILES.contains(&conf.as_str()) {
                template_files.push(conf.clone());
            }
            let annotation = CONF_ANNOTATION_PREFIXES
                .iter()
                .find_map(|prefix| conf.strip_prefix(prefix));
            if let Some(annotation) = annotation.filter(|a| annotations.contains(a)) {
                found.push(Route {
                    path: format!("spec.sparkConf[{conf}]"),
                    annotation: annotation.to_string(),
                    value: text(value),
                });
            }
        }
    }
    (found, template_files)
}

/// A value as the operator would render it into an annotation.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Checks a SparkApplication or ScheduledSparkApplication CREATE or UPDATE by `requester`. On
/// UPDATE only a changed spec is checked (the operator resubmits on spec changes; its own
/// metadata updates must keep working).
pub fn check(
    kind: &str,
    object: Option<&Value>,
    old_object: Option<&Value>,
    requester: &UserInfo,
    trusted: &TrustedControllers,
) -> Result<(), Vec<RunAsError>> {
    let object = object.ok_or_else(|| {
        vec![RunAsError::NoObject {
            kind: kind.to_string(),
        }]
    })?;
    let spec = app_spec(kind, object).unwrap_or(&Value::Null);
    if let Some(old) = old_object {
        if app_spec(kind, old).unwrap_or(&Value::Null) == spec {
            return Ok(());
        }
    }
    let username = requester.username.as_deref().unwrap_or_default();
    let groups = requester.groups.as_deref().unwrap_or_default();
    // A requester trusted for an annotation may set it (and its groups annotation) to anyone.
    let trusted_for = |annotation: &str| {
        trusted.matching(username, groups).any(|e| {
            e.user_annotation == annotation || e.groups_annotation.as_deref() == Some(annotation)
        })
    };
    let watched: Vec<&str> = trusted
        .on_behalf_annotations()
        .map(String::as_str)
        .collect();
    let (found, template_files) = routes(spec, &watched);
    let mut errors = Vec::new();
    if !trusted.trusts(username, groups) {
        errors.extend(
            template_files
                .into_iter()
                .map(|conf| RunAsError::TemplateFile {
                    kind: kind.to_string(),
                    conf,
                }),
        );
    }
    for route in found {
        if trusted_for(&route.annotation) {
            continue;
        }
        if trusted.groups_annotations().contains(&route.annotation) {
            let all_mine = route
                .value
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .all(|g| groups.iter().any(|mine| mine == g));
            if !all_mine {
                errors.push(RunAsError::OtherGroups {
                    kind: kind.to_string(),
                    path: route.path,
                    annotation: route.annotation,
                    requester: username.to_string(),
                });
            }
        } else if route.value.trim() != username {
            errors.push(RunAsError::OtherUser {
                kind: kind.to_string(),
                path: route.path,
                annotation: route.annotation,
                requester: username.to_string(),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::identity::TrustedController;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            ..UserInfo::default()
        }
    }

    fn trusted() -> TrustedControllers {
        let entries: Vec<TrustedController> = serde_yaml::from_str(
            r#"
- {username: "system:serviceaccount:iomete-system:iomete-control-plane", groupsAnnotation: secrets.iomete.com/run-as-groups}
- {username: "system:serviceaccount:spark-operator:spark-operator"}
- {username: "system:serviceaccount:jhub:hub", userAnnotation: hub.jupyter.org/username}
"#,
        )
        .unwrap();
        TrustedControllers::new(entries).unwrap()
    }

    fn app(spec: Value) -> Value {
        json!({"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
               "metadata": {"name": "pi", "namespace": "iomete-system"}, "spec": spec})
    }

    fn check_as(object: &Value, who: &UserInfo) -> Result<(), Vec<RunAsError>> {
        check("SparkApplication", Some(object), None, who, &trusted())
    }

    #[test]
    fn every_route_to_a_pod_annotation_is_checked() {
        let mallory = user("mallory", &["data-eng"]);
        let cases = [
            json!({"driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}),
            json!({"executor": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}),
            json!({"sparkConf": {"spark.kubernetes.driver.annotation.secrets.iomete.com/run-as": "alice"}}),
            json!({"sparkConf": {"spark.kubernetes.executor.annotation.secrets.iomete.com/run-as": "alice"}}),
            json!({"driver": {"template": {"metadata": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}}}),
            json!({"executor": {"template": {"metadata": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}}}),
            // Other configured user annotations, too.
            json!({"driver": {"annotations": {"hub.jupyter.org/username": "alice"}}}),
        ];
        for spec in cases {
            let errors = check_as(&app(spec.clone()), &mallory).unwrap_err();
            assert_eq!(errors.len(), 1, "{spec}");
            let text = errors[0].to_string();
            assert!(
                text.contains("a user other than its requester \"mallory\""),
                "{text}"
            );
            assert!(!text.contains("alice"), "the value is not quoted: {text}");
        }
        // Naming oneself is fine, on every route.
        let own = json!({
            "driver": {"annotations": {"secrets.iomete.com/run-as": "mallory"},
                       "template": {"metadata": {"annotations": {"secrets.iomete.com/run-as": " mallory "}}}},
            "sparkConf": {"spark.kubernetes.driver.annotation.secrets.iomete.com/run-as": "mallory",
                          "spark.kubernetes.driver.annotation.team": "x"}
        });
        assert_eq!(check_as(&app(own), &mallory), Ok(()));
        // Without run-as at all: nothing to check.
        assert_eq!(check_as(&app(json!({"type": "Scala"})), &mallory), Ok(()));
    }

    #[test]
    fn groups_may_only_be_the_requesters_own() {
        let mallory = user("mallory", &["data-eng", "system:authenticated"]);
        let own = json!({"driver": {"annotations": {"secrets.iomete.com/run-as-groups": "data-eng, system:authenticated"}}});
        assert_eq!(check_as(&app(own), &mallory), Ok(()));
        let more = json!({"driver": {"annotations": {"secrets.iomete.com/run-as-groups": "data-eng,finance-admins"}}});
        let errors = check_as(&app(more), &mallory).unwrap_err();
        assert!(matches!(errors[0], RunAsError::OtherGroups { .. }));
        assert!(!errors[0].to_string().contains("finance-admins"));
    }

    #[test]
    fn template_files_cannot_be_checked_so_only_trusted_requesters_set_them() {
        let spec = json!({"sparkConf": {"spark.kubernetes.driver.podTemplateFile": "s3a://bucket/t.yaml"}});
        let errors = check_as(&app(spec.clone()), &user("mallory", &[])).unwrap_err();
        assert!(matches!(errors[0], RunAsError::TemplateFile { .. }));
        let cp = user(
            "system:serviceaccount:iomete-system:iomete-control-plane",
            &[],
        );
        assert_eq!(check_as(&app(spec), &cp), Ok(()));
    }

    #[test]
    fn trusted_requesters_submit_on_behalf_of_users() {
        let spec = json!({
            "driver": {"annotations": {"secrets.iomete.com/run-as": "alice",
                                       "secrets.iomete.com/run-as-groups": "finance"}}
        });
        let cp = user(
            "system:serviceaccount:iomete-system:iomete-control-plane",
            &[],
        );
        assert_eq!(check_as(&app(spec.clone()), &cp), Ok(()));
        // The hub is trusted for its own annotation only.
        let hub = user("system:serviceaccount:jhub:hub", &[]);
        assert_eq!(check_as(&app(spec).clone(), &hub).unwrap_err().len(), 2);
    }

    #[test]
    fn scheduled_applications_are_checked_in_their_template() {
        let scheduled = json!({"kind": "ScheduledSparkApplication", "spec": {"schedule": "@daily",
            "template": {"driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}}});
        let errors = check(
            "ScheduledSparkApplication",
            Some(&scheduled),
            None,
            &user("mallory", &[]),
            &trusted(),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn updates_are_checked_when_the_spec_changes() {
        let alice_app = app(json!({"mainApplicationFile": "local:///a.jar",
            "driver": {"annotations": {"secrets.iomete.com/run-as": "alice"}}}));
        let bob = user("bob", &[]);
        // Metadata only (labels, finalizers): allowed, whoever does it.
        let mut relabelled = alice_app.clone();
        relabelled["metadata"]["labels"] = json!({"x": "y"});
        assert_eq!(
            check(
                "SparkApplication",
                Some(&relabelled),
                Some(&alice_app),
                &bob,
                &trusted()
            ),
            Ok(())
        );
        // New code under alice's name: only alice (or a trusted controller) may.
        let mut swapped = alice_app.clone();
        swapped["spec"]["mainApplicationFile"] = json!("s3a://bob/steal.jar");
        assert!(
            check(
                "SparkApplication",
                Some(&swapped),
                Some(&alice_app),
                &bob,
                &trusted()
            )
            .is_err()
        );
        assert_eq!(
            check(
                "SparkApplication",
                Some(&swapped),
                Some(&alice_app),
                &user("alice", &[]),
                &trusted()
            ),
            Ok(())
        );
    }
}
