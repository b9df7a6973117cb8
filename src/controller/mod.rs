//! The WasmFilter controller. A reconcile is the pipeline of DESIGN.md, one step a file:
//! [`resolve`] (the module), [`verify`] (its signature), [`preflight`] (run it in a sandbox first), [`assess`] (the selected workloads and the verdict),
//! [`deploy`] (render and apply the child, or serve ECDS), [`report`] (status and Events).
//! [`watch`] wires the watches that trigger it; [`crds`] waits for the CRDs it needs.

mod applied;
mod assess;
mod crds;
mod decode;
mod deploy;
mod error;
mod events;
#[cfg(feature = "preflight")]
pub mod preflight;
mod report;
mod resolve;
mod rollout;
pub mod status;
pub mod verify;
mod watch;
mod written;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

pub use crds::{REQUIRED_CRDS, installed, wait_for_crds};
pub use error::Error;
pub use watch::{follow_filters, run};

use crate::abi::ModuleInfo;
use crate::api::{PullPolicy, WasmFilter};
use crate::cache::{FetchFailure, ModuleCache, OnDemand, Singleflight};
use crate::error::Backoff;
use crate::metrics::Metrics;
use crate::names;
use crate::oci::Resolver;
use crate::oci::signature::Verified;
use crate::render::{self, ModuleServer};
use crate::workloads::index::PodIndex;
use crate::xds::Xds;

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
    /// Reconciles running at once, at most.
    pub concurrency: u16,
    /// Keys every module must be signed by (`--require-signature-keys`).
    pub required_signature_keys: Option<verify::KeysAt>,
    /// Optional CRDs found at start (Istio's `TrafficExtension`).
    pub installed: render::Installed,
    /// `--istio-load-status`: read each selected Istio proxy's metrics for whether it runs the
    /// filter.
    pub istio_load_status: bool,
}

/// How long a reconcile waits for the pod index's first full list (10,000 pods take seconds).
const POD_SYNC_WAIT: Duration = Duration::from_secs(60);

