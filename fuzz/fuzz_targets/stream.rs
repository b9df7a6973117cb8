#![no_main]
//! Any bytes, fed in pieces of any size to `abi::stream::Inspector` (what `wasmfilter pull`
//! checks a module with while it downloads): never a panic, and the same answer as
//! `abi::inspect` of the whole bytes (for "unexpected end-of-file", whose offset the parser
//! takes from how many bytes follow a section, the same message).

use libfuzzer_sys::fuzz_target;
use wasmfilter::abi::{self, ModuleError, ModuleInfo, stream::Inspector};

fn comparable(r: Result<ModuleInfo, ModuleError>) -> Result<ModuleInfo, ModuleError> {
    match r {
        Err(ModuleError::Invalid(m)) if m.starts_with("unexpected end-of-file (at offset") => {
            Err(ModuleError::Invalid("unexpected end-of-file".into()))
        }
        other => other,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, module)) = data.split_first() else {
        return;
    };
    let mut inspector = Inspector::new();
    for chunk in module.chunks(usize::from(piece) + 1) {
        inspector.feed(chunk);
    }
    assert_eq!(
        comparable(inspector.finish()),
        comparable(abi::inspect(module))
    );
});
