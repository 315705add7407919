//! The endpoints. Each one authenticates, checks its input, authorizes before it reveals whether
//! anything exists, acts, and writes one audit line per change or denial.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use super::problem::Problem;
use super::stores::{self, DeleteError, KeyError, WriteError};
use super::vault_configs::{self, AuthMethod, AuthSpec, ConfigSpec, StoredConfig};
use super::{Api, RequestId, audit};
use crate::authz::{Decision, Permission, Resource};
use crate::backends::vault::spec::{Credential, check_segments, header_safe};
use crate::backends::vault::{CheckReport, SecretValue, check_target};
use crate::refs::{SecretObject, Source, SourceType, is_secret_data_key};

/// Largest request body (a Secret holds at most 1 MiB in all).
const MAX_BODY: usize = 1024 * 1024;
/// Largest secret value.
const MAX_VALUE: usize = 512 * 1024;
/// Longest wait for one authorization decision.
const AUTHZ_BUDGET: Duration = Duration::from_secs(3);
/// Longest wait for the Vault keys of the selector.
const LIST_BUDGET: Duration = Duration::from_secs(8);

type Answer = Result<Response, Problem>;

/// Path parameters; a path that cannot be decoded (e.g. invalid UTF-8 in a percent-escape) is a
/// problem like any other bad input, not axum's plain-text rejection.
pub(super) struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(_) => {
                let mut p = Problem::bad_request(
                    "path",
                    "the path parameters cannot be decoded (percent-escapes must encode UTF-8)",
                );
                if let Some(id) = parts.extensions.get::<RequestId>() {
                    p.request_id = id.0.clone();
                }
                Err(p.into_response())
            }
        }
    }
}

/// Runs a handler body and stamps its problem with the request id.
fn finish(id: &RequestId, answer: Answer) -> Response {
    match answer {
        Ok(response) => response,
        Err(mut problem) => {
            problem.request_id = id.0.clone();
            problem.into_response()
        }
    }
}

/// A JSON answer.
fn json<T: Serialize>(status: StatusCode, body: &T, etag: Option<&str>) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(etag) = etag.and_then(|v| HeaderValue::from_str(&format!("\"{v}\"")).ok()) {
        headers.insert(header::ETAG, etag);
    }
    response
}

/// `{key, source}`: exactly the product's `secretObject`.
fn item(kind: SourceType, id: &str, key: &str) -> SecretObject {
    SecretObject {
        key: key.to_string(),
        source: Source {
            kind,
            id: id.to_string(),
        },
    }
}

fn deadline() -> Instant {
    Instant::now() + AUTHZ_BUDGET
}

// ---- input checks (never quoting what was sent) ------------------------------------------------

fn check_domain(api: &Api, domain: &str) -> Result<(), Problem> {
    if !is_dns_label(domain) {
        return Err(Problem::bad_request(
            "domain",
            format!(
                "path parameter domain ({} characters) is not a domain name: use 1 to 63 lowercase \
                 letters, digits and '-', starting and ending with a letter or digit",
                domain.chars().count()
            ),
        ));
    }
    if domain == api.naming.global_id {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "global-read-only",
            format!(
                "global secrets are read-only here: read them with GET /api/v1/global/secrets and \
                 manage them in Kubernetes (Secret {} in namespace {})",
                api.naming.global_store, api.naming.namespace
            ),
        )
        .at("domain"));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), Problem> {
    if !is_secret_data_key(key) {
        return Err(Problem::bad_request(
            "key",
            format!(
                "path parameter key ({} characters) is not a secret key: use 1 to 253 characters \
                 from the Secret data-key alphabet (letters, digits, '-', '_', '.'), not . or ..",
                key.chars().count()
            ),
        ));
    }
    Ok(())
}

fn check_config_name(name: &str) -> Result<(), Problem> {
    if !is_dns_label(name) {
        return Err(Problem::bad_request(
            "name",
            format!(
                "path parameter name ({} characters) is not a Vault config name: use 1 to 63 \
                 lowercase letters, digits and '-', starting and ending with a letter or digit",
                name.chars().count()
            ),
        ));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A request body, read whole (at most [`MAX_BODY`]) before anything is answered, so that a
/// client is never cut off mid-send by an early denial.
async fn read_body(body: Body) -> Result<axum::body::Bytes, Problem> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("the body is larger than {MAX_BODY} bytes; a secret value may hold at most {MAX_VALUE} bytes"),
        )
        .at("body")
    })
}

/// The JSON object of a request body.
fn read_object(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, Problem>,
) -> Result<Map<String, Value>, Problem> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "the body must be JSON: send Content-Type: application/json",
            )
            .at("Content-Type"));
        }
    }
    let bytes = body?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Problem::bad_request(
            "body",
            format!(
                "the body is not valid JSON (line {}, column {}); send a JSON object",
                e.line(),
                e.column()
            ),
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Problem::bad_request(
            "body",
            format!(
                "the body is JSON {}, not an object; send a JSON object",
                shape(&other)
            ),
        )),
    }
}

/// The JSON type of a value, for messages that must not quote it.
fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn no_other_fields(
    map: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), Problem> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => {
            let shown: String = k.chars().take(64).collect();
            Err(Problem::bad_request(
                &format!("{prefix}{shown}"),
                format!(
                    "unknown field {prefix}{shown:?}; the fields are: {}",
                    allowed.join(", ")
                ),
            ))
        }
    }
}

/// An optional string field (`null` counts as absent).
fn opt_string(
    map: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<String>, Problem> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Problem::bad_request(
            path,
            format!("{path} must be a string, not {}", shape(other)),
        )),
    }
}

fn req_string(map: &Map<String, Value>, field: &str, path: &str) -> Result<String, Problem> {
    opt_string(map, field, path)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| Problem::invalid(path, format!("{path} is required")))
}

