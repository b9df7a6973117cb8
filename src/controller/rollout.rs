//! Part of step 3 for `target: Ecds` with `spec.rollout`: which selected pods are given the
//! candidate (the module and configuration just verified) and which keep the stable one (the
//! last every pod was given), and what the proxies' answers mean for the rollout. Pure: the
//! controller feeds it the previous `status.rollout`, the pods and their load reports.
//!
//! A step gives the candidate to the first pods by name (its `percent` or `count` of them) and
//! holds until every one of those whose Envoy is connected loaded it and its pause passed; then
//! the next step, and after the last, every pod: the candidate becomes stable. When more of the
//! candidate's pods refuse it than `maxFailures` allows, every pod is given the stable module
//! again and the candidate is remembered as rolled back, not tried again until the spec
//! changes (a moved tag is a new candidate).

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

use super::status::short;
use crate::api::{Revision, RolledBack, Rollout, RolloutStatus, WasmFilterSpec};
use crate::oci::Artifact;
use crate::render::ecds;
use crate::xds::Load;

/// How many refusals a rollback lists.
const MAX_LISTED_FAILURES: usize = 10;

/// The revision `spec` serves `artifact` with.
pub fn revision(spec: &WasmFilterSpec, artifact: &Artifact) -> Revision {
    Revision {
        version: ecds::version_base(spec, &artifact.module_sha256),
        module_sha256: artifact.module_sha256.clone(),
        image: Some(artifact.image.clone()),
        manifest_digest: Some(artifact.manifest_digest.clone()),
        root_id: spec.root_id.clone(),
        config: spec.config.clone(),
        failure_policy: spec.failure_policy,
        filter_type: spec.filter_type,
    }
}

/// `spec` with the settings `rev` was served with (what rendering reads).
pub fn spec_of(rev: &Revision, spec: &WasmFilterSpec) -> WasmFilterSpec {
    WasmFilterSpec {
        root_id: rev.root_id.clone(),
        config: rev.config.clone(),
        failure_policy: rev.failure_policy,
        filter_type: rev.filter_type,
        ..spec.clone()
    }
}

/// What the proxies are given now.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Every selected pod is given the candidate, which is (or becomes) stable.
    Settled,
    /// The candidate goes to `canary`, the stable revision to the other pods.
    Stepping {
        step: u32,
        started: Timestamp,
        canary: BTreeSet<String>,
    },
    /// The candidate was rolled back: every pod is given the stable revision.
    RolledBack,
}

/// The rollout as it stands, and the status that says so.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub phase: Phase,
    pub candidate: Revision,
    /// What pods outside the canary (all pods, after a rollback) are given.
    pub stable: Option<Revision>,
    pub status: RolloutStatus,
}

impl Plan {
    /// The revision pod `name` is given.
    pub fn revision_of(&self, pod: &str) -> &Revision {
        match (&self.phase, &self.stable) {
            (Phase::Stepping { canary, .. }, Some(stable)) if !canary.contains(pod) => stable,
            (Phase::RolledBack, Some(stable)) => stable,
            _ => &self.candidate,
        }
    }

    /// `candidate` or `stable` for a pod while a rollout runs.
    pub fn label_of(&self, pod: &str) -> Option<&'static str> {
        match &self.phase {
            Phase::Stepping { canary, .. } if canary.contains(pod) => Some("candidate"),
            Phase::Stepping { .. } => Some("stable"),
            _ => None,
        }
    }
}

/// Where the rollout of `candidate` stands, from the previous status. `fallback_stable` is what
/// the proxies were given before when the status names nothing (the filter had no rollout
/// yet); `pods` are the selected pods.
pub fn plan(
    rollout: &Rollout,
    previous: Option<&RolloutStatus>,
    fallback_stable: Option<Revision>,
    candidate: Revision,
    generation: i64,
    pods: &[String],
    now: Timestamp,
) -> Plan {
    let rolled_back = previous.and_then(|p| p.rolled_back.clone());
    let stable = previous.and_then(|p| p.stable.clone()).or(fallback_stable);
    let Some(stable) = stable.filter(|s| s.version != candidate.version) else {
        // Nothing to step from: the first module a filter is given goes to every pod.
        return settled(candidate, rolled_back);
    };
    if rolled_back
        .as_ref()
        .is_some_and(|r| r.version == candidate.version && r.generation == generation)
    {
        return Plan {
            phase: Phase::RolledBack,
            status: RolloutStatus {
                stable: Some(stable.clone()),
                rolled_back,
                ..RolloutStatus::default()
            },
            candidate,
            stable: Some(stable),
        };
    }
    let (step, started) = match previous {
        Some(p) if p.candidate.as_ref().map(|c| &c.version) == Some(&candidate.version) => (
            p.step.unwrap_or(0).min(steps(rollout)),
            p.step_started_at
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .unwrap_or(now),
        ),
        _ => (0, now),
    };
    stepping(rollout, stable, candidate, rolled_back, step, started, pods)
}

