//! Pod creation through a real kube-apiserver (`cargo bench --bench kube_e2e`): what the webhook
//! adds to a pod create, and a 500-executor burst. The control plane is scripts/kube-e2e.sh (the
//! release webhook, registered by the chart, authenticating with its ServiceAccount's token); the
//! Vault references go to a real OpenBao. Prints the tables that docs/performance.md holds.
//!
//! - Latency: the same 10-reference Spark driver pod created one at a time, alternately in the
//!   data-plane namespace (the webhook is called and wires all 10) and in a namespace labelled
//!   `secrets.iomete.com/webhook=disabled` (the registration's namespaceSelector skips it: the API
//!   server does everything else the same), and in three namespaces with stand-in webhooks: one
//!   that allows at once without a patch, and two that answer at once with the mutation ours made
//!   (many operations, or two). Warm: the first `KUBE_BENCH_WARMUP` rounds are dropped.
//! - Throughput: `KUBE_BENCH_PODS` pods per arm with `KUBE_BENCH_CONCURRENCY` creates in flight.
//! - Burst: one driver with Vault references, then `KUBE_BENCH_EXECUTORS` executors created at
//!   once by the driver's ServiceAccount (a TokenRequest token, as Spark's allocator would):
//!   time to the last admission, Vault reads per key (OpenBao's audit log), owner-pod GETs (the
//!   API server's audit log).
//!
//! - Broker burst (runtime delivery): a driver and `KUBE_BENCH_EXECUTORS` executors with three
//!   `delivery: runtime` Vault references, admitted; after the Vault cache expired, every executor
//!   fetches its values from the broker at once with its own pod-bound token: p50/p99 to values,
//!   Vault reads per key, TokenReviews and pod GETs, the webhook's CPU time and RSS.
//!   `KUBE_BENCH_ONLY=broker` runs only this part.
//!
//! Knobs: KUBE_BENCH_SAMPLES (latency rounds, default 300), KUBE_BENCH_WARMUP (30),
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
    let only = std::env::var("KUBE_BENCH_ONLY").unwrap_or_default();
    if only == "broker" {
        broker_burst(k, &admin, bao_bin, executors).await;
        return;
    }

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
    // The wired probe (a dry run through ours) is also what the replaying stand-ins answer with.
    let wired: Value = loop {
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
                break serde_json::to_value(pod).unwrap();
            }
            other => {
                assert!(
                    Instant::now() < until,
                    "the webhook never wired the probe: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // The floors: stand-in webhooks on HTTP/2 and TLS like ours, called by the same API server,
    // each for a namespace of its own. `allow` answers "allowed" at once, without a patch: what the
    // API server spends to call *any* webhook. `replay` answers at once with the mutation ours made
    // to the probe (its spec and annotations), as a JSON Patch computed from the incoming pod:
    // what the API server spends to apply and store *this* mutation, whoever computes it. `whole`
    // makes the same mutation in two operations (replace the spec, the annotations): whether the
    // number of operations matters.
    let allow = stand_in(k, &admin, "allow", Answer::Allow).await;
    let replay = stand_in(k, &admin, "replay", Answer::Diff(Arc::new(wired.clone()))).await;
    let whole = stand_in(k, &admin, "whole", Answer::Whole(Arc::new(wired))).await;

    // Latency, alternating arms.
    let mut lat_with = Vec::new();
    let mut lat_without = Vec::new();
    let mut lat_noop = Vec::new();
    let mut lat_replay = Vec::new();
    let mut lat_whole = Vec::new();
    for i in 0..(samples + warmup) {
        for (api, ns, out) in [
            (&with, NS, &mut lat_with),
            (&without, plain_ns.as_str(), &mut lat_without),
            (&allow.api, allow.namespace.as_str(), &mut lat_noop),
            (&replay.api, replay.namespace.as_str(), &mut lat_replay),
            (&whole.api, whole.namespace.as_str(), &mut lat_whole),
        ] {
            let pod = driver_pod(ns, &format!("lat-{i}"), annotations.clone());
            let started = Instant::now();
            let created = api.create(&PostParams::default(), &pod).await.unwrap();
            let took = started.elapsed();
            if i >= warmup {
                out.push(took);
            }
            if ns == NS || ns == replay.namespace || ns == whole.namespace {
                let text = serde_json::to_string(&created).unwrap();
                assert_eq!(
                    text.matches("secretKeyRef").count(),
                    10,
                    "not wired in {ns}"
                );
            }
        }
    }
    for api in [&with, &without, &allow.api, &replay.api, &whole.api] {
        cleanup(api).await;
    }

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

    let p = |v: &mut Vec<Duration>| {
        v.sort();
        (ms(percentile(v, 0.5)), ms(percentile(v, 0.99)))
    };
    let ((p50w, p99w), (p50o, p99o), (p50n, p99n)) =
        (p(&mut lat_with), p(&mut lat_without), p(&mut lat_noop));
    let ((p50r, p99r), (p50a, p99a)) = (p(&mut lat_replay), p(&mut lat_whole));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (tw, to) = (mean(&rate_with), mean(&rate_without));
    println!(
        "\n## Pod create through kube-apiserver, 10-reference Spark driver ({samples} rounds after {warmup} warm-up, arms alternating)\n"
    );
    println!(
        "| | webhook called | no-op webhook called | no webhook called | added by ours | added by the no-op | ours beyond the no-op |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| p50 latency | {p50w:.2} ms | {p50n:.2} ms | {p50o:.2} ms | {:+.2} ms ({:+.1}%) | {:+.2} ms ({:+.1}%) | {:+.2} ms |",
        p50w - p50o,
        (p50w / p50o - 1.0) * 100.0,
        p50n - p50o,
        (p50n / p50o - 1.0) * 100.0,
        p50w - p50n,
    );
    println!(
        "| p99 latency | {p99w:.2} ms | {p99n:.2} ms | {p99o:.2} ms | {:+.2} ms | {:+.2} ms | {:+.2} ms |",
        p99w - p99o,
        p99n - p99o,
        p99w - p99n,
    );
    println!(
        "| throughput ({concurrency} in flight, {pods_per_arm} pods x 2 rounds) | {tw:.0} pods/s | | {to:.0} pods/s | ratio {:.2} | | |",
        tw / to
    );
    println!(
        "\nThe same mutation without our work: stand-ins that answer at once with the patch ours made to the probe.\n"
    );
    println!(
        "| | ours | replayed, many operations | replayed, two operations | ours beyond the replay |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| p50 latency | {p50w:.2} ms | {p50r:.2} ms | {p50a:.2} ms | {:+.2} ms |",
        p50w - p50r
    );
    println!(
        "| p99 latency | {p99w:.2} ms | {p99r:.2} ms | {p99a:.2} ms | {:+.2} ms |",
        p99w - p99r
    );
    println!(
        "| patch operations per pod | | {} | 2 | |",
        replay.ops.load(std::sync::atomic::Ordering::Relaxed)
    );
    for name in ["allow", "replay", "whole"] {
        let _ = k
            .kubectl()
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &format!("bench-{name}"),
            ])
            .run();
    }

    burst(k, &admin, bao_bin, executors, concurrency).await;
    broker_burst(k, &admin, bao_bin, executors).await;
}

