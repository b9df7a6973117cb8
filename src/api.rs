//! The `WasmFilter` API: group `wasmfilter.dev`, version `v1alpha1`, short name `wf`.
//!
//! Every field carries a `///` doc: they become `kubectl explain wasmfilter.spec`. What the API
//! server can check (enums, ranges, reference and digest syntax, a non-empty selector) is in the
//! schema and its CEL rules, so a malformed spec is refused before the operator sees it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An OCI reference: optional `oci://`, optional registry, a repository path, then a tag and/or a
/// `@sha256:` digest. As Docker reads it, a first component followed by `/` is the registry when
/// it has a dot or a port or is `localhost` (then it must be a valid host), else a path
/// component; a name without `/` is a path (on docker.io). The same grammar as the distribution
/// reference, written for RE2, except that a port must be 1 to 65535.
pub const IMAGE_REFERENCE_RE: &str = r"^(oci://)?(([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)+(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?|[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])|localhost)/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*|[a-z0-9]+((_|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+|[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// Desired state: which module to deploy, to which workloads, and how.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wasmfilter.dev",
    version = "v1alpha1",
    kind = "WasmFilter",
    namespaced,
    shortname = "wf",
    status = "WasmFilterStatus",
    category = "wasm",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.artifact.shortDigest"}"#,
    printcolumn = r#"{"name":"ABI","type":"string","jsonPath":".status.artifact.abiVersion"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","priority":1,"jsonPath":".status.selectedWorkloads"}"#,
    printcolumn = r#"{"name":"Loaded","type":"integer","priority":1,"jsonPath":".status.loadedWorkloads"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.rollout) || (has(self.target) && self.target == 'Ecds')")
    .message("spec.rollout needs target: Ecds (the operator chooses which proxies get the new module only when it serves them itself)"))]
pub struct WasmFilterSpec {
    /// The Wasm module to deploy, stored as an OCI artifact.
    pub module: ModuleSource,
    /// Selects the pods whose proxies get the filter, by label. At least one label is required:
    /// an empty selector would put the filter on every workload in the namespace.
    pub selector: WorkloadSelector,
    /// What the operator writes: an Istio `WasmPlugin` (default), an Istio `EnvoyFilter`, an
    /// Istio `TrafficExtension` (Istio 1.30+), `Auto` (TrafficExtension when its CRD was
    /// installed when the operator started, else WasmPlugin), or `Ecds` (served to plain Envoys
    /// over the extension config discovery service).
    #[serde(default)]
    pub target: Target,
    /// The plugin's root id, handed to the module as `root_id` (Istio calls it `pluginName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new(r"!self.matches('[\\x00-\\x1f\\x7f]')")
        .message("must not contain control characters"))]
    pub root_id: Option<String>,
    /// Configuration handed to the plugin, as JSON. Any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where in the filter chain the plugin goes: `AUTHN`, `AUTHZ`, `STATS`, or `Unspecified`
    /// (just before the router).
    #[serde(default)]
    pub phase: Phase,
    /// Order among plugins in the same phase; higher runs first. A 32-bit integer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = i32::MIN, max = i32::MAX))]
    pub priority: Option<i32>,
    /// What the proxy does when the plugin fails: `FailClosed` (default: reject traffic),
    /// `FailOpen` (skip the plugin), `FailReload` (restart the VM and retry).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// `HTTP` (default) for an HTTP filter, `NETWORK` for a network (L4) filter.
    #[serde(default, rename = "type")]
    pub filter_type: FilterType,
    /// Which traffic the plugin applies to; empty means all.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub traffic: Vec<TrafficSelector>,
    /// What to do when a selected workload's Envoy would refuse the module: `Block` (default:
    /// deploy nothing new and keep what runs) or `Warn` (deploy and report).
    #[serde(default)]
    pub on_incompatible: OnIncompatible,
    /// `target: Ecds` only: roll a new module (or configuration) out in steps, and return every
    /// proxy to the last module that was fully rolled out when the new one fails to load.
    /// Without it, every selected proxy gets a new module at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A stepped rollout: each step gives the new module to more of the selected pods (the first
/// ones by name), and holds until every one of them whose Envoy is connected loaded it and the
/// step's pause has passed. After the last step every selected pod gets it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The steps before all; e.g. `[{count: 1}, {percent: 50}]`.
    #[schemars(length(min = 1, max = 10))]
    pub steps: Vec<RolloutStep>,
    /// How many proxies may refuse the new module (an ECDS NACK: Envoy could not load it) before
    /// it is rolled back. Default 0: the first refusal rolls it back.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub max_failures: u32,
}

