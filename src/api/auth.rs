//! Who is calling the management API.
//!
//! - A bearer token, checked with a `TokenReview` (ServiceAccount tokens, and OIDC tokens where the
//!   API server accepts them). Answers are cached briefly, keyed by the token's SHA-256 (never the
//!   token), and concurrent reviews of one token are coalesced; an unreachable API server fails
//!   closed (503), and that failure is not cached.
//! - In `--dev` only: static tokens from the config file's `apiTokens`.
//! - A console backend (configured in `consoleBackends`, matched on its own authenticated
//!   identity) may act for a user named in `X-Remote-User` (groups in `X-Remote-Group`). From any
//!   other caller those headers are refused, never silently ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::problem::Problem;
use crate::authz::Identity;
use crate::authz::cache::{FlightError, SingleFlight};

/// Header in which a console backend names the user it acts for.
pub const REMOTE_USER: &str = "x-remote-user";
/// Header (repeatable, or comma-separated) with that user's groups.
pub const REMOTE_GROUP: &str = "x-remote-group";

/// Longest bearer token looked at (JWTs with many claims stay far below).
const MAX_TOKEN: usize = 16 * 1024;
/// How long a TokenReview answer is reused.
const REVIEW_TTL: Duration = Duration::from_secs(10);
/// How long one TokenReview may take.
const REVIEW_BUDGET: Duration = Duration::from_secs(3);

/// A static token of the dev config (`apiTokens`); refused without `--dev`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub token: String,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("token", &"<redacted>")
            .field("user", &self.user)
            .field("groups", &self.groups)
            .finish()
    }
}

/// A console backend trusted to name the user it acts for (like `trustedControllers`): exactly
/// one of `username` or `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsoleBackend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// How a caller was authenticated, for audit lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    DevToken,
    TokenReview,
    /// A console backend acting for the user; `backend` is the backend's own username.
    ConsoleBackend {
        backend: String,
    },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    pub via: Via,
}

impl Caller {
    /// `alice`, or `alice (via console backend system:serviceaccount:iomete:console)`.
    pub fn actor(&self) -> String {
        match &self.via {
            Via::ConsoleBackend { backend } => {
                format!("{} (via console backend {backend})", self.identity.username)
            }
            _ => self.identity.username.clone(),
        }
    }
}

type Reviewed = Result<Option<Identity>, String>;

enum Mode {
    /// SHA-256 of each token, and whom it stands for.
    Dev(Vec<([u8; 32], Identity)>),
    Cluster {
        client: kube::Client,
        audiences: Vec<String>,
        reviews: Arc<SingleFlight<[u8; 32], Reviewed>>,
    },
}

/// Turns request headers into a [`Caller`].
pub struct Authenticator {
    mode: Mode,
    backends: Vec<ConsoleBackend>,
}

/// Why `Authenticator` could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("consoleBackends[{0}] must name exactly one of username or group; fix the config file")]
    Backend(usize),
    #[error("apiTokens[{0}] needs a non-empty token and user; fix the config file")]
    Token(usize),
}