/// What a stand-in webhook answers.
enum Answer {
    /// "allowed", no patch.
    Allow,
    /// "allowed", with a JSON Patch from the incoming pod to one with this pod's spec and
    /// annotations (`json_patch::diff`: many small operations, like ours).
    Diff(Arc<Value>),
    /// The same end state in two operations: replace the spec, set the annotations.
    Whole(Arc<Value>),
}

impl Answer {
    fn patch(&self, object: &Value) -> Option<Value> {
        let wired = match self {
            Answer::Allow => return None,
            Answer::Diff(wired) | Answer::Whole(wired) => wired,
        };
        Some(match self {
            Answer::Whole(_) => json!([
                {"op": "replace", "path": "/spec", "value": wired["spec"]},
                {"op": "add", "path": "/metadata/annotations", "value": wired["metadata"]["annotations"]},
            ]),
            _ => {
                let mut target = object.clone();
                target["spec"] = wired["spec"].clone();
                target["metadata"]["annotations"] = wired["metadata"]["annotations"].clone();
                serde_json::to_value(json_patch::diff(object, &target)).unwrap()
            }
        })
    }
}

/// A stand-in webhook registered for a namespace of its own (labelled so that ours skips it).
struct StandIn {
    api: Api<Pod>,
    namespace: String,
    /// Patch operations in its last answer.
    ops: Arc<std::sync::atomic::AtomicUsize>,
}

