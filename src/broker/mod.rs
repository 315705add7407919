//! The broker (`--broker-listen`, HTTPS, its own port): where a pod wired for runtime delivery
//! fetches its Vault values at start (docs/vault.md, "Delivery: runtime mode"; the threat model is
//! docs/authorization.md §15).
//!
//! A request carries the pod's projected token (audience `secrets.iomete.com`). The broker:
//!
//! 1. reviews the token (TokenReview for that audience): a service account's, bound to a pod
//!    (pod-name and pod-uid extras), living 10 minutes at most;
//! 2. GETs that pod: the uid and the service account must match the token's, and it must not be
//!    terminating;
//! 3. verifies the pod's signed stamps, runtime plan included, and takes the plan's entry for the
//!    requested container;
//! 4. for an executor, checks its driver again (it exists with the uid recorded at admission, is
//!    the driver of the same application, its stamps verify, it was granted every reference);
//! 5. checks Use again for the stamped identity, so a revoked grant stops the next start;
//! 6. reads the values (the engine's Vault cache: a burst of pods is one read per secret) and
//!    returns exactly that container's values.
//!
//! It shares the engine (authorizer, Vault backend, signing keys, driver lookups) rather than
//! copying it. TokenReviews and pod GETs are cached briefly and coalesced; failures are not
//! cached. Values are never logged, and are held only for the request (and in the Vault cache).

pub mod protocol;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use http_body_util::{BodyExt, Limited};
use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::admission::Webhook;
use crate::authz::cache::{FlightError, SingleFlight};
use crate::authz::{Decision, Identity, Resource};
use crate::identity::{
    self, EXTRA_POD_NAME, EXTRA_POD_UID, IdentityError, KubeOwnerLookup, OwnerLookup, stamps,
};
use crate::plan::runtime::{RuntimePlan, TOKEN_AUDIENCE, TOKEN_SECONDS};
use crate::refs::{SecretObject, SourceType};
use protocol::{ErrorBody, FetchRequest, FetchResponse};

/// Longest bearer token looked at.
const MAX_TOKEN: usize = 16 * 1024;
/// How long a request may take in all (the wrapper retries on 503).
const REQUEST_BUDGET: Duration = Duration::from_secs(10);
/// How long one TokenReview may take.
const REVIEW_BUDGET: Duration = Duration::from_secs(5);
/// How long a successful TokenReview is reused (never past the token's expiry).
const REVIEW_TTL: Duration = Duration::from_secs(10);
/// How long a pod GET is reused: short, so a deleted or replaced pod is noticed at once.
const POD_TTL: Duration = Duration::from_secs(2);
/// Requests worked on at once; more wait (until their deadline) for a turn.
const MAX_IN_FLIGHT: usize = 512;
/// Slack on the 10-minute token lifetime (clock rounding in the issuer).
const LIFETIME_SLACK: u64 = 5;
/// The `cache` label of the broker's pod lookups.
pub const POD_CACHE: &str = "broker-pods";
/// The `cache` label of its TokenReviews.
pub const REVIEW_CACHE: &str = "broker-token-reviews";

/// Why the broker gives a pod nothing. `Display` is the message the wrapper prints (never a
/// value); `status` says which HTTP status carries it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "the token was not accepted (expired, revoked, issued for another audience than {TOKEN_AUDIENCE}, or its \
         pod no longer exists); the pod must send the projected token secrets-webhook mounted at start"
    )]
    Unauthenticated,
    #[error(
        "the token expired {0} seconds ago; the pod must send its current projected token (the kubelet renews \
         it well before it expires)"
    )]
    Expired(u64),
    #[error("the token belongs to {0}, not to a service account; send the pod's projected token")]
    NotAServiceAccount(String),
    #[error(
        "the token is not bound to a pod (no {0} in the TokenReview); only the projected token secrets-webhook \
         mounts into the pod is accepted"
    )]
    NotBound(&'static str),
    #[error(
        "the token lives longer than {TOKEN_SECONDS} seconds; only the projected token secrets-webhook mounts \
         (audience {TOKEN_AUDIENCE}, expirationSeconds {TOKEN_SECONDS}) is accepted"
    )]
    TooLongLived,
    #[error(
        "the token is bound to another pod than the one asking (uid {asked}); send this pod's own token"
    )]
    OtherPod { asked: String },
    #[error(
        "pod {namespace}/{name} (uid {uid}) that the token is bound to no longer exists; it was deleted or replaced"
    )]
    PodGone {
        namespace: String,
        name: String,
        uid: String,
    },
    #[error("pod {namespace}/{name} is being deleted; its containers get no secrets any more")]
    Terminating { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} runs as service account {pod}, but the token is service account {token}'s"
    )]
    WrongServiceAccount {
        namespace: String,
        name: String,
        pod: String,
        token: String,
    },
    #[error("pod {namespace}/{name}: {reason}")]
    Stamps {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "pod {namespace}/{name} was not admitted with runtime secrets by secrets-webhook (no runtime plan); \
         nothing to fetch"
    )]
    NoPlan { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} has no runtime secrets for container {container}; only the containers the webhook \
         wired fetch values"
    )]
    NotInPlan {
        namespace: String,
        name: String,
        container: String,
    },
    #[error(
        "pod {namespace}/{name}: {reference} is in its runtime plan but not among its granted references"
    )]
    NotGranted {
        namespace: String,
        name: String,
        reference: String,
    },
    #[error("pod {namespace}/{name}: {reason}")]
    Driver {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Value(String),
    #[error("{0} (try again)")]
    Unavailable(String),
}

