//! Resolving a module reference: tag → manifest digest → module layer → verified bytes in the
//! cache. Uses `oci-client` for the distribution protocol (auth challenges, manifests, blob
//! streams); every digest is checked here again, and sizes are capped before and while reading.

pub mod format;
mod push;

use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

pub use format::{ExtractError, Format, select_module_layer};
pub use push::{PushOptions, push_module};

use crate::abi;
use crate::cache::{ModuleCache, sha256_hex};
use crate::error::Error;

/// Media types the operator asks registries for when resolving a reference.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Istio's default cap on module size.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 * 1024 * 1024;

/// How the operator talks to registries.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) that may be reached over plain HTTP; all others use HTTPS.
    pub plain_http: Vec<String>,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            plain_http: Vec::new(),
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// A resolved, verified module, stored in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The reference as the user wrote it (without `oci://`).
    pub image: String,
    /// Digest of the image manifest the module came from (`sha256:<hex>`).
    pub manifest_digest: String,
    pub format: Format,
    /// sha256 of the module bytes (hex).
    pub module_sha256: String,
    pub size: u64,
    /// The ABI the module declares by its exports.
    pub abi_version: Option<String>,
}

/// Resolves references and fetches modules into the cache.
pub struct Resolver {
    client: Client,
    config: RegistryConfig,
}

/// Parses a user-written reference, accepting an `oci://` prefix.
pub fn parse_reference(image: &str) -> Result<Reference, Error> {
    let bare = image.strip_prefix("oci://").unwrap_or(image);
    bare.parse::<Reference>()
        .map_err(|e| Error::InvalidReference {
            image: image.to_string(),
            message: e.to_string(),
        })
}

/// Builds an `oci-client` client for these settings.
pub fn client(config: &RegistryConfig) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(config.plain_http.clone()),
        connect_timeout: Some(config.connect_timeout),
        read_timeout: Some(config.read_timeout),
        ..Default::default()
    })
}

impl Resolver {
    pub fn new(config: RegistryConfig) -> Self {
        Resolver {
            client: client(&config),
            config,
        }
    }

    /// Like [`Resolver::pull`], then stores the module in `cache`. Nothing reaches the cache
    /// unless every check passed.
    #[tracing::instrument(skip(self, cache), fields(image))]
    pub async fn fetch(
        &self,
        image: &str,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        cache: &ModuleCache,
    ) -> Result<Artifact, Error> {
        let (artifact, module) = self
            .pull(image, pinned_digest, expected_module_sha256, Some(cache))
            .await?;
        cache.insert(&module).map_err(Error::CacheWrite)?;
        Ok(artifact)
    }

