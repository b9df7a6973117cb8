//! What an Istio proxy shows about a filter, read from the metrics its istio-agent serves on the
//! pod's status port (`/stats/prometheus`: the agent's own metrics merged with Envoy's). An ACK
//! proves nothing here (when the agent cannot fetch a module it hands Envoy an allow-all or
//! deny-all stand-in, which Envoy accepts), so the signals are:
//!
//! - Envoy's `wasm.<plugin>.*` stats (exported by Istio's default stats matcher): they exist
//!   while a Wasm plugin of that name runs in the proxy, and go when it is replaced by the
//!   stand-in;
//! - the filter's own `extension_config_discovery.*.update_rejected` counter, when the pod's
//!   stats matcher includes `extension_config_discovery` (Envoy refused the config: the module
//!   would not start);
//! - the agent's `istio_agent_wasm_remote_fetch_count` by result (failed downloads).
//!
//! An `EnvoyFilter` is different ([`read_envoy_filter`]): Envoy fetches the module itself and
//! keeps the filter's `wasm.<plugin>.*` stats whether or not the module was fetched or started
//! (measured with Envoy 1.39.3: a good module, one it cannot fetch and one whose configure
//! fails all show them), so only proxy-wide figures speak: how many Wasm VMs run
//! (`wasm.wasm_vm_count`) and whether a listener still waits for a fetch
//! (`listener_manager.total_listeners_warming`), both in Istio's default stats.

use std::time::Duration;

/// Pod annotation with the istio-agent's status port (Istio's own; 15020 when absent).
pub const ANNOTATION_STATUS_PORT: &str = "status.sidecar.istio.io/port";
pub const DEFAULT_STATUS_PORT: u16 = 15020;

/// What a proxy's metrics say about one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyLoad {
    /// A Wasm plugin for the filter runs in the proxy.
    Running,
    /// None runs, and the proxy says why.
    Refused(String),
    /// None runs yet, and nothing says it failed.
    NotYet,
    /// The proxy's metrics cannot say (an `EnvoyFilter`'s plugin beside other Wasm plugins).
    Undecided,
}

/// The name of the filter's Wasm plugin in the proxy: Istio's for a `WasmPlugin`
/// (`translated: true`, also its ECDS resource's), and for a `TrafficExtension` or the
/// operator's own `EnvoyFilter` (`translated: false`) the `<namespace>.<name>` they carry.
pub fn plugin_name(namespace: &str, name: &str, translated: bool) -> String {
    if translated {
        format!("{namespace}.{name}~istio-translated-wasmplugin")
    } else {
        format!("{namespace}.{name}")
    }
}

