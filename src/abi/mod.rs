//! What a module is, read from its own bytes: valid core Wasm or not, and which proxy-wasm ABI it
//! declares through its exports. (The per-Envoy load check builds on this.)

use std::fmt;

use serde::Serialize;
use wasmparser::{
    Encoding, ExternalKind, Parser, Payload, TypeRef, ValType, ValidPayload, Validator,
};

pub mod check;
pub mod stream;

/// The four bytes every Wasm binary starts with.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Export-name prefix by which a module declares its proxy-wasm ABI.
const ABI_EXPORT_PREFIX: &str = "proxy_abi_version_";

/// A function type, printed the way Wasm text would: `(i32, i32) -> i32`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    pub params: Vec<String>,
    pub results: Vec<String>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({})", self.params.join(", "))?;
        match self.results.as_slice() {
            [] => Ok(()),
            [one] => write!(f, " -> {one}"),
            many => write!(f, " -> ({})", many.join(", ")),
        }
    }
}

impl Signature {
    /// The type as Envoy prints it (and as the measured host table records it):
    /// `i32 i32 -> i32`, with `void` for no parameters or no results.
    pub fn envoy_notation(&self) -> String {
        let side = |types: &[String]| {
            if types.is_empty() {
                "void".to_string()
            } else {
                types.join(" ")
            }
        };
        format!("{} -> {}", side(&self.params), side(&self.results))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What kind of thing an import or export is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Func,
    Memory,
    Global,
    Table,
    Tag,
}

/// One export of the module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Export {
    pub name: String,
    pub kind: Kind,
    /// For functions, their type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// One import of the module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Import {
    pub module: String,
    pub name: String,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// Facts about a module that the operator reports and renders from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModuleInfo {
    /// ABI versions declared by function exports, e.g. `["0.2.1"]`; only functions count.
    pub abi_versions: Vec<String>,
    pub exports: Vec<Export>,
    pub imports: Vec<Import>,
}

impl ModuleInfo {
    pub fn export(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }

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
    let invalid = |e: wasmparser::BinaryReaderError| ModuleError::Invalid(e.to_string());
    // One pass validates the module's structure and reads what the check needs; function
    // bodies are collected and validated afterwards, on every core (the bulk of the time for a
    // large module).
    let mut gather = Gather::default();
    let mut bodies = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(invalid)?;
        if let Some(body) = gather
            .payload(&payload)
            .map_err(|e| e.into_module_error(invalid))?
        {
            bodies.push(body);
        }
    }
    validate_bodies(bodies)?;
    Ok(gather.finish())
}

/// A function body the validator handed back, to be validated on its own.
type Body<'a> = (
    wasmparser::FuncToValidate<wasmparser::ValidatorResources>,
    wasmparser::FunctionBody<'a>,
);

/// Why a payload was refused: a component, or a parse/validation error (whose offset the
/// caller may need to translate).
enum PayloadError {
    Component,
    Invalid(wasmparser::BinaryReaderError),
}

impl PayloadError {
    fn into_module_error(
        self,
        invalid: impl Fn(wasmparser::BinaryReaderError) -> ModuleError,
    ) -> ModuleError {
        match self {
            PayloadError::Component => ModuleError::Component,
            PayloadError::Invalid(e) => invalid(e),
        }
    }
}

impl From<wasmparser::BinaryReaderError> for PayloadError {
    fn from(e: wasmparser::BinaryReaderError) -> Self {
        PayloadError::Invalid(e)
    }
}

/// What one pass over a module's payloads validates and gathers, whether the module is in
/// memory ([`inspect`]) or arriving in pieces ([`stream::Inspector`]).
#[derive(Default)]
struct Gather {
    validator: Validator,
    /// Function types by type index (None for non-function types).
    types: Vec<Option<Signature>>,
    /// The type index of every function in the function index space (imports first).
    funcs: Vec<u32>,
    imports: Vec<Import>,
    exports: Vec<(String, ExternalKind, u32)>,
}

