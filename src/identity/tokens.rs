//! TokenReview: who holds a bearer token, as the API server says (the management API's callers,
//! the broker's pods). The token is never logged or put into a message.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::authz::Identity;

/// The identity, `None` when the token is not accepted, or why no answer came.
pub type Reviewed = Result<Option<Identity>, String>;

/// One TokenReview, bounded by `budget`. `audiences` empty means the API server's own.
pub async fn review(
    client: kube::Client,
    audiences: Vec<String>,
    token: String,
    budget: Duration,
) -> Reviewed {
    let api: Api<TokenReview> = Api::all(client);
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: (!audiences.is_empty()).then_some(audiences),
        },
        ..TokenReview::default()
    };
    let answer = tokio::time::timeout(budget, api.create(&PostParams::default(), &request))
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
pub fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        other => other.to_string(),
    }
}
