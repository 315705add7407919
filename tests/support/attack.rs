//! Hostile clients against the real server binary, shared by `tests/hostile.rs` (each failure of
//! the hostile-load issue as a test) and `benches/hostile.rs` (the load harness). Included with
//! `#[path]`, so it depends on nothing else in `tests/support`.
//!
//! Everything talks to 127.0.0.1 over real TLS (rustls), HTTP/1.1 and HTTP/2 (hyper's client, or
//! hand-written frames where a well-behaved client cannot misbehave the way an attacker does).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

// ------------------------------------------------------------------------------------------------
// The server process.

/// `secrets-webhook serve --dev` as its own process (optionally under `prlimit --nofile=N`), its
/// stderr collected line by line.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub ca_pem: String,
    pub cert_dir: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `bin` and waits until it prints where it serves. `nofile`: the open-file limit (soft
    /// and hard) it runs under.
    pub fn start(bin: &str, nofile: Option<u64>, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            "stores:\n  global: [api_token]\n  domains:\n    finance: [db_password]\n",
        )?;
        let cert_dir = dir.path().join("certs");
        let mut command = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .args(["serve", "--dev", "--log-format", "json"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            // The management API (on by default with --dev, on a fixed port) is not under test.
            .args(["--api-listen", "off"])
            .arg("--dev-cert-dir")
            .arg(&cert_dir)
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // The `--dev` banner (port, admin address) is on stdout; stderr holds only log lines.
        let read = |from: Box<dyn std::io::Read + Send>,
                    keep: Option<Arc<Mutex<Vec<String>>>>,
                    tx: std::sync::mpsc::Sender<String>| {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(from);
                let mut line = Vec::new();
                while let Ok(n) = reader.read_until(b'\n', &mut line) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    let _ = tx.send(text.clone());
                    if let Some(keep) = &keep {
                        keep.lock().unwrap().push(text);
                    }
                    line.clear();
                }
            });
        };
        read(Box::new(stderr), Some(lines.clone()), tx.clone());
        read(Box::new(stdout), None, tx);
        let (mut port, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while port.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let said = lines.lock().unwrap().join("\n");
                return Err(format!("the server did not start; it said:\n{said}").into());
            };
            if let Some(rest) = line.split("https://localhost:").nth(1) {
                port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
            }
            if let Some(rest) = line.split("admin: http://").nth(1) {
                admin = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        let ca_pem = std::fs::read_to_string(cert_dir.join("ca.pem"))?;
        Ok(Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port.ok_or("no port")?)),
            admin: admin.ok_or("no admin address")?,
            ca_pem,
            cert_dir,
            lines,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// A client config trusting the development CA, speaking `alpn`.
    pub fn client(&self, alpn: &[u8]) -> Arc<ClientConfig> {
        client_config(&self.ca_pem, &[], alpn)
    }

    /// SIGSTOP / SIGCONT (the accept loop stands still; the kernel keeps completing handshakes
    /// into the listen backlog).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill {signal} failed").into())
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------------
// TLS and plain requests.

/// Trusts the CA in `ca_pem` and the extra `cas`.
pub fn client_config(
    ca_pem: &str,
    cas: &[CertificateDer<'static>],
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        let _ = roots.add(cert);
    }
    for ca in cas {
        let _ = roots.add(ca.clone());
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

pub async fn tls(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}

/// A minimal AdmissionReview of `pod` (CREATE by alice).
pub fn review_of(uid: &str, pod: &Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "iomete-system",
            "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": pod,
            "dryRun": false
        }
    })
    .to_string()
    .into_bytes()
}

/// A plain pod (not a workload: admitted untouched).
pub fn plain_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain", "namespace": "iomete-system"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    })
}

/// A Spark driver pod carrying `extra` annotations and `args`.
pub fn driver_pod(annotations: Value, args: Vec<String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "spark-driver", "namespace": "iomete-system",
                     "labels": {"spark-role": "driver"}, "annotations": annotations},
        "spec": {"containers": [{"name": "spark-kubernetes-driver", "image": "spark", "args": args}]}
    })
}

