#![no_main]
//! Any bytes as a registry's answer: an image manifest (which layer holds the module), an image
//! index (which entry to follow) and an artifact config (declared ABI and root ids). Never a
//! panic; a chosen layer is always one of the manifest's.

use libfuzzer_sys::fuzz_target;
use oci_client::manifest::{OciImageIndex, OciImageManifest};
use wasmfilter::oci::format::{DeclaredConfig, pick_index_entry, select_module_layer};

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<OciImageManifest>(data)
        && let Ok((_, layer)) = select_module_layer(&manifest)
    {
        assert!(manifest.layers.iter().any(|l| std::ptr::eq(l, layer)));
    }
    if let Ok(index) = serde_json::from_slice::<OciImageIndex>(data)
        && let Some(entry) = pick_index_entry(&index.manifests)
    {
        assert!(index.manifests.iter().any(|m| std::ptr::eq(m, entry)));
    }
    let _ = DeclaredConfig::parse(data);
});
