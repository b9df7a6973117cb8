//! Pure rendering for plain Envoys: `WasmFilter` + verified module bytes → the
//! `TypedExtensionConfig` the ECDS server sends, and the `http_filters` / network `filters`
//! entry a bootstrap needs to subscribe to it. No client, no I/O.
//!
//! The module travels inline (`vm_config.code.local.inline_bytes`): Envoy then builds the VM
//! and runs `proxy_on_configure` while it applies the config, before it answers, so its ACK
//! means the plugin loaded and a failure is a NACK carrying Envoy's own error. A bootstrap
//! needs one cluster (the xDS one) and nothing else.

use envoy_types::pb::envoy::config::core::v3::{
    AsyncDataSource, DataSource, TypedExtensionConfig, async_data_source, data_source,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    FailurePolicy as PbFailurePolicy, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::google::protobuf::{Any, StringValue};
use prost::Message;
use serde_json::{Value, json};

use crate::api::{FailurePolicy, FilterType, WasmFilterSpec};

/// What every ECDS response carries.
pub const TYPED_EXTENSION_CONFIG_URL: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const HTTP_WASM_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NETWORK_WASM_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
const STRING_VALUE_URL: &str = "type.googleapis.com/google.protobuf.StringValue";
const V8: &str = "envoy.wasm.runtime.v8";

/// The ECDS resource name of a filter: `<namespace>/<name>`, the name a bootstrap's
/// `config_discovery` entry subscribes to.
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The Wasm type URL a slot for this filter type accepts.
pub fn wasm_type_url(filter_type: FilterType) -> &'static str {
    match filter_type {
        FilterType::Http => HTTP_WASM_URL,
        FilterType::Network => NETWORK_WASM_URL,
    }
}

/// How an Envoy version spells the failure policy: `failure_policy` from 1.33 on, the older
/// `fail_open` before (setting both is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyField {
    FailurePolicy,
    FailOpen,
}

impl PolicyField {
    /// For an Envoy `major.minor[.patch]`; an unknown version gets the current field.
    pub fn for_envoy(version: Option<&str>) -> Self {
        let minor = version.and_then(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        });
        match minor {
            Some((major, minor)) if (major, minor) < (1, 33) => PolicyField::FailOpen,
            _ => PolicyField::FailurePolicy,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            PolicyField::FailurePolicy => "fp",
            PolicyField::FailOpen => "fo",
        }
    }
}