impl BrokerError {
    pub fn status(&self) -> StatusCode {
        match self {
            BrokerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            BrokerError::Unauthenticated | BrokerError::Expired(_) => StatusCode::UNAUTHORIZED,
            BrokerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// A short slug for the answer and the log (a small fixed set).
    pub fn slug(&self) -> &'static str {
        match self {
            BrokerError::BadRequest(_) => "bad-request",
            BrokerError::Unauthenticated | BrokerError::Expired(_) => "unauthenticated",
            BrokerError::NotAServiceAccount(_)
            | BrokerError::NotBound(_)
            | BrokerError::TooLongLived => "token-refused",
            BrokerError::OtherPod { .. } => "other-pod",
            BrokerError::PodGone { .. } | BrokerError::Terminating { .. } => "pod-gone",
            BrokerError::WrongServiceAccount { .. } => "token-refused",
            BrokerError::Stamps { .. } => "stamps",
            BrokerError::NoPlan { .. } | BrokerError::NotInPlan { .. } => "not-in-plan",
            BrokerError::NotGranted { .. } | BrokerError::Driver { .. } => "not-granted",
            BrokerError::Forbidden(_) => "forbidden",
            BrokerError::Value(_) => "value",
            BrokerError::Unavailable(_) => "unavailable",
        }
    }

    pub fn retry(&self) -> bool {
        matches!(self, BrokerError::Unavailable(_))
    }
}

/// Why an executor's driver check failed: for good, or because the driver could not be read.
#[derive(Debug, PartialEq)]
enum DriverCheck {
    Refused(String),
    Unavailable(String),
}

impl DriverCheck {
    /// A driver the API did not return in time (or at all) is worth another attempt; a driver
    /// that was read and does not vouch for the executor is not.
    fn of(e: IdentityError) -> Self {
        match e {
            IdentityError::OwnerLookup { .. } => DriverCheck::Unavailable(e.to_string()),
            e => DriverCheck::Refused(e.to_string()),
        }
    }
}

/// A reviewed token: whose it is, and until when it is valid.
#[derive(Debug, Clone)]
struct TokenHolder {
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
}

/// A TokenReview's answer: the holder (or why the token holds no pod) and the token's expiry;
/// `None` when the token is not accepted; `Err` when no answer came.
type Review = Result<Option<(Result<TokenHolder, BrokerError>, Option<SystemTime>)>, String>;

/// The broker: the engine's parts, a client for TokenReviews and pod GETs, and their caches.
pub struct Broker {
    webhook: Arc<Webhook>,
    client: kube::Client,
    reviews: Arc<SingleFlight<[u8; 32], Review>>,
    pods: KubeOwnerLookup,
    turns: Semaphore,
}

impl Broker {
    pub fn new(webhook: Arc<Webhook>, client: kube::Client) -> Arc<Self> {
        let metrics = Arc::clone(&webhook.metrics);
        let reviews = SingleFlight::counted(
            10_000,
            Arc::clone(&metrics),
            REVIEW_CACHE,
            |r: &Review| match r {
                Ok(Some((_, expires))) => {
                    let left = expires
                        .and_then(|e| e.duration_since(SystemTime::now()).ok())
                        .unwrap_or(Duration::ZERO);
                    Some(left.min(REVIEW_TTL)).filter(|d| !d.is_zero())
                }
                _ => None,
            },
        );
        let pods = KubeOwnerLookup::counted_as(client.clone(), POD_TTL, metrics, POD_CACHE);
        Arc::new(Self {
            webhook,
            client,
            reviews,
            pods,
            turns: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// `POST /v1/values`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(protocol::PATH, post(values))
            .with_state(self)
    }

    /// Exactly the values `request.container` of the token's pod was granted, or why not.
    pub async fn fetch(
        &self,
        token: &str,
        request: &FetchRequest,
        deadline: Instant,
    ) -> Result<FetchResponse, BrokerError> {
        if !is_container_name(&request.container) {
            return Err(BrokerError::BadRequest(
                "container must be the name of the container asking (a DNS label)".into(),
            ));
        }
        let _turn = tokio::time::timeout_at(deadline.into(), self.turns.acquire())
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is busy".into()))?
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        let holder = self.review(token, deadline).await?;
        if let Some(asked) = request.pod_uid.as_deref().filter(|u| !u.is_empty()) {
            if asked != holder.pod_uid {
                return Err(BrokerError::OtherPod {
                    asked: shown(asked),
                });
            }
        }
        let (namespace, name) = (holder.namespace.as_str(), holder.pod_name.as_str());
        let pod = self
            .pods
            .owner_pod(namespace, name, deadline)
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("cannot read pod {namespace}/{name}: {e}"))
            })?;
        let gone = || BrokerError::PodGone {
            namespace: namespace.into(),
            name: name.into(),
            uid: holder.pod_uid.clone(),
        };
        let pod = pod.ok_or_else(gone)?;
        if pod.metadata.uid.as_deref() != Some(holder.pod_uid.as_str()) {
            return Err(gone());
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(BrokerError::Terminating {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        let account = stamps::service_account(&pod);
        if account != holder.service_account {
            return Err(BrokerError::WrongServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
                pod: account.into(),
                token: holder.service_account.clone(),
            });
        }
        let stamp_error = |reason: String| BrokerError::Stamps {
            namespace: namespace.into(),
            name: name.into(),
            reason,
        };
        let keys = self.webhook.keys.get().ok_or_else(|| {
            BrokerError::Unavailable(
                IdentityError::NoSigningKey {
                    action: "verify the pod's stamps",
                }
                .to_string(),
            )
        })?;
        let stamped = stamps::verify(&pod, namespace, &keys)
            .map_err(|e| stamp_error(format!("its stamps {e}")))?;
        let plan = stamped
            .runtime
            .as_deref()
            .map(|text| {
                RuntimePlan::from_annotation(text)
                    .ok_or_else(|| stamp_error("its runtime plan is unreadable".into()))
            })
            .transpose()?
            .ok_or_else(|| BrokerError::NoPlan {
                namespace: namespace.into(),
                name: name.into(),
            })?;
        let container =
            plan.container(&request.container)
                .ok_or_else(|| BrokerError::NotInPlan {
                    namespace: namespace.into(),
                    name: name.into(),
                    container: request.container.clone(),
                })?;
        let secrets: Vec<&SecretObject> = container.secrets().into_iter().collect();
        for secret in &secrets {
            if secret.source.kind != SourceType::Vault
                || !stamped.granted.contains(&secret.to_string())
            {
                return Err(BrokerError::NotGranted {
                    namespace: namespace.into(),
                    name: name.into(),
                    reference: secret.to_string(),
                });
            }
        }
        if let Some(driver) = &plan.driver {
            self.check_driver(&pod, namespace, driver, &stamped, &secrets, deadline)
                .await
                .map_err(|refusal| match refusal {
                    // The driver could not be read in time: the wrapper's next attempt may.
                    DriverCheck::Unavailable(reason) => {
                        BrokerError::Unavailable(format!("pod {namespace}/{name}: {reason}"))
                    }
                    DriverCheck::Refused(reason) => BrokerError::Driver {
                        namespace: namespace.into(),
                        name: name.into(),
                        reason,
                    },
                })?;
        }
        self.authorize(&stamped.identity, &secrets, deadline)
            .await?;
        self.values(container, &secrets, deadline).await
    }

    /// TokenReview for the broker's audience, cached by the token's digest and coalesced.
    async fn review(&self, token: &str, deadline: Instant) -> Result<TokenHolder, BrokerError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (client, owned) = (self.client.clone(), token.to_string());
        let answer = self
            .reviews
            .get(digest, deadline, move || {
                Box::pin(async move {
                    let expires = token_expiry(&owned);
                    let reviewed = identity::tokens::review(
                        client,
                        vec![TOKEN_AUDIENCE.to_string()],
                        owned,
                        REVIEW_BUDGET,
                    )
                    .await?;
                    Ok(reviewed.map(|id| (holder(&id), expires)))
                })
            })
            .await;
        let (holder, _) = match answer {
            Ok(Ok(Some(found))) => found,
            // Refused either way; an expired token is named as such (its unverified claim only
            // picks the wording).
            Ok(Ok(None)) => return Err(expired(token).unwrap_or(BrokerError::Unauthenticated)),
            Ok(Err(why)) => return Err(BrokerError::Unavailable(why)),
            Err(FlightError::Deadline | FlightError::Lost) => {
                return Err(BrokerError::Unavailable(
                    "the Kubernetes API server did not review the token in time".into(),
                ));
            }
        };
        let holder = holder?;
        // The API server still accepts a token up to a minute past its expiry (its clock leeway);
        // the broker does not.
        if let Some(refused) = expired(token) {
            return Err(refused);
        }
        match token_lifetime(token) {
            Some(lifetime) if lifetime <= TOKEN_SECONDS as u64 + LIFETIME_SLACK => Ok(holder),
            _ => Err(BrokerError::TooLongLived),
        }
    }

