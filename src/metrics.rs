//! Prometheus metrics (prometheus-client). Never a value, never a reference in a label: every label
//! value comes from a small fixed set, and anything else is recorded as `other`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

const WORKLOADS: &[&str] = &[
    "spark-driver",
    "spark-executor",
    "jupyter",
    "opted-in",
    "none",
];
const OUTCOMES: &[&str] = &["allowed", "patched", "denied", "invalid"];
/// The broker's outcomes: `delivered`, or the slug of why not (`broker::BrokerError::slug`).
const BROKER_OUTCOMES: &[&str] = &[
    "delivered",
    "bad-request",
    "unauthenticated",
    "token-refused",
    "other-pod",
    "pod-gone",
    "stamps",
    "not-in-plan",
    "not-granted",
    "forbidden",
    "value",
    "unavailable",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    workload: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    outcome: String,
}

type HistogramFamily = Family<WorkloadLabels, Histogram, fn() -> Histogram>;

/// The webhook's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    admissions: Family<AdmissionLabels, Counter>,
    durations: HistogramFamily,
    patches: Counter,
    denials: Family<ReasonLabels, Counter>,
    cache_requests: Family<CacheLabels, Counter>,
    backend_calls: Family<BackendLabels, Counter>,
    cert_expiry: Gauge<f64, AtomicU64>,
    broker_requests: Family<OutcomeLabels, Counter>,
    broker_durations: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// 0.1 ms .. ~6 s in 13 steps of 2.5x: admission is usually sub-millisecond, Vault reads take longer.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 13))
}

/// `value` if it is one of `allowed`, else `other`.
fn one_of(value: &str, allowed: &[&str]) -> String {
    if allowed.contains(&value) {
        value.to_owned()
    } else {
        "other".to_owned()
    }
}