/// `If-Match` / `If-None-Match`, as the API uses them.
enum Precondition {
    /// `If-None-Match: *`: create only.
    Create,
    /// `If-Match: "<etag>"[, ...]`: only if still at one of these versions.
    Match(Vec<String>),
    None,
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, Problem> {
    let text = |name: header::HeaderName| -> Result<Option<String>, Problem> {
        headers
            .get(&name)
            .map(|v| {
                v.to_str().map(str::to_string).map_err(|_| {
                    Problem::bad_request(name.as_str(), format!("{name} is not visible ASCII"))
                })
            })
            .transpose()
    };
    let none_match = text(header::IF_NONE_MATCH)?;
    let if_match = text(header::IF_MATCH)?;
    match (none_match, if_match) {
        (Some(_), Some(_)) => Err(Problem::bad_request(
            "If-Match",
            "send either If-None-Match: * (create) or If-Match: <ETag> (change), not both",
        )),
        (Some(n), None) if n.trim() == "*" => Ok(Precondition::Create),
        (Some(_), None) => Err(Problem::bad_request(
            "If-None-Match",
            "If-None-Match supports only *: send If-None-Match: * to create",
        )),
        (None, Some(m)) => {
            if m.trim() == "*" {
                return Err(Problem::bad_request(
                    "If-Match",
                    "If-Match: * would overwrite changes you have not seen; send the ETag of your last read",
                ));
            }
            let malformed = || {
                Problem::bad_request(
                    "If-Match",
                    "If-Match must hold the quoted ETag of the last read, e.g. If-Match: \"123\"",
                )
            };
            let mut tags = Vec::new();
            let mut any = false;
            for part in m.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                any = true;
                // Weak tags are well-formed but never match: writes need the exact version.
                let (weak, quoted) = match part.strip_prefix("W/") {
                    Some(rest) => (true, rest),
                    None => (false, part),
                };
                let Some(tag) = quoted.strip_prefix('"').and_then(|p| p.strip_suffix('"')) else {
                    return Err(malformed());
                };
                if !weak {
                    tags.push(tag.to_string());
                }
            }
            if !any {
                return Err(malformed());
            }
            Ok(Precondition::Match(tags))
        }
        (None, None) => Ok(Precondition::None),
    }
}

fn precondition_required(what: &str) -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_REQUIRED,
        "precondition-required",
        format!(
            "{what} needs a precondition: send If-None-Match: * to create, or If-Match: <ETag> \
             (from your last GET) to change, so that no concurrent change is lost"
        ),
    )
    .at("If-Match")
}

fn stale(what: &str) -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_FAILED,
        "stale",
        format!("{what} changed since your last read (its ETag is no longer current); GET it again and retry"),
    )
    .at("If-Match")
}

fn query_param(query: &Option<String>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn store_problem(e: KeyError, what: &str) -> Problem {
    match e {
        KeyError::Missing => Problem::not_found(format!("{what} does not exist; check the domain and key")),
        KeyError::Exists => Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "exists",
            format!("{what} exists already; to change its value send If-Match: <ETag> from a GET instead of If-None-Match: *"),
        )
        .at("If-None-Match"),
        KeyError::Stale => stale(what),
        KeyError::Busy => Problem::new(
            StatusCode::CONFLICT,
            "busy",
            format!("{what} could not be written: other changes to the same domain kept landing first; retry"),
        ),
        KeyError::Rejected(why) => Problem::invalid("value", why),
        KeyError::Unavailable(why) => Problem::unavailable(format!(
            "the secret store could not be reached ({why}); nothing was changed, retry"
        )),
    }
}

impl Api {
    /// Whether `caller` holds `permission`; the authorizer's denial otherwise.
    async fn allowed(
        &self,
        caller: &super::auth::Caller,
        permission: Permission,
        what: &Resource,
    ) -> Result<(), String> {
        match self
            .authz
            .decide(&caller.identity, permission, what, deadline())
            .await
        {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
        }
    }

    /// `allowed`, turned into a 403 and an audit line.
    async fn require(
        &self,
        id: &RequestId,
        caller: &super::auth::Caller,
        action: &str,
        target: &str,
        permission: Permission,
        what: &Resource,
    ) -> Result<(), Problem> {
        self.allowed(caller, permission, what).await.map_err(|why| {
            let p = Problem::forbidden(why);
            audit::failed(id, &caller.actor(), action, target, &p);
            p
        })
    }

    async fn caller(
        &self,
        id: &RequestId,
        headers: &HeaderMap,
        action: &str,
        target: &str,
    ) -> Result<super::auth::Caller, Problem> {
        self.authn
            .authenticate(headers)
            .await
            .inspect_err(|p| audit::failed(id, "anonymous", action, target, p))
    }
}

// ---- domain secrets ----------------------------------------------------------------------------

pub(super) async fn list_domain_secrets(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath(domain): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("domain {domain}");
        let caller = api.caller(&id, &headers, "secret.list", &target).await?;
        check_domain(&api, &domain)?;
        api.require(
            &id,
            &caller,
            "secret.list",
            &target,
            Permission::View,
            &Resource::Domain(domain.clone()),
        )
        .await?;
        let state = api
            .stores
            .read(&api.naming.store_for(&domain))
            .await
            .map_err(|e| store_problem(e.into(), &target))?;
        let items: Vec<SecretObject> = state
            .as_ref()
            .map(|s| {
                s.keys
                    .iter()
                    .map(|k| item(SourceType::Kubernetes, &domain, k))
                    .collect()
            })
            .unwrap_or_default();
        Ok(json(
            StatusCode::OK,
            &items,
            state.as_ref().map(|s| s.version.as_str()),
        ))
    };
    finish(&id, answer.await)
}

