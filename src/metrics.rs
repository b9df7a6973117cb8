//! Prometheus metrics and the admin endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub module_pulls: Family<ResultLabels, Counter>,
    pub module_pull_duration: Histogram,
    pub module_pull_bytes: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub api_requests: Family<VerbLabels, Counter>,
    /// Pre-flight runs of a module with a configuration, by result (passed, failed).
    pub preflight_runs: Family<ResultLabels, Counter>,
    /// Rollout events (`spec.rollout`), by result: started, step, completed, rolled_back.
    pub rollouts: Family<ResultLabels, Counter>,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// The WasmFilters waiting for a reconcile; `queue_depth` is read from it when scraped.
    pub queue: ReconcileQueue,
    queue_depth: Gauge,
    ready: AtomicBool,
}

/// The WasmFilters waiting for a reconcile, by `namespace/name`. kube-runtime's scheduler keeps
/// its queue to itself, so the controller tells this what it asks of the scheduler (reconcile
/// a filter now, or again after a delay) and when a reconcile starts: a filter waits from the
/// moment it is due until its reconcile starts. A filter asked for twice waits once, from the
/// earlier time, as in the scheduler. Bounded by the filters that exist: starting a reconcile,
/// a deletion and every full list take entries out.
#[derive(Default)]
pub struct ReconcileQueue {
    due: Mutex<HashMap<String, Instant>>,
}

impl ReconcileQueue {
    /// `key` is to be reconciled now.
    pub fn request(&self, key: String) {
        self.due_at(key, Instant::now());
    }

    /// `key` is to be reconciled after `delay`, unless something asks for it sooner.
    pub fn requeue(&self, key: String, delay: Duration) {
        self.due_at(key, Instant::now() + delay);
    }

    fn due_at(&self, key: String, at: Instant) {
        self.lock()
            .entry(key)
            .and_modify(|due| *due = (*due).min(at))
            .or_insert(at);
    }

    /// A reconcile of `key` started (or the controller found the filter gone).
    pub fn started(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Keeps only the filters `exists` says are still there.
    pub fn retain(&self, exists: impl Fn(&str) -> bool) {
        self.lock().retain(|key, _| exists(key));
    }

    /// How many filters are due at `now` and not yet started.
    pub fn depth(&self, now: Instant) -> usize {
        self.lock().values().filter(|due| **due <= now).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wasmfilter");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let module_pulls = Family::<ResultLabels, Counter>::default();
        let module_pull_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconciles",
            "Reconciliations of WasmFilters, by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconciliation",
            reconcile_duration.clone(),
        );
        registry.register(
            "module_pulls",
            "Module resolutions, by result (pulled, error)",
            module_pulls.clone(),
        );
        registry.register(
            "module_pull_duration_seconds",
            "Duration of resolving and fetching a module",
            module_pull_duration.clone(),
        );
        let module_pull_bytes = Counter::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let cache_evictions = Counter::default();
        let cache_bytes = Gauge::default();
        registry.register(
            "module_pull_bytes",
            "Bytes downloaded from registries for modules",
            module_pull_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Reconciles and proxy requests served from the module cache without a download",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Module fetches that had to download from a registry",
            cache_misses.clone(),
        );
        registry.register(
            "cache_evictions",
            "Unused modules removed from the cache to stay under its size bound",
            cache_evictions.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held in the module cache after the last eviction pass",
            cache_bytes.clone(),
        );
        let api_requests = Family::<VerbLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API server, by verb (get, list, watch, create, patch, update, delete)",
            api_requests.clone(),
        );
        let preflight_runs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "preflight_runs",
            "Pre-flight runs of a module with a filter's configuration in the sandbox, by result (passed, failed)",
            preflight_runs.clone(),
        );
        let rollouts = Family::<ResultLabels, Counter>::default();
        registry.register(
            "rollouts",
            "Stepped rollouts (spec.rollout), by event: started, step (a step began), completed, rolled_back",
            rollouts.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads (holds the Lease, or runs without leader election): only the leader reconciles and writes",
            leader.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "reconcile_queue_depth",
            "WasmFilters due for a reconcile that has not started yet (changed, or a retry or resync whose time came)",
            queue_depth.clone(),
        );
        Metrics {
            queue: ReconcileQueue::default(),
            queue_depth,
            preflight_runs,
            rollouts,
            leader,
            api_requests,
            registry,
            module_pull_bytes,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_bytes,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            module_pulls,
            module_pull_duration,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts one request to the API server, by its verb as the API server names it.
    pub fn api_request(&self, method: &axum::http::Method, uri: &axum::http::Uri) {
        let query = uri.query().unwrap_or("");
        let verb = match *method {
            axum::http::Method::GET
                if query
                    .split('&')
                    .any(|p| p == "watch=true" || p == "watch=1") =>
            {
                "watch"
            }
            // A collection path ends in a resource name with no object name after it; the
            // API server's own split: an odd number of segments after the group/version.
            axum::http::Method::GET if is_collection(uri.path()) => "list",
            axum::http::Method::GET => "get",
            axum::http::Method::POST => "create",
            axum::http::Method::PATCH => "patch",
            axum::http::Method::PUT => "update",
            axum::http::Method::DELETE => "delete",
            _ => "other",
        };
        self.api_requests
            .get_or_create(&VerbLabels { verb: verb.into() })
            .inc();
    }

    pub fn reconciled(&self, result: Result<(), &str>, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
        match result {
            Ok(()) => {
                self.reconciles
                    .get_or_create(&ResultLabels {
                        result: "ok".into(),
                    })
                    .inc();
            }
            Err(reason) => {
                self.reconciles
                    .get_or_create(&ResultLabels {
                        result: "error".into(),
                    })
                    .inc();
                self.reconcile_errors
                    .get_or_create(&ReasonLabels {
                        reason: reason.into(),
                    })
                    .inc();
            }
        }
    }

    /// A resolve-and-fetch finished: `Ok(bytes downloaded)` or an error reason.
    pub fn pulled<E>(&self, result: Result<u64, E>, took: Duration) {
        self.module_pull_duration.observe(took.as_secs_f64());
        let label = match result {
            Ok(0) => {
                self.cache_hits.inc();
                "pulled"
            }
            Ok(bytes) => {
                self.cache_misses.inc();
                self.module_pull_bytes.inc_by(bytes);
                "pulled"
            }
            Err(_) => "error",
        };
        self.module_pulls
            .get_or_create(&ResultLabels {
                result: label.into(),
            })
            .inc();
    }

    /// A pre-flight run ended (not one remembered from before).
    pub fn preflight_ran(&self, passed: bool) {
        let result = if passed { "passed" } else { "failed" };
        self.preflight_runs
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// A rollout started, stepped, completed or was rolled back.
    pub fn rollout(&self, event: &str) {
        self.rollouts
            .get_or_create(&ResultLabels {
                result: event.into(),
            })
            .inc();
    }

    /// A reconcile used the cached module without asking the registry.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub fn evicted(&self, modules: u64, remaining_bytes: u64) {
        self.cache_evictions.inc_by(modules);
        self.cache_bytes
            .set(i64::try_from(remaining_bytes).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Marks the operator ready: its watches have synced (a follower: its cache is verified
    /// and served).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn encode(&self) -> String {
        let depth = self.queue.depth(Instant::now());
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `/metrics`, `/healthz` (alive) and `/readyz` (watches synced).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(serve_metrics))
        .with_state(metrics)
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "watches not synced yet\n")
    }
}

