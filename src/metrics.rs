//! Prometheus metrics (prometheus-client). Never a value, never a reference in a label.

/// The webhook's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Self {
        Self {}
    }

    /// One admission answered. `workload`: spark-driver|spark-executor|jupyter|opted-in|none;
    /// `outcome`: allowed|patched|denied|invalid.
    pub fn admission(&self, _workload: &str, _outcome: &str, _seconds: f64) {}

    /// One denial, by a reason from a small fixed set (e.g. `malformed`, `missing-key`, `forbidden`).
    pub fn denial(&self, _reason: &str) {}

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        String::new()
    }
}
