//! Pre-flight: the real module runs with the filter's real configuration in the sandbox before
//! any proxy gets it. Real filters built from source (the proxy-wasm Go SDK filter configured
//! by JSON, the C filter), the `wasmfilter run` CLI, the operator against the real API server
//! and registry, and real Envoys (`--mode validate` builds the VM and configures the plugin)
//! as the judge of which modules fail to configure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use wasmfilter::api::WasmFilter;

const GO: &str = "go_configured_filter";

fn run(args: &[&str]) -> (i32, String, String) {
    run_with_env(args, &[])
}

fn run_with_env(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), stdout(&out), stderr(&out))
}

#[test]
fn compiled_modules_are_kept_in_the_users_cache_and_the_operator_flags_have_their_defaults() {
    let cache = tempfile::tempdir().unwrap();
    let compiled = cache.path().join("wasmfilter/compiled");
    let (code, out, _) = run_with_env(
        &[&path("clang_filter"), "--no-request"],
        &[("XDG_CACHE_HOME", cache.path())],
    );
    assert_eq!(code, 0, "{out}");
    let files = walk(&compiled);
    assert!(!files.is_empty(), "nothing under {}", compiled.display());

    let help = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args(["operator", "--help"])
        .output()
        .unwrap();
    let help = stdout(&help)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for flag in [
        "--preflight <BOOL> Run every new module",
        "[default: true]",
        "--preflight-timeout-ms <PREFLIGHT_TIMEOUT_MS>",
        "[default: 5000]",
        "--preflight-memory-mib <PREFLIGHT_MEMORY_MIB>",
        "[default: 256]",
    ] {
        assert!(help.contains(flag), "{flag} not in: {help}");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

fn path(name: &str) -> String {
    built_module(name).to_string_lossy().into_owned()
}

#[test]
fn run_shows_a_go_sdk_filters_log_and_every_header_change_it_made() {
    let go = path(GO);
    let (code, out, err) = run(&[
        &go,
        "--config",
        r#"{"header":"x-team","value":"blue"}"#,
        "--request-header",
        "x-remove-me=1",
        "--request-header",
        "X-Team=red",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("pre-flight: passed\n"), "{out}");
    for line in [
        "  [info] will set x-team\n",
        "request headers: Continue\n",
        "response headers: Continue\n",
        "  request headers replace: x-team: blue\n",
        "  request headers remove: x-remove-me\n",
        "  response headers add: x-configured: x-team\n",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // The same run as JSON: the headers as the filter left them.
    let (code, out, _) = run(&[
        &go,
        "--config",
        r#"{"header":"x-team","value":"blue"}"#,
        "--request-header",
        "x-remove-me=1",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let headers = report["exchange"]["request_headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-team", "blue"])), "{headers:?}");
    assert!(headers.contains(&json!([":path", "/"])), "defaults sent");
    assert!(
        !headers.iter().any(|h| h[0] == "x-remove-me"),
        "{headers:?}"
    );

    // The C filter (no SDK, no WASI) runs too.
    let (code, out, _) = run(&[&path("clang_filter")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  response headers add: x-wasmfilter-c: on\n"),
        "{out}"
    );
}

#[test]
fn run_fails_a_module_that_refuses_its_config_traps_or_never_returns() {
    let go = path(GO);
    let (code, out, _) = run(&[&go, "--config", "{}", "--no-request"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("pre-flight: FAILED in proxy_on_configure: returned false"),
        "{out}"
    );
    assert!(
        out.contains(r#"  [critical] configuration needs "header""#),
        "the module's own words: {out}"
    );

    let (code, out, _) = run(&[&go, "--config", r#"{"mode":"trap"}"#]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("pre-flight: FAILED in proxy_on_configure: wasm trap"),
        "{out}"
    );
    assert!(
        out.contains("  [error] panic: configured to panic\n"),
        "{out}"
    );
    assert!(out.contains("request headers: not called"), "{out}");

    let started = Instant::now();
    let (code, out, _) = run(&[&go, "--config", r#"{"mode":"loop"}"#, "--timeout-ms", "300"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("proxy_on_configure: did not return within the pre-flight's 300 ms"),
        "{out}"
    );
    assert!(out.contains("[info] about to loop forever"), "{out}");
    // Cut at the cap, not run to some later limit (compiling may come first).
    assert!(started.elapsed() < Duration::from_secs(60));

    // A memory cap below what the Go runtime needs to start.
    let (code, out, _) = run(&[&go, "--memory-mib", "1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("pre-flight: FAILED in instantiate"),
        "{out}"
    );

    let (code, _, err) = run(&["/nonexistent/filter.wasm"]);
    assert_eq!(code, 2, "{err}");
}

/// Modules and configurations, and whether each configures, per the sandbox and per real
/// Envoy. A module that never returns from configure is left out: Envoy would hang on it.
/// (`proc_exit` does not stop a module in Envoy: it logs it and carries on, and so does the
/// sandbox.)
#[test]
fn the_sandbox_and_real_envoys_agree_on_which_modules_fail_to_configure() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let add_header = dir.path().join("add_header.wasm");
    std::fs::write(
        &add_header,
        wat::parse_str(include_str!("fixtures/modules/add_header.wat")).unwrap(),
    )
    .unwrap();
    let exits = dir.path().join("proc_exit.wasm");
    std::fs::write(
        &exits,
        wat::parse_str(
            r#"(module
              (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
              (memory (export "memory") 1)
              (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
              (func (export "proxy_abi_version_0_2_1"))
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
              (func (export "proxy_on_configure") (param i32 i32) (result i32)
                (call $exit (i32.const 3)) i32.const 1))"#,
        )
        .unwrap(),
    )
    .unwrap();
    let go = built_module(GO);
    let cases: Vec<(&str, &Path, Option<&str>)> = vec![
        (
            "go, good config",
            &go,
            Some(r#"{"header":"x-a","value":"b"}"#),
        ),
        ("go, config without header", &go, Some("{}")),
        ("go, config not JSON", &go, Some("header: x-a")),
        ("go, no config", &go, None),
        ("go, panics in configure", &go, Some(r#"{"mode":"trap"}"#)),
        ("add_header.wat", &add_header, Some(r#"{"greeting":"hi"}"#)),
        ("proc_exit in configure", &exits, None),
    ];
    let go_sdk = built_module("go_sdk_filter");
    let clang = built_module("clang_filter");
    let cases: Vec<_> = cases
        .into_iter()
        .chain([
            ("go_sdk_filter", go_sdk.as_path(), None),
            ("clang_filter", clang.as_path(), None),
        ])
        .collect();
    let mut table = String::new();
    let mut disagreements = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    for (name, module, config) in &cases {
        let module_arg = module.to_string_lossy();
        let mut args = vec![module_arg.as_ref(), "--no-request"];
        if let Some(c) = config {
            args.extend(["--config", c]);
        }
        let (code, out, err) = run(&args);
        assert!(code == 0 || code == 1, "{name}: {out}{err}");
        let ours = code == 0;
        if ours {
            passed += 1;
        } else {
            failed += 1;
        }
        for version in &env.envoy_versions {
            let envoy = env.envoy_dir.join(version).join("envoy");
            let (loads, log) = envoy_validate(&envoy, module, *config, dir.path());
            table.push_str(&format!(
                "{version:>7} {name:<28} envoy={:<7} sandbox={}\n",
                if loads { "loads" } else { "refuses" },
                if ours { "passes" } else { "fails" }
            ));
            if loads != ours {
                disagreements.push(format!("{name} on Envoy {version}:\n{out}\n{log}"));
            }
        }
    }
    println!("{table}");
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n\n"));
    // The corpus holds both outcomes.
    assert!(passed >= 4 && failed >= 4, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_fails_preflight_is_not_deployed_and_the_working_one_stays() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("preflight");
    let n = &ns.name;
    let op = Operator::start(n, &["--preflight-timeout-ms", "1500"]).await;
    let image = format!("{}/preflight/{n}:1", env.registry);
    let module = std::fs::read(built_module(GO)).unwrap();
    push_module(&image, module).await;
    let filter = |config: serde_json::Value| Filter::new(n, "team", &image).config(config);

    filter(json!({"header": "x-team", "value": "blue"})).apply();
    wait_condition(&client, n, "team", "Ready", "True").await;
    let passed = "wasmfilter_preflight_runs_total{result=\"passed\"}";
    let failed = "wasmfilter_preflight_runs_total{result=\"failed\"}";
    assert_eq!(op.metric(passed).await, 1.0);
    let wasm_plugins = child_api(&client, n, "WasmPlugin");
    let plugin_config =
        || async { wasm_plugins.get("team").await.unwrap().data["spec"]["pluginConfig"].clone() };
    assert_eq!(plugin_config().await["value"], "blue");
    // Compiled once, into the operator's own cache directory.
    assert!(
        !walk(&op.cache_dir.path().join("modules/compiled")).is_empty(),
        "no compiled module under the operator's --cache-dir"
    );

    // Each bad configuration: refused with the module's own words, an Event, and the
    // WasmPlugin as it was.
    for (config, words) in [
        (
            json!({"value": "no header"}),
            r#"[critical] configuration needs "header""#,
        ),
        (
            json!({"mode": "trap"}),
            "[error] panic: configured to panic",
        ),
        (
            json!({"mode": "loop"}),
            "did not return within the pre-flight's 1500 ms",
        ),
    ] {
        filter(config.clone()).apply();
        let wf: WasmFilter = wait_status(&client, n, "team", "pre-flight failure", |wf| {
            condition(wf, "Ready").is_some_and(|c| c.reason == "PreflightFailed")
        })
        .await;
        let ready = condition(&wf, "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert!(ready.message.contains(words), "{config}: {}", ready.message);
        assert!(
            ready.message.contains("proxy_on_configure"),
            "{}",
            ready.message
        );
        assert_eq!(plugin_config().await["value"], "blue", "{config}");
    }
    // A timeout is not the module's verdict: it is run again, with backoff.
    let after_loop = op.metric(failed).await;
    wait_for(
        "the looping module run again",
        Duration::from_secs(90),
        || async { (op.metric(failed).await > after_loop).then_some(()) },
    )
    .await;
    let events = warning_events(n, "team");
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "PreflightFailed"
                && note.contains("configuration needs")),
        "{events:?}"
    );
    // Fixed: deployed.
    filter(json!({"header": "x-team", "value": "green"})).apply();
    wait_condition(&client, n, "team", "Ready", "True").await;
    assert_eq!(plugin_config().await["value"], "green");
    // A configuration that failed is not run again while it stays: one run each for the
    // refusal and the trap, one or more for the loop; the good ones once each.
    let (refused_and_trapped, good) = (2.0, 2.0);
    assert!(op.metric(failed).await >= refused_and_trapped + 2.0);
    assert_eq!(op.metric(passed).await, good);
    filter(json!({"value": "no header"})).apply();
    wait_status(&client, n, "team", "refused again", |wf| {
        condition(wf, "Ready").is_some_and(|c| c.reason == "PreflightFailed")
    })
    .await;
    let failures = op.metric(failed).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op.metric(failed).await,
        failures,
        "remembered, not run again"
    );

    // What passed is recorded in the filter's status: a restarted operator does not run it
    // again.
    filter(json!({"header": "x-team", "value": "green"})).apply();
    let wf = wait_condition(&client, n, "team", "Ready", "True").await;
    let recorded = wf.status.unwrap().artifact.unwrap().preflight_passed;
    assert!(recorded.is_some_and(|r| r.len() == 64));
    drop(op);
    let op = Operator::start(n, &[]).await;
    wait_for(
        "the restarted operator's reconcile",
        Duration::from_secs(60),
        || async { (op.metric("wasmfilter_reconciles_total").await >= 1.0).then_some(()) },
    )
    .await;
    wait_condition(&client, n, "team", "Ready", "True").await;
    assert_eq!(op.metric("wasmfilter_preflight_runs_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_preflight_off_the_module_goes_out_unrun() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("preflight-off");
    let n = &ns.name;
    let _op = Operator::start(n, &["--preflight=false"]).await;
    let image = format!("{}/preflight/{n}:1", env.registry);
    push_module(&image, std::fs::read(built_module(GO)).unwrap()).await;
    Filter::new(n, "team", &image)
        .config(json!({"mode": "trap"}))
        .apply();
    wait_condition(&client, n, "team", "Ready", "True").await;
    let wp = child_api(&client, n, "WasmPlugin")
        .get("team")
        .await
        .unwrap();
    assert_eq!(wp.data["spec"]["pluginConfig"]["mode"], "trap");
}