/// The worst reviews of the issue, each under the 4 MiB body limit.
pub mod huge {
    use super::*;

    /// A Spark driver with `n` short-form env references (60,000 make a 3.9 MB body).
    pub fn many_references(n: usize) -> Vec<u8> {
        let annotations: serde_json::Map<String, Value> = (0..n)
            .map(|i| {
                (
                    format!("env.secrets.iomete.com/V{i}"),
                    json!(format!("kubernetes:finance/k{i}")),
                )
            })
            .collect();
        let pod = driver_pod(Value::Object(annotations), vec!["driver".into()]);
        review_of("huge-references", &pod)
    }

    /// A Spark driver whose args array has `n` elements (400,000 fit in 4 MiB).
    pub fn long_args(n: usize) -> Vec<u8> {
        let args = std::iter::once("driver".to_owned())
            .chain((1..n).map(|i| (i % 10).to_string()))
            .collect();
        review_of("huge-args", &driver_pod(json!({}), args))
    }

    /// A pod with `n` empty volumes: 12 bytes of JSON each, 3 KiB each once decoded.
    pub fn empty_volumes(n: usize) -> Vec<u8> {
        let mut pod = plain_pod();
        pod["spec"]["volumes"] = Value::Array(vec![json!({"name": ""}); n]);
        review_of("huge-volumes", &pod)
    }

    /// A Spark driver whose `secrets.iomete.com/containers` lists its `containers` containers,
    /// with `refs` env references of the global store: each reference goes into each container
    /// (2,000 × 1,000 is a 110 KB body).
    pub fn references_into_containers(containers: usize, refs: usize) -> Vec<u8> {
        let names: Vec<String> = (0..containers).map(|i| format!("c{i}")).collect();
        let mut annotations: serde_json::Map<String, Value> = (0..refs)
            .map(|i| {
                (
                    format!("env.secrets.iomete.com/V{i}"),
                    json!("kubernetes:global/api_token"),
                )
            })
            .collect();
        annotations.insert(
            "secrets.iomete.com/containers".into(),
            json!(names.join(",")),
        );
        let mut pod = driver_pod(Value::Object(annotations), vec!["driver".into()]);
        pod["spec"]["containers"] = names.iter().map(|n| json!({"name": n})).collect();
        review_of("huge-containers", &pod)
    }

    /// A Spark driver with `containers` containers whose `secrets.iomete.com/containers` names
    /// the last one `repeats` times (3,000 and 580,000 fit in 4 MiB).
    pub fn repeated_container_names(containers: usize, repeats: usize) -> Vec<u8> {
        let last = format!("c{}", containers - 1);
        let annotations = json!({
            "env.secrets.iomete.com/V": "kubernetes:global/api_token",
            "secrets.iomete.com/containers": vec![last.as_str(); repeats].join(","),
        });
        let mut pod = driver_pod(annotations, vec!["driver".into()]);
        pod["spec"]["containers"] = (0..containers)
            .map(|i| json!({"name": format!("c{i}")}))
            .collect();
        review_of("huge-names", &pod)
    }

    /// A Spark driver naming `domains` domains, submitted by user `u{n}` in `groups` groups of
    /// 20 bytes (distinct for each `n`): 150,000 groups make a 3.6 MB body.
    pub fn large_identity(n: usize, groups: usize, domains: usize) -> Vec<u8> {
        let annotations: serde_json::Map<String, Value> = (0..domains)
            .map(|d| {
                (
                    format!("env.secrets.iomete.com/V{d}"),
                    json!(format!("kubernetes:d{d}/k")),
                )
            })
            .collect();
        let pod = driver_pod(Value::Object(annotations), vec!["driver".into()]);
        let mut review: Value =
            serde_json::from_slice(&review_of(&format!("identity-{n}"), &pod)).unwrap_or_default();
        review["request"]["userInfo"] = json!({
            "username": format!("u{n}"),
            "groups": (0..groups).map(|g| format!("group-{n:06}-{g:07}")).collect::<Vec<_>>(),
        });
        review.to_string().into_bytes()
    }

