//! Step 4, telling people: the status (server-side applied by the operator's one field
//! manager) and Events for what a person would want to know happened.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;

use super::events::{Event, Events};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::assess::Assessment;
use super::deploy::Deployed;
use super::status;
use super::{Context, Error};
use crate::api::{ArtifactStatus, WasmFilter, WasmFilterStatus};
use crate::names;
use crate::oci::Artifact;

/// Longest Event note; the API server refuses longer ones.
const MAX_NOTE: usize = 1024;

/// Writes `status` and remembers it as the last this process wrote.
pub(super) async fn write_status(
    ctx: &Context,
    wf: &WasmFilter,
    status: &WasmFilterStatus,
) -> Result<(), Error> {
    let ns = wf.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<WasmFilter> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": WasmFilter::api_version(&()),
        "kind": WasmFilter::kind(&()),
        "status": status,
    });
    let _ =
        super::STATUS_SENT.try_with(|sent| sent.store(true, std::sync::atomic::Ordering::SeqCst));
    // The status already says exactly this (the store's copy, or the one this process wrote
    // last): a reconcile that changes nothing writes nothing.
    if wf.status.as_ref() == Some(&super::written::as_stored(status)) {
        return Ok(());
    }
    api.patch_status(
        &wf.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::UpdateStatus)?;
    ctx.written.remember(wf, status);
    Ok(())
}

/// The module is deployed: status says so, with Events for a new module, a moved tag, and a
/// module deployed although some workload refuses it (`onIncompatible: Warn`).
pub(super) async fn deployed(
    ctx: &Context,
    wf: &WasmFilter,
    artifact: &Artifact,
    assessment: Assessment,
    deployed: Deployed,
) -> Result<(), Error> {
    let refusal =
        (assessment.compatible.status == "False").then(|| assessment.compatible.message.clone());
    let was_refused = wf
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == names::condition::COMPATIBLE)
        })
        .is_some_and(|c| c.status == "False" && Some(&c.message) == refusal.as_ref());
    let running = deployed.rollout.as_ref().and_then(|r| r.running.clone());
    let rollout = deployed
        .rollout
        .as_ref()
        .map(|r| (r.status.clone(), r.running.clone()));
    let status = status::ready(
        wf,
        artifact,
        deployed.kind,
        &deployed.notes,
        status::Workloads {
            all: assessment.workloads,
            compatible: assessment.compatible,
            loaded: deployed.loaded,
            rollout,
        },
    );
    write_status(ctx, wf, &status).await?;
    let previous = wf.status.as_ref().and_then(|s| s.rollout.as_ref());
    if let Some(now) = &status.rollout {
        for (event, note) in rollout_events(previous, now, running.as_deref()) {
            ctx.metrics.rollout(event.metric());
            super::publish(ctx, wf, EventType::Normal, event.reason(), note).await;
        }
    }
    // While steps remain, the module is not deployed everywhere yet: announced at the end.
    let old = wf.status.as_ref().and_then(|s| s.artifact.as_ref());
    let announced = if running.is_some() {
        Vec::new()
    } else {
        announcements(old, artifact, deployed.kind, &wf.name_any())
    };
    for (type_, reason, note) in announced {
        super::publish(ctx, wf, type_, reason, note).await;
    }
    if let Some(refusal) = refusal
        && !was_refused
    {
        super::publish(
            ctx,
            wf,
            EventType::Warning,
            names::reason::INCOMPATIBLE,
            format!("deployed anyway (spec.onIncompatible: Warn): {refusal}"),
        )
        .await;
    }
    Ok(())
}

/// A rollout was rolled back: status says which proxies refused the module and what they said,
/// and (`just_now`, once) a Warning Event says the same.
pub(super) async fn rolled_back(
    ctx: &Context,
    wf: &WasmFilter,
    message: &str,
    workloads: &[crate::api::WorkloadStatus],
    loaded: status::Cond,
    rollout: crate::api::RolloutStatus,
    just_now: bool,
) -> Result<(), Error> {
    let status = status::rolled_back(wf, message, workloads, loaded, rollout);
    write_status(ctx, wf, &status).await?;
    if !just_now {
        return Ok(());
    }
    tracing::warn!(reason = names::reason::ROLLED_BACK, "{message}");
    ctx.metrics.rollout("rolled_back");
    super::publish(
        ctx,
        wf,
        EventType::Warning,
        names::reason::ROLLED_BACK,
        message.to_string(),
    )
    .await;
    Ok(())
}

/// A change in a rollout worth an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RolloutEvent {
    Started,
    Step,
    Completed,
}

impl RolloutEvent {
    fn reason(self) -> &'static str {
        match self {
            RolloutEvent::Started => "RolloutStarted",
            RolloutEvent::Step => "RolloutStep",
            RolloutEvent::Completed => "RolloutCompleted",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            RolloutEvent::Started => "started",
            RolloutEvent::Step => "step",
            RolloutEvent::Completed => "completed",
        }
    }
}

