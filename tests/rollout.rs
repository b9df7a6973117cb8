//! Stepped rollouts over ECDS (`spec.rollout`), with real Envoys: the candidate reaches the
//! pods step by step, a module Envoys refuse is rolled back before it reaches the rest, and a
//! restarted operator resumes a rollout where it was. What is asserted is what users see: the
//! response header each Envoy answers with, Envoy's own counters, status and Events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::ecds::*;
use support::gitops::*;
use support::*;
use wasmfilter::api::{Rollout, RolloutStep, WasmFilter};

const OLD: &str = "1.36.2";
const NEW: &str = "1.40.0";

/// Pods `r-a` to `r-d` (sorted by name), their Envoys alternating 1.40 and 1.36.
const PODS: [&str; 4] = ["r-a", "r-b", "r-c", "r-d"];

fn step(percent: Option<u32>, count: Option<u32>, pause_seconds: u32) -> RolloutStep {
    RolloutStep {
        percent,
        count,
        pause_seconds,
    }
}

/// `variant(value)` whose `proxy_on_configure` fails when Envoy's node id (`r-<x>.<ns>`, read
/// as property `xds.node.id`; Envoy has no `node.id` while it configures a plugin) has `b` or
/// `d` for `<x>`: a module that passes the pre-flight (which has no node) and loads in half of
/// the Envoys.
fn picky(value: &str, marker: &str) -> Vec<u8> {
    let src = variant(value, marker).replacen(
        "(module",
        "(module\n  (import \"env\" \"proxy_get_property\" (func $get_property (param i32 i32 i32 i32) (result i32)))\n  (data (i32.const 1024) \"xds\\00node\\00id\")",
        1,
    );
    let header =
        r#"(func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)"#;
    let check = r#"
    (if (i32.eqz (call $get_property (i32.const 1024) (i32.const 11) (i32.const 8) (i32.const 12)))
      (then
        (if (i32.or
              (i32.eq (i32.load8_u offset=2 (i32.load (i32.const 8))) (i32.const 98))
              (i32.eq (i32.load8_u offset=2 (i32.load (i32.const 8))) (i32.const 100)))
          (then (return (i32.const 0))))))"#;
    assert!(src.contains(header));
    wasm(&src.replacen(header, &format!("{header}{check}"), 1))
}

struct Fleet {
    envoys: Vec<Envoy>,
}

impl Fleet {
    /// One Envoy per pod of [`PODS`], subscribed to `<ns>/hdr`.
    fn start(n: &str, xds: u16) -> Self {
        let filters = [format!("{n}/hdr")];
        let envoys = PODS
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let version = if i % 2 == 0 { NEW } else { OLD };
                Envoy::start_ecds(version, &node(n, pod, &filters, i % 2 == 1, xds))
            })
            .collect();
        Fleet { envoys }
    }

    fn envoy(&self, pod: &str) -> &Envoy {
        &self.envoys[PODS.iter().position(|p| *p == pod).unwrap()]
    }

    /// The pods whose Envoy answers `x-wasmfilter: value` now.
    async fn answering(&self, value: &str) -> BTreeSet<&'static str> {
        let mut pods = BTreeSet::new();
        for (pod, e) in PODS.iter().zip(&self.envoys) {
            if let Some((_, h)) = e.get().await
                && h.get("x-wasmfilter").and_then(|v| v.to_str().ok()) == Some(value)
            {
                pods.insert(*pod);
            }
        }
        pods
    }

    async fn stats(&self, n: &str, stat: &str) -> Vec<u64> {
        let name = format!("extension_config_discovery.http_filter.{n}/hdr.{stat}");
        let mut out = Vec::new();
        for e in &self.envoys {
            out.push(e.stat(&name).await);
        }
        out
    }
}

fn rollout_of(wf: &WasmFilter) -> wasmfilter::api::RolloutStatus {
    wf.status
        .as_ref()
        .unwrap()
        .rollout
        .clone()
        .unwrap_or_default()
}

fn setup_pods(n: &str) {
    for (i, pod) in PODS.iter().enumerate() {
        let tag = if i % 2 == 0 { "v1.40.0" } else { "v1.36.2" };
        apply_ok(&envoy_pod_yaml(n, pod, "web", tag));
    }
}