fn settled(candidate: Revision, rolled_back: Option<RolledBack>) -> Plan {
    Plan {
        phase: Phase::Settled,
        status: RolloutStatus {
            stable: Some(candidate.clone()),
            rolled_back,
            ..RolloutStatus::default()
        },
        stable: None,
        candidate,
    }
}

fn stepping(
    rollout: &Rollout,
    stable: Revision,
    candidate: Revision,
    rolled_back: Option<RolledBack>,
    step: u32,
    started: Timestamp,
    pods: &[String],
) -> Plan {
    let canary: BTreeSet<String> = pods
        .iter()
        .take(canary_size(rollout, step, pods.len()))
        .cloned()
        .collect();
    Plan {
        status: RolloutStatus {
            stable: Some(stable.clone()),
            candidate: Some(candidate.clone()),
            step: Some(step),
            step_started_at: Some(started.to_string()),
            candidate_workloads: Some(u32::try_from(canary.len()).unwrap_or(u32::MAX)),
            rolled_back,
        },
        phase: Phase::Stepping {
            step,
            started,
            canary,
        },
        stable: Some(stable),
        candidate,
    }
}

/// The number of listed steps; step `steps(rollout)` is every pod.
fn steps(rollout: &Rollout) -> u32 {
    u32::try_from(rollout.steps.len()).unwrap_or(u32::MAX)
}

/// How many of `total` pods get the candidate at `step`.
pub fn canary_size(rollout: &Rollout, step: u32, total: usize) -> usize {
    let Some(s) = usize::try_from(step)
        .ok()
        .and_then(|i| rollout.steps.get(i))
    else {
        return total;
    };
    let n = match (s.percent, s.count) {
        (Some(p), _) => (total * p as usize).div_ceil(100),
        (None, Some(c)) => c as usize,
        (None, None) => total,
    };
    n.clamp(1.min(total), total)
}

/// What the candidate's proxies' answers mean for the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to do: no rollout runs.
    Settled,
    /// The step holds: proxies have yet to answer (`None`), or its pause has this long to go.
    Wait(Option<Duration>),
    /// The step is done: on to the next (or, after the last, the candidate is stable).
    Advance,
    /// Too many proxies refused the candidate: each pod and Envoy's words.
    RollBack(Vec<(String, String)>),
}

/// Judges the current step from each canary pod's load report (`None`: no proxy of it is
/// connected, which does not hold a step up).
pub fn judge<'a>(
    rollout: &Rollout,
    plan: &Plan,
    loads: impl IntoIterator<Item = (&'a str, Option<&'a Load>)>,
    now: Timestamp,
) -> Verdict {
    let Phase::Stepping { step, started, .. } = &plan.phase else {
        return Verdict::Settled;
    };
    let mut failures = Vec::new();
    let mut pending = false;
    for (pod, load) in loads {
        match load {
            Some(Load::Failed(e)) => failures.push((pod.to_string(), e.clone())),
            Some(Load::Pending) => pending = true,
            _ => {}
        }
    }
    if failures.len() > rollout.max_failures as usize {
        return Verdict::RollBack(failures);
    }
    if pending {
        return Verdict::Wait(None);
    }
    let pause = usize::try_from(*step)
        .ok()
        .and_then(|i| rollout.steps.get(i))
        .map_or(0, |s| s.pause_seconds);
    let elapsed = now.duration_since(*started);
    let pause = jiff::SignedDuration::from_secs(i64::from(pause));
    if elapsed < pause {
        return Verdict::Wait(
            (pause - elapsed)
                .try_into()
                .ok()
                .map(|d: Duration| d.max(Duration::from_millis(100))),
        );
    }
    Verdict::Advance
}

