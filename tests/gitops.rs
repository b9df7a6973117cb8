//! GitOps tools read WasmFilter status right: the real kstatus library (what Flux's health
//! checks use; `e2e/tools/kstatus`) and the shipped Argo CD health check run by a real Lua 5.1
//! interpreter (Argo CD runs gopher-lua, Lua 5.1), on real objects the operator wrote: Ready,
//! failed for good, retrying, and just taken up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const HEALTH_LUA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/gitops/argocd/health.lua");

/// JSON as a Lua table constructor.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A Lua 5.1 string literal: printable ASCII as is, the rest as decimal byte escapes.
fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => out.push_str(&format!("\\{}", b as char)),
            b' '..=b'~' => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// What the Argo CD health check says of `obj`: (status, message).
fn argocd_health(obj: &Value) -> (String, String) {
    let script = format!(
        "obj = {}\nlocal hs = dofile({HEALTH_LUA:?})\nio.write(hs.status, \"\\t\", hs.message or \"\")\n",
        lua(obj)
    );
    let out = Command::new("lua5.1")
        .args(["-e", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "lua5.1: {}", stderr(&out));
    let text = stdout(&out);
    let (s, m) = text.split_once('\t').unwrap();
    (s.to_string(), m.to_string())
}

/// What kstatus computes for `obj`: (status, message).
fn kstatus(obj: &Value) -> (String, String) {
    let bin = std::env::var("WASMFILTER_KSTATUS").expect("WASMFILTER_KSTATUS (set by e2e/env.sh)");
    let mut child = Command::new(bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{obj}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kstatus: {}", stderr(&out));
    let text = stdout(&out);
    let (s, m) = text.trim_end().split_once('\t').unwrap();
    (s.to_string(), m.to_string())
}

fn get(ns: &str, name: &str) -> Value {
    serde_json::from_slice(&kubectl(&["get", "wf", name, "-n", ns, "-o", "json"]).stdout).unwrap()
}

fn condition_of(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test]
async fn flux_kstatus_and_the_argocd_health_check_read_every_state_right() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("gitops");
    let n = ns.name.as_str();
    // A pull that stays in flight.
    let silent = SilentRegistry::start().await;
    let silent_addr = silent.addr.clone();
    let _op = Operator::start(
        n,
        &[
            "--insecure-registry",
            &silent_addr,
            "--registry-timeout-seconds",
            "300",
        ],
    )
    .await;
    let image = format!("{}/gitops/{n}:v1", env.registry);
    push_module(&image, module(&format!("gitops-{n}"))).await;
    let down = format!("127.0.0.1:{}/gitops/down:v1", free_port());
    let cases = [
        ("ready", image.clone()),
        ("stalled", image.replace(":v1", ":never-pushed")),
        ("retrying", down),
        ("taken-up", format!("{silent_addr}/gitops/slow:v1")),
    ];
    for (name, image) in &cases {
        Filter::new(n, name, image)
            .config(json!({"greeting": "hello"}))
            .apply();
    }
    wait_condition(&client, n, "ready", "Ready", "True").await;
    let states = wait_for("every state reported", Duration::from_secs(60), || async {
        let objs: Vec<Value> = cases.iter().map(|(name, _)| get(n, name)).collect();
        let has =
            |i: usize, t: &str| condition_of(&objs[i], t).is_some_and(|c| c["status"] == "True");
        (has(0, "Ready") && has(1, "Stalled") && has(2, "Reconciling") && has(3, "Reconciling"))
            .then_some(objs)
    })
    .await;

    let expected = [
        ("ready", "Current", "Healthy"),
        ("stalled", "Failed", "Degraded"),
        ("retrying", "InProgress", "Progressing"),
        ("taken-up", "InProgress", "Progressing"),
    ];
    for (obj, (name, flux, argo)) in states.iter().zip(expected) {
        let (k, k_message) = kstatus(obj);
        assert_eq!(k, flux, "{name}: kstatus says {k} ({k_message})\n{obj:#}");
        let (a, a_message) = argocd_health(obj);
        assert_eq!(a, argo, "{name}: Argo CD says {a} ({a_message})\n{obj:#}");
    }
    let (_, message) = argocd_health(&states[1]);
    assert!(message.starts_with("ManifestNotFound: "), "{message}");
    let (_, message) = kstatus(&states[1]);
    assert!(message.contains("not found"), "{message}");

    // A spec change not yet acted on is in progress for both, whatever the old Ready said.
    let mut newer = states[0].clone();
    newer["metadata"]["generation"] =
        (newer["metadata"]["generation"].as_i64().unwrap() + 1).into();
    assert_eq!(kstatus(&newer).0, "InProgress");
    assert_eq!(argocd_health(&newer).0, "Progressing");
    // So is an object the operator has not written at all yet.
    let mut bare = states[0].clone();
    bare.as_object_mut().unwrap().remove("status");
    assert_eq!(argocd_health(&bare).0, "Progressing");
}
