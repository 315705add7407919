//! The management API and console (`--api-listen`, on by default in `serve --dev` at
//! https://localhost:8444): domain secrets with write-only values, the key selector across
//! Kubernetes and Vault filtered by Use, and Vault integrations with Test Connection.
//!
//! It shares the engine's parts rather than copying them: the authorizer (View / Update / Use),
//! the Vault backend (key listing, the configs in force) and, in `--dev`, the store index (the
//! in-memory [`stores::MemoryStores`] serves both). See `docs/api.md`.
//!
//! - [`auth`]: bearer tokens (TokenReview; static tokens in `--dev`), console backends.
//! - [`stores`], [`vault_configs`]: where writes go (the Kubernetes API, or memory in `--dev`).
//! - [`usage`]: live pods granted a key ("in use").
//! - `handlers`: the endpoints; [`openapi`]: their description; `console`: the web console.

pub mod auth;
mod console;
mod handlers;
pub mod openapi;
pub mod problem;
pub mod stores;
pub mod usage;
pub mod vault_configs;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};

use auth::Authenticator;
pub use auth::{ApiToken, ConsoleBackend};
use problem::Problem;
use stores::{KubeStores, MemoryStores, StoreBackend};
use usage::Usage;
use vault_configs::{KubeVaultConfigs, MemoryVaultConfigs, VaultConfigStore};

use crate::admission::{BuildError, Webhook};
use crate::authz::Authorizer;
use crate::authz::ras::Subject;
use crate::backends::vault::{VaultBackend, VaultOptions};
use crate::config::{LocalConfig, Naming, Settings};
use crate::metrics::Metrics;

/// Everything the endpoints share.
pub struct Api {
    pub naming: Naming,
    pub authn: Authenticator,
    pub authz: Arc<dyn Authorizer>,
    /// Who may create and delete Vault configs (and holds View and Update on all of them).
    pub admins: Vec<Subject>,
    pub stores: Arc<dyn StoreBackend>,
    pub vault_configs: Arc<dyn VaultConfigStore>,
    /// The engine's Vault backend: the configs in force, for the selector's key listing.
    pub vault: Option<Arc<VaultBackend>>,
    pub usage: Arc<dyn Usage>,
    /// Timeouts of Test Connection.
    pub vault_options: VaultOptions,
}

/// The id of one request: in the `X-Request-Id` header, problem bodies and audit lines.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// `n` random bytes as hex.
pub(crate) fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    // The system RNG does not fail on Linux; a zero id would still be unique enough per process
    // for log correlation, and credential Secret names are also checked by create (409).
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One JSON line per change or denial (`target` secrets_webhook::audit): actor, action, target,
/// outcome, request id. Never a value: targets are names, outcomes are fixed words or problem types.
pub mod audit {
    use super::RequestId;
    use super::problem::Problem;

    pub fn ok(id: &RequestId, actor: &str, action: &str, target: &str, outcome: &str) {
        tracing::info!(target: "secrets_webhook::audit", audit = true, actor, action, resource = target,
            outcome, request_id = %id.0, "audit");
    }

    pub fn failed(id: &RequestId, actor: &str, action: &str, target: &str, problem: &Problem) {
        let outcome = format!("{} {}", problem.status, problem.slug());
        tracing::info!(target: "secrets_webhook::audit", audit = true, actor, action, resource = target,
            outcome = %outcome, request_id = %id.0, "audit");
    }
}

/// The API's routes: the one table both the router and the OpenAPI test read.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<Arc<Api>>)> {
    use handlers::*;
    vec![
        (
            Method::GET,
            "/api/v1/domains/{domain}/secrets",
            on(MethodFilter::GET, list_domain_secrets),
        ),
        (
            Method::GET,
            "/api/v1/domains/{domain}/secrets/{key}",
            on(MethodFilter::GET, get_domain_secret),
        ),
        (
            Method::PUT,
            "/api/v1/domains/{domain}/secrets/{key}",
            on(MethodFilter::PUT, put_domain_secret),
        ),
        (
            Method::DELETE,
            "/api/v1/domains/{domain}/secrets/{key}",
            on(MethodFilter::DELETE, delete_domain_secret),
        ),
        (
            Method::GET,
            "/api/v1/global/secrets",
            on(MethodFilter::GET, list_global_secrets),
        ),
        (
            Method::GET,
            "/api/v1/secret-keys",
            on(MethodFilter::GET, secret_keys),
        ),
        (
            Method::GET,
            "/api/v1/vault-configs",
            on(MethodFilter::GET, list_vault_configs),
        ),
        (
            Method::GET,
            "/api/v1/vault-configs/{name}",
            on(MethodFilter::GET, get_vault_config),
        ),
        (
            Method::PUT,
            "/api/v1/vault-configs/{name}",
            on(MethodFilter::PUT, put_vault_config),
        ),
        (
            Method::DELETE,
            "/api/v1/vault-configs/{name}",
            on(MethodFilter::DELETE, delete_vault_config),
        ),
        (
            Method::POST,
            "/api/v1/vault-configs/{name}/test",
            on(MethodFilter::POST, test_saved_vault_config),
        ),
        (
            Method::POST,
            "/api/v1/vault-configs:test",
            on(MethodFilter::POST, test_unsaved_vault_config),
        ),
        (
            Method::GET,
            "/api/v1/openapi.json",
            on(MethodFilter::GET, openapi::serve),
        ),
    ]
}

