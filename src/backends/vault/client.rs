//! One Vault client per config: the session (login, renewal, re-login), mount discovery, reads
//! with retries inside a time budget, the per-path read cache with coalescing, and the
//! classification that gives each failure its own text.
//!
//! vaultrs does the Vault calls; we build its HTTP client ourselves so every setting is explicit:
//! timeouts, no redirects (a redirect would carry the token elsewhere), no proxy, the configured CA.
//! Nothing is taken from `VAULT_*` or proxy environment variables.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use serde::Deserialize;
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::spec::{Auth, Credential, Target, header_safe};
use super::{SecretFields, SecretValue, VaultError, VaultOptions};

/// Most attempts of one call when Vault answers 412, 429 or 503 (not sealed).
const MAX_ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Renew when less than this share of the token's lifetime is left.
const RENEW_FRACTION: u32 = 3;

/// A logged-in client. Never printed: it holds the token.
pub(crate) struct Session {
    client: Arc<VaultClient>,
    expires: Option<Instant>,
    ttl: Duration,
    renewable: bool,
}

impl Session {
    fn fresh(&self) -> bool {
        self.expires
            .is_none_or(|at| Instant::now() + self.ttl / RENEW_FRACTION < at)
    }

    fn renew_at(&self) -> Option<Instant> {
        self.expires.map(|at| at - self.ttl / RENEW_FRACTION)
    }

    pub(crate) fn describe(&self) -> String {
        match (self.expires, self.renewable) {
            (None, _) => "token does not expire".into(),
            (Some(_), true) => format!("token ttl {}s, renewable", self.ttl.as_secs()),
            (Some(_), false) => format!("token ttl {}s, not renewable", self.ttl.as_secs()),
        }
    }
}

/// Where secrets of this config live in Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Mount path without slashes at the ends, e.g. `secret`.
    pub mount: String,
    /// Secret path below the mount (without `data/`), e.g. `production`; may be empty.
    pub base: String,
    /// False when the token may not inspect mounts and the split was guessed from the path.
    pub checked: bool,
}

impl Layout {
    pub(crate) fn secret_path(&self, rel: &str) -> String {
        match (self.base.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.base.clone(),
            (false, false) => format!("{}/{rel}", self.base),
        }
    }

    /// The API path a policy must allow, e.g. `secret/data/production`.
    pub(crate) fn api_path(&self, secret: &str) -> String {
        format!("{}/data/{secret}", self.mount)
    }
}

/// A raw failure of one call, before it gets its user-facing text.
#[derive(Debug)]
pub(crate) enum Failure {
    Status {
        code: u16,
        errors: Vec<String>,
        /// Only kept for 404 (the KV v2 answer for deleted versions carries their metadata).
        body: Option<String>,
    },
    Transport(String),
    TimedOut,
    Denied(VaultError),
    Unexpected(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        use rustify::errors::ClientError as Rest;
        match e {
            ClientError::APIError { code, errors } => Failure::Status {
                code,
                errors,
                body: None,
            },
            ClientError::RestClientError { source } => match source {
                Rest::ServerResponseError { code, content } => Failure::Status {
                    code,
                    errors: Vec::new(),
                    body: if code == 404 { content } else { None },
                },
                Rest::RequestError { source, .. } => {
                    let timed_out = source.chain().any(|c| {
                        c.downcast_ref::<vault_http::Error>()
                            .is_some_and(|e| e.is_timeout())
                    });
                    if timed_out {
                        Failure::TimedOut
                    } else {
                        // The innermost cause is the useful part ("Connection refused (os error 111)").
                        let reason = source
                            .chain()
                            .last()
                            .map(ToString::to_string)
                            .unwrap_or_else(|| "request failed".into());
                        Failure::Transport(reason)
                    }
                }
                // Parse errors may quote the body: never show them.
                Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => {
                    Failure::Unexpected("Vault's answer could not be parsed".into())
                }
                other => Failure::Unexpected(other.to_string()),
            },
            // serde's message can quote a value: never show it.
            ClientError::JsonParseError { .. } => {
                Failure::Unexpected("Vault's answer had an unexpected shape".into())
            }
            other => Failure::Unexpected(other.to_string()),
        }
    }
}

fn is_sealed(errors: &[String]) -> bool {
    errors
        .iter()
        .any(|e| e.to_ascii_lowercase().contains("sealed"))
}

