//! The reconcile loop: resolve (client) → inspect (pure) → render (pure) → apply (client) →
//! status. A failure anywhere before apply leaves existing children exactly as they were.

pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::{PullPolicy, WasmFilter};
use crate::cache::ModuleCache;
use crate::error::{Backoff, Error};
use crate::metrics::Metrics;
use crate::names;
use crate::oci::{Artifact, Resolver};
use crate::render::{self, Module, ModuleServer};

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
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub resolver: Resolver,
    pub cache: ModuleCache,
    pub settings: Settings,
    failures: Mutex<HashMap<ObjectRef<WasmFilter>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        resolver: Resolver,
        cache: ModuleCache,
        settings: Settings,
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

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.clone();
    let filters: Api<WasmFilter> = match &ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
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
    let trigger = watcher(filters, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(trigger, reader)
        .owns_with(children(&wp), wp, owned.clone())
        .owns_with(children(&ef), ef, owned)
        .shutdown_on_signal();
    let store = controller.store();
    let metrics = ctx.metrics.clone();
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

#[tracing::instrument(skip_all, fields(filter = %wf.name_any(), namespace = wf.namespace().unwrap_or_default()))]
async fn reconcile(wf: Arc<WasmFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
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
            let status = status::failed(&wf, &err);
            if let Err(e) = patch_status(&ctx.client, &wf, &status).await {
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
    tracing::info!(reason = err.reason(), failures, ?delay, "retrying later");
    Action::requeue(delay)
}

/// Refuses, before any network work, what this version cannot do, rather than ignoring it.
fn check_supported(wf: &WasmFilter) -> Result<(), Error> {
    if wf.spec.module.pull_secret.is_some() {
        return Err(Error::Unsupported {
            field: "spec.module.pullSecret",
            detail: "private registries are not supported yet; push the module to a registry \
                     that allows anonymous pulls, or remove pullSecret"
                .into(),
        });
    }
    render::target_supported(wf.spec.target)
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
fn cached_artifact(wf: &WasmFilter, cache: &ModuleCache) -> Option<Artifact> {
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
    cache.read_verified(&a.module_sha256).ok()??;
    Some(Artifact {
        image: a.image.clone(),
        manifest_digest: a.manifest_digest.clone(),
        format: serde_json::from_value(json!(a.format)).ok()?,
        module_sha256: a.module_sha256.clone(),
        size: a.size,
        abi_version: a.abi_version.clone(),
    })
}

async fn apply_filter(wf: &WasmFilter, ctx: &Context) -> Result<Action, Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    check_supported(wf)?;

    let artifact = match cached_artifact(wf, &ctx.cache) {
        Some(artifact) => artifact,
        None => {
            let pull_start = Instant::now();
            let artifact = ctx
                .resolver
                .fetch(
                    wf.image(),
                    pinned_digest(wf),
                    wf.spec.module.sha256.as_deref(),
                    &ctx.cache,
                )
                .await;
            ctx.metrics.pulled(artifact.is_ok(), pull_start.elapsed());
            artifact?
        }
    };

    let module = Module {
        sha256: artifact.module_sha256.clone(),
    };
    let child = render::child(wf, &module, &ctx.settings.module_server)?;
    let kind = child.resource.kind.as_str();
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &child.resource);
    let pp = PatchParams::apply(names::FIELD_MANAGER).force();
    api.patch(&wf.name_any(), &pp, &Patch::Apply(&child.object))
        .await
        .map_err(|source| Error::ApplyChild {
            kind: kind.to_string(),
            name: wf.name_any(),
            source,
        })?;
    remove_other_children(wf, ctx, &ns, &child.resource).await?;

    let status = status::ready(wf, &artifact, kind, &child.notes);
    patch_status(&ctx.client, wf, &status).await?;
    announce_changes(wf, ctx, &artifact, kind).await;

    Ok(match wf.spec.module.pull_policy {
        PullPolicy::Always => Action::requeue(ctx.settings.resync),
        PullPolicy::IfNotPresent => Action::requeue(Duration::from_secs(3600)),
    })
}

/// Deletes a child of the kind the filter no longer targets (after `target` changed), but
/// only one this filter owns.
async fn remove_other_children(
    wf: &WasmFilter,
    ctx: &Context,
    ns: &str,
    current: &ApiResource,
) -> Result<(), Error> {
    let uid = wf.uid();
    for ar in [
        render::wasm_plugin_resource(),
        render::envoy_filter_resource(),
    ] {
        if ar.kind == current.kind {
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
    client: &Client,
    wf: &WasmFilter,
    status: &crate::api::WasmFilterStatus,
) -> Result<(), Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &ns);
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
    .map(|_| ())
    .map_err(Error::UpdateStatus)
}