    /// The executor's driver, checked again as at admission: it still exists with the uid the
    /// plan recorded, is the driver of the same application, its stamps verify and name the same
    /// identity, and it was granted every reference.
    async fn check_driver(
        &self,
        executor: &Pod,
        namespace: &str,
        driver: &crate::plan::runtime::DriverRef,
        stamped: &stamps::Stamped,
        secrets: &[&SecretObject],
        deadline: Instant,
    ) -> Result<(), DriverCheck> {
        let resolver = identity::Resolver {
            trusted: &self.webhook.trusted,
            owners: self.webhook.owners.as_ref(),
            keys: &self.webhook.keys,
            executors: self.webhook.settings.executors,
        };
        let found = resolver
            .find_driver(executor, namespace, &driver.name, &driver.uid, deadline)
            .await
            .map_err(DriverCheck::of)?;
        if found.metadata.uid.as_deref() != Some(driver.uid.as_str()) {
            return Err(DriverCheck::Refused(
                IdentityError::OwnerUid {
                    name: driver.name.clone(),
                    expected: driver.uid.clone(),
                    actual: found.metadata.uid.clone().unwrap_or_default(),
                }
                .to_string(),
            ));
        }
        let driver_stamps = resolver
            .driver_stamps(&found, namespace, &driver.name)
            .map_err(|e| DriverCheck::Refused(e.to_string()))?;
        if driver_stamps.identity != stamped.identity {
            return Err(DriverCheck::Refused(format!(
                "its driver {:?} runs for another identity than the executor was admitted for",
                driver.name
            )));
        }
        for secret in secrets {
            if !driver_stamps.granted.contains(&secret.to_string()) {
                return Err(DriverCheck::Refused(
                    IdentityError::NotInherited {
                        reference: secret.to_string(),
                        driver: driver.name.clone(),
                    }
                    .to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Use, again, for every Vault config the container reads (cached like admissions).
    async fn authorize(
        &self,
        identity: &Identity,
        secrets: &[&SecretObject],
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        let configs: BTreeSet<&str> = secrets.iter().map(|s| s.source.id.as_str()).collect();
        let vault = self.webhook.vault.as_ref();
        let checks = configs.into_iter().map(|config| async move {
            let resource = Resource::VaultConfig {
                name: config.to_string(),
                bundle: vault.and_then(|v| v.bundle_of(config)),
            };
            match self
                .webhook
                .authz
                .check_use(identity, &resource, deadline)
                .await
            {
                Decision::Allow => None,
                Decision::Deny(why) => Some(why),
            }
        });
        let denials: Vec<String> = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        if denials.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::Forbidden(denials.join("\n")))
        }
    }

    async fn values(
        &self,
        container: &crate::plan::runtime::ContainerPlan,
        secrets: &[&SecretObject],
        deadline: Instant,
    ) -> Result<FetchResponse, BrokerError> {
        let Some(vault) = self.webhook.vault.as_ref() else {
            return Err(BrokerError::Value(
                "Vault source not configured in this webhook".into(),
            ));
        };
        let read = vault.values(secrets, deadline).await;
        let mut by_secret: BTreeMap<&SecretObject, String> = BTreeMap::new();
        let mut problems = Vec::new();
        let mut transient = false;
        for (secret, value) in secrets.iter().zip(read) {
            match value {
                Ok(value) => match String::from_utf8(value.expose().to_vec()) {
                    Ok(text) if !text.contains('\0') => {
                        by_secret.insert(secret, text);
                    }
                    _ => problems.push(format!(
                        "{secret}: the value is not text without NUL characters, so it cannot be an env var \
                         or a Spark conf"
                    )),
                },
                Err(e) => {
                    transient |= e.retry;
                    problems.push(format!("{secret}: {}", e.message));
                }
            }
        }
        if !problems.is_empty() {
            let text = problems.join("\n");
            return Err(if transient {
                BrokerError::Unavailable(text)
            } else {
                BrokerError::Value(text)
            });
        }
        let pick = |refs: &BTreeMap<String, SecretObject>| -> BTreeMap<String, String> {
            refs.iter()
                .filter_map(|(name, secret)| {
                    by_secret.get(secret).map(|v| (name.clone(), v.clone()))
                })
                .collect()
        };
        Ok(FetchResponse {
            env: pick(&container.env),
            spark_confs: pick(&container.spark_confs),
            confs_via: container.confs_via,
            args_at: container.args_at,
        })
    }
}

/// Who holds the token, from the TokenReview's user: `system:serviceaccount:<ns>:<sa>` with both
/// pod extras.
fn holder(identity: &Identity) -> Result<TokenHolder, BrokerError> {
    let Some(rest) = identity.username.strip_prefix("system:serviceaccount:") else {
        return Err(BrokerError::NotAServiceAccount(shown(&identity.username)));
    };
    let Some((namespace, service_account)) = rest.split_once(':') else {
        return Err(BrokerError::NotAServiceAccount(shown(&identity.username)));
    };
    let extra = |key: &str| {
        identity
            .extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let pod_name = extra(EXTRA_POD_NAME).ok_or(BrokerError::NotBound("pod-name extra"))?;
    let pod_uid = extra(EXTRA_POD_UID).ok_or(BrokerError::NotBound("pod-uid extra"))?;
    Ok(TokenHolder {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod_name,
        pod_uid,
    })
}

/// Claims of a JWT: verified once the API server has accepted it; before that they only pick the
/// wording of a refusal.
#[derive(serde::Deserialize)]
struct Claims {
    exp: Option<u64>,
    iat: Option<u64>,
}

fn claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `exp - iat` of the token, in seconds.
fn token_lifetime(token: &str) -> Option<u64> {
    let c = claims(token)?;
    c.exp?.checked_sub(c.iat?)
}

fn token_expiry(token: &str) -> Option<SystemTime> {
    claims(token)
        .and_then(|c| c.exp)
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp))
}

/// `Expired` when the token's `exp` is now or past.
fn expired(token: &str) -> Option<BrokerError> {
    let exp = claims(token)?.exp?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    (exp <= now).then(|| BrokerError::Expired(now - exp))
}

fn is_container_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A string from a token or a request for a message: quoted when it has the form of a name.
fn shown(text: &str) -> String {
    match crate::refs::plain_name(text) {
        Some(name) if !name.is_empty() => format!("{name:?}"),
        _ => format!("({})", crate::refs::shape(text)),
    }
}

/// The bearer token of a request, or why not.
fn bearer(headers: &HeaderMap) -> Result<&str, BrokerError> {
    let text = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(BrokerError::Unauthenticated)?;
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer")
                && !token.trim().is_empty()
                && token.trim().len() <= MAX_TOKEN =>
        {
            Ok(token.trim())
        }
        _ => Err(BrokerError::Unauthenticated),
    }
}

async fn values(State(broker): State<Arc<Broker>>, request: Request) -> Response {
    let started = Instant::now();
    let deadline = started + REQUEST_BUDGET;
    let (parts, body) = request.into_parts();
    let outcome = async {
        let token = bearer(&parts.headers)?;
        let body = read_body(body).await?;
        let request: FetchRequest = serde_json::from_slice(&body).map_err(|_| {
            BrokerError::BadRequest(
                "the body must be JSON {\"container\": NAME, \"podUid\": UID}".into(),
            )
        })?;
        let container = request.container.clone();
        broker
            .fetch(token, &request, deadline)
            .await
            .map(|r| (container, r))
    }
    .await;
    let metrics = &broker.webhook.metrics;
    let seconds = started.elapsed().as_secs_f64();
    let mut response = match outcome {
        Ok((container, values)) => {
            tracing::info!(container = %container, env = values.env.len(),
                spark_confs = values.spark_confs.len(), duration_ms = seconds * 1e3,
                outcome = "delivered", "broker");
            metrics.broker("delivered", seconds);
            let body = serde_json::to_vec(&values).unwrap_or_default();
            (StatusCode::OK, body).into_response()
        }
        Err(e) => {
            tracing::info!(outcome = e.slug(), denial = %e, duration_ms = seconds * 1e3, "broker");
            metrics.broker(e.slug(), seconds);
            let body = ErrorBody {
                error: e.slug().into(),
                message: e.to_string(),
                retry: e.retry(),
            };
            (e.status(), serde_json::to_vec(&body).unwrap_or_default()).into_response()
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn read_body(body: Body) -> Result<Vec<u8>, BrokerError> {
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(body, protocol::MAX_REQUEST).collect(),
    )
    .await
    .map_err(|_| BrokerError::BadRequest("the request body was not received in time".into()))?
    .map_err(|_| {
        BrokerError::BadRequest(format!(
            "the request body is larger than {} bytes or unreadable",
            protocol::MAX_REQUEST
        ))
    })?;
    Ok(read.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"ES256"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn a_driver_that_could_not_be_read_is_retried_one_that_refuses_is_final() {
        let lookup = IdentityError::OwnerLookup {
            namespace: "spark".into(),
            name: "driver".into(),
            reason: "Kubernetes API gave no answer within 5 s".into(),
        };
        assert!(
            matches!(DriverCheck::of(lookup), DriverCheck::Unavailable(m) if m.contains("driver"))
        );
        let gone = IdentityError::OwnerNotFound {
            namespace: "spark".into(),
            name: "driver".into(),
        };
        assert!(matches!(DriverCheck::of(gone), DriverCheck::Refused(_)));
    }

    #[test]
    fn a_token_whose_exp_is_now_or_past_is_expired() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let at = |exp: u64| expired(&jwt(serde_json::json!({"iat": exp - 600, "exp": exp})));
        assert!(matches!(at(now - 30), Some(BrokerError::Expired(s)) if (30..35).contains(&s)));
        assert!(matches!(at(now), Some(BrokerError::Expired(_))));
        assert_eq!(at(now + 60), None);
        assert_eq!(expired(&jwt(serde_json::json!({"iat": 100}))), None);
        assert_eq!(expired("not-a-jwt"), None);
    }

    #[test]
    fn lifetimes_are_read_from_the_claims() {
        assert_eq!(
            token_lifetime(&jwt(serde_json::json!({"iat": 100, "exp": 700}))),
            Some(600)
        );
        assert_eq!(token_lifetime(&jwt(serde_json::json!({"iat": 100}))), None);
        assert_eq!(token_lifetime("not-a-jwt"), None);
        assert_eq!(
            token_lifetime(&jwt(serde_json::json!({"iat": 700, "exp": 100}))),
            None
        );
    }

    #[test]
    fn only_pod_bound_service_account_tokens_hold_a_pod() {
        let mut id = Identity::new("system:serviceaccount:spark:driver", Vec::new());
        assert_eq!(
            holder(&id).unwrap_err(),
            BrokerError::NotBound("pod-name extra")
        );
        id.extra.insert(EXTRA_POD_NAME.into(), vec!["p".into()]);
        assert_eq!(
            holder(&id).unwrap_err(),
            BrokerError::NotBound("pod-uid extra")
        );
        id.extra.insert(EXTRA_POD_UID.into(), vec!["u".into()]);
        let h = holder(&id).unwrap();
        assert_eq!(
            (
                h.namespace.as_str(),
                h.service_account.as_str(),
                h.pod_name.as_str(),
                h.pod_uid.as_str()
            ),
            ("spark", "driver", "p", "u")
        );
        let user = Identity::new("alice", Vec::new());
        assert!(matches!(
            holder(&user),
            Err(BrokerError::NotAServiceAccount(_))
        ));
    }

    #[test]
    fn container_names_are_dns_labels() {
        assert!(is_container_name("spark-kubernetes-driver"));
        assert!(!is_container_name(""));
        assert!(!is_container_name("Driver"));
        assert!(!is_container_name(&"a".repeat(64)));
    }
}
