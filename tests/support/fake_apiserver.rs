//! A small in-process fake of the Kubernetes API server, for driving the REAL `kube::Client` in
//! tests over plain HTTP on 127.0.0.1. It speaks the Kubernetes JSON wire format and is generic
//! over `/{api/v1 | apis/GROUP/VERSION}/[namespaces/NS/]PLURAL[/NAME[/status]]`: get, list,
//! watch, create, replace, patch, delete, the `status` subresource, and SubjectAccessReview
//! answered by a test closure. `docs/testing.md` lists what it implements and what it does not.
//!
//! ```ignore
//! let api = FakeApiServer::start().await;
//! api.put(secret("iomete-system", "iomete-secret-store", &[("k", "v")]));
//! let pods: kube::Api<Pod> = kube::Api::namespaced(api.client(), "spark");
//! assert_eq!(api.count("GET", "/api/v1/namespaces/spark/pods/x"), 1);
//! api.inject(Fault::status("GET", "/api/v1/namespaces/spark/pods", 500).times(1));
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use base64::Engine as _;
use http::{Method, Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Watch history kept for replay; a watch from an older resourceVersion gets 410 Expired.
const HISTORY: usize = 10_000;

/// Built-in resources with a `status` subresource (as a real API server serves them). Others,
/// Secrets and ConfigMaps among them, answer `404` to `/status`.
const STATUS_SUBRESOURCE: &[(&str, &str)] = &[
    ("api/v1", "pods"),
    ("api/v1", "namespaces"),
    ("api/v1", "services"),
    ("api/v1", "nodes"),
    ("api/v1", "persistentvolumeclaims"),
    ("apis/apps/v1", "deployments"),
    ("apis/apps/v1", "statefulsets"),
    ("apis/apps/v1", "daemonsets"),
    ("apis/apps/v1", "replicasets"),
    ("apis/batch/v1", "jobs"),
    ("apis/apiextensions.k8s.io/v1", "customresourcedefinitions"),
];

/// Non-`*.k8s.io` API groups the API server serves without a CRD.
const BUILT_IN_GROUPS: &[&str] = &["apps", "batch", "policy", "autoscaling"];

/// Where CRDs live; a custom resource is served only while its CRD is stored here.
fn crds() -> Collection {
    Collection::new("apiextensions.k8s.io/v1", "customresourcedefinitions")
}

/// The CRDs this repository ships (`manifests/base/crds`), installed in every fake at start.
fn shipped_crds() -> Vec<Json> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/base/crds");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("manifests/base/crds")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("a CRD file");
            serde_yaml::from_str(&text).expect("a CRD in YAML")
        })
        .collect()
}

/// One collection: `api/v1` + `secrets`, `apis/secrets.iomete.com/v1alpha1` + `vaultconfigs`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Collection {
    /// `api/v1` or `apis/{group}/{version}`.
    pub prefix: String,
    pub plural: String,
}

impl Collection {
    /// `api_version` as written in objects: `v1`, `secrets.iomete.com/v1alpha1`.
    pub fn new(api_version: &str, plural: &str) -> Self {
        let root = if api_version.contains('/') {
            "apis"
        } else {
            "api"
        };
        let prefix = format!("{root}/{api_version}");
        Self {
            prefix,
            plural: plural.to_owned(),
        }
    }
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Self {
        Self::new(&K::api_version(&()), &K::plural(&()))
    }
    pub fn secrets() -> Self {
        Self::new("v1", "secrets")
    }
    pub fn pods() -> Self {
        Self::new("v1", "pods")
    }
    pub fn api_version(&self) -> &str {
        let p = &self.prefix;
        p.strip_prefix("apis/")
            .or_else(|| p.strip_prefix("api/"))
            .unwrap_or("")
    }
    fn group(&self) -> &str {
        let gv = self.prefix.strip_prefix("apis/");
        gv.and_then(|gv| gv.split('/').next()).unwrap_or("")
    }
    fn is_core(&self) -> bool {
        self.prefix.starts_with("api/")
    }
    /// Groups served by the API server itself; every other group needs a registered CRD.
    fn is_built_in(&self) -> bool {
        let group = self.group();
        self.is_core() || group.ends_with(".k8s.io") || BUILT_IN_GROUPS.contains(&group)
    }
    /// How the API server names it in messages: `secrets`, `vaultconfigs.secrets.iomete.com`.
    fn qualified(&self) -> String {
        match self.group() {
            "" => self.plural.clone(),
            g => format!("{}.{g}", self.plural),
        }
    }
}

/// Address of one object; `namespace` is empty for cluster-scoped objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    coll: Collection,
    namespace: String,
    name: String,
}

impl Key {
    fn new(coll: &Collection, namespace: Option<&str>, name: &str) -> Self {
        let (coll, namespace) = (coll.clone(), namespace.unwrap_or("").to_owned());
        Self {
            coll,
            namespace,
            name: name.to_owned(),
        }
    }
    fn of(coll: &Collection, object: &Json) -> Self {
        let meta = &object["metadata"];
        Self::new(
            coll,
            meta["namespace"].as_str(),
            meta["name"].as_str().unwrap_or(""),
        )
    }
}