/// How many selected pods have the new module during a step, and how long the step lasts at
/// least.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.percent) != has(self.count)")
    .message("name exactly one of percent or count"))]
pub struct RolloutStep {
    /// This share of the selected pods, rounded up (at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u32>,
    /// This many of the selected pods (all of them, when fewer are selected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub count: Option<u32>,
    /// Seconds the step lasts at least, counted from its start; the step also waits until every
    /// pod in it whose Envoy is connected loaded the module. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub pause_seconds: u32,
}

/// Where the module is stored and how to fetch it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSource {
    /// OCI reference of the module artifact, by tag or by manifest digest, e.g.
    /// `registry.example.com/filters/add-header:1.2.0` or `...@sha256:<manifest digest>`.
    /// An `oci://` prefix is accepted.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = image_rule())]
    pub image: String,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret in this namespace holding credentials
    /// for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = secret_name_rule())]
    pub pull_secret: Option<String>,
    /// `IfNotPresent` (default) pins the digest the tag resolved to first; `Always` re-resolves
    /// the tag on every resync and rolls out a moved tag once the new module passes every check.
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Optional pin of the module's own bytes (sha256 of the `.wasm`, 64 lowercase hex
    /// characters). A module with other bytes is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-f0-9]{64}$')")
        .message("must be the module's sha256: 64 lowercase hex characters"))]
    #[schemars(length(min = 64, max = 64))]
    pub sha256: Option<String>,
    /// Require a signature on the module's manifest: nothing is deployed until one verifies,
    /// and what was deployed before stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verification>,
}

/// How a module's signature is checked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// A cosign signature made with a key (`cosign sign --key`): under cosign's
    /// `sha256-<digest>.sig` tag beside the module, or a Sigstore bundle referring to it.
    pub cosign: CosignVerification,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.publicKeys) != has(self.keyless)")
    .message("name exactly one of publicKeys or keyless"))]
pub struct CosignVerification {
    /// Where the trusted public keys are; a signature by any one of them is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_keys: Option<KeySource>,
    /// Keyless signatures (`cosign sign` with a certificate, as Sigstore's Fulcio issues for
    /// an OIDC identity): the certificate must chain to the trusted root and name one of the
    /// identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless: Option<KeylessVerification>,
}

/// What a keyless signature is checked against, offline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeylessVerification {
    /// A ConfigMap in the filter's namespace whose key `trusted_root.json` is a Sigstore
    /// trusted root: the certificate authorities in it are trusted.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = config_map_name_rule())]
    pub trusted_root: String,
    /// Whose signatures count: a certificate must name one of these (exactly).
    #[schemars(length(min = 1, max = 16))]
    pub identities: Vec<CertificateIdentity>,
}

/// A signer's identity as its certificate names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateIdentity {
    /// The OIDC issuer that vouched for the subject, e.g.
    /// `https://token.actions.githubusercontent.com`.
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: String,
    /// The certificate's subject: an email, or a URI such as a CI workflow's.
    #[schemars(length(min = 1, max = 1024))]
    pub subject: String,
}

/// A ConfigMap or a Secret in the filter's namespace; every value in it holding a PEM public
/// key (ECDSA P-256, as `cosign generate-key-pair` writes) is trusted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.configMap) != has(self.secret)")
    .message("name exactly one of configMap or secret"))]
pub struct KeySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = config_map_name_rule())]
    pub config_map: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = secret_name_rule())]
    pub secret: Option<String>,
}

/// Label selector for the workloads that get the filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("size(self.matchLabels) > 0")
    .message("selector.matchLabels must name at least one label; an empty selector would match every workload"))]
pub struct WorkloadSelector {
    /// Pods whose labels include all of these get the filter. Keys and values follow
    /// Kubernetes label syntax.
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 63}
    ))]
    #[x_kube(validation = label_keys_rule(), validation = label_values_rule())]
    pub match_labels: BTreeMap<String, String>,
}

/// Which traffic of a workload the plugin applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSelector {
    /// `SERVER` (inbound), `CLIENT` (outbound) or `CLIENT_AND_SERVER` (default).
    #[serde(default)]
    pub mode: TrafficMode,
    /// Ports the plugin applies to; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(range(min = 1, max = 65535)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub ports: Vec<i32>,
}

