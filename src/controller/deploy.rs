//! Step 3, deploying: render the Istio child for the target and server-side apply it (or offer
//! the module to the ECDS server), then remove a child of a kind the filter no longer targets.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};

use super::rollout::{self, Phase, Plan, Verdict};
use super::status::{self, Cond};
use super::{Context, Error};
use crate::api::{Revision, Target, WasmFilter, WasmFilterSpec, WorkloadStatus};
use crate::names;
use crate::oci::Artifact;
use crate::render::{self, Module, ecds};
use crate::xds::{Load, Offer, Split, Xds};

/// What deploying did.
#[derive(Debug)]
pub(super) struct Deployed {
    /// The kind of thing that now points at the module (`WasmPlugin`, `EnvoyFilter`,
    /// `ECDS resource`), for status and Events.
    pub kind: &'static str,
    /// What rendering could not express, for the `Deployed` condition.
    pub notes: Vec<String>,
    /// `target: Ecds`: the `Loaded` condition and how many proxies loaded the module.
    pub loaded: Option<(Cond, u32)>,
    /// `target: Ecds` with `spec.rollout`: where the rollout stands.
    pub rollout: Option<rollout::Outcome>,
    /// Look again this soon (Istio proxies not running the filter yet, or refusing it).
    pub recheck: Option<std::time::Duration>,
}

/// Deploys the verified module for the filter's target. `workloads` gain their load state
/// under ECDS.
pub(super) async fn deploy(
    wf: &WasmFilter,
    ns: &str,
    artifact: &Artifact,
    workloads: &mut [WorkloadStatus],
    ctx: &Context,
) -> Result<Deployed, Error> {
    let deployed = match (wf.spec.target, &ctx.xds) {
        (Target::Ecds, Some(xds)) => {
            let served = serve_ecds(wf, ctx, xds, ns, artifact, workloads).await?;
            Deployed {
                kind: status::ECDS_KIND,
                notes: Vec::new(),
                loaded: Some(served.loaded),
                rollout: served.rollout,
                recheck: None,
            }
        }
        _ => {
            let module = Module {
                sha256: artifact.module_sha256.clone(),
            };
            let target = render::resolve_target(wf.spec.target, ctx.settings.installed);
            let child = render::child(wf, target, &module, &ctx.settings.module_server)?;
            let kind = &child.resource.kind;
            // Left out when the child already holds exactly this from our last apply.
            if let Some(ticket) = ctx
                .children
                .needs_apply(kind, ns, &wf.name_any(), &child.object)
            {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(ctx.client.clone(), ns, &child.resource);
                let pp = PatchParams::apply(names::FIELD_MANAGER).force();
                let applied = api
                    .patch(&wf.name_any(), &pp, &Patch::Apply(&child.object))
                    .await
                    .map_err(|source| Error::ApplyChild {
                        kind: kind.clone(),
                        name: wf.name_any(),
                        source,
                    })?;
                ctx.children.applied(ticket, &applied);
            }
            if let (Some(xds), Some(name)) = (&ctx.xds, ecds_name(wf)) {
                xds.withdraw(&name);
            }
            let loaded = match target {
                Target::WasmPlugin | Target::TrafficExtension | Target::EnvoyFilter
                    if ctx.settings.istio_load_status =>
                {
                    Some(istio_loads(wf, ns, target, &module.sha256, workloads, ctx).await)
                }
                _ => None,
            };
            let recheck = loaded.as_ref().and_then(|(l, _)| match l.reason.as_str() {
                names::reason::LOAD_PENDING => Some(ISTIO_PENDING_RECHECK),
                names::reason::LOAD_FAILED => Some(ISTIO_FAILED_RECHECK),
                // Selected pods whose agents did not answer (yet: an agent still starting
                // serves its metrics seconds after the pod has its IP, and nothing else would
                // look again before the resync).
                names::reason::PROXY_METRICS_UNREAD if !workloads.is_empty() => {
                    Some(ISTIO_FAILED_RECHECK)
                }
                _ => None,
            });
            Deployed {
                kind: match target {
                    Target::EnvoyFilter => "EnvoyFilter",
                    Target::TrafficExtension => "TrafficExtension",
                    _ => "WasmPlugin",
                },
                notes: child.notes,
                loaded,
                rollout: None,
                recheck,
            }
        }
    };
    if may_have_stale_children(wf) {
        remove_other_children(wf, ctx, ns).await?;
    }
    Ok(deployed)
}

