//! Where an executor's owner driver pod comes from: a Pod GET through the real `kube::Client`
//! (cached briefly, coalesced), or, without a cluster, the driver given to `review --owner`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;

use crate::authz::cache::{FlightError, SingleFlight};
use crate::metrics::Metrics;

/// Why an owner lookup failed (not "not found": that is `Ok(None)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Fetches the owner pod of an executor.
#[async_trait]
pub trait OwnerLookup: Send + Sync {
    /// The pod `namespace/name`, `Ok(None)` if it does not exist. Finishes by `deadline`.
    async fn owner_pod(
        &self,
        namespace: &str,
        name: &str,
        deadline: Instant,
    ) -> Result<Option<Arc<Pod>>, LookupError>;
}

type OwnerOutcome = Result<Option<Arc<Pod>>, LookupError>;

/// Owner lookups through the real `kube::Client` (Pod GET), cached briefly and coalesced: a burst
/// of executors of one driver costs one GET. Found pods are cached for `ttl`; "not found" and
/// errors are not cached (only shared between concurrent callers).
pub struct KubeOwnerLookup {
    client: kube::Client,
    flights: Arc<SingleFlight<(String, String), OwnerOutcome>>,
    metrics: Option<Arc<Metrics>>,
}

/// The `cache` label of owner-pod lookups.
pub const OWNER_CACHE: &str = "owner-pods";

impl KubeOwnerLookup {
    /// Default cache time for found driver pods.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self::build(client, ttl, None)
    }

    /// [`KubeOwnerLookup::new`] that counts its lookups (cache `owner-pods`, hit or miss) and
    /// each Pod GET (backend `kubernetes`, outcome `found`, `not-found` or `error`).
    pub fn counted(client: kube::Client, ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Self::build(client, ttl, Some(metrics))
    }

    fn build(client: kube::Client, ttl: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        let keep_for = move |outcome: &OwnerOutcome| matches!(outcome, Ok(Some(_))).then_some(ttl);
        let flights = match &metrics {
            Some(m) => SingleFlight::counted(10_000, Arc::clone(m), OWNER_CACHE, keep_for),
            None => SingleFlight::new(10_000, keep_for),
        };
        Self {
            client,
            flights,
            metrics,
        }
    }
}

#[async_trait]
impl OwnerLookup for KubeOwnerLookup {
    async fn owner_pod(&self, namespace: &str, name: &str, deadline: Instant) -> OwnerOutcome {
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let pod_name = name.to_string();
        let metrics = self.metrics.clone();
        // The shared GET gets a budget of its own so a caller with a short deadline does not
        // shorten it for the others.
        let start = move || -> BoxFuture<'static, OwnerOutcome> {
            Box::pin(async move {
                let outcome = get_owner(&api, &pod_name).await;
                if let Some(metrics) = metrics {
                    let label = match &outcome {
                        Ok(Some(_)) => "found",
                        Ok(None) => "not-found",
                        Err(_) => "error",
                    };
                    metrics.backend_call("kubernetes", label);
                }
                outcome
            })
        };
        match self
            .flights
            .get((namespace.to_string(), name.to_string()), deadline, start)
            .await
        {
            Ok(outcome) => outcome,
            Err(FlightError::Deadline) => Err(LookupError(
                "no answer from the Kubernetes API before the admission deadline".into(),
            )),
            Err(FlightError::Lost) => Err(LookupError("the lookup was aborted".into())),
        }
    }
}

/// One Pod GET, within 5 s.
async fn get_owner(api: &kube::Api<Pod>, name: &str) -> OwnerOutcome {
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await {
        Ok(Ok(pod)) => Ok(pod.map(Arc::new)),
        Ok(Err(e)) => Err(LookupError(format!("Kubernetes API: {e}"))),
        Err(_) => Err(LookupError(
            "Kubernetes API gave no answer within 5 s".into(),
        )),
    }
}

/// The `review --owner DRIVER.json` stand-in: the one driver pod given on the command line.
#[derive(Debug, Clone, Default)]
pub struct StaticOwner {
    pod: Option<Arc<Pod>>,
}

impl StaticOwner {
    /// `None`: no owner given; executor lookups then fail with a hint to pass `--owner`.
    pub fn new(pod: Option<Pod>) -> Self {
        Self {
            pod: pod.map(Arc::new),
        }
    }
}

#[async_trait]
impl OwnerLookup for StaticOwner {
    async fn owner_pod(&self, namespace: &str, name: &str, _deadline: Instant) -> OwnerOutcome {
        let Some(pod) = &self.pod else {
            return Err(LookupError(
                "no cluster to ask; pass the driver pod as the webhook admitted it with `review --owner DRIVER.json`"
                    .into(),
            ));
        };
        let same_name = pod.metadata.name.as_deref() == Some(name);
        // A pod file without a namespace stands for the executor's namespace.
        let same_ns = pod
            .metadata
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == namespace);
        Ok((same_name && same_ns).then(|| Arc::clone(pod)))
    }
}
