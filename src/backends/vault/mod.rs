//! Vault KV v2 source (DESIGN §1, §3): VaultConfigs, one client per config, cached and coalesced
//! reads, materialization into webhook-managed Secrets, Test Connection and key listing.
//!
//! - [`spec`]: the VaultConfig CRD and the local config entry, resolved into a checked target.
//! - `client`: session (login, renewal, re-login), mount discovery, reads, cache, classification.
//! - `materialize`: writes values into `iomete-vault-{config}` Secrets (cluster only).
//! - `watch`: keeps the configs in step with the VaultConfig objects (cluster only).
//!
//! `docs/vault.md` describes behaviour and every denial text.

mod client;
pub mod keys;
mod materialize;
pub mod spec;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use self::client::Conn;
pub use self::keys::{VaultKey, data_key};
pub use self::materialize::{CONFIG_LABEL, CONTENT_SIGNATURE, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
pub use self::spec::{
    Delivery, VaultConfig, VaultConfigCondition, VaultConfigResourceSpec, VaultConfigSpec,
    VaultConfigStatus, crd_yaml,
};
use super::{Delivered, KeyRef, VaultSource, VaultWant};
use crate::backends::Naming;
use crate::identity::Keys;
use crate::metrics::Metrics;
use crate::refs::SecretObject;

/// Why a Vault value could not be delivered. `Display` is the user-facing denial text (the engine
/// prefixes the annotation and the reference). Never holds a value or a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("no Vault config named {config}; use the name of an existing VaultConfig")]
    UnknownConfig { config: String },
    #[error("vault config {config} is invalid: {reason}; fix the VaultConfig")]
    InvalidConfig { config: String, reason: String },
    /// `key` is the key's shape, never the key: it failed validation.
    #[error(
        "the key ({key}) is not a valid key of vault config {config}: {reason} (write field or sub/path#field)"
    )]
    BadKey {
        config: String,
        key: String,
        reason: String,
    },
    #[error("vault config {config}: cannot read its credentials: {reason}")]
    Credentials { config: String, reason: String },
    #[error(
        "vault config {config}: AppRole login at {host} (auth/{mount}) failed: {detail}; check the role ID and the secret ID in the credentials Secret"
    )]
    LoginFailed {
        config: String,
        host: String,
        mount: String,
        detail: String,
    },
    #[error(
        "vault config {config}: Vault at {host} rejected the token (invalid, expired or revoked); put a valid token into the credentials Secret"
    )]
    TokenInvalid { config: String, host: String },
    #[error(
        "vault config {config}: Vault at {host} is unreachable ({reason}); check the VaultConfig host, its CA certificate and the network path to Vault"
    )]
    Unreachable {
        config: String,
        host: String,
        reason: String,
    },
    #[error(
        "vault config {config}: Vault at {host} did not answer within {millis} ms; check Vault's health and load"
    )]
    Timeout {
        config: String,
        host: String,
        millis: u64,
    },
    #[error(
        "vault config {config}: Vault at {host} did not answer within the admission time budget; try again, and check Vault's health if it persists"
    )]
    OutOfTime { config: String, host: String },
    #[error(
        "vault config {config}: Vault at {host} is sealed; ask the Vault operators to unseal it"
    )]
    Sealed { config: String, host: String },
    #[error(
        "vault config {config}: Vault at {host} kept answering HTTP {code} (rate limit or not ready); try again later"
    )]
    Unavailable {
        config: String,
        host: String,
        code: u16,
    },
    #[error(
        "vault config {config}: permission denied on {path}; the Vault policy of this config's role or token must allow read on it"
    )]
    PermissionDenied { config: String, path: String },
    #[error(
        "vault config {config}: no secrets engine is mounted at {path}; check the VaultConfig path"
    )]
    NoMount { config: String, path: String },
    #[error(
        "vault config {config}: mount {mount} is a KV version 1 secrets engine; only KV v2 is supported, move the secrets to a KV v2 mount"
    )]
    KvV1 { config: String, mount: String },
    #[error(
        "vault config {config}: mount {mount} is a {kind} secrets engine, not KV v2; point the VaultConfig path at a KV v2 mount"
    )]
    NotKv {
        config: String,
        mount: String,
        kind: String,
    },
    #[error(
        "vault config {config}: no secret at {path}; check the key, or create the secret in Vault"
    )]
    SecretNotFound { config: String, path: String },
    #[error(
        "vault config {config}: secret {path} has no field {field:?} (it has: {available}); check the key, fields are case-sensitive"
    )]
    FieldNotFound {
        config: String,
        path: String,
        field: String,
        available: String,
    },
    #[error(
        "vault config {config}: the current version ({version}) of secret {path} is deleted; undelete it or write a new version in Vault"
    )]
    VersionDeleted {
        config: String,
        path: String,
        version: u64,
    },
    #[error(
        "vault config {config}: the current version ({version}) of secret {path} is destroyed; write a new version in Vault"
    )]
    VersionDestroyed {
        config: String,
        path: String,
        version: u64,
    },
    #[error(
        "vault config {config}: Vault at {host} answered with a redirect (HTTP {code}), which is not followed (it would carry the credentials to another address); set the VaultConfig host to the address that serves requests itself (the active node or its load balancer)"
    )]
    Redirected {
        config: String,
        host: String,
        code: u16,
    },
    #[error("vault config {config}: Vault at {host} answered HTTP {code} ({detail})")]
    Server {
        config: String,
        host: String,
        code: u16,
        detail: String,
    },
    #[error("vault config {config}: unexpected answer from Vault at {host}: {reason}")]
    Protocol {
        config: String,
        host: String,
        reason: String,
    },
    #[error(
        "vault config {config}: could not write the managed Secret {namespace}/{secret}: {reason}"
    )]
    Write {
        config: String,
        namespace: String,
        secret: String,
        reason: String,
    },
    #[error(
        "vault config {config}: Secret {namespace}/{secret} exists but is not managed by secrets-webhook; delete or rename it so the webhook can manage it"
    )]
    NotManaged {
        config: String,
        namespace: String,
        secret: String,
    },
    #[error("vault config {config}: internal error while reading; try again")]
    Internal { config: String },
}