/// The kind of object the operator writes for a `WasmFilter`: an Istio `WasmPlugin`, an Istio
/// `EnvoyFilter`, an Istio `TrafficExtension` (Istio 1.30 and later), `Auto` (a
/// TrafficExtension when its CRD was installed when the operator started, else a WasmPlugin),
/// or nothing: `Ecds` serves the module to Envoys over ECDS.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Target {
    #[default]
    WasmPlugin,
    EnvoyFilter,
    TrafficExtension,
    Auto,
    Ecds,
}

/// Filter-chain phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    #[serde(rename = "AUTHN")]
    Authn,
    #[serde(rename = "AUTHZ")]
    Authz,
    #[serde(rename = "STATS")]
    Stats,
    #[default]
    Unspecified,
}

/// Behaviour when the plugin fails at runtime.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    #[default]
    FailClosed,
    FailOpen,
    FailReload,
}

/// HTTP or network filter.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FilterType {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "NETWORK")]
    Network,
}

/// Traffic direction.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TrafficMode {
    #[serde(rename = "CLIENT")]
    Client,
    #[serde(rename = "SERVER")]
    Server,
    #[default]
    #[serde(rename = "CLIENT_AND_SERVER")]
    ClientAndServer,
}

/// When to resolve the tag again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
}

/// What to do with a module some selected Envoy would refuse.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnIncompatible {
    #[default]
    Block,
    Warn,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WasmFilterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Resolved` and `Deployed`, each with a reason a person can act on.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The module that is deployed now (the last one that passed every check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactStatus>,
    /// Every selected pod (the first 100): its Envoy and whether it loads the module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadStatus>,
    /// How many pods the selector picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_workloads: Option<u32>,
    /// `target: Ecds`: how many of them have a connected Envoy that loaded the current module
    /// (with `--istio-load-status`: how many Istio proxies run a Wasm plugin for the filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_workloads: Option<u32>,
    /// `spec.rollout`: the module every proxy returns to, the one being rolled out, and the
    /// step it is at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The last module and configuration every selected proxy was given: what a rollback
    /// returns them to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Revision>,
    /// The module and configuration being rolled out, while a rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Revision>,
    /// The step the candidate is at (0 is the first of `spec.rollout.steps`; one past the last
    /// means every selected pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// When that step began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// How many selected pods are given the candidate during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_workloads: Option<u32>,
    /// The last candidate that was rolled back: it is not tried again until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBack>,
}

/// A module with the settings it is served with.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// Identifies the module and every setting that reaches Envoy (the ECDS version's prefix).
    pub version: String,
    pub module_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default, rename = "type")]
    pub filter_type: FilterType,
}

/// A candidate that proxies refused, and what they said.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolledBack {
    /// The candidate's version.
    pub version: String,
    pub module_sha256: String,
    /// The `metadata.generation` it was rolled back at.
    pub generation: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The step it had reached (0 is the first).
    pub step: u32,
    /// How many proxies refused it.
    #[serde(default)]
    pub refused: u32,
    /// The proxies that refused it, each with Envoy's words (the first 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// One selected pod and the verdict for its Envoy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The pod.
    pub name: String,
    /// Its Envoy version (`1.36.2`, or `1.36` when only the minor release is known); absent
    /// when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_version: Option<String>,
    /// Where the version came from: `xds-node` (reported by the pod's Envoy over ECDS),
    /// `annotation`, `istio-proxy-image`, `envoy-image` or `unknown`.
    pub version_source: String,
    /// Whether that Envoy loads the module; absent when it cannot be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatible: Option<bool>,
    /// Why not (worded as Envoy logs it), or why it cannot be told.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// `target: Ecds`: whether the pod's connected Envoy loaded the current module (it
    /// ACKed it: the VM was created and the plugin configured). Absent when no proxy of the
    /// pod is connected or it has not answered yet; never inferred. WasmPlugin and
    /// TrafficExtension targets with the operator's `--istio-load-status`: whether the pod's
    /// Istio proxy runs a Wasm plugin for this filter, read from its istio-agent's metrics
    /// (which of the filter's modules is not shown there); absent when they cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded: Option<bool>,
    /// Why it did not load: Envoy's own error (NACK), why it was not sent, what the Envoy's
    /// bootstrap lacks, or what an Istio proxy's metrics say (Envoy refused the config, or
    /// the istio-agent failed to fetch the module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
    /// While a rollout runs: `candidate` (the pod is given the new module) or `stable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// The resolved, verified module.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// The reference as written in the spec when it was resolved.
    pub image: String,
    /// Digest of the OCI manifest the reference resolved to (`sha256:...`).
    pub manifest_digest: String,
    /// First 12 hex characters of the manifest digest, for display.
    pub short_digest: String,
    /// sha256 of the module bytes, as served by the cache and pinned in children.
    pub module_sha256: String,
    /// Size of the module in bytes.
    pub size: u64,
    /// Artifact format the module was found in (`solo-oci`, ...).
    pub format: String,
    /// proxy-wasm ABI version the module declares by its exports, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi_version: Option<String>,
    /// ABI versions the artifact's runtime config declares; the module's own marker
    /// (`abiVersion`) is what counts when they disagree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub declared_abi_versions: Vec<String>,
    /// Root ids the artifact's runtime config declares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_ids: Vec<String>,
    /// The manifest digest deployed before this one, when the tag moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_manifest_digest: Option<String>,
    /// Who signed what was deployed, when the spec or the operator requires a signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureStatus>,
    /// sha256 of the module, root id and configuration the pre-flight passed with, so that a
    /// restarted operator does not run the same again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight_passed: Option<String>,
}