/// How soon an Istio proxy that does not run the filter yet is looked at again.
const ISTIO_PENDING_RECHECK: std::time::Duration = std::time::Duration::from_secs(3);
/// How soon one that refused it (or whose agent could not fetch it), or whose metrics could
/// not be read, is looked at again.
const ISTIO_FAILED_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);
/// How long one proxy's metrics may take.
const ISTIO_METRICS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Proxies whose metrics are read at once.
const ISTIO_METRICS_CONCURRENCY: usize = 16;
/// Proxies whose metrics one reconcile reads, at most.
const ISTIO_METRICS_MAX_PODS: usize = 100;

/// `--istio-load-status`: what each selected Istio proxy's metrics say about the filter, into
/// `workloads` and the `Loaded` condition. A pod without an IP, or whose metrics cannot be
/// read, stays as it was: unknown.
async fn istio_loads(
    wf: &WasmFilter,
    ns: &str,
    target: Target,
    module_sha256: &str,
    workloads: &mut [WorkloadStatus],
    ctx: &Context,
) -> (Cond, u32) {
    use crate::workloads::istio;
    use futures::StreamExt;
    let plugin = istio::plugin_name(ns, &wf.name_any(), target == Target::WasmPlugin);
    let read = if target == Target::EnvoyFilter {
        istio::read_envoy_filter
    } else {
        istio::read
    };
    // Where each selected pod's metrics are: its IP (once it has one) and status port.
    let at: std::collections::HashMap<String, (String, u16)> = ctx
        .pods
        .select(ns, &wf.spec.selector.match_labels)
        .iter()
        .filter_map(|p| Some((p.name.clone(), (p.ip.clone()?, p.status_port))))
        .collect();
    // Owned inputs, so the futures borrow nothing from this reconcile.
    // The first ones (most urgent first) only: a scrape per pod per reconcile.
    let targets: Vec<Option<(String, u16)>> = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            at.get(&w.name)
                .filter(|_| i < ISTIO_METRICS_MAX_PODS)
                .cloned()
        })
        .collect();
    let loads: Vec<Option<istio::ProxyLoad>> = futures::stream::iter(targets)
        .map(|target| {
            let plugin = plugin.clone();
            async move {
                let (ip, port) = target?;
                let text = istio::scrape(&ip, port, ISTIO_METRICS_TIMEOUT).await?;
                Some(read(&text, &plugin))
            }
        })
        .buffered(ISTIO_METRICS_CONCURRENCY)
        .collect()
        .await;
    status::istio_loaded(workloads, &loads, status::short(module_sha256))
}

/// Whether a child of another kind than the target may exist. Not for a filter without any
/// status (the operator writes one before it first applies a child, so none was ever applied
/// for it), nor when the status says this very generation was deployed (the reconcile that
/// deployed it removed them): new filters, resyncs and the reconcile the child's own creation
/// triggers cost no lookups. A failure keeps the previous module (`KeptPreviousModule`),
/// which does not count.
pub(super) fn may_have_stale_children(wf: &WasmFilter) -> bool {
    let Some(s) = &wf.status else { return false };
    let deployed = s.conditions.iter().any(|c| {
        c.type_ == names::condition::DEPLOYED
            && c.status == "True"
            && c.reason == names::reason::DEPLOYED
    });
    !(deployed
        && s.observed_generation.is_some()
        && s.observed_generation == wf.metadata.generation)
}

/// Kinds of child the filter must not have, given its target (a TrafficExtension only where
/// its CRD is installed: there is none to look up otherwise).
pub(super) fn other_kinds(target: Target, installed: render::Installed) -> Vec<ApiResource> {
    let current = match render::resolve_target(target, installed) {
        Target::WasmPlugin => Some(render::wasm_plugin_resource().kind),
        Target::EnvoyFilter => Some(render::envoy_filter_resource().kind),
        Target::TrafficExtension => Some(render::traffic_extension_resource().kind),
        Target::Auto | Target::Ecds => None,
    };
    let mut kinds = vec![
        render::wasm_plugin_resource(),
        render::envoy_filter_resource(),
    ];
    if installed.traffic_extension {
        kinds.push(render::traffic_extension_resource());
    }
    kinds
        .into_iter()
        .filter(|ar| current.as_ref() != Some(&ar.kind))
        .collect()
}

