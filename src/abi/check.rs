//! Will this Envoy load this module? Decided from the module's own exports and imports against
//! the host surface measured from each real Envoy binary (`data/envoy-host-surface.json`,
//! written by `examples/probe_envoy.rs`), in the order Envoy itself checks, worded the way
//! Envoy words it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{Kind, ModuleError, ModuleInfo};

/// The measured table, compiled in.
const HOST_TABLE: &str = include_str!("../../data/envoy-host-surface.json");

/// What one Envoy build offers a module of one ABI version.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Surface {
    /// `module.name` → function type in Envoy's notation, e.g. `env.proxy_log` →
    /// `i32 i32 i32 -> i32`.
    pub imports: BTreeMap<String, String>,
    /// Exports the host looks up, with the type it requires (Envoy's notation).
    pub callbacks: BTreeMap<String, String>,
}

/// One Envoy build's surface, per ABI version (`0.1.0`, `0.2.0`, `0.2.1`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Host {
    pub abis: BTreeMap<String, Surface>,
}

#[derive(Debug, Deserialize)]
struct Table {
    /// Envoy version → the version whose measured surface it shares.
    versions: BTreeMap<String, String>,
    /// Versions that could not be measured, and why.
    #[serde(default)]
    unmeasured: BTreeMap<String, String>,
    surfaces: BTreeMap<String, Host>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        serde_json::from_str(HOST_TABLE).unwrap_or(Table {
            versions: BTreeMap::new(),
            unmeasured: BTreeMap::new(),
            surfaces: BTreeMap::new(),
        })
    })
}

/// Envoy versions with a measured host surface, oldest first.
pub fn known_envoy_versions() -> Vec<String> {
    let mut v: Vec<_> = table().versions.keys().cloned().collect();
    v.sort_by_key(|s| version_key(s));
    v
}

fn version_key(v: &str) -> Vec<u64> {
    v.trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// Why there is no host surface for `version`, in words a person can act on.
pub fn no_host_reason(version: &str) -> String {
    let v = version.trim_start_matches('v');
    match table().unmeasured.get(v) {
        Some(why) => format!("Envoy {v} was not measured: {why}"),
        None => format!(
            "no measured host surface for Envoy {v} (measured: {})",
            known_envoy_versions().join(", ")
        ),
    }
}

/// The measured host of an Envoy version (`1.40.0`, `v1.40.0`), if there is one.
pub fn host(version: &str) -> Option<&'static Host> {
    let t = table();
    let v = version.trim_start_matches('v');
    t.surfaces.get(t.versions.get(v)?)
}

/// The measured host for `version`, which may name only a minor release (`1.36`, as an Istio
/// release tells): then every measured patch of it must share one surface, or there is no
/// answer. Returns the host and the measured version it stands for.
pub fn host_for(version: &str) -> Option<(&'static Host, String)> {
    let v = version.trim_start_matches('v');
    if let Some(h) = host(v) {
        return Some((h, v.to_string()));
    }
    if v.split('.').count() != 2 {
        return None;
    }
    let t = table();
    let prefix = format!("{v}.");
    let patches: Vec<_> = t
        .versions
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let (first_version, surface) = patches.first()?;
    if patches.iter().any(|(_, s)| s != surface) {
        return None;
    }
    let measured: Vec<&str> = patches.iter().map(|(k, _)| k.as_str()).collect();
    let label = if measured.len() == 1 {
        (*first_version).clone()
    } else {
        format!("{v}.x (measured {})", measured.join(", "))
    };
    Some((t.surfaces.get(*surface)?, label))
}

/// A reason Envoy would refuse the module, or a warning that does not stop it loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable code: `not_wasm`, `component`, `invalid_wasm`, `unknown_abi`, `missing_import`,
    /// `import_type_mismatch`, `missing_allocator`, `bad_callback_signature`, or for warnings
    /// `no_memory_export`, `several_abi_markers`.
    pub code: &'static str,
    /// What Envoy would log (for problems), or what to know (for warnings).
    pub message: String,
}

impl Problem {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Problem {
            code,
            message: message.into(),
        }
    }
}

/// The answer for one module and one Envoy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub envoy: String,
    pub compatible: bool,
    pub abi_version: Option<String>,
    /// Every reason it would not load, in the order Envoy checks. Envoy stops at the first
    /// failing stage, so it may log fewer.
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// Checks raw bytes: a module that cannot even be parsed is refused as Envoy would.
pub fn check_bytes(bytes: &[u8], envoy: &str, host: &Host) -> Verdict {
    match super::inspect(bytes) {
        Ok(info) => check(&info, envoy, host),
        Err(e) => {
            // Envoy's words first; the detail in parentheses is ours. (Envoy reads a
            // component's header well enough to find no ABI marker in it.)
            let corrupted = "Failed to parse corrupted Wasm module";
            let (code, envoy_says) = match e {
                ModuleError::NotWasm { .. } => ("not_wasm", corrupted),
                ModuleError::Component => {
                    ("component", "Missing or unknown Proxy-Wasm ABI version")
                }
                ModuleError::Invalid(_) => ("invalid_wasm", corrupted),
            };
            let problem = Problem::new(code, format!("{envoy_says} ({e})"));
            Verdict {
                envoy: envoy.to_string(),
                compatible: false,
                abi_version: None,
                problems: vec![problem],
                warnings: Vec::new(),
            }
        }
    }
}

