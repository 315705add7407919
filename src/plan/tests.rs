use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::*;
use crate::refs::Source;
use crate::workload::Selectors;
use crate::workload::classify;

const DRIVER: &str = include_str!("../../tests/fixtures/pods/spark35-driver-submit.json");
const EXECUTOR: &str = include_str!("../../tests/fixtures/pods/spark35-executor-submit.json");
const JUPYTER: &str = include_str!("../../tests/fixtures/pods/jupyterhub-singleuser-z2jh.json");
const GLOBAL: &str = "iomete-secret-store";

fn pod(text: &str) -> Pod {
    serde_json::from_str(text).unwrap()
}

fn k8s(name: &str, domain: &str, key: &str) -> Resolved {
    Resolved {
        name: name.into(),
        secret: SecretObject {
            key: key.into(),
            source: Source {
                kind: SourceType::Kubernetes,
                id: domain.into(),
            },
        },
        key_ref: KeyRef {
            secret: format!("{GLOBAL}-{domain}"),
            key: key.into(),
        },
    }
}

struct Case {
    pod: Pod,
    env: Vec<Resolved>,
    confs: Vec<Resolved>,
    stamps: BTreeMap<String, String>,
}

impl Case {
    fn new(text: &str) -> Self {
        Self {
            pod: pod(text),
            env: vec![],
            confs: vec![],
            stamps: BTreeMap::new(),
        }
    }

    fn run(&self) -> Result<Plan, PlanError> {
        let workload = classify(&self.pod, &Selectors::default()).unwrap().unwrap();
        plan(
            Inputs {
                pod: &self.pod,
                workload: &workload,
                env: &self.env,
                spark_confs: &self.confs,
                global_store: GLOBAL,
                stamps: &self.stamps,
            },
            "global",
        )
    }

