//! Per-workload verdicts in the operator: each selected pod's Envoy version (annotation,
//! istio-proxy image, Envoy image, or unknown), `status.workloads`, the `Compatible`
//! condition, `onIncompatible: Block | Warn`, and pods that appear after the filter.
//! Pods are API objects only (no kubelet), as DESIGN.md says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;
use wasmfilter::cache::sha256_hex;

fn pod_yaml(
    ns: &str,
    name: &str,
    app: &str,
    annotation: Option<&str>,
    image: (&str, &str),
) -> String {
    let annotations = annotation
        .map(|v| format!(", annotations: {{wasmfilter.dev/envoy-version: \"{v}\"}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}{annotations}}}\n\
         spec: {{containers: [{{name: app, image: nginx}}, {{name: {}, image: \"{}\"}}]}}\n",
        image.0, image.1
    )
}

/// The add-header filter plus an import no Envoy provides.
fn incompatible_module(marker: &str) -> Vec<u8> {
    let src = include_str!("fixtures/modules/add_header.wat");
    let src = src.replacen(
        "(module",
        "(module\n  (import \"env\" \"proxy_make_coffee\" (func (param i32) (result i32)))",
        1,
    );
    let end = src.rfind(')').unwrap();
    wat::parse_str(format!(
        "{}  (data (i32.const 600) \"{marker}\")\n)\n",
        &src[..end]
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_get_per_pod_verdicts_and_incompatible_modules_are_blocked_or_warned() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("workloads");
    let n = &ns.name;
    for yaml in [
        pod_yaml(
            n,
            "istio-1-28",
            "web",
            None,
            ("istio-proxy", "docker.io/istio/proxyv2:1.28.0"),
        ),
        pod_yaml(
            n,
            "annotated",
            "web",
            Some("1.40.0"),
            ("proxy", "example.com/custom-envoy:7"),
        ),
        pod_yaml(
            n,
            "plain-envoy",
            "web",
            None,
            ("envoy", "docker.io/envoyproxy/envoy:v1.39.1"),
        ),
        pod_yaml(
            n,
            "mystery",
            "web",
            None,
            ("sidecar", "example.com/proxy:2"),
        ),
        pod_yaml(n, "other-app", "api", Some("1.36.2"), ("proxy", "x")),
    ] {
        apply_ok(&yaml);
    }
    let _op = Operator::start(n, &[]).await;
    let good_image = format!("{}/workloads/{n}-good:v1", env.registry);
    push_module(&good_image, module(&format!("good-{n}"))).await;
    let bad = incompatible_module(&format!("bad-{n}"));
    let bad_image = format!("{}/workloads/{n}-bad:v1", env.registry);
    push_module(&bad_image, bad.clone()).await;

    // A compatible module: deployed; one pod's Envoy cannot be placed, so Compatible=Unknown.
    Filter::new(n, "good", &good_image).app("web").apply();
    let wf = wait_condition(&client, n, "good", "Compatible", "Unknown").await;
    assert_eq!(condition(&wf, "Ready").unwrap().status, "True");
    let workloads = wf.status.as_ref().unwrap().workloads.clone();
    let by_name = |name: &str| workloads.iter().find(|w| w.name == name).unwrap().clone();
    assert_eq!(workloads.len(), 4, "{workloads:?}");
    let w = by_name("istio-1-28");
    assert_eq!(
        (
            w.envoy_version.as_deref(),
            w.version_source.as_str(),
            w.compatible
        ),
        (Some("1.36"), "istio-proxy-image", Some(true))
    );
    let w = by_name("annotated");
    assert_eq!(
        (
            w.envoy_version.as_deref(),
            w.version_source.as_str(),
            w.compatible
        ),
        (Some("1.40.0"), "annotation", Some(true))
    );
    let w = by_name("plain-envoy");
    assert_eq!(
        (
            w.envoy_version.as_deref(),
            w.version_source.as_str(),
            w.compatible
        ),
        (Some("1.39.1"), "envoy-image", Some(true))
    );
    let w = by_name("mystery");
    assert_eq!((w.envoy_version.as_deref(), w.compatible), (None, None));
    assert!(
        w.reasons[0].contains("wasmfilter.dev/envoy-version"),
        "{w:?}"
    );

    // The unknown pod goes away: verdicts follow without any spec change.
    let out = kubectl(&[
        "-n",
        n,
        "delete",
        "pod",
        "mystery",
        "--grace-period=0",
        "--force",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let wf = wait_condition(&client, n, "good", "Compatible", "True").await;
    assert_eq!(wf.status.unwrap().workloads.len(), 3);

    // The same filter moved to a module every selected Envoy refuses: blocked, and the good
    // module stays deployed.
    let wps = child_api(&client, n, "WasmPlugin");
    let before = wps.get("good").await.unwrap();
    Filter::new(n, "good", &bad_image).app("web").apply();
    let wf = wait_condition(&client, n, "good", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "Incompatible");
    assert_eq!(condition(&wf, "Compatible").unwrap().status, "False");
    assert_eq!(
        condition(&wf, "Deployed").unwrap().reason,
        "KeptPreviousModule"
    );
    let refusals = &wf.status.as_ref().unwrap().workloads;
    assert!(
        refusals.iter().all(|w| w.compatible == Some(false)),
        "{refusals:?}"
    );
    assert_eq!(
        refusals[0].reasons,
        ["Failed to load Wasm module due to a missing import: env.proxy_make_coffee"]
    );
    let after = wps.get("good").await.unwrap();
    assert_eq!(
        after.data, before.data,
        "a blocked module must not touch the child"
    );

    // With Warn it is deployed, and said so.
    Filter::new(n, "warned", &bad_image)
        .app("web")
        .on_incompatible(OnIncompatible::Warn)
        .apply();
    let wf = wait_condition(&client, n, "warned", "Ready", "True").await;
    assert_eq!(condition(&wf, "Compatible").unwrap().status, "False");
    let child = wps.get("warned").await.unwrap();
    assert!(child.data.to_string().contains(&sha256_hex(&bad)));
    wait_for(
        "an Incompatible Warning Event",
        Duration::from_secs(10),
        || async {
            warning_events(n, "warned")
                .into_iter()
                .find(|(reason, _)| reason == "Incompatible")
        },
    )
    .await;

    // A pod that appears later is checked without a resync or a spec change.
    Filter::new(n, "late", &bad_image)
        .app("late")
        .on_incompatible(OnIncompatible::Warn)
        .apply();
    let wf = wait_condition(&client, n, "late", "Compatible", "True").await;
    assert_eq!(condition(&wf, "Compatible").unwrap().reason, "NoWorkloads");
    apply_ok(&pod_yaml(
        n,
        "late-pod",
        "late",
        Some("1.36.2"),
        ("proxy", "x"),
    ));
    let wf = wait_condition(&client, n, "late", "Compatible", "False").await;
    let w = &wf.status.unwrap().workloads[0];
    assert_eq!((w.name.as_str(), w.compatible), ("late-pod", Some(false)));
}