impl VaultError {
    /// Answers that another read a moment later would repeat (worth a short negative cache).
    /// Transport failures and timeouts are not: they are only shared with concurrent callers.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            VaultError::PermissionDenied { .. }
                | VaultError::NoMount { .. }
                | VaultError::KvV1 { .. }
                | VaultError::NotKv { .. }
                | VaultError::SecretNotFound { .. }
                | VaultError::VersionDeleted { .. }
                | VaultError::VersionDestroyed { .. }
                | VaultError::LoginFailed { .. }
                | VaultError::TokenInvalid { .. }
                | VaultError::Credentials { .. }
                | VaultError::InvalidConfig { .. }
        )
    }

    /// A CamelCase reason for the VaultConfig's `Ready` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            VaultError::UnknownConfig { .. } => "UnknownConfig",
            VaultError::InvalidConfig { .. } | VaultError::BadKey { .. } => "InvalidConfig",
            VaultError::Credentials { .. } => "CredentialsUnavailable",
            VaultError::LoginFailed { .. } | VaultError::TokenInvalid { .. } => "LoginFailed",
            VaultError::Unreachable { .. } => "Unreachable",
            VaultError::Timeout { .. } | VaultError::OutOfTime { .. } => "Timeout",
            VaultError::Sealed { .. } => "Sealed",
            VaultError::Unavailable { .. } | VaultError::Server { .. } => "VaultError",
            VaultError::Redirected { .. } => "Redirected",
            VaultError::PermissionDenied { .. } => "PermissionDenied",
            VaultError::NoMount { .. } | VaultError::NotKv { .. } => "NotKvV2",
            VaultError::KvV1 { .. } => "KvV1Unsupported",
            VaultError::SecretNotFound { .. } | VaultError::FieldNotFound { .. } => "NotFound",
            VaultError::VersionDeleted { .. } | VaultError::VersionDestroyed { .. } => {
                "VersionDeleted"
            }
            VaultError::Protocol { .. } | VaultError::Internal { .. } => "Unexpected",
            VaultError::Write { .. } | VaultError::NotManaged { .. } => "WriteFailed",
        }
    }
}

/// Tunables; every one has a default.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// How long a value read from Vault is served again (default 30 s; 0 = only coalesce).
    pub cache_ttl: Duration,
    /// How long a definitive failure (missing, denied, deleted, ...) is served again (default 5 s).
    pub negative_ttl: Duration,
    /// Bound of each HTTP call to Vault (default 3 s).
    pub request_timeout: Duration,
    /// Bound of one shared read, login and retries included (default 8 s). Each admission waits
    /// only until its own deadline.
    pub read_budget: Duration,
    /// In a cluster, how often each VaultConfig is tested again for its `Ready` condition
    /// (default 5 min; 0 = only when its spec changes).
    pub recheck_interval: Duration,
    /// Where value-cache lookups (cache `vault-values`) and HTTP requests to Vault (backend
    /// `vault`) are counted; `None`: nowhere.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for VaultOptions {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            read_budget: Duration::from_secs(8),
            recheck_interval: Duration::from_secs(300),
            metrics: None,
        }
    }
}

