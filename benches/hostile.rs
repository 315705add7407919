//! Hostile-load harness: the release server binary under each attack of the hostile-load issue,
//! while a prober does what the kubelet and the API server do (`cargo bench --bench hostile`).
//!
//! Each scenario starts a fresh `secrets-webhook serve --dev` process (so its peak RSS is the
//! scenario's own), runs one attack for `HOSTILE_SECS` seconds (default 10) and probes every
//! 100 ms: `GET /readyz` on the admin port (a success is a 200 within 1 s) and one plain review
//! over a kept HTTP/2 connection (a success is `allowed` with its uid within 2 s). It records the
//! server's highest fd count and RSS seen by the prober, and its `VmHWM` at the end. Prints the
//! table kept in docs/performance.md. `HOSTILE_ONLY` (comma list) picks scenarios.
//!
//! `scaling` (in process, no server): the engine's time for one review as references and env
//! entries grow, with the reference bound lifted, to show that the work is near linear
//! (`HOSTILE_SCALING_SIZES`, a comma list, picks the reference counts).
//!
//! Loopback only; every attack is bounded in count and time.

#[path = "../tests/support/attack.rs"]
mod attack;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use attack::*;

const BIN: &str = env!("CARGO_BIN_EXE_secrets-webhook");

struct Outcome {
    scenario: &'static str,
    probes: Probes,
    peak_kib: u64,
    note: String,
}

fn main() -> attack::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let secs: u64 = std::env::var("HOSTILE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let only: Option<Vec<String>> = std::env::var("HOSTILE_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(secs);
    println!(
        "server: {BIN}\n{}\nattack: {secs} s per scenario\n",
        machine()
    );
    if wants("scaling") {
        scaling(&runtime)?;
    }
    let mut outcomes = Vec::new();
    for scenario in SCENARIOS {
        if !wants(scenario.name) {
            continue;
        }
        let outcome = run(&runtime, scenario, duration)?;
        println!("{}", row(&outcome));
        outcomes.push(outcome);
    }
    println!("\n{}", header());
    for outcome in &outcomes {
        println!("{}", row(outcome));
    }
    Ok(())
}

struct Scenario {
    name: &'static str,
    /// The open-file limit the server runs under.
    nofile: Option<u64>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "quiet",
        nofile: None,
    },
    Scenario {
        name: "idle-h2-flood",
        nofile: Some(1024),
    },
    Scenario {
        name: "upload-flood-h2",
        nofile: None,
    },
    Scenario {
        name: "upload-flood-h1",
        nofile: None,
    },
    Scenario {
        name: "huge-reviews",
        nofile: None,
    },
    Scenario {
        name: "connection-churn",
        nofile: None,
    },
    Scenario {
        name: "connect-burst",
        nofile: None,
    },
    Scenario {
        name: "rapid-reset",
        nofile: None,
    },
];

/// One scenario: the attack on `runtime` (the attacker's two workers), the prober on a thread and
/// runtime of its own, so that the probes measure the server, not the attacker's queue.
fn run(
    runtime: &tokio::runtime::Runtime,
    scenario: &Scenario,
    duration: Duration,
) -> attack::Result<Outcome> {
    let server = ServerProcess::start(BIN, scenario.nofile, &[])?;
    // Let it settle (first listing, certificate) before the attack.
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (note, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let probing = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(probing.block_on(probe(
                &server,
                Duration::from_millis(100),
                Duration::from_secs(1),
                Duration::from_secs(2),
                stop.clone(),
            )))
        });
        let note = runtime.block_on(async {
            let timer = async {
                tokio::time::sleep(duration).await;
                stop.store(true, Ordering::SeqCst);
            };
            let (note, ()) = tokio::join!(
                attack(scenario.name, &server, stop.clone(), tally.clone()),
                timer
            );
            note
        });
        let probes = prober
            .join()
            .map_err(|_| "the prober panicked".to_owned())?;
        Ok::<_, String>((note, probes?))
    })?;
    let (_, peak_kib) = server.memory_kib();
    let (opened, closed, failed) = tally.get();
    let note = if note.is_empty() {
        format!("attacker: {opened} opened, {closed} closed by the server, {failed} failed")
    } else {
        note
    };
    Ok(Outcome {
        scenario: scenario.name,
        probes,
        peak_kib,
        note,
    })
}

