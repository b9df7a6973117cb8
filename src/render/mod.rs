//! Pure rendering: `WasmFilter` + verified artifact → the Istio object that deploys it.
//! No client here; every function takes values and returns values.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::{FailurePolicy, FilterType, Phase, Target, TrafficMode, WasmFilter};
use crate::error::Retry;
use crate::names::{self, istio};

pub mod ecds;

/// What cannot be rendered: a target this operator does not produce (or, for ECDS, does not
/// serve as started).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field} is not supported by this version of the operator yet: {detail}")]
    Unsupported { field: &'static str, detail: String },
}

impl Error {
    /// Stable, CamelCase reason (condition, Event, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Unsupported { .. } => "Unsupported",
        }
    }

    /// Nothing changes until the spec (or the operator's flags) do.
    pub fn retry(&self) -> Retry {
        Retry::Invalid
    }
}

/// What the operator found installed when it started, which decides what some targets mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// Istio's `TrafficExtension` CRD (Istio 1.30+).
    pub traffic_extension: bool,
}

/// The kind of child `target` means here: `Auto` is a TrafficExtension where its CRD is
/// installed, else a WasmPlugin; every other target is itself.
pub fn resolve_target(target: Target, installed: Installed) -> Target {
    match target {
        Target::Auto if installed.traffic_extension => Target::TrafficExtension,
        Target::Auto => Target::WasmPlugin,
        t => t,
    }
}

/// Refuses, before any network work, a target this operator cannot serve as started.
pub fn check_supported(
    target: Target,
    serves_ecds: bool,
    installed: Installed,
) -> Result<(), Error> {
    if target == Target::Ecds && !serves_ecds {
        return Err(Error::Unsupported {
            field: "spec.target: Ecds",
            detail: "this operator serves no ECDS: start it with --xds-listen ADDR, or use \
                     WasmPlugin or EnvoyFilter"
                .into(),
        });
    }
    if target == Target::TrafficExtension && !installed.traffic_extension {
        return Err(Error::Unsupported {
            field: "spec.target: TrafficExtension",
            detail: format!(
                "the {} CRD (Istio 1.30 or later) was not installed when the operator \
                 started: use WasmPlugin or Auto, or restart the operator after installing it",
                istio::TRAFFIC_EXTENSION_CRD
            ),
        });
    }
    Ok(())
}

/// Where proxies fetch modules from: the operator's cache service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleServer {
    /// Base URL proxies use, e.g. `http://wasmfilter-cache.wasmfilter-system.svc:8080`.
    pub base_url: String,
    /// The Envoy cluster that reaches `base_url`: Istio names a Service's outbound cluster
    /// `outbound|PORT||<name>.<namespace>.svc.cluster.local`, whatever form the URL uses.
    pub cluster: String,
}

impl ModuleServer {
    /// A server at `base_url`, with the cluster name Istio gives that service.
    pub fn new(base_url: &str) -> Self {
        let base_url = base_url.trim_end_matches('/').to_string();
        let authority = base_url
            .split_once("://")
            .map_or(base_url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.to_string()),
            _ if base_url.starts_with("https://") => (authority.to_string(), "443".to_string()),
            _ => (authority.to_string(), "80".to_string()),
        };
        // Istio's cluster names use the Service's full host name: a URL written with the
        // usual `<name>.<namespace>.svc` form names a cluster that does not exist otherwise
        // (Envoy then retries the fetch forever). Other hosts are kept as written
        // (`--cache-cluster` sets any name).
        let host = match host.strip_suffix('.') {
            Some(h) => h.to_string(),
            None => host,
        };
        let host = if host.ends_with(".svc") {
            format!("{host}.cluster.local")
        } else {
            host
        };
        ModuleServer {
            cluster: format!("outbound|{port}||{host}"),
            base_url,
        }
    }

    pub fn module_url(&self, sha256: &str) -> String {
        format!("{}/modules/sha256/{sha256}.wasm", self.base_url)
    }
}

/// The module a child points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub sha256: String,
}

/// A rendered child and what the user should know about how the spec was mapped onto it.
#[derive(Debug, Clone)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
    /// Parts of the spec this target cannot express, said plainly for the `Deployed` condition.
    pub notes: Vec<String>,
}