impl Gather {
    /// Validates one payload and reads what the check needs from it; a function body comes
    /// back for the caller to validate.
    fn payload<'a>(&mut self, payload: &Payload<'a>) -> Result<Option<Body<'a>>, PayloadError> {
        if let Payload::Version {
            encoding: Encoding::Component,
            ..
        } = payload
        {
            return Err(PayloadError::Component);
        }
        let body = match self.validator.payload(payload)? {
            ValidPayload::Func(func, body) => Some((func, body)),
            _ => None,
        };
        match payload {
            Payload::TypeSection(reader) => {
                for group in reader.clone().into_iter_err_on_gc_types() {
                    let ty = group?;
                    self.types.push(Some(Signature {
                        params: ty.params().iter().map(val_type).collect(),
                        results: ty.results().iter().map(val_type).collect(),
                    }));
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.clone() {
                    let import = import?;
                    let (kind, signature) = match import.ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            self.funcs.push(t);
                            (Kind::Func, self.types.get(t as usize).cloned().flatten())
                        }
                        TypeRef::Memory(_) => (Kind::Memory, None),
                        TypeRef::Global(_) => (Kind::Global, None),
                        TypeRef::Table(_) => (Kind::Table, None),
                        TypeRef::Tag(_) => (Kind::Tag, None),
                    };
                    self.imports.push(Import {
                        module: import.module.to_string(),
                        name: import.name.to_string(),
                        kind,
                        signature,
                    });
                }
            }
            Payload::FunctionSection(reader) => {
                for f in reader.clone() {
                    self.funcs.push(f?);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader.clone() {
                    let export = export?;
                    self.exports
                        .push((export.name.to_string(), export.kind, export.index));
                }
            }
            _ => {}
        }
        Ok(body)
    }

    /// The module's exports with their types, and the ABI they declare.
    fn finish(self) -> ModuleInfo {
        let mut info = ModuleInfo {
            imports: self.imports,
            ..ModuleInfo::default()
        };
        for (name, kind, index) in self.exports {
            let (kind, signature) = match kind {
                ExternalKind::Func | ExternalKind::FuncExact => (
                    Kind::Func,
                    self.funcs
                        .get(index as usize)
                        .and_then(|t| self.types.get(*t as usize).cloned().flatten()),
                ),
                ExternalKind::Memory => (Kind::Memory, None),
                ExternalKind::Global => (Kind::Global, None),
                ExternalKind::Table => (Kind::Table, None),
                ExternalKind::Tag => (Kind::Tag, None),
            };
            if kind == Kind::Func
                && let Some(v) = name.strip_prefix(ABI_EXPORT_PREFIX)
            {
                info.abi_versions.push(v.replace('_', "."));
            }
            info.exports.push(Export {
                name,
                kind,
                signature,
            });
        }
        info
    }
}

/// Validates function bodies, split across the machine's cores when there are many.
fn validate_bodies(bodies: Vec<Body<'_>>) -> Result<(), ModuleError> {
    fn run(chunk: Vec<Body<'_>>) -> Result<(), ModuleError> {
        let mut allocs = wasmparser::FuncValidatorAllocations::default();
        for (func, body) in chunk {
            let mut v = func.into_validator(allocs);
            v.validate(&body)
                .map_err(|e| ModuleError::Invalid(e.to_string()))?;
            allocs = v.into_allocations();
        }
        Ok(())
    }
    // Few bodies are validated where they are (asking for the core count reads cgroup files).
    if bodies.len() < 256 {
        return run(bodies);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 {
        return run(bodies);
    }
    let per = bodies.len().div_ceil(threads);
    let mut chunks = Vec::new();
    let mut rest = bodies;
    while rest.len() > per {
        let tail = rest.split_off(per);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks.into_iter().map(|c| s.spawn(|| run(c))).collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(ModuleError::Invalid("validator thread panicked".into())))
        })
    })
}

fn val_type(v: &ValType) -> String {
    match v {
        ValType::I32 => "i32".into(),
        ValType::I64 => "i64".into(),
        ValType::F32 => "f32".into(),
        ValType::F64 => "f64".into(),
        ValType::V128 => "v128".into(),
        ValType::Ref(r) => r.to_string(),
    }
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
        assert_eq!(info.export("memory").map(|e| e.kind), Some(Kind::Memory));
    }

    #[test]
    fn reads_imports_and_exports_with_their_types() {
        let m = wat(r#"(module
                 (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
                 (import "env" "memory" (memory 1))
                 (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)
                 (func (export "two") (param i64) (result i32 f64) i32.const 0 f64.const 0))"#);
        let info = inspect(&m).unwrap();
        assert_eq!(info.imports.len(), 2);
        assert_eq!(info.imports[0].module, "env");
        assert_eq!(
            info.imports[0].signature.as_ref().map(ToString::to_string),
            Some("(i32, i32, i32) -> i32".into())
        );
        assert_eq!(info.imports[1].kind, Kind::Memory);
        let sig = |n: &str| {
            info.export(n)
                .and_then(|e| e.signature.clone())
                .unwrap()
                .to_string()
        };
        assert_eq!(sig("proxy_on_request_headers"), "(i32, i32, i32) -> i32");
        assert_eq!(sig("two"), "(i64) -> (i32, f64)");
    }

    #[test]
    fn signatures_print_in_envoys_notation_too() {
        let sig = |p: &[&str], r: &[&str]| Signature {
            params: p.iter().map(|s| s.to_string()).collect(),
            results: r.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            sig(&["i32", "i32"], &["i32"]).envoy_notation(),
            "i32 i32 -> i32"
        );
        assert_eq!(sig(&["i32"], &[]).envoy_notation(), "i32 -> void");
        assert_eq!(sig(&[], &["i32"]).envoy_notation(), "void -> i32");
        assert_eq!(sig(&[], &[]).envoy_notation(), "void -> void");
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
