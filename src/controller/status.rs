//! Conditions and the status document, computed from values (no client).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::Error;
use crate::api::{
    ArtifactStatus, RolloutStatus, SignatureStatus, WasmFilter, WasmFilterStatus, WorkloadStatus,
};
use crate::error::Retry;
use crate::names::{condition, reason};
use crate::oci::Artifact;
use crate::workloads::istio::ProxyLoad;
use crate::xds::Load;

/// A condition as the operator means it; `lastTransitionTime` is filled in against the previous
/// status so it only moves when the status does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Self {
        Cond {
            type_,
            status: if ok { "True" } else { "False" },
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    pub fn unknown(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Cond {
            type_,
            status: "Unknown",
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    /// The same condition as it stood in a previous status.
    fn carried(type_: &'static str, c: &Condition) -> Self {
        Cond {
            type_,
            status: match c.status.as_str() {
                "True" => "True",
                "False" => "False",
                _ => "Unknown",
            },
            reason: c.reason.clone(),
            message: c.message.clone(),
        }
    }
}

/// How many workloads status lists by name.
pub const MAX_LISTED_WORKLOADS: usize = 100;

/// The `Compatible` condition for the selected workloads (`total` of them; `workloads` may
/// list fewer).
pub fn compatibility(workloads: &[WorkloadStatus], total: usize) -> Cond {
    use crate::names::reason as r;
    if total == 0 {
        return Cond::new(
            condition::COMPATIBLE,
            true,
            r::NO_WORKLOADS,
            "no pod matches the selector yet; each one is checked as it appears",
        );
    }
    let describe = |w: &WorkloadStatus| {
        format!(
            "{} (Envoy {}): {}",
            w.name,
            w.envoy_version.as_deref().unwrap_or("unknown"),
            w.reasons.first().map(String::as_str).unwrap_or("")
        )
    };
    let list = |ws: Vec<&WorkloadStatus>| first_three(ws.into_iter().map(describe).collect());
    let refusing: Vec<_> = workloads
        .iter()
        .filter(|w| w.compatible == Some(false))
        .collect();
    if !refusing.is_empty() {
        return Cond::new(
            condition::COMPATIBLE,
            false,
            r::INCOMPATIBLE,
            format!(
                "{} of {total} selected workloads would refuse the module: {}",
                refusing.len(),
                list(refusing)
            ),
        );
    }
    let unknown: Vec<_> = workloads
        .iter()
        .filter(|w| w.compatible.is_none())
        .collect();
    if !unknown.is_empty() {
        return Cond::unknown(
            condition::COMPATIBLE,
            r::ENVOY_VERSION_UNKNOWN,
            format!(
                "{} of {total} selected workloads cannot be checked: {}",
                unknown.len(),
                list(unknown)
            ),
        );
    }
    let mut versions: Vec<&str> = workloads
        .iter()
        .filter_map(|w| w.envoy_version.as_deref())
        .collect();
    versions.sort();
    versions.dedup();
    Cond::new(
        condition::COMPATIBLE,
        true,
        r::COMPATIBLE,
        format!(
            "the Envoy of every selected workload loads the module ({total} workload{}; Envoy {})",
            if total == 1 { "" } else { "s" },
            versions.join(", ")
        ),
    )
}

/// Turns `conds` into API conditions, keeping each one's transition time when its status did
/// not change.
pub fn conditions(
    previous: &[Condition],
    conds: &[Cond],
    generation: Option<i64>,
) -> Vec<Condition> {
    let now = Time(jiff::Timestamp::now());
    conds
        .iter()
        .map(|c| {
            let status = c.status;
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

pub fn artifact_status(a: &Artifact) -> ArtifactStatus {
    let hex = a.manifest_digest.trim_start_matches("sha256:");
    ArtifactStatus {
        image: a.image.clone(),
        manifest_digest: a.manifest_digest.clone(),
        short_digest: hex.chars().take(12).collect(),
        module_sha256: a.module_sha256.clone(),
        size: a.size,
        format: a.format.as_str().to_string(),
        abi_version: a.abi_version.clone(),
        declared_abi_versions: a.declared_abi_versions.clone(),
        root_ids: a.root_ids.clone(),
        previous_manifest_digest: None,
        signature: a.signature.as_ref().map(|v| SignatureStatus {
            scheme: v.scheme.clone(),
            key: v.key.clone(),
            key_fingerprint: v.key_fingerprint.clone(),
            signature_digest: v.signature_digest.clone(),
        }),
        preflight_passed: a.preflight_passed.clone(),
    }
}

/// The first 12 hex characters of a sha256, as status and Events show it.
pub(super) fn short(sha: &str) -> &str {
    &sha[..12.min(sha.len())]
}

/// The first three of `items` joined with `; `, and how many more there are.
fn first_three(items: Vec<String>) -> String {
    let more = items.len().saturating_sub(3);
    let mut parts: Vec<String> = items.into_iter().take(3).collect();
    if more > 0 {
        parts.push(format!("and {more} more"));
    }
    parts.join("; ")
}

/// What `Deployed` calls an ECDS deployment.
pub const ECDS_KIND: &str = "ECDS resource";

/// The selected workloads, as a successful reconcile found them.
#[derive(Debug, Clone)]
pub struct Workloads {
    /// Every selected pod, most urgent first (status lists the first [`MAX_LISTED_WORKLOADS`]).
    pub all: Vec<WorkloadStatus>,
    pub compatible: Cond,
    /// `target: Ecds` (and Istio targets with `--istio-load-status`): the `Loaded` condition
    /// and how many pods' Envoys loaded the module.
    pub loaded: Option<(Cond, u32)>,
    /// `spec.rollout`: `status.rollout`, and what the rollout is at while steps remain.
    pub rollout: Option<(RolloutStatus, Option<String>)>,
}

/// Status after a successful reconcile.
pub fn ready(
    wf: &WasmFilter,
    artifact: &Artifact,
    child_kind: &str,
    notes: &[String],
    workloads: Workloads,
) -> WasmFilterStatus {
    let previous = wf
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let short = short(&artifact.module_sha256);
    let mut deployed = format!(
        "{child_kind} {} points at module sha256:{short}",
        wf.metadata.name.as_deref().unwrap_or_default()
    );
    for n in notes {
        deployed.push_str("; note: ");
        deployed.push_str(n);
    }
    let old = wf.status.as_ref().and_then(|s| s.artifact.as_ref());
    let previous_manifest_digest = match old {
        Some(o) if o.image == artifact.image && o.manifest_digest != artifact.manifest_digest => {
            Some(o.manifest_digest.clone())
        }
        Some(o) if o.manifest_digest == artifact.manifest_digest => {
            o.previous_manifest_digest.clone()
        }
        _ => None,
    };
    let mut resolved = format!(
        "{} resolved to {} ({}, {} bytes, module sha256:{})",
        artifact.image,
        artifact.manifest_digest,
        artifact.format,
        artifact.size,
        artifact.module_sha256
    );
    if let Some(prev) = &previous_manifest_digest {
        resolved.push_str(&format!("; the tag moved from {prev}"));
    }
    if let Some(note) = declared_abi_note(artifact) {
        resolved.push_str("; ");
        resolved.push_str(&note);
    }
    let Workloads {
        mut all,
        compatible,
        loaded,
        rollout,
    } = workloads;
    let running = rollout.as_ref().and_then(|(_, r)| r.clone());
    // Ready waits for the proxies that were sent the module, and fails with them; then for a
    // rollout's remaining steps.
    let ready = match &loaded {
        Some((l, _)) if l.status == "False" => {
            Cond::new(condition::READY, false, &l.reason, l.message.clone())
        }
        Some((l, _)) if l.reason == reason::LOAD_PENDING => {
            Cond::new(condition::READY, false, &l.reason, l.message.clone())
        }
        Some(_) if running.is_some() => Cond::new(
            condition::READY,
            false,
            reason::ROLLOUT_IN_PROGRESS,
            running.clone().unwrap_or_default(),
        ),
        Some(_) if child_kind == ECDS_KIND => Cond::new(
            condition::READY,
            true,
            reason::READY,
            "module verified, served over ECDS, and loaded by every connected proxy it was sent to",
        ),
        Some(_) => Cond::new(
            condition::READY,
            true,
            reason::READY,
            "module verified, deployed, and running in every proxy whose metrics tell (see Loaded)",
        ),
        None => Cond::new(
            condition::READY,
            true,
            reason::READY,
            "module verified and deployed",
        ),
    };
    let mut conds = vec![
        Cond::new(condition::RESOLVED, true, reason::RESOLVED, resolved),
        compatible,
        Cond::new(condition::DEPLOYED, true, reason::DEPLOYED, deployed),
    ];
    let loaded_count = loaded.as_ref().map(|(_, n)| *n);
    conds.extend(loaded.map(|(l, _)| l));
    conds.push(ready);
    // kstatus: a rollout with steps left is work in progress.
    if let Some(r) = &running {
        conds.push(Cond::new(
            condition::RECONCILING,
            true,
            reason::ROLLOUT_IN_PROGRESS,
            r.clone(),
        ));
    }
    let selected = u32::try_from(all.len()).unwrap_or(u32::MAX);
    all.truncate(MAX_LISTED_WORKLOADS);
    // While steps remain, the module every pod has is still the previous one.
    let artifact = match (&running, old) {
        (Some(_), Some(old)) => old.clone(),
        _ => ArtifactStatus {
            previous_manifest_digest,
            ..artifact_status(artifact)
        },
    };
    WasmFilterStatus {
        observed_generation: wf.metadata.generation,
        conditions: conditions(previous, &conds, wf.metadata.generation),
        artifact: Some(artifact),
        workloads: all,
        selected_workloads: Some(selected),
        loaded_workloads: loaded_count,
        rollout: rollout.map(|(s, _)| s),
    }
}

/// Writes each pod's load state (`loads[i]` for `workloads[i]`, `None`: no proxy of it is
/// connected) into its status, and sums them up as the `Loaded` condition with the number
/// that loaded. `filter` is the ECDS name, `module` the short sha256.
pub fn loaded(
    workloads: &mut [WorkloadStatus],
    loads: &[Option<Load>],
    filter: &str,
    module: &str,
) -> (Cond, u32) {
    let mut failed = Vec::new();
    let mut not_sent = Vec::new();
    let mut pending = 0usize;
    let mut connected = 0usize;
    let mut ok = 0u32;
    for (w, load) in workloads.iter_mut().zip(loads) {
        let Some(load) = load else { continue };
        connected += 1;
        let (l, e) = match load {
            Load::Loaded => {
                ok += 1;
                (Some(true), None)
            }
            Load::Failed(e) => {
                failed.push((w.name.clone(), reason::LOAD_FAILED, e.clone()));
                (Some(false), Some(e.clone()))
            }
            Load::NotSubscribed => {
                let e = format!(
                    "its Envoy is connected but subscribes to no ECDS filter named {filter:?}: add \
                     the entry `wasmfilter ecds-entry {filter}` prints to its filter chain"
                );
                failed.push((w.name.clone(), reason::NOT_SUBSCRIBED, e.clone()));
                (Some(false), Some(e))
            }
            Load::NotSent(why) => {
                not_sent.push(w.name.clone());
                (Some(false), Some(format!("not sent: {why}")))
            }
            Load::Pending => {
                pending += 1;
                (None, None)
            }
        };
        w.loaded = l;
        w.load_error = e;
    }
    let skipped = if not_sent.is_empty() {
        String::new()
    } else {
        format!(
            "; not sent to {} whose Envoy would refuse it ({})",
            not_sent.len(),
            not_sent.join(", ")
        )
    };
    let sent = connected - not_sent.len();
    let cond = if !failed.is_empty() {
        // The reason of the most telling failure: Envoy's refusal first.
        let why = failed
            .iter()
            .map(|(_, r, _)| *r)
            .find(|r| *r == reason::LOAD_FAILED)
            .unwrap_or(failed[0].1);
        let parts = first_three(
            failed
                .iter()
                .map(|(pod, _, e)| format!("{pod}: {e}"))
                .collect(),
        );
        let kept = if why == reason::LOAD_FAILED {
            " (a proxy that refused it keeps the config it had)"
        } else {
            ""
        };
        Cond::new(
            condition::LOADED,
            false,
            why,
            format!(
                "{} of {sent} connected proxies did not load module sha256:{module}{kept}: {parts}{skipped}",
                failed.len(),
            ),
        )
    } else if pending > 0 {
        Cond::unknown(
            condition::LOADED,
            reason::LOAD_PENDING,
            format!("waiting for {pending} of {sent} connected proxies to answer{skipped}"),
        )
    } else if connected == 0 {
        Cond::unknown(
            condition::LOADED,
            reason::NO_PROXY_CONNECTED,
            format!(
                "no selected pod's Envoy is connected to the ECDS server; each one gets {filter} \
                 when it connects"
            ),
        )
    } else {
        Cond::new(
            condition::LOADED,
            true,
            reason::LOADED,
            format!(
                "{ok} of {sent} connected proxies loaded module sha256:{module}{}{skipped}",
                match workloads.len() - connected {
                    0 => String::new(),
                    n => format!(" ({n} selected pods have no connected proxy)"),
                }
            ),
        )
    };
    (cond, ok)
}

/// Writes what each Istio proxy's metrics said about the filter (`loads[i]` for
/// `workloads[i]`, `None`: they could not be read) into its status, and sums it up as the
/// `Loaded` condition with the number of proxies running a Wasm plugin for it. `module` is
/// the short sha256.
pub fn istio_loaded(
    workloads: &mut [WorkloadStatus],
    loads: &[Option<ProxyLoad>],
    module: &str,
) -> (Cond, u32) {
    let (mut ok, mut read, mut waiting, mut undecided) = (0u32, 0usize, 0usize, 0usize);
    let mut refused = Vec::new();
    for (w, load) in workloads.iter_mut().zip(loads) {
        let Some(load) = load else { continue };
        read += 1;
        match load {
            ProxyLoad::Running => {
                ok += 1;
                w.loaded = Some(true);
                w.load_error = None;
            }
            ProxyLoad::Refused(why) => {
                refused.push(format!("{}: {why}", w.name));
                w.loaded = Some(false);
                w.load_error = Some(why.clone());
            }
            ProxyLoad::NotYet => waiting += 1,
            ProxyLoad::Undecided => {
                undecided += 1;
                w.loaded = None;
                w.load_error = None;
            }
        }
    }
    let not_read = match workloads.len() - read {
        0 => String::new(),
        n => format!(" ({n} selected pods' metrics were not read)"),
    };
    let mut unread = not_read.clone();
    if undecided > 0 {
        unread += &format!(
            " ({undecided} proxies run other Wasm plugins beside this EnvoyFilter's, and their \
             metrics cannot say whose Wasm VMs run)"
        );
    }
    // What the undecided proxies' metrics said counts as unread.
    let read = read - undecided;
    let cond = if !refused.is_empty() {
        let n = refused.len();
        let parts = first_three(refused);
        Cond::new(
            condition::LOADED,
            false,
            reason::LOAD_FAILED,
            format!(
                "{n} of {read} Istio proxies run no Wasm plugin for this filter (module \
                 sha256:{module} deployed): {parts}{unread}"
            ),
        )
    } else if waiting > 0 {
        Cond::unknown(
            condition::LOADED,
            reason::LOAD_PENDING,
            format!(
                "waiting for {waiting} of {read} Istio proxies to run a Wasm plugin for this \
                 filter{unread}"
            ),
        )
    } else if read == 0 && undecided > 0 {
        Cond::unknown(
            condition::LOADED,
            reason::LOAD_UNDECIDED,
            format!(
                "the metrics of {undecided} Istio proxies cannot say whether this EnvoyFilter's \
                 Wasm runs: other Wasm plugins run beside it{not_read}"
            ),
        )
    } else if read == 0 {
        Cond::unknown(
            condition::LOADED,
            reason::PROXY_METRICS_UNREAD,
            if workloads.is_empty() {
                "no pod is selected".to_string()
            } else {
                format!(
                    "no selected pod's istio-agent metrics could be read (its pod IP, port \
                     {}-annotated or 15020, /stats/prometheus)",
                    crate::workloads::istio::ANNOTATION_STATUS_PORT
                )
            },
        )
    } else {
        Cond::new(
            condition::LOADED,
            true,
            reason::LOADED,
            format!(
                "{ok} of {read} Istio proxies run a Wasm plugin for this filter (module \
                 sha256:{module} deployed){unread}"
            ),
        )
    };
    (cond, ok)
}

/// When the artifact's config declares ABI versions the module's own marker disagrees with,
/// says so: the module is what Envoy reads.
pub fn declared_abi_note(a: &Artifact) -> Option<String> {
    if a.declared_abi_versions.is_empty() {
        return None;
    }
    let norm = |v: &str| {
        v.trim_start_matches("proxy_abi_version_")
            .trim_start_matches('v')
            .replace('_', ".")
    };
    let actual = a.abi_version.as_deref().map(norm);
    if actual
        .as_ref()
        .is_some_and(|act| a.declared_abi_versions.iter().any(|d| norm(d) == *act))
    {
        return None;
    }
    Some(format!(
        "the artifact declares ABI {} but the module exports {}; the module's own marker wins",
        a.declared_abi_versions.join(", "),
        a.abi_version.as_deref().unwrap_or("no ABI marker")
    ))
}

/// Why a reconcile left a filter not ready, as the status tells it.
struct NotReady<'a> {
    reason: &'static str,
    /// What went wrong (without what stays deployed).
    what: String,
    retry: Retry,
    stage: Stage<'a>,
}

/// Where the pipeline stopped.
enum Stage<'a> {
    /// The module did not resolve (condition `Resolved`).
    Resolve,
    /// It resolved, but deploying it failed (condition `Deployed`).
    Deploy,
    /// It resolved, and `spec.onIncompatible: Block` kept it from these workloads, for this
    /// reason (the `Compatible` condition's message).
    Blocked {
        refusal: &'a str,
        workloads: &'a [WorkloadStatus],
    },
    /// It was rolled out in steps, and proxies refused it (`Loaded` as they answered since).
    RolledBack {
        workloads: &'a [WorkloadStatus],
        loaded: Cond,
    },
}

/// Status after a failed reconcile: says what failed and why, and that whatever was deployed
/// before is still what runs. `status.artifact` is left as it was (the deployed module).
pub fn failed(wf: &WasmFilter, err: &Error) -> WasmFilterStatus {
    not_ready(
        wf,
        NotReady {
            reason: err.reason(),
            what: err.to_string(),
            retry: err.retry(),
            stage: if err.is_resolve_failure() {
                Stage::Resolve
            } else {
                Stage::Deploy
            },
        },
    )
}

/// The message of a `Block` verdict: what refuses the module, and that it is not deployed.
pub fn blocked_message(compatible: &Cond) -> String {
    format!(
        "{}; spec.onIncompatible is Block, so the module is not deployed",
        compatible.message
    )
}

/// Status after a rollout was rolled back: `Ready=False, reason: RolledBack` with the refusals,
/// the stable module still deployed, each workload as the proxies answered, and
/// `status.rollout` remembering the candidate so that it is not tried again.
pub fn rolled_back(
    wf: &WasmFilter,
    message: &str,
    workloads: &[WorkloadStatus],
    loaded: Cond,
    rollout: RolloutStatus,
) -> WasmFilterStatus {
    let mut s = not_ready(
        wf,
        NotReady {
            reason: reason::ROLLED_BACK,
            what: message.to_string(),
            retry: Retry::Invalid,
            stage: Stage::RolledBack { workloads, loaded },
        },
    );
    s.rollout = Some(rollout);
    s
}

/// Status after a `Block` verdict: `Compatible=False` with every workload's verdict, and the
/// previous module (if any) still deployed. Nothing changes until the spec or the pods do.
pub fn blocked(
    wf: &WasmFilter,
    compatible: &Cond,
    workloads: &[WorkloadStatus],
) -> WasmFilterStatus {
    not_ready(
        wf,
        NotReady {
            reason: reason::INCOMPATIBLE,
            what: blocked_message(compatible),
            retry: Retry::Invalid,
            stage: Stage::Blocked {
                refusal: &compatible.message,
                workloads,
            },
        },
    )
}

fn not_ready(wf: &WasmFilter, failure: NotReady<'_>) -> WasmFilterStatus {
    let NotReady {
        reason: why,
        what,
        retry,
        stage,
    } = failure;
    let old = wf.status.clone().unwrap_or_default();
    let kept = old.artifact.as_ref().map(|a| {
        format!(
            "the previous module sha256:{} ({}) stays deployed",
            short(&a.module_sha256),
            a.image
        )
    });
    let message = match &kept {
        Some(k) => format!("{what}; {k}"),
        None => what.clone(),
    };
    let previous_deployed = old
        .conditions
        .iter()
        .find(|c| c.type_ == condition::DEPLOYED);
    let carry = |type_: &'static str| {
        old.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| Cond::carried(type_, c))
    };
    // Deployed: the previous module, when one was running; else nothing, and why.
    let kept_or = |reason: &str, nothing: &str| match (&kept, previous_deployed) {
        (Some(k), Some(p)) if p.status == "True" => {
            Cond::new(condition::DEPLOYED, true, reason::KEPT_PREVIOUS, k.clone())
        }
        _ => Cond::new(condition::DEPLOYED, false, reason, nothing),
    };
    let mut conds = Vec::new();
    let mut workloads = old.workloads.clone();
    let mut fresh_loaded = None;
    match stage {
        Stage::Resolve => {
            conds.push(Cond::new(condition::RESOLVED, false, why, what.clone()));
            conds.extend(carry(condition::COMPATIBLE));
            conds.push(kept_or(
                reason::NOT_ATTEMPTED,
                "nothing deployed: the module did not resolve",
            ));
        }
        Stage::Blocked {
            refusal,
            workloads: verdicts,
        } => {
            conds.extend(carry(condition::RESOLVED));
            workloads = verdicts[..verdicts.len().min(MAX_LISTED_WORKLOADS)].to_vec();
            conds.push(Cond::new(
                condition::COMPATIBLE,
                false,
                reason::INCOMPATIBLE,
                refusal.to_string(),
            ));
            conds.push(kept_or(
                reason::INCOMPATIBLE,
                "nothing deployed: spec.onIncompatible is Block",
            ));
        }
        Stage::Deploy => {
            conds.extend(carry(condition::RESOLVED));
            conds.extend(carry(condition::COMPATIBLE));
            conds.push(Cond::new(condition::DEPLOYED, false, why, what.clone()));
        }
        Stage::RolledBack {
            workloads: answers,
            loaded,
        } => {
            conds.extend(carry(condition::RESOLVED));
            conds.extend(carry(condition::COMPATIBLE));
            workloads = answers[..answers.len().min(MAX_LISTED_WORKLOADS)].to_vec();
            conds.push(kept_or(
                reason::ROLLED_BACK,
                "nothing deployed: the rollout was rolled back",
            ));
            fresh_loaded = Some(loaded);
        }
    }
    // What the proxies said of the module they run is still true.
    match fresh_loaded {
        Some(l) => conds.push(l),
        None => conds.extend(carry(condition::LOADED)),
    }
    conds.push(Cond::new(condition::READY, false, why, message.clone()));
    // kstatus: a failure that may pass is work in progress; one that needs a change is stalled.
    conds.push(match retry {
        Retry::Transient => Cond::new(
            condition::RECONCILING,
            true,
            why,
            format!("retrying with backoff: {message}"),
        ),
        Retry::Invalid => Cond::new(condition::STALLED, true, why, message),
    });
    WasmFilterStatus {
        observed_generation: wf.metadata.generation,
        conditions: conditions(&old.conditions, &conds, wf.metadata.generation),
        artifact: old.artifact,
        workloads,
        ..old
    }
}

/// Status written when the operator first takes up a new WasmFilter (it has no status yet):
/// `Reconciling=True` and `Ready=Unknown`, so kstatus readers (Flux, `kubectl wait`-style
/// tools) see it in progress rather than assume it is current.
pub fn reconciling(generation: Option<i64>) -> WasmFilterStatus {
    let message = "resolving the module and checking the selected workloads";
    let conds = [
        Cond::unknown(condition::READY, reason::RECONCILING, message),
        Cond::new(condition::RECONCILING, true, reason::RECONCILING, message),
    ];
    WasmFilterStatus {
        conditions: conditions(&[], &conds, generation),
        ..WasmFilterStatus::default()
    }
}

/// Status of a WasmFilter whose spec the operator cannot read: `Ready=False` with the reason and
/// the decoder's words; every other condition, the artifact and the workloads stay as they were
/// (what was deployed for it is left alone).
pub fn undecodable(
    old: WasmFilterStatus,
    generation: Option<i64>,
    error: &str,
) -> WasmFilterStatus {
    let mut conds: Vec<Cond> = old
        .conditions
        .iter()
        .filter(|c| c.type_ != condition::READY)
        .filter_map(|c| {
            [
                condition::RESOLVED,
                condition::COMPATIBLE,
                condition::DEPLOYED,
                condition::LOADED,
            ]
            .into_iter()
            .find(|t| *t == c.type_)
            .map(|t| Cond::carried(t, c))
        })
        .collect();
    let stalled = Cond::new(
        condition::STALLED,
        true,
        reason::INVALID_SPEC,
        "the spec cannot be read; it needs a correction",
    );
    conds.push(stalled);
    conds.push(Cond::new(
        condition::READY,
        false,
        reason::INVALID_SPEC,
        format!(
            "the operator cannot read this spec ({error}); it was stored under an earlier, looser \
             schema. Correct the field (the API server checks it now); until then nothing \
             deployed for this filter changes"
        ),
    ));
    WasmFilterStatus {
        observed_generation: generation,
        conditions: conditions(&old.conditions, &conds, generation),
        ..old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Format;

    fn wf() -> WasmFilter {
        let mut wf: WasmFilter = serde_norway::from_str(
            "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {name: f, namespace: n, generation: 2}\nspec:\n  module: {image: r/f:1}\n  selector: {matchLabels: {a: b}}\n",
        )
        .unwrap();
        wf.metadata.generation = Some(2);
        wf
    }

    fn artifact() -> Artifact {
        Artifact {
            image: "r/f:1".into(),
            manifest_digest: format!("sha256:{}", "c".repeat(64)),
            format: Format::SoloOci,
            module_sha256: "a".repeat(64),
            size: 10,
            abi_version: Some("0.2.1".into()),
            declared_abi_versions: Vec::new(),
            root_ids: Vec::new(),
            signature: None,
            preflight_passed: None,
        }
    }

    #[test]
    fn a_moved_tag_keeps_the_old_digest_in_status() {
        let mut wf = wf();
        let old = artifact();
        wf.status = Some(plain_ready(&wf, &old));
        let moved = Artifact {
            manifest_digest: format!("sha256:{}", "d".repeat(64)),
            ..artifact()
        };
        let s = plain_ready(&wf, &moved);
        let a = s.artifact.as_ref().unwrap();
        assert_eq!(a.manifest_digest, moved.manifest_digest);
        assert_eq!(
            a.previous_manifest_digest.as_deref(),
            Some(old.manifest_digest.as_str())
        );
        assert!(
            cond(&s, "Resolved")
                .message
                .contains("the tag moved from sha256:cccc")
        );
        // A resync that finds the same digest keeps saying where it came from.
        wf.status = Some(s);
        let again = plain_ready(&wf, &moved);
        assert_eq!(
            again.artifact.unwrap().previous_manifest_digest.as_deref(),
            Some(old.manifest_digest.as_str())
        );
    }

    #[test]
    fn declared_and_actual_abi_disagreement_is_reported() {
        let mut a = artifact();
        a.declared_abi_versions = vec!["v0.2.1".into()];
        assert_eq!(declared_abi_note(&a), None);
        a.declared_abi_versions = vec!["0.1.0".into()];
        assert_eq!(
            declared_abi_note(&a).as_deref(),
            Some(
                "the artifact declares ABI 0.1.0 but the module exports 0.2.1; the module's own marker wins"
            )
        );
    }

    fn workload(name: &str, version: Option<&str>, compatible: Option<bool>) -> WorkloadStatus {
        WorkloadStatus {
            name: name.into(),
            envoy_version: version.map(String::from),
            version_source: "annotation".into(),
            compatible,
            reasons: match compatible {
                Some(true) => vec![],
                Some(false) => vec!["Wasm module is missing malloc function.".into()],
                None => vec!["no version".into()],
            },
            ..Default::default()
        }
    }

    #[test]
    fn compatibility_sums_up_the_workloads() {
        let c = compatibility(&[], 0);
        assert_eq!((c.status, c.reason.as_str()), ("True", "NoWorkloads"));
        let ok = workload("a", Some("1.36.2"), Some(true));
        let c = compatibility(std::slice::from_ref(&ok), 1);
        assert_eq!((c.status, c.reason.as_str()), ("True", "Compatible"));
        assert!(
            c.message.contains("(1 workload; Envoy 1.36.2)"),
            "{}",
            c.message
        );
        let unknown = workload("b", None, None);
        let c = compatibility(&[ok.clone(), unknown.clone()], 2);
        assert_eq!(
            (c.status, c.reason.as_str()),
            ("Unknown", "EnvoyVersionUnknown")
        );
        let bad: Vec<_> = (0..5)
            .map(|i| workload(&format!("bad-{i}"), Some("1.40.0"), Some(false)))
            .collect();
        let mut all = bad.clone();
        all.extend([ok, unknown]);
        let c = compatibility(&all, 7);
        assert_eq!((c.status, c.reason.as_str()), ("False", "Incompatible"));
        assert!(
            c.message.starts_with(
                "5 of 7 selected workloads would refuse the module: bad-0 (Envoy 1.40.0): Wasm module is missing malloc function."
            ),
            "{}",
            c.message
        );
        assert!(c.message.ends_with("and 2 more"), "{}", c.message);
    }

    /// Ready with no notes and no selected workloads.
    fn plain_ready(wf: &WasmFilter, a: &Artifact) -> WasmFilterStatus {
        ready(
            wf,
            a,
            "WasmPlugin",
            &[],
            Workloads {
                all: Vec::new(),
                compatible: compatibility(&[], 0),
                loaded: None,
                rollout: None,
            },
        )
    }

    fn cond<'a>(s: &'a WasmFilterStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn ecds_ready(loads: &[Option<Load>]) -> WasmFilterStatus {
        let mut all: Vec<WorkloadStatus> = (0..loads.len())
            .map(|i| workload(&format!("p{i}"), Some("1.40.0"), Some(true)))
            .collect();
        let l = loaded(&mut all, loads, "n/f", "aaaa");
        ready(
            &wf(),
            &artifact(),
            "ECDS resource",
            &[],
            Workloads {
                all,
                compatible: compatibility(&[], 0),
                loaded: Some(l),
                rollout: None,
            },
        )
    }

    #[test]
    fn loaded_sums_up_what_each_proxy_said_and_ready_follows_it() {
        let s = ecds_ready(&[Some(Load::Loaded), None]);
        assert_eq!(
            (
                cond(&s, "Loaded").status.as_str(),
                cond(&s, "Ready").status.as_str()
            ),
            ("True", "True")
        );
        assert_eq!(
            cond(&s, "Loaded").message,
            "1 of 1 connected proxies loaded module sha256:aaaa (1 selected pods have no connected proxy)"
        );
        assert_eq!(
            (s.selected_workloads, s.loaded_workloads),
            (Some(2), Some(1))
        );
        assert_eq!(s.workloads[0].loaded, Some(true));
        assert_eq!(
            s.workloads[1].loaded, None,
            "not connected: absent, not false"
        );

        // Still waiting for an answer: Ready is not claimed.
        let s = ecds_ready(&[Some(Load::Loaded), Some(Load::Pending)]);
        assert_eq!(cond(&s, "Loaded").status, "Unknown");
        assert_eq!(cond(&s, "Loaded").reason, "LoadPending");
        assert_eq!(
            (
                cond(&s, "Ready").status.as_str(),
                cond(&s, "Ready").reason.as_str()
            ),
            ("False", "LoadPending")
        );
        assert_eq!(s.workloads[1].loaded, None);

        // Nobody connected: nothing to wait for, nothing claimed.
        let s = ecds_ready(&[None, None]);
        assert_eq!(
            (
                cond(&s, "Loaded").status.as_str(),
                cond(&s, "Loaded").reason.as_str()
            ),
            ("Unknown", "NoProxyConnected")
        );
        assert_eq!(cond(&s, "Ready").status, "True");

        // A NACK wins over a missing subscription, and fails Ready with Envoy's words.
        let s = ecds_ready(&[
            Some(Load::NotSubscribed),
            Some(Load::Failed("Unable to create Wasm plugin n/f".into())),
            Some(Load::Loaded),
        ]);
        let l = cond(&s, "Loaded");
        assert_eq!(
            (l.status.as_str(), l.reason.as_str()),
            ("False", "LoadFailed")
        );
        assert!(
            l.message
                .starts_with("2 of 3 connected proxies did not load module sha256:aaaa"),
            "{}",
            l.message
        );
        assert!(
            l.message.contains("p1: Unable to create Wasm plugin n/f"),
            "{}",
            l.message
        );
        assert_eq!(
            (
                cond(&s, "Ready").status.as_str(),
                cond(&s, "Ready").reason.as_str()
            ),
            ("False", "LoadFailed")
        );
        assert_eq!(
            s.workloads[1].load_error.as_deref(),
            Some("Unable to create Wasm plugin n/f")
        );

        // Not sent because its Envoy would refuse it (Warn): said, but not a load failure.
        let s = ecds_ready(&[
            Some(Load::NotSent(
                "Envoy 1.36.2 would refuse the module: x".into(),
            )),
            Some(Load::Loaded),
        ]);
        let l = cond(&s, "Loaded");
        assert_eq!(l.status, "True");
        assert!(
            l.message
                .ends_with("not sent to 1 whose Envoy would refuse it (p0)"),
            "{}",
            l.message
        );
        assert_eq!(s.workloads[0].loaded, Some(false));
        assert_eq!(
            s.workloads[0].load_error.as_deref(),
            Some("not sent: Envoy 1.36.2 would refuse the module: x")
        );
    }

    #[test]
    fn a_failure_keeps_what_the_proxies_said() {
        let mut w = wf();
        w.status = Some(ecds_ready(&[Some(Load::Loaded)]));
        let s = failed(
            &w,
            &Error::from(crate::oci::Error::ManifestNotFound {
                reference: "r/f:2".into(),
            }),
        );
        assert_eq!(cond(&s, "Loaded").status, "True");
        assert_eq!(s.loaded_workloads, Some(1));
    }

    #[test]
    fn a_block_verdict_lists_the_refusals_and_keeps_the_running_module() {
        let mut w = wf();
        w.status = Some(plain_ready(&w, &artifact()));
        let refusal = Cond::new(
            condition::COMPATIBLE,
            false,
            reason::INCOMPATIBLE,
            "web-1 (Envoy 1.20.0): needs proxy_on_foo",
        );
        let verdicts = vec![workload("web-1", Some("1.20.0"), Some(false))];
        let s = blocked(&w, &refusal, &verdicts);
        assert_eq!(s.artifact, w.status.as_ref().unwrap().artifact);
        assert_eq!(s.workloads, verdicts);
        let compatible = cond(&s, "Compatible");
        assert_eq!(
            (compatible.status.as_str(), compatible.message.as_str()),
            ("False", refusal.message.as_str())
        );
        assert_eq!(cond(&s, "Deployed").reason, "KeptPreviousModule");
        assert_eq!(cond(&s, "Resolved").status, "True");
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Incompatible")
        );
        assert!(
            ready.message.contains("spec.onIncompatible is Block"),
            "{}",
            ready.message
        );
        assert_eq!(
            cond(&s, "Stalled").status,
            "True",
            "nothing changes until the spec or pods do"
        );
        // Nothing deployed before: Deployed says why nothing is.
        let first = blocked(&wf(), &refusal, &verdicts);
        assert_eq!(
            (
                cond(&first, "Deployed").status.as_str(),
                cond(&first, "Deployed").reason.as_str()
            ),
            ("False", "Incompatible")
        );
    }

    #[test]
    fn ready_sets_every_condition_and_the_generation() {
        let s = plain_ready(&wf(), &artifact());
        assert_eq!(s.observed_generation, Some(2));
        for t in ["Resolved", "Deployed", "Ready"] {
            assert_eq!(cond(&s, t).status, "True", "{t}");
            assert_eq!(cond(&s, t).observed_generation, Some(2));
        }
        assert_eq!(s.artifact.unwrap().short_digest, "cccccccccccc");
    }

    #[test]
    fn failure_after_success_keeps_the_deployed_artifact_and_says_so() {
        let mut w = wf();
        w.status = Some(plain_ready(&w, &artifact()));
        let err = Error::from(crate::oci::Error::ManifestNotFound {
            reference: "r/f:2".into(),
        });
        let s = failed(&w, &err);
        assert_eq!(s.artifact, w.status.as_ref().unwrap().artifact);
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "ManifestNotFound");
        assert!(cond(&s, "Ready").message.contains("previous module"));
        assert_eq!(cond(&s, "Resolved").status, "False");
        assert_eq!(cond(&s, "Deployed").status, "True");
        assert_eq!(cond(&s, "Deployed").reason, "KeptPreviousModule");
    }

    #[test]
    fn transition_time_only_moves_on_change() {
        let mut w = wf();
        let first = plain_ready(&w, &artifact());
        let t0 = cond(&first, "Ready").last_transition_time.clone();
        w.status = Some(first);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let again = plain_ready(&w, &artifact());
        assert_eq!(cond(&again, "Ready").last_transition_time, t0);
        w.status = Some(again);
        let failed = failed(&w, &Error::MissingNamespace);
        assert_ne!(cond(&failed, "Ready").last_transition_time, t0);
    }

    #[test]
    fn an_undecodable_spec_fails_ready_and_keeps_everything_else() {
        let w = wf();
        let before = plain_ready(&w, &artifact());
        let s = undecodable(before.clone(), Some(7), "invalid value: 3000000000");
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "InvalidSpec");
        assert!(cond(&s, "Ready").message.contains("3000000000"));
        for t in ["Deployed", "Resolved", "Compatible"] {
            let (now, was) = (cond(&s, t), cond(&before, t));
            assert_eq!(
                (
                    &now.status,
                    &now.reason,
                    &now.message,
                    &now.last_transition_time
                ),
                (
                    &was.status,
                    &was.reason,
                    &was.message,
                    &was.last_transition_time
                ),
                "{t}"
            );
        }
        assert_eq!(s.artifact, before.artifact);
        assert_eq!(s.workloads, before.workloads);
        assert_eq!(s.observed_generation, Some(7));
        let empty = undecodable(WasmFilterStatus::default(), None, "x");
        assert_eq!(empty.conditions.len(), 2);
        assert_eq!(cond(&empty, "Stalled").status, "True");
    }

    #[test]
    fn kstatus_reads_failures_as_stalled_or_in_progress_and_a_new_filter_as_in_progress() {
        let w = wf();
        let invalid = failed(
            &w,
            &Error::from(crate::oci::Error::ManifestNotFound {
                reference: "r/f:2".into(),
            }),
        );
        assert_eq!(cond(&invalid, "Stalled").status, "True");
        assert_eq!(cond(&invalid, "Stalled").reason, "ManifestNotFound");
        assert!(invalid.conditions.iter().all(|c| c.type_ != "Reconciling"));
        let transient = failed(
            &w,
            &Error::from(crate::oci::Error::RegistryUnavailable {
                registry: "r".into(),
                message: "refused".into(),
            }),
        );
        assert_eq!(cond(&transient, "Reconciling").status, "True");
        assert!(transient.conditions.iter().all(|c| c.type_ != "Stalled"));
        // Ready again: neither is left.
        let ok = plain_ready(&w, &artifact());
        assert!(
            ok.conditions
                .iter()
                .all(|c| c.type_ != "Stalled" && c.type_ != "Reconciling")
        );
        let new = reconciling(Some(1));
        assert_eq!(cond(&new, "Reconciling").status, "True");
        assert_eq!(cond(&new, "Ready").status, "Unknown");
        assert_eq!(new.observed_generation, None);
    }

    #[test]
    fn istio_loads_sum_up_and_undecided_proxies_stay_absent() {
        let pods = |n: usize| -> Vec<WorkloadStatus> {
            (0..n)
                .map(|i| workload(&format!("p{i}"), Some("1.39.3"), Some(true)))
                .collect()
        };
        // Every proxy undecided: Loaded says so, nobody's `loaded` is set.
        let mut w = pods(2);
        w[0].loaded = Some(true);
        let (c, ok) = istio_loaded(&mut w, &[Some(ProxyLoad::Undecided), None], "abc");
        assert_eq!(
            (c.status, c.reason.as_str(), ok),
            ("Unknown", reason::LOAD_UNDECIDED, 0)
        );
        assert!(
            c.message.contains("1 selected pods' metrics were not read"),
            "{}",
            c.message
        );
        assert_eq!((w[0].loaded, w[1].loaded), (None, None));
        // One runs, one undecided: Loaded counts the one that told.
        let mut w = pods(2);
        let (c, ok) = istio_loaded(
            &mut w,
            &[Some(ProxyLoad::Running), Some(ProxyLoad::Undecided)],
            "abc",
        );
        assert_eq!((c.status, ok), ("True", 1));
        assert!(
            c.message.starts_with("1 of 1 Istio proxies run"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("1 proxies run other Wasm plugins"),
            "{}",
            c.message
        );
        assert_eq!((w[0].loaded, w[1].loaded), (Some(true), None));
        // A refusal wins over the rest.
        let mut w = pods(3);
        let loads = [
            Some(ProxyLoad::Refused("no VM".into())),
            Some(ProxyLoad::NotYet),
            Some(ProxyLoad::Undecided),
        ];
        let (c, _) = istio_loaded(&mut w, &loads, "abc");
        assert_eq!(
            (c.status, c.reason.as_str()),
            ("False", reason::LOAD_FAILED)
        );
        assert!(
            c.message
                .starts_with("1 of 2 Istio proxies run no Wasm plugin"),
            "{}",
            c.message
        );
        assert_eq!(w[0].load_error.as_deref(), Some("no VM"));
    }
}
