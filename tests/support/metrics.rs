//! Reading series out of the Prometheus text (`Metrics::encode`). A series that is not in the
//! text is a failure, not a zero: a renamed metric or label must not turn `== 0` assertions
//! into tests that cannot fail. Assert absence explicitly with [`absent`].

/// The value of one series, e.g. `secrets_webhook_backend_calls_total{backend="vault",outcome="ok"}`.
/// Panics (listing the series of that metric) when it is not in `text`.
pub fn value(text: &str, series: &str) -> f64 {
    let found = text
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '));
    match found {
        Some(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("series {series} has no number: {v:?}")),
        None => {
            let metric = series.split('{').next().unwrap_or(series);
            let known: Vec<&str> = text.lines().filter(|l| l.starts_with(metric)).collect();
            panic!(
                "series {series} is missing from the metrics; that metric has:\n{}",
                known.join("\n")
            )
        }
    }
}

/// Whether `series` is missing from `text` (a counter never incremented is not exported).
pub fn absent(text: &str, series: &str) -> bool {
    !text.lines().any(|line| {
        line.strip_prefix(series)
            .is_some_and(|r| r.starts_with(' '))
    })
}

/// The value of `series`, or 0 when it is absent — only for "before" readings of counters that
/// may not exist yet; the "after" reading must use [`value`].
pub fn value_or_zero(text: &str, series: &str) -> f64 {
    if absent(text, series) {
        0.0
    } else {
        value(text, series)
    }
}

/// `secrets_webhook_cache_requests_total{cache="CACHE",result="RESULT"}`.
pub fn cache_series(cache: &str, result: &str) -> String {
    format!("secrets_webhook_cache_requests_total{{cache=\"{cache}\",result=\"{result}\"}}")
}

/// `secrets_webhook_backend_calls_total{backend="BACKEND",outcome="OUTCOME"}`.
pub fn backend_series(backend: &str, outcome: &str) -> String {
    format!("secrets_webhook_backend_calls_total{{backend=\"{backend}\",outcome=\"{outcome}\"}}")
}

/// The value of [`cache_series`]; panics when absent.
pub fn cache(text: &str, cache: &str, result: &str) -> f64 {
    value(text, &cache_series(cache, result))
}

/// The value of [`backend_series`]; panics when absent.
pub fn backend(text: &str, backend: &str, outcome: &str) -> f64 {
    value(text, &backend_series(backend, outcome))
}