async fn stand_in(
    k: &'static Cluster,
    admin: &kube::Client,
    name: &str,
    answer: Answer,
) -> StandIn {
    let webhook = noop_webhook(answer).await;
    let namespace = k.namespace(&format!("bench-{name}"));
    k.kubectl()
        .args([
            "label",
            "namespace",
            &namespace,
            "secrets.iomete.com/webhook=disabled",
            &format!("bench-{name}=true"),
        ])
        .run()
        .ok();
    k.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: spark, namespace: {namespace}}}\n"
    ));
    k.apply(
        &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": format!("bench-{name}")},
            "webhooks": [{"name": format!("{name}.bench.test"), "admissionReviewVersions": ["v1"],
                "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 10,
                "clientConfig": {"url": webhook.url, "caBundle": webhook.ca_bundle},
                "namespaceSelector": {"matchLabels": {format!("bench-{name}"): "true"}},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}]}]})
        .to_string(),
    );
    let api = Api::<Pod>::namespaced(admin.clone(), &namespace);
    let until = Instant::now() + Duration::from_secs(30);
    while webhook.calls() == 0 {
        assert!(
            Instant::now() < until,
            "the API server never called the {name} stand-in"
        );
        let pod = driver_pod(&namespace, &unique("probe"), json!({}));
        let _ = api.create(&PostParams::default(), &pod).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cleanup(&api).await;
    StandIn {
        api,
        namespace,
        ops: webhook.ops,
    }
}

/// A mutating webhook that answers every review at once with `Answer`: TLS (rustls, a fresh
/// self-signed certificate for 127.0.0.1) and HTTP/2 or HTTP/1.1 as the API server offers, like ours.
struct Noop {
    url: String,
    ca_bundle: String,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    ops: Arc<std::sync::atomic::AtomicUsize>,
}

impl Noop {
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn noop_webhook(answer: Answer) -> Noop {
    use base64::Engine as _;
    use http_body_util::BodyExt as _;

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    )];
    let cert = params.self_signed(&key).unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/mutate", listener.local_addr().unwrap());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counter, op_count, answer) = (calls.clone(), ops.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let (counter, op_count, answer) = (counter.clone(), op_count.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let handle = move |request: hyper::Request<hyper::body::Incoming>| {
                    let (counter, op_count, answer) =
                        (counter.clone(), op_count.clone(), answer.clone());
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut response =
                            json!({"uid": review["request"]["uid"], "allowed": true});
                        if let Some(patch) = answer.patch(&review["request"]["object"]) {
                            op_count.store(
                                patch.as_array().map_or(0, Vec::len),
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            response["patchType"] = json!("JSONPatch");
                            response["patch"] = json!(
                                base64::engine::general_purpose::STANDARD.encode(patch.to_string())
                            );
                        }
                        let response = json!({"apiVersion": "admission.k8s.io/v1",
                            "kind": "AdmissionReview", "response": response});
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::from(response.to_string()),
                        )))
                    }
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper::service::service_fn(handle),
                )
                .await;
            });
        }
    });
    Noop {
        url,
        ca_bundle: base64::engine::general_purpose::STANDARD.encode(cert.pem()),
        calls,
        ops,
    }
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
                  "path": format!("/v1/secret/data/{path}"), "delivery": "materialize",
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

