//! The operator image, built without a container engine by `e2e/image.sh` (the Containerfile's
//! layout; `e2e/test.sh` builds its static binary before the tests), pushed to the real registry, pulled back and run from its extracted layer: a static
//! binary that answers `--version` and prints the CRD, as a non-root user with no shell.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::Value;
use support::*;

#[tokio::test]
async fn the_image_runs_its_static_binary_as_non_root_with_nothing_else_inside() {
    let env = env();
    client().await; // installs the TLS provider the HTTP client needs
    let tag = format!("t{:08x}", fastrand::u32(..));
    let reference = format!("{}/wasmfilter/operator:{tag}", env.registry);
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/image.sh"))
        .args(["--no-build", &reference])
        .output()
        .unwrap();
    assert!(out.status.success(), "e2e/image.sh: {}", stderr(&out));

    let manifest = get_manifest(&env.registry, "wasmfilter/operator", &tag).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/v2/wasmfilter/operator", env.registry);
    let blob = |digest: &str| http.get(format!("{base}/blobs/{digest}")).send();
    let config: Value = blob(manifest["config"]["digest"].as_str().unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/wasmfilter"])
    );
    let image_env: Vec<String> = DEPLOYED_ENV
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert_eq!(config["config"]["Env"], serde_json::json!(image_env));
    // The chart runs it as that same user.
    let values = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/wasmfilter-operator/values.yaml"
    ))
    .unwrap();
    assert!(values.contains("runAsUser: 65532") && values.contains("runAsGroup: 65532"));

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let layer = blob(layers[0]["digest"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&layer[..]));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        if name == "wasmfilter" {
            assert_eq!(entry.header().mode().unwrap() & 0o777, 0o755);
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            let path = dir.path().join("wasmfilter");
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        [
            "etc",
            "etc/group",
            "etc/passwd",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "wasmfilter"
        ],
        "nothing but the binary, its CA bundle and the user (no shell)"
    );

    let binary = dir.path().join("wasmfilter");
    let elf = Command::new("readelf")
        .arg("-l")
        .arg(&binary)
        .output()
        .unwrap();
    assert!(
        !stdout(&elf).contains("Requesting program interpreter"),
        "the binary must be static: the image has no libc"
    );
    let out = Command::new(&binary).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("wasmfilter {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(&binary).arg("crd").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/wasmfilter.dev_wasmfilters.yaml"
    ))
    .unwrap();
    assert_eq!(stdout(&out), crd);
}