/// One request as received (body parsed as JSON or YAML when possible).
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Json>,
}

/// Answer of the SubjectAccessReview responder, written as a real API server writes `status`.
#[derive(Clone, Debug)]
pub enum SarAnswer {
    /// `{"allowed": true}`.
    Allow,
    /// What RBAC answers when no rule allows: `{"allowed": false, "reason": ...}`, **no**
    /// `denied` field (RBAC never denies, it only has no opinion); an empty reason is left out.
    /// A binding RBAC cannot resolve (one naming a missing Role) shows in the reason:
    /// `RBAC: role.rbac.authorization.k8s.io "x" not found`.
    Deny(String),
    /// An authorizer that denies outright (a webhook authorizer):
    /// `{"allowed": false, "denied": true, "reason": ...}`.
    ExplicitDeny(String),
    /// An authorizer that failed (a webhook authorizer it could not reach) while none allowed:
    /// `{"allowed": false, "evaluationError": ...}`.
    EvaluationError(String),
    /// Answer the request with this HTTP status and a `Status` body.
    Error(u16),
}

type SarResponder = Arc<dyn Fn(&Json) -> SarAnswer + Send + Sync>;

/// Tokens the TokenReview endpoint accepts: token -> (username, groups).
type Tokens = HashMap<String, (String, Vec<String>)>;

/// A fault for requests whose method matches (`*` = any) and whose path starts with `path_prefix`.
#[derive(Clone, Debug)]
pub struct Fault {
    method: String,
    path_prefix: String,
    watch: Option<bool>,
    action: FaultAction,
    remaining: Option<u32>,
}

#[derive(Clone, Debug)]
enum FaultAction {
    Status(u16),
    Hang,
}

impl Fault {
    /// Answer with `code` and a `Status` body. Note kube's client retries 429/503/504 itself.
    pub fn status(method: &str, path_prefix: &str, code: u16) -> Self {
        Self::new(method, path_prefix, FaultAction::Status(code))
    }
    /// Never answer (until the server is dropped).
    pub fn hang(method: &str, path_prefix: &str) -> Self {
        Self::new(method, path_prefix, FaultAction::Hang)
    }
    fn new(method: &str, path_prefix: &str, action: FaultAction) -> Self {
        let (method, path_prefix) = (method.to_uppercase(), path_prefix.to_owned());
        Self {
            method,
            path_prefix,
            watch: None,
            action,
            remaining: None,
        }
    }
    /// Only `?watch=true` requests.
    pub fn watches_only(self) -> Self {
        Self {
            watch: Some(true),
            ..self
        }
    }
    /// Everything but watches (gets, lists, writes).
    pub fn except_watches(self) -> Self {
        Self {
            watch: Some(false),
            ..self
        }
    }
    /// Apply to the next `n` matching requests only.
    pub fn times(self, n: u32) -> Self {
        Self {
            remaining: Some(n),
            ..self
        }
    }
    fn matches(&self, method: &Method, path: &str, watch: bool) -> bool {
        (self.method == "*" || self.method == method.as_str())
            && path.starts_with(&self.path_prefix)
            && self.watch.is_none_or(|w| w == watch)
            && self.remaining != Some(0)
    }
}

#[derive(Clone, Debug)]
enum Broadcast {
    Event {
        key: Key,
        kind: &'static str,
        object: Json,
    },
    Bookmark(u64),
}

