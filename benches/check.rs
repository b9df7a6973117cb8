//! ABI check benchmark (issue 4): the time to check a 20 MiB module against one Envoy, beside
//! bare `wasmparser` validation of the same bytes (the parser's own limit, as a ratio),
//! in-process, two ways: from bytes (full validation of every function body + the verdict;
//! what `wasmfilter check` does), and the verdict alone on a module inspected before (what the
//! operator does per workload: it validates a module once, when it pulls it). Two shapes of
//! 20 MiB: mostly code (20,000 functions of ~1 KiB, like a big Go or C++ filter) and mostly data
//! (a custom section). Run with `e2e/bench.sh check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use wasmfilter::abi::check;

fn leb(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb(body.len(), out);
    out.extend_from_slice(body);
}

/// The add-header fixture plus `functions` extra functions of `body_bytes` each, plus a custom
/// section of `padding` bytes.
fn module(functions: usize, body_bytes: usize, padding: usize) -> Vec<u8> {
    let base = wat::parse_str(include_str!("../tests/fixtures/modules/add_header.wat")).unwrap();
    if functions == 0 {
        let mut m = base;
        let mut payload = vec![7u8];
        payload.extend_from_slice(b"padding");
        payload.resize(padding, 0xa5);
        section(0, &payload, &mut m);
        return m;
    }
    // A second module shape built from scratch: one type, many functions, the ABI marker and
    // an allocator, a memory.
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // type 0: () -> ()   type 1: (i32) -> i32
    section(1, &[2, 0x60, 0, 0, 0x60, 1, 0x7f, 1, 0x7f], &mut m);
    let mut funcs = Vec::new();
    leb(functions + 2, &mut funcs);
    funcs.extend([0, 1]);
    funcs.extend(std::iter::repeat_n(0u8, functions));
    section(3, &funcs, &mut m);
    section(5, &[1, 0, 1], &mut m); // memory 1 page
    let mut exports = Vec::new();
    let names: [(&str, u8, u8); 3] = [
        ("proxy_abi_version_0_2_1", 0, 0),
        ("proxy_on_memory_allocate", 0, 1),
        ("memory", 2, 0),
    ];
    leb(names.len(), &mut exports);
    for (name, kind, index) in names {
        leb(name.len(), &mut exports);
        exports.extend_from_slice(name.as_bytes());
        exports.push(kind);
        exports.push(index);
    }
    section(7, &exports, &mut m);
    // Bodies: `i32.const 1; drop` repeated, then end.
    let mut code = Vec::new();
    leb(functions + 2, &mut code);
    code.extend([2, 0, 0x0b]); // marker: no locals, end
    code.extend([4, 0, 0x41, 0, 0x0b]); // allocator: i32.const 0
    let repeats = body_bytes / 3;
    let mut body = vec![0u8]; // no locals
    for _ in 0..repeats {
        body.extend([0x41, 1, 0x1a]);
    }
    body.push(0x0b);
    for _ in 0..functions {
        leb(body.len(), &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut m);
    m
}

fn time(mut f: impl FnMut() -> bool) -> (Duration, Duration) {
    let mut runs: Vec<Duration> = (0..15)
        .map(|_| {
            let start = Instant::now();
            let ok = f();
            let took = start.elapsed();
            assert!(ok);
            took
        })
        .collect();
    runs.sort();
    (runs[runs.len() / 2], runs[runs.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

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
        let (full, full_max) = time(|| check::check_bytes(&bytes, &version, host).compatible);
        let info = wasmfilter::abi::inspect(&bytes).unwrap();
        let (verdict, verdict_max) = time(|| check::check(&info, &version, host).compatible);
        // The parser's own limit: bare wasmparser validation of the same bytes.
        let (bare, _) = time(|| {
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
