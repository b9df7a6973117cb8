//! What the ECDS tests share: module variants, an operator serving ECDS, Envoy nodes, status
//! look-ups.

use super::*;
use wasmfilter::api::{WasmFilter, WorkloadStatus};

/// The add-header filter answering `x-wasmfilter: <value>` (two characters), made unique.
pub fn variant(value: &str, marker: &str) -> String {
    assert_eq!(value.len(), 2);
    let src = include_str!("../fixtures/modules/add_header.wat").replace(
        r#"(data (i32.const 64) "on")"#,
        &format!(r#"(data (i32.const 64) "{value}")"#),
    );
    let end = src.rfind(')').unwrap();
    format!("{}  (data (i32.const 512) \"{marker}\")\n)\n", &src[..end])
}

pub fn wasm(src: &str) -> Vec<u8> {
    wat::parse_str(src).unwrap()
}

/// `variant` whose `proxy_on_configure` returns false: Envoy cannot create the plugin.
pub fn configure_fails(marker: &str) -> Vec<u8> {
    let src = variant("on", marker);
    let start = src.find(r#"(func (export "proxy_on_configure")"#).unwrap();
    let end = src[start..]
        .find(r#"(func (export "proxy_on_request_headers")"#)
        .unwrap()
        + start;
    let body = src[start..end].replace("(i32.const 1))", "(i32.const 0))");
    wasm(&format!("{}{body}{}", &src[..start], &src[end..]))
}

/// `variant` importing `fd_pread`, which Envoy 1.39 added: 1.36 refuses it, 1.40 loads it.
pub fn needs_1_39(value: &str, marker: &str) -> Vec<u8> {
    wasm(&variant(value, marker).replacen(
        "(module",
        "(module\n  (import \"wasi_snapshot_preview1\" \"fd_pread\" (func (param i32 i32 i32 i64 i32) (result i32)))",
        1,
    ))
}

/// The add-header filter served over ECDS, answering `greeting`.
pub fn ecds_filter(ns: &str, name: &str, image: &str, greeting: &str) -> Filter {
    Filter::new(ns, name, image)
        .target(Target::Ecds)
        .config(json!({"greeting": greeting}))
}

/// An operator serving ECDS on its own port; returns it and the port.
pub async fn operator(ns: &str) -> (Operator, u16) {
    operator_with(ns, &[]).await
}

pub async fn operator_with(ns: &str, extra: &[&str]) -> (Operator, u16) {
    let xds = free_port();
    let listen = format!("127.0.0.1:{xds}");
    let args: Vec<&str> = ["--xds-listen", listen.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    (Operator::start(ns, &args).await, xds)
}

pub fn node<'a>(
    ns: &'a str,
    pod: &'a str,
    filters: &'a [String],
    delta: bool,
    xds_port: u16,
) -> EcdsNode<'a> {
    EcdsNode {
        namespace: ns,
        pod,
        filters,
        delta,
        metadata: true,
        xds_port,
        tls_ca: None,
        default_module: None,
        network_filter: None,
    }
}

pub fn workload<'a>(wf: &'a WasmFilter, pod: &str) -> Option<&'a WorkloadStatus> {
    wf.status.as_ref()?.workloads.iter().find(|w| w.name == pod)
}

pub fn cond_is(wf: &WasmFilter, type_: &str, status: &str, reason: &str) -> bool {
    condition(wf, type_).is_some_and(|c| c.status == status && c.reason == reason)
}