pub fn wasm_plugin_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            istio::EXTENSIONS_GROUP,
            istio::WASM_PLUGIN_VERSION,
            istio::WASM_PLUGIN,
        ),
        istio::WASM_PLUGIN_PLURAL,
    )
}

pub fn traffic_extension_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            istio::EXTENSIONS_GROUP,
            istio::TRAFFIC_EXTENSION_VERSION,
            istio::TRAFFIC_EXTENSION,
        ),
        istio::TRAFFIC_EXTENSION_PLURAL,
    )
}

pub fn envoy_filter_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            istio::NETWORKING_GROUP,
            istio::ENVOY_FILTER_VERSION,
            istio::ENVOY_FILTER,
        ),
        istio::ENVOY_FILTER_PLURAL,
    )
}

/// Renders the Istio child for the filter's target (`Ecds` has none: it is served by the
/// operator itself, see [`ecds`]).
/// The child for `target`, the filter's target as [`resolve_target`] resolved it.
pub fn child(
    wf: &WasmFilter,
    target: Target,
    module: &Module,
    server: &ModuleServer,
) -> Result<Child, Error> {
    match target {
        Target::EnvoyFilter => Ok(envoy_filter(wf, module, server)),
        Target::WasmPlugin => Ok(wasm_plugin(wf, module, server)),
        Target::TrafficExtension => Ok(traffic_extension(wf, module, server)),
        Target::Auto => Err(Error::Unsupported {
            field: "spec.target: Auto",
            detail: "Auto is resolved to WasmPlugin or TrafficExtension before rendering".into(),
        }),
        Target::Ecds => Err(Error::Unsupported {
            field: "spec.target: Ecds",
            detail: "an ECDS filter has no Istio child".into(),
        }),
    }
}

