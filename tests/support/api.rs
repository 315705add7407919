//! The management API served for real (rustls, 127.0.0.1:0) by the same `server::bind` as
//! `serve`, in `--dev` shape (in-memory stores) or in cluster shape over a `kube::Client`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use secrets_webhook::admission::Webhook;
use secrets_webhook::api::Api;
use secrets_webhook::config::{LocalConfig, Settings};
use secrets_webhook::metrics::Metrics;
use secrets_webhook::server::{ServerOptions, bind};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::tls::{CertDir, Pki, https_client, init};

pub struct ApiServer {
    pub base: String,
    /// The test CA that issued the server's certificate.
    pub ca_pem: String,
    pub client: reqwest::Client,
    pub webhook: Arc<Webhook>,
    pub api: Arc<Api>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// One answer, kept whole so tests can search every byte of it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn etag(&self) -> String {
        self.header("etag").expect("an ETag")
    }
    /// Everything a client sees, for canary searches.
    pub fn everything(&self) -> String {
        let mut all = format!("{}\n", self.status);
        for (k, v) in &self.headers {
            all.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
        }
        all.push_str(&self.text);
        all
    }
}

impl ApiServer {
    /// `--dev` shape from a config file's text.
    pub async fn dev(config_yaml: &str) -> Self {
        let config = LocalConfig::parse(config_yaml).unwrap();
        let (webhook, api) =
            secrets_webhook::api::dev(Settings::default(), &config, Arc::new(Metrics::new()))
                .unwrap();
        Self::serve(webhook, api).await
    }

    pub async fn serve(webhook: Webhook, api: Arc<Api>) -> Self {
        init();
        let pki = Pki::new("api test CA");
        let pair = pki.serving_pair();
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path(), &pair.chain_pem, &pair.key_pem);
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut options = ServerOptions::new(loopback, loopback, certs.cert(), certs.key());
        options.api_listen = Some(loopback);
        let webhook = Arc::new(webhook);
        let bound = bind(options, Arc::clone(&webhook)).await.unwrap();
        let addr = bound.api_addr().unwrap();
        let bound = bound.with_api(Arc::clone(&api).router());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        Self {
            base: format!("https://localhost:{}", addr.port()),
            ca_pem: pki.ca_pem(),
            client: https_client(&pki.ca_pem()),
            webhook,
            api,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.unwrap();
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), &[], None).await
    }

    pub async fn put(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Answer {
        self.call(Method::PUT, path, Some(token), headers, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Answer {
        self.call(Method::DELETE, path, Some(token), headers, None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Option<Value>) -> Answer {
        self.call(Method::POST, path, Some(token), &[], body).await
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The config the API tests share: bundles for domain and Vault permissions, tokens, one admin.
pub const CONFIG: &str = r#"
namespace: iomete-system
stores:
  global: [warehouse_path]
  domains: {finance: [db_password], marketing: [ga_token]}
resourceBundles:
  - name: finance-bundle
    domains: [finance]
    grants:
      - {subjects: [{kind: User, name: alice}], permissions: [use, view, update]}
      - {subjects: [{kind: User, name: bob}], permissions: [view]}
      - {subjects: [{kind: User, name: uma}], permissions: [use]}
  - name: vault-bundle
    grants:
      - {subjects: [{kind: User, name: alice}], permissions: [use, view]}
      - {subjects: [{kind: User, name: victor}], permissions: [view, update]}
apiTokens:
  - {token: t-alice, user: alice}
  - {token: t-bob, user: bob}
  - {token: t-uma, user: uma}
  - {token: t-carol, user: carol}
  - {token: t-victor, user: victor}
  - {token: t-admin, user: root-admin, groups: [platform-admins]}
  - {token: t-console, user: "system:serviceaccount:iomete:console"}
apiAdmins:
  - {kind: Group, name: platform-admins}
consoleBackends:
  - {username: "system:serviceaccount:iomete:console"}
"#;