    /// A plain pod with a uid of `uid_len` bytes and a name of `name_len`.
    pub fn long_uid(uid_len: usize, name_len: usize) -> Vec<u8> {
        let mut pod = plain_pod();
        pod["metadata"]["name"] = json!("n".repeat(name_len));
        review_of(&"u".repeat(uid_len), &pod)
    }
}

/// One HTTP/1.1 POST /mutate on a fresh TLS connection; the status and the body.
pub async fn post_once(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let mut stream = tls(addr, config).await?;
    post_on(&mut stream, body).await
}

/// One HTTP/1.1 POST /mutate on an open connection (keep-alive).
pub async fn post_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let head = format!(
        "POST /mutate?timeout=10s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// Reads one HTTP/1.1 response with a Content-Length body.
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or("no status")?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err("connection closed mid-response".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok((status, buf[end + 4..end + 4 + length].to_vec()));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `GET /readyz` on the admin port over a fresh connection: the status, and how long it took.
pub async fn readyz(admin: SocketAddr) -> Result<(u16, Duration)> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await?;
    let (status, _) = read_response(&mut tcp).await?;
    Ok((status, started.elapsed()))
}

/// The `response` of an AdmissionReview answer.
pub fn response_of(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body).map_or(Value::Null, |v| v["response"].clone())
}

// ------------------------------------------------------------------------------------------------
// HTTP/2 through hyper's client.

pub type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection; the returned flag turns true when the server closes it.
pub async fn h2(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<(H2, Arc<AtomicBool>)> {
    let stream = tls(addr, config).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        let _ = connection.await;
        flag.store(true, Ordering::SeqCst);
    });
    Ok((sender, closed))
}