fn metadata(wf: &WasmFilter, module: &Module) -> ObjectMeta {
    ObjectMeta {
        name: Some(wf.name_any()),
        namespace: wf.namespace(),
        labels: Some(
            [
                (names::LABEL_FILTER.to_string(), wf.name_any()),
                (
                    names::LABEL_MANAGED_BY.to_string(),
                    names::CONTROLLER_NAME.to_string(),
                ),
            ]
            .into(),
        ),
        annotations: Some(
            [(
                names::ANNOTATION_MODULE_SHA256.to_string(),
                module.sha256.clone(),
            )]
            .into(),
        ),
        owner_references: wf.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

fn dynamic(resource: &ApiResource, metadata: ObjectMeta, spec: Value) -> DynamicObject {
    let mut object = DynamicObject::new("", resource).data(json!({ "spec": spec }));
    object.metadata = metadata;
    object
}

/// An Istio `WasmPlugin` whose module is the cache URL pinned by the module's sha256
/// (for `http(s)://` URLs Istio compares `sha256` to the file's hash).
pub fn wasm_plugin(wf: &WasmFilter, module: &Module, server: &ModuleServer) -> Child {
    let mut spec = placement(wf);
    if let (Value::Object(spec), Value::Object(wasm)) = (&mut spec, wasm_config(wf, module, server))
    {
        spec.extend(wasm);
    }
    let resource = wasm_plugin_resource();
    Child {
        object: dynamic(&resource, metadata(wf, module), spec),
        resource,
        notes: Vec::new(),
    }
}

/// An Istio `TrafficExtension` (Istio 1.30+): the WasmPlugin's placement, and its module
/// fields under `wasm`.
pub fn traffic_extension(wf: &WasmFilter, module: &Module, server: &ModuleServer) -> Child {
    let mut spec = placement(wf);
    spec["wasm"] = wasm_config(wf, module, server);
    let resource = traffic_extension_resource();
    Child {
        object: dynamic(&resource, metadata(wf, module), spec),
        resource,
        notes: Vec::new(),
    }
}

/// Which proxies run the plugin, and where in their chain: the fields `WasmPlugin` and
/// `TrafficExtension` share at the top of their spec.
fn placement(wf: &WasmFilter) -> Value {
    let s = &wf.spec;
    let mut spec = json!({"selector": {"matchLabels": s.selector.match_labels}});
    if let Some(phase) = phase(s.phase) {
        spec["phase"] = json!(phase);
    }
    if let Some(priority) = s.priority {
        spec["priority"] = json!(priority);
    }
    if !s.traffic.is_empty() {
        spec["match"] = s
            .traffic
            .iter()
            .map(|m| {
                let mut t = json!({"mode": mode(m.mode)});
                if !m.ports.is_empty() {
                    t["ports"] = m.ports.iter().map(|p| json!({"number": p})).collect();
                }
                t
            })
            .collect();
    }
    spec
}

/// The module and how it runs: `WasmPlugin`'s own fields, `TrafficExtension`'s `wasm`.
fn wasm_config(wf: &WasmFilter, module: &Module, server: &ModuleServer) -> Value {
    let s = &wf.spec;
    let mut spec = json!({
        "url": server.module_url(&module.sha256),
        "sha256": module.sha256,
        // The URL names immutable content; the proxy never needs to fetch it twice.
        "imagePullPolicy": "IfNotPresent",
        "failStrategy": match s.failure_policy {
            FailurePolicy::FailClosed => "FAIL_CLOSE",
            FailurePolicy::FailOpen => "FAIL_OPEN",
            FailurePolicy::FailReload => "FAIL_RELOAD",
        },
        "type": filter_type(s.filter_type),
    });
    if let Some(root_id) = &s.root_id {
        spec["pluginName"] = json!(root_id);
    }
    if let Some(config) = &s.config {
        spec["pluginConfig"] = Value::Object(config.clone());
    }
    spec
}

/// An Istio `EnvoyFilter` inserting the Wasm filter before the router (HTTP) or first in the
/// chain (NETWORK) of every listener the `match` selects.
pub fn envoy_filter(wf: &WasmFilter, module: &Module, server: &ModuleServer) -> Child {
    let s = &wf.spec;
    let mut notes = Vec::new();
    if s.phase != Phase::Unspecified {
        notes.push(format!(
            "phase {:?} is not expressible in an EnvoyFilter without depending on which Istio \
             filters a workload has; the filter is inserted just before the router",
            s.phase
        ));
    }
    let filter = filter_config(wf, module, server);
    let (apply_to, filter_match, operation) = match s.filter_type {
        FilterType::Http => (
            "HTTP_FILTER",
            json!({
                "name": "envoy.filters.network.http_connection_manager",
                "subFilter": {"name": "envoy.filters.http.router"},
            }),
            "INSERT_BEFORE",
        ),
        FilterType::Network => ("NETWORK_FILTER", Value::Null, "INSERT_FIRST"),
    };
    // One patch per (direction, port); an empty match means every listener of the workload.
    let mut selectors: Vec<(TrafficMode, Option<i32>)> = Vec::new();
    for m in &s.traffic {
        if m.ports.is_empty() {
            selectors.push((m.mode, None));
        }
        selectors.extend(m.ports.iter().map(|p| (m.mode, Some(*p))));
    }
    if selectors.is_empty() {
        selectors.push((TrafficMode::ClientAndServer, None));
    }
    let patches: Vec<Value> = selectors
        .into_iter()
        .map(|(m, port)| {
            let mut listener = json!({});
            if !filter_match.is_null() {
                listener["filterChain"] = json!({"filter": filter_match});
            }
            if let Some(port) = port {
                listener["portNumber"] = json!(port);
            }
            json!({
                "applyTo": apply_to,
                "match": {"context": context(m), "listener": listener},
                "patch": {"operation": operation, "value": filter},
            })
        })
        .collect();
    let mut spec = json!({
        "workloadSelector": {"labels": s.selector.match_labels},
        "configPatches": patches,
    });
    // EnvoyFilters apply in ascending priority and each insert lands just before the router,
    // so the plugin with the highest WasmFilter priority must be applied first to run first.
    if let Some(p) = s.priority {
        spec["priority"] = json!(p.saturating_neg());
    }
    let resource = envoy_filter_resource();
    Child {
        object: dynamic(&resource, metadata(wf, module), spec),
        resource,
        notes,
    }
}

/// The Envoy filter (`name` + `typed_config`) that loads the module from the cache, verified by
/// sha256. Shared by the EnvoyFilter patch and, later, ECDS.
pub fn filter_config(wf: &WasmFilter, module: &Module, server: &ModuleServer) -> Value {
    let s = &wf.spec;
    let name = format!("{}.{}", wf.namespace().unwrap_or_default(), wf.name_any());
    let type_url = match s.filter_type {
        FilterType::Http => "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        FilterType::Network => "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
    };
    let filter_name = match s.filter_type {
        FilterType::Http => "envoy.filters.http.wasm",
        FilterType::Network => "envoy.filters.network.wasm",
    };
    let mut config = json!({
        "name": name,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"remote": {
                "http_uri": {
                    "uri": server.module_url(&module.sha256),
                    "cluster": server.cluster,
                    "timeout": "30s",
                },
                "sha256": module.sha256,
                "retry_policy": {"num_retries": 5},
            }},
        },
        // failure_policy exists from Envoy 1.33 (Istio 1.25) on; older proxies only know
        // fail_open.
        "failure_policy": match s.failure_policy {
            FailurePolicy::FailClosed => "FAIL_CLOSED",
            FailurePolicy::FailOpen => "FAIL_OPEN",
            FailurePolicy::FailReload => "FAIL_RELOAD",
        },
    });
    if let Some(root_id) = &s.root_id {
        config["root_id"] = json!(root_id);
    }
    if let Some(c) = &s.config {
        config["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": serde_json::to_string(c).unwrap_or_default(),
        });
    }
    json!({
        "name": format!("{filter_name}.{name}"),
        "typed_config": {"@type": type_url, "config": config},
    })
}

