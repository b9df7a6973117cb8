//! The ABI check against real Envoys: every module of the corpus is loaded by every Envoy the
//! test environment has (`envoy --mode validate` creates the Wasm VM), and the check must
//! agree with what Envoy did — load or refuse — and word its first reason as Envoy logs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use support::*;
use wasmfilter::abi::check;

/// The corpus: hand-written modules for every reason, plus the real filters the suite builds.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/abi");
    let mut modules: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wat"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                wat::parse_file(&p).unwrap(),
            )
        })
        .collect();
    let add_header = wat::parse_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/modules/add_header.wat"),
    )
    .unwrap();
    let mut truncated = add_header.clone();
    truncated.truncate(add_header.len() / 2);
    modules.push(("add_header".into(), add_header));
    modules.push(("truncated".into(), truncated));
    modules.push(("not_wasm".into(), b"#!/bin/sh\necho hello\n".to_vec()));
    modules.push(("component".into(), wat::parse_str("(component)").unwrap()));
    for built in built_modules() {
        modules.push(built);
    }
    modules.sort();
    modules
}

/// The real filters `e2e/setup.sh` builds (Go SDK, clang): the corpus is not complete without
/// them, so their absence fails the test.
fn built_modules() -> Vec<(String, Vec<u8>)> {
    BUILT
        .iter()
        .map(|name| (name.to_string(), std::fs::read(built_module(name)).unwrap()))
        .collect()
}

/// The filters built from source for the corpus.
const BUILT: [&str; 2] = ["go_sdk_filter", "clang_filter"];

/// The corpus size the README states: 19 hand-written modules, 4 made here, 2 built.
const CORPUS_SIZE: usize = 25;

#[test]
fn the_check_agrees_with_real_envoys_module_by_module() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus();
    assert_eq!(corpus.len(), CORPUS_SIZE, "the corpus the README describes");
    let mut disagreements = Vec::new();
    let mut table = String::new();
    for version in &env.envoy_versions {
        let envoy: PathBuf = env.envoy_dir.join(version).join("envoy");
        let host = check::host(version)
            .unwrap_or_else(|| panic!("no measured host surface for Envoy {version}"));
        for (name, bytes) in &corpus {
            let path = dir.path().join(format!("{name}.wasm"));
            std::fs::write(&path, bytes).unwrap();
            let (loaded, log) = envoy_validate(&envoy, &path, None, dir.path());
            let verdict = check::check_bytes(bytes, version, host);
            table.push_str(&format!(
                "{version:>7} {name:<28} envoy={:<7} check={:<7} {}\n",
                if loaded { "loads" } else { "refuses" },
                if verdict.compatible {
                    "loads"
                } else {
                    "refuses"
                },
                verdict.problems.first().map_or("", |p| p.code),
            ));
            if loaded != verdict.compatible {
                disagreements.push(format!(
                    "{name} on Envoy {version}: Envoy {}, check says {verdict:?}\n{log}",
                    if loaded { "loaded it" } else { "refused it" }
                ));
                continue;
            }
            // Envoy stops at its first failing stage; the first reason must be in its log,
            // worded alike (the check adds detail after " (" for unparsable modules).
            if let Some(first) = verdict.problems.first() {
                let wording = first.message.split(" (").next().unwrap();
                if !log.contains(wording) {
                    disagreements.push(format!(
                        "{name} on Envoy {version}: Envoy did not say {wording:?}:\n{log}"
                    ));
                }
            }
        }
    }
    eprintln!("{table}");
    assert!(
        disagreements.is_empty(),
        "{} disagreement(s):\n{}",
        disagreements.len(),
        disagreements.join("\n---\n")
    );
}
