//! Artifact formats: how a manifest is recognised and where its module is.
//!
//! | format     | recognised by                                             | module          |
//! |------------|-----------------------------------------------------------|-----------------|
//! | solo-oci   | a layer `application/vnd.module.wasm.content.layer.v1+wasm` | that layer      |
//! | cncf       | config `application/vnd.wasm.config.v0+json`, layer `application/wasm` | that layer |
//! | wasm-to-oci| a layer `application/vnd.wasm.content.layer.v1+wasm`      | that layer      |
//! | compat     | last layer `application/vnd.oci.image.layer.v1.tar+gzip`  | `plugin.wasm` in it |
//! | docker     | last layer `application/vnd.docker.image.rootfs.diff.tar.gzip` | `plugin.wasm` in it |

use std::io::Read;
use std::path::Component;

use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};

pub const SOLO_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
pub const SOLO_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const CNCF_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
pub const CNCF_LAYER_MEDIA_TYPE: &str = "application/wasm";
pub const WASM_TO_OCI_LAYER_MEDIA_TYPE: &str = "application/vnd.wasm.content.layer.v1+wasm";
pub const OCI_TAR_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZIP_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The file Istio's image formats carry the module in.
const PLUGIN_FILE: &str = "plugin.wasm";

/// An artifact layout the operator can take a module from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Solo's "oci" variant: the module is the raw content of one layer.
    SoloOci,
    /// The CNCF TAG Runtime Wasm artifact: layer `application/wasm`.
    Cncf,
    /// wasm-to-oci: a raw module layer of its own media type.
    WasmToOci,
    /// Solo's "compat" variant / Istio's OCI image: `plugin.wasm` in a tar+gzip layer.
    Compat,
    /// A Docker v2 image with `plugin.wasm` in its last layer.
    Docker,
}

/// Why a layer that should hold a module does not give one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("layer unpacks to more than {limit} bytes (a compression bomb or an oversized module)")]
    TooLarge { limit: u64 },
    #[error("archive entry {path:?} escapes the archive root; refusing the layer")]
    UnsafePath { path: String },
    #[error("no {PLUGIN_FILE} in the layer; found [{found}]")]
    NoModule { found: String },
    #[error("layer is not a valid tar+gzip archive: {0}")]
    Corrupt(String),
}

impl Format {
    /// The name shown in `status.artifact.format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::SoloOci => "solo-oci",
            Format::Cncf => "cncf",
            Format::WasmToOci => "wasm-to-oci",
            Format::Compat => "compat",
            Format::Docker => "docker",
        }
    }

    /// Whether the layer's bytes are the module itself (so its digest is the module's sha256).
    pub fn layer_is_module(self) -> bool {
        matches!(self, Format::SoloOci | Format::Cncf | Format::WasmToOci)
    }

    /// The module inside a verified layer, reading at most `limit` bytes of unpacked data.
    pub fn extract_module(self, layer: Vec<u8>, limit: u64) -> Result<Vec<u8>, ExtractError> {
        if self.layer_is_module() {
            return Ok(layer);
        }
        plugin_from_tar_gz(&layer, limit)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Finds the module layer of a manifest, or says what the manifest holds instead.
pub fn select_module_layer(m: &OciImageManifest) -> Result<(Format, &OciDescriptor), String> {
    let find = |media_type: &str| m.layers.iter().find(|l| l.media_type == media_type);
    if let Some(layer) = find(SOLO_LAYER_MEDIA_TYPE) {
        return Ok((Format::SoloOci, layer));
    }
    if let Some(layer) = find(CNCF_LAYER_MEDIA_TYPE) {
        return Ok((Format::Cncf, layer));
    }
    if let Some(layer) = find(WASM_TO_OCI_LAYER_MEDIA_TYPE) {
        return Ok((Format::WasmToOci, layer));
    }
    match m.layers.last() {
        Some(l) if l.media_type == OCI_TAR_GZIP_MEDIA_TYPE => return Ok((Format::Compat, l)),
        Some(l) if l.media_type == DOCKER_TAR_GZIP_MEDIA_TYPE => return Ok((Format::Docker, l)),
        _ => {}
    }
    let layers: Vec<&str> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
    Err(format!(
        "config {} with layers [{}]; expected a Wasm layer ({SOLO_LAYER_MEDIA_TYPE}, \
         {CNCF_LAYER_MEDIA_TYPE} or {WASM_TO_OCI_LAYER_MEDIA_TYPE}) or an image whose last \
         layer is a tar+gzip holding {PLUGIN_FILE}",
        m.config.media_type,
        layers.join(", ")
    ))
}

/// What an artifact's runtime config declares about its module (Solo format:
/// `{"type":"envoy_proxy","abiVersions":[...],"config":{"rootIds":[...]}}`; the spec's own
/// example spells `abi_version(s)`/`root_ids`, accepted too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredConfig {
    pub abi_versions: Vec<String>,
    pub root_ids: Vec<String>,
}

