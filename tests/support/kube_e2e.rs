//! A real Kubernetes control plane for end-to-end tests: `scripts/kube-e2e.sh up` (etcd,
//! kube-apiserver, kube-controller-manager, the project's chart, the webhook as a local process
//! with its ServiceAccount's token), started once per test binary and stopped when it exits.
//!
//! ```ignore
//! let Some(k) = kube_e2e::cluster("my_test") else { return };   // loud SKIP when not built
//! let _shared = k.shared();                                      // vs k.exclusive() for tests
//!                                                                // that stop or reconfigure it
//! let out = k.kubectl().user("alice", &["data-eng"]).args(["create", "-f", "-"]).stdin(yaml).run();
//! ```
//!
//! The binaries come from `scripts/build-k8s-bins.sh` (never built here: a cold build takes ~20
//! minutes). Without them the tests print a loud SKIP line, unless `CI` is set: then they fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Users the tests impersonate; they (and group `e2e-tenants`) may manage pods in test namespaces.
pub const TENANT_USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin"];

/// The data-plane namespace (the stores live there; Spark and Jupyter pods using them run there).
pub const NS: &str = "iomete-system";

/// The running control plane of this test binary.
pub struct Cluster {
    /// State directory of `scripts/kube-e2e.sh` (KUBE_E2E_DIR).
    pub dir: PathBuf,
    /// Admin kubeconfig (`system:masters`, may impersonate).
    pub kubeconfig: PathBuf,
    /// Directory of kubectl, helm, kube-apiserver, etcd.
    pub bin: PathBuf,
    /// The webhook's admin port, `http://127.0.0.1:PORT`.
    pub webhook_admin: String,
    /// The API server, `https://127.0.0.1:PORT`.
    pub server: String,
    lock: RwLock<()>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared cluster, started on first use; `None` after a loud SKIP line when the Kubernetes
/// binaries are not built (outside CI only). Panics when the cluster cannot be started.
pub fn cluster(test: &str) -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Result<Option<Cluster>, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start) {
        Ok(Some(cluster)) => Some(cluster),
        Ok(None) => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{test}: CI is set but the Kubernetes binaries are not built; \
                     run scripts/build-k8s-bins.sh (.ci/run does)"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIP {test}: no Kubernetes binaries (run scripts/build-k8s-bins.sh once, \
                 ~20 min cold); these end-to-end tests did NOT run ***\n"
            );
            None
        }
        Err(e) => panic!("{test}: the control plane did not start: {e}"),
    }
}

