//! The controller's error: a failed step of the reconcile. Registry, cache and rendering
//! failures keep their own types (and reasons) inside it.

use std::time::Duration;

use crate::error::Retry;
use crate::{cache, oci, render};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Oci(#[from] oci::Error),

    #[error(transparent)]
    Cache(#[from] cache::Error),

    #[error(transparent)]
    Render(#[from] render::Error),

    #[error("reading module sha256:{sha256} back from the cache: {source}")]
    InspectModule {
        sha256: String,
        #[source]
        source: crate::abi::ModuleError,
    },

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

    #[error(transparent)]
    Signature(#[from] crate::oci::signature::Refusal),

    #[error("the trusted keys in {keys} cannot be used: {message}")]
    VerificationKeys { keys: String, message: String },

    #[error("pre-flight of module sha256:{} failed in {summary}", &sha256[..sha256.len().min(12)])]
    PreflightFailed {
        sha256: String,
        summary: String,
        /// The sandbox's time ran out (worth trying again later).
        timed_out: bool,
    },

    #[error("the pre-flight sandbox crashed: {0}")]
    PreflightCrashed(String),

    #[error("WasmFilter has no namespace")]
    MissingNamespace,

    #[error(
        "the pod watch has not completed its first list in {waited_secs} s (may the operator list and watch pods?)"
    )]
    PodsNotSynced { waited_secs: u64 },
}

impl Error {
    /// Stable, CamelCase reason: the condition reason, the Event reason and the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Oci(e) => e.reason(),
            Error::Cache(e) => e.reason(),
            Error::Render(e) => e.reason(),
            Error::InspectModule { .. } => "ReadModule",
            Error::ApplyChild { kind, .. } => match kind.as_str() {
                crate::names::istio::WASM_PLUGIN => "ApplyWasmPlugin",
                _ => "ApplyEnvoyFilter",
            },
            Error::DeleteChild { .. } => "DeleteChild",
            Error::UpdateStatus(_) => "UpdateStatus",
            Error::Signature(r) => r.reason(),
            Error::VerificationKeys { .. } => "VerificationKeysNotFound",
            Error::PreflightFailed { .. } | Error::PreflightCrashed(_) => "PreflightFailed",
            Error::MissingNamespace => "MissingNamespace",
            Error::PodsNotSynced { .. } => "PodsNotSynced",
        }
    }

    /// Whether the failure belongs to resolving the module (condition `Resolved`) rather than to
    /// deploying it (condition `Deployed`).
    pub fn is_resolve_failure(&self) -> bool {
        matches!(
            self,
            Error::Oci(_) | Error::Render(_) | Error::Signature(_) | Error::VerificationKeys { .. }
        )
    }

    /// The least time to wait before retrying, when the server said (HTTP 429 Retry-After).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Oci(e) => e.retry_after(),
            _ => None,
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::Oci(e) => e.retry(),
            Error::Render(e) => e.retry(),
            Error::Cache(_)
            | Error::InspectModule { .. }
            | Error::ApplyChild { .. }
            | Error::DeleteChild { .. }
            | Error::UpdateStatus(_)
            | Error::PodsNotSynced { .. } => Retry::Transient,
            // A signature may be pushed after the module, a key ConfigMap created later.
            Error::Signature(crate::oci::signature::Refusal::Missing { .. })
            | Error::VerificationKeys { .. } => Retry::Transient,
            Error::Signature(_) => Retry::Invalid,
            Error::PreflightFailed {
                timed_out: false, ..
            } => Retry::Invalid,
            Error::PreflightFailed {
                timed_out: true, ..
            }
            | Error::PreflightCrashed(_) => Retry::Transient,
            Error::MissingNamespace => Retry::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn wrapped_errors_keep_their_reasons_and_retry() {
        let write = Error::from(oci::Error::from(cache::Error::Write(
            std::io::Error::other("disk full"),
        )));
        assert_eq!(write.reason(), "CacheWrite");
        assert!(write.is_resolve_failure());
        assert_eq!(write.retry(), Retry::Transient);
        let read = Error::from(cache::Error::Missing {
            sha256: "ab".into(),
        });
        assert_eq!(read.reason(), "ReadModule");
        assert!(!read.is_resolve_failure());
        let throttled = Error::from(oci::Error::RegistryThrottled {
            registry: "r".into(),
            retry_after: Some(7),
        });
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(7)));
        let unsupported = Error::from(render::Error::Unsupported {
            field: "spec.target: Ecds",
            detail: "d".into(),
        });
        assert_eq!(unsupported.reason(), "Unsupported");
        assert_eq!(unsupported.retry(), Retry::Invalid);
        assert!(unsupported.is_resolve_failure());
    }
}
