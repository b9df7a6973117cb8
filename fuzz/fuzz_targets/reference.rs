#![no_main]
//! Any string through the image reference parser: never a panic, and it accepts exactly what
//! the CRD's CEL rule (the same grammar as a regex) accepts.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let re = RE.get_or_init(|| regex::Regex::new(wasmfilter::api::IMAGE_REFERENCE_RE).unwrap());
    let parsed = wasmfilter::oci::parse_reference(s).is_ok();
    assert_eq!(parsed, re.is_match(s), "parser and CRD rule disagree on {s:?}");
});