/// `GET sys/internal/ui/mounts/:path`: which mount serves a path, and its type and version. Any
/// token with a capability below the mount may ask.
struct UiMountRequest {
    path: String,
}

#[derive(Debug, Deserialize)]
struct UiMount {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    options: Option<HashMap<String, String>>,
}

impl rustify::endpoint::Endpoint for UiMountRequest {
    type Response = UiMount;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("sys/internal/ui/mounts/{}", self.path)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// KV v2's 404 body for a deleted or destroyed current version (metadata only, no values).
#[derive(Deserialize)]
struct NotFoundBody {
    data: Option<NotFoundData>,
}

#[derive(Deserialize)]
struct NotFoundData {
    metadata: Option<VersionMetadata>,
}

#[derive(Deserialize)]
struct VersionMetadata {
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
    #[serde(default)]
    version: u64,
}

/// A read result shared by every caller waiting for it.
#[derive(Clone)]
struct Fetched {
    at: Instant,
    result: Result<Arc<SecretFields>, VaultError>,
}

struct Slot {
    id: u64,
    fetch: Shared<BoxFuture<'static, Fetched>>,
}

pub(crate) struct Conn {
    pub target: Target,
    http: vault_http::Client,
    kube: Option<kube::Client>,
    opts: VaultOptions,
    session: Mutex<Option<Arc<Session>>>,
    login_lock: tokio::sync::Mutex<()>,
    layout: tokio::sync::OnceCell<Layout>,
    cache: Mutex<HashMap<String, Slot>>,
    next_slot: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps inconsistent: keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Conn {
    pub(crate) fn new(
        target: Target,
        kube: Option<kube::Client>,
        opts: VaultOptions,
    ) -> Result<Arc<Self>, VaultError> {
        let invalid = |reason: String| VaultError::InvalidConfig {
            config: target.name.clone(),
            reason,
        };
        // reqwest panics without a process-wide rustls provider; main installs ring first, this
        // covers library users and tests (an "already installed" error is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = vault_http::Client::builder()
            .timeout(opts.request_timeout)
            .connect_timeout(opts.request_timeout)
            .redirect(vault_http::redirect::Policy::none())
            .no_proxy()
            .tls_backend_rustls();
        if target.host.scheme() == "http" {
            // Plain HTTP needs no roots; this also sidesteps loading platform roots
            // (the same workaround vaultrs applies, reqwest#2988).
            builder = builder.tls_certs_only(Vec::new());
        } else if let Some(pem) = &target.ca_pem {
            let certs = vault_http::Certificate::from_pem_bundle(pem)
                .map_err(|e| invalid(format!("CA certificate is not valid PEM ({e})")))?;
            if certs.is_empty() {
                return Err(invalid("CA certificate holds no certificate".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client ({e})")))?;
        Ok(Arc::new(Self {
            target,
            http,
            kube,
            opts,
            session: Mutex::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            layout: tokio::sync::OnceCell::new(),
            cache: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
        }))
    }

    fn name(&self) -> String {
        self.target.name.clone()
    }

    fn host(&self) -> String {
        self.target.host_label()
    }

    /// A vaultrs client with every setting explicit (its builder would read `VAULT_*` otherwise).
    fn client(&self, token: &str) -> Result<VaultClient, VaultError> {
        let settings = VaultClientSettingsBuilder::default()
            .address(self.target.host.as_str())
            .ca_certs(Vec::new())
            .identity(None)
            .timeout(Some(self.opts.request_timeout))
            .token(token)
            .verify(true)
            .version(1u8)
            .wrapping(false)
            .namespace(self.target.namespace.clone())
            .build()
            .map_err(|e| VaultError::InvalidConfig {
                config: self.name(),
                reason: e.to_string(),
            })?;
        let middle = EndpointMiddleware {
            token: token.to_string(),
            version: "v1".into(),
            wrap: None,
            namespace: self.target.namespace.clone(),
        };
        let http =
            rustify::clients::reqwest::Client::new(self.target.host.as_str(), self.http.clone());
        Ok(VaultClient {
            http,
            middle,
            settings,
        })
    }

    // ---- failures -------------------------------------------------------------------------

    pub(crate) fn classify(&self, failure: Failure, api_path: &str) -> VaultError {
        let (config, host) = (self.name(), self.host());
        match failure {
            Failure::Denied(e) => e,
            Failure::TimedOut => VaultError::Timeout {
                config,
                host,
                millis: self.opts.request_timeout.as_millis() as u64,
            },
            Failure::Transport(reason) => VaultError::Unreachable {
                config,
                host,
                reason,
            },
            Failure::Unexpected(reason) => VaultError::Protocol {
                config,
                host,
                reason,
            },
            Failure::Status { code, errors, .. } => match code {
                403 => VaultError::PermissionDenied {
                    config,
                    path: api_path.to_string(),
                },
                404 => VaultError::SecretNotFound {
                    config,
                    path: api_path.to_string(),
                },
                503 if is_sealed(&errors) => VaultError::Sealed { config, host },
                412 | 429 | 503 => VaultError::Unavailable { config, host, code },
                300..=399 => VaultError::Redirected { config, host, code },
                _ => VaultError::Server {
                    config,
                    host,
                    code,
                    detail: errors
                        .first()
                        .map(|e| e.chars().take(200).collect())
                        .unwrap_or_else(|| "no detail".into()),
                },
            },
        }
    }

    fn timed_out(&self) -> VaultError {
        self.classify(Failure::TimedOut, "")
    }

    // ---- calls ----------------------------------------------------------------------------

    /// Runs `op` until it succeeds, fails for good, or `until` passes. Retries 412/429/503 (not
    /// sealed) with backoff; never 400/403/404. Each attempt is bounded by the request timeout.
    async fn attempt<T, Fut>(&self, until: Instant, op: impl Fn() -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 1;
        loop {
            let bound = (Instant::now() + self.opts.request_timeout).min(until);
            let result = match tokio::time::timeout_at(bound.into(), op()).await {
                Err(_) => Err(Failure::TimedOut),
                Ok(r) => r.map_err(Failure::from),
            };
            self.count_request(&result);
            match result {
                Err(Failure::Status { code, errors, .. })
                    if matches!(code, 412 | 429 | 503)
                        && !is_sealed(&errors)
                        && attempts < MAX_ATTEMPTS
                        && Instant::now() + backoff < until =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    /// One HTTP request to Vault: `ok`, `not-found` (404: no such secret, or an empty folder), or
    /// `error` (any other status, a transport failure, a timeout).
    fn count_request<T>(&self, result: &Result<T, Failure>) {
        if let Some(metrics) = &self.opts.metrics {
            let outcome = match result {
                Ok(_) => "ok",
                Err(Failure::Status { code: 404, .. }) => "not-found",
                Err(_) => "error",
            };
            metrics.backend_call("vault", outcome);
        }
    }

    /// An authenticated call. A 403 may mean the token expired or was revoked: log in again
    /// once and retry; a second 403 is a real permission denial.
    async fn call<T, F, Fut>(self: &Arc<Self>, until: Instant, op: F) -> Result<T, Failure>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let session = self.session(until).await.map_err(Failure::Denied)?;
        match self.attempt(until, || op(session.clone())).await {
            Err(Failure::Status { code: 403, .. }) => {
                self.invalidate(&session);
                let session = self.session(until).await.map_err(Failure::Denied)?;
                self.attempt(until, || op(session.clone())).await
            }
            other => other,
        }
    }

    // ---- session --------------------------------------------------------------------------

    fn current(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone()
    }

    fn is_current(&self, session: &Arc<Session>) -> bool {
        lock(&self.session)
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, session))
    }

    fn invalidate(&self, session: &Arc<Session>) {
        let mut current = lock(&self.session);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }

    /// The shared session: one login per config, renewed before expiry, replaced when gone.
    pub(crate) async fn session(
        self: &Arc<Self>,
        until: Instant,
    ) -> Result<Arc<Session>, VaultError> {
        if let Some(s) = self.current().filter(|s| s.fresh()) {
            return Ok(s);
        }
        let _guard = tokio::time::timeout_at(until.into(), self.login_lock.lock())
            .await
            .map_err(|_| self.timed_out())?;
        if let Some(s) = self.current() {
            if s.fresh() {
                return Ok(s);
            }
            if s.renewable && s.expires.is_some_and(|at| Instant::now() < at) {
                if let Ok(renewed) = self.renew(&s, until).await {
                    return Ok(renewed);
                }
            }
        }
        let session = Arc::new(self.login(until).await?);
        *lock(&self.session) = Some(session.clone());
        self.spawn_renewer(&session);
        Ok(session)
    }

    async fn read_credential(
        &self,
        credential: &Credential,
        until: Instant,
    ) -> Result<String, VaultError> {
        let unreadable = |reason: String| VaultError::Credentials {
            config: self.name(),
            reason,
        };
        let raw = match credential {
            Credential::Memory(value) => String::from_utf8(value.expose().to_vec())
                .map_err(|_| unreadable(format!("{credential} is not UTF-8 text")))?,
            Credential::File(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| unreadable(format!("cannot read {credential}: {e}")))?,
            Credential::Secret {
                namespace,
                name,
                key,
            } => {
                let client = self
                    .kube
                    .clone()
                    .ok_or_else(|| unreadable(format!("{credential} needs a cluster")))?;
                let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
                    kube::Api::namespaced(client, namespace);
                let secret = tokio::time::timeout_at(until.into(), api.get_opt(name))
                    .await
                    .map_err(|_| unreadable(format!("reading {credential} timed out")))?
                    .map_err(|e| unreadable(format!("cannot read {credential}: {e}")))?
                    .ok_or_else(|| {
                        unreadable(format!("{credential}: the Secret does not exist"))
                    })?;
                let bytes = secret
                    .data
                    .and_then(|mut d| d.remove(key))
                    .ok_or_else(|| unreadable(format!("{credential}: the key does not exist")))?;
                String::from_utf8(bytes.0)
                    .map_err(|_| unreadable(format!("{credential} is not UTF-8 text")))?
            }
        };
        let value = raw.trim().to_string();
        if !header_safe(&value) {
            return Err(unreadable(format!(
                "{credential} is empty or has characters a Vault credential cannot have"
            )));
        }
        Ok(value)
    }

    async fn login(self: &Arc<Self>, until: Instant) -> Result<Session, VaultError> {
        let (config, host) = (self.name(), self.host());
        match &self.target.auth {
            Auth::Token(credential) => {
                let token = self.read_credential(credential, until).await?;
                let client = Arc::new(self.client(&token)?);
                let lookup = self
                    .attempt(until, || vaultrs::token::lookup_self(&*client))
                    .await;
                match lookup {
                    Ok(info) => {
                        let ttl = Duration::from_secs(info.ttl);
                        Ok(Session {
                            client,
                            expires: (info.ttl > 0).then(|| Instant::now() + ttl),
                            ttl,
                            renewable: info.renewable.unwrap_or(false),
                        })
                    }
                    Err(Failure::Status { code: 403, .. }) => {
                        Err(VaultError::TokenInvalid { config, host })
                    }
                    Err(f) => Err(self.classify(f, "auth/token/lookup-self")),
                }
            }
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let secret_id = self.read_credential(secret_id, until).await?;
                let anonymous = self.client("")?;
                let role_id = role_id.trim();
                let login = self
                    .attempt(until, || {
                        vaultrs::auth::approle::login(&anonymous, mount, role_id, &secret_id)
                    })
                    .await;
                match login {
                    Ok(auth) => {
                        if !header_safe(&auth.client_token) {
                            return Err(VaultError::Protocol {
                                config,
                                host,
                                reason: "the AppRole login returned no usable token".into(),
                            });
                        }
                        let ttl = Duration::from_secs(auth.lease_duration);
                        Ok(Session {
                            client: Arc::new(self.client(&auth.client_token)?),
                            expires: (auth.lease_duration > 0).then(|| Instant::now() + ttl),
                            ttl,
                            renewable: auth.renewable,
                        })
                    }
                    Err(Failure::Status {
                        code: 400 | 403,
                        errors,
                        ..
                    }) if !is_sealed(&errors) => Err(VaultError::LoginFailed {
                        config,
                        host,
                        mount: mount.clone(),
                        detail: errors
                            .first()
                            .map(|e| e.chars().take(200).collect())
                            .unwrap_or_else(|| "rejected".into()),
                    }),
                    Err(f) => Err(self.classify(f, &format!("auth/{mount}/login"))),
                }
            }
        }
    }

    async fn renew(
        &self,
        session: &Arc<Session>,
        until: Instant,
    ) -> Result<Arc<Session>, VaultError> {
        let info = self
            .attempt(until, || vaultrs::token::renew_self(&*session.client, None))
            .await
            .map_err(|f| self.classify(f, "auth/token/renew-self"))?;
        if info.lease_duration < 2 {
            // At its max TTL: renewal no longer helps, a fresh login does.
            return Err(VaultError::Protocol {
                config: self.name(),
                host: self.host(),
                reason: "token reached its maximum TTL".into(),
            });
        }
        let ttl = Duration::from_secs(info.lease_duration);
        let renewed = Arc::new(Session {
            client: session.client.clone(),
            expires: Some(Instant::now() + ttl),
            ttl,
            renewable: info.renewable,
        });
        let mut current = lock(&self.session);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = Some(renewed.clone());
        }
        Ok(renewed)
    }

    /// Keeps an expiring, renewable token alive while nothing reads (token auth depends on it).
    fn spawn_renewer(self: &Arc<Self>, session: &Arc<Session>) {
        if !session.renewable || session.expires.is_none() {
            return;
        }
        let conn = Arc::downgrade(self);
        let mut mine = Arc::downgrade(session);
        tokio::spawn(async move {
            loop {
                let Some(at) = mine.upgrade().and_then(|s| s.renew_at()) else {
                    return;
                };
                tokio::time::sleep_until(at.into()).await;
                let (Some(conn), Some(session)) = (conn.upgrade(), mine.upgrade()) else {
                    return;
                };
                let _guard = conn.login_lock.lock().await;
                if !conn.is_current(&session) {
                    return;
                }
                let until = Instant::now() + conn.opts.request_timeout;
                match conn.renew(&session, until).await {
                    Ok(renewed) if renewed.renewable => mine = Arc::downgrade(&renewed),
                    Ok(_) => return,
                    Err(e) => {
                        tracing::info!(config = %conn.target.name, reason = %e, "vault token renewal failed; next use logs in again");
                        conn.invalidate(&session);
                        return;
                    }
                }
            }
        });
    }

    // ---- mounts ---------------------------------------------------------------------------

    /// Mount and base path of the config, learned once (failures are not remembered).
    pub(crate) async fn layout(self: &Arc<Self>, until: Instant) -> Result<&Layout, VaultError> {
        self.layout.get_or_try_init(|| self.discover(until)).await
    }

    /// The layout if already learned.
    pub(crate) fn layout_now(&self) -> Option<&Layout> {
        self.layout.get()
    }

    async fn discover(self: &Arc<Self>, until: Instant) -> Result<Layout, VaultError> {
        let path = self.target.path.clone();
        let session = self.session(until).await?;
        let found = self
            .attempt(until, || {
                vaultrs::api::exec_with_result(
                    &*session.client,
                    UiMountRequest { path: path.clone() },
                )
            })
            .await;
        let mount = match found {
            Ok(mount) => mount,
            // No right to inspect mounts: split by the seed's convention and read to find out.
            Err(Failure::Status { code: 403, .. }) => return Ok(guess_layout(&path)),
            Err(Failure::Status {
                code: 400 | 404, ..
            }) => {
                return Err(VaultError::NoMount {
                    config: self.name(),
                    path,
                });
            }
            Err(f) => return Err(self.classify(f, &format!("sys/internal/ui/mounts/{path}"))),
        };
        let mount_path = mount.path.trim_matches('/').to_string();
        let version = mount
            .options
            .as_ref()
            .and_then(|o| o.get("version"))
            .map(String::as_str)
            .unwrap_or("1");
        match (mount.kind.as_str(), version) {
            ("kv", "2") => {}
            ("kv" | "generic", _) => {
                return Err(VaultError::KvV1 {
                    config: self.name(),
                    mount: format!("{mount_path}/"),
                });
            }
            (kind, _) => {
                return Err(VaultError::NotKv {
                    config: self.name(),
                    mount: format!("{mount_path}/"),
                    kind: kind.to_string(),
                });
            }
        }
        let rest = path
            .strip_prefix(&mount_path)
            .map(|r| r.trim_start_matches('/'))
            .ok_or_else(|| VaultError::Protocol {
                config: self.name(),
                host: self.host(),
                reason: format!("mount {mount_path}/ does not prefix path {path}"),
            })?;
        Ok(Layout {
            mount: mount_path,
            base: strip_data(rest).map_err(|reason| VaultError::InvalidConfig {
                config: self.name(),
                reason,
            })?,
            checked: true,
        })
    }

    // ---- reads ----------------------------------------------------------------------------

    /// Reads one secret from Vault (no cache).
    pub(crate) async fn read_secret(
        self: &Arc<Self>,
        rel: &str,
        until: Instant,
    ) -> Result<SecretFields, VaultError> {
        let layout = self.layout(until).await?;
        let secret = layout.secret_path(rel);
        if secret.is_empty() {
            return Err(VaultError::InvalidConfig {
                config: self.name(),
                reason: "its path is the mount itself; keys must name a secret: path#field".into(),
            });
        }
        let api_path = layout.api_path(&secret);
        let (mount, secret_ref) = (&layout.mount, &secret);
        let read = self
            .call(until, |s| async move {
                vaultrs::kv2::read::<serde_json::Map<String, serde_json::Value>>(
                    &*s.client, mount, secret_ref,
                )
                .await
            })
            .await;
        match read {
            Ok(map) => Ok(SecretFields::from_json(map)),
            Err(Failure::Status {
                code: 404, body, ..
            }) => Err(self.not_found(body.as_deref(), &api_path)),
            Err(f) => Err(self.classify(f, &api_path)),
        }
    }

    fn not_found(&self, body: Option<&str>, api_path: &str) -> VaultError {
        let metadata = body
            .and_then(|b| serde_json::from_str::<NotFoundBody>(b).ok())
            .and_then(|b| b.data)
            .and_then(|d| d.metadata);
        let (config, path) = (self.name(), api_path.to_string());
        match metadata {
            Some(m) if m.destroyed => VaultError::VersionDestroyed {
                config,
                path,
                version: m.version,
            },
            Some(m) if !m.deletion_time.is_empty() => VaultError::VersionDeleted {
                config,
                path,
                version: m.version,
            },
            _ => VaultError::SecretNotFound { config, path },
        }
    }

    /// Names below `rel` (KV v2 LIST on metadata); folders end in `/`. Empty when there are none.
    pub(crate) async fn list(
        self: &Arc<Self>,
        rel: &str,
        until: Instant,
    ) -> Result<Vec<String>, VaultError> {
        let layout = self.layout(until).await?;
        let secret = layout.secret_path(rel);
        let api_path = format!("{}/metadata/{secret}", layout.mount);
        let (mount, secret_ref) = (&layout.mount, &secret);
        let listed = self
            .call(until, |s| async move {
                vaultrs::kv2::list(&*s.client, mount, secret_ref).await
            })
            .await;
        match listed {
            Ok(keys) => Ok(keys),
            Err(Failure::Status { code: 404, .. }) => Ok(Vec::new()),
            Err(f) => Err(self.classify(f, &api_path)),
        }
    }

    /// The secret at `rel`, from the cache or from one read shared by every concurrent caller.
    /// The read runs as its own task, bounded by `read_budget`; each caller waits at most until
    /// its `deadline`.
    pub(crate) async fn get(
        self: &Arc<Self>,
        rel: &str,
        deadline: Instant,
    ) -> Result<Arc<SecretFields>, VaultError> {
        let fetch = self.slot(rel);
        match tokio::time::timeout_at(deadline.into(), fetch).await {
            Ok(fetched) => fetched.result,
            Err(_) => Err(VaultError::OutOfTime {
                config: self.name(),
                host: self.host(),
            }),
        }
    }

    /// How long a result may be served again: values for the TTL, definitive answers (missing,
    /// denied, deleted, KV v1, ...) for the short negative TTL, transient failures not at all.
    fn keep_for(&self, result: &Result<Arc<SecretFields>, VaultError>) -> Duration {
        match result {
            Ok(_) => self.opts.cache_ttl,
            Err(e) if e.is_definitive() => self.opts.negative_ttl,
            Err(_) => Duration::ZERO,
        }
    }

    fn slot(self: &Arc<Self>, rel: &str) -> Shared<BoxFuture<'static, Fetched>> {
        let mut cache = lock(&self.cache);
        if let Some(slot) = cache.get(rel) {
            match slot.fetch.peek() {
                None => {
                    // Joins the read under way: counted as a miss.
                    self.count_lookup(false);
                    return slot.fetch.clone();
                }
                Some(done) if done.at + self.keep_for(&done.result) > Instant::now() => {
                    self.count_lookup(true);
                    return slot.fetch.clone();
                }
                Some(_) => {}
            }
        }
        self.count_lookup(false);
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::clone(self);
        let path = rel.to_string();
        let task = tokio::spawn(async move {
            let until = Instant::now() + conn.opts.read_budget;
            let result = conn.read_secret(&path, until).await.map(Arc::new);
            let keep = conn.keep_for(&result);
            conn.expire_later(path, id, keep);
            Fetched {
                at: Instant::now(),
                result,
            }
        });
        let config = self.name();
        let fetch = async move {
            task.await.unwrap_or_else(|_| Fetched {
                at: Instant::now(),
                result: Err(VaultError::Internal { config }),
            })
        }
        .boxed()
        .shared();
        cache.insert(
            rel.to_string(),
            Slot {
                id,
                fetch: fetch.clone(),
            },
        );
        fetch
    }

    fn count_lookup(&self, hit: bool) {
        if let Some(metrics) = &self.opts.metrics {
            metrics.cache("vault-values", hit);
        }
    }

    /// Drops a cached result when its time is up, so values stay in memory no longer than the TTL.
    fn expire_later(self: &Arc<Self>, path: String, id: u64, keep: Duration) {
        let conn: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(keep).await;
            if let Some(conn) = conn.upgrade() {
                let mut cache = lock(&conn.cache);
                if cache.get(&path).is_some_and(|slot| slot.id == id) {
                    cache.remove(&path);
                }
            }
        });
    }
}

/// The seed's convention when mounts cannot be inspected: `<mount>/data/<path>`.
fn guess_layout(path: &str) -> Layout {
    let (mount, base) = match path.split_once("/data/") {
        Some((mount, base)) => (mount.to_string(), base.to_string()),
        None => match path.strip_suffix("/data") {
            Some(mount) => (mount.to_string(), String::new()),
            None => match path.split_once('/') {
                Some((mount, base)) => (mount.to_string(), base.to_string()),
                None => (path.to_string(), String::new()),
            },
        },
    };
    Layout {
        mount,
        base,
        checked: false,
    }
}

/// KV v2 paths carry `data/` after the mount; the secret path is what follows.
fn strip_data(rest: &str) -> Result<String, String> {
    if rest == "data" {
        return Ok(String::new());
    }
    if let Some(base) = rest.strip_prefix("data/") {
        return Ok(base.to_string());
    }
    if rest == "metadata" || rest.starts_with("metadata/") {
        return Err(
            "its path points at metadata/; use the data/ path, e.g. /v1/secret/data/production"
                .into(),
        );
    }
    Ok(rest.to_string())
}

/// Field map of a KV v2 secret. Non-string JSON values are kept as their JSON text.
impl SecretFields {
    pub(crate) fn from_json(map: serde_json::Map<String, serde_json::Value>) -> Self {
        let fields: BTreeMap<String, SecretValue> = map
            .into_iter()
            .map(|(k, v)| {
                let bytes = match v {
                    serde_json::Value::String(s) => s.into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (k, SecretValue::new(bytes))
            })
            .collect();
        Self { fields }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_the_seed_layout() {
        assert_eq!(
            guess_layout("secret/data/production"),
            Layout {
                mount: "secret".into(),
                base: "production".into(),
                checked: false
            }
        );
        assert_eq!(guess_layout("team/kv/data/a/b").mount, "team/kv");
        assert_eq!(guess_layout("secret/data").base, "");
        assert_eq!(guess_layout("secret/production").base, "production");
    }

    #[test]
    fn strips_the_data_segment() {
        assert_eq!(strip_data("data/production").unwrap(), "production");
        assert_eq!(strip_data("data").unwrap(), "");
        assert_eq!(strip_data("production").unwrap(), "production");
        assert!(strip_data("metadata/production").is_err());
    }

    #[test]
    fn layout_paths() {
        let l = Layout {
            mount: "secret".into(),
            base: "production".into(),
            checked: true,
        };
        assert_eq!(l.secret_path(""), "production");
        assert_eq!(l.secret_path("db"), "production/db");
        assert_eq!(l.api_path("production/db"), "secret/data/production/db");
    }
}
