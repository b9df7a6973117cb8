//! The watches that trigger reconciles: WasmFilters (decoded one by one), their children (not
//! the operator's own writes), pods (only what can change a verdict), and ECDS answers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};

use super::deploy::ecds_name;
use super::{Context, decode, error_policy, queue_key, reconcile};
use crate::api::{Target, WasmFilter};
use crate::names;
use crate::render;
use crate::workloads::index;

/// For a replica that does not lead (yet): a store of every WasmFilter in scope, so that its
/// module cache can fetch on a proxy's request a module some filter deploys. Nothing is
/// reconciled or written.
pub fn follow_filters(ctx: &Arc<Context>) {
    // Undecodable objects are the leader's to report.
    let (bad_tx, _) = tokio::sync::mpsc::unbounded_channel();
    let (reader, writer) = reflector::store();
    let _ = ctx.store.set(reader);
    let stream = decoded_filters(ctx, bad_tx).reflect(writer);
    tokio::spawn(stream.for_each(|_| futures::future::ready(())));
}

/// Every WasmFilter in scope, from one raw watch decoded object by object (an undecodable one
/// goes to `bad`, never stops the others), without managedFields: who wrote which field is
/// the API server's business, not the store's (kilobytes a filter once its status lists
/// workloads).
fn decoded_filters(
    ctx: &Context,
    bad: tokio::sync::mpsc::UnboundedSender<decode::Undecodable>,
) -> impl futures::Stream<Item = Result<watcher::Event<WasmFilter>, watcher::Error>> + use<> {
    let resource = ApiResource::erase::<WasmFilter>(&());
    let filters: Api<DynamicObject> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
        None => Api::all_with(ctx.client.clone(), &resource),
    };
    watcher(filters, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| futures::future::ready(decode::decode_event(event, &bad)))
        .modify(|wf| wf.metadata.managed_fields = None)
}

/// How long a restarted operator's ECDS server waits for every known filter to be decided
/// before it answers with what it has (undecided filters are held, never removed).
const ECDS_START_WAIT: Duration = Duration::from_secs(30);