fn start() -> Result<Option<Cluster>, String> {
    let dir = tempfile::Builder::new()
        .prefix("kube-e2e-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let out = Command::new("bash")
        .arg(repo().join("scripts/kube-e2e.sh"))
        .arg("up")
        .env("KUBE_E2E_DIR", &dir)
        .env("KUBE_E2E_NO_BUILD", "1")
        .env("KUBE_E2E_OWNER_PID", std::process::id().to_string())
        .env("WEBHOOK_BIN", env!("CARGO_BIN_EXE_secrets-webhook"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scripts/kube-e2e.sh: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(None);
    }
    if !out.status.success() {
        return Err(format!("scripts/kube-e2e.sh up failed:\n{stderr}"));
    }
    let exports = String::from_utf8_lossy(&out.stdout);
    let var = |name: &str| {
        exports
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(str::to_owned)
            .ok_or_else(|| format!("`up` printed no {name}:\n{exports}"))
    };
    let kubeconfig = PathBuf::from(var("KUBECONFIG")?);
    let cluster = Cluster {
        dir,
        server: server_of(&kubeconfig)?,
        kubeconfig,
        bin: PathBuf::from(var("KUBE_E2E_BIN")?),
        webhook_admin: var("KUBE_E2E_WEBHOOK_ADMIN")?,
        lock: RwLock::new(()),
    };
    cluster.install_test_tenants();
    Ok(Some(cluster))
}

fn server_of(kubeconfig: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(kubeconfig).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .map(str::to_owned)
        .ok_or_else(|| "no server in the kubeconfig".into())
}

/// A unique name for this test binary: `prefix-<pid>-<n>` (DNS-1123).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What a command printed, and whether it succeeded.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(what: &str, out: std::io::Result<Output>) -> Self {
        let out = out.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Run {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stdout; panics with stderr when the command failed.
    pub fn ok(self) -> String {
        assert!(self.success, "command failed: {}", self.stderr);
        self.stdout
    }

    /// Stderr; panics when the command succeeded.
    pub fn err(self) -> String {
        assert!(!self.success, "command succeeded: {}", self.stdout);
        self.stderr
    }

    /// Stdout parsed as JSON; panics when the command failed.
    pub fn json(self) -> Value {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}

/// `kubectl` with the admin kubeconfig, optionally impersonating a user.
pub struct Kubectl {
    command: Command,
    stdin: Option<String>,
}

impl Kubectl {
    /// Impersonates `user` with `groups` (the API server adds `system:authenticated`).
    pub fn user(mut self, user: &str, groups: &[&str]) -> Self {
        self.command.arg("--as").arg(user);
        for group in groups {
            self.command.arg("--as-group").arg(group);
        }
        self
    }

    pub fn ns(mut self, namespace: &str) -> Self {
        self.command.arg("-n").arg(namespace);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn stdin(mut self, text: impl Into<String>) -> Self {
        self.stdin = Some(text.into());
        self
    }

    pub fn run(mut self) -> Run {
        self.command.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        self.command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.command.spawn().expect("kubectl");
        if let Some(text) = self.stdin.take() {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        Run::from("kubectl", child.wait_with_output())
    }
}

impl Cluster {
    /// Tests that only add objects of their own hold this for their whole run.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Tests that stop, restart or reconfigure the webhook hold this (no other test runs).
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn kubectl(&self) -> Kubectl {
        let mut command = Command::new(self.bin.join("kubectl"));
        command.env("KUBECONFIG", &self.kubeconfig);
        // A per-binary discovery cache (kubectl's default is under $HOME).
        command.env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        Kubectl {
            command,
            stdin: None,
        }
    }

    /// A `kube::Client` with the admin credentials (call inside a tokio runtime).
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }

    /// `kubectl` authenticated by a bearer token only (e.g. a ServiceAccount's, see [`Cluster::token`]).
    pub fn kubectl_with_token(&self, token: &str) -> Kubectl {
        let mut command = Command::new(self.bin.join("kubectl"));
        command
            .env("KUBECONFIG", "/dev/null")
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"))
            .arg(format!("--server={}", self.server))
            .arg(format!(
                "--certificate-authority={}",
                self.dir.join("pki/ca.crt").display()
            ))
            .arg(format!("--token={token}"));
        Kubectl {
            command,
            stdin: None,
        }
    }

    /// `helm` with the admin kubeconfig and its caches in the state directory.
    pub fn helm<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let home = self.dir.join("helm");
        Run::from(
            "helm",
            Command::new(self.bin.join("helm"))
                .args(args)
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HELM_CACHE_HOME", home.join("cache"))
                .env("HELM_CONFIG_HOME", home.join("config"))
                .env("HELM_DATA_HOME", home.join("data"))
                .stdin(Stdio::null())
                .output(),
        )
    }

    /// `kubectl apply -f -` as admin.
    pub fn apply(&self, yaml: &str) {
        self.kubectl()
            .args(["apply", "-f", "-"])
            .stdin(yaml)
            .run()
            .ok();
    }

    /// An object as JSON, or `None` when it does not exist.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let run = self
            .kubectl()
            .ns(namespace)
            .args(["get", kind, name, "-o", "json", "--ignore-not-found"])
            .run();
        let text = run.ok();
        (!text.trim().is_empty()).then(|| serde_json::from_str(&text).expect("JSON"))
    }

    /// A fresh namespace where the test users and the namespace's own ServiceAccounts may manage
    /// pods, configmaps and services (the `e2e-tenant` ClusterRole), with its `default`
    /// ServiceAccount in place.
    pub fn namespace(&self, prefix: &str) -> String {
        let name = unique(prefix);
        self.kubectl()
            .args(["create", "namespace", &name])
            .run()
            .ok();
        self.bind_tenants(&name);
        self.wait_until(&format!("ServiceAccount {name}/default"), || {
            self.get("serviceaccount", &name, "default").is_some()
        });
        name
    }

    /// The `e2e-tenant` role for the test users ([`TENANT_USERS`], group `e2e-tenants`) and, in a
    /// tenant namespace, its own ServiceAccounts. Not `system:authenticated`: the webhook's
    /// ServiceAccount must hold nothing but the shipped RBAC.
    pub fn bind_tenants(&self, namespace: &str) {
        let mut subjects: Vec<Value> = TENANT_USERS
            .iter()
            .map(|u| serde_json::json!({"kind": "User", "name": u, "apiGroup": "rbac.authorization.k8s.io"}))
            .collect();
        subjects.push(serde_json::json!({"kind": "Group", "name": "e2e-tenants", "apiGroup": "rbac.authorization.k8s.io"}));
        if namespace != NS {
            subjects.push(serde_json::json!({"kind": "Group", "name": format!("system:serviceaccounts:{namespace}"),
                                             "apiGroup": "rbac.authorization.k8s.io"}));
        }
        self.apply(
            &serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "e2e-tenants", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "e2e-tenant"},
                "subjects": subjects})
            .to_string(),
        );
    }

    /// Grants the tenant role in the data-plane namespace to one ServiceAccount (Spark's, the hub's).
    pub fn bind_tenant_service_account(&self, namespace: &str, name: &str) {
        self.apply(
            &serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": format!("e2e-tenant-{namespace}-{name}"), "namespace": NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "e2e-tenant"},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
            .to_string(),
        );
    }

    /// What a tenant may do: pods, and what Spark's submission client creates with them. No
    /// Secrets: tenants cannot read the stores.
    fn install_test_tenants(&self) {
        self.apply(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: e2e-tenant}
rules:
- apiGroups: ['']
  resources: [pods, configmaps, services, persistentvolumeclaims]
  verbs: ['*']
# Spark 4 submits a NetworkPolicy per application.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: ['*']
- apiGroups: ['']
  resources: [serviceaccounts]
  verbs: [get, list]
",
        );
        self.bind_tenants(NS);
    }

    /// A ServiceAccount token from the TokenRequest API; bound to a pod when `pod` is given (the
    /// token then carries the pod's name and uid).
    pub fn token(&self, namespace: &str, service_account: &str, pod: Option<&str>) -> String {
        let mut args = vec![
            "create".to_string(),
            "token".into(),
            service_account.into(),
            "--duration=1h".into(),
        ];
        if let Some(pod) = pod {
            args.push("--bound-object-kind=Pod".into());
            args.push(format!("--bound-object-name={pod}"));
        }
        self.kubectl()
            .ns(namespace)
            .args(args)
            .run()
            .ok()
            .trim()
            .to_owned()
    }

    /// A client certificate for `user` in `groups` (CN and O), signed by the cluster's CA: the way
    /// a real user authenticates without impersonation. Returns (certificate, PKCS#8 RSA key) files.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("users");
        std::fs::create_dir_all(&dir).unwrap();
        let (crt, key, csr) = (
            dir.join(format!("{user}.crt")),
            dir.join(format!("{user}.key")),
            dir.join(format!("{user}.csr")),
        );
        let subject: String = groups
            .iter()
            .map(|g| format!("/O={g}"))
            .chain([format!("/CN={user}")])
            .collect();
        let pki = self.dir.join("pki");
        let openssl = |args: &[&str]| {
            let run = Run::from("openssl", Command::new("openssl").args(args).output());
            assert!(run.success, "openssl {args:?}: {}", run.stderr);
        };
        let (crt_s, key_s, csr_s) = (
            crt.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
            csr.to_string_lossy().into_owned(),
        );
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &key_s,
        ]);
        openssl(&[
            "req", "-new", "-key", &key_s, "-subj", &subject, "-out", &csr_s,
        ]);
        let ext = dir.join(format!("{user}.ext"));
        std::fs::write(
            &ext,
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr_s,
            "-CA",
            &pki.join("ca.crt").to_string_lossy(),
            "-CAkey",
            &pki.join("ca.key").to_string_lossy(),
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            &ext.to_string_lossy(),
            "-out",
            &crt_s,
        ]);
        (crt, key)
    }

    /// The cluster CA's certificate (what clients trust for the API server).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// A kubeconfig that authenticates with `token` (e.g. a ServiceAccount's), for other clients.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
                 users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: u}}\ncurrent-context: e2e\n",
                self.server,
                self.ca_file().display()
            ),
        )
        .unwrap();
        path
    }

    /// The webhook's Prometheus text (`GET /metrics` on its admin port).
    pub fn metrics(&self) -> String {
        http_get(&self.webhook_admin, "/metrics")
    }

    /// Everything the webhook process logged so far (JSON lines).
    pub fn webhook_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/webhook.log")).unwrap_or_default()
    }

    /// The API server's audit events for the webhook's ServiceAccount (metadata only).
    pub fn webhook_audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("logs/audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the webhook process (hold [`Cluster::exclusive`]).
    pub fn stop_webhook(&self) {
        self.script("webhook-stop");
    }

    /// Starts the webhook again from the installed Deployment (args, env, mounted Secret and
    /// ConfigMap as stored now), as a kubelet would after an upgrade (hold [`Cluster::exclusive`]).
    pub fn start_webhook(&self) {
        self.script("webhook-start");
        self.wait_until("webhook /readyz", || {
            http_get_status(&self.webhook_admin, "/readyz") == Some(200)
        });
    }

    fn script(&self, command: &str) {
        let run = Run::from(
            "scripts/kube-e2e.sh",
            Command::new("bash")
                .arg(repo().join("scripts/kube-e2e.sh"))
                .arg(command)
                .env("KUBE_E2E_DIR", &self.dir)
                .stdin(Stdio::null())
                .output(),
        );
        assert!(run.success, "kube-e2e.sh {command}: {}", run.stderr);
    }

    /// Polls `done` every 100 ms for up to 30 s.
    pub fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        self.eventually(what, || if done() { Ok(()) } else { Err(String::new()) })
    }

    /// Polls `attempt` every 100 ms for up to 30 s; its value, or a panic with its last error.
    pub fn eventually<T>(&self, what: &str, attempt: impl FnMut() -> Result<T, String>) -> T {
        self.eventually_within(what, Duration::from_secs(30), attempt)
    }

    /// [`Cluster::eventually`] with another time limit (e.g. for JVM clients).
    pub fn eventually_within<T>(
        &self,
        what: &str,
        limit: Duration,
        mut attempt: impl FnMut() -> Result<T, String>,
    ) -> T {
        let until = Instant::now() + limit;
        loop {
            match attempt() {
                Ok(value) => return value,
                Err(e) if Instant::now() >= until => {
                    panic!("{what}: not within {limit:?}; last: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// One plain-HTTP GET (the webhook's admin port); the body.
pub fn http_get(base: &str, path: &str) -> String {
    http(base, path).map(|(_, body)| body).unwrap_or_default()
}

fn http_get_status(base: &str, path: &str) -> Option<u16> {
    http(base, path).map(|(status, _)| status)
}

fn http(base: &str, path: &str) -> Option<(u16, String)> {
    let host = base.strip_prefix("http://")?;
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}
