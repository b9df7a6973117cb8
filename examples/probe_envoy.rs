//! Measures the proxy-wasm host surface of a real Envoy binary: which imports it links, with
//! which types, and which callback signatures it requires, per ABI version. The result is the
//! table `src/abi/` checks modules against (`data/envoy-host-surface.json`, written by
//! `e2e/probe-envoy.sh`, which runs this for every Envoy release it downloads).
//!
//! How: for each candidate name (every `proxy_*`, WASI-like and `pthread_*`/`emscripten_*`
//! string found in the binary itself), Envoy validates (`--mode validate`, which loads Wasm) a
//! tiny module that imports that name with a deliberately wrong type, or exports that
//! callback with one. Envoy answers "missing import", "import type mismatch ... host exports:
//! <type>" or "Bad function signature for: <name>, want: <type>" — the host's own words for
//! its own surface.
//!
//! Usage: cargo run --release --example probe_envoy -- ENVOY_BINARY > surface.json
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const ABIS: &[&str] = &["0.1.0", "0.2.0", "0.2.1"];
const IMPORT_MODULES_WASI: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable"];

/// What Envoy said about one probe.
enum Outcome {
    Loaded,
    MissingImport,
    ImportType { host: String },
    CallbackType { want: String },
    Other(String),
}

struct Prober {
    envoy: PathBuf,
    dir: tempfile::TempDir,
}

impl Prober {
    fn run(&self, id: usize, wat: &str) -> Outcome {
        let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("{e}\n{wat}"));
        let module = self.dir.path().join(format!("m{id}.wasm"));
        std::fs::write(&module, wasm).unwrap();
        let config = self.dir.path().join(format!("b{id}.json"));
        std::fs::write(&config, bootstrap(&module)).unwrap();
        let out = Command::new(&self.envoy)
            .args(["--mode", "validate", "-l", "warning", "--base-id"])
            .arg(id.to_string())
            .arg("-c")
            .arg(&config)
            .output()
            .expect("run envoy");
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            return Outcome::Loaded;
        }
        if log.contains("due to a missing import") {
            return Outcome::MissingImport;
        }
        if let Some(rest) = after(&log, "but host exports: ") {
            return Outcome::ImportType { host: rest };
        }
        if log.contains("Bad function signature for:")
            && let Some(want) = between(&log, ", want: ", ", but the module exports")
        {
            return Outcome::CallbackType { want };
        }
        let first = log
            .lines()
            .find(|l| l.contains("[wasm]") && !l.contains("[info]"))
            .unwrap_or("")
            .to_string();
        Outcome::Other(first)
    }
}

fn after(log: &str, marker: &str) -> Option<String> {
    let i = log.find(marker)? + marker.len();
    Some(log[i..].lines().next()?.trim().to_string())
}

fn between(log: &str, start: &str, end: &str) -> Option<String> {
    let i = log.find(start)? + start.len();
    let j = log[i..].find(end)? + i;
    Some(log[i..j].trim().to_string())
}

/// `envoy --mode validate` config loading `module` as an HTTP Wasm filter (the template the
/// ABI corpus test uses too).
fn bootstrap(module: &Path) -> String {
    include_str!("../e2e/envoy/validate-wasm.json")
        .replace("WASM_MODULE_PATH", &module.to_string_lossy())
}

/// A module with ABI `abi`, an allocator and memory, plus `extra` fields.
fn module(abi: &str, extra: &str, with_allocator: bool) -> String {
    let marker = format!("proxy_abi_version_{}", abi.replace('.', "_"));
    let alloc = if with_allocator {
        r#"(func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)"#
    } else {
        ""
    };
    format!("(module {extra} (memory (export \"memory\") 1) (func (export \"{marker}\")) {alloc})")
}

fn candidates(envoy: &Path) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new("strings")
        .args(["-n", "4"])
        .arg(envoy)
        .output()
        .expect("strings (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let is_ident = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut proxy = BTreeSet::new();
    let mut wasi = BTreeSet::new();
    let mut env_extra = BTreeSet::new();
    for s in text.lines().map(str::trim) {
        if !is_ident(s) || s.len() > 64 {
            continue;
        }
        if s.starts_with("proxy_") && !s.starts_with("proxy_abi_version") {
            proxy.insert(s.to_string());
        }
        if [
            "fd_", "path_", "environ_", "args_", "clock_", "random_", "proc_", "sched_", "poll_",
            "sock_",
        ]
        .iter()
        .any(|p| s.starts_with(p))
        {
            wasi.insert(s.to_string());
        }
        if s.starts_with("emscripten_") || s.starts_with("pthread_") {
            env_extra.insert(s.to_string());
        }
    }
    (proxy, wasi, env_extra)
}

