//! Pod creation through a real kube-apiserver (`cargo bench --bench kube_e2e`): what the webhook
//! adds to a pod create, and a 500-executor burst. The control plane is scripts/kube-e2e.sh (the
//! release webhook, registered by the chart, authenticating with its ServiceAccount's token); the
//! Vault references go to a real OpenBao. Prints the tables that docs/performance.md holds.
//!
//! - Latency: the same 10-reference Spark driver pod created one at a time, alternately in the
//!   data-plane namespace (the webhook is called and wires all 10) and in a namespace labelled
//!   `secrets.iomete.com/webhook=disabled` (the registration's namespaceSelector skips it: the API
//!   server does everything else the same). Warm: the first `KUBE_BENCH_WARMUP` pairs are dropped.
//! - Throughput: `KUBE_BENCH_PODS` pods per arm with `KUBE_BENCH_CONCURRENCY` creates in flight.
//! - Burst: one driver with Vault references, then `KUBE_BENCH_EXECUTORS` executors created at
//!   once by the driver's ServiceAccount (a TokenRequest token, as Spark's allocator would):
//!   time to the last admission, Vault reads per key (OpenBao's audit log), owner-pod GETs (the
//!   API server's audit log).
//!
//! Knobs: KUBE_BENCH_SAMPLES (latency pairs, default 300), KUBE_BENCH_WARMUP (30),
//! KUBE_BENCH_PODS (300), KUBE_BENCH_CONCURRENCY (16), KUBE_BENCH_EXECUTORS (500).

#[path = "../tests/support/kube_e2e.rs"]
#[allow(dead_code)]
mod kube_e2e;
#[path = "../tests/support/openbao.rs"]
#[allow(dead_code)]
mod openbao;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

use kube_e2e::{Cluster, NS, unique};

const DRIVER: &str = include_str!("../tests/fixtures/pods/spark35-driver-submit.json");

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(k) = kube_e2e::cluster("kube_e2e bench") else {
        return;
    };
    let Some(bao_bin) = openbao::require_bao("kube_e2e bench") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(k, &bao_bin));
}

