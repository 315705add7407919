//! Reading counters out of the Prometheus text (`Metrics::encode`).

/// The value of one series, e.g. `secrets_webhook_backend_calls_total{backend="vault",outcome="ok"}`;
/// 0 when the series is absent (a counter that was never incremented).
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// `secrets_webhook_cache_requests_total{cache="CACHE",result="RESULT"}`.
pub fn cache(text: &str, cache: &str, result: &str) -> f64 {
    value(
        text,
        &format!("secrets_webhook_cache_requests_total{{cache=\"{cache}\",result=\"{result}\"}}"),
    )
}

/// `secrets_webhook_backend_calls_total{backend="BACKEND",outcome="OUTCOME"}`.
pub fn backend(text: &str, backend: &str, outcome: &str) -> f64 {
    value(
        text,
        &format!(
            "secrets_webhook_backend_calls_total{{backend=\"{backend}\",outcome=\"{outcome}\"}}"
        ),
    )
}
