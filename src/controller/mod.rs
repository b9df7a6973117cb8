//! The reconcile loop: resolve (client) → inspect (pure) → render (pure) → apply (client) →
//! status. A failure anywhere before apply leaves existing children exactly as they were.

mod decode;
pub mod status;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::abi::ModuleInfo;
use crate::api::{OnIncompatible, PullPolicy, Target, WasmFilter, WorkloadStatus};
use crate::cache::{FetchFailure, ModuleCache, OnDemand};
use crate::error::{Backoff, Error};
use crate::metrics::Metrics;
use crate::names;
use crate::oci::{Artifact, Credentials, Resolver};
use crate::render::{self, Module, ModuleServer, ecds};
use crate::workloads::index::{self, PodIndex};
use crate::xds::{Offer, Xds};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// Where proxies fetch modules from.
    pub module_server: ModuleServer,
    /// How often a `pullPolicy: Always` filter re-resolves its tag.
    pub resync: Duration,
    pub backoff: Backoff,
    /// This replica's name, for Events.
    pub instance: Option<String>,
    /// Bound on the module cache's size; modules in use are kept even beyond it.
    pub cache_max_bytes: Option<u64>,
}

/// Modules written or used this recently are never evicted: one may be on its way into a
/// status that does not reference it yet.
const EVICTION_GRACE: Duration = Duration::from_secs(600);

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub resolver: Resolver,
    pub cache: ModuleCache,
    pub settings: Settings,
    failures: Mutex<HashMap<ObjectRef<WasmFilter>, u32>>,
    /// The controller's view of all WasmFilters, once it runs.
    store: OnceLock<Store<WasmFilter>>,
    /// One on-demand fetch per module at a time.
    inflight: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What inspecting each deployed module found, by sha256.
    inspected: Mutex<HashMap<String, Arc<ModuleInfo>>>,
    /// Wakes the eviction task after a pull.
    evict_soon: tokio::sync::Notify,
    /// The ECDS server's state, when the operator serves plain Envoys (`--xds-listen`).
    pub xds: Option<Arc<Xds>>,
    /// Every pod in scope, from one watch.
    pub pods: Arc<PodIndex>,
    /// Reconciles running now (shutdown waits for them).
    reconciling: AtomicUsize,
    /// Set on shutdown: no new reconcile starts.
    stopping: std::sync::atomic::AtomicBool,
    /// The last status this process wrote, by object uid: only the operator writes status, so
    /// it is the truth even before the watch delivers it (a reconcile the child's creation
    /// triggers often runs first, and would resolve the tag again and flap the status).
    written: Mutex<HashMap<String, crate::api::WasmFilterStatus>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        resolver: Resolver,
        cache: ModuleCache,
        settings: Settings,
        xds: Option<Arc<Xds>>,
    ) -> Self {
        let reporter = Reporter {
            controller: names::CONTROLLER_NAME.to_string(),
            instance: settings.instance.clone(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            resolver,
            cache,
            settings,
            failures: Mutex::new(HashMap::new()),
            store: OnceLock::new(),
            inflight: tokio::sync::Mutex::new(HashMap::new()),
            inspected: Mutex::new(HashMap::new()),
            evict_soon: tokio::sync::Notify::new(),
            xds,
            pods: Arc::default(),
            reconciling: AtomicUsize::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Starts no new reconcile from now on; those in flight run to their end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// `wf` with the last status this process wrote for it, when the store has not caught up.
    fn with_written_status(&self, wf: &Arc<WasmFilter>) -> Arc<WasmFilter> {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match wf.uid().and_then(|uid| written.get(&uid)) {
            Some(status) if wf.status.as_ref() != Some(status) => {
                let mut newer = (**wf).clone();
                newer.status = Some(status.clone());
                Arc::new(newer)
            }
            _ => wf.clone(),
        }
    }

    fn remember_status(&self, wf: &WasmFilter, status: &crate::api::WasmFilterStatus) {
        let Some(uid) = wf.uid() else { return };
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if written.len() >= 100_000 {
            written.clear();
        }
        written.insert(uid, status.clone());
    }

    /// How many reconciles are running now.
    pub fn reconciles_in_flight(&self) -> usize {
        self.reconciling.load(Ordering::SeqCst)
    }

    fn remember_info(&self, sha256: &str, info: Arc<ModuleInfo>) {
        let mut inspected = self.inspected.lock().unwrap_or_else(|p| p.into_inner());
        if inspected.len() >= 1024 {
            inspected.clear();
        }
        inspected.insert(sha256.to_string(), info);
    }

    /// The module's exports and imports: as the pull inspected them, else read back from the
    /// cache once per module (off the async threads: validating is CPU work).
    async fn module_info(&self, sha256: &str) -> Result<Arc<ModuleInfo>, Error> {
        if let Some(info) = self
            .inspected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
        {
            return Ok(info.clone());
        }
        let err = |message: String| Error::ReadModule {
            sha256: sha256.to_string(),
            message,
        };
        let cache = self.cache.clone();
        let sha = sha256.to_string();
        let info = tokio::task::spawn_blocking(move || {
            let bytes = cache
                .read_verified(&sha)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not in the cache".to_string())?;
            crate::abi::inspect(&bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(err)?;
        let info = Arc::new(info);
        self.remember_info(sha256, info.clone());
        Ok(info)
    }

    /// Every selected pod's Envoy and verdict (most urgent first), and the `Compatible`
    /// condition they add up to. For `target: Ecds`, a pod whose Envoy is connected is checked
    /// against the version that Envoy reported.
    async fn assess_workloads(
        &self,
        wf: &WasmFilter,
        ns: &str,
        module_sha256: &str,
    ) -> Result<(Vec<WorkloadStatus>, status::Cond), Error> {
        let info = self.module_info(module_sha256).await?;
        // From the operator's own pod index (one watch; apply_filter waited for its first
        // list), not a LIST per reconcile; matched on
        // the structured labels, never a selector string.
        let selected = self.pods.select(ns, &wf.spec.selector.match_labels);
        let live = self.xds.as_ref().filter(|_| wf.spec.target == Target::Ecds);
        let mut workloads: Vec<WorkloadStatus> = selected
            .iter()
            .map(|p| {
                let version = live.and_then(|x| x.node_version(ns, &p.name_any()));
                crate::workloads::assess_live(p, &info, version)
            })
            .collect();
        // Refusing first, then unknown, then by name: what a person must see first.
        workloads.sort_by_key(|w| {
            let rank = match w.compatible {
                Some(false) => 0,
                None => 1,
                Some(true) => 2,
            };
            (rank, w.name.clone())
        });
        let cond = status::compatibility(&workloads, workloads.len());
        Ok((workloads, cond))
    }

    /// Module sha256s some WasmFilter's status says are deployed.
    fn referenced_modules(&self) -> Option<HashSet<String>> {
        let store = self.store.get()?;
        Some(
            store
                .state()
                .iter()
                .filter_map(|wf| wf.status.as_ref()?.artifact.as_ref())
                .map(|a| a.module_sha256.clone())
                .collect(),
        )
    }

    /// Trims the cache to its bound, keeping every module in use.
    pub fn evict(&self) {
        let Some(max) = self.settings.cache_max_bytes else {
            // Unbounded: nothing to evict, but the size is still reported.
            match self.cache.total_bytes() {
                Ok(bytes) => self.metrics.evicted(0, bytes),
                Err(e) => tracing::warn!(error = %e, "could not size the module cache"),
            }
            return;
        };
        // Without the full list of filters we cannot know what is in use: evict nothing.
        let Some(referenced) = self.referenced_modules() else {
            return;
        };
        match self.cache.evict(max, &referenced, EVICTION_GRACE) {
            Ok(r) => {
                for (sha, len) in &r.removed {
                    tracing::info!(sha256 = %sha, bytes = len, "evicted unused module from the cache");
                }
                self.metrics
                    .evicted(r.removed.len() as u64, r.remaining_bytes);
                if r.remaining_bytes > max {
                    tracing::warn!(
                        remaining = r.remaining_bytes,
                        max,
                        in_use = r.pinned_bytes,
                        "modules in use exceed --cache-max-bytes; keeping them"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cache eviction failed"),
        }
    }

    /// Credentials for a filter's registry: from its pull secret, read from its own
    /// namespace, or anonymous.
    async fn credentials(&self, wf: &WasmFilter, ns: &str) -> Result<Credentials, Error> {
        let Some(name) = wf.spec.module.pull_secret.as_deref() else {
            return Ok(Credentials::Anonymous);
        };
        let err = |message: String, missing: bool| Error::PullSecret {
            name: name.to_string(),
            message,
            missing,
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 403 => Error::PullSecretForbidden {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    message: status.message.clone(),
                },
                _ => err(format!("cannot read it: {e}"), true),
            })?
            .ok_or_else(|| {
                err(
                    format!(
                        "no Secret {name:?} in namespace {ns:?}; create it with \
                         `kubectl -n {ns} create secret docker-registry {name} ...`"
                    ),
                    true,
                )
            })?;
        const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
        if secret.type_.as_deref() != Some(DOCKER_CONFIG_JSON) {
            return Err(err(
                format!(
                    "has type {:?}; it must be {DOCKER_CONFIG_JSON}",
                    secret.type_.unwrap_or_default()
                ),
                false,
            ));
        }
        let data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
            .ok_or_else(|| err("has no .dockerconfigjson key".into(), false))?;
        let reference = crate::oci::parse_reference(wf.image())?;
        crate::oci::auth::credentials_from_docker_config(&data.0, reference.resolve_registry())
            .map_err(|e| err(e.to_string(), false))
    }

    /// Fetches, on a proxy's request, a module some WasmFilter deploys but this replica's
    /// cache lacks (another replica fetched it, or the file was dropped as corrupt).
    async fn fetch_on_demand(&self, sha256: &str) -> Result<(), FetchFailure> {
        let Some(store) = self.store.get() else {
            return Err(FetchFailure::Unavailable("the operator is starting".into()));
        };
        let Some(wf) = store.state().into_iter().find(|wf| {
            wf.status
                .as_ref()
                .and_then(|s| s.artifact.as_ref())
                .is_some_and(|a| a.module_sha256 == sha256)
        }) else {
            return Err(FetchFailure::Unknown);
        };
        let lock = {
            let mut inflight = self.inflight.lock().await;
            inflight.entry(sha256.to_string()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = if self.cache.verify_off_thread(sha256).await.unwrap_or(false) {
            Ok(())
        } else {
            self.fetch_deployed(&wf, sha256).await
        };
        self.inflight.lock().await.remove(sha256);
        result
    }

    async fn fetch_deployed(&self, wf: &WasmFilter, sha256: &str) -> Result<(), FetchFailure> {
        let unavailable = |e: Error| FetchFailure::Unavailable(e.to_string());
        let artifact = wf
            .status
            .as_ref()
            .and_then(|s| s.artifact.clone())
            .ok_or(FetchFailure::Unknown)?;
        let ns = wf.namespace().ok_or(FetchFailure::Unknown)?;
        let creds = self.credentials(wf, &ns).await.map_err(unavailable)?;
        tracing::info!(sha256, image = %artifact.image, "fetching a module on a proxy's request");
        let start = Instant::now();
        let fetched = self
            .resolver
            .fetch(
                &artifact.image,
                Some(&artifact.manifest_digest),
                Some(sha256),
                &self.cache,
                &creds,
            )
            .await;
        self.metrics
            .pulled(fetched.as_ref().map(|f| f.downloaded), start.elapsed());
        fetched.map(|_| ()).map_err(unavailable)
    }

    fn record_failure(&self, wf: &WasmFilter) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(ObjectRef::from_obj(wf)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear_failures(&self, wf: &WasmFilter) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&ObjectRef::from_obj(wf));
    }

    async fn publish(&self, wf: &WasmFilter, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate(note, 1024)),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &wf.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// CRDs the operator needs before it can watch anything.
pub const REQUIRED_CRDS: &[&str] = &[
    "wasmfilters.wasmfilter.dev",
    "wasmplugins.extensions.istio.io",
    "envoyfilters.networking.istio.io",
];

/// Waits, bounded by `timeout`, until every CRD in [`REQUIRED_CRDS`] is established, saying
/// every few seconds which ones are missing.
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    let mut last_report = None::<Instant>;
    loop {
        let mut missing = Vec::new();
        for name in REQUIRED_CRDS {
            let established = match api.get_opt(name).await {
                Ok(Some(crd)) => crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                Ok(None) => false,
                Err(e) => return Err(format!("cannot read CRD {name}: {e}")),
            };
            if !established {
                missing.push(*name);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let msg = format!(
            "CRDs not installed: {} (install ours with `wasmfilter crd | kubectl apply -f -`; \
             Istio's come with Istio)",
            missing.join(", ")
        );
        if Instant::now() >= deadline {
            return Err(msg);
        }
        if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("{msg}; waiting");
            last_report = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long a restarted operator's ECDS server waits for every known filter to be decided
/// before it answers with what it has (undecided filters are held, never removed).
const ECDS_START_WAIT: Duration = Duration::from_secs(30);

/// How long a reconcile waits for the pod index's first full list (10,000 pods take seconds).
const POD_SYNC_WAIT: Duration = Duration::from_secs(60);

/// Runs the controller until a shutdown signal. `xds_events` names filters whose proxies
/// answered (ACK/NACK), connected or went away.
pub async fn run(
    ctx: Arc<Context>,
    xds_events: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.clone();
    let filter_resource = ApiResource::erase::<WasmFilter>(&());
    let filters: Api<DynamicObject> = match &ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &filter_resource),
        None => Api::all_with(client.clone(), &filter_resource),
    };
    let (bad_tx, bad_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(decode::report(bad_rx, ctx.clone()));
    let children = |ar: &ApiResource| -> Api<DynamicObject> {
        match &ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
            None => Api::all_with(client.clone(), ar),
        }
    };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::CONTROLLER_NAME
    ));
    let wp = render::wasm_plugin_resource();
    let ef = render::envoy_filter_resource();
    // Reconcile on spec changes (generation) and owned-child changes, not on our own status
    // writes, which would otherwise echo straight back as a new reconcile.
    let (reader, writer) = reflector::store();
    let xds = ctx.xds.clone();
    let listed = reader.clone();
    let trigger = watcher(filters, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| futures::future::ready(decode::decode_event(event, &bad_tx)))
        .reflect(writer)
        // The ECDS server learns of deletions here (no reconcile runs for a deleted object),
        // and after every full list which filters exist at all.
        .inspect(move |event| {
            let Some(xds) = &xds else { return };
            match event {
                Ok(watcher::Event::Delete(wf)) => {
                    if let Some(name) = ecds_name(wf) {
                        xds.withdraw(&name);
                    }
                }
                Ok(watcher::Event::InitDone) => xds.sync(
                    listed
                        .state()
                        .iter()
                        .filter(|wf| wf.spec.target == Target::Ecds)
                        .filter_map(|wf| ecds_name(wf))
                        .collect(),
                ),
                _ => {}
            }
        })
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    // Pods come and go: a new one matching a selector is checked in the next reconcile of
    // the filters that select it. Only what decides the verdict (labels, the version
    // annotation, images) triggers one, not every status change of a pod.
    let pods: Api<Pod> = match &ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let index = ctx.pods.clone();
    let pod_trigger = watcher(pods, watcher::Config::default())
        .default_backoff()
        .modify(index::trim)
        // The index sees each event before the reconcile it triggers runs.
        .inspect(move |event| {
            if let Ok(event) = event {
                index.apply(event);
            }
        })
        .filter_map(|event| async move {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => Some(Ok(pod)),
                // A deleted pod must change its fingerprint, or the filter would drop it.
                Ok(watcher::Event::Delete(mut pod)) => {
                    pod.metadata.deletion_timestamp.get_or_insert_with(|| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
                    });
                    Some(Ok(pod))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .predicate_filter(workload_fingerprint, Default::default());
    let filters_store = reader.clone();
    let mut controller = Controller::for_stream(trigger, reader)
        .owns_with(children(&wp), wp, owned.clone())
        .owns_with(children(&ef), ef, owned)
        .watches_stream(pod_trigger, move |pod: Pod| {
            let ns = pod.namespace();
            let labels = pod.labels().clone();
            filters_store
                .state()
                .into_iter()
                .filter(|wf| {
                    wf.namespace() == ns
                        && crate::workloads::selects(&wf.spec.selector.match_labels, &labels)
                })
                .map(|wf| ObjectRef::from_obj(&*wf))
                .collect::<Vec<_>>()
        });
    // No `shutdown_on_signal`: on a signal its graceful shutdown drops reconciles in flight and
    // waits for stores that may never fill; the binary handles signals (`Context::stop`).
    if let Some(events) = xds_events {
        let answered = tokio_stream::wrappers::UnboundedReceiverStream::new(events).filter_map(
            |name| async move {
                let (ns, name) = name.split_once('/')?;
                Some(ObjectRef::<WasmFilter>::new(name).within(ns))
            },
        );
        controller = controller.reconcile_on(answered);
    }
    if let Some(xds) = ctx.xds.clone() {
        tokio::spawn(async move {
            tokio::time::sleep(ECDS_START_WAIT).await;
            xds.force_ready();
        });
    }
    let store = controller.store();
    let _ = ctx.store.set(store.clone());
    let metrics = ctx.metrics.clone();
    let evicting = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            // After every pull, and once a minute (filters get deleted too); off the
            // reconcile path, since it walks the cache directory.
            tokio::select! {
                _ = tick.tick() => {}
                _ = evicting.evict_soon.notified() => {}
            }
            let ctx = evicting.clone();
            let _ = tokio::task::spawn_blocking(move || ctx.evict()).await;
        }
    });
    // The store's readiness signal keeps one waker, which the controller's own wait takes; so
    // poll it again every second rather than wait on it once.
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    metrics.set_ready();
                    tracing::info!("watches synced; ready");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// What about a pod can change a verdict: its labels, its version annotation, its images,
/// and whether it is going away.
fn workload_fingerprint(pod: &Pod) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pod.labels().hash(&mut h);
    pod.annotations()
        .get(crate::workloads::ANNOTATION_ENVOY_VERSION)
        .hash(&mut h);
    pod.metadata.deletion_timestamp.is_some().hash(&mut h);
    if let Some(spec) = &pod.spec {
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            c.name.hash(&mut h);
            c.image.hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Counts a reconcile as running until dropped (whichever way it ends).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tracing::instrument(skip_all, fields(filter = %wf.name_any(), namespace = wf.namespace().unwrap_or_default()))]
async fn reconcile(wf: Arc<WasmFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let _counted = InFlight::enter(&ctx.reconciling);
    if ctx.stopping.load(Ordering::SeqCst) {
        return Ok(Action::await_change());
    }
    let wf = ctx.with_written_status(&wf);
    let result = apply_filter(&wf, &ctx).await;
    ctx.metrics.reconciled(
        result.as_ref().map(|_| ()).map_err(Error::reason),
        start.elapsed(),
    );
    match result {
        Ok(action) => {
            ctx.clear_failures(&wf);
            Ok(action)
        }
        Err(err) => {
            tracing::warn!(reason = err.reason(), error = %err, "reconcile failed");
            // Proxies keep what they were sent; a restarted operator stops waiting for this one.
            if let (Some(xds), Some(name)) = (&ctx.xds, ecds_name(&wf))
                && wf.spec.target == Target::Ecds
            {
                xds.decided(&name);
            }
            let status = status::failed(&wf, &err);
            if let Err(e) = patch_status(&ctx, &wf, &status).await {
                tracing::warn!(error = %e, "could not write failure status");
            }
            ctx.publish(&wf, EventType::Warning, err.reason(), err.to_string())
                .await;
            Err(err)
        }
    }
}

fn error_policy(wf: Arc<WasmFilter>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(&wf);
    let delay = ctx
        .settings
        .backoff
        .delay(err.retry(), failures, fastrand::f64());
    // pullPolicy Always promises a fresh look every resync, failing or not.
    let delay = match wf.spec.module.pull_policy {
        PullPolicy::Always => delay.min(ctx.settings.resync),
        PullPolicy::IfNotPresent => delay,
    };
    let delay = err.retry_after().map_or(delay, |least| delay.max(least));
    tracing::info!(reason = err.reason(), failures, ?delay, "retrying later");
    Action::requeue(delay)
}

/// Refuses, before any network work, what this operator cannot do, rather than ignoring it.
fn check_supported(wf: &WasmFilter, ctx: &Context) -> Result<(), Error> {
    if wf.spec.target == Target::Ecds && ctx.xds.is_none() {
        return Err(Error::Unsupported {
            field: "spec.target: Ecds",
            detail: "this operator serves no ECDS: start it with --xds-listen ADDR, or use \
                     WasmPlugin or EnvoyFilter"
                .into(),
        });
    }
    Ok(())
}

/// The ECDS resource name of a filter.
fn ecds_name(wf: &WasmFilter) -> Option<String> {
    Some(ecds::resource_name(
        wf.metadata.namespace.as_deref()?,
        wf.metadata.name.as_deref()?,
    ))
}

/// The digest to stick to: with `IfNotPresent`, the one the same image resolved to before.
fn pinned_digest(wf: &WasmFilter) -> Option<&str> {
    if wf.spec.module.pull_policy != PullPolicy::IfNotPresent {
        return None;
    }
    wf.status
        .as_ref()?
        .artifact
        .as_ref()
        .filter(|a| a.image == wf.image())
        .map(|a| a.manifest_digest.as_str())
}

/// With `IfNotPresent`, the module already resolved for this image, when the cache still holds
/// its verified bytes: no registry round trip, so a registry outage cannot fail a resync.
async fn cached_artifact(wf: &WasmFilter, cache: &ModuleCache) -> Option<Artifact> {
    pinned_digest(wf)?;
    let a = wf.status.as_ref()?.artifact.as_ref()?;
    if wf
        .spec
        .module
        .sha256
        .as_ref()
        .is_some_and(|pin| *pin != a.module_sha256)
    {
        return None;
    }
    if !cache.verify_off_thread(&a.module_sha256).await.ok()? {
        return None;
    }
    cache.touch(&a.module_sha256);
    Some(Artifact {
        image: a.image.clone(),
        manifest_digest: a.manifest_digest.clone(),
        format: serde_json::from_value(json!(a.format)).ok()?,
        module_sha256: a.module_sha256.clone(),
        size: a.size,
        abi_version: a.abi_version.clone(),
        declared_abi_versions: a.declared_abi_versions.clone(),
        root_ids: a.root_ids.clone(),
    })
}

async fn apply_filter(wf: &WasmFilter, ctx: &Context) -> Result<Action, Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    if wf.status.is_none() {
        patch_status(ctx, wf, &status::reconciling(wf.metadata.generation)).await?;
    }
    check_supported(wf, ctx)?;
    // Before any registry round trip: a reconcile that cannot assess its pods would only
    // resolve the tag again on its retry.
    if !ctx.pods.wait_synced(POD_SYNC_WAIT).await {
        return Err(Error::PodsNotSynced {
            waited_secs: POD_SYNC_WAIT.as_secs(),
        });
    }

    let artifact = match cached_artifact(wf, &ctx.cache).await {
        Some(artifact) => {
            ctx.metrics.cache_hit();
            artifact
        }
        None => {
            let creds = ctx.credentials(wf, &ns).await?;
            let pull_start = Instant::now();
            let fetched = ctx
                .resolver
                .fetch(
                    wf.image(),
                    pinned_digest(wf),
                    wf.spec.module.sha256.as_deref(),
                    &ctx.cache,
                    &creds,
                )
                .await;
            ctx.metrics
                .pulled(fetched.as_ref().map(|f| f.downloaded), pull_start.elapsed());
            let fetched = fetched?;
            if let Some(info) = fetched.info {
                ctx.remember_info(&fetched.artifact.module_sha256, info);
            }
            ctx.evict_soon.notify_one();
            fetched.artifact
        }
    };

    let (mut workloads, compatible) = ctx
        .assess_workloads(wf, &ns, &artifact.module_sha256)
        .await?;
    let incompatible = compatible.status == "False";
    if incompatible && wf.spec.on_incompatible == OnIncompatible::Block {
        workloads.truncate(status::MAX_LISTED_WORKLOADS);
        return Err(Error::Incompatible {
            message: compatible.message,
            workloads,
        });
    }
    let compatible_message = compatible.message.clone();

    let (kind, notes, loaded) = match (wf.spec.target, &ctx.xds) {
        (Target::Ecds, Some(xds)) => {
            let loaded = serve_ecds(wf, ctx, xds, &ns, &artifact, &mut workloads).await?;
            remove_other_children(wf, ctx, &ns, None).await?;
            ("ECDS resource", Vec::new(), Some(loaded))
        }
        _ => {
            let module = Module {
                sha256: artifact.module_sha256.clone(),
            };
            let child = render::child(wf, &module, &ctx.settings.module_server)?;
            let api: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &ns, &child.resource);
            let pp = PatchParams::apply(names::FIELD_MANAGER).force();
            api.patch(&wf.name_any(), &pp, &Patch::Apply(&child.object))
                .await
                .map_err(|source| Error::ApplyChild {
                    kind: child.resource.kind.clone(),
                    name: wf.name_any(),
                    source,
                })?;
            remove_other_children(wf, ctx, &ns, Some(&child.resource)).await?;
            if let (Some(xds), Some(name)) = (&ctx.xds, ecds_name(wf)) {
                xds.withdraw(&name);
            }
            let kind = if child.resource.kind == render::envoy_filter_resource().kind {
                "EnvoyFilter"
            } else {
                "WasmPlugin"
            };
            (kind, child.notes, None)
        }
    };

    let status = status::ready(
        wf,
        &artifact,
        kind,
        &notes,
        status::Workloads {
            all: workloads,
            compatible,
            loaded,
        },
    );
    let was_incompatible = wf
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == names::condition::COMPATIBLE)
        })
        .is_some_and(|c| c.status == "False" && c.message == compatible_message);
    patch_status(ctx, wf, &status).await?;
    announce_changes(wf, ctx, &artifact, kind).await;
    if incompatible && !was_incompatible {
        ctx.publish(
            wf,
            EventType::Warning,
            names::reason::INCOMPATIBLE,
            format!("deployed anyway (spec.onIncompatible: Warn): {compatible_message}"),
        )
        .await;
    }

    Ok(match wf.spec.module.pull_policy {
        PullPolicy::Always => Action::requeue(ctx.settings.resync),
        PullPolicy::IfNotPresent => Action::requeue(Duration::from_secs(3600)),
    })
}

/// Offers the verified module to the ECDS server for the selected pods, and reads back what
/// each connected Envoy did with it: the `Loaded` condition and how many loaded it.
async fn serve_ecds(
    wf: &WasmFilter,
    ctx: &Context,
    xds: &Xds,
    ns: &str,
    artifact: &Artifact,
    workloads: &mut [WorkloadStatus],
) -> Result<(status::Cond, u32), Error> {
    let name = ecds::resource_name(ns, &wf.name_any());
    let sha = &artifact.module_sha256;
    let offer = match xds.offered(&name) {
        Some(o) if o.module_sha256 == *sha && o.spec == wf.spec => o,
        previous => {
            // The bytes are in memory already when the same module is offered again.
            let module = match previous.filter(|o| o.module_sha256 == *sha) {
                Some(o) => o.module.clone(),
                None => Arc::new(read_module(&ctx.cache, sha).await?),
            };
            let info = ctx.module_info(sha).await?;
            Arc::new(Offer::new(wf.spec.clone(), sha.clone(), module, info))
        }
    };
    let selected: BTreeSet<String> = workloads.iter().map(|w| w.name.clone()).collect();
    xds.publish(&name, ns, selected, Some(offer));
    let current = ecds::version_base(&wf.spec, sha);
    let loads: Vec<_> = workloads
        .iter()
        .map(|w| xds.load(&name, ns, &w.name, &current))
        .collect();
    Ok(status::loaded(
        workloads,
        &loads,
        &name,
        &sha[..12.min(sha.len())],
    ))
}

/// The verified bytes of a cached module, read off the async threads.
async fn read_module(cache: &ModuleCache, sha256: &str) -> Result<Vec<u8>, Error> {
    let err = |message: String| Error::ReadModule {
        sha256: sha256.to_string(),
        message,
    };
    let cache = cache.clone();
    let sha = sha256.to_string();
    tokio::task::spawn_blocking(move || {
        cache
            .read_verified(&sha)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not in the cache".to_string())
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(err)
}

/// Deletes a child of a kind the filter no longer targets (after `target` changed), but only
/// one this filter owns. `current` is the kind it targets now (`None`: no Istio child).
async fn remove_other_children(
    wf: &WasmFilter,
    ctx: &Context,
    ns: &str,
    current: Option<&ApiResource>,
) -> Result<(), Error> {
    let uid = wf.uid();
    for ar in [
        render::wasm_plugin_resource(),
        render::envoy_filter_resource(),
    ] {
        if current.is_some_and(|c| c.kind == ar.kind) {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        let err = |source| Error::DeleteChild {
            kind: ar.kind.clone(),
            name: wf.name_any(),
            source,
        };
        let Some(old) = api.get_opt(&wf.name_any()).await.map_err(err)? else {
            continue;
        };
        if old
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
        {
            api.delete(&wf.name_any(), &DeleteParams::default())
                .await
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Events for what a person would want to know happened: a new module deployed, a tag moved.
async fn announce_changes(wf: &WasmFilter, ctx: &Context, artifact: &Artifact, kind: &str) {
    let old = wf.status.as_ref().and_then(|s| s.artifact.as_ref());
    if let Some(old) = old
        && old.image == artifact.image
        && old.manifest_digest != artifact.manifest_digest
    {
        ctx.publish(
            wf,
            EventType::Normal,
            "TagMoved",
            format!(
                "{} moved from {} to {}",
                artifact.image, old.manifest_digest, artifact.manifest_digest
            ),
        )
        .await;
    }
    if old.is_none_or(|o| o.module_sha256 != artifact.module_sha256) {
        ctx.publish(
            wf,
            EventType::Normal,
            "Deployed",
            format!(
                "{kind} {} now points at module sha256:{} from {}",
                wf.name_any(),
                artifact.module_sha256,
                artifact.manifest_digest
            ),
        )
        .await;
    }
}

async fn patch_status(
    ctx: &Context,
    wf: &WasmFilter,
    status: &crate::api::WasmFilterStatus,
) -> Result<(), Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<WasmFilter> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": WasmFilter::api_version(&()),
        "kind": WasmFilter::kind(&()),
        "status": status,
    });
    api.patch_status(
        &wf.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::UpdateStatus)?;
    ctx.remember_status(wf, status);
    Ok(())
}

/// Until the controller runs, proxies asking for a module this replica lacks are told to
/// come back; then the controller fetches it for them.
impl OnDemand for OnceLock<Arc<Context>> {
    fn fetch<'a>(
        &'a self,
        sha256: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), FetchFailure>> + Send + 'a>> {
        Box::pin(async move {
            match self.get() {
                Some(ctx) => ctx.fetch_on_demand(sha256).await,
                None => Err(FetchFailure::Unavailable("the operator is starting".into())),
            }
        })
    }
}
