//! Step 3, deploying: render the Istio child for the target and server-side apply it (or offer
//! the module to the ECDS server), then remove a child of a kind the filter no longer targets.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};

use super::status::{self, Cond};
use super::{Context, Error};
use crate::api::{Target, WasmFilter, WorkloadStatus};
use crate::names;
use crate::oci::Artifact;
use crate::render::{self, Module, ecds};
use crate::xds::{Offer, Xds};

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
        (Target::Ecds, Some(xds)) => Deployed {
            kind: "ECDS resource",
            notes: Vec::new(),
            loaded: Some(serve_ecds(wf, ctx, xds, ns, artifact, workloads).await?),
        },
        _ => {
            let module = Module {
                sha256: artifact.module_sha256.clone(),
            };
            let child = render::child(wf, &module, &ctx.settings.module_server)?;
            let api: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), ns, &child.resource);
            let pp = PatchParams::apply(names::FIELD_MANAGER).force();
            let applied = api
                .patch(&wf.name_any(), &pp, &Patch::Apply(&child.object))
                .await
                .map_err(|source| Error::ApplyChild {
                    kind: child.resource.kind.clone(),
                    name: wf.name_any(),
                    source,
                })?;
            ctx.remember_applied(&child.resource.kind, &applied);
            if let (Some(xds), Some(name)) = (&ctx.xds, ecds_name(wf)) {
                xds.withdraw(&name);
            }
            Deployed {
                kind: if child.resource.kind == render::envoy_filter_resource().kind {
                    "EnvoyFilter"
                } else {
                    "WasmPlugin"
                },
                notes: child.notes,
                loaded: None,
            }
        }
    };
    if may_have_stale_children(wf) {
        remove_other_children(wf, ctx, ns).await?;
    }
    Ok(deployed)
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

/// Kinds of child the filter must not have, given its target.
pub(super) fn other_kinds(target: Target) -> Vec<ApiResource> {
    let current = match target {
        Target::WasmPlugin => Some(render::wasm_plugin_resource().kind),
        Target::EnvoyFilter => Some(render::envoy_filter_resource().kind),
        Target::Ecds => None,
    };
    [
        render::wasm_plugin_resource(),
        render::envoy_filter_resource(),
    ]
    .into_iter()
    .filter(|ar| current.as_ref() != Some(&ar.kind))
    .collect()
}

/// Deletes a child of a kind the filter no longer targets (after `target` changed), but only
/// one this filter owns.
async fn remove_other_children(wf: &WasmFilter, ctx: &Context, ns: &str) -> Result<(), Error> {
    let uid = wf.uid();
    for ar in other_kinds(wf.spec.target) {
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

/// Offers the verified module to the ECDS server for the selected pods, and reads back what
/// each connected Envoy did with it: the `Loaded` condition and how many loaded it.
async fn serve_ecds(
    wf: &WasmFilter,
    ctx: &Context,
    xds: &Xds,
    ns: &str,
    artifact: &Artifact,
    workloads: &mut [WorkloadStatus],
) -> Result<(Cond, u32), Error> {
    let name = ecds::resource_name(ns, &wf.name_any());
    let sha = &artifact.module_sha256;
    let offer = match xds.offered(&name) {
        Some(o) if o.module_sha256 == *sha && o.spec == wf.spec => o,
        previous => {
            // The bytes are in memory already when the same module is offered again.
            let module = match previous.filter(|o| o.module_sha256 == *sha) {
                Some(o) => o.module.clone(),
                None => Arc::new(ctx.cache.read_off_thread(sha).await?),
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
        let kinds = |t| {
            other_kinds(t)
                .into_iter()
                .map(|a| a.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(Target::WasmPlugin), ["EnvoyFilter"]);
        assert_eq!(kinds(Target::EnvoyFilter), ["WasmPlugin"]);
        assert_eq!(kinds(Target::Ecds), ["WasmPlugin", "EnvoyFilter"]);
    }
}
