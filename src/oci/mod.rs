//! Resolving a module reference: tag → manifest digest → module layer → verified bytes in the
//! cache. The pull side speaks the distribution protocol itself (`registry`), because auth
//! here is policy (per-filter credentials, guarded token realms); `oci-client` is used for
//! references and for pushing. Every digest is checked, and sizes are capped before and while
//! reading.

pub mod auth;
pub mod format;
mod push;
pub mod registry;

use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

pub use auth::Credentials;
pub use format::{ExtractError, Format, select_module_layer};
pub use push::{PushOptions, push_module};
pub use registry::RegistryClient;

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
    /// Certificates trusted for HTTPS besides the system roots (concatenated PEM).
    pub ca_pem: Vec<u8>,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (a stalled connection fails after this).
    pub read_timeout: Duration,
    /// Bound on one whole resolve-and-fetch.
    pub pull_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            plain_http: Vec::new(),
            ca_pem: Vec::new(),
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            pull_timeout: Duration::from_secs(600),
        }
    }
}

impl RegistryConfig {
    /// Adds the certificates of a PEM bundle (a CA file) to the trusted roots.
    pub fn trust_pem_bundle(&mut self, pem: &[u8]) -> Result<(), String> {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no PEM certificate found".into());
        }
        self.ca_pem.extend_from_slice(pem);
        self.ca_pem.push(b'\n');
        Ok(())
    }

    /// The extra trusted certificates, parsed.
    pub fn ca_certificates(&self) -> Vec<reqwest::Certificate> {
        if self.ca_pem.is_empty() {
            return Vec::new();
        }
        reqwest::Certificate::from_pem_bundle(&self.ca_pem).unwrap_or_default()
    }

    /// The extra trusted certificates, one PEM block each.
    fn ca_pem_blocks(&self) -> Vec<Vec<u8>> {
        const END: &str = "-----END CERTIFICATE-----";
        let text = String::from_utf8_lossy(&self.ca_pem);
        text.split_inclusive(END)
            .filter(|b| b.contains(END))
            .map(|b| b.trim_start().as_bytes().to_vec())
            .collect()
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
    /// ABI versions the artifact's runtime config declares (Solo format); the module's own
    /// marker wins when they disagree.
    pub declared_abi_versions: Vec<String>,
    /// Root ids the artifact's runtime config declares (Solo format).
    pub root_ids: Vec<String>,
}

/// Resolves references and fetches modules into the cache.
pub struct Resolver {
    registry: RegistryClient,
    config: RegistryConfig,
}

/// A module fetched into the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub artifact: Artifact,
    /// Bytes downloaded for it (0 when the cache already had the module).
    pub downloaded: u64,
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

/// Builds an `oci-client` client (used for pushing) for these settings.
pub fn client(config: &RegistryConfig) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(config.plain_http.clone()),
        connect_timeout: Some(config.connect_timeout),
        read_timeout: Some(config.read_timeout),
        extra_root_certificates: config
            .ca_pem_blocks()
            .into_iter()
            .map(|data| Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            })
            .collect(),
        ..Default::default()
    })
}

impl Resolver {
    pub fn new(config: RegistryConfig) -> Result<Self, Error> {
        Ok(Resolver {
            registry: RegistryClient::new(&config)?,
            config,
        })
    }

    /// Bearer tokens fetched so far (tokens are reused until they expire).
    pub fn tokens_fetched(&self) -> u64 {
        self.registry.stats().tokens_fetched
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
        creds: &Credentials,
    ) -> Result<Fetched, Error> {
        let (artifact, module, downloaded) = self
            .pull_counted(
                image,
                pinned_digest,
                expected_module_sha256,
                Some(cache),
                creds,
            )
            .await?;
        cache.insert(&module).map_err(Error::CacheWrite)?;
        Ok(Fetched {
            artifact,
            downloaded,
        })
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
        creds: &Credentials,
    ) -> Result<(Artifact, Vec<u8>), Error> {
        self.pull_counted(image, pinned_digest, expected_module_sha256, cache, creds)
            .await
            .map(|(a, m, _)| (a, m))
    }

    /// [`Resolver::pull`], also saying how many bytes were downloaded.
    async fn pull_counted(
        &self,
        image: &str,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        cache: Option<&ModuleCache>,
        creds: &Credentials,
    ) -> Result<(Artifact, Vec<u8>, u64), Error> {
        let reference = parse_reference(image)?;
        let whole = reference.whole();
        tokio::time::timeout(
            self.config.pull_timeout,
            self.pull_inner(
                image,
                reference,
                pinned_digest,
                expected_module_sha256,
                cache,
                creds,
            ),
        )
        .await
        .map_err(|_| Error::RegistryUnavailable {
            registry: whole,
            message: format!(
                "pull did not finish within {} s",
                self.config.pull_timeout.as_secs()
            ),
        })?
    }