/// A stat name as Envoy's Prometheus output writes it: every character outside
/// `[a-zA-Z0-9_]` becomes `_`.
fn prometheus(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Every sample of `metric` (that exact name, any labels) in `text`: its labels and value.
fn samples<'a>(text: &'a str, metric: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once('}')?;
                    (labels, value)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// Whether the plugin `plugin` has its `wasm.<plugin>.*` stats in `text`.
fn has_plugin_stats(text: &str, plugin: &str) -> bool {
    !samples(
        text,
        &format!("envoy_wasm_{}_vm_reload", prometheus(plugin)),
    )
    .is_empty()
}

/// The sum of every sample of `metric` in `text` (0 when there is none).
fn total(text: &str, metric: &str) -> f64 {
    samples(text, metric).iter().map(|(_, v)| v).sum()
}

/// Reads what `text` (a proxy's merged Prometheus metrics) says about the plugin `plugin` of a
/// `WasmPlugin` or `TrafficExtension`, which the proxy gets over ECDS from the istio-agent.
pub fn read(text: &str, plugin: &str) -> ProxyLoad {
    if has_plugin_stats(text, plugin) {
        return ProxyLoad::Running;
    }
    let ecds = prometheus(&format!("extensions.istio.io/trafficextension/{plugin}"));
    let rejected: f64 = ["http_filter", "network_filter"]
        .iter()
        .flat_map(|kind| {
            samples(
                text,
                &format!("envoy_extension_config_discovery_{kind}_{ecds}_update_rejected"),
            )
        })
        .map(|(_, v)| v)
        .sum();
    if rejected > 0.0 {
        return ProxyLoad::Refused(format!(
            "no Wasm plugin for this filter runs in the proxy: Envoy refused its config \
             {rejected} time(s) (the module did not start; the proxy's log says why)"
        ));
    }
    let failed: Vec<String> = samples(text, "istio_agent_wasm_remote_fetch_count")
        .into_iter()
        .filter_map(|(labels, v)| {
            let result = labels
                .split(',')
                .find_map(|l| l.strip_prefix("result=\""))?
                .trim_end_matches('"');
            (result != "success" && v > 0.0).then(|| format!("{result} {v}"))
        })
        .collect();
    if failed.is_empty() {
        ProxyLoad::NotYet
    } else {
        ProxyLoad::Refused(format!(
            "no Wasm plugin for this filter runs in the proxy, and its istio-agent reports \
             failed module fetches ({}): it runs the agent's allow-all or deny-all stand-in",
            failed.join(", ")
        ))
    }
}

/// Reads what `text` says about the plugin `plugin` of the operator's `EnvoyFilter`: a Wasm
/// filter in the proxy's listeners whose module Envoy fetches itself. Its plugin's stats exist
/// once the listener has it, fetched or not, so:
/// - no Wasm VM runs in the proxy: nothing of it runs, and once no listener waits for a fetch
///   any more it never will ([`ProxyLoad::Refused`]; before that, [`ProxyLoad::NotYet`]);
/// - VMs run and this is the proxy's only Wasm plugin: they are its ([`ProxyLoad::Running`]);
/// - VMs run and other plugins are there too: they may be the others' ([`ProxyLoad::Undecided`]).
pub fn read_envoy_filter(text: &str, plugin: &str) -> ProxyLoad {
    if !has_plugin_stats(text, plugin) {
        return ProxyLoad::NotYet;
    }
    if total(text, "envoy_wasm_wasm_vm_count") > 0.0 {
        let plugins = text
            .lines()
            .filter_map(|l| l.split(['{', ' ']).next())
            .filter(|m| m.starts_with("envoy_wasm_") && m.ends_with("_vm_reload"))
            .collect::<std::collections::HashSet<_>>()
            .len();
        return if plugins == 1 {
            ProxyLoad::Running
        } else {
            ProxyLoad::Undecided
        };
    }
    if total(text, "envoy_listener_manager_total_listeners_warming") > 0.0 {
        return ProxyLoad::NotYet;
    }
    let failures = match total(text, "envoy_wasm_remote_load_fetch_failures") {
        n if n > 0.0 => format!(", and Envoy counts {n} failed module fetch(es)"),
        _ => String::new(),
    };
    ProxyLoad::Refused(format!(
        "the filter is in the proxy's listeners but no Wasm VM runs in the proxy: its module \
         was not fetched or did not start{failures} (the proxy's log says why)"
    ))
}

/// One HTTP client for every proxy's metrics (plain HTTP, no proxy from the environment).
fn client() -> Option<&'static reqwest::Client> {
    static CLIENT: std::sync::OnceLock<Option<reqwest::Client>> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| reqwest::Client::builder().no_proxy().build().ok())
        .as_ref()
}

