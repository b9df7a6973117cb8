//! The one error type of the library. Each variant is named after the step that failed and has a
//! stable reason string, used alike for conditions, Events and metric labels.

use std::time::Duration;

/// How the controller should come back to an object after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Something outside the spec may recover by itself (registry down, conflict): back off.
    Transient,
    /// The input is wrong as it stands: wait for a change, but look again now and then, since
    /// the registry's content can be fixed without the spec changing.
    Invalid,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("spec.module.image {image:?} is not a valid OCI reference: {message}")]
    InvalidReference { image: String, message: String },

    #[error("registry {registry} could not be reached: {message}")]
    RegistryUnavailable { registry: String, message: String },

    #[error("{reference}: not found in the registry (does the tag exist? was it pushed?)")]
    ManifestNotFound { reference: String },

    #[error(
        "registry refused {reference} ({message}); set spec.module.pullSecret if it needs credentials"
    )]
    RegistryDenied { reference: String, message: String },

    #[error("registry {registry} is throttling requests (HTTP 429{}); will retry with backoff", retry_after.map(|s| format!(", Retry-After {s} s")).unwrap_or_default())]
    RegistryThrottled {
        registry: String,
        retry_after: Option<u64>,
    },

    #[error(
        "registry {registry} asked for a token from {realm:?}, which the operator refuses to contact: {why}"
    )]
    TokenRealmRefused {
        registry: String,
        realm: String,
        why: String,
    },

    #[error("registry client settings: {message}")]
    RegistryConfig { message: String },

    #[error(
        "manifest of {reference} is too large ({size}; the cap is {limit} bytes); is this really a Wasm artifact?"
    )]
    ManifestTooLarge {
        reference: String,
        size: String,
        limit: u64,
    },

    #[error("artifact config of {reference} is unusable: {message}")]
    InvalidArtifactConfig { reference: String, message: String },

    #[error("pull secret {name:?}: {message}")]
    PullSecret {
        name: String,
        message: String,
        /// The Secret does not exist (yet): worth retrying soon.
        missing: bool,
    },

    #[error(
        "pull secret {name:?}: the operator may not read it ({message}); grant it `get` on secrets in namespace {namespace:?} (the Helm chart's Role does)"
    )]
    PullSecretForbidden {
        name: String,
        namespace: String,
        message: String,
    },

    #[error("resolving {reference}: {message}")]
    ResolveDigest { reference: String, message: String },

    #[error(
        "manifest of {reference} does not match its digest: expected {expected}, content hashes to {actual}"
    )]
    ManifestDigestMismatch {
        reference: String,
        expected: String,
        actual: String,
    },

    #[error("manifest of {reference} is invalid: {message}")]
    InvalidManifest { reference: String, message: String },

    #[error("{reference} holds no Wasm module: {found}")]
    NotAWasmArtifact { reference: String, found: String },

    #[error(
        "module of {reference} is {size} bytes, over the operator's {limit}-byte cap (--max-module-size)"
    )]
    ModuleTooLarge {
        reference: String,
        size: u64,
        limit: u64,
    },

    #[error("module of {reference}: {source}")]
    ExtractModule {
        reference: String,
        #[source]
        source: crate::oci::ExtractError,
    },

    #[error("fetching blob {digest}: {message}")]
    FetchBlob { digest: String, message: String },

    #[error(
        "blob served for {expected} does not match that digest (content hashes to sha256:{actual}); refusing it"
    )]
    BlobDigestMismatch { expected: String, actual: String },

    #[error("module of {reference} is not valid Wasm: {message}")]
    InvalidModule { reference: String, message: String },

    #[error("module sha256 {actual} does not match spec.module.sha256 {expected}")]
    ModuleSha256Mismatch { expected: String, actual: String },

    #[error("writing module to the cache: {0}")]
    CacheWrite(#[source] std::io::Error),

    #[error("{field} is not supported by this version of the operator yet: {detail}")]
    Unsupported { field: &'static str, detail: String },

    #[error("applying {kind} {name}: {source}")]
    ApplyChild {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("removing stale {kind} {name}: {source}")]
    DeleteChild {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("updating status: {0}")]
    UpdateStatus(#[source] kube::Error),

    #[error("WasmFilter has no namespace")]
    MissingNamespace,

    #[error("pushing {reference}: {message}")]
    PushModule { reference: String, message: String },

    #[error("{message}; spec.onIncompatible is Block, so the module is not deployed")]
    Incompatible {
        message: String,
        /// The per-workload verdicts, for status.
        workloads: Vec<crate::api::WorkloadStatus>,
    },

    #[error(
        "the pod watch has not completed its first list in {waited_secs} s (may the operator list and watch pods?)"
    )]
    PodsNotSynced { waited_secs: u64 },

    #[error("reading module sha256:{sha256} back from the cache: {message}")]
    ReadModule { sha256: String, message: String },
}