/// How often a filter that pins its module (`IfNotPresent`) is looked at again anyway.
const PINNED_RESYNC: Duration = Duration::from_secs(3600);

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub events: events::Events,
    pub metrics: Arc<Metrics>,
    pub resolver: Resolver,
    pub cache: ModuleCache,
    pub settings: Settings,
    failures: Mutex<HashMap<ObjectRef<WasmFilter>, u32>>,
    /// The controller's view of all WasmFilters, once it runs.
    store: OnceLock<Store<WasmFilter>>,
    /// One on-demand fetch per module at a time.
    on_demand: Singleflight,
    /// What inspecting each deployed module found, by sha256.
    inspected: Mutex<HashMap<String, Arc<ModuleInfo>>>,
    /// Signatures verified, by manifest digest and trusted key set (where, and fingerprints).
    signatures: Mutex<HashMap<(String, String), Verified>>,
    /// Wakes the eviction task after a pull.
    evict_soon: tokio::sync::Notify,
    /// The ECDS server's state, when the operator serves plain Envoys (`--xds-listen`).
    pub xds: Option<Arc<Xds>>,
    /// The sandbox every new module and configuration runs in first (`--preflight`).
    #[cfg(feature = "preflight")]
    pub preflight: Option<Arc<preflight::Preflight>>,
    /// Every pod in scope, from one watch.
    pub pods: Arc<PodIndex>,
    /// Reconciles running now (shutdown waits for them).
    reconciling: AtomicUsize,
    /// Set on shutdown: no new reconcile starts.
    stopping: AtomicBool,
    /// The last status this process wrote, by object uid: only the operator writes status, so
    /// it is the truth even before the watch delivers it (a reconcile the child's creation
    /// triggers often runs first, and would resolve the tag again and flap the status).
    written: written::WrittenStatuses,
    /// What this process last applied to each child: its own applies echoing back trigger
    /// nothing, and an apply that would change nothing is left out.
    children: applied::AppliedChildren,
    /// Where [`Context::children`] sends filters to reconcile again (taken by the controller).
    again: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<WasmFilter>>>>,
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
        let (again_tx, again) = tokio::sync::mpsc::unbounded_channel();
        let reporter = Reporter {
            controller: names::CONTROLLER_NAME.to_string(),
            instance: settings.instance.clone(),
        };
        Context {
            events: events::Events::new(client.clone(), reporter),
            client,
            metrics,
            resolver,
            cache,
            settings,
            failures: Mutex::new(HashMap::new()),
            store: OnceLock::new(),
            on_demand: Singleflight::default(),
            inspected: Mutex::new(HashMap::new()),
            signatures: Mutex::new(HashMap::new()),
            evict_soon: tokio::sync::Notify::new(),
            xds,
            #[cfg(feature = "preflight")]
            preflight: None,
            pods: Arc::default(),
            reconciling: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            written: written::WrittenStatuses::default(),
            children: applied::AppliedChildren::new(again_tx),
            again: Mutex::new(Some(again)),
        }
    }

    /// Runs every new module and configuration in `preflight` before deploying it.
    #[cfg(feature = "preflight")]
    pub fn with_preflight(mut self, preflight: Option<preflight::Preflight>) -> Self {
        self.preflight = preflight.map(Arc::new);
        self
    }

    /// Starts no new reconcile from now on; those in flight run to their end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
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

    fn remembered_signature(&self, key: &(String, String)) -> Option<Verified> {
        let signatures = self.signatures.lock().unwrap_or_else(|p| p.into_inner());
        signatures.get(key).cloned()
    }

    fn remember_signature(&self, key: (String, String), verified: Verified) {
        let mut signatures = self.signatures.lock().unwrap_or_else(|p| p.into_inner());
        if signatures.len() >= 10_000 {
            signatures.clear();
        }
        signatures.insert(key, verified);
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
        let bytes = self.cache.read_off_thread(sha256).await?;
        let info = tokio::task::spawn_blocking(move || crate::abi::inspect(&bytes))
            .await
            .map_err(|e| crate::abi::ModuleError::Invalid(format!("inspecting failed: {e}")))
            .and_then(|r| r)
            .map_err(|source| Error::InspectModule {
                sha256: sha256.to_string(),
                source,
            })?;
        let info = Arc::new(info);
        self.remember_info(sha256, info.clone());
        Ok(info)
    }

    /// Module sha256s some WasmFilter's status says are deployed, or are a rollout's stable or
    /// candidate module.
    fn referenced_modules(&self) -> Option<HashSet<String>> {
        let store = self.store.get()?;
        let mut shas = HashSet::new();
        for wf in store.state() {
            let Some(s) = &wf.status else { continue };
            shas.extend(s.artifact.iter().map(|a| a.module_sha256.clone()));
            if let Some(r) = &s.rollout {
                shas.extend(
                    [&r.stable, &r.candidate]
                        .into_iter()
                        .flatten()
                        .map(|rev| rev.module_sha256.clone()),
                );
            }
        }
        Some(shas)
    }

    /// Trims the cache to `--cache-max-bytes`, keeping every module in use (walks the cache
    /// directory: call it off the async threads).
    pub fn evict(&self) {
        crate::cache::evict_unused(
            &self.cache,
            self.settings.cache_max_bytes,
            || self.referenced_modules(),
            &self.metrics,
        );
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
        self.on_demand
            .fetch(
                &self.cache,
                sha256,
                resolve::fetch_deployed(self, &wf, sha256),
            )
            .await
    }

    /// Credentials for `wf`'s registry: its pull secret (in `ns`), else anonymous.
    async fn pull_credentials(
        &self,
        wf: &WasmFilter,
        ns: &str,
    ) -> Result<crate::oci::Credentials, crate::oci::Error> {
        crate::oci::pull_credentials(
            &self.client,
            ns,
            wf.spec.module.pull_secret.as_deref(),
            wf.image(),
        )
        .await
    }

    /// `delay`, or the resync period if shorter for a `pullPolicy: Always` filter, which is
    /// promised a fresh look every resync, failing, blocked or not.
    fn within_resync(&self, wf: &WasmFilter, delay: Duration) -> Duration {
        match wf.spec.module.pull_policy {
            PullPolicy::Always => delay.min(self.settings.resync),
            PullPolicy::IfNotPresent => delay,
        }
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

/// How a reconcile that did not fail ended.
enum Outcome {
    /// The module is deployed (or served) and the status says so; look again this soon (a
    /// rollout step's pause) if set.
    Deployed(Option<Duration>),
    /// `spec.onIncompatible: Block` kept the module from the selected workloads; the status
    /// says which refuse it and why.
    Blocked,
    /// `spec.rollout`: proxies refused the new module, and every pod is back on the stable one
    /// until the spec changes.
    RolledBack,
}

#[tracing::instrument(skip_all, fields(filter = %wf.name_any(), namespace = wf.namespace().unwrap_or_default()))]
async fn reconcile(wf: Arc<WasmFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let key = queue_key(&ObjectRef::from_obj(&*wf));
    ctx.metrics.queue.started(&key);
    let _counted = InFlight::enter(&ctx.reconciling);
    if ctx.stopping.load(Ordering::SeqCst) {
        return Ok(Action::await_change());
    }
    let wf = ctx.written.apply_to(&wf);
    let result = apply_filter(&wf, &ctx).await;
    ctx.metrics.reconciled(
        match &result {
            Ok(Outcome::Deployed(_)) => Ok(()),
            Ok(Outcome::Blocked) => Err(names::reason::INCOMPATIBLE),
            Ok(Outcome::RolledBack) => Err(names::reason::ROLLED_BACK),
            Err(e) => Err(e.reason()),
        },
        start.elapsed(),
    );
    let again = match result {
        Ok(Outcome::Deployed(soon)) => {
            ctx.clear_failures(&wf);
            let resync = match wf.spec.module.pull_policy {
                PullPolicy::Always => ctx.settings.resync,
                PullPolicy::IfNotPresent => PINNED_RESYNC,
            };
            soon.map_or(resync, |s| s.min(resync))
        }
        // The stable module is served; the candidate waits for a spec change (or a new digest).
        Ok(Outcome::RolledBack) => ctx.within_resync(&wf, ctx.settings.backoff.invalid),
        // Nothing changes until the spec or the pods do (a pod change triggers a reconcile).
        Ok(Outcome::Blocked) => {
            deploy::kept_previous(&wf, &ctx);
            ctx.within_resync(&wf, ctx.settings.backoff.invalid)
        }
        Err(err) => {
            tracing::warn!(reason = err.reason(), error = %err, "reconcile failed");
            deploy::kept_previous(&wf, &ctx);
            report::failed(&ctx, &wf, &err).await;
            return Err(err);
        }
    };
    ctx.metrics.queue.requeue(key, again);
    Ok(Action::requeue(again))
}

/// A filter's key in the reconcile queue metric: `namespace/name`.
pub(crate) fn queue_key<K: kube::runtime::reflector::Lookup + ?Sized>(
    filter: &ObjectRef<K>,
) -> String {
    format!(
        "{}/{}",
        filter.namespace.as_deref().unwrap_or_default(),
        filter.name
    )
}

fn error_policy(wf: Arc<WasmFilter>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(&wf);
    let delay = ctx
        .settings
        .backoff
        .delay(err.retry(), failures, fastrand::f64());
    let delay = ctx.within_resync(&wf, delay);
    let delay = err.retry_after().map_or(delay, |least| delay.max(least));
    tracing::info!(reason = err.reason(), failures, ?delay, "retrying later");
    ctx.metrics
        .queue
        .requeue(queue_key(&ObjectRef::from_obj(&*wf)), delay);
    Action::requeue(delay)
}

/// How long the first reconcile of a new filter runs before its status says it is being taken
/// up (`Reconciling=True`); most finish sooner and write their outcome straight away, one
/// status write instead of two.
const TAKEN_UP_AFTER: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// Set once the reconcile running in this task began to write a status.
    static STATUS_SENT: Arc<AtomicBool>;
}