impl Authenticator {
    /// `--dev`: the config file's static tokens only.
    pub fn dev(
        tokens: &[ApiToken],
        backends: Vec<ConsoleBackend>,
    ) -> Result<Self, AuthConfigError> {
        check_backends(&backends)?;
        let mut known = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if t.token.trim().is_empty() || t.user.trim().is_empty() {
                return Err(AuthConfigError::Token(i));
            }
            known.push((digest(&t.token), Identity::new(&t.user, t.groups.clone())));
        }
        Ok(Self {
            mode: Mode::Dev(known),
            backends,
        })
    }

    /// In a cluster: TokenReview through `client`. `audiences` empty means the API server's own.
    pub fn cluster(
        client: kube::Client,
        audiences: Vec<String>,
        backends: Vec<ConsoleBackend>,
    ) -> Result<Self, AuthConfigError> {
        check_backends(&backends)?;
        let reviews = SingleFlight::new(10_000, |r: &Reviewed| r.is_ok().then_some(REVIEW_TTL));
        Ok(Self {
            mode: Mode::Cluster {
                client,
                audiences,
                reviews,
            },
            backends,
        })
    }

    /// The caller of a request, or the problem to answer (401, 403 or 503).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Problem> {
        let token = bearer(headers)?;
        let who = match &self.mode {
            Mode::Dev(known) => {
                let d = digest(token);
                known
                    .iter()
                    .find(|(k, _)| *k == d)
                    .map(|(_, id)| (id.clone(), Via::DevToken))
            }
            Mode::Cluster {
                client,
                audiences,
                reviews,
            } => {
                let (client, audiences, owned) =
                    (client.clone(), audiences.clone(), token.to_string());
                let deadline = Instant::now() + REVIEW_BUDGET;
                let answer = reviews
                    .get(digest(token), deadline, move || {
                        Box::pin(review(client, audiences, owned))
                    })
                    .await;
                match answer {
                    Ok(Ok(found)) => found.map(|id| (id, Via::TokenReview)),
                    Ok(Err(why)) => return Err(Problem::unavailable(why)),
                    Err(FlightError::Deadline | FlightError::Lost) => {
                        return Err(Problem::unavailable(
                            "the Kubernetes API server did not review the token in time (failing \
                             closed); try again",
                        ));
                    }
                }
            }
        };
        let Some((identity, via)) = who else {
            return Err(Problem::unauthenticated(
                "the bearer token was not accepted (unknown, expired or for another audience); \
                 send a valid ServiceAccount or OIDC token as `Authorization: Bearer <token>`",
            ));
        };
        self.on_behalf(identity, via, headers)
    }

    /// Applies `X-Remote-User` / `X-Remote-Group`: only from a console backend.
    fn on_behalf(
        &self,
        identity: Identity,
        via: Via,
        headers: &HeaderMap,
    ) -> Result<Caller, Problem> {
        let user = headers.get(REMOTE_USER);
        let groups: Vec<&axum::http::HeaderValue> = headers.get_all(REMOTE_GROUP).iter().collect();
        if user.is_none() && groups.is_empty() {
            return Ok(Caller { identity, via });
        }
        let trusted = self.backends.iter().any(|b| {
            b.username.as_deref() == Some(identity.username.as_str())
                || b.group
                    .as_ref()
                    .is_some_and(|g| identity.groups.iter().any(|have| have == g))
        });
        if !trusted {
            return Err(Problem::forbidden(format!(
                "{} is not a console backend, so it may not name a user in X-Remote-User or \
                 X-Remote-Group; drop those headers, or ask a platform admin to list it in \
                 consoleBackends",
                identity
            ))
            .at("X-Remote-User"));
        }
        let Some(user) = user else {
            return Err(Problem::bad_request(
                "X-Remote-User",
                "X-Remote-Group needs X-Remote-User",
            ));
        };
        let user = header_text(user).filter(|u| !u.is_empty()).ok_or_else(|| {
            Problem::bad_request(
                "X-Remote-User",
                "X-Remote-User must be a non-empty user name of visible ASCII characters",
            )
        })?;
        let mut names = Vec::new();
        for value in groups {
            let text = header_text(value).ok_or_else(|| {
                Problem::bad_request(
                    "X-Remote-Group",
                    "X-Remote-Group must be group names of visible ASCII characters, comma-separated",
                )
            })?;
            names.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(Caller {
            identity: Identity::new(user, names),
            via: Via::ConsoleBackend {
                backend: identity.username,
            },
        })
    }
}

fn check_backends(backends: &[ConsoleBackend]) -> Result<(), AuthConfigError> {
    for (i, b) in backends.iter().enumerate() {
        let named = |v: &Option<String>| v.as_ref().is_some_and(|s| !s.trim().is_empty());
        if named(&b.username) == named(&b.group) {
            return Err(AuthConfigError::Backend(i));
        }
    }
    Ok(())
}

fn header_text(value: &axum::http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?.trim();
    text.bytes()
        .all(|b| (0x20..=0x7e).contains(&b))
        .then_some(text)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token, or 401 saying what is wrong with the header (never quoting it).
fn bearer(headers: &HeaderMap) -> Result<&str, Problem> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(Problem::unauthenticated(
            "no credentials; send `Authorization: Bearer <token>` with a ServiceAccount or OIDC token",
        ));
    };
    let text = value.to_str().map_err(|_| {
        Problem::unauthenticated(
            "the Authorization header is not visible ASCII; send `Bearer <token>`",
        )
    })?;
    let token = match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(Problem::unauthenticated(
                "the Authorization header must use the Bearer scheme: `Authorization: Bearer <token>`",
            ));
        }
    };
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(Problem::unauthenticated(format!(
            "the bearer token must be 1 to {MAX_TOKEN} characters long"
        )));
    }
    Ok(token)
}

/// One TokenReview: the identity, `None` when the token is not accepted, or why no answer came.
async fn review(client: kube::Client, audiences: Vec<String>, token: String) -> Reviewed {
    let api: Api<TokenReview> = Api::all(client);
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: (!audiences.is_empty()).then_some(audiences),
        },
        ..TokenReview::default()
    };
    let answer = tokio::time::timeout(REVIEW_BUDGET, api.create(&PostParams::default(), &request))
        .await
        .map_err(|_| "the TokenReview timed out (failing closed); try again".to_string())?
        .map_err(|e| {
            format!(
                "the TokenReview failed (failing closed): {}",
                kube_reason(&e)
            )
        })?;
    let Some(status) = answer.status else {
        return Ok(None);
    };
    if status.authenticated != Some(true) {
        return Ok(None);
    }
    let Some(user) = status
        .user
        .filter(|u| u.username.as_deref().is_some_and(|n| !n.is_empty()))
    else {
        return Ok(None);
    };
    let mut identity = Identity::new(
        user.username.unwrap_or_default(),
        user.groups.unwrap_or_default(),
    );
    identity.uid = user.uid;
    identity.extra = user.extra.unwrap_or_default();
    Ok(Some(identity))
}

/// A kube error without anything from the request (the token is never in it anyway).
pub(crate) fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        other => other.to_string(),
    }
}