/// A verified signature.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignatureStatus {
    /// `cosign` (cosign's `sha256-<digest>.sig` tag) or `sigstore-bundle` (a Sigstore bundle
    /// referring to the manifest).
    pub scheme: String,
    /// The trusted key that verified it (where it came from) and the sha256 of its DER
    /// encoding; for a keyless signature, the identity, its issuer and certificate authority,
    /// and the sha256 of the certificate.
    pub key: String,
    pub key_fingerprint: String,
    /// The digest of the manifest holding the signature (under `sha256-<digest>.sig`, or the
    /// bundle's).
    pub signature_digest: String,
}

/// A DNS subdomain (RFC 1123), the syntax of most object names, Secrets' among them.
const DNS_SUBDOMAIN_RE: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A label key: an optional DNS subdomain prefix (at most 253 characters) and `/`, then a name
/// of at most 63 characters.
pub const LABEL_KEY_RE: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

/// A label value: empty, or at most 63 characters.
pub const LABEL_VALUE_RE: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";

/// A regex as a CEL single-quoted string literal's content.
fn cel_literal(re: &str) -> String {
    re.replace('\\', "\\\\")
}

fn secret_name_rule() -> kube::core::Rule {
    object_name_rule("Secret")
}

fn config_map_name_rule() -> kube::core::Rule {
    object_name_rule("ConfigMap")
}

fn object_name_rule(kind: &str) -> kube::core::Rule {
    let message = format!(
        "must be a {kind} name: lowercase letters, digits, '-' and '.', starting and ending \
         with a letter or digit"
    );
    kube::core::Rule::new(format!("self.matches('{}')", cel_literal(DNS_SUBDOMAIN_RE)))
        .message(message.as_str())
}

fn label_keys_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!(
        "self.all(k, k.indexOf('/') <= 253 && k.matches('{}'))",
        cel_literal(LABEL_KEY_RE)
    ))
    .message(
        "keys must be label keys: an optional DNS subdomain prefix and '/', then at most 63 \
         characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
    )
}

fn label_values_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!("self.all(k, self[k].matches('{LABEL_VALUE_RE}'))")).message(
        "values must be label values: empty, or at most 63 characters of letters, digits, '-', \
         '_' and '.', starting and ending with a letter or digit",
    )
}

/// CEL for `spec.module.image`, built from [`IMAGE_REFERENCE_RE`] so the schema and the
/// operator's own parsing agree on one grammar.
fn image_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!(
        "self.matches('{}')",
        cel_literal(IMAGE_REFERENCE_RE)
    ))
    .message(
        "must be an OCI reference such as registry.example.com/filters/add-header:1.2.0 \
         or registry.example.com/filters/add-header@sha256:<64 hex digits>",
    )
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl WasmFilter {
    /// The image reference without an `oci://` prefix.
    pub fn image(&self) -> &str {
        let image = self.spec.module.image.as_str();
        image.strip_prefix("oci://").unwrap_or(image)
    }
}