impl Api {
    /// The HTTP router: the API, the OpenAPI document and the console.
    pub fn router(self: Arc<Self>) -> Router {
        let mut by_path: Vec<(&'static str, MethodRouter<Arc<Api>>)> = Vec::new();
        for (_, path, handler) in routes() {
            match by_path.iter_mut().find(|(p, _)| *p == path) {
                Some((_, existing)) => {
                    let merged = std::mem::take(existing).merge(handler);
                    *existing = merged;
                }
                None => by_path.push((path, handler)),
            }
        }
        let mut router = Router::new();
        for (path, handler) in by_path {
            router = router.route(path, handler);
        }
        router
            .merge(console::router())
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .layer(axum::middleware::from_fn(common_headers))
            .with_state(self)
    }
}

/// Test Connection runs against the live server: nothing is cached between two tests.
fn test_options() -> VaultOptions {
    VaultOptions {
        cache_ttl: std::time::Duration::ZERO,
        ..VaultOptions::default()
    }
}

/// The request id the middleware gave `request`.
fn id_of(request: &Request) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}

async fn no_route(request: Request) -> Response {
    let mut p = Problem::new(
        axum::http::StatusCode::NOT_FOUND,
        "no-route",
        "no such endpoint; the API is described at /api/v1/openapi.json, the console is at /console/",
    );
    p.request_id = id_of(&request);
    p.into_response()
}

async fn wrong_method(request: Request) -> Response {
    let mut p = Problem::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{} is not supported here; see /api/v1/openapi.json for the methods of each path",
            request.method()
        ),
    );
    p.request_id = id_of(&request);
    p.into_response()
}

/// Request id in, and on every answer: `X-Request-Id`, `Cache-Control: no-store` (answers may name
/// secrets, and requests carry values), `nosniff`, and a strict CSP for the console.
async fn common_headers(mut request: Request, next: Next) -> Response {
    let id = RequestId(random_hex(12));
    request.extensions_mut().insert(id.clone());
    let console = request.uri().path().starts_with("/console");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        headers.insert("x-request-id", v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if console {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

/// Static tokens belong to `--dev`: a config file with `apiTokens` in a cluster is refused.
pub fn refuse_static_tokens(config: &LocalConfig) -> Result<(), BuildError> {
    if config.api_tokens.is_empty() {
        return Ok(());
    }
    Err(BuildError::Config(
        "the config file lists apiTokens: static API tokens are for serve --dev only and are \
         refused in a cluster; remove apiTokens (the API authenticates ServiceAccount and OIDC \
         tokens with TokenReview there)"
            .into(),
    ))
}

/// `--dev`: the engine and the API over one in-memory store, one Vault backend and one
/// authorizer, all from the config file.
pub fn dev(
    settings: Settings,
    config: &LocalConfig,
    metrics: Arc<Metrics>,
) -> Result<(Webhook, Arc<Api>), BuildError> {
    let mut settings = settings;
    if let Some(ns) = &config.namespace {
        settings.naming.namespace = ns.clone();
    }
    let naming = settings.naming.clone();
    let vault = match crate::config::local_vault(&settings, config, Arc::clone(&metrics))? {
        Some(v) => v,
        None => VaultBackend::from_local(
            &[],
            naming.clone(),
            VaultOptions {
                metrics: Some(Arc::clone(&metrics)),
                ..VaultOptions::default()
            },
        )
        .map_err(|e| BuildError::Config(e.to_string()))?,
    };
    let mut webhook =
        Webhook::from_local_parts(settings, config, metrics, Some(Arc::clone(&vault)))?;
    let stores = Arc::new(MemoryStores::new(config, &naming));
    webhook.stores = stores.clone();
    let authn = Authenticator::dev(&config.api_tokens, config.console_backends.clone())
        .map_err(|e| BuildError::Config(e.to_string()))?;
    let vault_configs = MemoryVaultConfigs::new(&config.vault_configs, Arc::clone(&vault));
    let api = Api {
        naming,
        authn,
        authz: Arc::clone(&webhook.authz),
        admins: config.api_admins.clone(),
        stores,
        vault_configs: Arc::new(vault_configs),
        vault: Some(vault),
        usage: Arc::new(usage::NoPods),
        vault_options: test_options(),
    };
    Ok((webhook, Arc::new(api)))
}

/// In a cluster: the API writes the real store Secrets and VaultConfig objects; it shares the
/// engine's authorizer and Vault backend.
pub fn cluster(
    webhook: &Webhook,
    vault: Arc<VaultBackend>,
    client: kube::Client,
    config: &LocalConfig,
    audiences: Vec<String>,
) -> Result<Arc<Api>, BuildError> {
    refuse_static_tokens(config)?;
    let naming = webhook.settings.naming.clone();
    let authn = Authenticator::cluster(client.clone(), audiences, config.console_backends.clone())
        .map_err(|e| BuildError::Config(e.to_string()))?;
    Ok(Arc::new(Api {
        naming: naming.clone(),
        authn,
        authz: Arc::clone(&webhook.authz),
        admins: config.api_admins.clone(),
        stores: Arc::new(KubeStores::new(client.clone(), &naming.namespace)),
        vault_configs: Arc::new(KubeVaultConfigs::new(client.clone(), naming.clone())),
        vault: Some(vault),
        usage: Arc::new(usage::LivePods::with_grants(
            client,
            &naming.namespace,
            usage::verified_grants(Arc::clone(&webhook.keys), naming.namespace.clone()),
        )),
        vault_options: test_options(),
    }))
}