/// CPU seconds (user + system) and (RSS, peak RSS) in KiB of process `pid`, from /proc.
fn proc_usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the name and state.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

/// Calls of the webhook's ServiceAccount to `resource` with `verb`, from the API server's audit log,
/// split by answer: (answered, refused with 429/503/504). The API server's priority and fairness
/// answers 429 to a flow whose queues are full, kube-client retries those (its default policy),
/// and the audit log records every attempt: only the first number is work the webhook asked for.
fn webhook_calls(k: &Cluster, verb: &str, resource: &str) -> (usize, usize) {
    let calls: Vec<Value> = k
        .webhook_audit()
        .into_iter()
        .filter(|e| e["verb"] == verb && e["objectRef"]["resource"] == resource)
        .collect();
    let refused = calls
        .iter()
        .filter(|e| matches!(e["responseStatus"]["code"].as_u64(), Some(429 | 503 | 504)))
        .count();
    (calls.len() - refused, refused)
}

/// Runtime delivery: executors starting at once fetch their values from the broker.
async fn broker_burst(
    k: &'static Cluster,
    admin: &kube::Client,
    bao_bin: &std::path::Path,
    executors: usize,
) {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;

    let bao = openbao::OpenBao::start(bao_bin).await;
    let path = unique("broker");
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
                  "path": format!("/v1/secret/data/{path}"), "delivery": "runtime",
                  "auth": {"token": {"secretRef": {"name": format!("{vc}-credentials"), "key": "token"}}}}}]})
        .to_string());
    let ns = k.namespace("broker");
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
    let driver_name = unique("broker-driver");
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
    let token = k.token(&ns, "spark", Some(&driver_name));
    let spark = client(&k.token_kubeconfig("bench-broker-spark", &token)).await;
    let api = Api::<Pod>::namespaced(spark, &ns);
    let executor = |i: usize| -> Pod {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{driver_name}-exec-{i}"), "namespace": ns,
                "labels": {"spark-role": "executor", "spark-app-selector": app, "bench": "kube-e2e"},
                "annotations": refs,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "controller": true,
                                     "name": driver_name, "uid": driver_uid}]},
            "spec": {"serviceAccountName": "spark",
                     "containers": [{"name": "spark-kubernetes-executor", "image": "apache/spark:3.5.5",
                                     "args": ["executor"]}]}}))
        .unwrap()
    };
    // Admitted 16 at a time (the admission burst is measured above); each must be wired.
    let created: Vec<Pod> = stream::iter(0..executors)
        .map(|i| {
            let api = api.clone();
            let pod = executor(i);
            async move { api.create(&PostParams::default(), &pod).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for pod in &created {
        let text = serde_json::to_string(pod).unwrap();
        assert!(
            text.contains("/iomete-secrets/secrets-webhook"),
            "not wired: {text}"
        );
    }
    // One pod-bound broker token per executor, as the kubelet projects it.
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), &ns);
    let tokens: Vec<(String, String)> = stream::iter(created.iter())
        .map(|pod| {
            let accounts = accounts.clone();
            let name = pod.metadata.name.clone().unwrap();
            let uid = pod.metadata.uid.clone().unwrap();
            async move {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["secrets.iomete.com".into()],
                        expiration_seconds: Some(600),
                        bound_object_ref: Some(BoundObjectReference {
                            kind: Some("Pod".into()),
                            api_version: Some("v1".into()),
                            name: Some(name),
                            uid: Some(uid.clone()),
                        }),
                    },
                    ..TokenRequest::default()
                };
                let answer = accounts
                    .create_token_request("spark", &PostParams::default(), &request)
                    .await
                    .unwrap();
                (answer.status.unwrap().token, uid)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    // Cold: the Vault cache (30 s) and the broker's caches have expired.
    tokio::time::sleep(Duration::from_secs(32)).await;

    let env = std::fs::read_to_string(k.dir.join("env")).unwrap();
    let broker = env
        .lines()
        .find_map(|l| l.strip_prefix("export KUBE_E2E_BROKER="))
        .unwrap()
        .to_owned();
    let ca = std::fs::read(k.dir.join("pki/webhook-ca.crt")).unwrap();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0);
    for cert in reqwest::Certificate::from_pem_bundle(&ca).unwrap() {
        builder = builder.add_root_certificate(cert);
    }
    let http = builder.build().unwrap();
    let pid: u32 = std::fs::read_to_string(k.dir.join("pids/webhook"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let reads_before: Vec<usize> = vault_keys
        .iter()
        .map(|key| vault_reads(&bao, &format!("secret/data/{path}/{key}")))
        .collect();
    let reviews_before = webhook_calls(k, "create", "tokenreviews");
    let gets_before = webhook_calls(k, "get", "pods");
    let driver_gets_before = owner_gets(k, &ns, &driver_name);
    let (cpu_before, _, _) = proc_usage(pid);
    let url = format!("{broker}/v1/values");
    let started = Instant::now();
    // All at once: each executor's wrapper is its own connection.
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|(token, uid)| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .bearer_auth(token)
                    .json(&json!({"container": "spark-kubernetes-executor", "podUid": uid}))
                    .send()
                    .await;
                // A failure's status and the broker's reason (never a value: it refused).
                let outcome = match response {
                    Ok(r) if r.status().is_success() => {
                        let body: Value = r.json().await.unwrap_or_default();
                        let exact =
                            (0..3).all(|i| body["env"][format!("K{i}")] == format!("bench-k{i}"));
                        exact
                            .then_some(())
                            .ok_or_else(|| "other values".to_string())
                    }
                    Ok(r) => Err(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(e.to_string()),
                };
                (sent.elapsed(), outcome)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut delivered = 0;
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for task in tasks {
        let (latency, outcome) = task.await.unwrap();
        latencies.push(latency);
        match outcome {
            Ok(()) => delivered += 1,
            Err(why) => *failures.entry(why).or_default() += 1,
        }
    }
    let wall = started.elapsed();
    let (cpu_after, rss, peak) = proc_usage(pid);
    latencies.sort();
    let reads: Vec<String> = vault_keys
        .iter()
        .zip(&reads_before)
        .map(|(key, before)| {
            (vault_reads(&bao, &format!("secret/data/{path}/{key}")) - before).to_string()
        })
        .collect();
    let since = |(now, refused_now): (usize, usize), (before, refused_before): (usize, usize)| {
        (now - before, refused_now - refused_before)
    };
    let (reviews, reviews_refused) =
        since(webhook_calls(k, "create", "tokenreviews"), reviews_before);
    let (gets, gets_refused) = since(webhook_calls(k, "get", "pods"), gets_before);
    let driver_gets = owner_gets(k, &ns, &driver_name) - driver_gets_before;
    println!(
        "\n## Broker burst: {executors} executors fetch their runtime values at once (3 Vault references each, cold caches)\n"
    );
    println!("| | |");
    println!("|---|---|");
    println!(
        "| executors admitted and wired | {} of {executors} |",
        created.len()
    );
    println!("| fetches answered with exactly the 3 values | {delivered} of {executors} |");
    for (why, n) in &failures {
        println!("| failed ({n}), first attempt (the wrapper retries a 503) | {why} |");
    }
    println!(
        "| time to values p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );
    println!("| wall time of the burst | {:.0} ms |", ms(wall));
    println!(
        "| Vault reads per key during the burst | {} |",
        reads.join(", ")
    );
    println!(
        "| TokenReviews by the webhook during the burst | {reviews} answered, {reviews_refused} refused by the API server (429/503/504) and retried |"
    );
    println!(
        "| pod GETs by the webhook during the burst (executors + their driver) | {gets} answered ({driver_gets} attempts on the driver), {gets_refused} refused and retried |"
    );
    println!(
        "| webhook CPU during the burst | {:.2} s |",
        cpu_after - cpu_before
    );
    println!(
        "| webhook RSS after / peak (whole run) | {} / {} MiB |",
        rss / 1024,
        peak / 1024
    );
    cleanup(&api).await;
}