/// Deletes a child of a kind the filter no longer targets (after `target` changed), but only
/// one this filter owns.
async fn remove_other_children(wf: &WasmFilter, ctx: &Context, ns: &str) -> Result<(), Error> {
    let uid = wf.uid();
    for ar in other_kinds(wf.spec.target, ctx.settings.installed) {
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

/// The ECDS resource name of a filter.
pub(super) fn ecds_name(wf: &WasmFilter) -> Option<String> {
    Some(ecds::resource_name(
        wf.metadata.namespace.as_deref()?,
        wf.metadata.name.as_deref()?,
    ))
}

/// After a failed or blocked reconcile: proxies keep what they were sent, and a restarted
/// operator's ECDS server stops waiting for this filter.
pub(super) fn kept_previous(wf: &WasmFilter, ctx: &Context) {
    if wf.spec.target == Target::Ecds
        && let (Some(xds), Some(name)) = (&ctx.xds, ecds_name(wf))
    {
        xds.decided(&name);
    }
}

/// Offers the verified module to the ECDS server for the selected pods (in steps, with
/// `spec.rollout`), and reads back what each connected Envoy did with it: the `Loaded`
/// condition, how many loaded it, and where a rollout stands.
async fn serve_ecds(
    wf: &WasmFilter,
    ctx: &Context,
    xds: &Xds,
    ns: &str,
    artifact: &Artifact,
    workloads: &mut [WorkloadStatus],
) -> Result<Ecds, Error> {
    let name = ecds::resource_name(ns, &wf.name_any());
    let sha = &artifact.module_sha256;
    let offer = offer(ctx, xds, &name, &wf.spec, sha, None).await?;
    let selected: BTreeSet<String> = workloads.iter().map(|w| w.name.clone()).collect();
    let Some(spec_rollout) = &wf.spec.rollout else {
        xds.publish(&name, ns, selected, Some(offer), None);
        let current = ecds::version_base(&wf.spec, sha);
        let loads: Vec<_> = workloads
            .iter()
            .map(|w| xds.load(&name, ns, &w.name, &current))
            .collect();
        let loaded = status::loaded(workloads, &loads, &name, status::short(sha));
        return Ok(Ecds {
            loaded,
            rollout: None,
        });
    };
    let pods: Vec<String> = selected.iter().cloned().collect();
    let previous = wf.status.as_ref().and_then(|s| s.rollout.as_ref());
    // A filter that gains `spec.rollout` steps from what its proxies were given until now.
    let fallback = match previous.and_then(|p| p.stable.as_ref()) {
        Some(_) => None,
        None => xds.offered(&name).map(|o| {
            let deployed = wf.status.as_ref().and_then(|s| s.artifact.as_ref());
            let mut rev = rollout::revision(
                &o.spec,
                &Artifact {
                    module_sha256: o.module_sha256.clone(),
                    ..artifact.clone()
                },
            );
            let same = deployed.filter(|a| a.module_sha256 == o.module_sha256);
            rev.image = same.map(|a| a.image.clone());
            rev.manifest_digest = same.map(|a| a.manifest_digest.clone());
            rev
        }),
    };
    let generation = wf.metadata.generation.unwrap_or(0);
    let now = jiff::Timestamp::now();
    let mut plan = rollout::plan(
        spec_rollout,
        previous,
        fallback,
        rollout::revision(&wf.spec, artifact),
        generation,
        &pods,
        now,
    );
    let mut just_rolled_back = false;
    let mut wait = None;
    // Each round advances a step or stops: bounded by the number of steps.
    for _ in 0..spec_rollout.steps.len() + 2 {
        publish_plan(ctx, xds, wf, ns, &name, &selected, &plan, &offer).await?;
        let loads: Vec<(&str, Option<Load>)> = plan_canary(&plan)
            .map(|pod| {
                let load = xds.load(&name, ns, pod, &plan.candidate.version);
                (pod.as_str(), load)
            })
            .collect();
        match rollout::judge(
            spec_rollout,
            &plan,
            loads.iter().map(|(p, l)| (*p, l.as_ref())),
            now,
        ) {
            Verdict::Settled => break,
            Verdict::Wait(after) => {
                wait = after;
                break;
            }
            Verdict::Advance => plan = rollout::advance(spec_rollout, plan, &pods, now),
            Verdict::RollBack(refused) => {
                plan = rollout::roll_back(plan, &refused, generation, now);
                publish_plan(ctx, xds, wf, ns, &name, &selected, &plan, &offer).await?;
                just_rolled_back = true;
                break;
            }
        }
    }
    let loads: Vec<_> = workloads
        .iter()
        .map(|w| xds.load(&name, ns, &w.name, &plan.revision_of(&w.name).version))
        .collect();
    for w in workloads.iter_mut() {
        w.revision = plan.label_of(&w.name).map(str::to_string);
    }
    let module = match (&plan.phase, &plan.stable) {
        (Phase::Stepping { .. }, Some(stable)) => format!(
            "{} (candidate) or sha256:{} (stable)",
            status::short(sha),
            status::short(&stable.module_sha256)
        ),
        (Phase::RolledBack, Some(stable)) => status::short(&stable.module_sha256).to_string(),
        _ => status::short(sha).to_string(),
    };
    let loaded = status::loaded(workloads, &loads, &name, &module);
    let describe = rollout::describe(spec_rollout, &plan, pods.len());
    Ok(Ecds {
        loaded,
        rollout: Some(rollout::Outcome {
            running: matches!(plan.phase, Phase::Stepping { .. }).then(|| describe.clone()),
            rolled_back: rollout::rolled_back_message(&plan, pods.len())
                .map(|m| (m, just_rolled_back)),
            status: plan.status,
            wait,
        }),
    })
}

/// What serving a filter over ECDS found.
pub(super) struct Ecds {
    loaded: (Cond, u32),
    rollout: Option<rollout::Outcome>,
}

/// The pods given the candidate in this plan's step.
fn plan_canary(plan: &Plan) -> impl Iterator<Item = &String> {
    match &plan.phase {
        Phase::Stepping { canary, .. } => Some(canary.iter()),
        _ => None,
    }
    .into_iter()
    .flatten()
}

/// Tells the ECDS server what `plan` gives each selected pod.
#[allow(clippy::too_many_arguments)]
async fn publish_plan(
    ctx: &Context,
    xds: &Xds,
    wf: &WasmFilter,
    ns: &str,
    name: &str,
    selected: &BTreeSet<String>,
    plan: &Plan,
    candidate: &Arc<Offer>,
) -> Result<(), Error> {
    let stable = match &plan.stable {
        Some(rev) if plan.phase != Phase::Settled => {
            let spec = rollout::spec_of(rev, &wf.spec);
            Some(offer(ctx, xds, name, &spec, &rev.module_sha256, Some((wf, rev))).await?)
        }
        _ => None,
    };
    let (offer, split) = match (&plan.phase, stable) {
        (Phase::Stepping { canary, .. }, Some(stable)) => (
            candidate.clone(),
            Some(Split {
                stable,
                candidate_pods: canary.clone(),
            }),
        ),
        (Phase::RolledBack, Some(stable)) => (stable, None),
        _ => (candidate.clone(), None),
    };
    xds.publish(name, ns, selected.clone(), Some(offer), split);
    Ok(())
}

/// The offer of module `sha` with `spec`: the one the server holds when it is the same, else
/// built from the cache (fetched first, for a stable revision the cache lost).
async fn offer(
    ctx: &Context,
    xds: &Xds,
    name: &str,
    spec: &WasmFilterSpec,
    sha: &str,
    refetch: Option<(&WasmFilter, &Revision)>,
) -> Result<Arc<Offer>, Error> {
    let held = [xds.offered(name), xds.offered_stable(name)];
    if let Some(o) = held
        .iter()
        .flatten()
        .find(|o| o.module_sha256 == sha && o.spec == *spec)
    {
        return Ok(o.clone());
    }
    // The bytes are in memory already when the same module is offered again.
    let module = match held.into_iter().flatten().find(|o| o.module_sha256 == sha) {
        Some(o) => o.module.clone(),
        None => {
            if let Some((wf, rev)) = refetch
                && !ctx.cache.contains(sha)
            {
                fetch_revision(ctx, wf, rev).await?;
            }
            Arc::new(ctx.cache.read_off_thread(sha).await?)
        }
    };
    let info = ctx.module_info(sha).await?;
    Ok(Arc::new(Offer::new(
        spec.clone(),
        sha.to_string(),
        module,
        info,
    )))
}

/// Pulls a stable revision's module again, by the digest it was pinned to.
async fn fetch_revision(ctx: &Context, wf: &WasmFilter, rev: &Revision) -> Result<(), Error> {
    let (Some(image), Some(digest)) = (&rev.image, &rev.manifest_digest) else {
        return Err(crate::cache::Error::Missing {
            sha256: rev.module_sha256.clone(),
        }
        .into());
    };
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    let creds = ctx.pull_credentials(wf, &ns).await?;
    ctx.resolver
        .fetch(
            image,
            Some(digest),
            Some(&rev.module_sha256),
            &ctx.cache,
            &creds,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WasmFilterStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn filter(generation: i64, status: Option<(i64, &str, &str)>) -> WasmFilter {
        let mut wf: WasmFilter = serde_json::from_value(serde_json::json!({
            "apiVersion": "wasmfilter.dev/v1alpha1",
            "kind": "WasmFilter",
            "metadata": {"name": "f", "namespace": "ns", "generation": generation},
            "spec": {
                "module": {"image": "r.example/m:v1"},
                "selector": {"matchLabels": {"app": "web"}},
                "target": "WasmPlugin",
            }
        }))
        .unwrap();
        wf.status = status.map(|(observed, deployed, reason)| WasmFilterStatus {
            observed_generation: Some(observed),
            conditions: vec![Condition {
                type_: names::condition::DEPLOYED.into(),
                status: deployed.into(),
                reason: reason.into(),
                message: String::new(),
                observed_generation: Some(observed),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
            }],
            ..Default::default()
        });
        wf
    }

    #[test]
    fn stale_children_are_looked_for_only_when_the_generation_is_not_yet_deployed() {
        assert!(
            !may_have_stale_children(&filter(1, None)),
            "a new filter has no child yet"
        );
        let reconciling = filter(1, Some((0, "Unknown", "Reconciling")));
        assert!(
            may_have_stale_children(&reconciling),
            "a child may have been applied"
        );
        let target_may_have_changed = filter(2, Some((1, "True", "Deployed")));
        assert!(may_have_stale_children(&target_may_have_changed));
        assert!(may_have_stale_children(&filter(
            2,
            Some((2, "False", "ApplyWasmPlugin"))
        )));
        // This generation failed to resolve: the old child (maybe of the old target) stays.
        let kept = filter(2, Some((2, "True", "KeptPreviousModule")));
        assert!(may_have_stale_children(&kept));
        assert!(!may_have_stale_children(&filter(
            2,
            Some((2, "True", "Deployed"))
        )));
    }

    #[test]
    fn a_target_switch_removes_every_other_kind() {
        let kinds = |t, traffic_extension| {
            other_kinds(t, render::Installed { traffic_extension })
                .into_iter()
                .map(|a| a.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(Target::WasmPlugin, false), ["EnvoyFilter"]);
        assert_eq!(kinds(Target::EnvoyFilter, false), ["WasmPlugin"]);
        assert_eq!(kinds(Target::Ecds, false), ["WasmPlugin", "EnvoyFilter"]);
        assert_eq!(kinds(Target::Auto, false), ["EnvoyFilter"]);
        assert_eq!(
            kinds(Target::WasmPlugin, true),
            ["EnvoyFilter", "TrafficExtension"]
        );
        assert_eq!(
            kinds(Target::TrafficExtension, true),
            ["WasmPlugin", "EnvoyFilter"]
        );
        assert_eq!(kinds(Target::Auto, true), ["WasmPlugin", "EnvoyFilter"]);
        assert_eq!(
            kinds(Target::Ecds, true),
            ["WasmPlugin", "EnvoyFilter", "TrafficExtension"]
        );
    }
}