/// The plan after an `Advance`: the next step, or the candidate settled as stable.
pub fn advance(rollout: &Rollout, plan: Plan, pods: &[String], now: Timestamp) -> Plan {
    let Phase::Stepping { step, .. } = plan.phase else {
        return plan;
    };
    let rolled_back = plan.status.rolled_back.clone();
    match (step < steps(rollout), plan.stable) {
        (true, Some(stable)) => stepping(
            rollout,
            stable,
            plan.candidate,
            rolled_back,
            step + 1,
            now,
            pods,
        ),
        _ => settled(plan.candidate, rolled_back),
    }
}

/// The plan after a `RollBack`: every pod back on the stable revision, the candidate
/// remembered with the refusals.
pub fn roll_back(
    plan: Plan,
    failures: &[(String, String)],
    generation: i64,
    now: Timestamp,
) -> Plan {
    let step = match &plan.phase {
        Phase::Stepping { step, .. } => *step,
        _ => 0,
    };
    let rolled_back = RolledBack {
        version: plan.candidate.version.clone(),
        module_sha256: plan.candidate.module_sha256.clone(),
        generation,
        at: now.to_string(),
        step,
        refused: u32::try_from(failures.len()).unwrap_or(u32::MAX),
        failures: failures
            .iter()
            .take(MAX_LISTED_FAILURES)
            .map(|(pod, e)| format!("{pod}: {e}"))
            .collect(),
    };
    Plan {
        phase: Phase::RolledBack,
        status: RolloutStatus {
            stable: plan.stable.clone(),
            rolled_back: Some(rolled_back),
            ..RolloutStatus::default()
        },
        stable: plan.stable,
        candidate: plan.candidate,
    }
}

/// Where a rollout stands after this reconcile.
#[derive(Debug)]
pub struct Outcome {
    /// `status.rollout`.
    pub status: RolloutStatus,
    /// While steps remain: what the rollout is at.
    pub running: Option<String>,
    /// The candidate is rolled back: what happened, for the condition and Event, and whether
    /// this very reconcile rolled it back.
    pub rolled_back: Option<(String, bool)>,
    /// The current step's pause ends this soon.
    pub wait: Option<std::time::Duration>,
}

/// What a rolled-back plan tells people: how many refused the candidate, and their words.
pub fn rolled_back_message(plan: &Plan, pods: usize) -> Option<String> {
    if plan.phase != Phase::RolledBack {
        return None;
    }
    let rb = plan.status.rolled_back.as_ref()?;
    let mut listed: Vec<&str> = rb.failures.iter().take(3).map(String::as_str).collect();
    let more = format!("and {} more", rb.refused as usize - listed.len());
    if rb.refused as usize > listed.len() {
        listed.push(&more);
    }
    Some(format!(
        "{} of the proxies given module sha256:{} at rollout step {} refused it ({}): rolled back, \
         every one of the {pods} selected pods is given module sha256:{} again; the module is not \
         tried again until the spec changes",
        rb.refused,
        short(&rb.module_sha256),
        rb.step + 1,
        listed.join("; "),
        plan.stable.as_ref().map_or("", |s| short(&s.module_sha256)),
    ))
}

