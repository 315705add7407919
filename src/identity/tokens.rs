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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt as _;
    use serde_json::{Value, json};

    use super::*;

    /// A client whose API server answers every request with `status` and `answer`, and keeps the
    /// request bodies in `seen`.
    fn api_server(status: u16, answer: Value, seen: Arc<Mutex<Vec<Value>>>) -> kube::Client {
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (seen, answer) = (seen.clone(), answer.clone());
            async move {
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or_default());
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(answer.to_string())
                        .unwrap(),
                )
            }
        });
        kube::Client::new(service, "default")
    }

    fn reviewed(status: Value) -> Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
               "status": status})
    }

    async fn review_with(status: u16, answer: Value, audiences: &[&str]) -> (Reviewed, Value) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client = api_server(status, answer, seen.clone());
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        let out = review(
            client,
            audiences,
            "the-token".into(),
            Duration::from_secs(5),
        )
        .await;
        let sent = seen.lock().unwrap().pop().unwrap_or_default();
        (out, sent)
    }

    #[tokio::test]
    async fn the_token_and_audiences_are_sent_and_the_user_taken_from_the_answer() {
        let alice = reviewed(json!({"authenticated": true, "user": {"username": "alice",
            "uid": "u-1", "groups": ["data-eng", "data-eng"], "extra": {"k": ["v"]}}}));
        let (out, sent) = review_with(201, alice.clone(), &["secrets.iomete.com"]).await;
        assert_eq!(sent["spec"]["token"], "the-token");
        assert_eq!(sent["spec"]["audiences"], json!(["secrets.iomete.com"]));
        let identity = out.unwrap().unwrap();
        assert_eq!(identity.username, "alice");
        assert_eq!(identity.groups, ["data-eng"]);
        assert_eq!(identity.uid.as_deref(), Some("u-1"));
        assert_eq!(identity.extra["k"], ["v"]);
        // No audiences: the API server's own, so none are named.
        let (out, sent) = review_with(201, alice, &[]).await;
        assert_eq!(sent["spec"]["token"], "the-token");
        assert_eq!(sent["spec"].get("audiences"), None, "{sent}");
        assert!(out.unwrap().is_some());
    }

    #[tokio::test]
    async fn only_an_authenticated_answer_with_a_username_is_an_identity() {
        for status in [
            json!({"authenticated": false, "error": "token not recognized"}),
            json!({"authenticated": true, "user": {"username": ""}}),
            json!({"authenticated": true, "user": {"groups": ["g"]}}),
            json!({"authenticated": true}),
            json!({"user": {"username": "alice"}}),
        ] {
            let (out, _) = review_with(201, reviewed(status.clone()), &[]).await;
            assert_eq!(out, Ok(None), "{status}");
        }
        let no_status = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                               "spec": {}});
        assert_eq!(review_with(201, no_status, &[]).await.0, Ok(None));
    }

    #[tokio::test]
    async fn a_failed_review_fails_closed_with_the_api_servers_reason_and_no_token() {
        let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "etcd is down", "reason": "InternalError", "code": 500});
        let (out, _) = review_with(500, status, &[]).await;
        let error = out.unwrap_err();
        assert_eq!(
            error,
            "the TokenReview failed (failing closed): HTTP 500 InternalError"
        );
        assert!(!error.contains("the-token"));
    }
}
