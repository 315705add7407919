//! HTTP handlers: `POST /mutate` on the TLS port, `/livez` `/readyz` `/metrics` on the admin port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use kube::core::admission::AdmissionResponse;

use crate::admission::Webhook;

/// What the handlers share.
pub(crate) struct AppState {
    pub webhook: Arc<Webhook>,
    /// Set on SIGTERM: /readyz answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body once its headers are in.
    pub body_timeout: Duration,
}

pub(crate) fn admission_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .with_state(state)
}

pub(crate) fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Why a body never reached the engine. The text goes into the `invalid` response.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("AdmissionReview body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("AdmissionReview body was not received within {0:?}")]
    TimedOut(Duration),
    #[error("AdmissionReview body could not be read: {0}")]
    Unreadable(String),
}

/// Always HTTP 200 with an AdmissionReview: the engine's answer, or `invalid` when the body could
/// not be received. An over-limit body is refused before it is read when Content-Length announces
/// it, and otherwise as soon as the streamed bytes pass the limit; it is never buffered whole.
async fn mutate(State(app): State<Arc<AppState>>, request: Request) -> Response {
    admission(app, request, Endpoint::Mutate).await
}

/// `POST /validate`: the validating webhooks (pod updates, SparkApplications), same contract.
async fn validate(State(app): State<Arc<AppState>>, request: Request) -> Response {
    admission(app, request, Endpoint::Validate).await
}

#[derive(Clone, Copy)]
enum Endpoint {
    Mutate,
    Validate,
}

async fn admission(app: Arc<AppState>, request: Request, endpoint: Endpoint) -> Response {
    let started = Instant::now();
    let timeout = request.uri().query().and_then(timeout_from_query);
    let (parts, body) = request.into_parts();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let received = if announced.is_some_and(|n| n > app.max_body_bytes as u64) {
        Err(BodyError::TooLarge(app.max_body_bytes))
    } else {
        read_limited(body, app.max_body_bytes, app.body_timeout).await
    };
    let answer = match received {
        // Boxed: the engine's future is large, and tower/axum move the handler's future by value.
        Ok(bytes) => match endpoint {
            Endpoint::Mutate => Box::pin(app.webhook.review_bytes(&bytes, timeout)).await,
            Endpoint::Validate => Box::pin(app.webhook.validate_bytes(&bytes, timeout)).await,
        },
        Err(e) => {
            tracing::warn!(error = %e, "admission request refused");
            app.webhook
                .metrics
                .admission("none", "invalid", started.elapsed().as_secs_f64());
            serde_json::to_vec(&AdmissionResponse::invalid(e.to_string()).into_review())
                .unwrap_or_default()
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}

async fn read_limited(body: Body, limit: usize, within: Duration) -> Result<Vec<u8>, BodyError> {
    match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes().to_vec()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(BodyError::TooLarge(limit))
        }
        Ok(Err(e)) => Err(BodyError::Unreadable(e.to_string())),
        Err(_) => Err(BodyError::TimedOut(within)),
    }
}

async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !app.webhook.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not ready\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.webhook.metrics.encode(),
    )
        .into_response()
}

/// The API server's `?timeout=10s`.
fn timeout_from_query(query: &str) -> Option<Duration> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "timeout")
        .and_then(|(_, value)| parse_go_duration(value))
}

/// A Go `time.Duration` string as the API server writes it (`10s`, `1m30s`, `500ms`, `1.5s`).
/// Negative or malformed values give `None`.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    match text {
        "" => return None,
        "0" => return Some(Duration::ZERO),
        _ => {}
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("-1s"), None);
        assert_eq!(parse_go_duration("10x"), None);
        assert_eq!(parse_go_duration("s"), None);
    }

    #[test]
    fn timeout_query() {
        assert_eq!(
            timeout_from_query("timeout=10s"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            timeout_from_query("a=b&timeout=3s"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(timeout_from_query("a=b"), None);
    }
}
