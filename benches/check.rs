//! ABI check benchmark (issue 4): the time to check a 20 MiB module against one Envoy, beside
//! bare `wasmparser` validation of the same bytes (the parser's own limit, as a ratio),
//! in-process, two ways: from bytes (full validation of every function body + the verdict;
//! what `wasmfilter check` does), and the verdict alone on a module inspected before (what the
//! operator does per workload: it validates a module once, when it pulls it). Two shapes of
//! 20 MiB: mostly code (20,000 functions of ~1 KiB, like a big Go or C++ filter) and mostly data
//! (a custom section). Run with `e2e/bench.sh check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::{median_and_max, module, ms};
use wasmfilter::abi::check;

mod common;

fn main() {
    let version = check::known_envoy_versions()
        .last()
        .cloned()
        .expect("measured Envoy versions");
    let host = check::host(&version).unwrap();
    println!("ABI check benchmark against Envoy {version}, release build, 15 runs (median, max)");
    let mut cases = vec![
        ("20 MiB, mostly code".to_string(), module(20_000, 1040, 0)),
        ("20 MiB, mostly data".to_string(), module(0, 0, 20 << 20)),
    ];
    // The real Go SDK filter the test suite builds, when present (e2e/bench.sh sets this).
    if let Ok(dir) = std::env::var("WASMFILTER_FIXTURE_MODULES")
        && let Ok(bytes) = std::fs::read(std::path::Path::new(&dir).join("go_sdk_filter.wasm"))
    {
        cases.push(("Go SDK filter (real)".to_string(), bytes));
    }
    for (label, bytes) in cases {
        let (full, full_max) =
            median_and_max(15, || check::check_bytes(&bytes, &version, host).compatible);
        let info = wasmfilter::abi::inspect(&bytes).unwrap();
        let (verdict, verdict_max) =
            median_and_max(15, || check::check(&info, &version, host).compatible);
        // The parser's own limit: bare wasmparser validation of the same bytes.
        let (bare, _) = median_and_max(15, || {
            wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::default())
                .validate_all(&bytes)
                .is_ok()
        });
        println!(
            "{label:<22} {:>5.1} MiB  from bytes: median {:>7.2} ms (max {:>7.2})  \
             bare wasmparser validation: median {:>7.2} ms  ratio {:.2}x  \
             verdict on the inspected module: median {:>6.3} ms (max {:>6.3})",
            bytes.len() as f64 / (1 << 20) as f64,
            ms(full),
            ms(full_max),
            ms(bare),
            full.as_secs_f64() / bare.as_secs_f64(),
            ms(verdict),
            ms(verdict_max)
        );
    }
    println!("goals: under 20 ms for a 20 MiB module; at most 1.2x bare wasmparser validation");
}
