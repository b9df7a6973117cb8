#![no_main]
//! Any bytes through `abi::inspect` and the check against every measured Envoy: never a
//! panic, whatever the input.

use libfuzzer_sys::fuzz_target;
use wasmfilter::abi::check;

fuzz_target!(|data: &[u8]| {
    for version in check::known_envoy_versions() {
        if let Some(host) = check::host(&version) {
            let _ = check::check_bytes(data, &version, host);
        }
    }
});