/// One review over an HTTP/2 connection.
pub async fn h2_post(sender: &mut H2, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let request = hyper::Request::post("https://localhost/mutate?timeout=10s")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

// ------------------------------------------------------------------------------------------------
// Attacks. Each runs until `stop` turns true (or its work is done) and reports what it managed.

/// Counts of an attack.
#[derive(Debug, Default)]
pub struct Tally {
    pub opened: AtomicUsize,
    pub closed_by_server: AtomicUsize,
    pub failed: AtomicUsize,
}

impl Tally {
    pub fn get(&self) -> (usize, usize, usize) {
        (
            self.opened.load(Ordering::SeqCst),
            self.closed_by_server.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// `n` HTTP/2 connections that only answer PINGs (hyper's client does), opened `parallel` at a
/// time and held until `stop`.
pub async fn idle_h2_flood(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    n: usize,
    parallel: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (config, stop, tally) = (config.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move {
            let opened = tokio::time::timeout(Duration::from_secs(10), h2(addr, config)).await;
            drop(permit);
            let Ok(Ok((_sender, closed))) = opened else {
                tally.failed.fetch_add(1, Ordering::SeqCst);
                return;
            };
            tally.opened.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) {
                if closed.load(Ordering::SeqCst) {
                    tally.closed_by_server.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `conns` HTTP/1.1 connections, each announcing a body of `len` bytes and sending it as fast as
/// the server takes it, without ever finishing; reconnects when cut, until `stop`.
pub async fn upload_flood_h1(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    conns: usize,
    len: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (config, stop, tally) = (config.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move {
            let chunk = vec![b' '; 16 * 1024];
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut stream) = tls(addr, config.clone()).await else {
                    tally.failed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tally.opened.fetch_add(1, Ordering::SeqCst);
                let head = format!(
                    "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                     content-length: {len}\r\n\r\n"
                );
                if stream.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                // Leave the body one chunk short of what was announced: it never finishes.
                let mut sent = 0;
                while sent + chunk.len() < len && !stop.load(Ordering::SeqCst) {
                    let write = stream.write_all(&chunk);
                    match tokio::time::timeout(Duration::from_millis(200), write).await {
                        Ok(Ok(())) => sent += chunk.len(),
                        Ok(Err(_)) => break,
                        // The server is not reading: it holds what it has; keep the pressure.
                        Err(_) => continue,
                    }
                }
                // Hold the unfinished body until the server gives up on it (or `stop`).
                let mut sink = [0u8; 4096];
                loop {
                    tokio::select! {
                        read = stream.read(&mut sink) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        },
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stop.load(Ordering::SeqCst) { return; }
                        }
                    }
                }
                tally.closed_by_server.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `conns` HTTP/2 connections, each opening as many streams as the server allows (up to
/// `streams`), each stream sending `len` bytes of body and never ending it; until `stop`.
pub async fn upload_flood_h2(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    conns: usize,
    streams: usize,
    len: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (config, stop, tally) = (config.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok(stream) = tls(addr, config.clone()).await else {
                    tally.failed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok((sender, connection)) = hyper::client::conn::http2::handshake::<_, _, Body>(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                else {
                    tally.failed.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                tally.opened.fetch_add(1, Ordering::SeqCst);
                let connection = tokio::spawn(connection);
                let mut requests = tokio::task::JoinSet::new();
                for _ in 0..streams {
                    let mut sender = sender.clone();
                    let stop = stop.clone();
                    requests.spawn(async move {
                        let frames = len / (16 * 1024);
                        // One frame short of the announced length, then silence until `stop`.
                        let sending = stop.clone();
                        let data = futures::stream::iter((1..frames).map_while(move |_| {
                            (!sending.load(Ordering::SeqCst)).then(|| {
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
                                    vec![b' '; 16 * 1024],
                                )))
                            })
                        }));
                        let holding = stop.clone();
                        let hold = futures::stream::unfold(holding, |stop| async move {
                            while !stop.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            None::<(
                                std::result::Result<Frame<Bytes>, std::convert::Infallible>,
                                _,
                            )>
                        });
                        let body =
                            StreamBody::new(futures::StreamExt::chain(data, hold)).boxed_unsync();
                        let Ok(request) = hyper::Request::post("https://localhost/mutate")
                            .header("content-length", len.to_string())
                            .body(body)
                        else {
                            return;
                        };
                        if sender.ready().await.is_ok() && !stop.load(Ordering::SeqCst) {
                            let _ = sender.send_request(request).await;
                        }
                    });
                }
                while requests.join_next().await.is_some() {}
                connection.abort();
                tally.closed_by_server.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// TCP connections opened as fast as possible, each completing the TLS handshake and closing;
/// `parallel` at a time until `stop`.
pub async fn connection_churn(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    parallel: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (config, stop, tally) = (config.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match tokio::time::timeout(Duration::from_secs(5), tls(addr, config.clone())).await
                {
                    Ok(Ok(_)) => tally.opened.fetch_add(1, Ordering::SeqCst),
                    _ => tally.failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `n` TCP connects at once, each given `within`; how many were established.
pub async fn connect_burst(
    addr: SocketAddr,
    n: usize,
    within: Duration,
) -> (usize, Vec<TcpStream>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move { tokio::time::timeout(within, TcpStream::connect(addr)).await });
    }
    let mut held = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Ok(Ok(stream))) = done {
            held.push(stream);
        }
    }
    (held.len(), held)
}

/// Sends `body` `n` times at once over fresh HTTP/1.1 connections; each answer's latency and
/// `response`, or the error.
pub async fn huge_reviews(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    body: Arc<Vec<u8>>,
    n: usize,
) -> Vec<Result<(Duration, Value)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (config, body) = (config.clone(), body.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let (status, answer) = post_once(addr, config, &body).await?;
            if status != 200 {
                return Err(format!("HTTP {status}").into());
            }
            Ok((started.elapsed(), response_of(&answer)))
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done.unwrap_or_else(|e| Err(e.to_string().into())));
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Raw HTTP/2 frames, for what a well-behaved client never does.

pub mod frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `POST /mutate` for `localhost`, HPACK without the dynamic table.
    pub fn post_headers() -> Vec<u8> {
        let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
        block.push(0x04); // :path, literal value
        block.push(7);
        block.extend_from_slice(b"/mutate");
        block.push(0x01); // :authority, literal value
        block.push(9);
        block.extend_from_slice(b"localhost");
        block
    }
}

/// Reads one frame: (type, flags, stream, payload).
pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok((head[3], head[4], id, payload))
}

/// Opens an HTTP/2 connection by hand and returns it with the server's SETTINGS.
pub async fn h2_raw(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(TlsStream<TcpStream>, Vec<(u16, u32)>)> {
    use frames::*;
    let mut stream = tls(addr, config).await?;
    stream.write_all(PREFACE).await?;
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    stream.flush().await?;
    loop {
        let (kind, flags, _, payload) = read_frame(&mut stream).await?;
        if kind == SETTINGS && flags & ACK == 0 {
            let settings = payload
                .chunks_exact(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
            stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
            stream.flush().await?;
            return Ok((stream, settings));
        }
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): `streams` HEADERS each followed at once by RST_STREAM, in
/// one write. Returns the GOAWAY error code the server answered with, if any (within 5 s).
pub async fn rapid_reset(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    streams: u32,
) -> Result<Option<u32>> {
    use frames::*;
    let (mut stream, _) = h2_raw(addr, config).await?;
    let block = post_headers();
    let mut burst = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The server may close mid-write once it has seen enough.
    let _ = stream.write_all(&burst).await;
    let _ = stream.flush().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, read_frame(&mut stream)).await {
            Ok(Ok((GOAWAY, _, _, payload))) if payload.len() >= 8 => {
                return Ok(Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ])));
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Ok(None),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Probes: what the API server and the kubelet see while an attack runs.

/// Probe results over an attack.
#[derive(Debug, Default, Clone)]
pub struct Probes {
    pub readyz: Vec<Option<Duration>>,
    pub admissions: Vec<Option<Duration>>,
    pub max_fds: usize,
    pub max_rss_kib: u64,
}

impl Probes {
    pub fn success(samples: &[Option<Duration>]) -> (usize, usize) {
        (
            samples.iter().filter(|s| s.is_some()).count(),
            samples.len(),
        )
    }

    /// A percentile of the successful samples.
    pub fn percentile(samples: &[Option<Duration>], p: f64) -> Option<Duration> {
        let mut ok: Vec<Duration> = samples.iter().flatten().copied().collect();
        if ok.is_empty() {
            return None;
        }
        ok.sort_unstable();
        let i = ((ok.len() as f64 - 1.0) * p).round() as usize;
        Some(ok[i.min(ok.len() - 1)])
    }
}

/// Every `every`: `/readyz` (within `readyz_limit` and 200 to count) and one plain admission over
/// a kept HTTP/2 connection (reconnected when closed; within `admission_limit` and answered
/// allowed with its uid to count); plus the server's fds and RSS. Until `stop`.
pub async fn probe(
    server: &ServerProcess,
    every: Duration,
    readyz_limit: Duration,
    admission_limit: Duration,
    stop: Arc<AtomicBool>,
) -> Probes {
    let mut probes = Probes::default();
    let mut conn: Option<H2> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let tick = tokio::time::Instant::now() + every;
        let ready = tokio::time::timeout(readyz_limit, readyz(server.admin)).await;
        probes.readyz.push(match ready {
            Ok(Ok((200, took))) => Some(took),
            _ => None,
        });
        n += 1;
        let uid = format!("probe-{n}");
        let body = review_of(&uid, &plain_pod());
        let started = Instant::now();
        let answered = tokio::time::timeout(admission_limit, async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = Some(h2(server.addr, server.client(b"h2")).await?.0);
            }
            let sender = conn.as_mut().ok_or("no connection")?;
            h2_post(sender, &body).await
        })
        .await;
        let ok = matches!(&answered, Ok(Ok((200, answer)))
            if response_of(answer)["uid"] == uid.as_str() && response_of(answer)["allowed"] == true);
        if !ok {
            conn = None;
        }
        probes.admissions.push(ok.then(|| started.elapsed()));
        probes.max_fds = probes.max_fds.max(server.fds());
        probes.max_rss_kib = probes.max_rss_kib.max(server.memory_kib().0);
        tokio::time::sleep_until(tick).await;
    }
    probes
}

/// Waits until `path` exists (the server writes its development certificate at start).
pub fn wait_for_file(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