async fn serve_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Whether an API path names a collection (`/api/v1/pods`, `/apis/g/v/namespaces/ns/kind`)
/// rather than one object or a subresource.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Skip `api/v1` or `apis/group/v1`, then `namespaces/<ns>` when namespaced.
    let rest = match parts.as_slice() {
        ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] => rest,
        _ => return false,
    };
    let rest = match rest {
        ["namespaces", _, more @ ..] if !more.is_empty() => more,
        other => other,
    };
    rest.len() == 1
}

#[cfg(test)]
mod verb_tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_the_verb_the_api_server_sees() {
        let m = Metrics::default();
        let count = |method: axum::http::Method, uri: &str| {
            m.api_request(&method, &uri.parse().unwrap());
        };
        count(
            axum::http::Method::GET,
            "/api/v1/namespaces/a/pods?labelSelector=x",
        );
        count(axum::http::Method::GET, "/api/v1/pods");
        count(axum::http::Method::GET, "/api/v1/namespaces/a/pods/p");
        count(
            axum::http::Method::GET,
            "/apis/wasmfilter.dev/v1alpha1/wasmfilters?watch=true&rv=1",
        );
        count(axum::http::Method::GET, "/api/v1/namespaces");
        count(axum::http::Method::GET, "/api/v1/namespaces/a");
        count(
            axum::http::Method::PATCH,
            "/apis/wasmfilter.dev/v1alpha1/namespaces/a/wasmfilters/f/status",
        );
        let text = m.encode();
        for (verb, n) in [("list", 3), ("get", 2), ("watch", 1), ("patch", 1)] {
            let line = format!("wasmfilter_api_requests_total{{verb=\"{verb}\"}} {n}");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn a_filter_waits_from_when_it_is_due_until_its_reconcile_starts() {
        let q = ReconcileQueue::default();
        let now = Instant::now();
        q.request("a/one".into());
        q.request("a/one".into()); // asked for twice: waits once
        q.requeue("a/two".into(), Duration::from_secs(60));
        assert_eq!(q.depth(Instant::now()), 1);
        // A retry waits once its time came.
        assert_eq!(q.depth(now + Duration::from_secs(61)), 2);
        // Asked for sooner than its retry: due now.
        q.request("a/two".into());
        assert_eq!(q.depth(Instant::now()), 2);
        // A later retry does not push back what is already due.
        q.requeue("a/one".into(), Duration::from_secs(60));
        assert_eq!(q.depth(Instant::now()), 2);
        q.started("a/one");
        assert_eq!(q.depth(Instant::now()), 1);
        q.retain(|key| key != "a/two");
        assert_eq!(q.depth(now + Duration::from_secs(3600)), 0);
    }

    #[test]
    fn the_depth_is_exported_as_it_is_when_scraped() {
        let m = Metrics::default();
        m.queue.request("a/one".into());
        m.queue.request("b/two".into());
        assert!(
            m.encode().contains("wasmfilter_reconcile_queue_depth 2\n"),
            "{}",
            m.encode()
        );
        m.queue.started("a/one");
        assert!(m.encode().contains("wasmfilter_reconcile_queue_depth 1\n"));
    }
}
