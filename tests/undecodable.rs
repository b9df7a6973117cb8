//! One WasmFilter the operator cannot decode never stops the others. Such an object exists when
//! it was stored under an earlier, looser schema: here the CRD's `priority` bound is lifted for a
//! moment, as an older CRD had none, and a filter with `priority: 3000000000` is stored.
//!
//! Its own test binary: it changes the cluster-wide CRD, and test binaries run one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;

const CRD: &str = "wasmfilters.wasmfilter.dev";
const PRIORITY_MAX: &str =
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/priority/maximum";

/// Puts the generated CRD back, even when the test fails.
struct RestoreCrd;

impl Drop for RestoreCrd {
    fn drop(&mut self) {
        let out = kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/crds/wasmfilter.dev_wasmfilters.yaml"
            ),
        ]);
        assert!(out.status.success(), "restoring the CRD: {}", stderr(&out));
    }
}

#[tokio::test]
async fn an_undecodable_filter_is_reported_and_the_others_still_deploy() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("undecodable");
    let n = &ns.name;
    let image = format!("{}/filters/undecodable-{n}:v1", env.registry);
    push_module(&image, module(&format!("undecodable-{n}"))).await;

    // Stored under a CRD without the bound; then the current CRD is back.
    {
        let _restore = RestoreCrd;
        let lift = format!(r#"[{{"op": "remove", "path": "{PRIORITY_MAX}"}}]"#);
        let out = kubectl(&["patch", "crd", CRD, "--type=json", "-p", &lift]);
        assert!(out.status.success(), "{}", stderr(&out));
        let mut bad = Filter::new(n, "bad", &image)
            .config(json!({"greeting": "hello"}))
            .json();
        bad["spec"]["priority"] = json!(3_000_000_000u64);
        let bad = bad.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The API server takes a moment to serve the new schema.
            let out = kubectl_apply(&bad);
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{}", stderr(&out));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Filter::new(n, "good", &image)
        .config(json!({"greeting": "hello"}))
        .apply();

    // The operator starts, gets ready and deploys the good one.
    let mut op = Operator::start(n, &[]).await;
    let good = wait_condition(&client, n, "good", "Ready", "True").await;
    assert!(good.status.unwrap().artifact.is_some());

    // The bad one says why, in status (read raw: it does not decode) and in an Event.
    let ready = wait_for(
        "Ready=False InvalidSpec on the bad filter",
        Duration::from_secs(30),
        || async {
            let out = kubectl(&["get", "wf", "bad", "-n", n, "-o", "json"]);
            let obj: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            obj["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready" && c["reason"] == "InvalidSpec")
                .cloned()
        },
    )
    .await;
    assert_eq!(ready["status"], "False");
    let message = ready["message"].as_str().unwrap();
    assert!(message.contains("3000000000"), "{message}");
    assert!(message.contains("Correct the field"), "{message}");
    wait_for(
        "Warning Event InvalidSpec",
        Duration::from_secs(30),
        || async {
            warning_events(n, "bad")
                .iter()
                .any(|(r, _)| r == "InvalidSpec")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        op.metric("wasmfilter_reconcile_errors_total{reason=\"InvalidSpec\"}")
            .await,
        1.0
    );
    assert_eq!(
        op.logs().matches("cannot decode WasmFilter").count(),
        1,
        "reported once:\n{}",
        op.logs()
    );

    // Corrected, it deploys like any other.
    let out = kubectl(&[
        "patch",
        "wf",
        "bad",
        "-n",
        n,
        "--type=merge",
        "-p",
        r#"{"spec":{"priority":5}}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_condition(&client, n, "bad", "Ready", "True").await;

    // SIGTERM ends it promptly.
    let start = Instant::now();
    let status = op.terminate(Duration::from_secs(5));
    assert!(
        status.is_some(),
        "still running 5 s after SIGTERM:\n{}",
        op.logs()
    );
    println!("exited {:?} after SIGTERM", start.elapsed());
}