/// The Events between two rollout statuses: a rollout started (a new candidate), reached a
/// new step, or completed (its candidate became stable). `running` says what it is at.
pub(super) fn rollout_events(
    old: Option<&crate::api::RolloutStatus>,
    new: &crate::api::RolloutStatus,
    running: Option<&str>,
) -> Vec<(RolloutEvent, String)> {
    let old_candidate = old.and_then(|o| o.candidate.as_ref());
    match (&new.candidate, old_candidate) {
        (Some(c), Some(o)) if c.version == o.version => {
            if new.step != old.and_then(|o| o.step) {
                vec![(RolloutEvent::Step, running.unwrap_or_default().to_string())]
            } else {
                Vec::new()
            }
        }
        (Some(_), _) => vec![(
            RolloutEvent::Started,
            running.unwrap_or_default().to_string(),
        )],
        (None, Some(o)) if new.stable.as_ref().map(|s| &s.version) == Some(&o.version) => {
            vec![(
                RolloutEvent::Completed,
                format!(
                    "module sha256:{} is rolled out to every selected pod",
                    o.module_sha256
                ),
            )]
        }
        (None, _) => Vec::new(),
    }
}

/// `onIncompatible: Block` kept the module back: status lists the verdicts, an Event says why.
pub(super) async fn blocked(
    ctx: &Context,
    wf: &WasmFilter,
    assessment: &Assessment,
) -> Result<(), Error> {
    let status = status::blocked(wf, &assessment.compatible, &assessment.workloads);
    write_status(ctx, wf, &status).await?;
    let message = status::blocked_message(&assessment.compatible);
    tracing::warn!(reason = names::reason::INCOMPATIBLE, "{message}");
    super::publish(
        ctx,
        wf,
        EventType::Warning,
        names::reason::INCOMPATIBLE,
        message,
    )
    .await;
    Ok(())
}

/// A step failed: status says which and why (and what stays deployed), with an Event.
pub(super) async fn failed(ctx: &Context, wf: &WasmFilter, err: &Error) {
    let status = status::failed(wf, err);
    if let Err(e) = write_status(ctx, wf, &status).await {
        tracing::warn!(error = %e, "could not write failure status");
    }
    super::publish(ctx, wf, EventType::Warning, err.reason(), err.to_string()).await;
}

/// Events for what changed between the deployed artifact `old` and `new`: the tag moved, a new
/// module is deployed.
pub(super) fn announcements(
    old: Option<&ArtifactStatus>,
    new: &Artifact,
    kind: &str,
    name: &str,
) -> Vec<(EventType, &'static str, String)> {
    let mut out = Vec::new();
    if let Some(old) = old
        && old.image == new.image
        && old.manifest_digest != new.manifest_digest
    {
        out.push((
            EventType::Normal,
            "TagMoved",
            format!(
                "{} moved from {} to {}",
                new.image, old.manifest_digest, new.manifest_digest
            ),
        ));
    }
    if old.is_none_or(|o| o.module_sha256 != new.module_sha256) {
        out.push((
            EventType::Normal,
            "Deployed",
            format!(
                "{kind} {name} now points at module sha256:{} from {}",
                new.module_sha256, new.manifest_digest
            ),
        ));
    }
    out
}

/// Publishes an Event; a failure to publish is logged, never fatal.
pub(super) async fn publish(
    events: &Events,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason,
        note: Some(truncate(note, MAX_NOTE)),
        action: "Reconcile",
    };
    if let Err(e) = events.publish(&ev, object).await {
        tracing::warn!(error = %e, "could not publish event");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Format;

    fn artifact(digest: &str, sha: &str) -> Artifact {
        Artifact {
            image: "r.example/m:v1".into(),
            manifest_digest: digest.into(),
            format: Format::Cncf,
            module_sha256: sha.into(),
            size: 1,
            abi_version: None,
            declared_abi_versions: Vec::new(),
            root_ids: Vec::new(),
            signature: None,
            preflight_passed: None,
        }
    }

    fn reasons(old: Option<&Artifact>, new: &Artifact) -> Vec<&'static str> {
        let old = old.map(status::artifact_status);
        announcements(old.as_ref(), new, "WasmPlugin", "f")
            .into_iter()
            .map(|(_, r, _)| r)
            .collect()
    }

    #[test]
    fn a_moved_tag_and_a_new_module_are_announced_once() {
        let v1 = artifact("sha256:1", "aa");
        assert_eq!(reasons(None, &v1), ["Deployed"]);
        assert!(
            reasons(Some(&v1), &v1).is_empty(),
            "a resync announces nothing"
        );
        // Same module under a new manifest (re-pushed with another config): the tag moved.
        assert_eq!(
            reasons(Some(&v1), &artifact("sha256:2", "aa")),
            ["TagMoved"]
        );
        assert_eq!(
            reasons(Some(&v1), &artifact("sha256:3", "bb")),
            ["TagMoved", "Deployed"]
        );
        let mut other_image = artifact("sha256:4", "cc");
        other_image.image = "r.example/other:v1".into();
        assert_eq!(reasons(Some(&v1), &other_image), ["Deployed"]);
    }

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), MAX_NOTE);
        assert!(s.len() <= MAX_NOTE && s.chars().all(|c| c == 'é'));
    }
}
