//! The admission engine: AdmissionReview in, AdmissionReview out. It gathers every fact the pod
//! needs (references, workload, identity, store keys, Vault deliveries, grants), then hands them to
//! the pure planner, and turns the plan or the denial into a response.

pub mod guard;
pub mod identity;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionResponse, AdmissionReview};

use crate::authz::Authorizer;
use crate::backends::{StoreIndex, VaultSource};
use crate::config::{LocalConfig, Settings};
use crate::metrics::Metrics;

/// Everything the engine consults, shared by all requests.
pub struct Webhook {
    pub settings: Settings,
    pub stores: Arc<dyn StoreIndex>,
    pub vault: Option<Arc<dyn VaultSource>>,
    pub authz: Arc<dyn Authorizer>,
    pub metrics: Arc<Metrics>,
}

/// Why the engine could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(String),
}

impl Webhook {
    /// The embedded default: stores, Vault configs, bundles and trusted controllers from the local
    /// config file, no cluster.
    pub fn from_local(
        settings: Settings,
        config: &LocalConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let _ = (settings, config, metrics);
        Err(BuildError::Config("not implemented yet".into()))
    }

    /// In a cluster: watch caches through `client` (spawned on the current runtime).
    pub async fn from_cluster(
        settings: Settings,
        client: kube::Client,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let _ = (settings, client, metrics);
        Err(BuildError::Config("not implemented yet".into()))
    }

    /// Ready to admit: the store cache has its first listing.
    pub fn ready(&self) -> bool {
        self.stores.ready()
    }

    /// Answers one HTTP request body. Always an `admission.k8s.io/v1` AdmissionReview, whatever the
    /// input; `timeout` is the API server's `?timeout=`.
    pub async fn review_bytes(&self, body: &[u8], timeout: Option<Duration>) -> Vec<u8> {
        let _deadline = Instant::now() + timeout.unwrap_or(self.settings.default_budget);
        let response = match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body) {
            Ok(review) => match review.request {
                Some(req) => AdmissionResponse::from(&req),
                None => AdmissionResponse::invalid("AdmissionReview has no request"),
            },
            Err(e) => AdmissionResponse::invalid(format!("unreadable AdmissionReview: {e}")),
        };
        serde_json::to_vec(&response.into_review()).unwrap_or_default()
    }
}
