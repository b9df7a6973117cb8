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

/// `wasmfilter pull REFERENCE --plain-http --output FILE`.
fn pull(reference: &str, file: &std::path::Path) -> std::process::Output {
    wasmfilter(&[
        "pull",
        reference,
        "--plain-http",
        "--output",
        file.to_str().unwrap(),
    ])
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
    let out = pull(&reference, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    let pulled = std::fs::read(&file).unwrap();
    let expected = wat::parse_file(wat).unwrap();
    assert_eq!(pulled, expected);
    let text = stdout(&out);
    assert!(text.contains("format solo-oci"), "{text}");
    assert!(text.contains(&format!("size {}", expected.len())), "{text}");
}

/// `push --abi/--root-id` land in the artifact's config, where `inspect REF` reads them back;
/// `inspect FILE` reads a module without a registry; `check REF` pulls before it checks.
#[test]
fn push_declarations_land_in_the_artifact_and_inspect_and_check_read_files_and_references() {
    let env = env();
    let wat = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/modules/add_header.wat"
    );
    let module = wat::parse_file(wat).unwrap();
    let reference = format!(
        "{}/cli/declared-{:08x}:1.0.0",
        env.registry,
        fastrand::u32(..)
    );
    let out = wasmfilter(&[
        "push",
        wat,
        &reference,
        "--plain-http",
        "--abi",
        "0.2.1",
        "--root-id",
        "add_header",
        "--root-id",
        "second_root",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = wasmfilter(&["inspect", &reference, "--plain-http", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["format"], "solo-oci");
    assert_eq!(r["declaredAbiVersions"], serde_json::json!(["0.2.1"]));
    assert_eq!(
        r["rootIds"],
        serde_json::json!(["add_header", "second_root"])
    );
    assert_eq!(r["abiVersion"], "0.2.1");
    assert_eq!(r["moduleSha256"], wasmfilter::cache::sha256_hex(&module));
    assert!(r["manifestDigest"].as_str().unwrap().starts_with("sha256:"));

    // A file: the module's own facts, no artifact ones.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.wasm");
    std::fs::write(&file, &module).unwrap();
    let out = wasmfilter(&["inspect", file.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["moduleSha256"], r["moduleSha256"]);
    assert_eq!(f["size"], module.len());
    assert_eq!(f["abiVersion"], "0.2.1");
    assert!(
        f.get("format").is_none() && f.get("manifestDigest").is_none(),
        "{f}"
    );
    assert_eq!(f["declaredAbiVersions"], serde_json::json!([]));
    let exports: Vec<&str> = f["exports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(exports.contains(&"proxy_on_request_headers"), "{exports:?}");

    // A reference, checked: pulled, then judged like the file.
    let out = wasmfilter(&[
        "check",
        &reference,
        "--plain-http",
        "--envoy",
        "1.36.2",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["compatible"], true);
    let missing = format!("{}/cli/declared-missing:nope", env.registry);
    let out = wasmfilter(&["check", &missing, "--plain-http", "--envoy", "1.36.2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[test]
fn pull_of_a_missing_tag_fails_with_one_line() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.wasm");
    let reference = format!("{}/cli/missing:nope", env.registry);
    let out = pull(&reference, &file);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!file.exists());
}

/// `pull` fetches what it writes, the manifest and the module layer (as `oras pull` does);
/// the config blob, which only declares ABI versions and root ids, is read by `inspect`.
#[test]
fn pull_reads_the_manifest_and_module_only_inspect_reads_the_config() {
    let env = env();
    let reference = format!(
        "{}/cli/odd-config-{:08x}:1",
        env.registry,
        fastrand::u32(..)
    );
    let module = module("odd-config");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(push_raw_with_config(
            &reference,
            b"\x7fELF this is not JSON",
            "application/vnd.module.wasm.config.v1+json",
            &[(&module, "application/vnd.module.wasm.content.layer.v1+wasm")],
        ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.wasm");
    let out = pull(&reference, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), module);
    let out = wasmfilter(&["inspect", &reference, "--plain-http"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("config blob is not JSON"),
        "{}",
        stderr(&out)
    );
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

#[test]
fn check_says_which_envoys_load_a_module_with_exit_codes_0_1_2() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let good = format!("{fixtures}/modules/add_header.wat");
    let out = wasmfilter(&[
        "check", &good, "--envoy", "1.36.2", "--envoy", "v1.40.0", "--output", "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compatible"], true);
    assert_eq!(report["abiVersion"], "0.2.1");
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["verdicts"].as_array().unwrap().len(), 2);

    let bad = format!("{fixtures}/abi/import_type_mismatch.wat");
    let out = wasmfilter(&["check", &bad, "--envoy", "1.36.2", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compatible"], false);
    assert_eq!(report["problems"][0]["code"], "import_type_mismatch");
    assert_eq!(
        report["problems"][0]["message"],
        "Failed to load Wasm module due to an import type mismatch: env.proxy_log, want: i32 i32 -> i32, but host exports: i32 i32 i32 -> i32"
    );
    // Text output names the reason too.
    let out = wasmfilter(&["check", &bad, "--envoy", "1.40.0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("Envoy 1.40.0: refuses"),
        "{}",
        stdout(&out)
    );

    // Input that cannot be read or parsed, and an Envoy without measured data: exit 2.
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("notes.wasm");
    std::fs::write(&not_wasm, b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff\x0f").unwrap();
    let component = dir.path().join("component.wat");
    std::fs::write(&component, "(component)").unwrap();
    for args in [
        vec!["check", not_wasm.to_str().unwrap(), "--envoy", "1.36.2"],
        vec!["check", component.to_str().unwrap(), "--envoy", "1.36.2"],
        vec!["check", &good, "--envoy", "1.2.3"],
        vec!["check", "/no/such/file.wasm", "--envoy", "1.36.2"],
    ] {
        let out = wasmfilter(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
}

/// `--xds-advertise-address` is checked when the operator starts: a HOST:PORT, with ECDS and
/// leader election, and not with TLS on the ECDS port (replicas relay plain gRPC).
#[test]
fn the_advertised_ecds_address_is_checked_at_start() {
    let base = [
        "operator",
        "--xds-listen",
        "127.0.0.1:0",
        "--leader-elect",
        "--leader-election-namespace",
        "ns",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        wasmfilter(&args)
    };
    for (value, says) in [
        ("nope", "expected HOST:PORT"),
        ("10.0.0.7:99999", "is not a port"),
        ("10.0.0.7:0", "is not a port"),
        (":18000", "is not a host"),
    ] {
        let out = run(&["--xds-advertise-address", value]);
        assert_eq!(out.status.code(), Some(2), "{value}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{value}: {}", stderr(&out));
    }
    let out = run(&[
        "--xds-advertise-address",
        "10.0.0.7:18000",
        "--xds-tls-cert",
        "c.pem",
        "--xds-tls-key",
        "k.pem",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

/// `pull` checks a module while it writes it (no copy of its size in memory): a layer that is
/// not Wasm, or a module with a bad function body behind a large custom section (the error's
/// offset is the module's own, past the section), fails, and the file already at the output
/// stays as it was, with no partial file beside it. A valid module with the same section pulls
/// byte for byte. Both sides of the 4 MiB line where the hashing, writing and inspecting move
/// from one thread to a thread each (3 and 5 MiB sections).
#[tokio::test]
async fn pull_checks_the_module_as_it_writes_it_and_keeps_the_old_file_on_failure() {
    use wasmfilter::oci::format::{SOLO_CONFIG_MEDIA_TYPE, SOLO_LAYER_MEDIA_TYPE};
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("filter.wasm");
    std::fs::write(&file, b"the module that works").unwrap();
    let push = |name: &str, layer: Vec<u8>| {
        let reference = format!(
            "{}/cli/stream-{name}-{:08x}:1",
            env.registry,
            fastrand::u32(..)
        );
        async move {
            push_raw(
                &reference,
                SOLO_CONFIG_MEDIA_TYPE,
                &[(&layer, SOLO_LAYER_MEDIA_TYPE)],
            )
            .await;
            reference
        }
    };
    for mib in [3usize, 5] {
        pull_checks_a_padded_module(&push, &file, mib).await;
    }
}

async fn pull_checks_a_padded_module<F: std::future::Future<Output = String>>(
    push: &impl Fn(&str, Vec<u8>) -> F,
    file: &std::path::Path,
    mib: usize,
) {
    // A module with a `mib` MiB custom section first, then one function, whose body is
    // `i32.const 0` in a function returning nothing when it should fail.
    let padded = |body_valid: bool| {
        let small = wat::parse_str(if body_valid {
            "(module (func (export \"f\")))"
        } else {
            "(module (func (export \"f\") i32.const 0))"
        })
        .unwrap();
        let contents = mib << 20;
        let body_len = 1 + "padding".len() + contents;
        let mut m = small[..8].to_vec();
        m.push(0);
        let mut n = body_len;
        while n >= 0x80 {
            m.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        m.push(n as u8);
        m.push("padding".len() as u8);
        m.extend_from_slice(b"padding");
        m.resize(m.len() + contents, 0xa5);
        m.extend_from_slice(&small[8..]);
        m
    };
    let refused = [
        (
            push("notwasm", b"this is not wasm".to_vec()).await,
            "not a Wasm module".to_string(),
        ),
        (
            push("badbody", padded(false)).await,
            // The same words, at the same offset, as a check of the whole module in memory.
            wasmfilter::abi::inspect(&padded(false))
                .unwrap_err()
                .to_string(),
        ),
    ];
    for (reference, expected) in &refused {
        let out = pull(reference, file);
        assert_pull_refused_and_kept(&out, expected, file, b"the module that works");
    }
    let offset = refused[1]
        .1
        .split("(at offset 0x")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .expect("an offset");
    assert!(
        offset > (mib << 20) as u64,
        "offset {offset:#x} is inside the custom section"
    );

    let good = padded(true);
    let out = pull(&push("good", good.clone()).await, file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(file).unwrap(), good);
    // The next size starts from the file that works.
    std::fs::write(file, b"the module that works").unwrap();
}