struct Inner {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Json>,
    /// (rv, event) newer than `floor`; a watch from below `floor` is told 410 Expired.
    history: VecDeque<(u64, Broadcast)>,
    floor: u64,
    kinds: HashMap<Collection, String>,
    log: Vec<Logged>,
    faults: Vec<Fault>,
    sar: SarResponder,
    tokens: Tokens,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Broadcast>,
    close: watch::Sender<u64>,
    open_watches: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running server; dropping it aborts the accept loop and every connection (watches too).
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Bind 127.0.0.1:0 and serve until dropped.
    pub async fn start() -> Self {
        let kinds = [
            ("secrets", "Secret"),
            ("pods", "Pod"),
            ("configmaps", "ConfigMap"),
            ("namespaces", "Namespace"),
            ("serviceaccounts", "ServiceAccount"),
        ];
        let kinds = kinds.map(|(p, k)| (Collection::new("v1", p), k.to_owned()));

        let inner = Inner {
            rv: 1,
            uid: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 0,
            kinds: kinds.into_iter().collect(),
            log: Vec::new(),
            faults: Vec::new(),
            // A user no RBAC rule mentions.
            sar: Arc::new(|_| SarAnswer::Deny(String::new())),
            tokens: HashMap::new(),
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            events: broadcast::channel(4096).0,
            close: watch::channel(0).0,
            open_watches: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            // Owned by this task, so aborting it drops (and aborts) every connection task.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                let state = state.clone();
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let http = hyper::server::conn::http1::Builder::new();
                conns.spawn(async move { http.serve_connection(TokioIo::new(stream), svc).await });
            }
        });
        let api = Self { addr, shared, task };
        for crd in shipped_crds() {
            api.put(crd);
        }
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube::Client` pointed at this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    // ----- objects -----

    /// Create or replace an object as given (collection from `apiVersion` + `kind`), as another
    /// client would: bumps the resourceVersion, emits ADDED / MODIFIED, returns the stored object.
    pub fn put(&self, object: Json) -> Json {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1").to_owned();
        let kind = object["kind"].as_str().expect("put: object needs a kind");
        let coll = Collection::new(&api_version, &plural_of(kind));
        self.put_in(&coll, object)
    }

    /// Like [`put`](Self::put) for typed objects (`k8s_openapi` types, `CustomResource` types).
    pub fn put_typed<K>(&self, object: &K) -> Json
    where
        K: kube::Resource<DynamicType = ()> + serde::Serialize,
    {
        let mut value = serde_json::to_value(object).unwrap();
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        self.put_in(&Collection::of::<K>(), value)
    }

    pub fn put_in(&self, coll: &Collection, object: Json) -> Json {
        let mut inner = self.shared.lock();
        let key = Key::of(coll, &object);
        let old = inner.objects.get(&key).cloned();
        inner.store(&self.shared, key, object, old.as_ref(), false)
    }

    /// Delete an object as another client would (emits DELETED). Returns its last state.
    pub fn remove(&self, coll: &Collection, namespace: Option<&str>, name: &str) -> Option<Json> {
        let key = Key::new(coll, namespace, name);
        self.shared.lock().delete(&self.shared, &key)
    }

    pub fn object(&self, coll: &Collection, namespace: Option<&str>, name: &str) -> Option<Json> {
        let key = Key::new(coll, namespace, name);
        self.shared.lock().objects.get(&key).cloned()
    }

    pub fn objects(&self, coll: &Collection) -> Vec<Json> {
        let inner = self.shared.lock();
        let all = inner.objects.iter();
        all.filter(|(k, _)| &k.coll == coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored object, of every collection.
    pub fn all_objects(&self) -> Vec<Json> {
        self.shared.lock().objects.values().cloned().collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    // ----- requests -----

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Requests with this method and exactly this path (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        let inner = self.shared.lock();
        let same = |r: &&Logged| r.method.eq_ignore_ascii_case(method) && r.path == path;
        inner.log.iter().filter(same).count()
    }

    pub fn clear_log(&self) {
        self.shared.lock().log.clear();
    }

    /// Bodies of every SubjectAccessReview POSTed so far.
    pub fn sar_requests(&self) -> Vec<Json> {
        let inner = self.shared.lock();
        let sar = |r: &&Logged| r.method == "POST" && r.path.ends_with("/subjectaccessreviews");
        inner
            .log
            .iter()
            .filter(sar)
            .filter_map(|r| r.body.clone())
            .collect()
    }

    /// Decide SubjectAccessReviews; the closure gets the request body. Default: deny.
    /// Makes TokenReview accept `token` for `user` with `groups` (every other token: not authenticated).
    pub fn accept_token(&self, token: &str, user: &str, groups: &[&str]) {
        self.shared.lock().tokens.insert(
            token.to_string(),
            (
                user.to_string(),
                groups.iter().map(|g| g.to_string()).collect(),
            ),
        );
    }

    pub fn set_sar_responder(&self, f: impl Fn(&Json) -> SarAnswer + Send + Sync + 'static) {
        self.shared.lock().sar = Arc::new(f);
    }

    // ----- faults and watch control -----

    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// End every open watch stream (the client sees a normal end of stream and re-watches).
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|n| *n += 1);
    }

    /// Forget the watch history: a watch from any resourceVersion before now gets 410 Expired.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.history.clear();
        inner.floor = inner.rv;
    }

    /// Send a BOOKMARK at the current resourceVersion to watches that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        let inner = self.shared.lock();
        let _ = self.shared.events.send(Broadcast::Bookmark(inner.rv));
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(SeqCst)
    }

    /// Wait until at least `n` watches are open; false on timeout.
    pub async fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// A Secret as JSON with base64-encoded `data`.
pub fn secret(namespace: &str, name: &str, data: &[(&str, &str)]) -> Json {
    let b64 = |v: &str| json!(base64::engine::general_purpose::STANDARD.encode(v));
    let data: serde_json::Map<_, _> = data.iter().map(|(k, v)| (k.to_string(), b64(v))).collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": name, "namespace": namespace}, "data": data})
}

/// A minimal Pod as JSON.
pub fn pod(namespace: &str, name: &str) -> Json {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
           "spec": {"containers": [{"name": "main", "image": "busybox"}]}})
}

/// `VaultConfig` → `vaultconfigs`, `Policy` → `policies`.
fn plural_of(kind: &str) -> String {
    let lower = kind.to_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None if lower.ends_with('s') => format!("{lower}es"),
        None => format!("{lower}s"),
    }
}

fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    let seconds = k8s_openapi::jiff::Timestamp::from_second(t.as_second());
    seconds.unwrap_or(t).to_string()
}

/// The object without server-owned parts, to tell spec changes (which bump `generation`).
fn spec_of(object: &Json) -> Json {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl Inner {
    fn kind(&self, coll: &Collection) -> String {
        if let Some(k) = self.kinds.get(coll) {
            return k.clone();
        }
        let mut chars = coll.plural.trim_end_matches('s').chars();
        let first = chars.next().map(|c| c.to_uppercase().to_string());
        first.unwrap_or_default() + chars.as_str()
    }

    fn emit(&mut self, shared: &Shared, rv: u64, event: Broadcast) {
        if self.history.len() == HISTORY
            && let Some((dropped, _)) = self.history.pop_front()
        {
            self.floor = dropped;
        }
        self.history.push_back((rv, event.clone()));
        let _ = shared.events.send(event);
    }

    /// Fill the server-owned fields of `object` (relative to `old`) as of resourceVersion `rv`.
    fn prepare(&mut self, key: &Key, mut object: Json, old: Option<&Json>, rv: u64) -> Json {
        if let Some(kind) = object["kind"].as_str() {
            self.kinds.insert(key.coll.clone(), kind.to_owned());
        }
        object["kind"] = json!(self.kind(&key.coll));
        object["apiVersion"] = json!(key.coll.api_version());
        // Secrets: the API server folds write-only `stringData` into base64 `data`.
        let is_secret = key.coll == Collection::secrets();
        let object_map = object.as_object_mut().filter(|_| is_secret);
        if let Some(Json::Object(plain)) = object_map.and_then(|o| o.remove("stringData")) {
            let b64 = base64::engine::general_purpose::STANDARD;
            for (k, v) in plain {
                object["data"][k] = json!(b64.encode(v.as_str().unwrap_or_default()));
            }
        }
        let meta = &mut object["metadata"];
        meta["name"] = json!(key.name);
        meta["namespace"] = json!(key.namespace);
        if key.namespace.is_empty() {
            meta.as_object_mut().map(|m| m.remove("namespace"));
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match old {
            None => {
                self.uid += 1;
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.uid));
                meta["creationTimestamp"] = json!(now());
            }
            Some(old) => {
                meta["uid"] = old["metadata"]["uid"].clone();
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
        }
        if !key.coll.is_core() {
            let generation = match old {
                None => 1,
                Some(old) => {
                    let g = old["metadata"]["generation"].as_u64().unwrap_or(1);
                    g + u64::from(spec_of(old) != spec_of(&object))
                }
            };
            object["metadata"]["generation"] = json!(generation);
        }
        object
    }

    /// Store `object` under `key` (or only show what would be stored, for `dryRun`).
    fn store(
        &mut self,
        shared: &Shared,
        key: Key,
        object: Json,
        old: Option<&Json>,
        dry: bool,
    ) -> Json {
        if dry {
            let rv = self.rv;
            return self.prepare(&key, object, old, rv);
        }
        self.rv += 1;
        let object = self.prepare(&key, object, old, self.rv);
        self.objects.insert(key.clone(), object.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let event = Broadcast::Event {
            key,
            kind,
            object: object.clone(),
        };
        self.emit(shared, self.rv, event);
        object
    }

    fn delete(&mut self, shared: &Shared, key: &Key) -> Option<Json> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let event = Broadcast::Event {
            key: key.clone(),
            kind: "DELETED",
            object: object.clone(),
        };
        self.emit(shared, self.rv, event);
        Some(object)
    }

    /// Whether the API serves `coll` (`None`: it does not, e.g. a custom resource without a
    /// stored CRD serving that version) and whether it has a `status` subresource.
    fn status_subresource(&self, coll: &Collection) -> Option<bool> {
        if coll.is_built_in() {
            let key = (coll.prefix.as_str(), coll.plural.as_str());
            return Some(STATUS_SUBRESOURCE.contains(&key));
        }
        let version = coll.prefix.rsplit('/').next().unwrap_or("");
        let crds = crds();
        let stored = self.objects.iter().filter(|(k, _)| k.coll == crds);
        stored.map(|(_, crd)| &crd["spec"]).find_map(|spec| {
            if spec["group"] != coll.group() || spec["names"]["plural"] != coll.plural.as_str() {
                return None;
            }
            let mut versions = spec["versions"].as_array()?.iter();
            let served = versions.find(|v| v["name"] == version && v["served"] != json!(false))?;
            Some(served["subresources"]["status"].is_object())
        })
    }

    fn take_fault(&mut self, method: &Method, path: &str, watch: bool) -> Option<FaultAction> {
        let fault = self
            .faults
            .iter_mut()
            .find(|f| f.matches(method, path, watch))?;
        if let Some(n) = &mut fault.remaining {
            *n -= 1;
        }
        Some(fault.action.clone())
    }
}

// ----- HTTP -----

/// `[namespaces/NS/]PLURAL[/NAME[/SUB]]` below an API prefix, and `?dryRun=All`.
struct Target {
    coll: Collection,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    dry_run: bool,
    /// The resource has a `status` subresource (main writes keep the stored status).
    has_status: bool,
}

impl Target {
    fn parse(path: &str, dry_run: bool) -> Option<Self> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (prefix, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => ("api/v1".to_owned(), rest),
            ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (plural, name, sub) = match rest {
            [p] => (p, None, None),
            [p, n] => (p, Some(n.to_string()), None),
            [p, n, s] => (p, Some(n.to_string()), Some(s.to_string())),
            _ => return None,
        };
        let coll = Collection {
            prefix,
            plural: plural.to_string(),
        };
        Some(Self {
            coll,
            namespace,
            name,
            sub,
            dry_run,
            has_status: false,
        })
    }

    fn key(&self) -> Key {
        let name = self.name.as_deref().unwrap_or("");
        Key::new(&self.coll, self.namespace.as_deref(), name)
    }
}

type Reply = Response<Body>;

fn reply(code: u16, body: &Json) -> Reply {
    let response = Response::builder().status(code);
    let response = response.header("content-type", "application/json");
    response
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn status_body(code: u16, reason: &str, message: String, details: Json) -> Json {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "details": details, "code": code})
}

fn fail(code: u16, reason: &str, message: String) -> Reply {
    reply(code, &status_body(code, reason, message, json!({})))
}

fn bad_request(message: impl Into<String>) -> Reply {
    fail(400, "BadRequest", message.into())
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

fn details(key: &Key) -> Json {
    let mut d = json!({"name": key.name, "kind": key.coll.plural});
    if !key.coll.group().is_empty() {
        d["group"] = json!(key.coll.group());
    }
    d
}

fn not_found(key: &Key) -> Reply {
    let message = format!("{} \"{}\" not found", key.coll.qualified(), key.name);
    reply(404, &status_body(404, "NotFound", message, details(key)))
}

fn conflict(key: &Key) -> Reply {
    let (what, name) = (key.coll.qualified(), &key.name);
    let message = format!(
        "Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    reply(409, &status_body(409, "Conflict", message, details(key)))
}

fn parse_body(bytes: &[u8]) -> Option<Json> {
    if bytes.is_empty() {
        return None;
    }
    let json = serde_json::from_slice(bytes).ok();
    json.or_else(|| serde_yaml::from_slice(bytes).ok())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (method, path) = (parts.method, parts.uri.path().to_owned());
    let raw_query = parts.uri.query().unwrap_or("").to_owned();
    let query: HashMap<String, String> = form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let is_watch = flag("watch");
    let body = parse_body(&bytes);
    let fault = {
        let mut inner = shared.lock();
        let (m, p, b) = (method.to_string(), path.clone(), body.clone());
        inner.log.push(Logged {
            method: m,
            path: p,
            query: raw_query,
            body: b,
        });
        inner.take_fault(&method, &path, is_watch)
    };
    match fault {
        Some(FaultAction::Hang) => std::future::pending::<()>().await,
        Some(FaultAction::Status(code)) => {
            let message = format!("injected fault: HTTP {code}");
            return Ok(fail(code, reason_for(code), message));
        }
        None => {}
    }
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let not_served = || {
        let message = "the server could not find the requested resource";
        Ok(fail(404, "NotFound", message.into()))
    };
    let Some(mut target) = Target::parse(&path, dry_run) else {
        return not_served();
    };
    // Only what the server serves: built-in resources and custom resources with a stored CRD;
    // of subresources only `status`, and only where it is declared (not on Secrets, say).
    match shared.lock().status_subresource(&target.coll) {
        None => return not_served(),
        Some(has_status) => target.has_status = has_status,
    }
    match target.sub.as_deref() {
        None => {}
        Some("status") if target.has_status => match method {
            Method::GET | Method::PUT | Method::PATCH => {}
            _ => {
                let message = format!("{method} is not supported on {path}");
                return Ok(fail(405, "MethodNotAllowed", message));
            }
        },
        Some(_) => return not_served(),
    }
    let ctype = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    let ctype = ctype.unwrap_or("").split(';').next().unwrap_or("").trim();
    let sar = target.coll.prefix == "apis/authorization.k8s.io/v1"
        && target.coll.plural == "subjectaccessreviews";
    let token_review = target.coll.prefix == "apis/authentication.k8s.io/v1"
        && target.coll.plural == "tokenreviews";
    let reply = match (&method, &target.name) {
        (&Method::POST, None) if sar => subject_access_review(&shared, body),
        (&Method::POST, None) if token_review => review_token(&shared, body),
        (&Method::GET, None) if is_watch => start_watch(&shared, &target, &query),
        (&Method::GET, None) => list(&shared, &target, &query),
        (&Method::GET, Some(_)) => get(&shared, &target),
        (&Method::POST, None) => create(&shared, &target, body),
        (&Method::PUT, Some(_)) => replace(&shared, &target, body),
        (&Method::PATCH, Some(_)) => patch(&shared, &target, ctype, body),
        (&Method::DELETE, Some(_)) => delete(&shared, &target),
        _ => fail(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        ),
    };
    Ok(reply)
}

fn get(shared: &Shared, target: &Target) -> Reply {
    let key = target.key();
    match shared.lock().objects.get(&key) {
        Some(object) => reply(200, object),
        None => not_found(&key),
    }
}

/// One selector term: `k=v`, `k==v`, `k!=v`, and for labels also `k` and `!k` (value `None`).
struct Term {
    key: String,
    value: Option<String>,
    equal: bool,
}

fn parse_terms(selector: Option<&String>) -> Result<Vec<Term>, String> {
    let terms = selector.map(String::as_str).unwrap_or("").split(',');
    let term = |t: &str| {
        let (key, value, equal) = if let Some((k, v)) = t.split_once("!=") {
            (k, Some(v), false)
        } else if let Some((k, v)) = t.split_once('=') {
            (k, Some(v.trim_start_matches('=')), true)
        } else if let Some(k) = t.strip_prefix('!') {
            (k, None, false)
        } else {
            (t, None, true)
        };
        if key.trim().contains([' ', '(']) {
            return Err(format!(
                "unsupported selector {t:?} (only =, ==, != and existence)"
            ));
        }
        let value = value.map(|v| v.trim().to_owned());
        Ok(Term {
            key: key.trim().to_owned(),
            value,
            equal,
        })
    };
    terms.filter(|t| !t.trim().is_empty()).map(term).collect()
}

/// What a list or watch selects: collection, namespace (if any), label and field selectors.
struct Filter {
    coll: Collection,
    namespace: Option<String>,
    labels: Vec<Term>,
    /// Equality on any dotted path (`metadata.name`, `type`, `status.phase`); missing is "".
    fields: Vec<Term>,
}

impl Filter {
    fn parse(target: &Target, query: &HashMap<String, String>) -> Result<Self, String> {
        let labels = parse_terms(query.get("labelSelector"))?;
        let fields = parse_terms(query.get("fieldSelector"))?;
        if fields.iter().any(|f| f.value.is_none()) {
            return Err("field selectors need a value".into());
        }
        let (coll, namespace) = (target.coll.clone(), target.namespace.clone());
        Ok(Self {
            coll,
            namespace,
            labels,
            fields,
        })
    }

    fn matches(&self, key: &Key, object: &Json) -> bool {
        let labels = &object["metadata"]["labels"];
        let label_ok = |t: &Term| match (&t.value, labels[&t.key].as_str()) {
            (None, actual) => actual.is_some() == t.equal,
            (Some(v), actual) => (actual == Some(v.as_str())) == t.equal,
        };
        let field_ok = |t: &Term| {
            let actual = t.key.split('.').fold(object, |o, part| &o[part]);
            (actual.as_str().unwrap_or("") == t.value.as_deref().unwrap_or("")) == t.equal
        };
        key.coll == self.coll
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| ns == &key.namespace)
            && self.labels.iter().all(label_ok)
            && self.fields.iter().all(field_ok)
    }
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Reply {
    let filter = match Filter::parse(target, query) {
        Ok(f) => f,
        Err(message) => return bad_request(message),
    };
    let inner = shared.lock();
    let all = inner.objects.iter();
    let matching: Vec<&Json> = all
        .filter(|(k, o)| filter.matches(k, o))
        .map(|(_, o)| o)
        .collect();
    // `continue` is the offset; pages come from the current state, not a snapshot.
    let number = |name: &str| query.get(name).and_then(|v| v.parse::<usize>().ok());
    let start = number("continue").unwrap_or(0);
    let limit = number("limit").filter(|l| *l > 0).unwrap_or(usize::MAX);
    let item = |o: &&Json| {
        let mut o = (*o).clone();
        // Items of core lists carry no kind/apiVersion (only the list does), as on a real server.
        if let Some(m) = o.as_object_mut().filter(|_| target.coll.is_core()) {
            m.remove("kind");
            m.remove("apiVersion");
        }
        o
    };
    let page: Vec<Json> = matching.iter().skip(start).take(limit).map(item).collect();
    let mut metadata = json!({"resourceVersion": inner.rv.to_string()});
    let next = start.saturating_add(page.len());
    if next < matching.len() {
        metadata["continue"] = json!(next.to_string());
        metadata["remainingItemCount"] = json!(matching.len() - next);
    }
    let (kind, api_version) = (inner.kind(&target.coll) + "List", target.coll.api_version());
    let list =
        json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page});
    reply(200, &list)
}

fn create(shared: &Shared, target: &Target, body: Option<Json>) -> Reply {
    let Some(mut object) = body.filter(Json::is_object) else {
        return bad_request("the request body is not a JSON object");
    };
    let mut inner = shared.lock();
    let meta = &object["metadata"];
    let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(g)) => format!("{g}{:05}", inner.uid + 1),
        _ => {
            let message = format!("{}: metadata.name: Required value", target.coll.plural);
            return fail(422, "Invalid", message);
        }
    };
    if meta["namespace"]
        .as_str()
        .is_some_and(|ns| Some(ns) != target.namespace.as_deref())
    {
        return bad_request("the namespace of the object does not match the namespace on the URL");
    }
    let key = Key::new(&target.coll, target.namespace.as_deref(), &name);
    if inner.objects.contains_key(&key) {
        let message = format!("{} \"{name}\" already exists", key.coll.qualified());
        return reply(
            409,
            &status_body(409, "AlreadyExists", message, details(&key)),
        );
    }
    if target.has_status {
        object.as_object_mut().map(|m| m.remove("status"));
    }
    reply(201, &inner.store(shared, key, object, None, target.dry_run))
}

/// Write the full object `new` over the stored `old`, honouring the status subresource split
/// and a resourceVersion precondition.
fn update(shared: &Shared, inner: &mut Inner, target: &Target, mut new: Json, old: &Json) -> Reply {
    let key = target.key();
    let expected = new["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty());
    if expected.is_some_and(|v| Some(v) != old["metadata"]["resourceVersion"].as_str()) {
        return conflict(&key);
    }
    if target.sub.as_deref() == Some("status") {
        let status = new["status"].take();
        new = old.clone();
        new["status"] = status;
    } else if target.has_status {
        new["status"] = old["status"].clone();
        if new["status"].is_null() {
            new.as_object_mut().map(|m| m.remove("status"));
        }
    }
    reply(
        200,
        &inner.store(shared, key, new, Some(old), target.dry_run),
    )
}

fn replace(shared: &Shared, target: &Target, body: Option<Json>) -> Reply {
    let Some(object) = body.filter(Json::is_object) else {
        return bad_request("the request body is not a JSON object");
    };
    let key = target.key();
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != key.name)
    {
        return bad_request("the name of the object does not match the name on the URL");
    }
    let mut inner = shared.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        return not_found(&key);
    };
    update(shared, &mut inner, target, object, &old)
}

/// Merge, strategic merge (as merge), server-side apply (as merge, creating if absent), JSON patch.
fn patch(shared: &Shared, target: &Target, ctype: &str, body: Option<Json>) -> Reply {
    let Some(patch) = body else {
        return bad_request("the patch body is not JSON or YAML");
    };
    let mut inner = shared.lock();
    let Some(old) = inner.objects.get(&target.key()).cloned() else {
        if ctype == "application/apply-patch+yaml" && target.sub.is_none() {
            drop(inner);
            return create(shared, target, Some(patch));
        }
        return not_found(&target.key());
    };
    let mut doc = old.clone();
    match ctype {
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => json_patch::merge(&mut doc, &patch),
        "application/json-patch+json" => {
            let ops: json_patch::Patch = match serde_json::from_value(patch) {
                Ok(ops) => ops,
                Err(e) => return bad_request(format!("invalid JSON patch: {e}")),
            };
            if let Err(e) = json_patch::patch(&mut doc, &ops) {
                return fail(
                    422,
                    "Invalid",
                    format!("the JSON patch cannot be applied: {e}"),
                );
            }
        }
        other => {
            let message = format!("the body of the request was in an unknown format: {other:?}");
            return fail(415, "UnsupportedMediaType", message);
        }
    }
    if !doc.is_object() {
        return fail(
            422,
            "Invalid",
            "the patched object is not a JSON object".into(),
        );
    }
    update(shared, &mut inner, target, doc, &old)
}

fn delete(shared: &Shared, target: &Target) -> Reply {
    let key = target.key();
    let mut inner = shared.lock();
    let deleted = match target.dry_run {
        true => inner.objects.get(&key).cloned(),
        false => inner.delete(shared, &key),
    };
    match deleted {
        None => not_found(&key),
        // Custom resources answer with the deleted object, core resources with a Success Status.
        Some(object) if !key.coll.is_core() => reply(200, &object),
        Some(object) => {
            let mut details = details(&key);
            details["uid"] = object["metadata"]["uid"].clone();
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success", "details": details});
            reply(200, &status)
        }
    }
}

fn subject_access_review(shared: &Shared, body: Option<Json>) -> Reply {
    let Some(mut review) = body.filter(Json::is_object) else {
        return bad_request("the request body is not a JSON object");
    };
    // The API server's validation of a SubjectAccessReview spec.
    let spec = &review["spec"];
    let attributes = [&spec["resourceAttributes"], &spec["nonResourceAttributes"]];
    let problem = if attributes.iter().all(|a| a.is_null()) {
        Some(
            "spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )
    } else if attributes.iter().all(|a| !a.is_null()) {
        Some(
            "spec.nonResourceAttributes: Invalid value: \"null\": cannot be specified in combination with resourceAttributes",
        )
    } else if spec["user"].as_str().is_none_or(str::is_empty)
        && spec["groups"].as_array().is_none_or(Vec::is_empty)
    {
        Some("spec.user: Invalid value: \"\": at least one of user or group must be specified")
    } else {
        None
    };
    if let Some(problem) = problem {
        let message =
            format!("SubjectAccessReview.authorization.k8s.io \"\" is invalid: {problem}");
        return fail(422, "Invalid", message);
    }
    let responder = shared.lock().sar.clone();
    let status = match responder(&review) {
        SarAnswer::Allow => json!({"allowed": true}),
        SarAnswer::Deny(reason) if reason.is_empty() => json!({"allowed": false}),
        SarAnswer::Deny(reason) => json!({"allowed": false, "reason": reason}),
        SarAnswer::ExplicitDeny(reason) => {
            json!({"allowed": false, "denied": true, "reason": reason})
        }
        SarAnswer::EvaluationError(error) => json!({"allowed": false, "evaluationError": error}),
        SarAnswer::Error(code) => {
            let message = format!("SubjectAccessReview failed: HTTP {code}");
            return fail(code, reason_for(code), message);
        }
    };
    review["kind"] = json!("SubjectAccessReview");
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = status;
    reply(201, &review)
}

fn review_token(shared: &Shared, body: Option<Json>) -> Reply {
    let Some(mut review) = body.filter(Json::is_object) else {
        return bad_request("the request body is not a JSON object");
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let known = shared.lock().tokens.get(&token).cloned();
    review["kind"] = json!("TokenReview");
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["status"] = match known {
        Some((user, groups)) => {
            json!({"authenticated": true, "user": {"username": user, "groups": groups}})
        }
        None => json!({"authenticated": false, "error": "token not recognized"}),
    };
    reply(201, &review)
}

// ----- watch -----

struct WatchStream {
    backlog: VecDeque<Bytes>,
    /// End once the backlog is sent (after a 410 Expired).
    finished: bool,
    rx: broadcast::Receiver<Broadcast>,
    close: watch::Receiver<u64>,
    deadline: Option<Instant>,
    filter: Filter,
    bookmarks: bool,
    types: Json,
    _open: OpenWatch,
}

/// Counts open watches; decremented when hyper drops the response body.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, SeqCst);
    }
}

fn line(kind: &str, object: &Json) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn bookmark(types: &Json, rv: u64, annotations: Json) -> Bytes {
    let mut object = types.clone();
    object["metadata"] = json!({"resourceVersion": rv.to_string(), "annotations": annotations});
    line("BOOKMARK", &object)
}

fn start_watch(shared: &Arc<Shared>, target: &Target, query: &HashMap<String, String>) -> Reply {
    let filter = match Filter::parse(target, query) {
        Ok(f) => f,
        Err(message) => return bad_request(message),
    };
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let (bookmarks, initial) = (flag("allowWatchBookmarks"), flag("sendInitialEvents"));
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok());
    let deadline = timeout.map(|s| Instant::now() + Duration::from_secs(s));
    let from = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0");
    let inner = shared.lock();
    let types = json!({"kind": inner.kind(&target.coll), "apiVersion": target.coll.api_version()});
    let mut backlog = VecDeque::new();
    let mut finished = false;
    match from {
        Some(rv) if !initial => {
            let Ok(from) = rv.parse::<u64>() else {
                return bad_request(format!("invalid resource version {rv:?}"));
            };
            if from < inner.floor {
                let message = format!("too old resource version: {from} ({})", inner.floor + 1);
                let expired = status_body(410, "Expired", message, json!({}));
                backlog.push_back(line("ERROR", &expired));
                finished = true;
            }
            for (_, event) in inner
                .history
                .iter()
                .filter(|(rv, _)| *rv > from && !finished)
            {
                if let Broadcast::Event { key, kind, object } = event
                    && filter.matches(key, object)
                {
                    backlog.push_back(line(kind, object));
                }
            }
        }
        // No resourceVersion, "0", or sendInitialEvents: synthetic ADDED for the current state.
        _ => {
            let current = inner.objects.iter().filter(|(k, o)| filter.matches(k, o));
            backlog.extend(current.map(|(_, o)| line("ADDED", o)));
            if initial && bookmarks {
                let end = json!({"k8s.io/initial-events-end": "true"});
                backlog.push_back(bookmark(&types, inner.rv, end));
            }
        }
    }
    // Subscribed under the lock: every later event is newer than the backlog.
    let rx = shared.events.subscribe();
    drop(inner);
    shared.open_watches.fetch_add(1, SeqCst);
    let close = shared.close.subscribe();
    let _open = OpenWatch(shared.clone());
    let state = WatchStream {
        backlog,
        finished,
        rx,
        close,
        deadline,
        filter,
        bookmarks,
        types,
        _open,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(bytes) = st.backlog.pop_front() {
                return Some((Ok::<_, Infallible>(bytes), st));
            }
            if st.finished {
                return None;
            }
            let deadline = st.deadline;
            let timeout = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // Biased: once `close_watches` returns, no further event goes out on this stream.
            tokio::select! {
                biased;
                _ = st.close.changed() => return None,
                _ = timeout => return None,
                msg = st.rx.recv() => match msg {
                    Ok(Broadcast::Event { key, kind, object }) => {
                        if st.filter.matches(&key, &object) {
                            st.backlog.push_back(line(kind, &object));
                        }
                    }
                    Ok(Broadcast::Bookmark(rv)) => {
                        if st.bookmarks {
                            st.backlog.push_back(bookmark(&st.types, rv, json!({})));
                        }
                    }
                    // Lagged or closed: end the watch, as a real server does with a slow watcher.
                    Err(_) => return None,
                },
            }
        }
    });
    let response = Response::builder().status(200);
    let response = response.header("content-type", "application/json");
    response.body(Body::from_stream(stream)).unwrap_or_default()
}