/// Runs one attack until `stop`; returns a note for the table (empty: the tally says it).
async fn attack(
    name: &str,
    server: &ServerProcess,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> String {
    let (addr, h1, h2) = (
        server.addr,
        server.client(b"http/1.1"),
        server.client(b"h2"),
    );
    match name {
        "idle-h2-flood" => {
            // 1,100 connections that only answer PINGs, against 1,024 fds (the case).
            idle_h2_flood(addr, h2, 1100, 100, stop, tally).await;
            String::new()
        }
        "upload-flood-h2" => {
            // One connection per 250 streams in the issue; four here, 3.9 MiB each, never ended.
            upload_flood_h2(addr, h2, 4, 250, 4_000_000, stop, tally).await;
            String::new()
        }
        "upload-flood-h1" => {
            upload_flood_h1(addr, h1, 200, 4_000_000, stop, tally).await;
            String::new()
        }
        "huge-reviews" => huge_loop(server, stop).await,
        "connection-churn" => {
            connection_churn(addr, h1, 64, stop, tally).await;
            String::new()
        }
        "connect-burst" => {
            let mut bursts = 0;
            let mut short = 0;
            while !stop.load(Ordering::SeqCst) {
                let (established, held) =
                    connect_burst(addr, 2000, Duration::from_millis(900)).await;
                bursts += 1;
                short += 2000 - established;
                drop(held);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            format!("{bursts} bursts of 2,000 connects; {short} not established within 900 ms")
        }
        "rapid-reset" => {
            let mut connections = 0;
            let mut calmed = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..20 {
                    tasks.spawn(rapid_reset(addr, h2.clone(), 500));
                }
                while let Some(done) = tasks.join_next().await {
                    connections += 1;
                    if matches!(done, Ok(Ok(Some(frames::ENHANCE_YOUR_CALM)))) {
                        calmed += 1;
                    }
                }
            }
            let warnings = server
                .log()
                .iter()
                .filter(|l| l.contains("\"level\":\"WARN\""))
                .count();
            format!(
                "{connections} connections x 500 reset streams; {calmed} GOAWAY ENHANCE_YOUR_CALM; \
                 {warnings} WARN lines in the log"
            )
        }
        _ => {
            // "quiet": the probes alone.
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            String::new()
        }
    }
}

/// The worst reviews, two of a kind at once, over and over until `stop`. The issue's: 60,000
/// references, 330,000 empty volumes, a 400,000-element args array; found after it: 1,000 env
/// references into 2,000 containers, one container named 580,000 times in
/// `secrets.iomete.com/containers`, an identity of 150,000 groups naming 64 domains (each under
/// 4 MiB).
async fn huge_loop(server: &ServerProcess, stop: Arc<AtomicBool>) -> String {
    let config = server.client(b"http/1.1");
    let kinds = [
        ("60k refs", Arc::new(huge::many_references(60_000))),
        ("330k volumes", Arc::new(huge::empty_volumes(330_000))),
        ("400k args", Arc::new(huge::long_args(400_000))),
        (
            "1k refs x 2k containers",
            Arc::new(huge::references_into_containers(2000, 1000)),
        ),
        (
            "580k container names",
            Arc::new(huge::repeated_container_names(3000, 580_000)),
        ),
        (
            "150k groups",
            Arc::new(huge::large_identity(0, 150_000, 64)),
        ),
    ];
    let mut worst = vec![Duration::ZERO; kinds.len()];
    let mut outcomes = vec![std::collections::BTreeMap::<String, usize>::new(); kinds.len()];
    while !stop.load(Ordering::SeqCst) {
        for (i, (_, body)) in kinds.iter().enumerate() {
            for answer in huge_reviews(server.addr, config.clone(), body.clone(), 2).await {
                let label = match answer {
                    Ok((took, response)) => {
                        worst[i] = worst[i].max(took);
                        let message = response["status"]["message"].as_str().unwrap_or("");
                        if response["allowed"] == true {
                            "allowed".to_owned()
                        } else if message.contains("groups and extra values") {
                            "denied: identity too large".to_owned()
                        } else if message.contains("containers named in") {
                            "denied: references x containers".to_owned()
                        } else if message.contains("references") {
                            "denied: too many references".to_owned()
                        } else if message.contains("to decode") {
                            "invalid: too large to decode".to_owned()
                        } else if message.contains("busy") {
                            "invalid: busy".to_owned()
                        } else {
                            format!("other: {}", message.chars().take(60).collect::<String>())
                        }
                    }
                    Err(e) => format!("error: {e}"),
                };
                *outcomes[i].entry(label).or_default() += 1;
            }
        }
    }
    kinds
        .iter()
        .zip(worst.iter().zip(&outcomes))
        .map(|((name, body), (worst, outcomes))| {
            format!(
                "{name} ({:.1} MiB): slowest answer {} ms, {outcomes:?}",
                body.len() as f64 / 1048576.0,
                worst.as_millis()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn header() -> String {
    "| attack | /readyz ok | /readyz p50 / p99 / max | admission ok | admission p50 / p99 / max | \
     peak RSS | max fds | notes |\n|---|---|---|---|---|---|---|---|"
        .to_owned()
}

fn row(o: &Outcome) -> String {
    let ms = |d: Option<Duration>| {
        d.map_or("–".to_owned(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1e3)
        })
    };
    let lat = |s: &[Option<Duration>]| {
        format!(
            "{} / {} / {} ms",
            ms(Probes::percentile(s, 0.5)),
            ms(Probes::percentile(s, 0.99)),
            ms(Probes::percentile(s, 1.0))
        )
    };
    let ok = |s: &[Option<Duration>]| {
        let (ok, n) = Probes::success(s);
        format!("{ok}/{n}")
    };
    format!(
        "| {} | {} | {} | {} | {} | {:.0} MiB | {} | {} |",
        o.scenario,
        ok(&o.probes.readyz),
        lat(&o.probes.readyz),
        ok(&o.probes.admissions),
        lat(&o.probes.admissions),
        o.peak_kib as f64 / 1024.0,
        o.probes.max_fds,
        o.note
    )
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "machine: {cores} cores ({model}); load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The engine in process (no TLS, no HTTP), with the reference bound lifted: time per review as
/// references and env entries grow. Linear work shows as a constant time per item.
fn scaling(runtime: &tokio::runtime::Runtime) -> attack::Result<()> {
    use secrets_webhook::admission::Webhook;
    use secrets_webhook::config::{LocalConfig, Settings};
    use serde_json::{Value, json};
    // `HOSTILE_SCALING_SIZES` (comma list) picks other counts, e.g. one at a time under callgrind.
    let sizes: Vec<usize> = std::env::var("HOSTILE_SCALING_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 30_000, 60_000]);
    let keys = sizes.iter().copied().max().unwrap_or(0).max(1_000);
    let mut config = LocalConfig::default();
    config.stores.global = (0..keys).map(|i| format!("k{i}")).collect();
    let settings = Settings {
        max_references: usize::MAX,
        ..Settings::default()
    };
    let metrics = std::sync::Arc::new(secrets_webhook::metrics::Metrics::new());
    let webhook = Webhook::from_local(settings, &config, metrics)?;
    let time = |body: &[u8]| -> attack::Result<(Duration, Value)> {
        let mut best = Duration::MAX;
        let mut answer = Value::Null;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let out = runtime.block_on(webhook.review_bytes(body, None));
            best = best.min(started.elapsed());
            answer = response_of(&out);
        }
        Ok((best, answer))
    };
    println!(
        "| review | body | engine time (best of 3) | per item | answer |\n|---|---|---|---|---|"
    );
    let annotations = |n: usize| -> Value {
        (0..n)
            .map(|i| {
                (
                    format!("env.secrets.iomete.com/V{i}"),
                    json!(format!("kubernetes:global/k{i}")),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    for &n in &sizes {
        let body = review_of(
            "scaling",
            &driver_pod(annotations(n), vec!["driver".into()]),
        );
        let (took, answer) = time(&body)?;
        println!(
            "| {n} env references | {:.1} MiB | {:.0} ms | {:.1} µs | {} |",
            body.len() as f64 / 1048576.0,
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / n.max(1) as f64,
            if answer["allowed"] == true {
                "patched"
            } else {
                "denied"
            }
        );
    }
    // 1,000 references and a growing env, each item using a legacy placeholder of its own key.
    for entries in [1_000, 10_000, 50_000] {
        let env: Vec<Value> = (0..entries)
            .map(|i| json!({"name": format!("E{i}"), "value": format!("x${{secrets.k{}}}", i % 1000)}))
            .collect();
        let mut pod = driver_pod(annotations(1_000), vec!["driver".into()]);
        pod["spec"]["containers"][0]["env"] = json!(env);
        let body = review_of("scaling", &pod);
        let (took, answer) = time(&body)?;
        println!(
            "| 1,000 references, {entries} env entries with placeholders | {:.1} MiB | {:.0} ms | {:.1} µs | {} |",
            body.len() as f64 / 1048576.0,
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / (entries + 1000) as f64,
            if answer["allowed"] == true {
                "patched"
            } else {
                "denied"
            }
        );
    }
    println!();
    Ok(())
}
