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
}

/// The name Istio gives the filter's Wasm plugin and ECDS resource, for a `WasmPlugin`
/// (`traffic_extension: false`) or a `TrafficExtension`.
pub fn plugin_name(namespace: &str, name: &str, traffic_extension: bool) -> String {
    if traffic_extension {
        format!("{namespace}.{name}")
    } else {
        format!("{namespace}.{name}~istio-translated-wasmplugin")
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

/// Reads what `text` (a proxy's merged Prometheus metrics) says about the plugin `plugin`.
pub fn read(text: &str, plugin: &str) -> ProxyLoad {
    let p = prometheus(plugin);
    if !samples(text, &format!("envoy_wasm_{p}_vm_reload")).is_empty() {
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
            plugin_name("shop", "hdr", false),
            "shop.hdr~istio-translated-wasmplugin"
        );
        assert_eq!(plugin_name("shop", "hdr", true), "shop.hdr");
    }
}
