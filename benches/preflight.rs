//! Pre-flight benchmark (issue 13): what running a module in the sandbox costs, for the real
//! Go SDK filter and for 20 MiB modules (mostly code, mostly data), three ways:
//! - cold, no compilation cache: a new engine compiles the module, then start + configure;
//! - cold with wasmtime's compilation cache (a new engine, as a new process has, finding the
//!   compiled module on disk): the goal, under 100 ms;
//! - warm: the compiled module kept in memory (what the operator does for a new
//!   configuration of a module it ran before): start + configure only.
//!
//! Beside it, the peer: what a real Envoy (1.40.0) spends building the VM and configuring the
//! plugin for the same module and configuration, measured as `envoy --mode validate` with the
//! filter minus `envoy --mode validate` without it, in the same run. Run with
//! `e2e/bench.sh preflight`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median_and_max, module, ms};
use wasmfilter::preflight::{Limits, Plan, Sandbox};

mod common;

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(600),
        memory_bytes: 1 << 30,
    }
}

/// One cold run in a new engine: compile (or load from `cache`), start, configure.
fn cold(wasm: &[u8], plan: &Plan, cache: Option<&Path>) -> (Duration, Duration) {
    let sandbox = Sandbox::new(limits(), cache.map(Path::to_path_buf)).unwrap();
    let start = Instant::now();
    let module = sandbox.compile(wasm).unwrap();
    let compiled = start.elapsed();
    let report = sandbox.run(&module, plan);
    assert!(report.passed(), "{report:?}");
    (compiled, start.elapsed())
}

/// `envoy --mode validate` on `config`, in ms (median of `runs`).
fn envoy_validate_ms(envoy: &Path, config: &Path, runs: usize) -> f64 {
    let (median, _) = median_and_max(runs, || {
        Command::new(envoy)
            .args(["--mode", "validate", "-l", "critical", "-c"])
            .arg(config)
            .output()
            .unwrap()
            .status
            .success()
    });
    ms(median)
}

/// The peer's cost: Envoy validating a config with the Wasm filter, minus without it.
fn envoy_vm_ms(module: &Path, configuration: &str, dir: &Path) -> Option<f64> {
    let envoy_dir = std::env::var("WASMFILTER_ENVOY_DIR").ok()?;
    let envoy = Path::new(&envoy_dir).join("1.40.0/envoy");
    if !envoy.is_file() {
        return None;
    }
    let template = include_str!("../e2e/envoy/validate-wasm.json");
    let mut with: serde_json::Value =
        serde_json::from_str(&template.replace("WASM_MODULE_PATH", &module.to_string_lossy()))
            .unwrap();
    let filters = &mut with["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"];
    filters[0]["typed_config"]["config"]["configuration"] = serde_json::json!({
        "@type": "type.googleapis.com/google.protobuf.StringValue",
        "value": configuration,
    });
    let mut without = with.clone();
    without["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    let (with_path, without_path) = (dir.join("with.json"), dir.join("without.json"));
    std::fs::write(&with_path, with.to_string()).unwrap();
    std::fs::write(&without_path, without.to_string()).unwrap();
    let runs = 5;
    Some(
        envoy_validate_ms(&envoy, &with_path, runs)
            - envoy_validate_ms(&envoy, &without_path, runs),
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, Vec<u8>, String)> = Vec::new();
    match std::env::var("WASMFILTER_FIXTURE_MODULES") {
        Ok(fixtures) => {
            let go = std::fs::read(Path::new(&fixtures).join("go_configured_filter.wasm")).unwrap();
            cases.push((
                "Go SDK filter (real)".into(),
                go,
                r#"{"header":"x-team","value":"blue"}"#.into(),
            ));
        }
        Err(_) => println!("WASMFILTER_FIXTURE_MODULES unset: the Go SDK filter is skipped"),
    }
    cases.push((
        "20 MiB, mostly code".into(),
        module(20_000, 1040, 0),
        String::new(),
    ));
    cases.push((
        "20 MiB, mostly data".into(),
        module(0, 0, 20 << 20),
        r#"{"greeting":"hi"}"#.into(),
    ));
    println!("pre-flight benchmark, release build; Envoy 1.40.0 as the peer");
    for (label, wasm, configuration) in cases {
        let plan = Plan {
            configuration: configuration.clone().into_bytes(),
            ..Plan::default()
        };
        let path = dir.path().join("module.wasm");
        std::fs::write(&path, &wasm).unwrap();

        let (compile, no_cache) = cold(&wasm, &plan, None);
        let cache = tempfile::tempdir().unwrap();
        cold(&wasm, &plan, Some(cache.path())); // fills the cache
        let mut loads = Vec::new();
        let (cached, cached_max) = median_and_max(5, || {
            let (load, _) = cold(&wasm, &plan, Some(cache.path()));
            loads.push(load);
            true
        });
        loads.sort();
        let load = loads[loads.len() / 2];
        let sandbox: Arc<Sandbox> = Sandbox::new(limits(), None).unwrap();
        let compiled = sandbox.compile(&wasm).unwrap();
        let (warm, warm_max) = median_and_max(15, || sandbox.run(&compiled, &plan).passed());
        let peer = envoy_vm_ms(&path, &configuration, dir.path());
        println!(
            "{label:<22} {:>5.1} MiB  cold, compiling: {:>8.1} ms (compile {:.1})  \
             cold, compilation cache: median {:>6.1} ms (max {:.1}; loading the compiled module {:.1})  \
             warm: median {:>6.2} ms (max {:.2})  {}",
            wasm.len() as f64 / (1 << 20) as f64,
            ms(no_cache),
            ms(compile),
            ms(cached),
            ms(cached_max),
            ms(load),
            ms(warm),
            ms(warm_max),
            match peer {
                Some(p) => format!(
                    "Envoy builds and configures the VM: {p:.1} ms; cold cached / Envoy {:.2}x",
                    ms(cached) / p
                ),
                None => "Envoy: not measured (WASMFILTER_ENVOY_DIR unset)".into(),
            }
        );
    }
    println!("goal: under 100 ms cold with the compilation cache");
}