/// Pods [`PODS`] with their Envoys, an operator, and the filter `hdr` (greeting `hello`, with
/// `rollout`) serving module v1 to every one of them (the first module goes everywhere at once,
/// and becomes the stable one). Returns the operator, its ECDS port, the Envoys and the
/// WasmFilter once it says so.
async fn v1_everywhere(
    client: &kube::Client,
    n: &str,
    rollout: &Rollout,
) -> (Operator, u16, Fleet, WasmFilter) {
    let env = env();
    setup_pods(n);
    let (op, xds) = operator(n).await;
    let v1 = format!("{}/rollout/{n}:v1", env.registry);
    push_module(&v1, wasm(&variant("on", &format!("one-{n}")))).await;
    ecds_filter(n, "hdr", &v1, "hello")
        .rollout(rollout.clone())
        .apply();
    let fleet = Fleet::start(n, xds);
    for e in &fleet.envoys {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    let wf = wait_status(client, n, "hdr", "v1 everywhere", |wf| {
        cond_is(wf, "Ready", "True", "Ready") && rollout_of(wf).stable.is_some()
    })
    .await;
    (op, xds, fleet, wf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_module_reaches_the_pods_step_by_step_then_becomes_stable() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("rollout-good");
    let n = &ns.name;
    let rollout = Rollout {
        steps: vec![step(None, Some(1), 4), step(Some(50), None, 4)],
        max_failures: 0,
    };
    let filter = |image: &str| ecds_filter(n, "hdr", image, "hello").rollout(rollout.clone());
    let (op, _xds, fleet, wf) = v1_everywhere(&client, n, &rollout).await;
    let v1_sha = wf
        .status
        .as_ref()
        .unwrap()
        .artifact
        .clone()
        .unwrap()
        .module_sha256;
    assert_eq!(rollout_of(&wf).stable.unwrap().module_sha256, v1_sha);

    let v2 = format!("{}/rollout/{n}:v2", env.registry);
    let module = wasm(&variant("v2", &format!("two-{n}")));
    let v2_sha = wasmfilter::cache::sha256_hex(&module);
    push_module(&v2, module).await;
    filter(&v2).apply();
    // Watch every Envoy until all answer v2: the pods that have it are always the first ones
    // by name, one, then two (held 4 s each), then all.
    let mut seen: Vec<BTreeSet<&str>> = Vec::new();
    let mut mid_rollout = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = fleet.answering("v2").await;
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now.len() == 1 && mid_rollout.is_none() {
            let api: kube::Api<WasmFilter> = kube::Api::namespaced(client.clone(), n);
            let wf = api.get("hdr").await.unwrap();
            if rollout_of(&wf).step == Some(0) {
                mid_rollout = Some(wf);
            }
        }
        if now.len() == PODS.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not finish: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for set in &seen {
        if set.contains("r-c") || set.contains("r-d") {
            assert!(
                set.contains("r-a") && set.contains("r-b"),
                "a later pod before an earlier one: {seen:?}"
            );
        } else {
            let expected: BTreeSet<&str> = PODS[..set.len()].iter().copied().collect();
            assert_eq!(set, &expected, "{seen:?}");
        }
    }
    assert!(
        seen.iter().any(|s| s.len() == 1) && seen.iter().any(|s| s.len() == 2),
        "each step was held: {seen:?}"
    );
    // During the first step, status said who has what, and that the rollout is under way.
    let wf = mid_rollout.expect("status seen at step 1");
    let s = wf.status.as_ref().unwrap();
    let r = rollout_of(&wf);
    assert_eq!(r.candidate.as_ref().unwrap().module_sha256, v2_sha);
    assert_eq!(r.stable.as_ref().unwrap().module_sha256, v1_sha);
    assert_eq!(r.candidate_workloads, Some(1));
    let revision = |pod: &str| workload(&wf, pod).and_then(|w| w.revision.clone());
    assert_eq!(revision("r-a").as_deref(), Some("candidate"));
    assert_eq!(revision("r-d").as_deref(), Some("stable"));
    assert_eq!(
        s.artifact.as_ref().unwrap().module_sha256,
        v1_sha,
        "status.artifact stays the module every pod has until the rollout ends"
    );
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RolloutInProgress")
    );
    assert!(
        ready
            .message
            .contains("(step 1 of 3): 1 of 4 selected pods have it"),
        "{}",
        ready.message
    );
    assert!(cond_is(&wf, "Reconciling", "True", "RolloutInProgress"));
    // Flux (kstatus) and Argo CD see a rollout under way as in progress.
    let obj = serde_json::to_value(&wf).unwrap();
    assert_eq!(kstatus(&obj).0, "InProgress");
    assert_eq!(argocd_health(&obj).0, "Progressing");

    // At the end: the candidate is stable, and everyone loaded it once.
    let wf = wait_status(&client, n, "hdr", "v2 stable", |wf| {
        cond_is(wf, "Ready", "True", "Ready")
            && rollout_of(wf)
                .stable
                .is_some_and(|s| s.module_sha256 == v2_sha)
    })
    .await;
    assert_eq!(rollout_of(&wf).candidate, None);
    assert!(workload(&wf, "r-a").unwrap().revision.is_none());
    assert_eq!(
        wf.status
            .as_ref()
            .unwrap()
            .artifact
            .as_ref()
            .unwrap()
            .module_sha256,
        v2_sha
    );
    assert_eq!(fleet.stats(n, "config_fail").await, [0, 0, 0, 0]);
    let normal: Vec<String> = events(n, "hdr", "Normal")
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    for reason in ["RolloutStarted", "RolloutStep", "RolloutCompleted"] {
        assert!(normal.iter().any(|r| r == reason), "{reason} in {normal:?}");
    }
    // Started at step 1, two more steps (half, then all), completed.
    for (result, count) in [("started", 1.0), ("step", 2.0), ("completed", 1.0)] {
        let name = format!("wasmfilter_rollouts_total{{result=\"{result}\"}}");
        assert_eq!(op.metric(&name).await, count, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_half_the_envoys_refuse_is_rolled_back_before_it_reaches_the_rest() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("rollout-back");
    let n = &ns.name;
    let rollout = Rollout {
        steps: vec![step(None, Some(2), 0)],
        max_failures: 0,
    };
    let filter = |image: &str, greeting: &str| {
        ecds_filter(n, "hdr", image, greeting).rollout(rollout.clone())
    };
    let (op, xds, fleet, _) = v1_everywhere(&client, n, &rollout).await;
    // Envoy counts a config it applies that differs from the one it runs (a re-sent identical
    // one, as after an operator restart, does not count).
    let reloads = fleet.stats(n, "config_reload").await;

    // The pre-flight passes it (it has no node to read); r-b's Envoy refuses it.
    let picky_ref = format!("{}/rollout/{n}:picky", env.registry);
    let module = picky("v2", &format!("picky-{n}"));
    let picky_sha = wasmfilter::cache::sha256_hex(&module);
    push_module(&picky_ref, module).await;
    filter(&picky_ref, "hello").apply();
    let wf = wait_status(&client, n, "hdr", "rolled back", |wf| {
        cond_is(wf, "Ready", "False", "RolledBack")
    })
    .await;
    let ready = condition(&wf, "Ready").unwrap();
    assert!(
        ready.message.starts_with(&format!(
            "1 of the proxies given module sha256:{} at rollout step 1 refused it (r-b: Unable to create Wasm plugin {n}/hdr)",
            &picky_sha[..12]
        )),
        "{}",
        ready.message
    );
    assert!(
        ready
            .message
            .contains("not tried again until the spec changes")
    );
    assert!(cond_is(&wf, "Stalled", "True", "RolledBack"));
    // Flux (kstatus) and Argo CD see a rollback as failed, with the operator's words.
    let obj = serde_json::to_value(&wf).unwrap();
    assert_eq!(kstatus(&obj).0, "Failed");
    let (health, message) = argocd_health(&obj);
    assert_eq!(health, "Degraded");
    assert!(
        message.starts_with("RolledBack: 1 of the proxies"),
        "{message}"
    );
    assert!(cond_is(&wf, "Deployed", "True", "KeptPreviousModule"));
    let r = rollout_of(&wf);
    let back = r.rolled_back.clone().unwrap();
    assert_eq!(
        (back.module_sha256.as_str(), back.step, back.refused),
        (picky_sha.as_str(), 0, 1)
    );
    assert_eq!(
        back.failures,
        [format!("r-b: Unable to create Wasm plugin {n}/hdr")]
    );
    assert_eq!(r.candidate, None);
    let warned = warning_events(n, "hdr");
    assert!(
        warned
            .iter()
            .any(|(r, m)| r == "RolledBack" && m.contains("r-b")),
        "{warned:?}"
    );
    // r-a had loaded it and is given v1 again; r-b kept v1; r-c and r-d were never sent it.
    for e in &fleet.envoys {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    let after = fleet.stats(n, "config_reload").await;
    assert_eq!(
        (after[2], after[3]),
        (reloads[2], reloads[3]),
        "r-c, r-d untouched"
    );
    assert_eq!(fleet.stats(n, "update_rejected").await, [0, 1, 0, 0]);
    assert!(
        after[0] >= reloads[0] + 2,
        "r-a took the candidate, then v1 again"
    );
    assert_eq!(
        op.metric("wasmfilter_rollouts_total{result=\"rolled_back\"}")
            .await,
        1.0
    );

    // A restarted operator remembers: the candidate is not tried again.
    let cache = op.take_cache_dir();
    let op =
        Operator::start_with_cache(n, &["--xds-listen", &format!("127.0.0.1:{xds}")], cache).await;
    wait_for(
        "the restarted operator serving",
        Duration::from_secs(30),
        || async {
            (op.logs().matches("Envoy loaded the filter (ACK)").count() >= 4).then_some(())
        },
    )
    .await;
    wait_status(&client, n, "hdr", "still rolled back", |wf| {
        cond_is(wf, "Ready", "False", "RolledBack")
    })
    .await;
    assert_eq!(fleet.stats(n, "update_rejected").await, [0, 1, 0, 0]);
    assert_eq!(fleet.answering("on").await.len(), 4);

    // A spec change tries it again (and it is rolled back again, at r-b).
    filter(&picky_ref, "again").apply();
    wait_status(&client, n, "hdr", "rolled back again", |wf| {
        cond_is(wf, "Ready", "False", "RolledBack")
            && rollout_of(wf)
                .rolled_back
                .is_some_and(|b| Some(b.generation) == wf.metadata.generation)
    })
    .await;
    assert_eq!(fleet.stats(n, "update_rejected").await, [0, 2, 0, 0]);
    let after = fleet.stats(n, "config_reload").await;
    assert_eq!((after[2], after[3]), (reloads[2], reloads[3]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_mid_rollout_resumes_it() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("rollout-restart");
    let n = &ns.name;
    let rollout = Rollout {
        steps: vec![step(None, Some(1), 8)],
        max_failures: 0,
    };
    let filter = |image: &str| ecds_filter(n, "hdr", image, "hello").rollout(rollout.clone());
    let (op, xds, fleet, _) = v1_everywhere(&client, n, &rollout).await;
    let reloads = fleet.stats(n, "config_reload").await;

    let v2 = format!("{}/rollout/{n}:v2", env.registry);
    let module = wasm(&variant("v2", &format!("two-{n}")));
    let v2_sha = wasmfilter::cache::sha256_hex(&module);
    push_module(&v2, module).await;
    filter(&v2).apply();
    fleet
        .envoy("r-a")
        .wait_header("x-wasmfilter", Some("v2"), 200)
        .await;
    wait_status(&client, n, "hdr", "at step 1", |wf| {
        rollout_of(wf).step == Some(0)
    })
    .await;
    // The start is announced (the Event follows the status write; a process killed in between
    // never sends it, which is not what this test is about).
    let started = || {
        events(n, "hdr", "Normal")
            .into_iter()
            .filter(|(r, _)| r == "RolloutStarted")
            .count()
    };
    wait_for(
        "the RolloutStarted Event",
        Duration::from_secs(30),
        || async { (started() >= 1).then_some(()) },
    )
    .await;

    // The operator goes away mid-step and comes back: the rollout goes on from where it was
    // (same step, same start), not from the beginning, and nobody is given v1 again.
    let cache = op.take_cache_dir();
    let _op =
        Operator::start_with_cache(n, &["--xds-listen", &format!("127.0.0.1:{xds}")], cache).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let have = fleet.answering("v2").await;
        assert!(have.contains("r-a"), "r-a was given v1 again: {have:?}");
        if have.len() == PODS.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not resume: {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wf = wait_status(&client, n, "hdr", "v2 stable", |wf| {
        cond_is(wf, "Ready", "True", "Ready")
            && rollout_of(wf)
                .stable
                .is_some_and(|s| s.module_sha256 == v2_sha)
    })
    .await;
    assert!(rollout_of(&wf).candidate.is_none());
    let after = fleet.stats(n, "config_reload").await;
    let took: Vec<u64> = after.iter().zip(&reloads).map(|(a, b)| a - b).collect();
    assert_eq!(
        took,
        [1, 1, 1, 1],
        "each Envoy loaded v2 once and nothing else"
    );
    assert_eq!(started(), 1, "the restarted operator did not start over");
}