impl DeclaredConfig {
    /// Parses a runtime config; anything that is not a JSON object is refused with a reason.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "config blob is not JSON ({e}); starts with {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
            )
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| "config blob is JSON but not an object".to_string())?;
        let strings = |v: Option<&serde_json::Value>| -> Vec<String> {
            match v {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            }
        };
        let first = |o: &serde_json::Map<String, serde_json::Value>, keys: &[&str]| {
            keys.iter().find_map(|k| o.get(*k)).cloned()
        };
        let abi_versions = strings(
            first(
                obj,
                &["abiVersions", "abi_versions", "abiVersion", "abi_version"],
            )
            .as_ref(),
        );
        let inner = obj.get("config").and_then(|c| c.as_object());
        let root_ids = strings(
            inner
                .and_then(|c| first(c, &["rootIds", "root_ids"]))
                .or_else(|| first(obj, &["rootIds", "root_ids"]))
                .as_ref(),
        );
        Ok(DeclaredConfig {
            abi_versions,
            root_ids,
        })
    }
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

/// Reads `plugin.wasm` out of a tar+gzip layer. Every entry is checked for path traversal, and
/// the unpacked stream fails past `limit` (plus room for tar headers), so a compression bomb
/// costs no more than the cap.
fn plugin_from_tar_gz(layer: &[u8], limit: u64) -> Result<Vec<u8>, ExtractError> {
    let bounded = CappedReader {
        inner: flate2::read::GzDecoder::new(layer),
        remaining: limit.saturating_add(64 * 1024),
    };
    let io_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::FileTooLarge => ExtractError::TooLarge { limit },
        _ => ExtractError::Corrupt(e.to_string()),
    };
    let mut archive = tar::Archive::new(bounded);
    let mut found = Vec::new();
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let path = entry.path().map_err(io_err)?.into_owned();
        let shown = path.to_string_lossy().into_owned();
        if path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(ExtractError::UnsafePath { path: shown });
        }
        let mut parts = path.components().filter(|c| *c != Component::CurDir);
        let is_plugin = parts.next() == Some(Component::Normal(PLUGIN_FILE.as_ref()))
            && parts.next().is_none()
            && entry.header().entry_type().is_file();
        if is_plugin {
            if entry.size() > limit {
                return Err(ExtractError::TooLarge { limit });
            }
            let mut module = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
            entry.read_to_end(&mut module).map_err(io_err)?;
            return Ok(module);
        }
        if found.len() < 16 {
            found.push(shown);
        }
    }
    Err(ExtractError::NoModule {
        found: found.join(", "),
    })
}

