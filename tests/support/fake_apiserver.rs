//! A small in-process fake of the Kubernetes API server, for driving the REAL `kube::Client` in
//! tests over plain HTTP on 127.0.0.1. It speaks the Kubernetes JSON wire format for the endpoints
//! this project uses and is generic over `{api/v1 | apis/GROUP/VERSION}/[namespaces/NS/]PLURAL[/NAME[/status]]`:
//! get, list (labelSelector equality/existence, fieldSelector metadata.name/namespace, limit +
//! continue), watch (history replay from a resourceVersion, 410 Expired after `compact()`,
//! bookmarks, timeoutSeconds, sendInitialEvents), create, replace (resourceVersion precondition),
//! patch (merge, strategic-merge treated as merge, apply treated as merge/upsert, json-patch),
//! delete, the `status` subresource, and `SubjectAccessReview` answered by a test closure.
//! See `docs/testing.md` for what it does not do.
//!
//! ```ignore
//! let api = FakeApiServer::start().await;
//! api.put(secret("iomete-system", "iomete-secret-store", &[("k", "v")]));
//! let client = api.client();
//! assert_eq!(api.count("GET", "/api/v1/namespaces/ns/pods/x"), 1);
//! api.inject(Fault::status("GET", "/api/v1/namespaces/ns/pods", 500).times(1));
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
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

/// Watch history kept for replay; older resourceVersions answer 410 Expired.
const HISTORY: usize = 10_000;

/// One collection of objects: `api/v1` + `secrets`, `apis/secrets.iomete.com/v1alpha1` + `vaultconfigs`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Collection {
    /// `api/v1` or `apis/{group}/{version}`.
    pub prefix: String,
    pub plural: String,
}

impl Collection {
    /// `api_version` as in objects: `v1`, `secrets.iomete.com/v1alpha1`.
    pub fn new(api_version: &str, plural: &str) -> Self {
        let prefix = if api_version.contains('/') {
            format!("apis/{api_version}")
        } else {
            format!("api/{api_version}")
        };
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
        self.prefix
            .strip_prefix("apis/")
            .or_else(|| self.prefix.strip_prefix("api/"))
            .unwrap_or("")
    }
    fn group(&self) -> &str {
        self.prefix
            .strip_prefix("apis/")
            .and_then(|gv| gv.split('/').next())
            .unwrap_or("")
    }
    fn is_core(&self) -> bool {
        self.prefix.starts_with("api/")
    }
    /// Custom resources (and Pods) have a `status` subresource: main-resource writes through the
    /// API keep the stored status.
    fn has_status(&self) -> bool {
        !self.is_core() || self.plural == "pods"
    }
    /// `secrets`, `vaultconfigs.secrets.iomete.com`: how the API server names it in messages.
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

/// One request as received (body parsed as JSON or YAML when possible).
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Json>,
}

/// Answer of the SubjectAccessReview responder.
#[derive(Clone, Debug)]
pub enum SarAnswer {
    Allow,
    Deny(String),
    /// Answer the request with this HTTP status and a `Status` body.
    Error(u16),
}

