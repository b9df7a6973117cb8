//! What a module is, read from its own bytes: valid core Wasm or not, and which proxy-wasm ABI it
//! declares through its exports. (The per-Envoy load check builds on this.)

use wasmparser::{Encoding, ExternalKind, Parser, Payload, Validator};

/// The four bytes every Wasm binary starts with.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Export-name prefix by which a module declares its proxy-wasm ABI.
const ABI_EXPORT_PREFIX: &str = "proxy_abi_version_";

/// Facts about a module that the operator reports and renders from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleInfo {
    /// ABI versions declared by function exports, e.g. `["0.2.1"]`; only functions count.
    pub abi_versions: Vec<String>,
    /// Names of all exports.
    pub exports: Vec<String>,
}

impl ModuleInfo {
    /// The declared ABI, when there is exactly one (the usual case).
    pub fn abi_version(&self) -> Option<&str> {
        match self.abi_versions.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// Why bytes are not a module Envoy could even parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("not a Wasm module: {size} bytes that do not start with the Wasm magic \\0asm")]
    NotWasm { size: usize },
    #[error("a Wasm component, not a core module: proxy-wasm hosts load core modules only")]
    Component,
    #[error("invalid Wasm: {0}")]
    Invalid(String),
}

/// Parses and validates `bytes` as a core Wasm module and reads its declared ABI.
pub fn inspect(bytes: &[u8]) -> Result<ModuleInfo, ModuleError> {
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(ModuleError::NotWasm { size: bytes.len() });
    }
    Validator::new()
        .validate_all(bytes)
        .map_err(|e| ModuleError::Invalid(e.to_string()))?;
    let mut info = ModuleInfo::default();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| ModuleError::Invalid(e.to_string()))? {
            Payload::Version {
                encoding: Encoding::Component,
                ..
            } => return Err(ModuleError::Component),
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| ModuleError::Invalid(e.to_string()))?;
                    if export.kind == ExternalKind::Func
                        && let Some(v) = export.name.strip_prefix(ABI_EXPORT_PREFIX)
                    {
                        info.abi_versions.push(v.replace('_', "."));
                    }
                    info.exports.push(export.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(src: &str) -> Vec<u8> {
        wat::parse_str(src).unwrap()
    }

    #[test]
    fn reads_the_abi_from_a_function_export() {
        let m = wat(
            r#"(module (func (export "proxy_abi_version_0_2_1")) (memory (export "memory") 1))"#,
        );
        let info = inspect(&m).unwrap();
        assert_eq!(info.abi_version(), Some("0.2.1"));
        assert!(info.exports.contains(&"memory".to_string()));
    }

    #[test]
    fn a_global_named_like_the_marker_declares_nothing() {
        let m = wat(r#"(module (global (export "proxy_abi_version_0_2_1") i32 (i32.const 0)))"#);
        assert_eq!(inspect(&m).unwrap().abi_version(), None);
    }

    #[test]
    fn refuses_what_is_not_a_module() {
        assert_eq!(
            inspect(b"hello world"),
            Err(ModuleError::NotWasm { size: 11 })
        );
        assert!(matches!(
            inspect(b"\0asm\x01\0\0\0\x01\xff"),
            Err(ModuleError::Invalid(_))
        ));
        let component = wat("(component)");
        assert!(inspect(&component).is_err());
    }
}
