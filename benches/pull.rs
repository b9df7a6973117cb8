//! Pull benchmark (issue 3): a 1 MiB and a 20 MiB module from the local test registry, with
//! `wasmfilter pull` and with `oras pull`, cold and warm, in the same run.
//!
//! Run with `e2e/bench.sh pull` (it brings the test environment up). Cold = a fresh process
//! with nothing cached. Warm = oras with its blob cache (`ORAS_CACHE`) primed, and, for us, the
//! operator's in-process resolve with the module already in its cache: `Always` (the tag is
//! resolved against the registry, the module comes from the cache) and `IfNotPresent` (the
//! module is only re-verified, no registry round trip).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use support::module_of_size;
use wasmfilter::cache::ModuleCache;
use wasmfilter::oci::{Credentials, Format, RegistryConfig, Resolver};

const RUNS: usize = 7;
/// Cold runs of each tool, alternating.
const COLD_RUNS: usize = 21;
const WARM_RUNS: usize = 200;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn time_cmd(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = std::env::var("WASMFILTER_REGISTRY")
        .expect("WASMFILTER_REGISTRY: run through e2e/bench.sh (it starts the test registry)");
    let oras = std::env::var("WASMFILTER_ORAS").expect("WASMFILTER_ORAS");
    let ours = env!("CARGO_BIN_EXE_wasmfilter");
    let work = tempfile::tempdir().unwrap();
    let push_client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let resolver = Resolver::new(RegistryConfig {
        plain_http: vec![registry.clone()],
        ..Default::default()
    })
    .unwrap();
    let tag = format!("{:08x}", fastrand::u32(..));

    println!(
        "pull benchmark: registry {registry}, cold: {COLD_RUNS} runs each, alternating (median); warm oras: {RUNS} runs; release build"
    );
    println!(
        "{:>7} | {:>12} | {:>12} | {:>6} | {:>14} | {:>20} | {:>20}",
        "module",
        "ours cold",
        "oras cold",
        "ratio",
        "oras warm",
        "ours warm Always",
        "ours warm IfNotPres."
    );
    for (label, size) in [("1 MiB", 1usize << 20), ("20 MiB", 20 << 20)] {
        let module = module_of_size(size);
        let image = format!("{registry}/bench/pull-{}:{tag}", size >> 20);
        let reference: Reference = image.parse().unwrap();
        wasmfilter::oci::push_module(
            &push_client,
            &RegistryAuth::Anonymous,
            &reference,
            module.clone(),
            Format::SoloOci,
            &Default::default(),
        )
        .await
        .unwrap();

        let out_file = work.path().join("ours.wasm");
        let oras_out = work.path().join("oras-out");
        // One of ours, then one of oras, and again: both meet the machine in the same state
        // (this 2-core VM drifts by tens of percent over a minute). Both tools write into a
        // place emptied first (renaming over an existing file makes ext4 flush it, which would
        // time the disk, not the pull).
        let mut ours_cold = Vec::new();
        let mut oras_cold = Vec::new();
        for _ in 0..COLD_RUNS {
            let _ = std::fs::remove_file(&out_file);
            ours_cold.push(time_cmd(
                Command::new(ours)
                    .args(["pull", &image, "--plain-http", "-o"])
                    .arg(&out_file),
            ));
            let _ = std::fs::remove_dir_all(&oras_out);
            oras_cold.push(time_cmd(
                Command::new(&oras)
                    .args(["pull", "--plain-http", &image, "-o"])
                    .arg(&oras_out)
                    .env("HOME", work.path())
                    .env_remove("ORAS_CACHE"),
            ));
        }
        assert_eq!(std::fs::read(&out_file).unwrap(), module);
        assert_eq!(std::fs::read(oras_out.join("plugin.wasm")).unwrap(), module);

        let oras_cache = work.path().join(format!("oras-cache-{size}"));
        let oras_warm: Vec<_> = (0..=RUNS)
            .map(|_| {
                let _ = std::fs::remove_dir_all(&oras_out);
                time_cmd(
                    Command::new(&oras)
                        .args(["pull", "--plain-http", &image, "-o"])
                        .arg(&oras_out)
                        .env("HOME", work.path())
                        .env("ORAS_CACHE", &oras_cache),
                )
            })
            .skip(1) // the first run fills the cache
            .collect();

        let cache = ModuleCache::open(work.path().join(format!("cache-{size}"))).unwrap();
        let creds = Credentials::Anonymous;
        let first = resolver
            .fetch(&image, None, None, &cache, &creds)
            .await
            .unwrap();
        assert_eq!(first.downloaded, size as u64);
        let mut warm_always = Vec::new();
        for _ in 0..WARM_RUNS {
            let start = Instant::now();
            let f = resolver
                .fetch(&image, None, None, &cache, &creds)
                .await
                .unwrap();
            warm_always.push(start.elapsed());
            assert_eq!(f.downloaded, 0);
        }
        // IfNotPresent with the module cached: what the operator does on a resync.
        let mut warm_if_not_present = Vec::new();
        for _ in 0..WARM_RUNS {
            let start = Instant::now();
            assert!(cache.verify(&first.artifact.module_sha256).unwrap());
            cache.touch(&first.artifact.module_sha256);
            warm_if_not_present.push(start.elapsed());
        }

        let (oc, rc) = (median(ours_cold), median(oras_cold));
        println!(
            "{:>7} | {:>12} | {:>12} | {:>6} | {:>14} | {:>20} | {:>20}",
            label,
            ms(oc),
            ms(rc),
            format!("{:.2}x", oc.as_secs_f64() / rc.as_secs_f64()),
            ms(median(oras_warm)),
            format!(
                "{} (p99 {})",
                ms(median(warm_always.clone())),
                ms(percentile(warm_always, 0.99))
            ),
            format!(
                "{} (p99 {})",
                ms(median(warm_if_not_present.clone())),
                ms(percentile(warm_if_not_present, 0.99))
            ),
        );
    }
    println!("goals: ours cold <= 0.7x oras cold; warm in-process resolve < 5 ms");
}