    /// Plans, applies the patch, checks the result is still a Pod, and that a second pass is a no-op.
    fn apply(&mut self) -> (Value, Plan) {
        let plan = self.run().unwrap();
        let mut doc = serde_json::to_value(&self.pod).unwrap();
        json_patch::patch(&mut doc, &plan.patch.operations().unwrap()).unwrap();
        self.pod = serde_json::from_value(doc.clone()).unwrap();
        let again = self.run().unwrap();
        assert!(
            again.patch.is_empty(),
            "second pass not empty: {:?}",
            again.patch
        );
        assert!(
            again.warnings.is_empty(),
            "second pass warned: {:?}",
            again.warnings
        );
        // Legacy placeholders are gone after the first pass; their global-store refs are exempt
        // from the guard (global secrets need no grant), so only the rest must be planned again.
        let not_global = |w: &BTreeSet<KeyRef>| {
            w.iter()
                .filter(|k| k.secret != GLOBAL)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(not_global(&again.wanted), not_global(&plan.wanted));
        (doc, plan)
    }
}

fn env_of(doc: &Value, container: usize) -> Vec<Value> {
    doc["spec"]["containers"][container]["env"]
        .as_array()
        .unwrap()
        .clone()
}

fn secret_ref(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": false}}})
}

#[test]
fn driver_gets_env_and_conf_right_after_driver_arg() {
    let mut case = Case::new(DRIVER);
    case.env = vec![k8s("DB_PASSWORD", "finance", "db_password")];
    case.confs = vec![k8s(
        "spark.hadoop.fs.s3a.secret.key",
        "finance",
        "s3_secret_key",
    )];
    let (doc, plan) = case.apply();
    let var = spark_var(&case.confs[0].secret);
    assert!(var.starts_with("SPARK_SECRET_") && var.len() == "SPARK_SECRET_".len() + 12);
    let env = env_of(&doc, 0);
    assert!(env.contains(&secret_ref(
        "DB_PASSWORD",
        "iomete-secret-store-finance",
        "db_password"
    )));
    assert!(env.contains(&secret_ref(
        &var,
        "iomete-secret-store-finance",
        "s3_secret_key"
    )));
    let args = doc["spec"]["containers"][0]["args"].as_array().unwrap();
    assert_eq!(args[0], "driver");
    assert_eq!(args[1], "--conf");
    assert_eq!(args[2], format!("spark.hadoop.fs.s3a.secret.key=$({var})"));
    assert_eq!(args[3], "--properties-file");
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    assert_eq!(plan.wanted.len(), 2);
    // Only appends: existing env items are never rewritten.
    assert!(plan.patch.operations().unwrap().iter().all(|op| match op {
        json_patch::PatchOperation::Add(a) => a.path.as_str().ends_with("/env/-"),
        json_patch::PatchOperation::Replace(r) => r.path.as_str() == "/spec/containers/0/args",
        _ => false,
    }));
}

#[test]
fn a_conf_key_spark_would_not_redact_is_warned_about() {
    let mut case = Case::new(DRIVER);
    case.confs = vec![k8s("spark.myapp.endpoint", "finance", "endpoint")];
    let (_, plan) = case.apply();
    assert_eq!(
        plan.warnings,
        [
            "Spark conf spark.myapp.endpoint does not match spark.redaction.regex: its value may show in the Spark UI"
        ]
    );
}

#[test]
fn reference_beats_plain_value_and_conf_with_a_warning_that_shows_no_value() {
    let mut case = Case::new(DRIVER);
    let mut doc: Value = serde_json::from_str(DRIVER).unwrap();
    doc["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "DB_PASSWORD", "value": "plain-hunter2"}));
    let args = doc["spec"]["containers"][0]["args"].as_array_mut().unwrap();
    args.push(json!("--conf"));
    args.push(json!("spark.sql.password=plain-hunter2"));
    case.pod = serde_json::from_value(doc).unwrap();
    case.env = vec![k8s("DB_PASSWORD", "finance", "db_password")];
    case.confs = vec![k8s("spark.sql.password", "finance", "sql")];
    let (doc, plan) = case.apply();
    assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    assert!(
        plan.warnings
            .iter()
            .all(|w| !w.contains("hunter2") && w.len() <= 120)
    );
    let text = doc.to_string();
    assert!(!text.contains("hunter2"), "plain values must be gone");
    let env = env_of(&doc, 0);
    assert_eq!(env.iter().filter(|e| e["name"] == "DB_PASSWORD").count(), 1);
}

#[test]
fn executor_gets_env_only() {
    let mut case = Case::new(EXECUTOR);
    case.env = vec![k8s("DB_PASSWORD", "finance", "db_password")];
    let (doc, _) = case.apply();
    assert_eq!(doc["spec"]["containers"][0]["args"], json!(["executor"]));
    assert!(env_of(&doc, 0).contains(&secret_ref(
        "DB_PASSWORD",
        "iomete-secret-store-finance",
        "db_password"
    )));
}

#[test]
fn spark_confs_on_other_pods_are_errors() {
    let mut case = Case::new(EXECUTOR);
    case.pod.metadata.labels =
        Some([("secrets.iomete.com/inject".to_owned(), "true".to_owned())].into());
    case.confs = vec![k8s("spark.a.password", "finance", "k")];
    assert_eq!(
        case.run().unwrap_err(),
        PlanError::SparkConfNotSupported(WorkloadKind::OptedIn)
    );
    let mut case = Case::new(DRIVER);
    case.pod.spec.as_mut().unwrap().containers[0].args = Some(vec!["/bin/run".into()]);
    case.confs = vec![k8s("spark.a.password", "finance", "k")];
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "Spark conf secrets need the driver container's args to start with \"driver\" (container \
         \"spark-kubernetes-driver\" does not); the Spark entrypoint passes them to spark-submit"
    );
}

#[test]
fn jupyter_confs_go_into_pyspark_submit_args_after_their_vars() {
    let mut case = Case::new(JUPYTER);
    case.env = vec![k8s("DB_PASSWORD", "finance", "db_password")];
    case.confs = vec![
        k8s("spark.hadoop.fs.s3a.secret.key", "finance", "s3"),
        k8s("spark.a.token", "finance", "t"),
    ];
    let (doc, _) = case.apply();
    let env = env_of(&doc, 0);
    let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    let psa = names
        .iter()
        .position(|n| *n == PYSPARK_SUBMIT_ARGS)
        .unwrap();
    let a = spark_var(&case.confs[1].secret);
    let s3 = spark_var(&case.confs[0].secret);
    assert!(names.iter().position(|n| *n == a).unwrap() < psa);
    assert!(names.iter().position(|n| *n == s3).unwrap() < psa);
    assert_eq!(
        env[psa]["value"],
        format!(
            "--conf 'spark.a.token=$({a})' --conf 'spark.hadoop.fs.s3a.secret.key=$({s3})' pyspark-shell"
        )
    );
    let words = shlex::split(env[psa]["value"].as_str().unwrap()).unwrap();
    assert_eq!(words[1], format!("spark.a.token=$({a})"));
}

#[test]
fn existing_pyspark_submit_args_keep_their_options_and_move_behind_the_vars() {
    let mut case = Case::new(JUPYTER);
    let c = &mut case.pod.spec.as_mut().unwrap().containers[0];
    c.env.as_mut().unwrap().insert(
        0,
        EnvVar {
            name: PYSPARK_SUBMIT_ARGS.into(),
            value: Some("--master 'local[2]' --conf spark.a.token=plain pyspark-shell".into()),
            value_from: None,
        },
    );
    case.confs = vec![k8s("spark.a.token", "finance", "t")];
    let (doc, _) = case.apply();
    let env = env_of(&doc, 0);
    let a = spark_var(&case.confs[0].secret);
    assert_eq!(env[0]["name"], a.as_str());
    assert_eq!(env[1]["name"], PYSPARK_SUBMIT_ARGS);
    assert_eq!(
        env[1]["value"],
        format!("--master 'local[2]' --conf 'spark.a.token=$({a})' pyspark-shell")
    );
}

#[test]
fn pyspark_submit_args_from_a_secret_cannot_be_extended() {
    let mut case = Case::new(JUPYTER);
    let c = &mut case.pod.spec.as_mut().unwrap().containers[0];
    c.env.as_mut().unwrap().push(secret_var(
        PYSPARK_SUBMIT_ARGS,
        &KeyRef {
            secret: "x".into(),
            key: "y".into(),
        },
    ));
    case.confs = vec![k8s("spark.a.token", "finance", "t")];
    assert_eq!(
        case.run().unwrap_err(),
        PlanError::PysparkArgsNotPlain("\"notebook\"".into())
    );
}

#[test]
fn legacy_placeholders_become_refs_or_composed_values() {
    let mut case = Case::new(DRIVER);
    let c = &mut case.pod.spec.as_mut().unwrap().containers[0];
    let env = c.env.as_mut().unwrap();
    env.push(EnvVar {
        name: "WAREHOUSE".into(),
        value: Some("${secrets.warehouse_path}".into()),
        value_from: None,
    });
    env.push(EnvVar {
        name: "JDBC".into(),
        value: Some("jdbc:pg://u:${secrets.db_pw}@$(HOST)/db?c=$$x".into()),
        value_from: None,
    });
    c.args
        .as_mut()
        .unwrap()
        .push("--token=${secrets.api_token}".into());
    let workload = classify(&case.pod, &Selectors::default()).unwrap().unwrap();
    assert_eq!(
        legacy_keys(&case.pod, &workload)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["api_token", "db_pw", "warehouse_path"]
    );
    let (doc, plan) = case.apply();
    let env = env_of(&doc, 0);
    let (db_var, _) = legacy_var("global", "db_pw", GLOBAL);
    let (token_var, _) = legacy_var("global", "api_token", GLOBAL);
    let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    let jdbc = names.iter().position(|n| *n == "JDBC").unwrap();
    assert_eq!(
        names[jdbc - 1],
        db_var,
        "the generated var must come before its use"
    );
    assert_eq!(
        env[jdbc]["value"],
        format!("jdbc:pg://u:$({db_var})@$(HOST)/db?c=$$x")
    );
    assert!(env.contains(&secret_ref("WAREHOUSE", GLOBAL, "warehouse_path")));
    assert!(env.contains(&secret_ref(&token_var, GLOBAL, "api_token")));
    let args = doc["spec"]["containers"][0]["args"].as_array().unwrap();
    assert_eq!(
        args.last().unwrap(),
        &json!(format!("--token=$({token_var})"))
    );
    assert_eq!(plan.wanted.len(), 3);
}

#[test]
fn placeholders_outside_the_target_containers_are_left_alone() {
    let mut case = Case::new(JUPYTER);
    let init = &mut case
        .pod
        .spec
        .as_mut()
        .unwrap()
        .init_containers
        .as_mut()
        .unwrap()[0];
    init.env = Some(vec![EnvVar {
        name: "X".into(),
        value: Some("${secrets.x}".into()),
        value_from: None,
    }]);
    case.env = vec![k8s("A", "finance", "a")];
    let (doc, _) = case.apply();
    assert_eq!(
        doc["spec"]["initContainers"][0]["env"][0]["value"],
        "${secrets.x}"
    );
}

#[test]
fn bad_placeholder_is_an_error_naming_container_and_place() {
    let mut case = Case::new(EXECUTOR);
    case.pod.spec.as_mut().unwrap().containers[0].args =
        Some(vec!["executor".into(), "${secrets.a".into()]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "container \"spark-kubernetes-executor\", args[1]: a ${secrets.…} placeholder has no closing '}'; \
         write ${secrets.<key>} with a key of the global store"
    );
}

#[test]
fn stamps_are_added_with_escaped_pointers_and_overwrite_client_values() {
    let mut case = Case::new(DRIVER);
    case.env = vec![k8s("A", "finance", "a")];
    case.stamps = [(
        "secrets.iomete.com/identity".to_owned(),
        "user=alice".to_owned(),
    )]
    .into();
    let (doc, plan) = case.apply();
    assert_eq!(
        doc["metadata"]["annotations"]["secrets.iomete.com/identity"],
        "user=alice"
    );
    assert!(plan.patch.operations().unwrap().iter().any(
        |op| matches!(op, json_patch::PatchOperation::Add(a) if a.path.as_str() == "/metadata/annotations")
    ));

    let mut case = Case::new(JUPYTER);
    case.env = vec![k8s("A", "finance", "a")];
    case.pod
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("secrets.iomete.com/identity".into(), "forged".into());
    case.stamps = [(
        "secrets.iomete.com/identity".to_owned(),
        "user=alice".to_owned(),
    )]
    .into();
    let (doc, plan) = case.apply();
    assert_eq!(
        doc["metadata"]["annotations"]["secrets.iomete.com/identity"],
        "user=alice"
    );
    assert!(
        plan.patch
            .operations()
            .unwrap()
            .iter()
            .any(|op| matches!(op, json_patch::PatchOperation::Add(a)
        if a.path.as_str() == "/metadata/annotations/secrets.iomete.com~1identity"))
    );
}

#[test]
fn containers_annotation_reaches_sidecars_and_init_containers() {
    let mut case = Case::new(JUPYTER);
    case.pod.metadata.annotations.as_mut().unwrap().insert(
        "secrets.iomete.com/containers".into(),
        "block-cloud-metadata".into(),
    );
    case.env = vec![k8s("A", "finance", "a")];
    let (doc, _) = case.apply();
    assert_eq!(
        doc["spec"]["initContainers"][0]["env"],
        json!([secret_ref("A", "iomete-secret-store-finance", "a")])
    );
    assert!(!env_of(&doc, 0).iter().any(|e| e["name"] == "A"));
}

#[test]
fn redaction_follows_sparks_default_pattern() {
    for key in [
        "spark.hadoop.fs.s3a.secret.key",
        "spark.hadoop.fs.s3a.ACCESS.KEY",
        "spark.myapp.accesskey",
        "spark.jdbc.Password",
        "spark.api.token",
    ] {
        assert!(spark_redacts(key), "{key}");
    }
    for key in [
        "spark.myapp.endpoint",
        "spark.access_key",
        "spark.pass.word",
    ] {
        assert!(!spark_redacts(key), "{key}");
    }
}

#[test]
fn generated_names_are_deterministic_and_distinct() {
    let a = k8s("x", "finance", "a").secret;
    let b = k8s("x", "finance", "b").secret;
    assert_eq!(spark_var(&a), spark_var(&a.clone()));
    assert_ne!(spark_var(&a), spark_var(&b));
    let mut vault = a.clone();
    vault.source.kind = SourceType::Vault;
    assert_ne!(spark_var(&a), spark_var(&vault));
}

#[test]
fn long_warnings_are_cut_to_120_characters() {
    let w = warning("é".repeat(200));
    assert!(w.len() <= 120 + '…'.len_utf8(), "{}", w.len());
    assert!(w.ends_with('…'));
}

/// An env value whose only `${secrets.` is escaped (`$$`) is text: planning it must not rewrite
/// it (it did, with a no-op `replace`, on every pass).
#[test]
fn escaped_placeholders_alone_are_not_rewritten() {
    let mut case = Case::new(DRIVER);
    let env = case.pod.spec.as_mut().unwrap().containers[0]
        .env
        .as_mut()
        .unwrap();
    env.push(EnvVar {
        name: "LITERAL".into(),
        value: Some("$${secrets.not_a_placeholder}".into()),
        value_from: None,
    });
    case.env = vec![k8s("A", "finance", "db_password")];
    let (doc, plan) = case.apply();
    assert_eq!(plan.patch.len(), 1, "{:?}", plan.patch);
    let env = env_of(&doc, 0);
    assert!(env.contains(&json!({"name": "LITERAL", "value": "$${secrets.not_a_placeholder}"})));
}

#[test]
fn a_pod_var_with_a_generated_name_is_replaced_by_the_webhooks() {
    let (name, key_ref) = legacy_var("global", "db_pw", GLOBAL);
    for position in ["before", "after"] {
        let mut case = Case::new(DRIVER);
        let env = case.pod.spec.as_mut().unwrap().containers[0]
            .env
            .as_mut()
            .unwrap();
        let squat = EnvVar {
            name: name.clone(),
            value: Some("attacker-chosen".into()),
            value_from: None,
        };
        let user = EnvVar {
            name: "JDBC".into(),
            value: Some("u:${secrets.db_pw}".into()),
            value_from: None,
        };
        if position == "before" {
            env.extend([squat, user]);
        } else {
            env.extend([user, squat]);
        }
        let (doc, _) = case.apply();
        let env = env_of(&doc, 0);
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(
            names.iter().filter(|n| **n == name).count(),
            1,
            "{position}"
        );
        let declared = names.iter().position(|n| *n == name).unwrap();
        assert!(
            declared < names.iter().position(|n| *n == "JDBC").unwrap(),
            "{position}"
        );
        assert_eq!(
            env[declared],
            secret_ref(&name, &key_ref.secret, &key_ref.key),
            "{position}"
        );
    }
}