/// What identifies the module and every spec field that reaches Envoy: equal inputs give equal
/// versions, so an unchanged filter is never re-sent and an operator restart re-sends nothing
/// new.
pub fn version_base(spec: &WasmFilterSpec, module_sha256: &str) -> String {
    let inputs = json!({
        "module": module_sha256,
        "rootId": spec.root_id,
        "config": spec.config,
        "failurePolicy": spec.failure_policy,
        "type": spec.filter_type,
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, inputs.to_string().as_bytes());
    hex::encode(&digest.as_ref()[..8])
}

/// The version of one rendering: [`version_base`] and the policy spelling.
pub fn version(spec: &WasmFilterSpec, module_sha256: &str, field: PolicyField) -> String {
    format!("{}-{}", version_base(spec, module_sha256), field.tag())
}

/// The `TypedExtensionConfig` named `name` holding the Wasm filter with the module inline,
/// packed in an `Any` as ECDS sends it.
#[allow(deprecated)] // `fail_open` is what Envoys before 1.33 read.
pub fn extension_config(
    name: &str,
    spec: &WasmFilterSpec,
    module: &[u8],
    field: PolicyField,
) -> Any {
    let configuration = spec.config.as_ref().map(|c| Any {
        type_url: STRING_VALUE_URL.to_string(),
        value: StringValue {
            value: Value::Object(c.clone()).to_string(),
        }
        .encode_to_vec(),
    });
    let vm = VmConfig {
        runtime: V8.to_string(),
        code: Some(AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(module.to_vec())),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let mut plugin = PluginConfig {
        name: name.to_string(),
        root_id: spec.root_id.clone().unwrap_or_default(),
        configuration,
        vm: Some(plugin_config::Vm::VmConfig(vm)),
        ..Default::default()
    };
    match field {
        PolicyField::FailurePolicy => {
            plugin.failure_policy = match spec.failure_policy {
                FailurePolicy::FailClosed => PbFailurePolicy::FailClosed,
                FailurePolicy::FailOpen => PbFailurePolicy::FailOpen,
                FailurePolicy::FailReload => PbFailurePolicy::FailReload,
            } as i32;
        }
        // Envoy before 1.33 cannot reload a failed VM; closed is the safe reading.
        PolicyField::FailOpen => plugin.fail_open = spec.failure_policy == FailurePolicy::FailOpen,
    }
    // The HTTP and network Wasm filters wrap the same PluginConfig as field 1.
    let wasm = WasmConfig {
        config: Some(plugin),
    };
    let typed = TypedExtensionConfig {
        name: name.to_string(),
        typed_config: Some(Any {
            type_url: wasm_type_url(spec.filter_type).to_string(),
            value: wasm.encode_to_vec(),
        }),
    };
    Any {
        type_url: TYPED_EXTENSION_CONFIG_URL.to_string(),
        value: typed.encode_to_vec(),
    }
}

/// `envoy.extensions.filters.{http,network}.wasm.v3.Wasm`: both are `{PluginConfig config = 1}`.
#[derive(Clone, PartialEq, Message)]
struct WasmConfig {
    #[prost(message, optional, tag = "1")]
    config: Option<PluginConfig>,
}

/// How an Envoy subscribes: state of the world or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiType {
    Grpc,
    DeltaGrpc,
}

/// The filter-chain entry (an `http_filters` item for HTTP, a network `filters` item for
/// NETWORK) that makes an Envoy subscribe to `wf` over ECDS through the cluster `xds_cluster`.
pub fn filter_entry(
    wf_resource_name: &str,
    filter_type: FilterType,
    xds_cluster: &str,
    api: ApiType,
) -> Value {
    json!({
        "name": wf_resource_name,
        "config_discovery": {
            "config_source": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": match api { ApiType::Grpc => "GRPC", ApiType::DeltaGrpc => "DELTA_GRPC" },
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": xds_cluster}}],
                },
            },
            "type_urls": [wasm_type_url(filter_type)],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;

    fn spec(yaml: &str) -> WasmFilterSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    fn decode(any: &Any) -> (TypedExtensionConfig, PluginConfig) {
        assert_eq!(any.type_url, TYPED_EXTENSION_CONFIG_URL);
        let typed = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        let inner = typed.typed_config.clone().unwrap();
        let wasm = WasmConfig::decode(inner.value.as_slice()).unwrap();
        (typed, wasm.config.unwrap())
    }

    #[test]
    #[allow(deprecated)]
    fn the_module_goes_inline_with_root_id_config_and_policy() {
        let s = spec(
            "module: {image: r/f:1}\nselector: {matchLabels: {a: b}}\nrootId: add_header\n\
             config: {greeting: hello}\nfailurePolicy: FailOpen\n",
        );
        let any = extension_config("shop/f", &s, b"\0asm-bytes", PolicyField::FailurePolicy);
        let (typed, plugin) = decode(&any);
        assert_eq!(typed.name, "shop/f");
        assert_eq!(typed.typed_config.unwrap().type_url, HTTP_WASM_URL);
        assert_eq!(plugin.root_id, "add_header");
        assert_eq!(plugin.failure_policy, PbFailurePolicy::FailOpen as i32);
        assert!(!plugin.fail_open, "never both fields");
        let conf = StringValue::decode(plugin.configuration.unwrap().value.as_slice()).unwrap();
        assert_eq!(conf.value, r#"{"greeting":"hello"}"#);
        let Some(Vm::VmConfig(vm)) = plugin.vm else {
            panic!("no vm config")
        };
        assert_eq!(vm.runtime, V8);
        let code = vm.code.unwrap().specifier.unwrap();
        let async_data_source::Specifier::Local(local) = code else {
            panic!("not local")
        };
        assert_eq!(
            local.specifier,
            Some(data_source::Specifier::InlineBytes(b"\0asm-bytes".to_vec()))
        );
    }

    #[test]
    #[allow(deprecated)]
    fn envoys_before_1_33_get_fail_open_and_never_both() {
        assert_eq!(
            PolicyField::for_envoy(Some("1.32.9")),
            PolicyField::FailOpen
        );
        assert_eq!(
            PolicyField::for_envoy(Some("1.33.0")),
            PolicyField::FailurePolicy
        );
        assert_eq!(
            PolicyField::for_envoy(Some("1.40")),
            PolicyField::FailurePolicy
        );
        assert_eq!(PolicyField::for_envoy(None), PolicyField::FailurePolicy);
        for (policy, open) in [
            ("FailOpen", true),
            ("FailClosed", false),
            ("FailReload", false),
        ] {
            let s = spec(&format!(
                "module: {{image: r/f:1}}\nselector: {{matchLabels: {{a: b}}}}\nfailurePolicy: {policy}\n"
            ));
            let (_, plugin) = decode(&extension_config("n/f", &s, b"m", PolicyField::FailOpen));
            assert_eq!(plugin.fail_open, open, "{policy}");
            assert_eq!(
                plugin.failure_policy, 0,
                "{policy}: failure_policy left unset"
            );
        }
    }

    #[test]
    fn network_filters_use_the_network_type_url() {
        let s = spec("module: {image: r/f:1}\nselector: {matchLabels: {a: b}}\ntype: NETWORK\n");
        let (typed, _) = decode(&extension_config(
            "n/f",
            &s,
            b"m",
            PolicyField::FailurePolicy,
        ));
        assert_eq!(typed.typed_config.unwrap().type_url, NETWORK_WASM_URL);
        let entry = filter_entry("n/f", FilterType::Network, "xds", ApiType::DeltaGrpc);
        assert_eq!(entry["config_discovery"]["type_urls"][0], NETWORK_WASM_URL);
        assert_eq!(
            entry["config_discovery"]["config_source"]["api_config_source"]["api_type"],
            "DELTA_GRPC"
        );
    }

    #[test]
    fn the_version_moves_with_every_input_that_reaches_envoy() {
        let base =
            spec("module: {image: r/f:1}\nselector: {matchLabels: {a: b}}\nconfig: {x: 1}\n");
        let v = version(&base, "aa", PolicyField::FailurePolicy);
        assert_eq!(v, version(&base, "aa", PolicyField::FailurePolicy));
        // The selector and the image reference do not reach Envoy; the module's bytes do.
        let moved =
            spec("module: {image: r/g:2}\nselector: {matchLabels: {c: d}}\nconfig: {x: 1}\n");
        assert_eq!(v, version(&moved, "aa", PolicyField::FailurePolicy));
        assert_ne!(v, version(&base, "bb", PolicyField::FailurePolicy));
        assert_ne!(v, version(&base, "aa", PolicyField::FailOpen));
        let config =
            spec("module: {image: r/f:1}\nselector: {matchLabels: {a: b}}\nconfig: {x: 2}\n");
        assert_ne!(v, version(&config, "aa", PolicyField::FailurePolicy));
    }
}