    async fn pull_inner(
        &self,
        image: &str,
        reference: Reference,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        cache: Option<&ModuleCache>,
        creds: &Credentials,
    ) -> Result<(Artifact, Vec<u8>, u64), Error> {
        let reference = match pinned_digest {
            Some(d) => Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                d.to_string(),
            ),
            None => reference,
        };
        let (manifest, manifest_digest) = self.image_manifest(&reference, creds).await?;
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
        let mut downloaded = 0;
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let bytes = self.fetch_blob(&reference, layer, size, creds).await?;
                downloaded += bytes.len() as u64;
                bytes
            }
        };
        let declared = match format {
            Format::SoloOci => self.solo_config(&reference, &manifest, creds).await?,
            _ => format::DeclaredConfig::default(),
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
            declared_abi_versions: declared.abi_versions,
            root_ids: declared.root_ids,
        };
        Ok((artifact, module, downloaded))
    }

    /// Reads a Solo artifact's runtime config (`abiVersions`/`rootIds`, either spelling).
    async fn solo_config(
        &self,
        reference: &Reference,
        manifest: &OciImageManifest,
        creds: &Credentials,
    ) -> Result<format::DeclaredConfig, Error> {
        const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
        let config = &manifest.config;
        let size = u64::try_from(config.size).unwrap_or(u64::MAX);
        let invalid = |message: String| Error::InvalidArtifactConfig {
            reference: reference.whole(),
            message,
        };
        if size > MAX_CONFIG_BYTES {
            return Err(invalid(format!(
                "config blob claims {size} bytes, over the {MAX_CONFIG_BYTES}-byte cap"
            )));
        }
        let bytes = self.fetch_blob(reference, config, size, creds).await?;
        format::DeclaredConfig::parse(&bytes).map_err(invalid)
    }

    /// Fetches the image manifest for `reference`, following an index to its Wasm entry, and
    /// returns it with its verified digest.
    async fn image_manifest(
        &self,
        reference: &Reference,
        creds: &Credentials,
    ) -> Result<(OciImageManifest, String), Error> {
        let (manifest, digest) = self.manifest(reference, creds).await?;
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
                match self.manifest(&child, creds).await? {
                    (OciManifest::Image(m), d) => Ok((m, d)),
                    (OciManifest::ImageIndex(_), _) => Err(Error::NotAWasmArtifact {
                        reference: reference.whole(),
                        found: "an index nested in an index".to_string(),
                    }),
                }
            }
        }
    }

    async fn manifest(
        &self,
        reference: &Reference,
        creds: &Credentials,
    ) -> Result<(OciManifest, String), Error> {
        let (raw, claimed) = self
            .registry
            .manifest(reference, MANIFEST_MEDIA_TYPES, creds)
            .await?;
        let actual = format!("sha256:{}", sha256_hex(&raw));
        // The digest asked for, else the one the registry claims (only sha256 is checked:
        // it is the only algorithm registries use in practice).
        let expected = reference
            .digest()
            .map(str::to_string)
            .or(claimed.filter(|c| c.starts_with("sha256:")));
        if let Some(expected) = expected
            && actual != expected
        {
            return Err(Error::ManifestDigestMismatch {
                reference: reference.whole(),
                expected,
                actual,
            });
        }
        let manifest: OciManifest =
            serde_json::from_slice(&raw).map_err(|e| Error::ResolveDigest {
                reference: reference.whole(),
                message: format!("manifest is not a valid OCI or Docker manifest: {e}"),
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
        creds: &Credentials,
    ) -> Result<Vec<u8>, Error> {
        let fetch_err = |message: String| Error::FetchBlob {
            digest: layer.digest.clone(),
            message,
        };
        let mut resp = self
            .registry
            .get(reference, &format!("blobs/{}", layer.digest), &[], creds)
            .await
            .map_err(|e| match e {
                Error::ManifestNotFound { .. } => fetch_err(
                    "the registry has no such blob (the manifest names a layer it lacks)".into(),
                ),
                other => other,
            })?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 26));
        let mut hasher = Sha256::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if (bytes.len() + chunk.len()) as u64 > size {
                        return Err(fetch_err(format!(
                            "registry sent more than the {size} bytes the manifest declares"
                        )));
                    }
                    hasher.update(&chunk);
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(fetch_err(format!(
                        "after {} of {size} bytes: {}",
                        bytes.len(),
                        error_chain(&e)
                    )));
                }
            }
        }
        if (bytes.len() as u64) < size {
            return Err(fetch_err(format!(
                "truncated: got {} of {size} bytes",
                bytes.len()
            )));
        }
        let actual = hex::encode(hasher.finalize());
        if layer.digest != format!("sha256:{actual}") {
            return Err(Error::BlobDigestMismatch {
                expected: layer.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
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
