//! What more than one benchmark builds: Wasm modules of a chosen shape and size.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::{Duration, Instant};

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
pub fn module(functions: usize, body_bytes: usize, padding: usize) -> Vec<u8> {
    let base = wat::parse_str(include_str!("../../tests/fixtures/modules/add_header.wat")).unwrap();
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

/// Runs `f` `runs` times (each must return true); the median and the slowest.
pub fn median_and_max(runs: usize, mut f: impl FnMut() -> bool) -> (Duration, Duration) {
    let mut took: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let ok = f();
            let took = start.elapsed();
            assert!(ok);
            took
        })
        .collect();
    took.sort();
    (took[took.len() / 2], took[took.len() - 1])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