fn main() {
    let envoy: PathBuf = std::env::args_os()
        .nth(1)
        .expect("usage: probe_envoy ENVOY_BINARY")
        .into();
    let version = Command::new(&envoy).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version
        .split("version: ")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .unwrap_or("unknown")
        .to_string();
    let (proxy, wasi, env_extra) = candidates(&envoy);
    let prober = Prober {
        envoy: envoy.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    // First, can this build run Wasm at all? (Some PyPI wheels are built without V8.)
    match prober.run(0, &module("0.2.1", "", true)) {
        Outcome::Loaded => {}
        Outcome::Other(line) => {
            eprintln!("Envoy {version} does not load a minimal valid module: {line}");
            let reason = line.split("] ").last().unwrap_or(&line).trim().to_string();
            let out = serde_json::json!({"envoy": version, "wasm": false, "reason": reason});
            println!("{}", serde_json::to_string_pretty(&out).unwrap());
            return;
        }
        _ => panic!("unexpected answer to the baseline module"),
    }
    let mut imports: Vec<(String, String)> = Vec::new();
    for name in proxy.iter().chain(&env_extra) {
        imports.push(("env".into(), name.clone()));
    }
    for m in IMPORT_MODULES_WASI {
        for name in &wasi {
            imports.push(((*m).into(), name.clone()));
        }
    }
    // Callbacks Envoy looks up: the proxy_on_* names, the allocator and the start functions.
    let mut callbacks: Vec<String> = proxy
        .iter()
        .filter(|n| n.starts_with("proxy_on_") || n.starts_with("proxy_validate"))
        .cloned()
        .collect();
    callbacks.extend(
        [
            "malloc",
            "_initialize",
            "_start",
            "main",
            "__wasm_call_ctors",
        ]
        .map(String::from),
    );

    let results: Mutex<BTreeMap<String, serde_json::Map<String, serde_json::Value>>> =
        Mutex::new(BTreeMap::new());
    let unexpected: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let jobs: Vec<(usize, &str, Job)> = ABIS
        .iter()
        .flat_map(|abi| {
            imports
                .iter()
                .map(|(m, n)| Job::Import(m.clone(), n.clone()))
                .chain(callbacks.iter().map(|c| Job::Callback(c.clone())))
                .map(move |j| (*abi, j))
        })
        .enumerate()
        .map(|(i, (abi, j))| (i + 1, abi, j))
        .collect();
    let next = Mutex::new(0usize);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "probing Envoy {version}: {} imports and {} callbacks x {} ABIs ({} runs, {workers} at a time)",
        imports.len(),
        callbacks.len(),
        ABIS.len(),
        jobs.len()
    );
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some((id, abi, job)) = jobs.get(i) else {
                        break;
                    };
                    if i % 200 == 0 {
                        eprintln!("  {i}/{}", jobs.len());
                    }
                    let (key, wat, with_alloc) = match job {
                        // A type no host function has: () -> (f64, f64, f64).
                        Job::Import(m, n) => (
                            format!("imports/{m}.{n}"),
                            format!("(import \"{m}\" \"{n}\" (func (result f64 f64 f64)))"),
                            true,
                        ),
                        Job::Callback(c) => (
                            format!("callbacks/{c}"),
                            format!("(func (export \"{c}\") (param f64 f64 f64))"),
                            c != "proxy_on_memory_allocate",
                        ),
                    };
                    let entry = match prober.run(*id, &module(abi, &wat, with_alloc)) {
                        Outcome::MissingImport => None,
                        // Types are kept in Envoy's own notation ("i32 i32 -> i32").
                        Outcome::ImportType { host } => Some(host),
                        Outcome::CallbackType { want } => Some(want),
                        Outcome::Loaded => match job {
                            // Loaded with a nonsense import type: impossible; with a nonsense
                            // callback: the host never looks that name up.
                            Job::Import(..) => {
                                unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("{abi} {key}: loaded"));
                                None
                            }
                            Job::Callback(_) => None,
                        },
                        Outcome::Other(line) => {
                            unexpected
                                .lock()
                                .unwrap()
                                .push(format!("{abi} {key}: {line}"));
                            None
                        }
                    };
                    if let Some(ty) = entry {
                        let (section, name) = key.split_once('/').unwrap();
                        results
                            .lock()
                            .unwrap()
                            .entry(format!("{abi}/{section}"))
                            .or_default()
                            .insert(name.to_string(), ty.into());
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut abis = serde_json::Map::new();
    for abi in ABIS {
        abis.insert(
            (*abi).to_string(),
            serde_json::json!({
                "imports": results.get(&format!("{abi}/imports")).cloned().unwrap_or_default(),
                "callbacks": results.get(&format!("{abi}/callbacks")).cloned().unwrap_or_default(),
            }),
        );
    }
    let unexpected = unexpected.into_inner().unwrap();
    for u in &unexpected {
        eprintln!("unexpected: {u}");
    }
    let out = serde_json::json!({"envoy": version, "wasm": true, "abis": abis});
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

enum Job {
    Import(String, String),
    Callback(String),
}