/// A reader that fails with `FileTooLarge` once more than `remaining` bytes were asked of it.
struct CappedReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.remaining = self
            .remaining
            .checked_sub(n as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::FileTooLarge))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_config_accepts_both_spellings() {
        let camel = br#"{"type":"envoy_proxy","abiVersions":["v0-4689a30309abf31aee9ae36e73d34b1bb182685f"],"config":{"rootIds":["a","b"]}}"#;
        let snake = br#"{"type":"envoy_proxy","abi_version":"0.2.1","config":{"root_ids":["r"]}}"#;
        assert_eq!(
            DeclaredConfig::parse(camel).unwrap(),
            DeclaredConfig {
                abi_versions: vec!["v0-4689a30309abf31aee9ae36e73d34b1bb182685f".into()],
                root_ids: vec!["a".into(), "b".into()],
            }
        );
        assert_eq!(
            DeclaredConfig::parse(snake).unwrap(),
            DeclaredConfig {
                abi_versions: vec!["0.2.1".into()],
                root_ids: vec!["r".into()],
            }
        );
        assert_eq!(
            DeclaredConfig::parse(b"{}").unwrap(),
            DeclaredConfig::default()
        );
        let err = DeclaredConfig::parse(b"\x7fELF not json").unwrap_err();
        assert!(err.starts_with("config blob is not JSON"), "{err}");
        assert!(DeclaredConfig::parse(b"[1]").is_err());
    }

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

    /// A tar+gzip layer with the given (path, content) entries, paths written verbatim.
    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = Vec::new();
        for (path, data) in entries {
            let mut h = [0u8; 512];
            h[..path.len()].copy_from_slice(path.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            h[136..147].copy_from_slice(b"00000000000");
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            tar.extend_from_slice(&h);
            tar.extend_from_slice(data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        tar.resize(tar.len() + 1024, 0);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn recognises_every_format() {
        let cases = [
            (
                SOLO_CONFIG_MEDIA_TYPE,
                vec![SOLO_LAYER_MEDIA_TYPE],
                Format::SoloOci,
            ),
            (
                CNCF_CONFIG_MEDIA_TYPE,
                vec![CNCF_LAYER_MEDIA_TYPE],
                Format::Cncf,
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                vec![WASM_TO_OCI_LAYER_MEDIA_TYPE],
                Format::WasmToOci,
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                vec![OCI_TAR_GZIP_MEDIA_TYPE],
                Format::Compat,
            ),
            (
                "application/vnd.docker.container.image.v1+json",
                vec![DOCKER_TAR_GZIP_MEDIA_TYPE, DOCKER_TAR_GZIP_MEDIA_TYPE],
                Format::Docker,
            ),
        ];
        for (config, layers, want) in cases {
            let m = manifest(config, &layers);
            assert_eq!(
                select_module_layer(&m).unwrap().0,
                want,
                "{config} {layers:?}"
            );
        }
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

    #[test]
    fn takes_plugin_wasm_out_of_an_image_layer() {
        let layer = tar_gz(&[
            ("runtime-config.json", b"{}"),
            ("./plugin.wasm", b"\0asm\x01\0\0\0"),
        ]);
        let module = Format::Compat.extract_module(layer, 1024).unwrap();
        assert_eq!(module, b"\0asm\x01\0\0\0");
    }

    #[test]
    fn refuses_path_traversal() {
        let layer = tar_gz(&[("../../etc/cron.d/x", b"boom"), ("plugin.wasm", b"\0asm")]);
        assert_eq!(
            Format::Docker.extract_module(layer, 1024),
            Err(ExtractError::UnsafePath {
                path: "../../etc/cron.d/x".into()
            })
        );
    }

    #[test]
    fn a_compression_bomb_stops_at_the_cap() {
        let zeros = vec![0u8; 8 * 1024 * 1024];
        let layer = tar_gz(&[("filler", &zeros), ("plugin.wasm", b"\0asm")]);
        assert!(
            layer.len() < 64 * 1024,
            "the bomb should be small: {}",
            layer.len()
        );
        assert_eq!(
            Format::Compat.extract_module(layer, 1024),
            Err(ExtractError::TooLarge { limit: 1024 })
        );
    }

    #[test]
    fn says_what_the_layer_held_when_there_is_no_module() {
        let layer = tar_gz(&[("main.wasm", b"\0asm")]);
        assert_eq!(
            Format::Compat.extract_module(layer, 1024),
            Err(ExtractError::NoModule {
                found: "main.wasm".into()
            })
        );
        assert!(matches!(
            Format::Compat.extract_module(b"not gzip".to_vec(), 1024),
            Err(ExtractError::Corrupt(_))
        ));
    }
}
