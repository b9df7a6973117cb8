//! What can go wrong between a reference and verified module bytes: parsing the reference,
//! talking to the registry, reading pull secrets, checking what came back, pushing. Every
//! variant has a stable reason string (conditions, Events, metric labels).

use std::time::Duration;

use crate::error::Retry;

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
        source: super::ExtractError,
    },

    #[error("fetching blob {digest}: {message}")]
    FetchBlob { digest: String, message: String },

    #[error(
        "blob served for {expected} does not match that digest (content hashes to sha256:{actual}); refusing it"
    )]
    BlobDigestMismatch { expected: String, actual: String },

    #[error("module of {reference} is not valid Wasm: {source}")]
    InvalidModule {
        reference: String,
        #[source]
        source: crate::abi::ModuleError,
    },

    #[error("module sha256 {actual} does not match spec.module.sha256 {expected}")]
    ModuleSha256Mismatch { expected: String, actual: String },

    #[error("pushing {reference}: {message}")]
    PushModule { reference: String, message: String },

    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
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
                super::ExtractError::TooLarge { .. } => "ModuleTooLarge",
                super::ExtractError::UnsafePath { .. } => "UnsafeArchive",
                super::ExtractError::NoModule { .. } => "NotAWasmArtifact",
                super::ExtractError::Corrupt(_) => "CorruptLayer",
            },
            Error::FetchBlob { .. } => "FetchBlob",
            Error::BlobDigestMismatch { .. } => "BlobDigestMismatch",
            Error::InvalidModule { .. } => "InvalidModule",
            Error::ModuleSha256Mismatch { .. } => "ModuleSha256Mismatch",
            Error::PushModule { .. } => "PushModule",
            Error::Cache(e) => e.reason(),
        }
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
            | Error::PushModule { .. }
            | Error::Cache(_) => Retry::Transient,
            Error::InvalidReference { .. }
            | Error::ManifestNotFound { .. }
            | Error::RegistryDenied { .. }
            | Error::InvalidManifest { .. }
            | Error::NotAWasmArtifact { .. }
            | Error::ExtractModule { .. }
            | Error::ModuleTooLarge { .. }
            | Error::InvalidModule { .. }
            | Error::ModuleSha256Mismatch { .. }
            | Error::TokenRealmRefused { .. }
            | Error::RegistryConfig { .. }
            | Error::ManifestTooLarge { .. }
            | Error::InvalidArtifactConfig { .. }
            | Error::PullSecret { .. } => Retry::Invalid,
        }
    }
}
