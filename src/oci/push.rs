//! Publishing a module as an OCI artifact, in one of the formats Istio, Envoy Gateway and the
//! CNCF tooling read.

use std::collections::BTreeMap;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use super::Error;
use super::error_chain;
use super::format::{
    CNCF_CONFIG_MEDIA_TYPE, CNCF_LAYER_MEDIA_TYPE, Format, OCI_TAR_GZIP_MEDIA_TYPE,
    SOLO_CONFIG_MEDIA_TYPE, SOLO_LAYER_MEDIA_TYPE,
};
use crate::abi;
use crate::cache::sha256_hex;

/// OCI image config media type (used by the compat image).
const OCI_IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The layer's file name, so `oras pull` and friends write it out as a file.
fn titled(name: &str) -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(
        "org.opencontainers.image.title".to_string(),
        name.to_string(),
    )]))
}

/// What goes into the artifact besides the module.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// ABI versions to declare in the config; by default, the one the module exports.
    pub abi_versions: Vec<String>,
    /// Root ids to declare in the config.
    pub root_ids: Vec<String>,
}

/// The config blob, layers and manifest annotations of an artifact.
type Parts = (Config, Vec<ImageLayer>, Option<BTreeMap<String, String>>);

/// The artifact for `module` in `format`.
fn artifact_parts(
    format: Format,
    module: Vec<u8>,
    abi_versions: &[String],
    root_ids: &[String],
) -> Result<Parts, String> {
    let to_vec = |v: serde_json::Value| serde_json::to_vec(&v).map_err(|e| e.to_string());
    match format {
        Format::SoloOci => Ok((
            Config::new(
                to_vec(json!({
                    "type": "envoy_proxy",
                    "abiVersions": abi_versions,
                    "config": {"rootIds": root_ids},
                }))?,
                SOLO_CONFIG_MEDIA_TYPE.to_string(),
                None,
            ),
            vec![ImageLayer::new(
                module,
                SOLO_LAYER_MEDIA_TYPE.to_string(),
                titled("plugin.wasm"),
            )],
            None,
        )),
        Format::Cncf => {
            let layer_digest = format!("sha256:{}", sha256_hex(&module));
            Ok((
                Config::new(
                    to_vec(json!({
                        "architecture": "wasm",
                        "os": "wasip1",
                        "layerDigests": [layer_digest],
                    }))?,
                    CNCF_CONFIG_MEDIA_TYPE.to_string(),
                    None,
                ),
                vec![ImageLayer::new(
                    module,
                    CNCF_LAYER_MEDIA_TYPE.to_string(),
                    titled("plugin.wasm"),
                )],
                None,
            ))
        }
        Format::Compat => {
            let tar = plugin_tar(&module).map_err(|e| e.to_string())?;
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            gz.write_all(&tar).map_err(|e| e.to_string())?;
            let layer = gz.finish().map_err(|e| e.to_string())?;
            let config = to_vec(json!({
                "architecture": "wasm",
                "os": "wasip1",
                "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]},
                "config": {},
            }))?;
            Ok((
                Config::new(config, OCI_IMAGE_CONFIG_MEDIA_TYPE.to_string(), None),
                vec![ImageLayer::new(
                    layer,
                    OCI_TAR_GZIP_MEDIA_TYPE.to_string(),
                    None,
                )],
                Some(BTreeMap::from([(
                    "module.wasm.image/variant".to_string(),
                    "compat".to_string(),
                )])),
            ))
        }
        other => Err(format!("pushing the {other} format is not supported")),
    }
}

/// A tar holding `plugin.wasm`, as Istio and Solo's compat variant expect.
fn plugin_tar(module: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, "plugin.wasm", module)?;
    builder.into_inner()
}

/// Pushes `module` to `reference` in `format` and returns the manifest digest. The bytes must
/// be a valid Wasm module: nothing else is published.
pub async fn push_module(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    module: Vec<u8>,
    format: Format,
    opts: &PushOptions,
) -> Result<String, Error> {
    let info = abi::inspect(&module).map_err(|source| Error::InvalidModule {
        reference: reference.whole(),
        source,
    })?;
    let abi_versions = if opts.abi_versions.is_empty() {
        info.abi_versions.clone()
    } else {
        opts.abi_versions.clone()
    };
    let push_err = |message: String| Error::PushModule {
        reference: reference.whole(),
        message,
    };
    let (config, layers, annotations) =
        artifact_parts(format, module, &abi_versions, &opts.root_ids).map_err(push_err)?;
    let manifest = OciImageManifest::build(&layers, &config, annotations);
    client
        .push(reference, &layers, config, auth, Some(manifest))
        .await
        .map_err(|e| push_err(error_chain(&e)))?;
    client
        .fetch_manifest_digest(reference, auth)
        .await
        .map_err(|e| {
            push_err(format!(
                "reading back the manifest digest: {}",
                error_chain(&e)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::format::select_module_layer;

    /// What we push in each format is what our own reader recognises as that format, and the
    /// module comes back out byte for byte.
    #[test]
    fn pushed_formats_read_back() {
        let module = b"\0asm\x01\0\0\0".to_vec();
        for format in [Format::SoloOci, Format::Cncf, Format::Compat] {
            let (config, layers, _) =
                artifact_parts(format, module.clone(), &["0.2.1".into()], &[]).unwrap();
            let manifest = OciImageManifest::build(&layers, &config, None);
            let (found, layer) = select_module_layer(&manifest).unwrap();
            assert_eq!(found, format);
            let data = layers
                .iter()
                .find(|l| l.media_type == layer.media_type)
                .unwrap()
                .data
                .to_vec();
            assert_eq!(found.extract_module(data, 1 << 20).unwrap(), module);
        }
        assert!(artifact_parts(Format::Docker, module, &[], &[]).is_err());
    }
}