/// Checks an inspected module against one Envoy host.
pub fn check(info: &ModuleInfo, envoy: &str, host: &Host) -> Verdict {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    // Envoy takes the first ABI marker in export order.
    let abi = info.abi_versions.first().cloned();
    if info.abi_versions.len() > 1 {
        warnings.push(Problem::new(
            "several_abi_markers",
            format!(
                "the module exports several ABI markers ({}); Envoy uses the first, {}",
                info.abi_versions.join(", "),
                info.abi_versions[0]
            ),
        ));
    }
    if !info
        .exports
        .iter()
        .any(|e| e.kind == Kind::Memory && e.name == "memory")
        && !info.imports.iter().any(|i| i.kind == Kind::Memory)
    {
        warnings.push(Problem::new(
            "no_memory_export",
            "the module exports no memory named \"memory\": it loads, but Envoy cannot pass it \
             any data, so every callback that reads headers or bodies fails",
        ));
    }
    let surface = abi.as_deref().and_then(|a| host.abis.get(a));
    let Some(surface) = surface else {
        problems.push(Problem::new(
            "unknown_abi",
            "Missing or unknown Proxy-Wasm ABI version",
        ));
        return Verdict {
            envoy: envoy.to_string(),
            compatible: false,
            abi_version: abi,
            problems,
            warnings,
        };
    };

    // Linking: memories may be imported; functions must exist with the same type; nothing
    // else is provided.
    for import in &info.imports {
        let name = format!("{}.{}", import.module, import.name);
        match import.kind {
            Kind::Memory => {}
            Kind::Func => match surface.imports.get(&name) {
                None => problems.push(Problem::new(
                    "missing_import",
                    format!("Failed to load Wasm module due to a missing import: {name}"),
                )),
                Some(host_ty) => {
                    let ours = notation(&import.signature);
                    if *host_ty != ours {
                        problems.push(Problem::new(
                            "import_type_mismatch",
                            format!(
                                "Failed to load Wasm module due to an import type mismatch: \
                                 {name}, want: {ours}, but host exports: {host_ty}"
                            ),
                        ));
                    }
                }
            },
            _ => problems.push(Problem::new(
                "missing_import",
                format!("Failed to load Wasm module due to a missing import: {name}"),
            )),
        }
    }

    // After linking: the allocator, then every callback the host looks up.
    let func = |name: &str| {
        info.exports
            .iter()
            .find(|e| e.name == name && e.kind == Kind::Func)
    };
    let typed_ok = |name: &str| {
        let want = surface.callbacks.get(name);
        func(name).is_some_and(|e| want.is_none_or(|w| notation(&e.signature) == *w))
    };
    if !typed_ok("proxy_on_memory_allocate") && !typed_ok("malloc") {
        problems.push(Problem::new(
            "missing_allocator",
            "Wasm module is missing malloc function.",
        ));
    }
    for (name, want) in &surface.callbacks {
        if let Some(e) = func(name) {
            let have = notation(&e.signature);
            if have != *want {
                problems.push(Problem::new(
                    "bad_callback_signature",
                    format!(
                        "Bad function signature for: {name}, want: {want}, but the module exports: {have}"
                    ),
                ));
            }
        }
    }
    Verdict {
        envoy: envoy.to_string(),
        compatible: problems.is_empty(),
        abi_version: abi,
        problems,
        warnings,
    }
}

