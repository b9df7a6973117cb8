#![no_main]
//! Any bytes as a module layer, in every format: never a panic, and never more than the cap
//! unpacked (tar+gzip layers: compression bombs, path traversal, truncation).

use libfuzzer_sys::fuzz_target;
use wasmfilter::oci::format::Format;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Compat, Format::Docker] {
        if let Ok(module) = format.extract_module(data.to_vec(), LIMIT) {
            assert!(module.len() as u64 <= LIMIT);
        }
    }
    let same = Format::SoloOci.extract_module(data.to_vec(), LIMIT);
    assert_eq!(same.as_deref(), Ok(data));
});
