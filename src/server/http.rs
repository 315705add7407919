//! HTTP handlers: `POST /mutate`, `POST /validate` and `POST /default` on the TLS port, `/livez` `/readyz` `/metrics` on
//! the admin port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use kube::core::admission::AdmissionResponse;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::budget::{self, BUDGET_WAIT, Budgets, Shape, Shortfall};
use crate::admission::Webhook;

/// What the handlers share.
pub(crate) struct AppState {
    pub webhook: Arc<Webhook>,
    /// Set on SIGTERM: /readyz answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body once its headers are in.
    pub body_timeout: Duration,
    pub budgets: Budgets,
}

pub(crate) fn admission_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/default", post(default))
        .with_state(state)
}

pub(crate) fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

const MIB: f64 = 1024.0 * 1024.0;
/// How long a large review waits for its turn when the API server gives no timeout.
const HEAVY_WAIT: Duration = Duration::from_secs(2);

/// Why a review never reached the engine. The text goes into the `invalid` response; it describes
/// the request's size and the server's state, never its content.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("AdmissionReview body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("AdmissionReview body was not received within {0:?}")]
    TimedOut(Duration),
    #[error("AdmissionReview body could not be read: {0}")]
    Unreadable(String),
    #[error(
        "secrets-webhook is receiving more request bodies at once than its memory budget holds \
         ({:.0} MiB in flight across all connections); retry", *.0 as f64 / MIB
    )]
    UploadBusy(usize),
    #[error(
        "the AdmissionReview would take about {:.0} MiB of memory to decode ({objects} objects in \
         arrays), more than secrets-webhook's limit of {:.0} MiB; a real pod is far smaller",
        *.estimate as f64 / MIB, *.limit as f64 / MIB
    )]
    TooLargeToDecode {
        estimate: u64,
        objects: u64,
        limit: usize,
    },
    #[error(
        "secrets-webhook is decoding other large reviews (memory budget {:.0} MiB); retry",
        *.0 as f64 / MIB
    )]
    DecodeBusy(usize),
    #[error("secrets-webhook is busy with other large reviews; retry")]
    HeavyBusy,
    #[error(
        "AdmissionReview body was still arriving after {:?} while secrets-webhook needed the memory \
         for other requests; send the body at once, or retry",
        budget::CUT_AGE
    )]
    Cut,
    #[error("secrets-webhook failed while reviewing this request; retry")]
    Failed,
}

/// A body received within the budgets, with its shape.
struct Received {
    frames: Vec<Bytes>,
    shape: Shape,
    /// The upload budget it holds until it is handed to the engine.
    upload: Option<OwnedSemaphorePermit>,
}

/// Always HTTP 200 with an AdmissionReview: the engine's answer, or `invalid` when the body could
/// not be received or the server cannot take it now. An over-limit body is refused before it is
/// read when Content-Length announces it, and otherwise as soon as the streamed bytes pass the
/// limit; it is never buffered whole.
async fn mutate(State(app): State<Arc<AppState>>, request: Request) -> Response {
    admission(app, request, Endpoint::Mutate).await
}

/// `POST /validate`: the validating webhooks (pod updates, SparkApplications), same contract.
async fn validate(State(app): State<Arc<AppState>>, request: Request) -> Response {
    admission(app, request, Endpoint::Validate).await
}

/// `POST /default`: VaultConfig CREATEs without `spec.delivery` get `runtime`, same contract.
async fn default(State(app): State<Arc<AppState>>, request: Request) -> Response {
    admission(app, request, Endpoint::Default).await
}

#[derive(Clone, Copy)]
enum Endpoint {
    Mutate,
    Validate,
    Default,
}

impl Endpoint {
    async fn run(self, webhook: &Webhook, body: &[u8], timeout: Option<Duration>) -> Vec<u8> {
        match self {
            Endpoint::Mutate => webhook.review_bytes(body, timeout).await,
            Endpoint::Validate => webhook.validate_bytes(body, timeout).await,
            Endpoint::Default => webhook.default_bytes(body),
        }
    }
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
        Err(Refusal::TooLarge(app.max_body_bytes))
    } else {
        receive(&app, body).await
    };
    let answer = match received {
        Ok(received) => review(&app, received, endpoint, timeout, started).await,
        Err(refusal) => Err((refusal, String::new())),
    };
    let answer = answer.unwrap_or_else(|(refusal, uid)| {
        tracing::warn!(error = %refusal, "admission request refused");
        app.webhook
            .metrics
            .admission("none", "invalid", started.elapsed().as_secs_f64());
        let mut response = AdmissionResponse::invalid(refusal.to_string());
        response.uid = uid;
        serde_json::to_vec(&response.into_review()).unwrap_or_default()
    });
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}