/// A function's type in Envoy's notation (functions of a validated module always have one).
fn notation(signature: &Option<super::Signature>) -> String {
    signature.as_ref().map_or_else(
        || "void -> void".to_string(),
        super::Signature::envoy_notation,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_for_tests() -> Host {
        let mut abis = BTreeMap::new();
        abis.insert(
            "0.2.1".to_string(),
            Surface {
                imports: BTreeMap::from([
                    ("env.proxy_log".into(), "i32 i32 i32 -> i32".into()),
                    (
                        "wasi_snapshot_preview1.fd_write".into(),
                        "i32 i32 i32 i32 -> i32".into(),
                    ),
                ]),
                callbacks: BTreeMap::from([
                    ("proxy_on_memory_allocate".into(), "i32 -> i32".into()),
                    ("malloc".into(), "i32 -> i32".into()),
                    (
                        "proxy_on_request_headers".into(),
                        "i32 i32 i32 -> i32".into(),
                    ),
                ]),
            },
        );
        Host { abis }
    }

    fn verdict(wat_src: &str) -> Verdict {
        check_bytes(&wat::parse_str(wat_src).unwrap(), "test", &host_for_tests())
    }

    const OK: &str = r#"(memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)"#;

    #[test]
    fn a_well_formed_module_loads() {
        let v = verdict(&format!(
            r#"(module (import "env" "proxy_log" (func (param i32 i32 i32) (result i32))) {OK})"#
        ));
        assert!(v.compatible, "{v:?}");
        assert_eq!(v.abi_version.as_deref(), Some("0.2.1"));
    }

    #[test]
    fn each_refusal_is_worded_as_envoy_words_it() {
        let cases = [
            (
                r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_3_0")))"#.to_string(),
                "unknown_abi",
                "Missing or unknown Proxy-Wasm ABI version".to_string(),
            ),
            (
                format!(r#"(module (import "env" "proxy_nope" (func)) {OK})"#),
                "missing_import",
                "Failed to load Wasm module due to a missing import: env.proxy_nope".into(),
            ),
            (
                format!(r#"(module (import "env" "proxy_log" (func (param i32 i32) (result i32))) {OK})"#),
                "import_type_mismatch",
                "Failed to load Wasm module due to an import type mismatch: env.proxy_log, want: i32 i32 -> i32, but host exports: i32 i32 i32 -> i32".into(),
            ),
            (
                r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#.into(),
                "missing_allocator",
                "Wasm module is missing malloc function.".into(),
            ),
            (
                format!(r#"(module {OK} (func (export "proxy_on_request_headers") (param i32 i32) (result i32) i32.const 0))"#),
                "bad_callback_signature",
                "Bad function signature for: proxy_on_request_headers, want: i32 i32 i32 -> i32, but the module exports: i32 i32 -> i32".into(),
            ),
            (
                format!(r#"(module (import "env" "g" (global i32)) {OK})"#),
                "missing_import",
                "Failed to load Wasm module due to a missing import: env.g".into(),
            ),
        ];
        for (src, code, message) in cases {
            let v = verdict(&src);
            assert!(!v.compatible, "{src}");
            assert_eq!(v.problems[0].code, code, "{src}");
            assert_eq!(v.problems[0].message, message, "{src}");
        }
    }

    #[test]
    fn warnings_do_not_stop_loading() {
        let v = verdict(
            r#"(module (func (export "proxy_abi_version_0_2_1")) (func (export "proxy_abi_version_0_1_0"))
                (func (export "malloc") (param i32) (result i32) i32.const 0))"#,
        );
        assert!(v.compatible, "{v:?}");
        let codes: Vec<_> = v.warnings.iter().map(|w| w.code).collect();
        assert_eq!(codes, ["several_abi_markers", "no_memory_export"]);
    }

    #[test]
    fn unparsable_input_is_refused() {
        let h = host_for_tests();
        assert_eq!(check_bytes(b"hello", "t", &h).problems[0].code, "not_wasm");
        assert_eq!(
            check_bytes(b"\0asm\x01\0\0\0\x01\x05", "t", &h).problems[0].code,
            "invalid_wasm"
        );
        let component = wat::parse_str("(component)").unwrap();
        assert_eq!(
            check_bytes(&component, "t", &h).problems[0].code,
            "component"
        );
    }

    #[test]
    fn hostile_modules_are_handled_without_panicking() {
        let h = host_for_tests();
        // 10,000 imports and 10,000 exports.
        let mut src = String::from("(module\n");
        for i in 0..10_000 {
            src.push_str(&format!("(import \"env\" \"f{i}\" (func))\n"));
        }
        src.push_str(OK);
        for i in 0..10_000 {
            src.push_str(&format!("(func (export \"e{i}\"))\n"));
        }
        src.push(')');
        let v = verdict(&src);
        assert_eq!(v.problems.len(), 10_000);
        // Deeply nested blocks.
        let depth = 20_000;
        let body = format!("{}{}", "(block ".repeat(depth), ")".repeat(depth));
        let v = verdict(&format!("(module {OK} (func {body}))"));
        assert!(v.compatible, "{v:?}");
        // A section that claims more bytes than there are.
        let oversized = b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff\x0f\x60";
        assert_eq!(
            check_bytes(oversized, "t", &h).problems[0].code,
            "invalid_wasm"
        );
        // Random damage to a valid module: always an answer, never a panic.
        let good = wat::parse_str(format!("(module {OK})")).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5_000 {
            let mut m = good.clone();
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..m.len());
                m[i] = rng.u8(..);
            }
            if rng.bool() {
                m.truncate(rng.usize(..m.len()));
            }
            let _ = check_bytes(&m, "t", &h);
        }
    }

    #[test]
    fn the_measured_table_covers_the_supported_envoys() {
        let versions = known_envoy_versions();
        for v in ["1.36.2", "1.40.0"] {
            assert!(
                versions.iter().any(|k| k == v),
                "{v} missing from {versions:?}"
            );
            let h = host(v).unwrap();
            let s = &h.abis["0.2.1"];
            assert_eq!(s.imports["env.proxy_log"], "i32 i32 i32 -> i32");
            assert!(s.imports.contains_key("env.proxy_get_log_level"));
            assert!(
                !h.abis["0.1.0"]
                    .imports
                    .contains_key("env.proxy_get_log_level")
            );
            assert!(
                h.abis["0.1.0"]
                    .imports
                    .contains_key("env.proxy_get_configuration")
            );
        }
        assert!(host("v1.40.0").is_some());
        assert!(host("0.9.0").is_none());
    }
}
