//! Publishing a module as an OCI artifact.

use oci_client::client::{Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use super::format::{Format, SOLO_CONFIG_MEDIA_TYPE, SOLO_LAYER_MEDIA_TYPE};
use super::{classify, error_chain};
use crate::abi;
use crate::error::Error;

/// What goes into the artifact besides the module.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// ABI versions to declare in the config; by default, the one the module exports.
    pub abi_versions: Vec<String>,
    /// Root ids to declare in the config.
    pub root_ids: Vec<String>,
}

/// Pushes `module` to `reference` in the Solo "oci" format and returns the manifest digest.
/// The bytes must be a valid Wasm module: nothing else is published.
pub async fn push_module(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    module: Vec<u8>,
    opts: &PushOptions,
) -> Result<(Format, String), Error> {
    let info = abi::inspect(&module).map_err(|e| Error::InvalidModule {
        reference: reference.whole(),
        message: e.to_string(),
    })?;
    let abi_versions = if opts.abi_versions.is_empty() {
        info.abi_versions.clone()
    } else {
        opts.abi_versions.clone()
    };
    let config = json!({
        "type": "envoy_proxy",
        "abiVersions": abi_versions,
        "config": {"rootIds": opts.root_ids},
    });
    let config = Config::new(
        serde_json::to_vec(&config).unwrap_or_default(),
        SOLO_CONFIG_MEDIA_TYPE.to_string(),
        None,
    );
    let layers = [ImageLayer::new(
        module,
        SOLO_LAYER_MEDIA_TYPE.to_string(),
        None,
    )];
    let push_err = |message: String| Error::PushModule {
        reference: reference.whole(),
        message,
    };
    client
        .push(reference, &layers, config, auth, None)
        .await
        .map_err(|e| push_err(error_chain(&e)))?;
    let digest = client
        .fetch_manifest_digest(reference, auth)
        .await
        .map_err(|e| push_err(classify(e, reference).to_string()))?;
    Ok((Format::SoloOci, digest))
}