impl Error {
    /// Stable, CamelCase reason: the condition reason, the Event reason and the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidReference { .. } => "InvalidReference",
            Error::RegistryUnavailable { .. } => "RegistryUnavailable",
            Error::ManifestNotFound { .. } => "ManifestNotFound",
            Error::RegistryDenied { .. } => "RegistryDenied",
            Error::ResolveDigest { .. } => "ResolveDigest",
            Error::RegistryThrottled { .. } => "RegistryThrottled",
            Error::TokenRealmRefused { .. } => "TokenRealmRefused",
            Error::RegistryConfig { .. } => "RegistryConfig",
            Error::ManifestTooLarge { .. } => "ManifestTooLarge",
            Error::InvalidArtifactConfig { .. } => "InvalidArtifactConfig",
            Error::PullSecret { missing: true, .. } => "PullSecretNotFound",
            Error::PullSecret { .. } => "InvalidPullSecret",
            Error::PullSecretForbidden { .. } => "PullSecretForbidden",
            Error::ManifestDigestMismatch { .. } => "ManifestDigestMismatch",
            Error::InvalidManifest { .. } => "InvalidManifest",
            Error::NotAWasmArtifact { .. } => "NotAWasmArtifact",
            Error::ModuleTooLarge { .. } => "ModuleTooLarge",
            Error::ExtractModule { source, .. } => match source {
                crate::oci::ExtractError::TooLarge { .. } => "ModuleTooLarge",
                crate::oci::ExtractError::UnsafePath { .. } => "UnsafeArchive",
                crate::oci::ExtractError::NoModule { .. } => "NotAWasmArtifact",
                crate::oci::ExtractError::Corrupt(_) => "CorruptLayer",
            },
            Error::FetchBlob { .. } => "FetchBlob",
            Error::BlobDigestMismatch { .. } => "BlobDigestMismatch",
            Error::InvalidModule { .. } => "InvalidModule",
            Error::ModuleSha256Mismatch { .. } => "ModuleSha256Mismatch",
            Error::CacheWrite(_) => "CacheWrite",
            Error::Unsupported { .. } => "Unsupported",
            Error::ApplyChild { kind, .. } => match kind.as_str() {
                crate::names::istio::WASM_PLUGIN => "ApplyWasmPlugin",
                _ => "ApplyEnvoyFilter",
            },
            Error::DeleteChild { .. } => "DeleteChild",
            Error::UpdateStatus(_) => "UpdateStatus",
            Error::MissingNamespace => "MissingNamespace",
            Error::PushModule { .. } => "PushModule",
            Error::Incompatible { .. } => "Incompatible",
            Error::PodsNotSynced { .. } => "PodsNotSynced",
            Error::ReadModule { .. } => "ReadModule",
        }
    }

    /// Whether the failure belongs to resolving the module (condition `Resolved`) rather than to
    /// writing children (condition `Deployed`).
    pub fn is_resolve_failure(&self) -> bool {
        !matches!(
            self,
            Error::ApplyChild { .. }
                | Error::DeleteChild { .. }
                | Error::UpdateStatus(_)
                | Error::MissingNamespace
                | Error::Incompatible { .. }
                | Error::PodsNotSynced { .. }
                | Error::ReadModule { .. }
        )
    }

    /// The least time to wait before retrying, when the server said (HTTP 429 Retry-After).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RegistryThrottled {
                retry_after: Some(s),
                ..
            } => Some(Duration::from_secs((*s).min(300))),
            _ => None,
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::RegistryUnavailable { .. }
            | Error::RegistryThrottled { .. }
            | Error::PullSecret { missing: true, .. }
            | Error::PullSecretForbidden { .. }
            | Error::ResolveDigest { .. }
            | Error::FetchBlob { .. }
            | Error::BlobDigestMismatch { .. }
            | Error::ManifestDigestMismatch { .. }
            | Error::CacheWrite(_)
            | Error::ApplyChild { .. }
            | Error::DeleteChild { .. }
            | Error::UpdateStatus(_)
            | Error::PushModule { .. }
            | Error::PodsNotSynced { .. }
            | Error::ReadModule { .. } => Retry::Transient,
            Error::InvalidReference { .. }
            | Error::ManifestNotFound { .. }
            | Error::RegistryDenied { .. }
            | Error::InvalidManifest { .. }
            | Error::NotAWasmArtifact { .. }
            | Error::ExtractModule { .. }
            | Error::ModuleTooLarge { .. }
            | Error::InvalidModule { .. }
            | Error::ModuleSha256Mismatch { .. }
            | Error::Unsupported { .. }
            | Error::TokenRealmRefused { .. }
            | Error::RegistryConfig { .. }
            | Error::ManifestTooLarge { .. }
            | Error::InvalidArtifactConfig { .. }
            | Error::PullSecret { .. }
            | Error::Incompatible { .. }
            | Error::MissingNamespace => Retry::Invalid,
        }
    }
}

/// Per-object retry delays: exponential with full jitter for transient failures, a long fixed
/// look-again for invalid input.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub invalid: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            invalid: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// Delay before attempt number `failures` (1 = first failure). `jitter` is in [0, 1).
    pub fn delay(&self, retry: Retry, failures: u32, jitter: f64) -> Duration {
        match retry {
            Retry::Invalid => self.invalid,
            Retry::Transient => {
                let exp = self
                    .base
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
                let cap = exp.min(self.max);
                // Half fixed, half jittered: never a hot loop, never a thundering herd.
                cap / 2 + cap.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_backoff_grows_and_is_capped() {
        let b = Backoff::default();
        let d1 = b.delay(Retry::Transient, 1, 0.0);
        let d4 = b.delay(Retry::Transient, 4, 0.0);
        assert_eq!(d1, Duration::from_millis(500));
        assert_eq!(d4, Duration::from_secs(4));
        assert_eq!(b.delay(Retry::Transient, 40, 0.999).as_secs(), 299);
        assert!(b.delay(Retry::Transient, 40, 0.0) >= Duration::from_secs(150));
    }

    #[test]
    fn invalid_input_waits_long() {
        let b = Backoff::default();
        assert_eq!(b.delay(Retry::Invalid, 1, 0.5), Duration::from_secs(300));
    }

    #[test]
    fn reasons_are_distinct_per_apply_kind() {
        let e = |kind: &str| Error::ApplyChild {
            kind: kind.into(),
            name: "x".into(),
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        assert_eq!(e("WasmPlugin").reason(), "ApplyWasmPlugin");
        assert_eq!(e("EnvoyFilter").reason(), "ApplyEnvoyFilter");
    }
}
