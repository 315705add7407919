//! Short-lived caching and request coalescing for authorization decisions (and, through
//! [`SingleFlight`], for the owner-pod lookups of executors).
//!
//! - Allow and Deny are cached for a short TTL (default 10 s) per (identity, resource).
//! - Identical concurrent checks are coalesced: one call to the inner authorizer, every caller gets
//!   its answer. The call runs in its own task, so a caller that gives up does not cancel it for the
//!   others, and its result still lands in the cache.
//! - Each inner call has a time budget; each caller waits no longer than its own admission deadline.
//! - Errors and timeouts are never cached: they become a fail-closed denial for the callers that
//!   shared that one call, and the next check asks again.
//! - When given [`Metrics`], every lookup counts as a cache `hit` (a cached result served) or
//!   `miss` (a computation started or joined), and every inner call as a backend call.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Authorizer, AuthzError, CheckUse, Decision, Identity, Permission, Resource};
use crate::metrics::Metrics;

/// Why [`SingleFlight::get`] has no value for a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlightError {
    /// The caller's deadline passed before the shared call finished.
    Deadline,
    /// The shared call ended without a result (its task panicked or the runtime shut down).
    Lost,
}

/// Decides per result how long it stays cached (`None`: not at all).
type KeepFor<V> = Box<dyn Fn(&V) -> Option<Duration> + Send + Sync>;

struct Flights<K, V> {
    done: HashMap<K, (Instant, V)>,
    running: HashMap<K, watch::Receiver<Option<V>>>,
}

/// A TTL cache in which concurrent requests for the same key share one computation.
pub struct SingleFlight<K, V> {
    /// How long a result stays cached; `None` keeps it out of the cache.
    keep_for: KeepFor<V>,
    max_entries: usize,
    flights: Mutex<Flights<K, V>>,
    /// Where lookups are counted, under which `cache` label.
    counted: Option<(Arc<Metrics>, &'static str)>,
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `keep_for` decides per result how long it is cached (`None`: not at all).
    pub fn new(
        max_entries: usize,
        keep_for: impl Fn(&V) -> Option<Duration> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::build(max_entries, None, keep_for)
    }

    /// [`SingleFlight::new`] that counts each lookup in `secrets_webhook_cache_requests_total`
    /// with label `cache`: `hit` when a cached result is served, `miss` when a computation is
    /// started or joined.
    pub fn counted(
        max_entries: usize,
        metrics: Arc<Metrics>,
        cache: &'static str,
        keep_for: impl Fn(&V) -> Option<Duration> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::build(max_entries, Some((metrics, cache)), keep_for)
    }

    fn build(
        max_entries: usize,
        counted: Option<(Arc<Metrics>, &'static str)>,
        keep_for: impl Fn(&V) -> Option<Duration> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            keep_for: Box::new(keep_for),
            max_entries,
            flights: Mutex::new(Flights {
                done: HashMap::new(),
                running: HashMap::new(),
            }),
            counted,
        })
    }