    /// Resolves `image` (or, when `pinned_digest` is given, that manifest of the same
    /// repository), fetches its module and verifies every digest, the module itself and, when
    /// given, the expected module sha256. A module already in `cache` is not downloaded again.
    pub async fn pull(
        &self,
        image: &str,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        cache: Option<&ModuleCache>,
    ) -> Result<(Artifact, Vec<u8>), Error> {
        let reference = parse_reference(image)?;
        let reference = match pinned_digest {
            Some(d) => Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                d.to_string(),
            ),
            None => reference,
        };
        let (manifest, manifest_digest) = self.image_manifest(&reference).await?;
        let (format, layer) =
            select_module_layer(&manifest).map_err(|found| Error::NotAWasmArtifact {
                reference: reference.whole(),
                found,
            })?;
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if size > self.config.max_module_bytes {
            return Err(Error::ModuleTooLarge {
                reference: reference.whole(),
                size,
                limit: self.config.max_module_bytes,
            });
        }
        let layer_hex = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| crate::cache::is_sha256_hex(h))
            .ok_or_else(|| Error::NotAWasmArtifact {
                reference: reference.whole(),
                found: format!(
                    "module layer digest {:?} is not a sha256 digest",
                    layer.digest
                ),
            })?;

        // The raw-layer formats are content-addressed by the module's own hash: a module
        // already in the cache needs no download.
        let cached = match cache {
            Some(c) if format.layer_is_module() => {
                c.read_verified(layer_hex).map_err(Error::CacheWrite)?
            }
            _ => None,
        };
        let bytes = match cached {
            Some(bytes) => bytes,
            None => self.fetch_blob(&reference, layer, size).await?,
        };
        let module = format
            .extract_module(bytes, self.config.max_module_bytes)
            .map_err(|source| Error::ExtractModule {
                reference: reference.whole(),
                source,
            })?;
        let info = abi::inspect(&module).map_err(|e| match e {
            abi::ModuleError::NotWasm { .. } => Error::NotAWasmArtifact {
                reference: reference.whole(),
                found: format!("layer {} ({}): {e}", layer.digest, layer.media_type),
            },
            other => Error::InvalidModule {
                reference: reference.whole(),
                message: other.to_string(),
            },
        })?;
        let module_sha256 = sha256_hex(&module);
        if let Some(expected) = expected_module_sha256
            && expected != module_sha256
        {
            return Err(Error::ModuleSha256Mismatch {
                expected: expected.to_string(),
                actual: module_sha256,
            });
        }
        let artifact = Artifact {
            image: image.strip_prefix("oci://").unwrap_or(image).to_string(),
            manifest_digest,
            format,
            module_sha256,
            size: module.len() as u64,
            abi_version: info.abi_version().map(str::to_string),
        };
        Ok((artifact, module))
    }

    /// Fetches the image manifest for `reference`, following an index to its Wasm entry, and
    /// returns it with its verified digest.
    async fn image_manifest(
        &self,
        reference: &Reference,
    ) -> Result<(OciImageManifest, String), Error> {
        let (manifest, digest) = self.manifest(reference).await?;
        match manifest {
            OciManifest::Image(m) => Ok((m, digest)),
            OciManifest::ImageIndex(index) => {
                let entry = format::pick_index_entry(&index.manifests).ok_or_else(|| {
                    Error::NotAWasmArtifact {
                        reference: reference.whole(),
                        found: format!(
                            "an index of {} manifests, none for platform wasm or wasip1",
                            index.manifests.len()
                        ),
                    }
                })?;
                let child = Reference::with_digest(
                    reference.registry().to_string(),
                    reference.repository().to_string(),
                    entry.digest.clone(),
                );
                match self.manifest(&child).await? {
                    (OciManifest::Image(m), d) => Ok((m, d)),
                    (OciManifest::ImageIndex(_), _) => Err(Error::NotAWasmArtifact {
                        reference: reference.whole(),
                        found: "an index nested in an index".to_string(),
                    }),
                }
            }
        }
    }

    async fn manifest(&self, reference: &Reference) -> Result<(OciManifest, String), Error> {
        let (raw, digest) = self
            .client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| classify(e, reference))?;
        // oci-client checks the digest too; checking here keeps the guarantee ours.
        let actual = format!("sha256:{}", sha256_hex(&raw));
        let expected = reference.digest().unwrap_or(&digest);
        if actual != expected {
            return Err(Error::ManifestDigestMismatch {
                reference: reference.whole(),
                expected: expected.to_string(),
                actual,
            });
        }
        let manifest: OciManifest =
            serde_json::from_slice(&raw).map_err(|e| Error::ResolveDigest {
                reference: reference.whole(),
                message: format!("manifest is not valid JSON: {e}"),
            })?;
        Ok((manifest, actual))
    }

    /// Streams a blob with a hard size cap, hashing as it goes, and refuses bytes that do not
    /// match the descriptor's digest or size.
    async fn fetch_blob(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        size: u64,
    ) -> Result<Vec<u8>, Error> {
        let fetch_err = |message: String| Error::FetchBlob {
            digest: layer.digest.clone(),
            message,
        };
        let mut stream = self
            .client
            .pull_blob_stream(reference, layer)
            .await
            .map_err(|e| fetch_err(classify(e, reference).to_string()))?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 26));
        let mut hasher = Sha256::new();
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if (bytes.len() + chunk.len()) as u64 > size {
                        return Err(fetch_err(format!(
                            "registry sent more than the {size} bytes the manifest declares"
                        )));
                    }
                    hasher.update(&chunk);
                    bytes.extend_from_slice(&chunk);
                }
                // The client's own digest check reports at the end of the stream; the checks
                // below say precisely what was wrong.
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            }
        }
        if (bytes.len() as u64) < size {
            return Err(fetch_err(match stream_error {
                Some(e) => format!("after {} of {size} bytes: {e}", bytes.len()),
                None => format!("truncated: got {} of {size} bytes", bytes.len()),
            }));
        }
        let actual = hex::encode(hasher.finalize());
        if layer.digest != format!("sha256:{actual}") {
            return Err(Error::BlobDigestMismatch {
                expected: layer.digest.clone(),
                actual,
            });
        }
        if let Some(e) = stream_error {
            return Err(fetch_err(e.to_string()));
        }
        Ok(bytes)
    }
}

/// Turns a client error into the step-named error a user can act on.
fn classify(err: OciDistributionError, reference: &Reference) -> Error {
    let whole = reference.whole();
    match err {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            Error::ManifestNotFound { reference: whole }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                )
            }) {
                Error::ManifestNotFound { reference: whole }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Error::RegistryDenied {
                    reference: whole,
                    message: envelope
                        .errors
                        .iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                }
            } else {
                Error::ResolveDigest {
                    reference: whole,
                    message: envelope
                        .errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                }
            }
        }
        OciDistributionError::UnauthorizedError { .. } => Error::RegistryDenied {
            reference: whole,
            message: "401 Unauthorized".to_string(),
        },
        OciDistributionError::ServerError { code, message, .. } => match code {
            404 => Error::ManifestNotFound { reference: whole },
            401 | 403 => Error::RegistryDenied {
                reference: whole,
                message: format!("HTTP {code}"),
            },
            _ => Error::ResolveDigest {
                reference: whole,
                message: format!("registry answered HTTP {code}: {}", message.trim()),
            },
        },
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            Error::RegistryUnavailable {
                registry: reference.registry().to_string(),
                message: error_chain(&e),
            }
        }
        OciDistributionError::DigestError(e) => Error::ManifestDigestMismatch {
            reference: whole,
            expected: reference.digest().unwrap_or("(tag)").to_string(),
            actual: e.to_string(),
        },
        other => Error::ResolveDigest {
            reference: whole,
            message: error_chain(&other),
        },
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}
