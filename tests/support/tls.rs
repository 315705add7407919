//! Helpers for the real-TLS server tests: a throwaway PKI (rcgen), a certificate folder laid out the
//! way the kubelet mounts a Secret (`..data` symlink swap), the test server, and small TLS/HTTP
//! clients that can look at the presented certificate and send byte-exact (also broken) requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use secrets_webhook::admission::Webhook;
use secrets_webhook::backends::local::LocalStores;
use secrets_webhook::backends::{StoreCheck, StoreIndex};
use secrets_webhook::config::{LocalConfig, Settings};
use secrets_webhook::metrics::Metrics;
use secrets_webhook::server::{ServerOptions, bind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// rustls needs one process-wide provider for reqwest; the server and the raw clients name theirs.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A test CA that issues serving certificates for `localhost` and `127.0.0.1`.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A serving certificate chain (leaf, then CA) and its key, as PEM, plus the leaf's DER.
#[derive(Clone)]
pub struct ServingPair {
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf_der: Vec<u8>,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A fresh leaf for localhost/127.0.0.1, valid until 2099.
    pub fn serving_pair(&self) -> ServingPair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &*self.ca).unwrap();
        ServingPair {
            chain_pem: format!("{}{}", leaf.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            leaf_der: leaf.der().to_vec(),
        }
    }
}

/// A folder shaped like a kubelet Secret volume: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<generation>`; [`CertDir::swap`] replaces `..data` atomically, as the kubelet does.
pub struct CertDir {
    root: PathBuf,
    generation: u32,
}

impl CertDir {
    pub fn new(root: &Path, cert_pem: &str, key_pem: &str) -> Self {
        let mut dir = Self {
            root: root.to_owned(),
            generation: 0,
        };
        dir.swap(cert_pem, key_pem);
        std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).unwrap();
        dir
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }

    /// Writes a new generation folder, then renames a fresh `..data_tmp` symlink over `..data`.
    pub fn swap(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let name = format!("..gen_{}", self.generation);
        let generation = self.root.join(&name);
        std::fs::create_dir(&generation).unwrap();
        std::fs::write(generation.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(generation.join("tls.key"), key_pem).unwrap();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
    }
}

/// The store index `Webhook::from_local` builds, behind a readiness switch the test flips (stands in
/// for a watch cache that has not listed yet).
pub struct StoresGate {
    pub ready: AtomicBool,
    inner: LocalStores,
}

impl StoreIndex for StoresGate {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.inner.ready()
    }

    fn check(&self, store: &str, key: &str) -> StoreCheck {
        self.inner.check(store, key)
    }
}

/// The engine the server tests run against: the local-config engine (default settings, an
/// empty config), with its store index behind a [`StoresGate`].
pub fn test_webhook() -> (Arc<Webhook>, Arc<StoresGate>) {
    let settings = Settings::default();
    let config = LocalConfig::default();
    let gate = Arc::new(StoresGate {
        ready: AtomicBool::new(true),
        inner: LocalStores::new(&config.stores, &settings.naming),
    });
    let mut webhook = Webhook::from_local(settings, &config, Arc::new(Metrics::new())).unwrap();
    webhook.stores = gate.clone();
    (Arc::new(webhook), gate)
}

/// A running server on 127.0.0.1:0; dropped = aborted.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stores: Arc<StoresGate>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves the certificate in `dir`; `tune` adjusts the options (timeouts, limits).
    pub async fn start(dir: &CertDir, tune: impl FnOnce(&mut ServerOptions)) -> Self {
        init();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut options = ServerOptions::new(loopback, loopback, dir.cert(), dir.key());
        options.reload_interval = Duration::from_millis(100);
        tune(&mut options);
        let (webhook, stores) = test_webhook();
        let bound = bind(options, webhook).await.unwrap();
        let (addr, admin_addr) = (bound.addr(), bound.admin_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin_addr,
            stores,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Completes the shutdown future given to `serve` (what SIGTERM does in `run_serve`).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return.
    pub async fn finished(&mut self) {
        self.task.take().unwrap().await.unwrap()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{path_and_query}", self.addr.port())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// reqwest over rustls trusting only `ca_pem` (ALPN offers h2, so this speaks HTTP/2).
pub fn https_client(ca_pem: &str) -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
}

/// Plain HTTP client for the admin port.
pub fn http_client() -> reqwest::Client {
    init();
    reqwest::Client::builder().build().unwrap()
}

/// A rustls client trusting `cas`; `versions` limits the protocol versions; ALPN http/1.1 or h2.
pub fn client_config(
    cas: &[CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// TLS 1.2 and 1.3, HTTP/1.1, trusting `cas`.
pub fn http1_config(cas: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    client_config(
        cas,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        b"http/1.1",
    )
}

/// Connects and completes the TLS handshake for `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The leaf certificate the server presented on `stream`.
pub fn presented_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A byte-exact HTTP/1.1 POST with a Content-Length and keep-alive.
pub fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// An HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one response (Content-Length bodies only, which is what the server sends).
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap();
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
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            return Ok(RawResponse { status, head, body });
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `request` and reads the response on an open connection.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> std::io::Result<RawResponse> {
    stream.write_all(request).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// Waits until the peer closes `stream` (EOF or reset); returns how long that took.
pub async fn time_until_closed<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

/// A minimal admission.k8s.io/v1 AdmissionReview for a plain pod.
pub fn review(uid: &str) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "spark-jobs",
            "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "plain", "namespace": "spark-jobs"},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]}
            },
            "dryRun": false
        }
    })
    .to_string()
}