    fn count(&self, hit: bool) {
        if let Some((metrics, cache)) = &self.counted {
            metrics.cache(cache, hit);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Flights<K, V>> {
        // The map stays consistent under every operation, so a poisoned lock is still usable.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached value for `key`, or the result of the running computation for it, or of a new
    /// one started with `start` (in its own task). Waits until `deadline` at most.
    pub async fn get(
        self: &Arc<Self>,
        key: K,
        deadline: Instant,
        start: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> Result<V, FlightError> {
        let mut rx = {
            let mut flights = self.lock();
            let now = Instant::now();
            match flights.done.get(&key) {
                Some((expires, value)) if *expires > now => {
                    self.count(true);
                    return Ok(value.clone());
                }
                Some(_) => {
                    flights.done.remove(&key);
                }
                None => {}
            }
            self.count(false);
            match flights.running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.running.insert(key.clone(), rx.clone());
                    let guard = Finish {
                        flights: Arc::clone(self),
                        key: Some(key),
                    };
                    let work = start();
                    tokio::spawn(async move {
                        let value = work.await;
                        guard.complete(&value);
                        // Nobody waiting any more is fine: the value is cached already.
                        let _ = tx.send(Some(value));
                    });
                    rx
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone().ok_or(FlightError::Lost),
            Ok(Err(_)) => Err(FlightError::Lost),
            Err(_) => Err(FlightError::Deadline),
        }
    }

    /// Entries currently cached (expired ones included until swept); for tests and metrics.
    pub fn cached_len(&self) -> usize {
        self.lock().done.len()
    }
}

/// Ends a flight: caches its result (when `keep_for` says so) and retires the running entry in one
/// step, so no caller can start a duplicate in between. On drop without a result (panic), it only
/// retires the running entry.
struct Finish<K, V>
where
    K: Eq + Hash,
{
    flights: Arc<SingleFlight<K, V>>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone, V: Clone> Finish<K, V> {
    fn complete(mut self, value: &V) {
        let Some(key) = self.key.take() else { return };
        let keep = (self.flights.keep_for)(value);
        let mut flights = self
            .flights
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        flights.running.remove(&key);
        if let Some(ttl) = keep {
            let now = Instant::now();
            if flights.done.len() >= self.flights.max_entries {
                flights.done.retain(|_, (expires, _)| *expires > now);
                if flights.done.len() >= self.flights.max_entries {
                    flights.done.clear();
                }
            }
            flights.done.insert(key, (now + ttl, value.clone()));
        }
    }
}

impl<K: Eq + Hash, V> Drop for Finish<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut flights = self
                .flights
                .flights
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            flights.running.remove(&key);
        }
    }
}

/// Tuning of [`CachedAuthorizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long an Allow or a Deny is reused.
    pub ttl: Duration,
    /// Longest time one call to the inner authorizer may take before it counts as unreachable.
    pub check_budget: Duration,
    /// Cached decisions kept at most (expired ones are swept first, then all are dropped).
    pub max_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            check_budget: Duration::from_secs(2),
            max_entries: 10_000,
        }
    }
}

type Outcome = Result<Decision, AuthzError>;

/// An [`Authorizer`] that caches, coalesces and time-bounds the checks of an inner [`CheckUse`].
pub struct CachedAuthorizer<A> {
    inner: Arc<A>,
    settings: CacheSettings,
    /// Keyed by the identity's digest: a cached decision holds 32 bytes of it, not its groups.
    flights: Arc<SingleFlight<(IdentityDigest, Permission, Resource), Outcome>>,
    /// Where inner calls are counted, under which `backend` label.
    counted: Option<(Arc<Metrics>, &'static str)>,
}

/// SHA-256 over an [`Identity`]'s fields as `Hash` feeds them (strings end with 0xff, which UTF-8
/// never holds, and lists start with their length): equal digests mean equal identities. Decisions
/// are cached under it so that an identity with thousands of groups, checked on up to 64
/// resources and cached for thousands of requests, is not kept once per decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityDigest([u8; 32]);

impl IdentityDigest {
    pub fn of(identity: &Identity) -> Self {
        struct Feed(sha2::Sha256);
        impl std::hash::Hasher for Feed {
            fn write(&mut self, bytes: &[u8]) {
                sha2::Digest::update(&mut self.0, bytes);
            }
            fn finish(&self) -> u64 {
                0
            }
        }
        let mut feed = Feed(<sha2::Sha256 as sha2::Digest>::new());
        std::hash::Hash::hash(identity, &mut feed);
        Self(sha2::Digest::finalize(feed.0).into())
    }
}

/// The `cache` label of authorization decisions.
pub const DECISION_CACHE: &str = "authz-decisions";

impl<A: CheckUse + 'static> CachedAuthorizer<A> {
    pub fn new(inner: A, settings: CacheSettings) -> Self {
        Self::build(inner, settings, None)
    }

    /// [`CachedAuthorizer::new`] that counts its lookups (cache `authz-decisions`, hit or miss)
    /// and each call of `inner` (`backend`, outcome `allow`, `deny` or `error`).
    pub fn counted(
        inner: A,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
        backend: &'static str,
    ) -> Self {
        Self::build(inner, settings, Some((metrics, backend)))
    }

