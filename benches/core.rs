//! Micro-benchmarks of the pure core on the real fixtures: the reference parser, the workload
//! classifier and the planner (`cargo bench --bench core`).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use secrets_webhook::authz::Identity;
use secrets_webhook::backends::KeyRef;
use secrets_webhook::config::Selectors;
use secrets_webhook::identity::KeyRing;
use secrets_webhook::identity::stamps::{Subject, stamp_annotations, verify};
use secrets_webhook::plan::{Inputs, Resolved, legacy_keys, plan};
use secrets_webhook::refs::{TargetKind, parse_annotations};
use secrets_webhook::workload::classify;

const DRIVER: &str = include_str!("../tests/fixtures/pods/spark35-driver-submit.json");
const JUPYTER: &str = include_str!("../tests/fixtures/pods/jupyterhub-singleuser-z2jh.json");

/// Ten references: JSON items, short forms, domain, global and Vault.
fn annotations() -> BTreeMap<String, String> {
    let item = |name: &str, kind: &str, id: &str, key: &str| {
        format!(
            r#"{{"key":"{name}","secretObject":{{"key":"{key}","source":{{"type":"{kind}","id":"{id}"}}}}}}"#
        )
    };
    let env = [
        item("DB_PASSWORD", "KUBERNETES", "finance", "db_password"),
        item("DB_USER", "KUBERNETES", "finance", "db_user"),
        item("API_TOKEN", "VAULT", "vault-prod-finance", "api_token"),
        item("WAREHOUSE", "KUBERNETES", "global", "warehouse_path"),
    ];
    let confs = [
        item(
            "spark.hadoop.fs.s3a.secret.key",
            "KUBERNETES",
            "finance",
            "s3_secret_key",
        ),
        item(
            "spark.hadoop.fs.s3a.access.key",
            "KUBERNETES",
            "finance",
            "s3_access_key",
        ),
        item(
            "spark.sql.catalog.token",
            "VAULT",
            "vault-prod-finance",
            "catalog#token",
        ),
    ];
    BTreeMap::from([
        (
            "secrets.iomete.com/env-secrets".to_owned(),
            format!("[{}]", env.join(",")),
        ),
        (
            "secrets.iomete.com/spark-conf-secrets".to_owned(),
            format!("[{}]", confs.join(",")),
        ),
        (
            "env.secrets.iomete.com/GA_TOKEN".to_owned(),
            "kubernetes:marketing/ga_token".to_owned(),
        ),
        (
            "env.secrets.iomete.com/VAULT_PW".to_owned(),
            "vault:vault-prod-finance/sub/db#password".to_owned(),
        ),
        (
            "spark-conf.secrets.iomete.com/spark.x.password".to_owned(),
            "kubernetes:global/x".to_owned(),
        ),
    ])
}

fn bench(c: &mut Criterion) {
    let annotations = annotations();
    c.bench_function("parse 10 references", |b| {
        b.iter(|| parse_annotations(black_box(&annotations), "global"))
    });

    let selectors = Selectors::default();
    let mut driver: Pod = serde_json::from_str(DRIVER).unwrap_or_default();
    driver.metadata.annotations = Some(annotations.clone());
    let jupyter: Pod = serde_json::from_str(JUPYTER).unwrap_or_default();
    c.bench_function("classify driver", |b| {
        b.iter(|| classify(black_box(&driver), &selectors))
    });
    c.bench_function("classify jupyter", |b| {
        b.iter(|| classify(black_box(&jupyter), &selectors))
    });
    c.bench_function("deserialize driver pod", |b| {
        b.iter(|| serde_json::from_str::<Pod>(black_box(DRIVER)))
    });

    let Ok(Some(workload)) = classify(&driver, &selectors) else {
        return;
    };
    let Ok(refs) = parse_annotations(&annotations, "global") else {
        return;
    };
    let resolve = |kind| -> Vec<Resolved> {
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
    let env = resolve(TargetKind::Env);
    let confs = resolve(TargetKind::SparkConf);
    let stamps = BTreeMap::from([("secrets.iomete.com/identity".to_owned(), "alice".to_owned())]);
    // The stamps of a driver with ten references: signed at its admission, verified at each of its
    // executors' admissions.
    let Ok(keys) = KeyRing::new(b"bench-signing-key-0123456789abcdef0123456789", None) else {
        return;
    };
    let alice = Identity::new("alice", vec!["data-eng".to_owned()]);
    let secrets: Vec<_> = refs.iter().map(|r| r.secret.clone()).collect();
    c.bench_function("sign the stamps of 10 references", |b| {
        b.iter(|| {
            let subject = Subject::of_new_pod(black_box(&driver), "iomete-system");
            stamp_annotations(&alice, &secrets, &subject, &keys)
        })
    });
    let mut stamped = driver.clone();
    stamped
        .metadata
        .annotations
        .get_or_insert_default()
        .extend(stamp_annotations(
            &alice,
            &secrets,
            &Subject::of_new_pod(&driver, "iomete-system"),
            &keys,
        ));
    c.bench_function("verify the stamps of 10 references", |b| {
        b.iter(|| verify(black_box(&stamped), "iomete-system", &keys))
    });
    c.bench_function("legacy placeholder scan, driver", |b| {
        b.iter(|| legacy_keys(black_box(&driver), &workload))
    });
    c.bench_function("plan driver with 10 references", |b| {
        b.iter(|| {
            let inputs = Inputs {
                pod: black_box(&driver),
                workload: &workload,
                env: &env,
                spark_confs: &confs,
                global_store: "iomete-secret-store",
                stamps: &stamps,
            };
            plan(inputs, "global")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
