//! What the GitOps tests share: Flux's reading of an object's status (the real kstatus
//! library, `e2e/tools/kstatus`) and Argo CD's (the shipped health check, run by a real Lua
//! 5.1 interpreter).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::*;

pub const HEALTH_LUA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/gitops/argocd/health.lua");

/// JSON as a Lua table constructor.
pub fn lua(v: &Value) -> String {
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
pub fn lua_string(s: &str) -> String {
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
pub fn argocd_health(obj: &Value) -> (String, String) {
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
pub fn kstatus(obj: &Value) -> (String, String) {
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