    fn build(
        inner: A,
        settings: CacheSettings,
        counted: Option<(Arc<Metrics>, &'static str)>,
    ) -> Self {
        let ttl = settings.ttl;
        let keep_for = move |outcome: &Outcome| outcome.is_ok().then_some(ttl);
        let flights = match &counted {
            Some((metrics, _)) => SingleFlight::counted(
                settings.max_entries,
                Arc::clone(metrics),
                DECISION_CACHE,
                keep_for,
            ),
            None => SingleFlight::new(settings.max_entries, keep_for),
        };
        Self {
            inner: Arc::new(inner),
            settings,
            flights,
            counted,
        }
    }

    /// The wrapped authorizer.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

#[async_trait]
impl<A: CheckUse + 'static> Authorizer for CachedAuthorizer<A> {
    fn ready(&self) -> bool {
        self.inner.ready()
    }

    async fn check_use(&self, who: &Identity, what: &Resource, deadline: Instant) -> Decision {
        self.decide(who, Permission::Use, what, deadline).await
    }

    async fn decide(
        &self,
        who: &Identity,
        permission: Permission,
        what: &Resource,
        deadline: Instant,
    ) -> Decision {
        let inner = Arc::clone(&self.inner);
        let budget = self.settings.check_budget;
        let counted = self.counted.clone();
        // The identity is copied into a check only when one starts (a miss nobody is running).
        let start = move || -> BoxFuture<'static, Outcome> {
            let (who, what) = (who.clone(), what.clone());
            Box::pin(async move {
                let checked = inner.check_permission(&who, permission, &what);
                let outcome = match tokio::time::timeout(budget, checked).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(AuthzError::Unreachable(format!(
                        "no answer within {} ms",
                        budget.as_millis()
                    ))),
                };
                if let Some((metrics, backend)) = counted {
                    let label = match &outcome {
                        Ok(Decision::Allow) => "allow",
                        Ok(Decision::Deny(_)) => "deny",
                        Err(_) => "error",
                    };
                    metrics.backend_call(backend, label);
                }
                outcome
            })
        };
        let outcome = self
            .flights
            .get(
                (IdentityDigest::of(who), permission, what.clone()),
                deadline,
                start,
            )
            .await;
        match outcome {
            Ok(Ok(decision)) => decision,
            Ok(Err(e)) => e.into_decision(),
            Err(FlightError::Deadline) => AuthzError::Unreachable(format!(
                "no decision on {permission} of {what} for {who} before the admission deadline"
            ))
            .into_decision(),
            Err(FlightError::Lost) => {
                AuthzError::Unreachable("the authorization check was aborted".into())
                    .into_decision()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts calls; answers after `delay`: Allow for alice, Deny otherwise, error for "down".
    struct Counting {
        calls: AtomicUsize,
        delay: Duration,
    }

    #[async_trait]
    impl CheckUse for Counting {
        async fn check(&self, who: &Identity, _what: &Resource) -> Outcome {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            match who.username.as_str() {
                "alice" => Ok(Decision::Allow),
                "down" => Err(AuthzError::Unreachable("connection refused".into())),
                _ => Ok(Decision::Deny(format!("{who} lacks Use"))),
            }
        }
    }

    fn cached(delay: Duration, settings: CacheSettings) -> Arc<CachedAuthorizer<Counting>> {
        Arc::new(CachedAuthorizer::new(
            Counting {
                calls: AtomicUsize::new(0),
                delay,
            },
            settings,
        ))
    }

    fn domain() -> Resource {
        Resource::Domain("finance".into())
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// The digest tells apart identities whose fields would run together if simply concatenated.
    #[test]
    fn identity_digests_are_equal_exactly_for_equal_identities() {
        let id = |user: &str, groups: &[&str]| {
            Identity::new(user, groups.iter().map(|g| (*g).to_owned()))
        };
        let digest = |i: &Identity| IdentityDigest::of(i);
        assert_eq!(digest(&id("a", &["b", "c"])), digest(&id("a", &["c", "b"])));
        let different = [
            id("a", &["bc"]),
            id("a", &["b", "c"]),
            id("ab", &["c"]),
            id("abc", &[]),
            Identity {
                uid: Some(String::new()),
                ..id("abc", &[])
            },
            Identity {
                extra: [("k".to_owned(), vec!["v".to_owned()])].into(),
                ..id("abc", &[])
            },
            Identity {
                extra: [("k".to_owned(), vec![]), ("v".to_owned(), vec![])].into(),
                ..id("abc", &[])
            },
        ];
        for (i, a) in different.iter().enumerate() {
            for b in &different[i + 1..] {
                assert_ne!(digest(a), digest(b), "{a:?} and {b:?}");
            }
        }
    }

    #[tokio::test]
    async fn two_hundred_concurrent_identical_checks_make_one_call() {
        let authz = cached(Duration::from_millis(50), CacheSettings::default());
        let alice = Identity::new("alice", vec!["data-eng".to_string()]);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let authz = Arc::clone(&authz);
                let alice = alice.clone();
                tokio::spawn(async move { authz.check_use(&alice, &domain(), soon()).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Decision::Allow);
        }
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn counts_hits_misses_and_inner_calls() {
        let metrics = Arc::new(Metrics::new());
        let authz = CachedAuthorizer::counted(
            Counting {
                calls: AtomicUsize::new(0),
                delay: Duration::ZERO,
            },
            CacheSettings::default(),
            Arc::clone(&metrics),
            "ras",
        );
        let alice = Identity::new("alice", Vec::new());
        let bob = Identity::new("bob", Vec::new());
        let down = Identity::new("down", Vec::new());
        for who in [&alice, &alice, &alice, &bob, &down, &down] {
            authz.check_use(who, &domain(), soon()).await;
        }
        let text = metrics.encode();
        for line in [
            "secrets_webhook_cache_requests_total{cache=\"authz-decisions\",result=\"hit\"} 2",
            "secrets_webhook_cache_requests_total{cache=\"authz-decisions\",result=\"miss\"} 4",
            "secrets_webhook_backend_calls_total{backend=\"ras\",outcome=\"allow\"} 1",
            "secrets_webhook_backend_calls_total{backend=\"ras\",outcome=\"deny\"} 1",
            "secrets_webhook_backend_calls_total{backend=\"ras\",outcome=\"error\"} 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn denials_are_cached_too_and_expire_after_the_ttl() {
        let settings = CacheSettings {
            ttl: Duration::from_millis(100),
            ..CacheSettings::default()
        };
        let authz = cached(Duration::ZERO, settings);
        let bob = Identity::new("bob", Vec::new());
        for _ in 0..3 {
            assert!(matches!(
                authz.check_use(&bob, &domain(), soon()).await,
                Decision::Deny(_)
            ));
        }
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        authz.check_use(&bob, &domain(), soon()).await;
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn different_identities_and_resources_are_checked_separately() {
        let authz = cached(Duration::ZERO, CacheSettings::default());
        let alice = Identity::new("alice", Vec::new());
        let alice_eng = Identity::new("alice", vec!["eng".to_string()]);
        authz.check_use(&alice, &domain(), soon()).await;
        authz.check_use(&alice_eng, &domain(), soon()).await;
        authz
            .check_use(&alice, &Resource::Domain("hr".into()), soon())
            .await;
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn errors_fail_closed_and_are_not_cached() {
        let authz = cached(Duration::ZERO, CacheSettings::default());
        let down = Identity::new("down", Vec::new());
        let d = authz.check_use(&down, &domain(), soon()).await;
        assert_eq!(
            d,
            Decision::Deny("authorizer unreachable: connection refused (failing closed)".into())
        );
        authz.check_use(&down, &domain(), soon()).await;
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_slow_authorizer_hits_the_budget_and_denies() {
        let settings = CacheSettings {
            check_budget: Duration::from_millis(50),
            ..CacheSettings::default()
        };
        let authz = cached(Duration::from_secs(10), settings);
        let alice = Identity::new("alice", Vec::new());
        let started = Instant::now();
        let d = authz.check_use(&alice, &domain(), soon()).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            d,
            Decision::Deny(
                "authorizer unreachable: no answer within 50 ms (failing closed)".into()
            )
        );
    }

    #[tokio::test]
    async fn the_callers_deadline_bounds_its_wait() {
        let authz = cached(Duration::from_millis(500), CacheSettings::default());
        let alice = Identity::new("alice", Vec::new());
        let d = authz
            .check_use(
                &alice,
                &domain(),
                Instant::now() + Duration::from_millis(30),
            )
            .await;
        let Decision::Deny(text) = d else {
            panic!("must deny")
        };
        assert!(text.contains("before the admission deadline"), "{text}");
        // The call went on in its task; its Allow is cached for the next caller.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            authz.check_use(&alice, &domain(), soon()).await,
            Decision::Allow
        );
        assert_eq!(authz.inner().calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn ready_follows_the_inner_authorizer() {
        struct Unloaded;
        #[async_trait]
        impl CheckUse for Unloaded {
            async fn check(&self, _: &Identity, _: &Resource) -> Outcome {
                Err(AuthzError::Unreachable("not loaded".into()))
            }
            fn ready(&self) -> bool {
                false
            }
        }
        let loaded = cached(Duration::ZERO, CacheSettings::default());
        assert!(Authorizer::ready(&*loaded));
        let unloaded = CachedAuthorizer::new(Unloaded, CacheSettings::default());
        assert!(!Authorizer::ready(&unloaded));
    }

    /// A full cache first drops what has expired; if that frees no room, it starts over. Live
    /// entries stay served either way until then.
    #[tokio::test]
    async fn a_full_cache_drops_expired_entries_first_then_everything() {
        let keep_for = |v: &&'static str| match *v {
            "short" => Some(Duration::from_millis(20)),
            _ => Some(Duration::from_secs(60)),
        };
        let flights: Arc<SingleFlight<&'static str, &'static str>> = SingleFlight::new(2, keep_for);
        let computed = Arc::new(AtomicUsize::new(0));
        let get = |key: &'static str, value: &'static str| {
            let (flights, computed) = (Arc::clone(&flights), Arc::clone(&computed));
            async move {
                let start = move || -> BoxFuture<'static, &'static str> {
                    computed.fetch_add(1, Ordering::SeqCst);
                    Box::pin(async move { value })
                };
                flights.get(key, soon(), start).await
            }
        };
        assert_eq!(get("a", "short").await, Ok("short"));
        assert_eq!(get("b", "long").await, Ok("long"));
        assert_eq!(flights.cached_len(), 2);
        // Both live: served from the cache.
        assert_eq!(get("b", "other").await, Ok("long"));
        assert_eq!(computed.load(Ordering::SeqCst), 2);
        // "a" expires; a third key makes room by dropping it, and "b" stays cached.
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(get("c", "long").await, Ok("long"));
        assert_eq!(flights.cached_len(), 2);
        assert_eq!(get("b", "other").await, Ok("long"));
        assert_eq!(computed.load(Ordering::SeqCst), 3);
        // Nothing expired and no room: everything goes, the new entry stays.
        assert_eq!(get("d", "long").await, Ok("long"));
        assert_eq!(flights.cached_len(), 1);
        assert_eq!(get("b", "recomputed").await, Ok("recomputed"));
    }

    /// A computation that dies (its task panics) gives its callers `Lost`, and the next caller
    /// starts a new one instead of waiting on the dead one.
    #[tokio::test]
    async fn a_lost_computation_is_retired_for_the_next_caller() {
        let flights: Arc<SingleFlight<&'static str, u32>> =
            SingleFlight::new(10, |_| Some(Duration::from_secs(60)));
        let dies = || -> BoxFuture<'static, u32> { Box::pin(async { panic!("the check died") }) };
        assert_eq!(flights.get("k", soon(), dies).await, Err(FlightError::Lost));
        assert_eq!(flights.cached_len(), 0);
        let works = || -> BoxFuture<'static, u32> { Box::pin(async { 7 }) };
        assert_eq!(flights.get("k", soon(), works).await, Ok(7));
    }
}