pub(super) async fn get_domain_secret(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath((domain, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("domain {domain} key {key}");
        let caller = api.caller(&id, &headers, "secret.get", &target).await?;
        check_domain(&api, &domain)?;
        check_key(&key)?;
        api.require(
            &id,
            &caller,
            "secret.get",
            &target,
            Permission::View,
            &Resource::Domain(domain.clone()),
        )
        .await?;
        let state = api
            .stores
            .read(&api.naming.store_for(&domain))
            .await
            .map_err(|e| store_problem(e.into(), &target))?;
        match state {
            Some(s) if s.keys.contains(&key) => Ok(json(
                StatusCode::OK,
                &item(SourceType::Kubernetes, &domain, &key),
                Some(&s.version),
            )),
            _ => Err(store_problem(
                KeyError::Missing,
                &format!("key {key:?} of domain {domain:?}"),
            )),
        }
    };
    finish(&id, answer.await)
}

pub(super) async fn put_domain_secret(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath((domain, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(body).await;
    let answer = async {
        let target = format!("domain {domain} key {key}");
        let caller = api.caller(&id, &headers, "secret.put", &target).await?;
        check_domain(&api, &domain)?;
        check_key(&key)?;
        api.require(
            &id,
            &caller,
            "secret.put",
            &target,
            Permission::Update,
            &Resource::Domain(domain.clone()),
        )
        .await?;
        let result = async {
            let map = read_object(&headers, body)?;
            no_other_fields(&map, &["value"], "")?;
            let value = match map.get("value") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_VALUE => {
                    SecretValue::new(s.as_bytes().to_vec())
                }
                Some(Value::String(s)) if s.is_empty() => {
                    return Err(Problem::invalid(
                        "value",
                        "value is empty; send the secret's value",
                    ));
                }
                Some(Value::String(_)) => {
                    return Err(Problem::invalid(
                        "value",
                        format!(
                            "value is longer than {MAX_VALUE} bytes; store large files elsewhere"
                        ),
                    ));
                }
                Some(other) => {
                    return Err(Problem::bad_request(
                        "value",
                        format!("value must be a string, not {}", shape(other)),
                    ));
                }
                None => {
                    return Err(Problem::invalid(
                        "value",
                        "value is required: send {\"value\": \"...\"}",
                    ));
                }
            };
            let store = api.naming.store_for(&domain);
            let what = format!("key {key:?} of domain {domain:?}");
            let object = item(SourceType::Kubernetes, &domain, &key);
            match precondition(&headers)? {
                Precondition::None => Err(precondition_required("writing a secret")),
                Precondition::Create => {
                    let version = stores::create_key(api.stores.as_ref(), &store, &key, &value)
                        .await
                        .map_err(|e| store_problem(e, &what))?;
                    let mut response = json(StatusCode::CREATED, &object, Some(&version));
                    if let Ok(location) =
                        HeaderValue::from_str(&format!("/api/v1/domains/{domain}/secrets/{key}"))
                    {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    Ok((response, "created"))
                }
                Precondition::Match(tags) => {
                    let version =
                        stores::update_key(api.stores.as_ref(), &store, &key, &value, &tags)
                            .await
                            .map_err(|e| store_problem(e, &what))?;
                    Ok((json(StatusCode::OK, &object, Some(&version)), "updated"))
                }
            }
        }
        .await;
        match result {
            Ok((response, done)) => {
                audit::ok(&id, &caller.actor(), "secret.put", &target, done);
                Ok(response)
            }
            Err(p) => {
                audit::failed(&id, &caller.actor(), "secret.put", &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

pub(super) async fn delete_domain_secret(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath((domain, key)): ApiPath<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("domain {domain} key {key}");
        let caller = api.caller(&id, &headers, "secret.delete", &target).await?;
        check_domain(&api, &domain)?;
        check_key(&key)?;
        api.require(
            &id,
            &caller,
            "secret.delete",
            &target,
            Permission::Update,
            &Resource::Domain(domain.clone()),
        )
        .await?;
        let result = async {
            let force = match query_param(&query, "force").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => {
                    return Err(Problem::bad_request("force", "query parameter force must be true or false"));
                }
            };
            let if_match = match precondition(&headers)? {
                Precondition::Create => {
                    return Err(Problem::bad_request("If-None-Match", "If-None-Match: * makes no sense on DELETE; send If-Match or nothing"));
                }
                Precondition::Match(tags) => Some(tags),
                Precondition::None => None,
            };
            let object = item(SourceType::Kubernetes, &domain, &key);
            let what = format!("key {key:?} of domain {domain:?}");
            let in_use = || async {
                if force {
                    return Ok(());
                }
                match api.usage.pods_using(&object).await {
                    Ok(0) => Ok(()),
                    Ok(n) => {
                        let mut p = Problem::new(
                            StatusCode::CONFLICT,
                            "in-use",
                            format!(
                                "{what} is in use: {n} live pod{} {} granted it; stop {} first, or delete \
                                 anyway with ?force=true (pods that start after that fail until the key exists again)",
                                if n == 1 { "" } else { "s" },
                                if n == 1 { "was" } else { "were" },
                                if n == 1 { "it" } else { "them" },
                            ),
                        )
                        .at("force");
                        p.pods = Some(n);
                        Err(p)
                    }
                    Err(why) => Err(Problem::unavailable(format!(
                        "cannot count the pods that use {what} ({why}); retry, or delete anyway with ?force=true"
                    ))),
                }
            };
            let store = api.naming.store_for(&domain);
            stores::delete_key(api.stores.as_ref(), &store, &key, if_match.as_deref(), in_use)
                .await
                .map_err(|e| match e {
                    DeleteError::Key(e) => store_problem(e, &what),
                    DeleteError::Refused(p) => p,
                })
        }
        .await;
        match result {
            Ok(version) => {
                audit::ok(&id, &caller.actor(), "secret.delete", &target, "deleted");
                let mut response = StatusCode::NO_CONTENT.into_response();
                if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
                    response.headers_mut().insert(header::ETAG, etag);
                }
                Ok(response)
            }
            Err(p) => {
                audit::failed(&id, &caller.actor(), "secret.delete", &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

pub(super) async fn list_global_secrets(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        // Global secrets need no grant to be used, so any authenticated caller may list them.
        api.caller(&id, &headers, "global.list", "global").await?;
        let global = &api.naming.global_id;
        let state = api
            .stores
            .read(&api.naming.global_store)
            .await
            .map_err(|e| store_problem(e.into(), "the global store"))?;
        let items: Vec<SecretObject> = state
            .as_ref()
            .map(|s| {
                s.keys
                    .iter()
                    .map(|k| item(SourceType::Kubernetes, global, k))
                    .collect()
            })
            .unwrap_or_default();
        Ok(json(
            StatusCode::OK,
            &items,
            state.as_ref().map(|s| s.version.as_str()),
        ))
    };
    finish(&id, answer.await)
}

/// The selector: domain keys (with Use on the domain), global keys, and the keys of every Vault
/// config the caller may Use. Sources that could not be listed are named in a header.
pub(super) async fn secret_keys(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let caller = api
            .caller(&id, &headers, "secret-keys.list", "selector")
            .await?;
        let Some(domain) = query_param(&query, "domain") else {
            return Err(Problem::bad_request(
                "domain",
                "query parameter domain is required: GET /api/v1/secret-keys?domain=<domain>",
            ));
        };
        if !is_dns_label(&domain) {
            return Err(Problem::bad_request(
                "domain",
                "query parameter domain is not a domain name: use 1 to 63 lowercase letters, digits and '-'",
            ));
        }
        let mut items = Vec::new();
        let mut unavailable = Vec::new();
        let global = api.naming.global_id.clone();
        if domain != global
            && api
                .allowed(&caller, Permission::Use, &Resource::Domain(domain.clone()))
                .await
                .is_ok()
        {
            match api.stores.read(&api.naming.store_for(&domain)).await {
                Ok(state) => items.extend(
                    state
                        .into_iter()
                        .flat_map(|s| s.keys)
                        .map(|k| item(SourceType::Kubernetes, &domain, &k)),
                ),
                Err(_) => unavailable.push(format!("kubernetes:{domain}")),
            }
        }
        match api.stores.read(&api.naming.global_store).await {
            Ok(state) => items.extend(
                state
                    .into_iter()
                    .flat_map(|s| s.keys)
                    .map(|k| item(SourceType::Kubernetes, &global, &k)),
            ),
            Err(_) => unavailable.push(format!("kubernetes:{global}")),
        }
        if let Some(vault) = &api.vault {
            let mut usable = Vec::new();
            for name in vault.config_names() {
                let Some(bundle) = crate::backends::VaultSource::bundle_of(vault.as_ref(), &name)
                else {
                    continue;
                };
                let resource = Resource::VaultConfig {
                    name: name.clone(),
                    bundle: Some(bundle),
                };
                if api
                    .allowed(&caller, Permission::Use, &resource)
                    .await
                    .is_ok()
                {
                    usable.push(name);
                }
            }
            let listed = futures::future::join_all(usable.iter().map(|name| async move {
                let keys = tokio::time::timeout(LIST_BUDGET, vault.list_keys(name)).await;
                (name, keys)
            }))
            .await;
            for (name, keys) in listed {
                match keys {
                    Ok(Ok(keys)) => items.extend(
                        keys.iter()
                            .filter(|k| !k.ends_with('/'))
                            .map(|k| item(SourceType::Vault, name, k)),
                    ),
                    Ok(Err(e)) => {
                        tracing::warn!(config = %name, error = %e, "cannot list the keys of a Vault config");
                        unavailable.push(format!("vault:{name}"));
                    }
                    Err(_) => {
                        tracing::warn!(config = %name, "listing the keys of a Vault config timed out");
                        unavailable.push(format!("vault:{name}"));
                    }
                }
            }
        }
        let mut response = json(StatusCode::OK, &items, None);
        if !unavailable.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&unavailable.join(", ")) {
                response.headers_mut().insert("unavailable-sources", v);
            }
        }
        Ok(response)
    };
    finish(&id, answer.await)
}

// ---- Vault configs -----------------------------------------------------------------------------

/// A Vault config as the API answers it: never a credential.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigView {
    pub(super) name: String,
    #[serde(flatten)]
    pub(super) spec: ConfigSpec,
    pub(super) status: Option<super::vault_configs::ReadyView>,
}

fn view(c: &StoredConfig) -> ConfigView {
    ConfigView {
        name: c.name.clone(),
        spec: c.spec.clone(),
        status: c.ready.clone(),
    }
}

fn config_problem(e: WriteError, name: &str) -> Problem {
    match e {
        WriteError::Conflict => stale(&format!("Vault config {name:?}")),
        WriteError::Exists => Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "exists",
            format!("Vault config {name:?} exists already (created meanwhile); GET it and send If-Match to change it"),
        )
        .at("If-None-Match"),
        WriteError::Rejected(why) => Problem::invalid("body", why),
        WriteError::Unavailable(why) => Problem::unavailable(format!(
            "the Kubernetes API could not be reached ({why}); nothing was changed, retry"
        )),
    }
}

impl Api {
    fn is_admin(&self, caller: &super::auth::Caller) -> bool {
        use crate::authz::ras::SubjectKind;
        self.admins.iter().any(|s| match s.kind {
            SubjectKind::User => s.name == caller.identity.username,
            SubjectKind::Group => caller.identity.groups.contains(&s.name),
        })
    }

    /// The config if the caller may see it (admins see all); `None` alike when it does not exist.
    async fn visible(
        &self,
        caller: &super::auth::Caller,
        name: &str,
    ) -> Result<Option<StoredConfig>, Problem> {
        let found = self
            .vault_configs
            .get(name)
            .await
            .map_err(|e| config_problem(e, name))?;
        let Some(config) = found else { return Ok(None) };
        if self.is_admin(caller)
            || self
                .allowed(caller, Permission::View, &config_resource(&config))
                .await
                .is_ok()
        {
            Ok(Some(config))
        } else {
            Ok(None)
        }
    }
}

fn config_resource(c: &StoredConfig) -> Resource {
    Resource::VaultConfig {
        name: c.name.clone(),
        bundle: Some(c.spec.resource_bundle.clone()),
    }
}

fn not_visible(caller: &super::auth::Caller, name: &str) -> Problem {
    Problem::not_found(format!(
        "no Vault config named {name:?} is visible to {}; check the name, or ask a platform admin for View on it",
        caller.identity
    ))
    .at("name")
}

pub(super) async fn list_vault_configs(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let caller = api
            .caller(&id, &headers, "vaultconfig.list", "vault configs")
            .await?;
        let all = api
            .vault_configs
            .list()
            .await
            .map_err(|e| config_problem(e, "*"))?;
        let admin = api.is_admin(&caller);
        let mut shown = Vec::new();
        for c in &all {
            if admin
                || api
                    .allowed(&caller, Permission::View, &config_resource(c))
                    .await
                    .is_ok()
            {
                shown.push(view(c));
            }
        }
        Ok(json(StatusCode::OK, &shown, None))
    };
    finish(&id, answer.await)
}

pub(super) async fn get_vault_config(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("vault config {name}");
        let caller = api
            .caller(&id, &headers, "vaultconfig.get", &target)
            .await?;
        check_config_name(&name)?;
        match api.visible(&caller, &name).await? {
            Some(c) => Ok(json(StatusCode::OK, &view(&c), Some(&c.version))),
            None => {
                let p = not_visible(&caller, &name);
                audit::failed(&id, &caller.actor(), "vaultconfig.get", &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

/// A config from a request body, and its credential when one was sent.
struct ConfigInput {
    name: Option<String>,
    spec: ConfigSpec,
    credential: Option<SecretValue>,
}

fn parse_config(map: &Map<String, Value>, with_name: bool) -> Result<ConfigInput, Problem> {
    let mut fields = vec![
        "resourceBundle",
        "host",
        "path",
        "namespace",
        "caCert",
        "auth",
        "name",
        "status",
    ];
    if !with_name {
        fields.retain(|f| *f != "name" && *f != "status");
        fields.extend(["name", "status"]);
    }
    no_other_fields(map, &fields, "")?;
    let name = opt_string(map, "name", "name")?;
    let bundle = req_string(map, "resourceBundle", "resourceBundle")?;
    if bundle.len() > 253
        || !bundle
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(Problem::invalid(
            "resourceBundle",
            "resourceBundle must name a resource bundle: lowercase letters, digits, '-' and '.', at most 253 characters",
        ));
    }
    let host = req_string(map, "host", "host")?.trim().to_string();
    check_host(&host)?;
    let path = req_string(map, "path", "path")?.trim().to_string();
    check_kv2_path(&path)?;
    let namespace = opt_string(map, "namespace", "namespace")?
        .map(|n| n.trim().trim_matches('/').to_string())
        .filter(|n| !n.is_empty());
    if namespace
        .as_deref()
        .is_some_and(|n| !header_safe(n) || n.len() > 255)
    {
        return Err(Problem::invalid(
            "namespace",
            "namespace must be a Vault Enterprise namespace path of visible ASCII characters, at most 255",
        ));
    }
    let ca_cert = opt_string(map, "caCert", "caCert")?.filter(|c| !c.trim().is_empty());
    if let Some(pem) = &ca_cert {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
        if pem.len() > 64 * 1024 || !matches!(parsed, Ok(ref certs) if !certs.is_empty()) {
            return Err(Problem::invalid(
                "caCert",
                "caCert must be PEM certificates (-----BEGIN CERTIFICATE----- ...), at most 64 KiB",
            ));
        }
    }
    let auth = match map.get("auth") {
        Some(Value::Object(a)) => a,
        Some(other) => {
            return Err(Problem::bad_request(
                "auth",
                format!("auth must be an object, not {}", shape(other)),
            ));
        }
        None => {
            return Err(Problem::invalid(
                "auth",
                "auth is required: {\"method\": \"appRole\", \"roleId\": ..., \"secretId\": ...} or {\"method\": \"token\", \"token\": ...}",
            ));
        }
    };
    no_other_fields(
        auth,
        &["method", "roleId", "mount", "secretId", "token"],
        "auth.",
    )?;
    let credential = |field: &str| -> Result<Option<SecretValue>, Problem> {
        let path = format!("auth.{field}");
        match opt_string(auth, field, &path)? {
            None => Ok(None),
            Some(s) if header_safe(s.trim()) && s.trim().len() <= 4096 => {
                Ok(Some(SecretValue::new(s.trim().as_bytes().to_vec())))
            }
            Some(_) => Err(Problem::invalid(
                &path,
                format!("{path} must be 1 to 4096 visible ASCII characters (no spaces)"),
            )),
        }
    };
    let (spec_auth, credential) = match opt_string(auth, "method", "auth.method")?.as_deref() {
        Some("appRole") => {
            if auth.get("token").is_some_and(|t| !t.is_null()) {
                return Err(Problem::invalid(
                    "auth.token",
                    "auth.token belongs to method token; AppRole logs in with roleId and secretId",
                ));
            }
            let role_id = req_string(auth, "roleId", "auth.roleId")?
                .trim()
                .to_string();
            if !header_safe(&role_id) || role_id.len() > 512 {
                return Err(Problem::invalid(
                    "auth.roleId",
                    "auth.roleId must be visible ASCII characters (no spaces), at most 512",
                ));
            }
            let mount = opt_string(auth, "mount", "auth.mount")?
                .map(|m| m.trim().trim_matches('/').to_string())
                .filter(|m| !m.is_empty());
            if let Some(m) = &mount {
                check_segments(m).map_err(|_| {
                    Problem::invalid(
                        "auth.mount",
                        "auth.mount must be the AppRole mount path, e.g. approle",
                    )
                })?;
            }
            (
                AuthSpec {
                    method: AuthMethod::AppRole,
                    role_id: Some(role_id),
                    mount,
                },
                credential("secretId")?,
            )
        }
        Some("token") => {
            for f in ["roleId", "mount", "secretId"] {
                if auth.get(f).is_some_and(|v| !v.is_null()) {
                    return Err(Problem::invalid(
                        &format!("auth.{f}"),
                        format!(
                            "auth.{f} belongs to method appRole; method token needs only auth.token"
                        ),
                    ));
                }
            }
            (
                AuthSpec {
                    method: AuthMethod::Token,
                    role_id: None,
                    mount: None,
                },
                credential("token")?,
            )
        }
        Some(_) => {
            return Err(Problem::invalid(
                "auth.method",
                "auth.method must be appRole (recommended) or token",
            ));
        }
        None => {
            return Err(Problem::invalid(
                "auth.method",
                "auth.method is required: appRole (recommended) or token",
            ));
        }
    };
    Ok(ConfigInput {
        name,
        spec: ConfigSpec {
            resource_bundle: bundle,
            host,
            path,
            namespace,
            ca_cert,
            auth: spec_auth,
        },
        credential,
    })
}

fn check_host(host: &str) -> Result<(), Problem> {
    let bad = || {
        Problem::invalid(
            "host",
            "host must be the Vault base URL: http:// or https://, a host name and an optional port, no path (e.g. https://vault.example.com:8200)",
        )
    };
    let url = vault_http::Url::parse(host).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
        || host.len() > 2048
    {
        return Err(bad());
    }
    Ok(())
}

/// A KV v2 data path: `/v1/<mount>/data/<secret>` (the `/v1/` is optional).
fn check_kv2_path(path: &str) -> Result<(), Problem> {
    let trimmed = path.trim_matches('/');
    let trimmed = trimmed.strip_prefix("v1/").unwrap_or(trimmed);
    if path.len() > 1024
        || trimmed.is_empty()
        || trimmed == "v1"
        || check_segments(trimmed).is_err()
    {
        return Err(Problem::invalid(
            "path",
            "path must be a KV v2 path like /v1/secret/data/production: segments of visible characters, no empty, . or .. segments",
        ));
    }
    let segments: Vec<&str> = trimmed.split('/').collect();
    let data_at = segments.iter().skip(1).position(|s| *s == "data");
    let metadata_at = segments.iter().skip(1).position(|s| *s == "metadata");
    match (data_at, metadata_at) {
        (Some(d), Some(m)) if m < d => Err(metadata_path()),
        (Some(_), _) => Ok(()),
        (None, Some(_)) => Err(metadata_path()),
        (None, None) => Err(Problem::invalid(
            "path",
            "path has no /data/ segment: KV v2 paths are /v1/<mount>/data/<secret>, e.g. \
             /v1/secret/data/production (KV version 1 mounts are not supported)",
        )),
    }
}

fn metadata_path() -> Problem {
    Problem::invalid(
        "path",
        "path names the KV v2 metadata API; write the data path instead: /v1/<mount>/data/<secret>",
    )
}

/// The credential a change must carry.
fn credential_field(spec: &ConfigSpec) -> &'static str {
    match spec.auth.method {
        AuthMethod::AppRole => "auth.secretId",
        AuthMethod::Token => "auth.token",
    }
}

pub(super) async fn put_vault_config(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(body).await;
    let answer = async {
        let target = format!("vault config {name}");
        let action = "vaultconfig.put";
        let caller = api.caller(&id, &headers, action, &target).await?;
        check_config_name(&name)?;
        let result = async {
            let existing = api.visible(&caller, &name).await?;
            let admin = api.is_admin(&caller);
            let Some(current) = existing else {
                if !admin {
                    return Err(Problem::forbidden(format!(
                        "{} may not create or change Vault config {name:?}: creating Vault configs is for \
                         platform admins, changing one needs Update on it",
                        caller.identity
                    )));
                }
                let input = parse_config(&read_object(&headers, body)?, true)?;
                check_body_name(&input, &name)?;
                match precondition(&headers)? {
                    Precondition::Create => {}
                    Precondition::Match(_) => {
                        return Err(Problem::new(StatusCode::PRECONDITION_FAILED, "not-found",
                            format!("Vault config {name:?} does not exist; send If-None-Match: * to create it")).at("If-Match"));
                    }
                    Precondition::None => return Err(precondition_required("creating a Vault config")),
                }
                let Some(credential) = input.credential else {
                    let field = credential_field(&input.spec);
                    return Err(Problem::invalid(field, format!("{field} is required to create a Vault config")));
                };
                vault_configs::target(&name, &input.spec, Credential::Memory(credential.clone()))
                    .map_err(|e| Problem::invalid("body", e.to_string()))?;
                let created = api
                    .vault_configs
                    .create(&name, &input.spec, &credential)
                    .await
                    .map_err(|e| config_problem(e, &name))?;
                let mut response = json(StatusCode::CREATED, &view(&created), Some(&created.version));
                if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/vault-configs/{name}")) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                return Ok((response, "created"));
            };
            if !admin {
                api.allowed(&caller, Permission::Update, &config_resource(&current))
                    .await
                    .map_err(Problem::forbidden)?;
            }
            let input = parse_config(&read_object(&headers, body)?, true)?;
            check_body_name(&input, &name)?;
            let tags = match precondition(&headers)? {
                Precondition::Create => {
                    return Err(Problem::new(
                        StatusCode::PRECONDITION_FAILED,
                        "exists",
                        format!("Vault config {name:?} exists already; to change it send If-Match: <ETag> from a GET"),
                    )
                    .at("If-None-Match"));
                }
                Precondition::Match(tags) => tags,
                Precondition::None => return Err(precondition_required("changing a Vault config")),
            };
            if !tags.contains(&current.version) {
                return Err(stale(&format!("Vault config {name:?}")));
            }
            if input.spec.resource_bundle != current.spec.resource_bundle && !admin {
                return Err(Problem::forbidden(
                    "moving a Vault config to another resource bundle changes who may use it; only a \
                     platform admin may change resourceBundle",
                )
                .at("resourceBundle"));
            }
            if input.credential.is_none() && input.spec.needs_new_credential(&current.spec) {
                let field = credential_field(&input.spec);
                return Err(Problem::invalid(
                    field,
                    format!(
                        "host, CA certificate, namespace or login changed: send {field} again (a stored \
                         credential never follows a config to another server or login)"
                    ),
                ));
            }
            let check = input
                .credential
                .clone()
                .map_or_else(|| current.credential.clone(), Credential::Memory);
            vault_configs::target(&name, &input.spec, check).map_err(|e| Problem::invalid("body", e.to_string()))?;
            let updated = api
                .vault_configs
                .update(&current, &input.spec, input.credential.as_ref())
                .await
                .map_err(|e| config_problem(e, &name))?;
            Ok((json(StatusCode::OK, &view(&updated), Some(&updated.version)), "updated"))
        }
        .await;
        match result {
            Ok((response, done)) => {
                audit::ok(&id, &caller.actor(), action, &target, done);
                Ok(response)
            }
            Err(p) => {
                audit::failed(&id, &caller.actor(), action, &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

fn check_body_name(input: &ConfigInput, name: &str) -> Result<(), Problem> {
    match &input.name {
        Some(n) if n != name => Err(Problem::invalid(
            "name",
            "name in the body differs from the name in the path; leave it out or make them equal",
        )),
        _ => Ok(()),
    }
}

pub(super) async fn delete_vault_config(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("vault config {name}");
        let action = "vaultconfig.delete";
        let caller = api.caller(&id, &headers, action, &target).await?;
        check_config_name(&name)?;
        let result = async {
            if !api.is_admin(&caller) {
                return Err(Problem::forbidden(format!(
                    "{} may not delete Vault config {name:?}: deleting Vault configs is for platform admins",
                    caller.identity
                )));
            }
            let current = api
                .vault_configs
                .get(&name)
                .await
                .map_err(|e| config_problem(e, &name))?
                .ok_or_else(|| Problem::not_found(format!("there is no Vault config named {name:?}")).at("name"))?;
            match precondition(&headers)? {
                Precondition::Match(tags) if !tags.contains(&current.version) => {
                    return Err(stale(&format!("Vault config {name:?}")));
                }
                Precondition::Create => {
                    return Err(Problem::bad_request("If-None-Match", "If-None-Match: * makes no sense on DELETE; send If-Match or nothing"));
                }
                _ => {}
            }
            api.vault_configs
                .delete(&current)
                .await
                .map_err(|e| config_problem(e, &name))
        }
        .await;
        match result {
            Ok(()) => {
                audit::ok(&id, &caller.actor(), action, &target, "deleted");
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            Err(p) => {
                audit::failed(&id, &caller.actor(), action, &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

/// Test Connection's answer: the `vault check` steps.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TestReport {
    pub(super) name: String,
    pub(super) ok: bool,
    pub(super) steps: Vec<TestStep>,
    pub(super) verdict: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TestStep {
    pub(super) step: String,
    pub(super) ok: bool,
    pub(super) detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<&'static str>,
}

fn report(r: &CheckReport) -> TestReport {
    let steps = r
        .steps
        .iter()
        .map(|s| match &s.outcome {
            Ok(detail) => TestStep {
                step: s.label.clone(),
                ok: true,
                detail: detail.clone(),
                reason: None,
            },
            Err(e) => TestStep {
                step: s.label.clone(),
                ok: false,
                detail: e.to_string(),
                reason: Some(e.reason()),
            },
        })
        .collect();
    TestReport {
        name: r.config.clone(),
        ok: r.error().is_none(),
        steps,
        verdict: r.lines().last().cloned().unwrap_or_default(),
    }
}

async fn run_test(api: &Api, name: &str, spec: &ConfigSpec, credential: Credential) -> TestReport {
    let checked = match vault_configs::target(name, spec, credential) {
        Ok(t) => check_target(t, api.vault_configs.kube(), api.vault_options.clone()).await,
        Err(e) => CheckReport {
            config: name.to_string(),
            steps: vec![crate::backends::vault::CheckStep {
                label: "config".into(),
                outcome: Err(e),
            }],
        },
    };
    report(&checked)
}

pub(super) async fn test_saved_vault_config(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let target = format!("vault config {name}");
        let action = "vaultconfig.test";
        let caller = api.caller(&id, &headers, action, &target).await?;
        check_config_name(&name)?;
        let Some(config) = api.visible(&caller, &name).await? else {
            let p = not_visible(&caller, &name);
            audit::failed(&id, &caller.actor(), action, &target, &p);
            return Err(p);
        };
        let tested = run_test(&api, &name, &config.spec, config.credential.clone()).await;
        audit::ok(
            &id,
            &caller.actor(),
            action,
            &target,
            if tested.ok { "connected" } else { "failed" },
        );
        Ok(json(StatusCode::OK, &tested, None))
    };
    finish(&id, answer.await)
}

pub(super) async fn test_unsaved_vault_config(
    State(api): State<Arc<Api>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(body).await;
    let answer = async {
        let action = "vaultconfig.test";
        let caller = api
            .caller(&id, &headers, action, "unsaved vault config")
            .await?;
        let input = parse_config(&read_object(&headers, body)?, true)?;
        let name = input.name.clone().unwrap_or_else(|| "unsaved".to_string());
        if input.name.is_some() {
            check_config_name(&name)?;
        }
        let target = format!("vault config {name} (not saved)");
        let result = async {
            let admin = api.is_admin(&caller);
            // A saved config's credential may be reused by whoever may change that config, as
            // long as it would go to the same server and login.
            let stored = match &input.name {
                Some(n) => match api.visible(&caller, n).await? {
                    Some(c) if admin || api.allowed(&caller, Permission::Update, &config_resource(&c)).await.is_ok() => Some(c),
                    _ => None,
                },
                None => None,
            };
            if !admin && stored.is_none() {
                return Err(Problem::forbidden(format!(
                    "{} may not test this Vault config: testing a config that is not saved is for \
                     platform admins, or for users with Update on the config named in name",
                    caller.identity
                )));
            }
            let credential = match (&input.credential, &stored) {
                (Some(c), _) => Credential::Memory(c.clone()),
                (None, Some(c)) if !input.spec.needs_new_credential(&c.spec) => c.credential.clone(),
                (None, _) => {
                    let field = credential_field(&input.spec);
                    return Err(Problem::invalid(
                        field,
                        format!("{field} is required to test a config that is not saved (or that changed its server or login)"),
                    ));
                }
            };
            Ok(run_test(&api, &name, &input.spec, credential).await)
        }
        .await;
        match result {
            Ok(tested) => {
                audit::ok(
                    &id,
                    &caller.actor(),
                    action,
                    &target,
                    if tested.ok { "connected" } else { "failed" },
                );
                Ok(json(StatusCode::OK, &tested, None))
            }
            Err(p) => {
                audit::failed(&id, &caller.actor(), action, &target, &p);
                Err(p)
            }
        }
    };
    finish(&id, answer.await)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn kv2_paths_need_their_data_segment() {
        for ok in [
            "/v1/secret/data/production",
            "secret/data/x",
            "/v1/team/kv/data/a/b",
            "/v1/data/data/x",
            "/v1/secret/data",
        ] {
            assert!(check_kv2_path(ok).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("/v1/secret/production", "no /data/ segment"),
            ("/v1/kv1/x", "no /data/ segment"),
            ("/v1/secret/metadata/x", "metadata API"),
            ("/v1/", "KV v2 path like"),
            ("/v1/secret/../sys", "KV v2 path like"),
        ] {
            let p = check_kv2_path(bad).unwrap_err();
            assert!(p.detail.contains(says), "{bad}: {}", p.detail);
            assert_eq!(p.field.as_deref(), Some("path"));
        }
    }

    #[test]
    fn preconditions() {
        let mut h = HeaderMap::new();
        assert!(matches!(precondition(&h), Ok(Precondition::None)));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(matches!(precondition(&h), Ok(Precondition::Create)));
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"1\""));
        assert!(precondition(&h).is_err());
        h.remove(header::IF_NONE_MATCH);
        assert!(matches!(precondition(&h), Ok(Precondition::Match(t)) if t == ["1"]));
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert!(precondition(&h).is_err());
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"1\", \"2\""));
        assert!(matches!(precondition(&h), Ok(Precondition::Match(t)) if t == ["2"]));
        // Weak only: well-formed, matches nothing (412 later, not 400).
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"1\""));
        assert!(matches!(precondition(&h), Ok(Precondition::Match(t)) if t.is_empty()));
        h.insert(header::IF_MATCH, HeaderValue::from_static("123"));
        assert!(precondition(&h).is_err());
    }

    #[test]
    fn config_bodies_are_checked_without_quoting_them() {
        let pasted = "hvs.CANARYTOKEN1234567890";
        let body = serde_json::json!({"resourceBundle": "b", "host": pasted, "path": "/v1/secret/data/x",
            "auth": {"method": "token", "token": "t"}});
        let Value::Object(map) = body else {
            unreachable!()
        };
        let p = parse_config(&map, true).err().unwrap();
        assert_eq!(p.field.as_deref(), Some("host"));
        assert!(!p.detail.contains("CANARY"), "{}", p.detail);
        let body = serde_json::json!({"resourceBundle": "b", "host": "https://v:8200", "path": "/v1/secret/data/x",
            "auth": {"method": "appRole", "roleId": "r", "token": pasted}});
        let Value::Object(map) = body else {
            unreachable!()
        };
        let p = parse_config(&map, true).err().unwrap();
        assert_eq!(p.field.as_deref(), Some("auth.token"));
        assert!(!p.detail.contains("CANARY"));
        let body = serde_json::json!({"resourceBundle": "b", "host": "https://v:8200", "path": "/v1/secret/data/x",
            "auth": {"method": "appRole", "roleId": "r", "secretId": " s "}});
        let Value::Object(map) = body else {
            unreachable!()
        };
        let input = parse_config(&map, true).unwrap();
        assert_eq!(
            input.credential.map(|c| c.expose().to_vec()),
            Some(b"s".to_vec())
        );
        assert_eq!(input.spec.auth.method, AuthMethod::AppRole);
    }

    #[test]
    fn unknown_fields_are_named_and_clipped() {
        let body = serde_json::json!({"value": "x", "valu": "y"});
        let Value::Object(map) = body else {
            unreachable!()
        };
        let p = no_other_fields(&map, &["value"], "").unwrap_err();
        assert_eq!(p.field.as_deref(), Some("valu"));
        let long = "k".repeat(500);
        let body = serde_json::json!({ long.clone(): 1 });
        let Value::Object(map) = body else {
            unreachable!()
        };
        let p = no_other_fields(&map, &["value"], "").unwrap_err();
        assert!(p.detail.len() < 300);
    }

    #[test]
    fn set_of_view_fields_excludes_credentials() {
        let spec = ConfigSpec {
            resource_bundle: "b".into(),
            host: "https://v".into(),
            path: "/v1/secret/data/x".into(),
            namespace: None,
            ca_cert: None,
            auth: AuthSpec {
                method: AuthMethod::AppRole,
                role_id: Some("r".into()),
                mount: None,
            },
        };
        let shown = serde_json::to_value(ConfigView {
            name: "n".into(),
            spec,
            status: None,
        })
        .unwrap();
        let keys: BTreeSet<&str> = shown
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "name",
                "resourceBundle",
                "host",
                "path",
                "namespace",
                "caCert",
                "auth",
                "status"
            ])
        );
        assert!(shown["auth"].get("secretId").is_none());
    }
}