/// [`pipeline`]; a new filter (no status yet) whose first reconcile is still running after
/// [`TAKEN_UP_AFTER`], and has not begun to write its outcome (it may be past it, publishing
/// Events, or have it in flight), gets `Reconciling=True` meanwhile, so kstatus readers see it
/// in progress.
async fn apply_filter(wf: &WasmFilter, ctx: &Context) -> Result<Outcome, Error> {
    let sent = Arc::new(AtomicBool::new(false));
    let run = STATUS_SENT.scope(sent.clone(), pipeline(wf, ctx));
    if wf.status.is_some() {
        return run.await;
    }
    tokio::pin!(run);
    match tokio::time::timeout(TAKEN_UP_AFTER, &mut run).await {
        Ok(outcome) => outcome,
        Err(_) => {
            // The pipeline is paused here: it cannot begin a write between this look and
            // ours, and one it began is newer than ours.
            // A failure to say so is no reason to abandon the reconcile itself.
            if !sent.load(Ordering::SeqCst)
                && let Err(e) =
                    report::write_status(ctx, wf, &status::reconciling(wf.metadata.generation))
                        .await
            {
                tracing::warn!(error = %e, "could not write the Reconciling status");
            }
            run.await
        }
    }
}

/// The pipeline: resolve the module, assess the workloads, deploy, report.
async fn pipeline(wf: &WasmFilter, ctx: &Context) -> Result<Outcome, Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    render::check_supported(
        render::resolve_target(wf.spec.target, ctx.settings.installed),
        ctx.xds.is_some(),
        ctx.settings.installed,
    )?;
    // Before any registry round trip: a reconcile that cannot assess its pods would only
    // resolve the tag again on its retry.
    if !ctx.pods.wait_synced(POD_SYNC_WAIT).await {
        return Err(Error::PodsNotSynced {
            waited_secs: POD_SYNC_WAIT.as_secs(),
        });
    }
    let mut artifact = resolve::resolve(wf, &ns, ctx).await?;
    verify::check(wf, &ns, &mut artifact, ctx).await?;
    #[cfg(feature = "preflight")]
    preflight::check(wf, &mut artifact, ctx).await?;
    let mut assessment = assess::assess(wf, &ns, &artifact.module_sha256, ctx).await?;
    match assess::verdict(wf.spec.on_incompatible, &assessment.compatible) {
        assess::Verdict::Block => {
            report::blocked(ctx, wf, &assessment).await?;
            return Ok(Outcome::Blocked);
        }
        assess::Verdict::Deploy | assess::Verdict::Warn => {}
    }
    let mut deployed = deploy::deploy(wf, &ns, &artifact, &mut assessment.workloads, ctx).await?;
    if let Some(r) = deployed.rollout.as_mut()
        && let Some((message, now)) = r.rolled_back.take()
    {
        let loaded = deployed.loaded.take().map(|(l, _)| l).unwrap_or_else(|| {
            status::Cond::unknown(names::condition::LOADED, names::reason::LOAD_PENDING, "")
        });
        report::rolled_back(
            ctx,
            wf,
            &message,
            &assessment.workloads,
            loaded,
            r.status.clone(),
            now,
        )
        .await?;
        return Ok(Outcome::RolledBack);
    }
    let soon = match (
        deployed.rollout.as_ref().and_then(|r| r.wait),
        deployed.recheck,
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    report::deployed(ctx, wf, &artifact, assessment, deployed).await?;
    Ok(Outcome::Deployed(soon))
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

/// Publishes an Event about `wf`; a failure to publish is logged, never fatal.
async fn publish(ctx: &Context, wf: &WasmFilter, type_: EventType, reason: &str, note: String) {
    report::publish(
        &ctx.events,
        &kube::Resource::object_ref(wf, &()),
        type_,
        reason,
        note,
    )
    .await;
}