/// A short lowercase token (`[a-z0-9_-]{1,40}`) as given, anything else as `other`, so that a
/// caller's mistake cannot put a reference or a value into a label.
fn token(value: &str) -> String {
    let ok = !value.is_empty()
        && value.len() <= 40
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        value.to_owned()
    } else {
        "other".to_owned()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "secrets_webhook_admissions",
            "Admission requests answered, by workload and outcome",
            admissions.clone(),
        );
        let durations: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "secrets_webhook_admission_duration_seconds",
            "Time to answer one admission request, by workload",
            durations.clone(),
        );
        let patches = Counter::default();
        registry.register(
            "secrets_webhook_patches",
            "Admission responses that carried a patch",
            patches.clone(),
        );
        let denials = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "secrets_webhook_denials",
            "Denied pods, by reason",
            denials.clone(),
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "secrets_webhook_cache_requests",
            "Cache lookups, by cache and result (hit or miss)",
            cache_requests.clone(),
        );
        let backend_calls = Family::<BackendLabels, Counter>::default();
        registry.register(
            "secrets_webhook_backend_calls",
            "Calls to backends (authorizer, Kubernetes API, Vault), by backend and outcome",
            backend_calls.clone(),
        );
        let cert_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "secrets_webhook_certificate_expiry_seconds",
            "Seconds until the serving certificate expires (negative once expired)",
            cert_expiry.clone(),
        );
        let broker_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "secrets_webhook_broker_requests",
            "Requests of pods fetching their runtime values, by outcome",
            broker_requests.clone(),
        );
        let broker_durations = duration_histogram();
        registry.register(
            "secrets_webhook_broker_duration_seconds",
            "Time to answer one broker request",
            broker_durations.clone(),
        );
        for outcome in BROKER_OUTCOMES {
            let _ = broker_requests.get_or_create(&OutcomeLabels {
                outcome: (*outcome).to_owned(),
            });
        }
        // Known series start at zero, so rates and alerts work before the first event.
        for workload in WORKLOADS {
            let _ = durations.get_or_create(&WorkloadLabels {
                workload: (*workload).to_owned(),
            });
            for outcome in OUTCOMES {
                let _ = admissions.get_or_create(&AdmissionLabels {
                    workload: (*workload).to_owned(),
                    outcome: (*outcome).to_owned(),
                });
            }
        }
        Self {
            registry,
            admissions,
            durations,
            patches,
            denials,
            cache_requests,
            backend_calls,
            cert_expiry,
            broker_requests,
            broker_durations,
        }
    }

    /// One broker request answered: `delivered` or the slug of the refusal.
    pub fn broker(&self, outcome: &str, seconds: f64) {
        self.broker_durations.observe(seconds);
        self.broker_requests
            .get_or_create(&OutcomeLabels {
                outcome: one_of(outcome, BROKER_OUTCOMES),
            })
            .inc();
    }

    /// One admission answered. `workload`: spark-driver|spark-executor|jupyter|opted-in|none;
    /// `outcome`: allowed|patched|denied|invalid.
    pub fn admission(&self, workload: &str, outcome: &str, seconds: f64) {
        let workload = one_of(workload, WORKLOADS);
        let outcome = one_of(outcome, OUTCOMES);
        if outcome == "patched" {
            self.patches.inc();
        }
        self.durations
            .get_or_create(&WorkloadLabels {
                workload: workload.clone(),
            })
            .observe(seconds);
        self.admissions
            .get_or_create(&AdmissionLabels { workload, outcome })
            .inc();
    }

    /// One denial, by a reason from a small fixed set (e.g. `malformed`, `missing-key`, `forbidden`).
    pub fn denial(&self, reason: &str) {
        self.denials
            .get_or_create(&ReasonLabels {
                reason: token(reason),
            })
            .inc();
    }

    /// One cache lookup (`cache`: `authz-decisions`, `owner-pods`, `vault-values`); a lookup that
    /// starts or joins a computation is a miss.
    pub fn cache(&self, cache: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache_requests
            .get_or_create(&CacheLabels {
                cache: token(cache),
                result: result.to_owned(),
            })
            .inc();
    }

    /// One call to a backend: `ras`|`subject-access-review` (`allow`, `deny`, `error`),
    /// `kubernetes` (`found`, `not-found`, `error`), `vault` (`ok`, `not-found`, `error`).
    pub fn backend_call(&self, backend: &str, outcome: &str) {
        self.backend_calls
            .get_or_create(&BackendLabels {
                backend: token(backend),
                outcome: token(outcome),
            })
            .inc();
    }

    /// Seconds left until the serving certificate's notAfter.
    pub fn cert_expiry(&self, seconds_left: f64) {
        self.cert_expiry.set(seconds_left);
    }

    /// Prometheus text exposition (OpenMetrics format).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a metric that fails to encode is left out.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names_labels_and_counts_patches() {
        let m = Metrics::new();
        m.admission("spark-driver", "patched", 0.002);
        m.admission("jupyter", "denied", 0.001);
        m.denial("missing-key");
        m.cache("vault", true);
        m.backend_call("vault", "ok");
        m.cert_expiry(3600.0);
        let text = m.encode();
        for line in [
            "secrets_webhook_admissions_total{workload=\"spark-driver\",outcome=\"patched\"} 1",
            "secrets_webhook_admissions_total{workload=\"jupyter\",outcome=\"denied\"} 1",
            "secrets_webhook_admissions_total{workload=\"none\",outcome=\"allowed\"} 0",
            "secrets_webhook_patches_total 1",
            "secrets_webhook_denials_total{reason=\"missing-key\"} 1",
            "secrets_webhook_cache_requests_total{cache=\"vault\",result=\"hit\"} 1",
            "secrets_webhook_backend_calls_total{backend=\"vault\",outcome=\"ok\"} 1",
            "secrets_webhook_admission_duration_seconds_count{workload=\"spark-driver\"} 1",
            "secrets_webhook_certificate_expiry_seconds 3600.0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn unexpected_label_values_become_other() {
        let m = Metrics::new();
        m.admission("kubernetes:finance/db_password", "weird", 0.0);
        m.denial("Key db_password missing in finance");
        let text = m.encode();
        assert!(
            text.contains("workload=\"other\",outcome=\"other\""),
            "{text}"
        );
        assert!(text.contains("reason=\"other\""), "{text}");
        assert!(!text.contains("db_password"), "{text}");
        assert!(text.contains("secrets_webhook_patches_total 0"), "{text}");
    }
}
