//! Step 2, the workloads: every selected pod's Envoy and whether it will load the module, the
//! `Compatible` condition they add up to, and the verdict `spec.onIncompatible` makes of it.

use super::status::{self, Cond};
use super::{Context, Error};
use crate::api::{OnIncompatible, Target, WasmFilter, WorkloadStatus};

/// What the selected workloads make of the module.
#[derive(Debug)]
pub(super) struct Assessment {
    /// Every selected pod's verdict, most urgent first.
    pub workloads: Vec<WorkloadStatus>,
    pub compatible: Cond,
}

/// What to do with a module, given the workloads' verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Every workload that can be checked will load it.
    Deploy,
    /// Some refuse it, and `onIncompatible: Warn` deploys it anyway (with a Warning Event).
    Warn,
    /// Some refuse it, and `onIncompatible: Block` keeps it (and the child) as it was.
    Block,
}

/// The verdict of `policy` on the `Compatible` condition.
pub(super) fn verdict(policy: OnIncompatible, compatible: &Cond) -> Verdict {
    match (compatible.status == "False", policy) {
        (false, _) => Verdict::Deploy,
        (true, OnIncompatible::Warn) => Verdict::Warn,
        (true, OnIncompatible::Block) => Verdict::Block,
    }
}

/// Every selected pod's verdict, from the operator's own pod index (no LIST per reconcile),
/// matched on the selector's structured labels. For `target: Ecds`, a pod whose Envoy is
/// connected is checked against the version that Envoy reported.
pub(super) async fn assess(
    wf: &WasmFilter,
    ns: &str,
    module_sha256: &str,
    ctx: &Context,
) -> Result<Assessment, Error> {
    let info = ctx.module_info(module_sha256).await?;
    let selected = ctx.pods.select(ns, &wf.spec.selector.match_labels);
    let live = ctx.xds.as_ref().filter(|_| wf.spec.target == Target::Ecds);
    let workloads = crate::workloads::assess_all(selected.iter().map(|p| &**p), &info, |p| {
        live.and_then(|x| x.node_version(ns, &p.name))
    });
    let compatible = status::compatibility(&workloads, workloads.len());
    Ok(Assessment {
        workloads,
        compatible,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_warn_differ_only_when_a_workload_refuses() {
        let ok = Cond::new("Compatible", true, "AllCompatible", "every pod loads it");
        let unknown = Cond::new("Compatible", true, "UnknownEnvoyVersion", "one is unknown");
        let refused = Cond::new("Compatible", false, "Incompatible", "web-1 refuses it");
        for policy in [OnIncompatible::Warn, OnIncompatible::Block] {
            assert_eq!(verdict(policy, &ok), Verdict::Deploy);
            assert_eq!(verdict(policy, &unknown), Verdict::Deploy);
        }
        assert_eq!(verdict(OnIncompatible::Warn, &refused), Verdict::Warn);
        assert_eq!(verdict(OnIncompatible::Block, &refused), Verdict::Block);
    }
}