/// One line on the rollout for conditions and Events: `step 2 of 3: 4 of 10 pods ...`.
pub fn describe(rollout: &Rollout, plan: &Plan, pods: usize) -> String {
    match &plan.phase {
        Phase::Stepping { step, canary, .. } => format!(
            "rolling out module sha256:{} (step {} of {}): {} of {pods} selected pods have it, the \
             rest keep module sha256:{}",
            short(&plan.candidate.module_sha256),
            step + 1,
            steps(rollout) + 1,
            canary.len(),
            plan.stable.as_ref().map_or("", |s| short(&s.module_sha256)),
        ),
        Phase::Settled => format!(
            "module sha256:{} is rolled out to every selected pod",
            short(&plan.candidate.module_sha256)
        ),
        Phase::RolledBack => format!(
            "module sha256:{} was rolled back; every selected pod is given module sha256:{}",
            short(&plan.candidate.module_sha256),
            plan.stable.as_ref().map_or("", |s| short(&s.module_sha256)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RolloutStep;

    fn rollout(steps: &[(Option<u32>, Option<u32>, u32)], max_failures: u32) -> Rollout {
        Rollout {
            steps: steps
                .iter()
                .map(|&(percent, count, pause_seconds)| RolloutStep {
                    percent,
                    count,
                    pause_seconds,
                })
                .collect(),
            max_failures,
        }
    }

    fn rev(v: &str) -> Revision {
        Revision {
            version: v.into(),
            module_sha256: format!("{v}{}", "0".repeat(64 - v.len())),
            ..Revision::default()
        }
    }

    fn pods(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i:02}")).collect()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn canary(p: &Plan) -> Vec<String> {
        match &p.phase {
            Phase::Stepping { canary, .. } => canary.iter().cloned().collect(),
            other => panic!("not stepping: {other:?}"),
        }
    }

    #[test]
    fn step_sizes_round_up_and_stay_within_the_selection() {
        let r = rollout(
            &[
                (Some(10), None, 0),
                (None, Some(3), 0),
                (Some(100), None, 0),
            ],
            0,
        );
        assert_eq!(canary_size(&r, 0, 25), 3, "10% of 25, rounded up");
        assert_eq!(canary_size(&r, 0, 1), 1, "at least one");
        assert_eq!(canary_size(&r, 1, 2), 2, "count beyond the selection");
        assert_eq!(canary_size(&r, 2, 7), 7);
        assert_eq!(canary_size(&r, 3, 7), 7, "after the steps: every pod");
        assert_eq!(canary_size(&r, 0, 0), 0);
    }

    #[test]
    fn the_first_module_goes_everywhere_and_becomes_stable() {
        let r = rollout(&[(None, Some(1), 0)], 0);
        let p = plan(&r, None, None, rev("a"), 1, &pods(3), at(0));
        assert_eq!(p.phase, Phase::Settled);
        assert_eq!(p.status.stable, Some(rev("a")));
        assert_eq!(p.revision_of("p02"), &rev("a"));
        // The same again: nothing to roll out.
        let again = plan(&r, Some(&p.status), None, rev("a"), 1, &pods(3), at(5));
        assert_eq!(again.phase, Phase::Settled);
    }

    #[test]
    fn a_good_candidate_walks_every_step_then_becomes_stable() {
        let r = rollout(&[(None, Some(1), 0), (Some(50), None, 10)], 0);
        let pods = pods(4);
        let stable = settled(rev("a"), None).status;
        let p = plan(&r, Some(&stable), None, rev("b"), 2, &pods, at(0));
        assert_eq!(canary(&p), ["p00"]);
        assert_eq!(p.revision_of("p00"), &rev("b"));
        assert_eq!(p.revision_of("p01"), &rev("a"));
        assert_eq!(p.label_of("p01"), Some("stable"));
        // The canary has not answered yet.
        let pending = Load::Pending;
        assert_eq!(
            judge(&r, &p, [("p00", Some(&pending))], at(1)),
            Verdict::Wait(None)
        );
        let loaded = Load::Loaded;
        assert_eq!(
            judge(&r, &p, [("p00", Some(&loaded))], at(1)),
            Verdict::Advance
        );
        let p = advance(&r, p, &pods, at(1));
        assert_eq!(canary(&p), ["p00", "p01"]);
        assert_eq!(p.status.step, Some(1));
        // A restarted operator picks the step up from the status, pause and all.
        let resumed = plan(&r, Some(&p.status), None, rev("b"), 2, &pods, at(4));
        assert_eq!(resumed, p);
        let all_loaded = [("p00", Some(&loaded)), ("p01", Some(&loaded))];
        assert_eq!(
            judge(&r, &p, all_loaded, at(4)),
            Verdict::Wait(Some(Duration::from_secs(7)))
        );
        assert_eq!(judge(&r, &p, all_loaded, at(11)), Verdict::Advance);
        let p = advance(&r, p, &pods, at(11));
        assert_eq!(canary(&p), pods);
        assert_eq!(p.status.candidate_workloads, Some(4));
        // A pod with no connected proxy does not hold the last step up.
        let no_proxy = [
            ("p00", Some(&loaded)),
            ("p01", Some(&loaded)),
            ("p02", None),
            ("p03", Some(&loaded)),
        ];
        assert_eq!(judge(&r, &p, no_proxy, at(12)), Verdict::Advance);
        let p = advance(&r, p, &pods, at(12));
        assert_eq!(p.phase, Phase::Settled);
        assert_eq!(p.status.stable, Some(rev("b")));
        assert_eq!(p.status.candidate, None);
    }

    #[test]
    fn refusals_beyond_the_budget_roll_back_and_the_candidate_is_not_retried() {
        let r = rollout(&[(None, Some(2), 0)], 1);
        let pods = pods(4);
        let stable = settled(rev("a"), None).status;
        let p = plan(&r, Some(&stable), None, rev("b"), 3, &pods, at(0));
        let nack = Load::Failed("Unable to create Wasm plugin ns/f".into());
        let loaded = Load::Loaded;
        // One refusal is within the budget; the step waits for nobody else.
        assert_eq!(
            judge(
                &r,
                &p,
                [("p00", Some(&nack)), ("p01", Some(&loaded))],
                at(1)
            ),
            Verdict::Advance
        );
        let Verdict::RollBack(failures) =
            judge(&r, &p, [("p00", Some(&nack)), ("p01", Some(&nack))], at(1))
        else {
            panic!("two refusals exceed maxFailures 1")
        };
        let back = roll_back(p, &failures, 3, at(1));
        assert_eq!(back.phase, Phase::RolledBack);
        for pod in &pods {
            assert_eq!(back.revision_of(pod), &rev("a"), "every pod back on stable");
        }
        let rb = back.status.rolled_back.clone().unwrap();
        assert_eq!((rb.version.as_str(), rb.generation, rb.step), ("b", 3, 0));
        assert_eq!(rb.failures[0], "p00: Unable to create Wasm plugin ns/f");
        let told = rolled_back_message(&back, 4).unwrap();
        assert!(
            told.starts_with("2 of the proxies given module sha256:b00000000000 at rollout step 1 refused it (p00: Unable")
                && told.contains("every one of the 4 selected pods is given module sha256:a00000000000 again"),
            "{told}"
        );
        // Same candidate, same generation: stays rolled back (a restart reads it from status).
        let again = plan(&r, Some(&back.status), None, rev("b"), 3, &pods, at(60));
        assert_eq!(again.phase, Phase::RolledBack);
        // A spec change tries it again; a new module is a new rollout.
        let edited = plan(&r, Some(&back.status), None, rev("b"), 4, &pods, at(60));
        assert_eq!(canary(&edited), ["p00", "p01"]);
        let moved = plan(&r, Some(&back.status), None, rev("c"), 3, &pods, at(60));
        assert_eq!(canary(&moved), ["p00", "p01"]);
        assert_eq!(moved.status.step_started_at, Some(at(60).to_string()));
    }

    #[test]
    fn a_new_candidate_mid_rollout_starts_over_from_the_same_stable() {
        let r = rollout(&[(None, Some(1), 0), (None, Some(2), 0)], 0);
        let pods = pods(3);
        let stable = settled(rev("a"), None).status;
        let p = plan(&r, Some(&stable), None, rev("b"), 1, &pods, at(0));
        let p = advance(&r, p, &pods, at(1));
        assert_eq!(p.status.step, Some(1));
        let c = plan(&r, Some(&p.status), None, rev("c"), 2, &pods, at(2));
        assert_eq!((c.status.step, c.stable.clone()), (Some(0), Some(rev("a"))));
        // Back to the stable revision itself: nothing to roll out.
        let a = plan(&r, Some(&p.status), None, rev("a"), 3, &pods, at(3));
        assert_eq!(a.phase, Phase::Settled);
    }

    #[test]
    fn without_a_recorded_stable_the_module_proxies_were_given_is_stepped_from() {
        let r = rollout(&[(None, Some(1), 0)], 0);
        let p = plan(&r, None, Some(rev("a")), rev("b"), 1, &pods(2), at(0));
        assert_eq!(canary(&p), ["p00"]);
        assert_eq!(p.status.stable, Some(rev("a")));
    }
}