type SarResponder = Arc<dyn Fn(&Json) -> SarAnswer + Send + Sync>;

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
    /// Answer with `code` and a `Status` body.
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
    pub fn watches_only(mut self) -> Self {
        self.watch = Some(true);
        self
    }
    /// Everything but watches (gets, lists, writes).
    pub fn except_watches(mut self) -> Self {
        self.watch = Some(false);
        self
    }
    /// Apply to the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
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
    /// (rv, event) after `floor`; a watch from an rv below `floor` is told 410 Expired.
    history: VecDeque<(u64, Broadcast)>,
    floor: u64,
    kinds: HashMap<Collection, String>,
    log: Vec<Logged>,
    faults: Vec<Fault>,
    sar: SarResponder,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Broadcast>,
    close: watch::Sender<u64>,
    open_watches: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running server; dropping it aborts the accept loop and every connection (watches included).
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
        let kinds = kinds
            .iter()
            .map(|(p, k)| (Collection::new("v1", p), k.to_string()));
        let inner = Inner {
            rv: 1,
            uid: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 0,
            kinds: kinds.collect(),
            log: Vec::new(),
            faults: Vec::new(),
            sar: Arc::new(|_| {
                SarAnswer::Deny("fake API server: no SubjectAccessReview responder set".into())
            }),
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            events: broadcast::channel(4096).0,
            close: watch::channel(0).0,
            open_watches: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            // Owned here so that aborting this task drops (and aborts) every connection task.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                let state = state.clone();
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    let _ = conn.await;
                });
            }
        });
        Self { addr, shared, task }
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

    /// Create or replace an object as given (collection from `apiVersion` + `kind`), as if another
    /// client wrote it: bumps the resourceVersion and emits ADDED / MODIFIED. Returns the stored object.
    pub fn put(&self, object: Json) -> Json {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1").to_owned();
        let kind = object["kind"]
            .as_str()
            .expect("put: object needs a kind")
            .to_owned();
        self.put_in(&Collection::new(&api_version, &plural_of(&kind)), object)
    }

    /// Like [`put`](Self::put) for a typed object (`k8s_openapi` or `kube::CustomResource` types).
    pub fn put_typed<K: kube::Resource<DynamicType = ()> + serde::Serialize>(
        &self,
        object: &K,
    ) -> Json {
        let mut value = serde_json::to_value(object).unwrap();
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        self.put_in(&Collection::of::<K>(), value)
    }

    pub fn put_in(&self, coll: &Collection, object: Json) -> Json {
        let mut inner = self.shared.lock();
        let key = key_of(coll, &object);
        let old = inner.objects.get(&key).cloned();
        inner.store(&self.shared, key, object, old.as_ref())
    }

    /// Delete an object as another client would (emits DELETED). Returns its last state.
    pub fn remove(&self, coll: &Collection, namespace: Option<&str>, name: &str) -> Option<Json> {
        let key = Key {
            coll: coll.clone(),
            namespace: namespace.unwrap_or("").into(),
            name: name.into(),
        };
        self.shared.lock().delete(&self.shared, &key)
    }

    pub fn object(&self, coll: &Collection, namespace: Option<&str>, name: &str) -> Option<Json> {
        let key = Key {
            coll: coll.clone(),
            namespace: namespace.unwrap_or("").into(),
            name: name.into(),
        };
        self.shared.lock().objects.get(&key).cloned()
    }

    pub fn objects(&self, coll: &Collection) -> Vec<Json> {
        let inner = self.shared.lock();
        inner
            .objects
            .iter()
            .filter(|(k, _)| &k.coll == coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    // ----- requests -----

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Requests with exactly this method and path (query ignored), e.g. `("GET", "/api/v1/namespaces/a/pods/p")`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        let inner = self.shared.lock();
        inner
            .log
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path == path)
            .count()
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

    /// Forget the watch history: a watch from any resourceVersion older than now gets 410 Expired.
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
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until at least `n` watches are open; false on timeout.
    pub async fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open_watches() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// A Secret as JSON with base64-encoded `data`.
pub fn secret(namespace: &str, name: &str, data: &[(&str, &str)]) -> Json {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, Json> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(b64.encode(v))))
        .collect();
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
    if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

fn key_of(coll: &Collection, object: &Json) -> Key {
    let meta = &object["metadata"];
    Key {
        coll: coll.clone(),
        namespace: meta["namespace"].as_str().unwrap_or("").into(),
        name: meta["name"].as_str().unwrap_or("").into(),
    }
}

fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