fn filter_type(t: FilterType) -> &'static str {
    match t {
        FilterType::Http => "HTTP",
        FilterType::Network => "NETWORK",
    }
}

fn phase(p: Phase) -> Option<&'static str> {
    match p {
        Phase::Authn => Some("AUTHN"),
        Phase::Authz => Some("AUTHZ"),
        Phase::Stats => Some("STATS"),
        Phase::Unspecified => None,
    }
}

fn mode(m: TrafficMode) -> &'static str {
    match m {
        TrafficMode::Client => "CLIENT",
        TrafficMode::Server => "SERVER",
        TrafficMode::ClientAndServer => "CLIENT_AND_SERVER",
    }
}

fn context(m: TrafficMode) -> &'static str {
    match m {
        TrafficMode::Client => "SIDECAR_OUTBOUND",
        TrafficMode::Server => "SIDECAR_INBOUND",
        TrafficMode::ClientAndServer => "ANY",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares `actual` with the fixture file, or rewrites the file when
    /// `WASMFILTER_UPDATE_FIXTURES=1` (then review the diff).
    fn assert_fixture(name: &str, actual: &Value) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/render")
            .join(name);
        let actual_yaml = serde_norway::to_string(actual).unwrap();
        if std::env::var_os("WASMFILTER_UPDATE_FIXTURES").is_some() {
            std::fs::write(&path, &actual_yaml).unwrap();
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(actual_yaml, expected, "{} differs", path.display());
    }

    fn filter(yaml: &str) -> WasmFilter {
        let mut wf: WasmFilter = serde_norway::from_str(yaml).unwrap();
        wf.metadata.uid = Some("3f1d3c52-0000-4000-8000-000000000001".into());
        wf
    }

    const FULL: &str = r#"
apiVersion: wasmfilter.dev/v1alpha1
kind: WasmFilter
metadata: {name: add-header, namespace: shop}
spec:
  module: {image: "registry.example.com/filters/add-header:1.2.0"}
  selector: {matchLabels: {app: checkout}}
  target: WasmPlugin
  rootId: add_header_root
  config: {header: x-hello}
  phase: AUTHZ
  priority: 10
  failurePolicy: FailOpen
  match: [{mode: SERVER, ports: [8080, 9090]}]
"#;

    fn module() -> Module {
        Module {
            sha256: "ab".repeat(32),
        }
    }

    fn server() -> ModuleServer {
        ModuleServer::new("http://wasmfilter-cache.wasmfilter-system.svc:8080")
    }

    #[test]
    fn wasm_plugin_from_fixture() {
        let c = child(&filter(FULL), Target::WasmPlugin, &module(), &server()).unwrap();
        assert!(c.notes.is_empty());
        assert_fixture(
            "wasmplugin-full.yaml",
            &serde_json::to_value(&c.object).unwrap(),
        );
    }

    #[test]
    fn envoy_filter_from_fixture() {
        let yaml = FULL.replace("target: WasmPlugin", "target: EnvoyFilter");
        let c = child(&filter(&yaml), Target::EnvoyFilter, &module(), &server()).unwrap();
        assert_eq!(
            c.notes.len(),
            1,
            "phase AUTHZ must be reported as not applied"
        );
        assert_fixture(
            "envoyfilter-full.yaml",
            &serde_json::to_value(&c.object).unwrap(),
        );
    }

    #[test]
    fn network_envoy_filter_goes_first_in_the_chain() {
        let yaml = r#"
apiVersion: wasmfilter.dev/v1alpha1
kind: WasmFilter
metadata: {name: tcp, namespace: shop}
spec:
  module: {image: "r.example/f:1"}
  selector: {matchLabels: {app: db}}
  target: EnvoyFilter
  type: NETWORK
"#;
        let c = child(&filter(yaml), Target::EnvoyFilter, &module(), &server()).unwrap();
        assert_fixture(
            "envoyfilter-network.yaml",
            &serde_json::to_value(&c.object).unwrap(),
        );
    }

    #[test]
    fn ecds_is_reported_not_ignored() {
        let yaml = FULL.replace("target: WasmPlugin", "target: Ecds");
        let err = child(&filter(&yaml), Target::Ecds, &module(), &server()).unwrap_err();
        assert_eq!(err.reason(), "Unsupported");
    }

    #[test]
    fn traffic_extension_from_fixture() {
        let yaml = FULL.replace("target: WasmPlugin", "target: TrafficExtension");
        let c = child(
            &filter(&yaml),
            Target::TrafficExtension,
            &module(),
            &server(),
        )
        .unwrap();
        assert!(c.notes.is_empty());
        let object = serde_json::to_value(&c.object).unwrap();
        assert_fixture("trafficextension-full.yaml", &object);
        // The same placement and module as the WasmPlugin, the module's fields under `wasm`.
        let wp = serde_json::to_value(
            &child(&filter(FULL), Target::WasmPlugin, &module(), &server())
                .unwrap()
                .object,
        )
        .unwrap();
        let mut flattened = object["spec"].as_object().unwrap().clone();
        let wasm = flattened.remove("wasm").unwrap();
        flattened.extend(wasm.as_object().unwrap().clone());
        assert_eq!(Value::Object(flattened), wp["spec"]);
    }

    #[test]
    fn auto_is_a_traffic_extension_only_where_istio_installed_its_crd() {
        let with = Installed {
            traffic_extension: true,
        };
        let without = Installed::default();
        assert_eq!(resolve_target(Target::Auto, with), Target::TrafficExtension);
        assert_eq!(resolve_target(Target::Auto, without), Target::WasmPlugin);
        for t in [
            Target::WasmPlugin,
            Target::EnvoyFilter,
            Target::TrafficExtension,
            Target::Ecds,
        ] {
            assert_eq!(resolve_target(t, with), t);
            assert_eq!(resolve_target(t, without), t);
        }
        // Asked for by name without the CRD: refused, saying what to do.
        let err = check_supported(Target::TrafficExtension, false, without).unwrap_err();
        assert_eq!(err.reason(), "Unsupported");
        assert!(err.to_string().contains("Auto"), "{err}");
        assert!(check_supported(Target::TrafficExtension, false, with).is_ok());
    }

    #[test]
    fn cluster_name_follows_istio_naming() {
        assert_eq!(
            ModuleServer::new("http://cache.ns.svc:8080/").cluster,
            "outbound|8080||cache.ns.svc.cluster.local"
        );
        assert_eq!(
            ModuleServer::new("http://cache.ns.svc").cluster,
            "outbound|80||cache.ns.svc.cluster.local"
        );
        assert_eq!(
            ModuleServer::new("http://cache.ns.svc.cluster.local:8080").cluster,
            "outbound|8080||cache.ns.svc.cluster.local"
        );
        // Not a Service host: kept as written.
        assert_eq!(
            ModuleServer::new("http://10.0.0.7:8080").cluster,
            "outbound|8080||10.0.0.7"
        );
        assert_eq!(
            ModuleServer::new("http://cache.ns.svc:8080/").module_url("ab"),
            "http://cache.ns.svc:8080/modules/sha256/ab.wasm"
        );
    }
}