/// A value read from Vault. Its `Debug` never shows it and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Arc<[u8]>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes.into())
    }

    /// The bytes, for writing into a Secret or logging in only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The fields of one KV v2 secret. `Debug` lists field names only.
#[derive(Clone, Default)]
pub struct SecretFields {
    fields: BTreeMap<String, SecretValue>,
}

impl SecretFields {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    fn get(&self, field: &str) -> Option<&SecretValue> {
        self.fields.get(field)
    }

    fn len(&self) -> usize {
        self.fields.len()
    }
}

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.fields.keys()).finish()
    }
}

/// A write the webhook would have made if it had a cluster (`serve --dev`, `review`): key names,
/// never values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WouldBeWrite {
    pub namespace: String,
    pub secret: String,
    pub key: String,
}

impl fmt::Display for WouldBeWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Secret {}/{} key {}",
            self.namespace, self.secret, self.key
        )
    }
}

/// One step of Test Connection.
#[derive(Debug, Clone)]
pub struct CheckStep {
    pub label: String,
    pub outcome: Result<String, VaultError>,
}

/// Outcome of Test Connection (`vault check`, and the VaultConfig's `Ready` condition).
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub config: String,
    pub steps: Vec<CheckStep>,
}

impl CheckReport {
    pub fn error(&self) -> Option<&VaultError> {
        self.steps.iter().find_map(|s| s.outcome.as_ref().err())
    }