/// Reads the body frame by frame within the size limit, the body timeout and the upload budget,
/// measuring its shape on the way.
async fn receive(app: &AppState, body: Body) -> Result<Received, Refusal> {
    let deadline = Instant::now() + app.body_timeout;
    let mut body = body;
    let mut received = Received {
        frames: Vec::new(),
        shape: Shape::default(),
        upload: None,
    };
    let mut waited = Duration::ZERO;
    let upload = app.budgets.begin_upload();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, body.frame()) => next,
            _ = upload.state.cut.notified() => return Err(Refusal::Cut),
        };
        let frame = match next {
            Err(_) => return Err(Refusal::TimedOut(app.body_timeout)),
            Ok(None) => return Ok(received),
            Ok(Some(Err(e))) => return Err(Refusal::Unreadable(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if received.shape.bytes + data.len() as u64 > app.max_body_bytes as u64 {
            return Err(Refusal::TooLarge(app.max_body_bytes));
        }
        // The frame is already in memory (within the connection's flow-control window); until it
        // is paid for, no further frame is read from this stream.
        let asked = Instant::now();
        let until = asked + BUDGET_WAIT.saturating_sub(waited);
        app.budgets
            .upload(&mut received.upload, data.len(), until, &upload)
            .await
            .map_err(|shortfall| match shortfall {
                Shortfall::Cut => Refusal::Cut,
                _ => Refusal::UploadBusy(app.budgets.upload_total()),
            })?;
        waited += asked.elapsed();
        received.shape.feed(&data);
        received.frames.push(data);
    }
}

/// Hands a received body to the engine within the decode budget: large ones off the I/O workers,
/// one turn at a time.
async fn review(
    app: &AppState,
    received: Received,
    endpoint: Endpoint,
    timeout: Option<Duration>,
    started: Instant,
) -> Result<Vec<u8>, (Refusal, String)> {
    let estimate = received.shape.estimate();
    if estimate > app.budgets.decode_limit() as u64 {
        let refusal = Refusal::TooLargeToDecode {
            estimate,
            objects: received.shape.objects_in_arrays,
            limit: app.budgets.decode_limit(),
        };
        return Err((refusal, uid_of(&received.frames)));
    }
    let heavy = budget::is_heavy(estimate, received.shape.bytes as usize);
    // A large review first waits for its turn (so that queued ones hold no decode budget), up to
    // half of what is left of the API server's timeout.
    let turn = if heavy {
        let left = timeout.map_or(HEAVY_WAIT, |t| t.saturating_sub(started.elapsed()) / 2);
        match app.budgets.heavy(Instant::now() + left).await {
            Ok(turn) => Some(turn),
            Err(_) => return Err((Refusal::HeavyBusy, uid_of(&received.frames))),
        }
    } else {
        None
    };
    let decode = match app
        .budgets
        .decode(estimate, Instant::now() + BUDGET_WAIT)
        .await
    {
        Ok(permit) => permit,
        Err(shortfall) => {
            let refusal = match shortfall {
                Shortfall::Busy | Shortfall::Cut => Refusal::DecodeBusy(app.budgets.decode_total()),
                Shortfall::TooLarge => Refusal::TooLargeToDecode {
                    estimate,
                    objects: received.shape.objects_in_arrays,
                    limit: app.budgets.decode_limit(),
                },
            };
            return Err((refusal, uid_of(&received.frames)));
        }
    };
    // One contiguous copy (counted in the estimate); the frames and their upload budget go.
    let body = received.frames.concat();
    drop(received);
    // What is left of the API server's `?timeout=` after receiving and waiting.
    let remaining = timeout.map(|t| t.saturating_sub(started.elapsed()));
    let Some(turn) = turn else {
        // Boxed: the engine's future is large, and tower/axum move the handler's future by value.
        let answer = Box::pin(endpoint.run(&app.webhook, &body, remaining)).await;
        drop(decode);
        return Ok(answer);
    };
    // A large review decodes and plans on the blocking pool: the I/O workers keep serving the
    // other requests meanwhile (the engine's own waits run there too, on this runtime's handle).
    let webhook = app.webhook.clone();
    let handle = tokio::runtime::Handle::current();
    let work = tokio::task::spawn_blocking(move || {
        let answer = handle.block_on(endpoint.run(&webhook, &body, remaining));
        drop((turn, decode));
        answer
    });
    work.await.map_err(|_| (Refusal::Failed, String::new()))
}

/// Best effort: the uid of a review the engine will not see, so the API server can match the
/// answer (read without keeping anything but the uid).
fn uid_of(frames: &[Bytes]) -> String {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Option<Request>,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        uid: Option<String>,
    }
    let reader = std::io::BufReader::new(FramesReader { frames, offset: 0 });
    serde_json::from_reader::<_, Review>(reader)
        .ok()
        .and_then(|r| r.request?.uid)
        .map(|uid| super::logs::clip(&uid, 128).0.to_owned())
        .unwrap_or_default()
}

/// The received frames read in order, without joining them.
struct FramesReader<'a> {
    frames: &'a [Bytes],
    offset: usize,
}

impl std::io::Read for FramesReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some((first, rest)) = self.frames.split_first() {
            let left = &first[self.offset.min(first.len())..];
            if left.is_empty() {
                self.frames = rest;
                self.offset = 0;
                continue;
            }
            let n = left.len().min(buf.len());
            buf[..n].copy_from_slice(&left[..n]);
            self.offset += n;
            return Ok(n);
        }
        Ok(0)
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
