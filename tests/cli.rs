//! The `wasmfilter` CLI against the real registry: push and pull round-trip, clear failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::*;

fn wasmfilter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn push_then_pull_round_trips_the_module_bytes() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let wat = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/modules/add_header.wat"
    );
    let reference = format!(
        "{}/cli/roundtrip-{:08x}:1.0.0",
        env.registry,
        fastrand::u32(..)
    );
    let out = wasmfilter(&[
        "push",
        wat,
        &reference,
        "--plain-http",
        "--root-id",
        "add_header",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("solo-oci"), "{}", stdout(&out));

    let file = dir.path().join("m.wasm");
    let out = wasmfilter(&[
        "pull",
        &reference,
        "--plain-http",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pulled = std::fs::read(&file).unwrap();
    let expected = wat::parse_file(wat).unwrap();
    assert_eq!(pulled, expected);
    let text = stdout(&out);
    assert!(text.contains("format solo-oci"), "{text}");
    assert!(text.contains(&format!("size {}", expected.len())), "{text}");
}

#[test]
fn pull_of_a_missing_tag_fails_with_one_line() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.wasm");
    let reference = format!("{}/cli/missing:nope", env.registry);
    let out = wasmfilter(&[
        "pull",
        &reference,
        "--plain-http",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!file.exists());
}

#[test]
fn push_refuses_what_is_not_wasm() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.wasm");
    std::fs::write(&file, "hello").unwrap();
    let reference = format!("{}/cli/not-wasm:1", env.registry);
    let out = wasmfilter(&["push", file.to_str().unwrap(), &reference, "--plain-http"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a Wasm module"),
        "{}",
        stderr(&out)
    );
}
