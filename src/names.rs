//! Every name the operator writes into the cluster, in one place, derived from the API group.

/// The API group of the `WasmFilter` resource.
pub const GROUP: &str = "wasmfilter.dev";

/// The one field manager for everything the operator applies (children and status).
pub const FIELD_MANAGER: &str = "wasmfilter.dev/operator";

/// Name the operator reports Events under.
pub const CONTROLLER_NAME: &str = "wasmfilter-operator";

/// Label put on every child, naming the WasmFilter it renders.
pub const LABEL_FILTER: &str = "wasmfilter.dev/filter";

/// Label put on every child, naming the operator that manages it.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Annotation on children recording the module sha256 they point at.
pub const ANNOTATION_MODULE_SHA256: &str = "wasmfilter.dev/module-sha256";

/// On the leader Lease: the address where the leader serves ECDS, which the other replicas
/// relay the ECDS streams they receive to.
pub const ANNOTATION_XDS_ADDRESS: &str = "wasmfilter.dev/xds-address";

/// Condition types (kstatus-compatible: `Ready` plus `observedGeneration`, and kstatus's
/// abnormal-true `Reconciling` and `Stalled`).
pub mod condition {
    pub const READY: &str = "Ready";
    /// True while the operator works on the filter or retries a failure that may pass.
    pub const RECONCILING: &str = "Reconciling";
    /// True when it failed in a way that needs a change (spec, registry content, RBAC).
    pub const STALLED: &str = "Stalled";
    pub const RESOLVED: &str = "Resolved";
    pub const DEPLOYED: &str = "Deployed";
    pub const COMPATIBLE: &str = "Compatible";
    /// `target: Ecds`: whether the selected, connected Envoys loaded the module (their ACKs).
    pub const LOADED: &str = "Loaded";
}

/// Reasons used in conditions when things went well. Failure reasons come from
/// [`crate::Error::reason`].
pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const DEPLOYED: &str = "Deployed";
    pub const READY: &str = "Ready";
    pub const NOT_ATTEMPTED: &str = "NotAttempted";
    pub const KEPT_PREVIOUS: &str = "KeptPreviousModule";
    pub const COMPATIBLE: &str = "Compatible";
    pub const INCOMPATIBLE: &str = "Incompatible";
    pub const ENVOY_VERSION_UNKNOWN: &str = "EnvoyVersionUnknown";
    pub const NO_WORKLOADS: &str = "NoWorkloads";
    pub const LOADED: &str = "Loaded";
    pub const LOAD_FAILED: &str = "LoadFailed";
    pub const LOAD_PENDING: &str = "LoadPending";
    pub const NOT_SUBSCRIBED: &str = "NotSubscribed";
    pub const NOT_SENT: &str = "NotSent";
    pub const NO_PROXY_CONNECTED: &str = "NoProxyConnected";
    /// `--istio-load-status`: no selected Istio proxy's metrics could be read.
    pub const PROXY_METRICS_UNREAD: &str = "ProxyMetricsUnread";
    /// `--istio-load-status`, EnvoyFilter target: the proxies' metrics were read but cannot
    /// say whether the filter's Wasm runs (other Wasm plugins run beside it).
    pub const LOAD_UNDECIDED: &str = "LoadUndecided";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const RECONCILING: &str = "Reconciling";
    /// `spec.rollout`: steps remain before every selected pod has the new module.
    pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
    /// `spec.rollout`: proxies refused the new module; every pod is back on the stable one.
    pub const ROLLED_BACK: &str = "RolledBack";
}

/// Istio's API groups and kinds the operator writes.
pub mod istio {
    pub const EXTENSIONS_GROUP: &str = "extensions.istio.io";
    pub const NETWORKING_GROUP: &str = "networking.istio.io";
    pub const WASM_PLUGIN_VERSION: &str = "v1alpha1";
    pub const ENVOY_FILTER_VERSION: &str = "v1alpha3";
    pub const WASM_PLUGIN: &str = "WasmPlugin";
    pub const WASM_PLUGIN_PLURAL: &str = "wasmplugins";
    pub const ENVOY_FILTER: &str = "EnvoyFilter";
    pub const ENVOY_FILTER_PLURAL: &str = "envoyfilters";
    /// Istio 1.30's successor of `WasmPlugin` (Wasm or Lua).
    pub const TRAFFIC_EXTENSION_VERSION: &str = "v1alpha1";
    pub const TRAFFIC_EXTENSION: &str = "TrafficExtension";
    pub const TRAFFIC_EXTENSION_PLURAL: &str = "trafficextensions";
    /// Its CRD, whose presence `target: Auto` looks for.
    pub const TRAFFIC_EXTENSION_CRD: &str = "trafficextensions.extensions.istio.io";
}