/// Runs the controller until a shutdown signal. `xds_events` names filters whose proxies
/// answered (ACK/NACK), connected or went away.
pub async fn run(
    ctx: Arc<Context>,
    xds_events: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.clone();
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
    // A child event is a reason to reconcile (someone changed or deleted it), except the
    // operator's own apply echoing back.
    let child_trigger = |ar: ApiResource| {
        let ctx = ctx.clone();
        let queue = ctx.clone();
        let kind = ar.kind.clone();
        let mut listed = false;
        watcher(children(&ar), owned.clone())
            .default_backoff()
            .filter_map(move |event| {
                futures::future::ready(match event {
                    // The first list finds what the filters' own first reconcile finds anyway.
                    Ok(watcher::Event::InitDone) => {
                        listed = true;
                        None
                    }
                    Ok(watcher::Event::InitApply(child)) if listed => Some(Ok(child)),
                    Ok(watcher::Event::Apply(child) | watcher::Event::Delete(child)) => {
                        Some(Ok(child))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
            })
            .filter(move |child| {
                let own = matches!(child, Ok(c) if ctx.children.is_own(&kind, c));
                futures::future::ready(!own)
            })
            // The controller reconciles the filter owning the child (counted as waiting).
            .inspect(move |child| {
                let Ok(child) = child else { return };
                let ns = child.namespace().unwrap_or_default();
                for owner in child.owner_references() {
                    if owner.kind == <WasmFilter as kube::Resource>::kind(&()) {
                        let filter = ObjectRef::<WasmFilter>::new(&owner.name).within(&ns);
                        queue.metrics.queue.request(queue_key(&filter));
                    }
                }
            })
    };
    let wp = render::wasm_plugin_resource();
    let ef = render::envoy_filter_resource();
    // Reconcile on spec changes (generation) and owned-child changes, not on our own status
    // writes, which would otherwise echo straight back as a new reconcile.
    let (reader, writer) = reflector::store();
    let xds = ctx.xds.clone();
    let listed = reader.clone();
    let queue = ctx.clone();
    let trigger = decoded_filters(&ctx, bad_tx)
        .reflect(writer)
        // The ECDS server and the reconcile queue learn of deletions here (no reconcile runs
        // for a deleted object), and after every full list which filters exist at all.
        .inspect(move |event| match event {
            // The store now holds the status this process wrote: its memo can go.
            Ok(watcher::Event::Apply(wf) | watcher::Event::InitApply(wf)) => {
                queue.written.stored(wf);
            }
            Ok(watcher::Event::Delete(wf)) => {
                queue.written.deleted(wf);
                queue
                    .metrics
                    .queue
                    .started(&queue_key(&ObjectRef::from_obj(wf)));
                if let (Some(xds), Some(name)) = (&xds, ecds_name(wf)) {
                    xds.withdraw(&name);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let state = listed.state();
                let exists: HashSet<String> = state
                    .iter()
                    .map(|wf| queue_key(&ObjectRef::from_obj(&**wf)))
                    .collect();
                queue.metrics.queue.retain(|key| exists.contains(key));
                if let Some(xds) = &xds {
                    xds.sync(
                        state
                            .iter()
                            .filter(|wf| wf.spec.target == Target::Ecds)
                            .filter_map(|wf| ecds_name(wf))
                            .collect(),
                    );
                }
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default())
        .inspect({
            let queue = ctx.clone();
            move |wf| {
                if let Ok(wf) = wf {
                    let key = queue_key(&ObjectRef::from_obj(wf));
                    queue.metrics.queue.request(key);
                }
            }
        });
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
        .scan(
            PodChanges {
                proxy_metrics: ctx.settings.istio_load_status,
                ..PodChanges::default()
            },
            |changes, event| {
                futures::future::ready(Some(match event {
                    Ok(event) => changes.admit(event).map(Ok),
                    Err(e) => Some(Err(e)),
                }))
            },
        )
        .filter_map(futures::future::ready);
    let filters_store = reader.clone();
    let mut controller = Controller::for_stream(trigger, reader)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .owns_stream_with(child_trigger(wp.clone()), wp)
        .owns_stream_with(child_trigger(ef.clone()), ef);
    if ctx.settings.installed.traffic_extension {
        let te = render::traffic_extension_resource();
        controller = controller.owns_stream_with(child_trigger(te.clone()), te);
    }
    let mut controller = controller.watches_stream(pod_trigger, {
        let queue = ctx.clone();
        move |pod: Pod| {
            let ns = pod.namespace();
            let labels = pod.labels().clone();
            let selecting = filters_store
                .state()
                .into_iter()
                .filter(|wf| {
                    wf.namespace() == ns
                        && crate::workloads::selects(&wf.spec.selector.match_labels, &labels)
                })
                .map(|wf| ObjectRef::from_obj(&*wf))
                .collect::<Vec<_>>();
            for filter in &selecting {
                queue.metrics.queue.request(queue_key(filter));
            }
            selecting
        }
    });
    // No `shutdown_on_signal`: on a signal its graceful shutdown drops reconciles in flight and
    // waits for stores that may never fill; the binary handles signals (`Context::stop`).
    // A child touched by someone else while this process applied it.
    if let Some(again) = ctx.again.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let queue = ctx.clone();
        controller = controller.reconcile_on(
            tokio_stream::wrappers::UnboundedReceiverStream::new(again).inspect(move |filter| {
                queue.metrics.queue.request(queue_key(filter));
            }),
        );
    }
    if let Some(events) = xds_events {
        let queue = ctx.clone();
        let answered =
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).filter_map(move |name| {
                let filter = name
                    .split_once('/')
                    .map(|(ns, name)| ObjectRef::<WasmFilter>::new(name).within(ns));
                if let Some(filter) = &filter {
                    queue.metrics.queue.request(queue_key(filter));
                }
                futures::future::ready(filter)
            });
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
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                // Asked for, but gone before its turn: nothing waits for it any more.
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    ctx.metrics.queue.started(&queue_key(&obj));
                }
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
            futures::future::ready(())
        })
        .await;
}

/// Which pod events are worth a reconcile: a change of what decides a verdict, or a deletion.
/// Not the first list: every filter is reconciled when the operator starts anyway (after the
/// pod index is synced), so those events would only reconcile each filter a second time.
#[derive(Default)]
struct PodChanges {
    /// Each known pod's fingerprint, by uid.
    seen: HashMap<String, u64>,
    /// The first list is done.
    listed: bool,
    /// Where an Istio proxy's metrics are (pod IP, status port) counts too
    /// (`--istio-load-status`).
    proxy_metrics: bool,
}

impl PodChanges {
    fn admit(&mut self, event: watcher::Event<Pod>) -> Option<Pod> {
        match event {
            watcher::Event::Init => None,
            watcher::Event::InitDone => {
                self.listed = true;
                None
            }
            watcher::Event::InitApply(pod) => {
                let changed = self.changed(&pod);
                (changed && self.listed).then_some(pod)
            }
            watcher::Event::Apply(pod) => self.changed(&pod).then_some(pod),
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.uid() {
                    self.seen.remove(&uid);
                }
                Some(pod)
            }
        }
    }

    /// Records the pod's fingerprint; whether it differs from the one seen before.
    fn changed(&mut self, pod: &Pod) -> bool {
        let (Some(uid), Some(fp)) = (pod.uid(), workload_fingerprint(pod, self.proxy_metrics))
        else {
            return true;
        };
        self.seen.insert(uid, fp) != Some(fp)
    }
}

/// What about a pod can change a verdict: its labels, its version annotation, its images,
/// and whether it is going away.
fn workload_fingerprint(pod: &Pod, proxy_metrics: bool) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pod.labels().hash(&mut h);
    pod.annotations()
        .get(crate::workloads::ANNOTATION_ENVOY_VERSION)
        .hash(&mut h);
    pod.metadata.deletion_timestamp.is_some().hash(&mut h);
    // Where an Istio proxy's metrics are read (`--istio-load-status`).
    if proxy_metrics {
        pod.annotations()
            .get(crate::workloads::istio::ANNOTATION_STATUS_PORT)
            .hash(&mut h);
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .hash(&mut h);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, app: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "namespace": "ns", "uid": uid, "labels": {"app": app}},
        }))
        .unwrap()
    }

    fn admitted(changes: &mut PodChanges, event: watcher::Event<Pod>) -> bool {
        changes.admit(event).is_some()
    }

    #[test]
    fn a_pod_getting_its_ip_counts_only_where_proxy_metrics_are_read() {
        let with_ip = |mut p: Pod| {
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some("10.0.0.7".into()),
                ..Default::default()
            });
            p
        };
        for proxy_metrics in [false, true] {
            let mut c = PodChanges {
                proxy_metrics,
                ..PodChanges::default()
            };
            assert!(!admitted(&mut c, watcher::Event::InitDone));
            assert!(admitted(&mut c, watcher::Event::Apply(pod("a", "web"))));
            assert_eq!(
                admitted(&mut c, watcher::Event::Apply(with_ip(pod("a", "web")))),
                proxy_metrics
            );
        }
    }

    #[test]
    fn only_changes_after_the_first_list_reconcile() {
        let mut c = PodChanges::default();
        assert!(!admitted(&mut c, watcher::Event::Init));
        assert!(!admitted(
            &mut c,
            watcher::Event::InitApply(pod("a", "web"))
        ));
        assert!(!admitted(&mut c, watcher::Event::InitDone));
        // A status-only update changes no fingerprint; a label change does.
        assert!(!admitted(&mut c, watcher::Event::Apply(pod("a", "web"))));
        assert!(admitted(&mut c, watcher::Event::Apply(pod("a", "api"))));
        assert!(
            admitted(&mut c, watcher::Event::Apply(pod("b", "web"))),
            "a new pod"
        );
        assert!(admitted(&mut c, watcher::Event::Delete(pod("b", "web"))));
        // A re-list (after the watch lost its place) reports only what changed meanwhile.
        assert!(!admitted(&mut c, watcher::Event::Init));
        assert!(!admitted(
            &mut c,
            watcher::Event::InitApply(pod("a", "api"))
        ));
        assert!(admitted(&mut c, watcher::Event::InitApply(pod("c", "web"))));
    }
}