    /// One line per step, then the verdict.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .steps
            .iter()
            .map(|s| match &s.outcome {
                Ok(detail) => format!("{} ... {detail}", s.label),
                Err(e) => format!("{} ... FAILED: {e}", s.label),
            })
            .collect();
        lines.push(match self.error() {
            None => "verdict: ok".into(),
            Some(e) => format!("verdict: FAILED: {e}"),
        });
        lines
    }

    /// A one-line summary for the `Ready` condition message.
    pub fn summary(&self) -> String {
        match self.error() {
            Some(e) => e.to_string(),
            None => self
                .steps
                .iter()
                .map(|s| format!("{}: {}", s.label, s.outcome.as_deref().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// A config as the backend holds it: usable, or invalid with the reason every use reports.
#[derive(Clone)]
enum Entry {
    Ready {
        conn: Arc<Conn>,
        delivery: Delivery,
        spec: Option<VaultConfigResourceSpec>,
    },
    Invalid {
        bundle: String,
        error: VaultError,
        spec: Option<VaultConfigResourceSpec>,
    },
}

impl Entry {
    fn bundle(&self) -> String {
        match self {
            Entry::Ready { conn, .. } => conn.target.bundle.clone(),
            Entry::Invalid { bundle, .. } => bundle.clone(),
        }
    }

    fn spec(&self) -> Option<&VaultConfigResourceSpec> {
        match self {
            Entry::Ready { spec, .. } | Entry::Invalid { spec, .. } => spec.as_ref(),
        }
    }
}

/// Where materialized values go.
enum Sink {
    /// No cluster: remember the would-be writes (key names) for `review` to print.
    Local(Mutex<BTreeSet<WouldBeWrite>>),
    Cluster(materialize::SecretWriter),
}

/// A wanted reference, checked: its config's client and delivery, and its parsed key.
struct Wanted<'w> {
    config: &'w str,
    /// The reference's key, `path#field`.
    secret_key: &'w str,
    conn: Arc<Conn>,
    delivery: Delivery,
    key: VaultKey,
}

/// A wanted reference whose field exists, with the fields of its secret (from the cache).
struct Found<'w> {
    wanted: Wanted<'w>,
    fields: Arc<SecretFields>,
}

/// Most would-be writes remembered between two `take_would_be_writes` calls.
const MAX_WOULD_BE_WRITES: usize = 1000;

/// The Vault backend: implements [`VaultSource`] for the admission engine.
pub struct VaultBackend {
    naming: Naming,
    opts: VaultOptions,
    configs: RwLock<BTreeMap<String, Entry>>,
    sink: Sink,
    ready: AtomicBool,
}

impl VaultBackend {
    /// Without a cluster: configs from the local file; deliveries return the KeyRef and record the
    /// would-be write (see [`VaultBackend::take_would_be_writes`]).
    pub fn from_local(
        specs: &[VaultConfigSpec],
        naming: Naming,
        opts: VaultOptions,
    ) -> Result<Arc<Self>, VaultError> {
        let mut configs = BTreeMap::new();
        for spec in specs {
            let target = spec::Target::from_local(spec)?;
            let conn = Conn::new(target, None, opts.clone())?;
            if spec.delivery.is_none() {
                // Absent stays materialize in the file (no CREATE to default it at); say so once.
                tracing::warn!(config = %spec.name,
                    "Vault config does not name delivery: materialize (values copied into a Secret); \
                     set delivery: runtime, or delivery: materialize to keep it and silence this");
            }
            let entry = Entry::Ready {
                conn,
                delivery: spec.delivery(),
                spec: None,
            };
            if configs.insert(spec.name.clone(), entry).is_some() {
                return Err(VaultError::InvalidConfig {
                    config: spec.name.clone(),
                    reason: "the name is used twice in vaultConfigs".into(),
                });
            }
        }
        Ok(Arc::new(Self {
            naming,
            opts,
            configs: RwLock::new(configs),
            sink: Sink::Local(Mutex::new(BTreeSet::new())),
            ready: AtomicBool::new(true),
        }))
    }

    /// In a cluster: watches VaultConfigs in `naming.namespace` (credentials from Secrets there),
    /// writes managed Secrets through `client` (signed with `keys`), and records Test Connection
    /// results in each VaultConfig's `status.conditions`. Must be called inside a tokio runtime.
    pub fn in_cluster(
        client: kube::Client,
        naming: Naming,
        keys: Arc<Keys>,
        opts: VaultOptions,
    ) -> Arc<Self> {
        let backend = Arc::new(Self {
            naming: naming.clone(),
            sink: Sink::Cluster(materialize::SecretWriter::new(client.clone(), keys)),
            opts,
            configs: RwLock::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
        });
        watch::spawn(Arc::downgrade(&backend), client, naming.namespace);
        backend
    }

    /// False until the first listing of VaultConfigs is known (always true locally).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Names of the known configs.
    pub fn config_names(&self) -> Vec<String> {
        self.read_configs().keys().cloned().collect()
    }

    /// The would-be writes recorded since the last call (local mode; empty in a cluster).
    pub fn take_would_be_writes(&self) -> Vec<WouldBeWrite> {
        match &self.sink {
            Sink::Local(writes) => std::mem::take(&mut *client_lock(writes))
                .into_iter()
                .collect(),
            Sink::Cluster(_) => Vec::new(),
        }
    }

    /// Keys a config exposes, for secret selectors: the fields of the secret at its path, and,
    /// one level down, `child#field` for each secret and `folder/` for each folder below it.
    /// Never values.
    pub async fn list_keys(&self, config: &str) -> Result<Vec<String>, VaultError> {
        const MAX_CHILDREN: usize = 100;
        let conn = self.conn(config)?;
        let until = Instant::now() + self.opts.read_budget;
        let mut keys = Vec::new();
        match conn.get("", until).await {
            Ok(fields) => keys.extend(fields.names().map(str::to_string)),
            Err(VaultError::SecretNotFound { .. }) => {}
            Err(VaultError::InvalidConfig { .. }) if conn.layout(until).await?.base.is_empty() => {}
            Err(e) => return Err(e),
        }
        let children = conn.list("", until).await?;
        for child in children.into_iter().take(MAX_CHILDREN) {
            if child.ends_with('/') {
                keys.push(child);
                continue;
            }
            // A child we may not read is still worth showing; a field can't be named without it.
            if let Ok(fields) = conn.get(&child, until).await {
                keys.extend(fields.names().map(|f| format!("{child}#{f}")));
            }
        }
        Ok(keys)
    }

    /// Adds or replaces a config built by the caller (the management API's `--dev` store, whose
    /// credentials are held in memory). A changed target gets a new client (and cache).
    pub fn put_target(&self, target: spec::Target, delivery: Delivery) -> Result<(), VaultError> {
        let name = target.name.clone();
        if let Some(Entry::Ready {
            conn,
            delivery: current,
            ..
        }) = self.read_configs().get(&name)
        {
            if conn.target == target && *current == delivery {
                return Ok(());
            }
        }
        let conn = Conn::new(target, None, self.opts.clone())?;
        self.write_configs().insert(
            name,
            Entry::Ready {
                conn,
                delivery,
                spec: None,
            },
        );
        Ok(())
    }

    /// How `config`'s values reach pods; `None` for a config that does not exist.
    pub fn delivery_of(&self, config: &str) -> Option<Delivery> {
        self.read_configs().get(config).map(|e| match e {
            Entry::Ready { delivery, .. } => *delivery,
            Entry::Invalid { spec, .. } => spec.as_ref().map(|s| s.delivery).unwrap_or_default(),
        })
    }

    /// Forgets a config (the management API's `--dev` store).
    pub fn remove_config(&self, name: &str) {
        self.remove(name);
    }

    /// Test Connection for one config: log in, check the mount is KV v2, read the path.
    pub async fn check(&self, config: &str) -> CheckReport {
        match self.conn(config) {
            Ok(conn) => check_conn(&conn, self.opts.read_budget).await,
            Err(e) => CheckReport {
                config: config.to_string(),
                steps: vec![CheckStep {
                    label: "config".into(),
                    outcome: Err(e),
                }],
            },
        }
    }

    fn read_configs(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.configs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_configs(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.configs.write().unwrap_or_else(|p| p.into_inner())
    }

    fn conn(&self, config: &str) -> Result<Arc<Conn>, VaultError> {
        self.entry(config).map(|(conn, _)| conn)
    }

    fn entry(&self, config: &str) -> Result<(Arc<Conn>, Delivery), VaultError> {
        match self.read_configs().get(config) {
            Some(Entry::Ready { conn, delivery, .. }) => Ok((conn.clone(), *delivery)),
            Some(Entry::Invalid { error, .. }) => Err(error.clone()),
            None => Err(VaultError::UnknownConfig {
                config: config.to_string(),
            }),
        }
    }

    /// Reads every wanted secret (one shared read per distinct secret; a fresh cached result is
    /// no read) and returns, per want, its config, its key and the secret's fields, or why not.
    /// Everything is borrowed from `wants` and the cache: no copies of values.
    async fn lookup<'w>(
        &self,
        wants: impl Iterator<Item = &'w SecretObject>,
        deadline: Instant,
    ) -> Vec<Result<Found<'w>, VaultError>> {
        let wanted: Vec<Result<Wanted<'w>, VaultError>> = wants
            .map(|secret| {
                let config = secret.source.id.as_str();
                let (conn, delivery) = self.entry(config)?;
                let key = VaultKey::parse(&secret.key).map_err(|reason| VaultError::BadKey {
                    config: config.to_owned(),
                    key: crate::refs::shape(&secret.key),
                    reason,
                })?;
                Ok(Wanted {
                    config,
                    secret_key: &secret.key,
                    conn,
                    delivery,
                    key,
                })
            })
            .collect();

        // One read per distinct (config, secret), all at once; `index[i]` is want i's read.
        let mut index: Vec<Option<usize>> = Vec::with_capacity(wanted.len());
        let fetched: Vec<Result<Arc<SecretFields>, VaultError>> = {
            let mut read_of: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            let mut reads: Vec<(&Arc<Conn>, &str)> = Vec::new();
            for w in &wanted {
                index.push(w.as_ref().ok().map(|w| {
                    *read_of
                        .entry((w.config, w.key.path.as_str()))
                        .or_insert_with(|| {
                            reads.push((&w.conn, &w.key.path));
                            reads.len() - 1
                        })
                }));
            }
            futures::future::join_all(reads.iter().map(|(conn, path)| conn.get(path, deadline)))
                .await
        };
        wanted
            .into_iter()
            .zip(index)
            .map(|(w, i)| {
                let w = w?;
                let fields = i
                    .and_then(|i| fetched.get(i))
                    .ok_or_else(|| VaultError::Internal {
                        config: w.config.to_owned(),
                    })?
                    .clone()?;
                if fields.get(&w.key.field).is_none() {
                    let path = match w.conn.layout_now() {
                        Some(layout) => layout.api_path(&layout.secret_path(&w.key.path)),
                        None => w.key.path.clone(),
                    };
                    return Err(VaultError::FieldNotFound {
                        config: w.config.to_owned(),
                        path,
                        field: w.key.field.clone(),
                        available: available(&fields),
                    });
                }
                Ok(Found { wanted: w, fields })
            })
            .collect()
    }

    /// The values of `secrets` (the broker: what a pod fetches at start), through the same cache
    /// and coalescing as admissions, so a burst of pods makes one Vault read per secret. Each
    /// config's delivery mode is not looked at: the pod's signed plan already says how.
    pub async fn values(
        &self,
        secrets: &[&SecretObject],
        deadline: Instant,
    ) -> Vec<Result<SecretValue, VaultError>> {
        self.lookup(secrets.iter().copied(), deadline)
            .await
            .into_iter()
            .map(|found| {
                let found = found?;
                found
                    .fields
                    .get(&found.wanted.key.field)
                    .cloned()
                    .ok_or_else(|| VaultError::Internal {
                        config: found.wanted.config.to_owned(),
                    })
            })
            .collect()
    }

    /// Reads every wanted field (one shared read per secret). Fields of `runtime` configs are
    /// only checked: the pod fetches them at start. Those of `materialize` configs are written
    /// into the managed Secret unless `dry_run`.
    async fn deliver_all(
        &self,
        namespace: &str,
        wants: &[VaultWant<'_>],
        dry_run: bool,
        deadline: Instant,
    ) -> Vec<Result<Delivered, VaultError>> {
        let found = self.lookup(wants.iter().map(|w| w.secret), deadline).await;
        // Per reference: its config and Secret data key (materialize), runtime, or why not.
        // Values are copied only to be written.
        let mut to_write: BTreeMap<&str, BTreeMap<String, SecretValue>> = BTreeMap::new();
        let resolved: Vec<Result<Option<(&str, String)>, VaultError>> = found
            .iter()
            .map(|f| {
                let f = f.as_ref().map_err(Clone::clone)?;
                let w = &f.wanted;
                if w.delivery == Delivery::Runtime {
                    return Ok(None);
                }
                let key = data_key(w.secret_key);
                if !dry_run {
                    if let Some(value) = f.fields.get(&w.key.field) {
                        to_write
                            .entry(w.config)
                            .or_default()
                            .insert(key.clone(), value.clone());
                    }
                }
                Ok(Some((w.config, key)))
            })
            .collect();

        // A pod with any failed reference is denied: copy no value into its namespace.
        let any_failed = resolved.iter().any(Result::is_err);
        let written: BTreeMap<&str, Result<(), VaultError>> = if dry_run || any_failed {
            BTreeMap::new()
        } else {
            futures::future::join_all(to_write.iter().map(|(config, entries)| async move {
                let secret = self.naming.vault_secret_for(config);
                let result = self
                    .write(namespace, &secret, config, entries, deadline)
                    .await;
                (*config, result)
            }))
            .await
            .into_iter()
            .collect()
        };

        resolved
            .into_iter()
            .map(|r| {
                let Some((config, key)) = r? else {
                    return Ok(Delivered::Runtime);
                };
                if let Some(Err(e)) = written.get(config) {
                    return Err(e.clone());
                }
                Ok(Delivered::Secret(KeyRef {
                    secret: self.naming.vault_secret_for(config),
                    key,
                }))
            })
            .collect()
    }

    async fn write(
        &self,
        namespace: &str,
        secret: &str,
        config: &str,
        entries: &BTreeMap<String, SecretValue>,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        match &self.sink {
            Sink::Local(writes) => {
                let mut writes = client_lock(writes);
                for key in entries.keys() {
                    if writes.len() < MAX_WOULD_BE_WRITES {
                        writes.insert(WouldBeWrite {
                            namespace: namespace.to_string(),
                            secret: secret.to_string(),
                            key: key.clone(),
                        });
                    }
                }
                Ok(())
            }
            Sink::Cluster(writer) => {
                writer
                    .ensure(namespace, secret, config, entries, deadline)
                    .await
            }
        }
    }

    // ---- used by the VaultConfig watch ----------------------------------------------------

    /// Adds or replaces a config from its object; an unchanged spec keeps the client (its
    /// session and cache). Returns the entry now in force.
    fn upsert(&self, name: &str, spec: &VaultConfigResourceSpec, kube: &kube::Client) -> Entry {
        if let Some(existing) = self.read_configs().get(name) {
            if existing.spec() == Some(spec) {
                return existing.clone();
            }
        }
        let entry = match self
            .check_credential_refs(name, spec)
            .and_then(|()| spec::Target::from_resource(name, spec, &self.naming.namespace))
            .and_then(|target| Conn::new(target, Some(kube.clone()), self.opts.clone()))
        {
            Ok(conn) => Entry::Ready {
                conn,
                delivery: spec.delivery,
                spec: Some(spec.clone()),
            },
            Err(error) => Entry::Invalid {
                bundle: spec.resource_bundle.clone(),
                error,
                spec: Some(spec.clone()),
            },
        };
        self.write_configs().insert(name.to_string(), entry.clone());
        entry
    }

    /// Credentials never come from the Secrets the webhook guards (secret stores, materialized
    /// values), except this config's own credentials Secret that the management API writes: a
    /// VaultConfig must not be a way to send their contents to some host as a token.
    fn check_credential_refs(
        &self,
        name: &str,
        spec: &VaultConfigResourceSpec,
    ) -> Result<(), VaultError> {
        let refs = [
            spec.auth.token.as_ref().map(|t| &t.secret_ref),
            spec.auth.app_role.as_ref().map(|a| &a.secret_id_ref),
        ];
        match refs.into_iter().flatten().find(|r| {
            self.naming.is_managed_secret(&r.name)
                && !r
                    .name
                    .starts_with(&credentials_secret_prefix(&self.naming, name))
        }) {
            Some(r) => Err(VaultError::InvalidConfig {
                config: name.to_string(),
                reason: format!(
                    "its credentials may not come from the webhook-managed Secret {}; use a dedicated Secret",
                    r.name
                ),
            }),
            None => Ok(()),
        }
    }

    fn remove(&self, name: &str) {
        self.write_configs().remove(name);
    }

    fn retain(&self, names: &BTreeSet<String>) {
        self.write_configs().retain(|name, _| names.contains(name));
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// Name prefix of the Secrets in which the management API keeps a config's credentials:
/// `iomete-vault-credentials.<config>.` and a random suffix, one immutable Secret per credential
/// version. It lies under the managed prefix, so the guard denies pods that name it; config names
/// are DNS labels (no dots), so it never equals a materialized `iomete-vault-<config>`.
pub fn credentials_secret_prefix(naming: &Naming, config: &str) -> String {
    format!("{}credentials.{config}.", naming.vault_secret_prefix)
}

/// Test Connection for a config that is not saved (or not saved like this): the same steps as
/// [`VaultBackend::check`]. `kube` reads credentials kept in Secrets.
pub async fn check_target(
    target: spec::Target,
    kube: Option<kube::Client>,
    opts: VaultOptions,
) -> CheckReport {
    let name = target.name.clone();
    let budget = opts.read_budget;
    match Conn::new(target, kube, opts) {
        Ok(conn) => check_conn(&conn, budget).await,
        Err(e) => CheckReport {
            config: name,
            steps: vec![CheckStep {
                label: "config".into(),
                outcome: Err(e),
            }],
        },
    }
}

fn client_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Field names for a "no such field" message (names only, at most ten).
fn available(fields: &SecretFields) -> String {
    let names: Vec<&str> = fields.names().take(10).collect();
    match (names.is_empty(), fields.len() > names.len()) {
        (true, _) => "no fields".into(),
        (false, false) => names.join(", "),
        (false, true) => format!("{}, ...", names.join(", ")),
    }
}

async fn check_conn(conn: &Arc<Conn>, budget: Duration) -> CheckReport {
    let until = Instant::now() + budget;
    let mut report = CheckReport {
        config: conn.target.name.clone(),
        steps: Vec::new(),
    };
    let login = conn
        .session(until)
        .await
        .map(|s| format!("ok ({})", s.describe()));
    let failed = login.is_err();
    report.steps.push(CheckStep {
        label: format!("login ({})", conn.target.auth.method()),
        outcome: login,
    });
    if failed {
        return report;
    }
    let layout = match conn.layout(until).await {
        Ok(layout) => {
            report.steps.push(CheckStep {
                label: format!("mount {}/", layout.mount),
                outcome: Ok(if layout.checked {
                    "kv v2 ok".into()
                } else {
                    "assumed kv v2 (this token may not inspect mounts)".into()
                }),
            });
            layout.clone()
        }
        Err(e) => {
            report.steps.push(CheckStep {
                label: format!("mount of {}", conn.target.path),
                outcome: Err(e),
            });
            return report;
        }
    };
    let shown = if layout.base.is_empty() {
        "/"
    } else {
        layout.base.as_str()
    };
    let read = if layout.base.is_empty() {
        conn.list("", until)
            .await
            .map(|names| format!("ok ({} entries)", names.len()))
    } else {
        match conn.read_secret("", until).await {
            Ok(fields) => Ok(format!("ok ({} fields)", fields.len())),
            // A folder of secrets is a fine config path too.
            Err(VaultError::SecretNotFound { .. }) => match conn.list("", until).await {
                Ok(names) if !names.is_empty() => {
                    Ok(format!("ok (a folder: {} entries below)", names.len()))
                }
                Ok(_) => Err(VaultError::SecretNotFound {
                    config: conn.target.name.clone(),
                    path: layout.api_path(&layout.base),
                }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    };
    report.steps.push(CheckStep {
        label: format!("read {shown}"),
        outcome: read,
    });
    report
}

/// `secrets-webhook vault check NAME --config FILE`: Test Connection from the command line, on
/// the config file's `specs`. Prints one line per step and the verdict; an error means the check
/// failed.
pub fn run_check(name: &str, specs: &[VaultConfigSpec], config: &Path) -> anyhow::Result<()> {
    let Some(spec) = specs.iter().find(|c| c.name == name) else {
        let known: Vec<&str> = specs.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "no vault config named {name} in {} (it has: {})",
            config.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opts = VaultOptions::default();
    let report = runtime.block_on(async {
        let conn = spec::Target::from_local(spec).and_then(|t| Conn::new(t, None, opts.clone()))?;
        println!(
            "vault config {name}: {} path {}{}",
            conn.target.host_label(),
            spec.path,
            conn.target
                .namespace
                .as_ref()
                .map(|ns| format!(" namespace {ns}"))
                .unwrap_or_default()
        );
        Ok::<_, VaultError>(check_conn(&conn, opts.read_budget).await)
    });
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            println!("verdict: FAILED: {e}");
            anyhow::bail!("vault check failed");
        }
    };
    for line in report.lines() {
        println!("{line}");
    }
    match report.error() {
        None => Ok(()),
        Some(_) => anyhow::bail!("vault check failed"),
    }
}

#[async_trait]
impl VaultSource for VaultBackend {
    fn ready(&self) -> bool {
        VaultBackend::ready(self)
    }

    fn bundle_of(&self, config: &str) -> Option<String> {
        self.read_configs().get(config).map(Entry::bundle)
    }

    fn delivery_of(&self, config: &str) -> Option<Delivery> {
        VaultBackend::delivery_of(self, config)
    }

    async fn deliver(
        &self,
        namespace: &str,
        wants: &[VaultWant<'_>],
        dry_run: bool,
        deadline: Instant,
    ) -> Vec<Result<Delivered, String>> {
        self.deliver_all(namespace, wants, dry_run, deadline)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    async fn values(
        &self,
        secrets: &[&SecretObject],
        deadline: Instant,
    ) -> Vec<Result<SecretValue, super::ValueError>> {
        VaultBackend::values(self, secrets, deadline)
            .await
            .into_iter()
            .map(|r| {
                r.map_err(|e| super::ValueError {
                    retry: !e.is_definitive() && !matches!(e, VaultError::FieldNotFound { .. }),
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_show_in_debug() {
        let mut fields = SecretFields::default();
        fields.fields.insert(
            "db_password".into(),
            SecretValue::new(b"canary-1234".to_vec()),
        );
        let shown = format!("{fields:?} {:?}", fields.get("db_password"));
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("db_password") && shown.contains("<redacted>"));
    }

    #[test]
    fn report_lines_end_with_a_verdict() {
        let report = CheckReport {
            config: "c".into(),
            steps: vec![
                CheckStep {
                    label: "login (token)".into(),
                    outcome: Ok("ok".into()),
                },
                CheckStep {
                    label: "mount secret-v1/".into(),
                    outcome: Err(VaultError::KvV1 {
                        config: "c".into(),
                        mount: "secret-v1/".into(),
                    }),
                },
            ],
        };
        let lines = report.lines();
        assert_eq!(lines[0], "login (token) ... ok");
        assert!(lines[1].starts_with(
            "mount secret-v1/ ... FAILED: vault config c: mount secret-v1/ is a KV version 1"
        ));
        assert!(lines[2].starts_with("verdict: FAILED: "));
    }

    #[tokio::test]
    async fn unknown_configs_and_bad_keys_are_denied_without_io() {
        let spec: VaultConfigSpec = serde_yaml::from_str(
            "{name: vp, host: 'http://127.0.0.1:9', path: /v1/secret/data/p, resourceBundle: b, auth: {token: {file: /nonexistent}}}",
        )
        .unwrap();
        let backend =
            VaultBackend::from_local(&[spec], Naming::default(), VaultOptions::default()).unwrap();
        assert_eq!(backend.bundle_of("vp").as_deref(), Some("b"));
        assert_eq!(backend.bundle_of("nope"), None);
        let unknown = crate::refs::SecretObject {
            key: "k".into(),
            source: crate::refs::Source {
                kind: crate::refs::SourceType::Vault,
                id: "nope".into(),
            },
        };
        let bad = crate::refs::SecretObject {
            key: "a/b".into(),
            source: crate::refs::Source {
                kind: crate::refs::SourceType::Vault,
                id: "vp".into(),
            },
        };
        let wants = [VaultWant { secret: &unknown }, VaultWant { secret: &bad }];
        let out = backend
            .deliver("ns", &wants, false, Instant::now() + Duration::from_secs(2))
            .await;
        assert_eq!(
            out[0].as_ref().unwrap_err(),
            "no Vault config named nope; use the name of an existing VaultConfig"
        );
        assert!(out[1].as_ref().unwrap_err().contains("sub/path#field"));
        assert!(backend.take_would_be_writes().is_empty());
    }
}
