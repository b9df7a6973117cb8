//! GitOps tools read WasmFilter status right: the real kstatus library (what Flux's health
//! checks use; `e2e/tools/kstatus`) and the shipped Argo CD health check run by a real Lua 5.1
//! interpreter (Argo CD runs gopher-lua, Lua 5.1), on real objects the operator wrote: Ready,
//! failed for good, retrying, and just taken up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::gitops::*;
use support::*;

fn get(ns: &str, name: &str) -> Value {
    serde_json::from_slice(&kubectl(&["get", "wf", name, "-n", ns, "-o", "json"]).stdout).unwrap()
}

fn condition_of(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test]
async fn flux_kstatus_and_the_argocd_health_check_read_every_state_right() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("gitops");
    let n = ns.name.as_str();
    // A pull that stays in flight.
    let silent = SilentRegistry::start().await;
    let silent_addr = silent.addr.clone();
    let _op = Operator::start(
        n,
        &[
            "--insecure-registry",
            &silent_addr,
            "--registry-timeout-seconds",
            "300",
        ],
    )
    .await;
    let image = format!("{}/gitops/{n}:v1", env.registry);
    push_module(&image, module(&format!("gitops-{n}"))).await;
    let down = format!("127.0.0.1:{}/gitops/down:v1", free_port());
    let cases = [
        ("ready", image.clone()),
        ("stalled", image.replace(":v1", ":never-pushed")),
        ("retrying", down),
        ("taken-up", format!("{silent_addr}/gitops/slow:v1")),
    ];
    for (name, image) in &cases {
        Filter::new(n, name, image)
            .config(json!({"greeting": "hello"}))
            .apply();
    }
    wait_condition(&client, n, "ready", "Ready", "True").await;
    let states = wait_for("every state reported", Duration::from_secs(60), || async {
        let objs: Vec<Value> = cases.iter().map(|(name, _)| get(n, name)).collect();
        let has =
            |i: usize, t: &str| condition_of(&objs[i], t).is_some_and(|c| c["status"] == "True");
        (has(0, "Ready") && has(1, "Stalled") && has(2, "Reconciling") && has(3, "Reconciling"))
            .then_some(objs)
    })
    .await;

    let expected = [
        ("ready", "Current", "Healthy"),
        ("stalled", "Failed", "Degraded"),
        ("retrying", "InProgress", "Progressing"),
        ("taken-up", "InProgress", "Progressing"),
    ];
    for (obj, (name, flux, argo)) in states.iter().zip(expected) {
        let (k, k_message) = kstatus(obj);
        assert_eq!(k, flux, "{name}: kstatus says {k} ({k_message})\n{obj:#}");
        let (a, a_message) = argocd_health(obj);
        assert_eq!(a, argo, "{name}: Argo CD says {a} ({a_message})\n{obj:#}");
    }
    let (_, message) = argocd_health(&states[1]);
    assert!(message.starts_with("ManifestNotFound: "), "{message}");
    let (_, message) = kstatus(&states[1]);
    assert!(message.contains("not found"), "{message}");

    // A spec change not yet acted on is in progress for both, whatever the old Ready said.
    let mut newer = states[0].clone();
    newer["metadata"]["generation"] =
        (newer["metadata"]["generation"].as_i64().unwrap() + 1).into();
    assert_eq!(kstatus(&newer).0, "InProgress");
    assert_eq!(argocd_health(&newer).0, "Progressing");
    // So is an object the operator has not written at all yet.
    let mut bare = states[0].clone();
    bare.as_object_mut().unwrap().remove("status");
    assert_eq!(argocd_health(&bare).0, "Progressing");
}

/// The GitOps examples are objects Argo CD's and Flux's own CRDs accept (installed from their Go
/// modules by `e2e/setup.sh`; no Argo CD or Flux controller runs here), and what they point at
/// exists: the chart renders with the Application's values, the kustomize directories build.
#[test]
fn the_argocd_and_flux_examples_are_accepted_by_their_crds_and_point_at_what_exists() {
    env();
    let root = env!("CARGO_MANIFEST_DIR");
    for ns in ["argocd", "flux-system"] {
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        apply_ok(&yaml);
    }
    let application = format!("{root}/gitops/argocd/application.yaml");
    let flux = format!("{root}/gitops/flux/operator.yaml");
    for file in [&application, &flux] {
        let out = kubectl(&["apply", "--dry-run=server", "-f", file]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
    }
    // The schemas are really checked: a misspelled field is refused.
    let text = std::fs::read_to_string(&flux).unwrap();
    let out = kubectl_stdin(
        &["apply", "--dry-run=server", "-f", "-"],
        &text.replacen("sourceRef:", "sourceRefs:", 1),
    );
    assert!(!out.status.success(), "a misspelled field was accepted");
    assert!(stderr(&out).contains("sourceRefs"), "{}", stderr(&out));

    // Argo CD: the chart at that path, with those values.
    let app: Value =
        serde_norway::from_str(&std::fs::read_to_string(&application).unwrap()).unwrap();
    let source = &app["spec"]["source"];
    let chart = format!("{root}/{}", source["path"].as_str().unwrap());
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        serde_json::to_string(&source["helm"]["valuesObject"]).unwrap(),
    )
    .unwrap();
    let helm = std::env::var("WASMFILTER_HELM").expect("WASMFILTER_HELM (set by e2e/env.sh)");
    let out = std::process::Command::new(helm)
        .args(["template", source["helm"]["releaseName"].as_str().unwrap()])
        .arg(&chart)
        .arg("-f")
        .arg(values.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kind: Deployment"));

    // Flux: every Kustomization's path builds.
    let mut paths = Vec::new();
    for doc in text.split("\n---\n") {
        let obj: Value = serde_norway::from_str(doc).unwrap();
        if obj["kind"] == "Kustomization" {
            paths.push(obj["spec"]["path"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(paths, ["./config/default", "./config/samples"]);
    for path in paths {
        let dir = format!("{root}/{path}");
        let out = kubectl(&["kustomize", &dir]);
        assert!(out.status.success(), "{dir}: {}", stderr(&out));
    }
}