/// The proxy's merged metrics, or `None` when they cannot be read within `timeout`.
pub async fn scrape(ip: &str, port: u16, timeout: Duration) -> Option<String> {
    let client = client()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let response = client
        .get(format!("http://{host}:{port}/stats/prometheus"))
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = "shop.add-header~istio-translated-wasmplugin";

    #[test]
    fn a_running_plugin_shows_as_its_stats() {
        let text = "# TYPE envoy_wasm_shop_add_header_istio_translated_wasmplugin_vm_reload counter\n\
                    envoy_wasm_shop_add_header_istio_translated_wasmplugin_vm_reload{} 0\n\
                    istio_agent_wasm_remote_fetch_count{result=\"download_failure\"} 1\n";
        assert_eq!(read(text, PLUGIN), ProxyLoad::Running);
        // Another filter's plugin is not this one.
        let ProxyLoad::Refused(why) = read(text, "shop.other~istio-translated-wasmplugin") else {
            panic!()
        };
        assert!(why.contains("download_failure 1"), "{why}");
    }

    #[test]
    fn a_refused_config_and_failed_fetches_are_said_otherwise_it_is_not_yet() {
        let rejected = "envoy_extension_config_discovery_http_filter_extensions_istio_io_trafficextension_shop_add_header_istio_translated_wasmplugin_update_rejected{} 2\n";
        let ProxyLoad::Refused(why) = read(rejected, PLUGIN) else {
            panic!()
        };
        assert!(why.contains("Envoy refused its config 2 time(s)"), "{why}");
        let fetched = "istio_agent_wasm_remote_fetch_count{result=\"success\"} 3\n";
        assert_eq!(read(fetched, PLUGIN), ProxyLoad::NotYet);
        assert_eq!(read("", PLUGIN), ProxyLoad::NotYet);
        // A metric whose name only starts like ours is not ours.
        let longer = "envoy_wasm_shop_add_header_istio_translated_wasmplugin_vm_reload_x{} 0\n";
        assert_eq!(read(longer, PLUGIN), ProxyLoad::NotYet);
    }

    #[test]
    fn names_follow_istio() {
        assert_eq!(
            plugin_name("shop", "hdr", true),
            "shop.hdr~istio-translated-wasmplugin"
        );
        assert_eq!(plugin_name("shop", "hdr", false), "shop.hdr");
    }

    /// Metrics as Envoy 1.39.3 behind the istio-agent showed them for an EnvoyFilter's plugin.
    fn envoy_filter_metrics(plugins: &[&str], vms: u32, warming: u32, failures: u32) -> String {
        let mut text = String::new();
        for p in plugins {
            let p = prometheus(p);
            text += &format!(
                "# TYPE envoy_wasm_{p}_vm_reload counter\nenvoy_wasm_{p}_vm_reload{{}} 0\n\
                 envoy_wasm_{p}_vm_reload_failure{{}} 0\n"
            );
        }
        text += &format!(
            "envoy_wasm_remote_load_fetch_failures{{}} {failures}\n\
             envoy_listener_manager_total_listeners_warming{{}} {warming}\n\
             envoy_wasm_envoy_wasm_runtime_v8_created{{}} 4\n"
        );
        if vms > 0 {
            text += &format!("envoy_wasm_wasm_vm_count{{}} {vms}\n");
        }
        text
    }

    #[test]
    fn an_envoy_filters_plugin_is_judged_by_the_proxys_wasm_vms() {
        let read = read_envoy_filter;
        // Not in the listeners yet.
        assert_eq!(
            read(&envoy_filter_metrics(&[], 0, 0, 0), "shop.hdr"),
            ProxyLoad::NotYet
        );
        // The only plugin, VMs running: it runs.
        let alone = envoy_filter_metrics(&["shop.hdr"], 3, 0, 0);
        assert_eq!(read(&alone, "shop.hdr"), ProxyLoad::Running);
        // Beside another plugin, the VMs may be the other's.
        let two = envoy_filter_metrics(
            &["shop.hdr", "shop.other~istio-translated-wasmplugin"],
            3,
            0,
            0,
        );
        assert_eq!(read(&two, "shop.hdr"), ProxyLoad::Undecided);
        // No VM: still fetching while a listener warms, then failed.
        let warming = envoy_filter_metrics(&["shop.hdr"], 0, 1, 0);
        assert_eq!(read(&warming, "shop.hdr"), ProxyLoad::NotYet);
        let ProxyLoad::Refused(why) = read(
            &envoy_filter_metrics(&["shop.hdr", "shop.x"], 0, 0, 1),
            "shop.hdr",
        ) else {
            panic!()
        };
        assert!(
            why.contains("no Wasm VM runs") && why.contains("1 failed module fetch"),
            "{why}"
        );
        let ProxyLoad::Refused(why) =
            read(&envoy_filter_metrics(&["shop.hdr"], 0, 0, 0), "shop.hdr")
        else {
            panic!()
        };
        assert!(!why.contains("fetch(es)"), "{why}");
    }
}
