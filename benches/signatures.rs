//! Signature verification benchmark (issue 13): the time to verify one artifact's cosign
//! signature with cached trust material (the keys parsed once, as the operator holds them
//! for a reconcile), two ways: the decision alone on fetched signatures (ECDSA P-256 and the
//! payload checks), and fetching the signature manifest and payload from the local registry
//! plus the decision (what a reconcile adds). Beside it, the peer: `cosign verify --key` on
//! the same artifact, as a ratio. Goal: under 10 ms per artifact. Run with
//! `e2e/bench.sh signatures`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Instant;

use common::{median_and_max, ms};
use support::*;
use wasmfilter::oci::signature::{self, TrustedKey};
use wasmfilter::oci::{Credentials, RegistryConfig, Resolver};

mod common;

#[tokio::main]
async fn main() {
    tls_provider();
    let env = env();
    let cosign = std::env::var("WASMFILTER_COSIGN").expect("WASMFILTER_COSIGN (e2e/env.sh)");
    let dir = tempfile::tempdir().unwrap();
    let keygen = Command::new(&cosign)
        .args(["generate-key-pair", "--output-key-prefix", "bench"])
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let repo = format!("bench/signatures-{:08x}", fastrand::u32(..));
    let image = format!("{}/{repo}:1", env.registry);
    let digest = push_module(&image, module(&repo)).await;
    let signed = Command::new(&cosign)
        .args([
            "sign",
            "--key",
            "bench.key",
            "--tlog-upload=false",
            "--allow-http-registry",
            "-y",
        ])
        .arg(format!("{}/{repo}@{digest}", env.registry))
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", stderr(&signed));

    let pem = std::fs::read_to_string(dir.path().join("bench.pub")).unwrap();
    let keys = vec![TrustedKey::from_pem("bench.pub", &pem).unwrap()];
    let resolver = Resolver::new(RegistryConfig {
        plain_http: vec![env.registry.clone()],
        ..Default::default()
    })
    .unwrap();
    let creds = Credentials::Anonymous;
    let found = resolver
        .cosign_signatures(&image, &digest, &creds)
        .await
        .unwrap();
    let (decide, decide_max) = median_and_max(200, || {
        signature::verify(&digest, found.as_ref(), &keys).is_ok()
    });
    let mut fetches = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let found = resolver
            .cosign_signatures(&image, &digest, &creds)
            .await
            .unwrap();
        assert!(signature::verify(&digest, found.as_ref(), &keys).is_ok());
        fetches.push(start.elapsed());
    }
    fetches.sort();
    let fetch = fetches[fetches.len() / 2];
    let (peer, _) = median_and_max(5, || {
        Command::new(&cosign)
            .args([
                "verify",
                "--key",
                "bench.pub",
                "--insecure-ignore-tlog=true",
                "--allow-http-registry",
            ])
            .arg(&image)
            .current_dir(dir.path())
            .output()
            .unwrap()
            .status
            .success()
    });
    println!("signature verification benchmark, release build, one cosign signature (ECDSA P-256)");
    println!(
        "decision on fetched signatures: median {:.3} ms (max {:.3}); fetch from the local registry \
         + decision: median {:.2} ms (max {:.2}); cosign verify --key (whole CLI run): median {:.1} ms; \
         ours (fetch + decision) / cosign {:.3}x",
        ms(decide),
        ms(decide_max),
        ms(fetch),
        ms(fetches[fetches.len() - 1]),
        ms(peer),
        fetch.as_secs_f64() / peer.as_secs_f64()
    );
    println!("goal: under 10 ms per artifact with cached trust material");
}
