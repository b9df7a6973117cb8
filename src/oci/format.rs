//! Artifact formats: how a manifest is recognised and where its module is.

use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Solo's "oci" variant: the config and module layer media types.
pub const SOLO_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
pub const SOLO_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// An artifact layout the operator can take a module from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Solo's "oci" variant: the module is the raw content of one layer.
    SoloOci,
}

impl Format {
    /// The name shown in `status.artifact.format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::SoloOci => "solo-oci",
        }
    }

    /// Whether the layer's bytes are the module itself (so its digest is the module's sha256).
    pub fn layer_is_module(self) -> bool {
        match self {
            Format::SoloOci => true,
        }
    }

    /// The module inside a verified layer.
    pub fn extract_module(self, layer: Vec<u8>) -> Result<Vec<u8>, Error> {
        match self {
            Format::SoloOci => Ok(layer),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Finds the module layer of a manifest, or says what the manifest holds instead.
pub fn select_module_layer(m: &OciImageManifest) -> Result<(Format, &OciDescriptor), String> {
    if let Some(layer) = m
        .layers
        .iter()
        .find(|l| l.media_type == SOLO_LAYER_MEDIA_TYPE)
    {
        return Ok((Format::SoloOci, layer));
    }
    let layers: Vec<&str> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
    Err(format!(
        "config {} with layers [{}]; expected a layer of type {SOLO_LAYER_MEDIA_TYPE}",
        m.config.media_type,
        layers.join(", ")
    ))
}

/// In an index, the entry for Wasm: one whose platform is `wasm`/`wasip1`, else a lone entry.
pub fn pick_index_entry(entries: &[ImageIndexEntry]) -> Option<&ImageIndexEntry> {
    entries
        .iter()
        .find(|e| {
            e.platform.as_ref().is_some_and(|p| {
                let arch = serde_json::to_value(&p.architecture).unwrap_or_default();
                let os = serde_json::to_value(&p.os).unwrap_or_default();
                arch == "wasm" || os == "wasip1" || os == "wasi"
            })
        })
        .or(match entries {
            [only] => Some(only),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(config: &str, layers: &[&str]) -> OciImageManifest {
        OciImageManifest {
            config: OciDescriptor {
                media_type: config.into(),
                ..Default::default()
            },
            layers: layers
                .iter()
                .map(|t| OciDescriptor {
                    media_type: (*t).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn recognises_solo_oci() {
        let m = manifest(SOLO_CONFIG_MEDIA_TYPE, &[SOLO_LAYER_MEDIA_TYPE]);
        assert_eq!(select_module_layer(&m).unwrap().0, Format::SoloOci);
    }

    #[test]
    fn names_what_it_found_instead() {
        let m = manifest("application/vnd.oci.image.config.v1+json", &["text/plain"]);
        let err = select_module_layer(&m).unwrap_err();
        assert!(err.contains("text/plain"), "{err}");
        assert!(
            err.contains("application/vnd.oci.image.config.v1+json"),
            "{err}"
        );
    }
}