impl Inner {
    fn kind(&self, coll: &Collection) -> String {
        if let Some(k) = self.kinds.get(coll) {
            return k.clone();
        }
        let mut chars = coll.plural.trim_end_matches('s').chars();
        chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
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

    /// Fill server-owned fields of `object` (relative to `old`) without storing it.
    fn prepare(&mut self, key: &Key, mut object: Json, old: Option<&Json>, rv: u64) -> Json {
        if let Some(kind) = object["kind"].as_str() {
            self.kinds.insert(key.coll.clone(), kind.to_owned());
        }
        object["kind"] = json!(self.kind(&key.coll));
        object["apiVersion"] = json!(key.coll.api_version());
        if key.coll == Collection::secrets()
            && let Some(Json::Object(plain)) =
                object.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            let b64 = base64::engine::general_purpose::STANDARD;
            for (k, v) in plain {
                object["data"][k] = json!(b64.encode(v.as_str().unwrap_or_default()));
            }
        }
        let old_meta = old.map(|o| o["metadata"].clone()).unwrap_or(Json::Null);
        let meta = &mut object["metadata"];
        meta["name"] = json!(key.name);
        if key.namespace.is_empty() {
            meta.as_object_mut().map(|m| m.remove("namespace"));
        } else {
            meta["namespace"] = json!(key.namespace);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match old_meta {
            Json::Null => {
                self.uid += 1;
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.uid));
                meta["creationTimestamp"] = json!(now());
            }
            old_meta => {
                meta["uid"] = old_meta["uid"].clone();
                meta["creationTimestamp"] = old_meta["creationTimestamp"].clone();
            }
        }
        if !key.coll.is_core() {
            // Custom resources count spec changes in metadata.generation.
            let strip = |o: &Json| {
                let mut o = o.clone();
                o.as_object_mut()
                    .map(|m| (m.remove("metadata"), m.remove("status")));
                o
            };
            let generation = match old {
                None => 1,
                Some(old) => {
                    let g = old["metadata"]["generation"].as_u64().unwrap_or(1);
                    if strip(old) == strip(&object) {
                        g
                    } else {
                        g + 1
                    }
                }
            };
            object["metadata"]["generation"] = json!(generation);
        }
        object
    }

    fn store(&mut self, shared: &Shared, key: Key, object: Json, old: Option<&Json>) -> Json {
        let rv = self.bump();
        let object = self.prepare(&key, object, old, rv);
        self.objects.insert(key.clone(), object.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.emit(
            shared,
            rv,
            Broadcast::Event {
                key,
                kind,
                object: object.clone(),
            },
        );
        object
    }

    fn delete(&mut self, shared: &Shared, key: &Key) -> Option<Json> {
        let mut object = self.objects.remove(key)?;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = Broadcast::Event {
            key: key.clone(),
            kind: "DELETED",
            object: object.clone(),
        };
        self.emit(shared, rv, event);
        Some(object)
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

/// Parsed `[namespaces/NS/]PLURAL[/NAME[/SUB]]` below an API prefix.
struct Target {
    coll: Collection,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
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
    Some(Target {
        coll,
        namespace,
        name,
        sub,
    })
}

type Reply = Response<Body>;

fn reply(code: u16, body: &Json) -> Reply {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
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
    let message = format!(
        "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
        key.coll.qualified(),
        key.name
    );
    reply(409, &status_body(409, "Conflict", message, details(key)))
}

fn parse_body(bytes: &[u8]) -> Option<Json> {
    if bytes.is_empty() {
        return None;
    }
    serde_json::from_slice(bytes)
        .ok()
        .or_else(|| serde_yaml::from_slice(bytes).ok())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or("").to_owned();
    let query: HashMap<String, String> = form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let body = parse_body(&bytes);
    let fault = {
        let mut inner = shared.lock();
        let logged = Logged {
            method: parts.method.to_string(),
            path: path.clone(),
            query: raw_query,
            body: body.clone(),
        };
        inner.log.push(logged);
        inner.take_fault(&parts.method, &path, is_watch)
    };
    match fault {
        Some(FaultAction::Hang) => std::future::pending::<()>().await,
        Some(FaultAction::Status(code)) => {
            return Ok(fail(
                code,
                reason_for(code),
                format!("injected fault: HTTP {code}"),
            ));
        }
        None => {}
    }
    let Some(target) = parse_path(&path) else {
        return Ok(fail(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        ));
    };
    let ctype = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ctype = ctype.split(';').next().unwrap_or("").trim().to_owned();
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let sar = target.coll.prefix == "apis/authorization.k8s.io/v1"
        && target.coll.plural == "subjectaccessreviews";
    let reply = match (&parts.method, &target.name) {
        (&Method::POST, None) if sar => subject_access_review(&shared, body),
        (&Method::GET, None) if is_watch => start_watch(&shared, &target, &query),
        (&Method::GET, None) => list(&shared, &target, &query),
        (&Method::GET, Some(_)) => get(&shared, &target),
        (&Method::POST, None) => create(&shared, &target, body, dry_run),
        (&Method::PUT, Some(_)) => replace(&shared, &target, body, dry_run),
        (&Method::PATCH, Some(_)) => patch(&shared, &target, &ctype, &bytes, dry_run),
        (&Method::DELETE, Some(_)) => delete(&shared, &target, dry_run),
        _ => fail(
            405,
            "MethodNotAllowed",
            format!("{} is not supported on {path}", parts.method),
        ),
    };
    Ok(reply)
}

fn key_for(target: &Target, name: &str) -> Key {
    Key {
        coll: target.coll.clone(),
        namespace: target.namespace.clone().unwrap_or_default(),
        name: name.to_owned(),
    }
}

fn get(shared: &Shared, target: &Target) -> Reply {
    let key = key_for(target, target.name.as_deref().unwrap_or(""));
    match shared.lock().objects.get(&key) {
        Some(object) => reply(200, object),
        None => not_found(&key),
    }
}

/// Label selectors (equality and existence) and field selectors (equality on any dotted path).
struct Filter {
    coll: Collection,
    namespace: Option<String>,
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String, bool)>,
}

impl Filter {
    fn parse(target: &Target, query: &HashMap<String, String>) -> Result<Self, String> {
        let bad = |what: &str, s: &str| format!("unsupported {what} selector {s:?}");
        let mut labels = Vec::new();
        for term in query
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let parsed = if let Some((k, v)) = term.split_once("!=") {
                (k, Some(v), false)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, Some(v.trim_start_matches('=')), true)
            } else if let Some(k) = term.strip_prefix('!') {
                (k, None, false)
            } else {
                (term, None, true)
            };
            if parsed.0.contains(' ') || parsed.0.contains('(') {
                return Err(bad("label", term));
            }
            labels.push((
                parsed.0.trim().to_owned(),
                parsed.1.map(|v| v.trim().to_owned()),
                parsed.2,
            ));
        }
        let mut fields = Vec::new();
        for term in query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (k, v, eq) = match term.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match term.split_once('=') {
                    Some((k, v)) => (k, v.trim_start_matches('='), true),
                    None => return Err(bad("field", term)),
                },
            };
            fields.push((k.to_owned(), v.to_owned(), eq));
        }
        Ok(Self {
            coll: target.coll.clone(),
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, key: &Key, object: &Json) -> bool {
        let ns_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| ns == &key.namespace);
        let labels = &object["metadata"]["labels"];
        let label_ok = self
            .labels
            .iter()
            .all(|(k, v, eq)| match (v, labels[k].as_str()) {
                (None, actual) => actual.is_some() == *eq,
                (Some(v), actual) => (actual == Some(v.as_str())) == *eq,
            });
        // Any dotted field path (`metadata.name`, `type`, `status.phase`); a missing field is "".
        let field_ok = self.fields.iter().all(|(k, v, eq)| {
            let actual = k.split('.').fold(object, |o, part| &o[part]);
            (actual.as_str().unwrap_or("") == v) == *eq
        });
        key.coll == self.coll && ns_ok && label_ok && field_ok
    }
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Reply {
    let filter = match Filter::parse(target, query) {
        Ok(f) => f,
        Err(message) => return fail(400, "BadRequest", message),
    };
    let inner = shared.lock();
    let matching: Vec<&Json> = inner
        .objects
        .iter()
        .filter(|(k, o)| filter.matches(k, o))
        .map(|(_, o)| o)
        .collect();
    // `continue` is "<offset>"; pages are cut from the current state, not a snapshot.
    let start: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Json> = matching
        .iter()
        .skip(start)
        .take(limit)
        .map(|o| {
            let mut o = (*o).clone();
            // Core lists carry kind/apiVersion only on the list, as the real server sends them.
            if target.coll.is_core()
                && let Some(m) = o.as_object_mut()
            {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": inner.rv.to_string()});
    let next = start.saturating_add(page.len());
    if next < matching.len() {
        metadata["continue"] = json!(next.to_string());
        metadata["remainingItemCount"] = json!(matching.len() - next);
    }
    let kind = format!("{}List", inner.kind(&target.coll));
    reply(
        200,
        &json!({"kind": kind, "apiVersion": target.coll.api_version(), "metadata": metadata, "items": page}),
    )
}

fn create(shared: &Shared, target: &Target, body: Option<Json>, dry_run: bool) -> Reply {
    let Some(mut object) = body.filter(Json::is_object) else {
        return fail(
            400,
            "BadRequest",
            "the request body is not a JSON object".into(),
        );
    };
    let mut inner = shared.lock();
    let name = match (
        object["metadata"]["name"].as_str(),
        object["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(g)) => format!("{g}{:05}", inner.uid + 1),
        _ => {
            return fail(
                422,
                "Invalid",
                format!("{}: metadata.name: Required value", target.coll.plural),
            );
        }
    };
    if let (Some(path_ns), Some(body_ns)) =
        (&target.namespace, object["metadata"]["namespace"].as_str())
        && path_ns != body_ns
    {
        return fail(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        );
    }
    let key = key_for(target, &name);
    if inner.objects.contains_key(&key) {
        let message = format!("{} \"{}\" already exists", key.coll.qualified(), key.name);
        return reply(
            409,
            &status_body(409, "AlreadyExists", message, details(&key)),
        );
    }
    if target.coll.has_status() && !target.coll.is_core() {
        object.as_object_mut().map(|m| m.remove("status"));
    }
    let stored = if dry_run {
        let rv = inner.rv;
        inner.prepare(&key, object, None, rv)
    } else {
        inner.store(shared, key, object, None)
    };
    reply(201, &stored)
}

/// Write `new` (a full object) over the stored `old`, honouring the status subresource split.
fn update(
    shared: &Shared,
    inner: &mut Inner,
    key: Key,
    sub: Option<&str>,
    mut new: Json,
    old: &Json,
    dry_run: bool,
) -> Reply {
    let expected = new["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty());
    if expected.is_some_and(|v| Some(v) != old["metadata"]["resourceVersion"].as_str()) {
        return conflict(&key);
    }
    if sub == Some("status") {
        let mut merged = old.clone();
        merged["status"] = new["status"].take();
        new = merged;
    } else if key.coll.has_status() {
        new["status"] = old["status"].clone();
        if new["status"].is_null() {
            new.as_object_mut().map(|m| m.remove("status"));
        }
    }
    let stored = if dry_run {
        let rv = inner.rv;
        inner.prepare(&key, new, Some(old), rv)
    } else {
        inner.store(shared, key, new, Some(old))
    };
    reply(200, &stored)
}

fn replace(shared: &Shared, target: &Target, body: Option<Json>, dry_run: bool) -> Reply {
    let Some(object) = body.filter(Json::is_object) else {
        return fail(
            400,
            "BadRequest",
            "the request body is not a JSON object".into(),
        );
    };
    let key = key_for(target, target.name.as_deref().unwrap_or(""));
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != key.name)
    {
        return fail(
            400,
            "BadRequest",
            "the name of the object does not match the name on the URL".into(),
        );
    }
    let mut inner = shared.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        return not_found(&key);
    };
    update(
        shared,
        &mut inner,
        key,
        target.sub.as_deref(),
        object,
        &old,
        dry_run,
    )
}

fn patch(shared: &Shared, target: &Target, ctype: &str, bytes: &[u8], dry_run: bool) -> Reply {
    let key = key_for(target, target.name.as_deref().unwrap_or(""));
    let Some(patch) = parse_body(bytes) else {
        return fail(
            400,
            "BadRequest",
            "the patch body is not JSON or YAML".into(),
        );
    };
    let mut inner = shared.lock();
    let old = inner.objects.get(&key).cloned();
    let apply = ctype == "application/apply-patch+yaml";
    let (mut doc, old) = match old {
        Some(old) => (old.clone(), old),
        // Server-side apply creates what does not exist.
        None if apply && target.sub.is_none() => {
            drop(inner);
            return create(shared, target, Some(patch), dry_run);
        }
        None => return not_found(&key),
    };
    match ctype {
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => json_patch::merge(&mut doc, &patch),
        "application/json-patch+json" => {
            let ops: json_patch::Patch = match serde_json::from_value(patch) {
                Ok(ops) => ops,
                Err(e) => return fail(400, "BadRequest", format!("invalid JSON patch: {e}")),
            };
            if let Err(e) = json_patch::patch(&mut doc, &ops) {
                return fail(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                );
            }
        }
        other => {
            return fail(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            );
        }
    }
    update(
        shared,
        &mut inner,
        key,
        target.sub.as_deref(),
        doc,
        &old,
        dry_run,
    )
}

fn delete(shared: &Shared, target: &Target, dry_run: bool) -> Reply {
    let key = key_for(target, target.name.as_deref().unwrap_or(""));
    let mut inner = shared.lock();
    let deleted = if dry_run {
        inner.objects.get(&key).cloned()
    } else {
        inner.delete(shared, &key)
    };
    match deleted {
        None => not_found(&key),
        // Custom resources answer with the deleted object, core resources with a Success Status.
        Some(object) if !key.coll.is_core() => reply(200, &object),
        Some(object) => {
            let mut d = details(&key);
            d["uid"] = object["metadata"]["uid"].clone();
            reply(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d}),
            )
        }
    }
}

fn subject_access_review(shared: &Shared, body: Option<Json>) -> Reply {
    let Some(mut review) = body.filter(Json::is_object) else {
        return fail(
            400,
            "BadRequest",
            "the request body is not a JSON object".into(),
        );
    };
    let responder = shared.lock().sar.clone();
    let status = match responder(&review) {
        SarAnswer::Allow => json!({"allowed": true}),
        SarAnswer::Deny(reason) => json!({"allowed": false, "denied": true, "reason": reason}),
        SarAnswer::Error(code) => {
            return fail(
                code,
                reason_for(code),
                format!("SubjectAccessReview failed: HTTP {code}"),
            );
        }
    };
    review["kind"] = json!("SubjectAccessReview");
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = status;
    reply(201, &review)
}

// ----- watch -----

struct WatchStream {
    backlog: VecDeque<Bytes>,
    /// Stop once the backlog is sent (410 Expired).
    finished: bool,
    rx: broadcast::Receiver<Broadcast>,
    close: watch::Receiver<u64>,
    deadline: Option<tokio::time::Instant>,
    filter: Filter,
    bookmarks: bool,
    types: Json,
    _open: OpenWatch,
}

/// Counts open watches; decremented when hyper drops the response body.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0
            .open_watches
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
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
        Err(message) => return fail(400, "BadRequest", message),
    };
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let (bookmarks, initial) = (flag("allowWatchBookmarks"), flag("sendInitialEvents"));
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let inner = shared.lock();
    let types = json!({"kind": inner.kind(&target.coll), "apiVersion": target.coll.api_version()});
    let mut backlog = VecDeque::new();
    let mut finished = false;
    match query
        .get("resourceVersion")
        .map(String::as_str)
        .filter(|v| !v.is_empty() && *v != "0")
    {
        Some(rv) if !initial => {
            let Ok(from) = rv.parse::<u64>() else {
                return fail(
                    400,
                    "BadRequest",
                    format!("invalid resource version {rv:?}"),
                );
            };
            if from < inner.floor {
                let message = format!("too old resource version: {from} ({})", inner.floor + 1);
                backlog.push_back(line(
                    "ERROR",
                    &status_body(410, "Expired", message, json!({})),
                ));
                finished = true;
            }
            let replay = inner
                .history
                .iter()
                .filter(|(rv, _)| *rv > from && !finished);
            for (_, event) in replay {
                if let Broadcast::Event { key, kind, object } = event
                    && filter.matches(key, object)
                {
                    backlog.push_back(line(kind, object));
                }
            }
        }
        // No resourceVersion (or "0", or sendInitialEvents): synthetic ADDED for the current state.
        _ => {
            for (key, object) in &inner.objects {
                if filter.matches(key, object) {
                    backlog.push_back(line("ADDED", object));
                }
            }
            if initial && bookmarks {
                backlog.push_back(bookmark(
                    &types,
                    inner.rv,
                    json!({"k8s.io/initial-events-end": "true"}),
                ));
            }
        }
    }
    // Subscribing under the lock: every later event has a higher resourceVersion than the backlog.
    let rx = shared.events.subscribe();
    drop(inner);
    shared
        .open_watches
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let close = shared.close.subscribe();
    let state = WatchStream {
        backlog,
        finished,
        rx,
        close,
        deadline,
        filter,
        bookmarks,
        types,
        _open: OpenWatch(shared.clone()),
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
            tokio::select! {
                _ = st.close.changed() => return None,
                _ = timeout => return None,
                msg = st.rx.recv() => match msg {
                    Ok(Broadcast::Event { key, kind, object }) if st.filter.matches(&key, &object) => {
                        st.backlog.push_back(line(kind, &object));
                    }
                    Ok(Broadcast::Bookmark(rv)) if st.bookmarks => st.backlog.push_back(bookmark(&st.types, rv, json!({}))),
                    Ok(_) => {}
                    // Lagged or closed: end the watch, as a real server does for a slow watcher.
                    Err(_) => return None,
                },
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