async fn client(kubeconfig: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn driver_pod(namespace: &str, name: &str, annotations: Value) -> Pod {
    let mut pod: Value = serde_json::from_str(DRIVER).unwrap();
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!(namespace);
    pod["metadata"]["labels"]["bench"] = json!("kube-e2e");
    pod["metadata"]["annotations"] = annotations;
    pod["spec"]["serviceAccountName"] = json!("spark");
    pod["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccount");
    serde_json::from_value(pod).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(k: &'static Cluster, bao_bin: &std::path::Path) {
    let samples = knob("KUBE_BENCH_SAMPLES", 300);
    let warmup = knob("KUBE_BENCH_WARMUP", 30);
    let pods_per_arm = knob("KUBE_BENCH_PODS", 300);
    let concurrency = knob("KUBE_BENCH_CONCURRENCY", 16);
    let executors = knob("KUBE_BENCH_EXECUTORS", 500);
    let admin = client(&k.kubeconfig).await;

    // A domain with 10 keys; the admin identity (the bench's client) holds Use on it.
    let domain = unique("bench");
    let keys: Vec<String> = (0..10).map(|i| format!("key_{i}")).collect();
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|key| (key.clone(), json!(format!("bench-value-{key}"))))
        .collect();
    k.apply(
        &json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": format!("iomete-secret-store-{domain}"), "namespace": NS}, "stringData": data},
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "spark", "namespace": NS}},
            {"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
             "metadata": {"name": format!("{domain}-bundle"), "namespace": NS},
             "spec": {"domains": [domain], "grants": [{"subjects": [
                 {"kind": "User", "name": "kube-e2e-admin"}, {"kind": "Group", "name": "system:masters"}],
                 "permissions": ["use"]}]}}]})
        .to_string(),
    );
    let plain_ns = k.namespace("bench-off");
    k.kubectl()
        .args([
            "label",
            "namespace",
            &plain_ns,
            "secrets.iomete.com/webhook=disabled",
        ])
        .run()
        .ok();
    k.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: spark, namespace: {plain_ns}}}\n"
    ));
    let annotations: serde_json::Map<String, Value> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            (
                format!("env.secrets.iomete.com/SECRET_{i}"),
                json!(format!("kubernetes:{domain}/{key}")),
            )
        })
        .collect();
    let annotations = Value::Object(annotations);
    let with = Api::<Pod>::namespaced(admin.clone(), NS);
    let without = Api::<Pod>::namespaced(admin.clone(), &plain_ns);

    // Ready: the webhook has seen the store and the bundle.
    let probe = driver_pod(NS, "bench-probe", annotations.clone());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        match with.create(&dry, &probe).await {
            Ok(pod)
                if serde_json::to_string(&pod)
                    .unwrap()
                    .contains("secretKeyRef") =>
            {
                break;
            }
            other => {
                assert!(
                    Instant::now() < until,
                    "the webhook never wired the probe: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // Latency, alternating arms.
    let mut lat_with = Vec::new();
    let mut lat_without = Vec::new();
    for i in 0..(samples + warmup) {
        for (api, ns, out) in [
            (&with, NS, &mut lat_with),
            (&without, plain_ns.as_str(), &mut lat_without),
        ] {
            let pod = driver_pod(ns, &format!("lat-{i}"), annotations.clone());
            let started = Instant::now();
            let created = api.create(&PostParams::default(), &pod).await.unwrap();
            let took = started.elapsed();
            if i >= warmup {
                out.push(took);
            }
            if ns == NS {
                let text = serde_json::to_string(&created).unwrap();
                assert_eq!(text.matches("secretKeyRef").count(), 10, "not wired");
            }
        }
    }
    cleanup(&with).await;
    cleanup(&without).await;

    // Throughput, one arm after the other, twice (with, without, with, without).
    let mut rate_with = Vec::new();
    let mut rate_without = Vec::new();
    for round in 0..2 {
        for (api, ns, out) in [
            (&with, NS, &mut rate_with),
            (&without, plain_ns.as_str(), &mut rate_without),
        ] {
            let started = Instant::now();
            stream::iter(0..pods_per_arm)
                .map(|i| {
                    let pod = driver_pod(ns, &format!("tp-{round}-{i}"), annotations.clone());
                    let api = api.clone();
                    async move { api.create(&PostParams::default(), &pod).await.unwrap() }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>()
                .await;
            out.push(pods_per_arm as f64 / started.elapsed().as_secs_f64());
            cleanup(api).await;
        }
    }

    lat_with.sort();
    lat_without.sort();
    let (p50w, p99w) = (percentile(&lat_with, 0.5), percentile(&lat_with, 0.99));
    let (p50o, p99o) = (
        percentile(&lat_without, 0.5),
        percentile(&lat_without, 0.99),
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (tw, to) = (mean(&rate_with), mean(&rate_without));
    println!(
        "\n## Pod create through kube-apiserver, 10-reference Spark driver ({samples} pairs after {warmup} warm-up, alternating)\n"
    );
    println!("| | webhook called | webhook not called | added |");
    println!("|---|---|---|---|");
    println!(
        "| p50 latency | {:.2} ms | {:.2} ms | {:+.2} ms ({:+.1}%) |",
        ms(p50w),
        ms(p50o),
        ms(p50w) - ms(p50o),
        (ms(p50w) / ms(p50o) - 1.0) * 100.0
    );
    println!(
        "| p99 latency | {:.2} ms | {:.2} ms | {:+.2} ms |",
        ms(p99w),
        ms(p99o),
        ms(p99w) - ms(p99o)
    );
    println!(
        "| throughput ({concurrency} in flight, {pods_per_arm} pods x 2 rounds) | {tw:.0} pods/s | {to:.0} pods/s | ratio {:.2} |",
        tw / to
    );

    burst(k, &admin, bao_bin, executors, concurrency).await;
}

async fn cleanup(api: &Api<Pod>) {
    let _ = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("bench=kube-e2e"),
        )
        .await;
}

async fn burst(
    k: &'static Cluster,
    admin: &kube::Client,
    bao_bin: &std::path::Path,
    executors: usize,
    _concurrency: usize,
) {
    let bao = openbao::OpenBao::start(bao_bin).await;
    let path = unique("burst");
    let vault_keys = ["k0", "k1", "k2"];
    for key in vault_keys {
        bao.put_kv2(
            None,
            "secret",
            &format!("{path}/{key}"),
            json!({"value": format!("bench-{key}")}),
        )
        .await;
    }
    bao.policy(
        "bench-reader",
        r#"path "secret/data/*" { capabilities = ["read"] }"#,
    )
    .await;
    let token = bao.token(&["bench-reader"], None, false).await;
    let vc = unique("vc");
    k.apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{vc}-credentials"), "namespace": NS},
         "stringData": {"token": token}},
        {"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
         "metadata": {"name": format!("{vc}-bundle"), "namespace": NS},
         "spec": {"grants": [{"subjects": [{"kind": "User", "name": "kube-e2e-admin"}], "permissions": ["use"]}]}},
        {"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
         "metadata": {"name": vc, "namespace": NS},
         "spec": {"resourceBundle": format!("{vc}-bundle"), "host": bao.addr,
                  "path": format!("/v1/secret/data/{path}"),
                  "auth": {"token": {"secretRef": {"name": format!("{vc}-credentials"), "key": "token"}}}}}]})
        .to_string());
    // The burst runs in its own namespace; Spark's ServiceAccount there creates the executors.
    let ns = k.namespace("burst");
    k.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: spark, namespace: {ns}}}\n"
    ));
    let refs: serde_json::Map<String, Value> = vault_keys
        .iter()
        .map(|key| {
            (
                format!("env.secrets.iomete.com/{}", key.to_uppercase()),
                json!(format!("vault:{vc}/{key}#value")),
            )
        })
        .collect();
    let refs = Value::Object(refs);
    let drivers = Api::<Pod>::namespaced(admin.clone(), &ns);
    let driver_name = unique("burst-driver");
    let until = Instant::now() + Duration::from_secs(60);
    let driver = loop {
        match drivers
            .create(
                &PostParams::default(),
                &driver_pod(&ns, &driver_name, refs.clone()),
            )
            .await
        {
            Ok(pod) => break pod,
            Err(e) => {
                assert!(Instant::now() < until, "driver not admitted: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let driver_uid = driver.metadata.uid.clone().unwrap();
    let app = driver.metadata.labels.as_ref().unwrap()["spark-app-selector"].clone();
    let reads_before: Vec<usize> = vault_keys
        .iter()
        .map(|key| vault_reads(&bao, &format!("secret/data/{path}/{key}")))
        .collect();
    let audit_before = owner_gets(k, &ns, &driver_name);

    let token = k.token(&ns, "spark", Some(&driver_name));
    let spark = client(&k.token_kubeconfig("bench-spark", &token)).await;
    let api = Api::<Pod>::namespaced(spark, &ns);
    let executor = |i: usize| -> Pod {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{driver_name}-exec-{i}"), "namespace": ns,
                "labels": {"spark-role": "executor", "spark-app-selector": app, "bench": "kube-e2e"},
                "annotations": refs,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "controller": true,
                                     "name": driver_name, "uid": driver_uid}]},
            "spec": {"serviceAccountName": "spark",
                     "containers": [{"name": "spark-kubernetes-executor", "image": "spark", "args": ["executor"]}]}}))
        .unwrap()
    };
    let pods: Vec<Pod> = (0..executors).map(executor).collect();
    let started = Instant::now();
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    // All at once: each create is its own task (Spark's allocator posts a batch, many batches).
    let tasks: Vec<_> = pods
        .into_iter()
        .map(|pod| {
            let api = api.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let result = api.create(&PostParams::default(), &pod).await;
                done.lock().unwrap().push(started.elapsed());
                result.map(|p| {
                    serde_json::to_string(&p)
                        .unwrap()
                        .matches("secretKeyRef")
                        .count()
                })
            })
        })
        .collect();
    let mut wired = 0;
    let mut failed = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(3) => wired += 1,
            Ok(n) => failed.push(format!("{n} refs")),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let last = *done.lock().unwrap().iter().max().unwrap();
    let reads: Vec<usize> = vault_keys
        .iter()
        .zip(&reads_before)
        .map(|(key, before)| vault_reads(&bao, &format!("secret/data/{path}/{key}")) - before)
        .collect();
    let total_reads: Vec<usize> = vault_keys
        .iter()
        .map(|key| vault_reads(&bao, &format!("secret/data/{path}/{key}")))
        .collect();
    let gets = owner_gets(k, &ns, &driver_name) - audit_before;
    println!(
        "\n## {executors}-executor burst through kube-apiserver (3 Vault references each, all creates at once)\n"
    );
    println!("| | |");
    println!("|---|---|");
    println!("| executors admitted and wired | {wired} of {executors} |");
    println!("| time to the last admission | {:.0} ms |", ms(last));
    println!(
        "| Vault reads per key during the burst | {} |",
        reads
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| Vault reads per key, driver + burst | {} |",
        total_reads
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| owner driver GETs by the webhook during the burst | {gets} |");
    if !failed.is_empty() {
        println!("\nfailed: {} (first: {})", failed.len(), failed[0]);
    }
    cleanup(&api).await;
}

/// Read requests for `path` in OpenBao's audit log (not the bench's own seeding writes).
fn vault_reads(bao: &openbao::OpenBao, path: &str) -> usize {
    std::fs::read_to_string(&bao.audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["type"] == "request"
                && e["request"]["path"] == path
                && e["request"]["operation"] == "read"
        })
        .count()
}

/// GETs of the driver pod by the webhook's ServiceAccount, from the API server's audit log.
fn owner_gets(k: &Cluster, ns: &str, driver: &str) -> usize {
    k.webhook_audit()
        .iter()
        .filter(|e| {
            e["verb"] == "get"
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["namespace"] == ns
                && e["objectRef"]["name"] == driver
        })
        .count()
}
