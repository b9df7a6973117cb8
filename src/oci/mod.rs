//! Resolving a module reference: tag → manifest digest → module layer → verified bytes in the
//! cache. The pull side speaks the distribution protocol itself (`registry`), because auth
//! here is policy (per-filter credentials, guarded token realms); `oci-client` is used for
//! references and for pushing. Every digest is checked, and sizes are capped before and while
//! reading.

pub mod auth;
mod error;
pub mod format;
pub mod keyless;
mod push;
mod reference;
mod registry;
mod secret;
pub mod sign;
pub mod signature;
mod tls;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};

pub use auth::Credentials;
pub use error::Error;
pub use format::{ExtractError, Format, select_module_layer};
pub use push::{PushOptions, push_module};
use registry::RegistryClient;
pub use secret::pull_credentials;

use crate::abi;
use crate::cache::{ModuleCache, sha256_hex};

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
        tls::parse_pem_bundle(pem)?;
        self.ca_pem.extend_from_slice(pem);
        self.ca_pem.push(b'\n');
        Ok(())
    }

    /// The TLS settings registry clients use: system roots and the extra CAs, loaded on the
    /// first handshake.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let extra = if self.ca_pem.is_empty() {
            Vec::new()
        } else {
            tls::parse_pem_bundle(&self.ca_pem)?
        };
        tls::client_config(extra).map_err(|e| e.to_string())
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
    /// The signature that verified its manifest, when one was required.
    pub signature: Option<signature::Verified>,
    /// What the pre-flight passed with (see `ArtifactStatus::preflight_passed`).
    pub preflight_passed: Option<String>,
}

/// Resolves references and fetches modules into the cache.
pub struct Resolver {
    registry: RegistryClient,
    config: RegistryConfig,
    /// What inspecting each module (by sha256) found, so a cached module is not read again.
    known: Mutex<HashMap<String, Summary>>,
    /// Parsed runtime configs, by blob digest (content-addressed, so never stale).
    configs: Mutex<HashMap<String, format::DeclaredConfig>>,
    /// The last manifest each tag resolved to (verified against its digest), by reference:
    /// the next resolution asks the registry with `If-None-Match`, and a `304` reuses it.
    tagged: Mutex<HashMap<String, (String, Vec<u8>)>>,
    /// Fetches of one image take turns, so filters sharing a module download it once: the
    /// second resolves the tag itself and then finds the module the first stored.
    fetching: crate::cache::Turns,
}

/// Bound on each in-memory table above; past it, the table starts over.
const MAX_REMEMBERED: usize = 4096;
/// Largest manifest remembered for a conditional request (a module's is under 2 KiB; the
/// 4 MiB a registry may send would make the table gigabytes).
const MAX_TAGGED_MANIFEST_BYTES: usize = 64 * 1024;

/// What the resolver remembers of a module it inspected.
#[derive(Debug, Clone)]
struct Summary {
    size: u64,
    abi_version: Option<String>,
}

/// What one pull gave: the artifact, the module and what inspecting it found (absent when the
/// cache held it already, or when it went to the spool file), bytes downloaded, whether the
/// spool file holds the module.
type Pulled = (Artifact, Option<(Vec<u8>, abi::ModuleInfo)>, u64, bool);

/// A pull without a cache or spool always returns the module's bytes.
fn no_module() -> Error {
    crate::cache::Error::Write(std::io::Error::other("no module bytes without a cache")).into()
}

/// Where a pull puts the module, and whether it reads the artifact's config too.
struct Sink<'a> {
    cache: Option<&'a ModuleCache>,
    /// Receives the module as it downloads (raw-layer formats only).
    spool: Option<std::fs::File>,
    /// Read the config blob (declared ABI versions and root ids)?
    config: bool,
}

/// A module fetched into the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub artifact: Artifact,
    /// Bytes downloaded for it (0 when the cache already had the module).
    pub downloaded: u64,
    /// What inspecting it found, when this call inspected it.
    pub info: Option<std::sync::Arc<abi::ModuleInfo>>,
}

/// Parses a user-written reference, accepting an `oci://` prefix.
/// A descriptor's `size`, which the OCI spec makes a non-negative int64.
fn descriptor_size(reference: &Reference, what: &str, size: i64) -> Result<u64, Error> {
    u64::try_from(size).map_err(|_| Error::InvalidManifest {
        reference: reference.whole(),
        message: format!("the {what} descriptor has a negative size ({size})"),
    })
}

pub fn parse_reference(image: &str) -> Result<Reference, Error> {
    reference::parse(image).ok_or_else(|| Error::InvalidReference {
        image: image.to_string(),
        message: "expected [registry/]repository[:tag][@sha256:<64 hex>], lowercase repository"
            .to_string(),
    })
}

/// Builds an `oci-client` client (used for pushing) for these settings.
pub fn client(config: &RegistryConfig) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(config.plain_http.clone()),
        connect_timeout: Some(config.connect_timeout),
        read_timeout: Some(config.read_timeout),
        // trust_pem_bundle already refused a bundle that does not parse.
        extra_root_certificates: tls::parse_pem_bundle(&config.ca_pem)
            .unwrap_or_default()
            .into_iter()
            .map(|der| Certificate {
                encoding: CertificateEncoding::Der,
                data: der.to_vec(),
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
            known: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
            tagged: Mutex::new(HashMap::new()),
            fetching: crate::cache::Turns::default(),
        })
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
        let image_key = image.strip_prefix("oci://").unwrap_or(image);
        self.fetching
            .run(image_key, async {
                let (artifact, module, downloaded, _) = self
                    .pull_counted(
                        image,
                        pinned_digest,
                        expected_module_sha256,
                        creds,
                        Sink {
                            cache: Some(cache),
                            spool: None,
                            config: true,
                        },
                    )
                    .await?;
                let info = match module {
                    Some((module, info)) => {
                        cache
                            .insert_off_thread(module)
                            .await
                            .map_err(crate::cache::Error::Write)?;
                        Some(std::sync::Arc::new(info))
                    }
                    None => None,
                };
                Ok(Fetched {
                    artifact,
                    downloaded,
                    info,
                })
            })
            .await
    }

    /// Resolves `image` (or, when `pinned_digest` is given, that manifest of the same
    /// repository), downloads its module and verifies every digest, the module itself and,
    /// when given, the expected module sha256.
    pub async fn pull(
        &self,
        image: &str,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        creds: &Credentials,
    ) -> Result<(Artifact, Vec<u8>), Error> {
        let sink = Sink {
            cache: None,
            spool: None,
            config: true,
        };
        match self
            .pull_counted(image, pinned_digest, expected_module_sha256, creds, sink)
            .await?
        {
            (artifact, Some((module, _)), _, _) => Ok((artifact, module)),
            (_, None, _, _) => Err(no_module()),
        }
    }

    /// What `wasmfilter pull` does: [`Resolver::pull`] of the manifest and the module layer
    /// only (the config blob, which only declares ABI versions and root ids, is not read, and
    /// the artifact says none). When the artifact's layer is the module itself, the module is
    /// written into `out` and inspected while it downloads (so neither follows the download,
    /// and no buffer of its size is needed), and no bytes are returned; otherwise the unpacked
    /// module is returned for the caller to write. Whatever `out` holds, the caller uses it only
    /// once this returned `Ok` (every check passed).
    pub async fn pull_into(
        &self,
        image: &str,
        creds: &Credentials,
        out: std::fs::File,
    ) -> Result<(Artifact, Option<Vec<u8>>), Error> {
        let sink = Sink {
            cache: None,
            spool: Some(out),
            config: false,
        };
        match self.pull_counted(image, None, None, creds, sink).await? {
            (artifact, _, _, true) => Ok((artifact, None)),
            (artifact, Some((module, _)), _, false) => Ok((artifact, Some(module))),
            (_, None, _, false) => Err(no_module()),
        }
    }

    /// [`Resolver::pull`], also saying how many bytes were downloaded and whether the sink's
    /// spool received the module.
    async fn pull_counted(
        &self,
        image: &str,
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        creds: &Credentials,
        sink: Sink<'_>,
    ) -> Result<Pulled, Error> {
        let whole = parse_reference(image)?.whole();
        tokio::time::timeout(
            self.config.pull_timeout,
            self.pull_inner(image, pinned_digest, expected_module_sha256, creds, sink),
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
        pinned_digest: Option<&str>,
        expected_module_sha256: Option<&str>,
        creds: &Credentials,
        sink: Sink<'_>,
    ) -> Result<Pulled, Error> {
        let Sink {
            cache,
            spool,
            config: read_config,
        } = sink;
        let reference = parse_reference(image)?;
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
        let size = descriptor_size(&reference, "module layer", layer.size)?;
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

        let image = image.strip_prefix("oci://").unwrap_or(image).to_string();
        let declared = || async {
            match format {
                Format::SoloOci if read_config => {
                    self.solo_config(&reference, &manifest, creds).await
                }
                _ => Ok(format::DeclaredConfig::default()),
            }
        };
        let check_pin = |actual: &str| match expected_module_sha256 {
            Some(expected) if expected != actual => Err(Error::ModuleSha256Mismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            }),
            _ => Ok(()),
        };

        // The raw-layer formats are content-addressed by the module's own hash: a module
        // already in the cache, inspected before by this process, needs neither a download
        // nor another read (the cache re-hashes a file only if it changed).
        if let Some(c) = cache
            && format.layer_is_module()
            && let Some(summary) = self.known(layer_hex)
            && c.verify_off_thread(layer_hex)
                .await
                .map_err(crate::cache::Error::Write)?
        {
            check_pin(layer_hex)?;
            let declared = declared().await?;
            let artifact = Artifact {
                image,
                manifest_digest,
                format,
                module_sha256: layer_hex.to_string(),
                size: summary.size,
                abi_version: summary.abi_version,
                declared_abi_versions: declared.abi_versions,
                root_ids: declared.root_ids,
                signature: None,
                preflight_passed: None,
            };
            return Ok((artifact, None, 0, false));
        }

        let cached = match cache {
            Some(c) if format.layer_is_module() => c
                .read_verified_off_thread(layer_hex)
                .await
                .map_err(crate::cache::Error::Write)?,
            _ => None,
        };
        // Only a raw layer is the module itself, worth writing as it arrives.
        let spool = spool.filter(|_| format.layer_is_module() && cached.is_none());
        let spooled = spool.is_some();
        // The runtime config and the module travel at once.
        let module_bytes = async {
            match cached {
                Some(bytes) => Ok((Blob::Bytes(bytes), 0)),
                None => {
                    let blob = self
                        .fetch_blob_into(&reference, layer, size, creds, spool)
                        .await?;
                    Ok::<_, Error>((blob, size))
                }
            }
        };
        // The module first: it takes the connection the manifest left idle.
        let ((blob, downloaded), declared) = tokio::try_join!(module_bytes, declared())?;
        let (module, info) = match blob {
            // Unpacking and validating are CPU work: off the async threads.
            Blob::Bytes(bytes) => {
                let limit = self.config.max_module_bytes;
                let (module, info) = tokio::task::spawn_blocking(move || {
                    let module = format.extract_module(bytes, limit)?;
                    let info = abi::inspect(&module);
                    Ok::<_, ExtractError>((module, info))
                })
                .await
                .map_err(|e| Error::InvalidModule {
                    reference: reference.whole(),
                    source: abi::ModuleError::Invalid(format!("inspecting the module failed: {e}")),
                })?
                .map_err(|source| Error::ExtractModule {
                    reference: reference.whole(),
                    source,
                })?;
                (Some(module), info)
            }
            // A raw layer, inspected as it was written to the spool.
            Blob::Spooled(info) => (None, info),
        };
        let info = info.map_err(|e| match e {
            abi::ModuleError::NotWasm { .. } => Error::NotAWasmArtifact {
                reference: reference.whole(),
                found: format!("layer {} ({}): {e}", layer.digest, layer.media_type),
            },
            source => Error::InvalidModule {
                reference: reference.whole(),
                source,
            },
        })?;
        // A raw layer was just verified against its digest: that is the module's sha256.
        let module_sha256 = match &module {
            Some(module) if !format.layer_is_module() => sha256_hex(module),
            _ => layer_hex.to_string(),
        };
        check_pin(&module_sha256)?;
        let summary = Summary {
            size: module.as_ref().map_or(size, |m| m.len() as u64),
            abi_version: info.abi_version().map(str::to_string),
        };
        self.remember(&module_sha256, summary.clone());
        let artifact = Artifact {
            image,
            manifest_digest,
            format,
            module_sha256,
            size: summary.size,
            abi_version: summary.abi_version,
            declared_abi_versions: declared.abi_versions,
            root_ids: declared.root_ids,
            signature: None,
            preflight_passed: None,
        };
        Ok((artifact, module.map(|m| (m, info)), downloaded, spooled))
    }

    fn known(&self, sha256: &str) -> Option<Summary> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned()
    }

    fn remember(&self, sha256: &str, summary: Summary) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(sha256.to_string(), summary);
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
        let size = descriptor_size(reference, "config", config.size)?;
        let invalid = |message: String| Error::InvalidArtifactConfig {
            reference: reference.whole(),
            message,
        };
        if size > MAX_CONFIG_BYTES {
            return Err(invalid(format!(
                "config blob claims {size} bytes, over the {MAX_CONFIG_BYTES}-byte cap"
            )));
        }
        if let Some(known) = self
            .configs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&config.digest)
        {
            return Ok(known.clone());
        }
        let bytes = self.fetch_blob(reference, config, size, creds).await?;
        let declared = format::DeclaredConfig::parse(&bytes).map_err(invalid)?;
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if configs.len() >= MAX_REMEMBERED {
            configs.clear();
        }
        configs.insert(config.digest.clone(), declared.clone());
        Ok(declared)
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
        // A tag resolved before is asked for only if it moved: a registry that still holds
        // that digest answers 304 and sends nothing.
        let tag = reference.digest().is_none().then(|| reference.whole());
        let known = tag.as_ref().and_then(|t| {
            self.tagged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(t)
                .cloned()
        });
        let (raw, claimed) = match known {
            Some((digest, raw)) => {
                match self
                    .registry
                    .manifest_unless(reference, MANIFEST_MEDIA_TYPES, creds, &digest)
                    .await?
                {
                    Some(fetched) => fetched,
                    // Verified when it was stored.
                    None => return parse_manifest(reference, &raw, digest),
                }
            }
            None => {
                self.registry
                    .manifest(reference, MANIFEST_MEDIA_TYPES, creds)
                    .await?
            }
        };
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
        let parsed = parse_manifest(reference, &raw, actual.clone())?;
        if let Some(tag) = tag.filter(|_| raw.len() <= MAX_TAGGED_MANIFEST_BYTES) {
            let mut tagged = self.tagged.lock().unwrap_or_else(|p| p.into_inner());
            if tagged.len() >= MAX_REMEMBERED {
                tagged.clear();
            }
            tagged.insert(tag, (actual, raw));
        }
        Ok(parsed)
    }

    /// Downloads a blob into memory with a hard size cap, hashing it as it goes, and refuses
    /// bytes that do not match the descriptor's digest or size.
    async fn fetch_blob(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        size: u64,
        creds: &Credentials,
    ) -> Result<Vec<u8>, Error> {
        match self
            .fetch_blob_into(reference, layer, size, creds, None)
            .await?
        {
            Blob::Bytes(bytes) => Ok(bytes),
            Blob::Spooled(_) => Err(Error::FetchBlob {
                digest: layer.digest.clone(),
                message: "the blob went to a spool file".into(),
            }),
        }
    }

    /// [`Resolver::fetch_blob`]; given a spool file, the blob is written there and inspected as
    /// a module as it arrives instead of kept in memory.
    async fn fetch_blob_into(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        size: u64,
        creds: &Credentials,
        spool: Option<std::fs::File>,
    ) -> Result<Blob, Error> {
        let fetch_err = |message: String| Error::FetchBlob {
            digest: layer.digest.clone(),
            message,
        };
        // Hash, write and inspect beside the download, off the async threads. A spooled module
        // is not also kept in memory: it is inspected as it arrives. A large one gets a thread
        // for each job, so they overlap instead of adding up; a small one gets one thread for all
        // three, as three threads cost more to start and to wake than the work they would
        // share (`e2e/bench.sh pull`: 0.7-1.5 ms of CPU at 1 MiB). The threads start while the
        // registry answers.
        let spooled = spool.is_some();
        let jobs = match spool {
            None => vec![Consumer::hashing()],
            Some(out) if size < ONE_THREAD_BELOW_BYTES => {
                vec![Consumer::hashing().writing(out).inspecting()]
            }
            Some(out) => vec![
                Consumer::hashing(),
                Consumer::default().writing(out),
                Consumer::default().inspecting(),
            ],
        };
        let (senders, threads): (Vec<_>, Vec<_>) = jobs.into_iter().map(Consumer::spawn).unzip();
        let mut memory =
            (!spooled).then(|| Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 26)));
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
        let mut received = 0u64;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    if received > size {
                        return Err(fetch_err(format!(
                            "registry sent more than the {size} bytes the manifest declares"
                        )));
                    }
                    if let Some(bytes) = &mut memory {
                        bytes.extend_from_slice(&chunk);
                    }
                    // A consumer takes every chunk until the channel closes; a closed one
                    // panicked.
                    for tx in &senders {
                        if tx.send(chunk.clone()).await.is_err() {
                            return Err(fetch_err("a thread beside the download stopped".into()));
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(fetch_err(format!(
                        "after {received} of {size} bytes: {}",
                        error_chain(&e)
                    )));
                }
            }
        }
        drop(senders);
        if received < size {
            return Err(fetch_err(format!(
                "truncated: got {received} of {size} bytes"
            )));
        }
        let mut consumed = Consumed::default();
        for thread in threads {
            let c = thread
                .await
                .map_err(|e| fetch_err(format!("a thread beside the download stopped: {e}")))?;
            consumed.sha256 = consumed.sha256.or(c.sha256);
            consumed.written = consumed.written.or(c.written);
            consumed.inspected = consumed.inspected.or(c.inspected);
        }
        let actual = consumed
            .sha256
            .ok_or_else(|| fetch_err("the blob was not hashed".into()))?;
        if let Some(written) = consumed.written {
            written.map_err(crate::cache::Error::Write)?;
        }
        if layer.digest != format!("sha256:{actual}") {
            return Err(Error::BlobDigestMismatch {
                expected: layer.digest.clone(),
                actual,
            });
        }
        Ok(match memory {
            Some(bytes) => Blob::Bytes(bytes),
            None => Blob::Spooled(consumed.inspected.unwrap_or_else(|| {
                Err(abi::ModuleError::Invalid(
                    "the module was not inspected".into(),
                ))
            })),
        })
    }
}

/// Spooled modules under this size are hashed, written and inspected on one thread; larger ones
/// on a thread for each.
const ONE_THREAD_BELOW_BYTES: u64 = 4 << 20;

/// What a thread beside a download does with each chunk of a blob: any of hashing it, writing
/// it to the spool file and inspecting it as a module.
#[derive(Default)]
struct Consumer {
    hash: Option<ring::digest::Context>,
    /// The file, and the first write error (writing stops there; the chunks are still taken).
    write: Option<(std::io::BufWriter<std::fs::File>, std::io::Result<()>)>,
    inspect: Option<abi::stream::Inspector>,
}

/// What the [`Consumer`]s found once the blob ended.
#[derive(Default)]
struct Consumed {
    sha256: Option<String>,
    written: Option<std::io::Result<()>>,
    inspected: Option<Result<abi::ModuleInfo, abi::ModuleError>>,
}

impl Consumer {
    fn hashing() -> Self {
        Consumer {
            hash: Some(ring::digest::Context::new(&ring::digest::SHA256)),
            ..Default::default()
        }
    }

    fn writing(self, out: std::fs::File) -> Self {
        Consumer {
            write: Some((std::io::BufWriter::new(out), Ok(()))),
            ..self
        }
    }

    fn inspecting(self) -> Self {
        Consumer {
            inspect: Some(abi::stream::Inspector::new()),
            ..self
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        use std::io::Write as _;
        if let Some(h) = &mut self.hash {
            h.update(chunk);
        }
        if let Some((out, result)) = &mut self.write
            && result.is_ok()
        {
            *result = out.write_all(chunk);
        }
        if let Some(i) = &mut self.inspect {
            i.feed(chunk);
        }
    }

    fn finish(self) -> Consumed {
        use std::io::Write as _;
        Consumed {
            sha256: self.hash.map(|h| hex::encode(h.finish())),
            written: self
                .write
                .map(|(mut out, result)| result.and_then(|()| out.flush())),
            inspected: self.inspect.map(abi::stream::Inspector::finish),
        }
    }

    /// Runs on a blocking thread, fed chunks through the sender until it is dropped.
    fn spawn(
        mut self,
    ) -> (
        tokio::sync::mpsc::Sender<bytes::Bytes>,
        tokio::task::JoinHandle<Consumed>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
        let thread = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                self.feed(&chunk);
            }
            self.finish()
        });
        (tx, thread)
    }
}

/// A blob [`Resolver::fetch_blob_into`] verified: its bytes, or, when they went to a spool file,
/// what inspecting them as a module found.
enum Blob {
    Bytes(Vec<u8>),
    Spooled(Result<abi::ModuleInfo, abi::ModuleError>),
}

/// A manifest's bytes, parsed, with its digest.
fn parse_manifest(
    reference: &Reference,
    raw: &[u8],
    digest: String,
) -> Result<(OciManifest, String), Error> {
    let manifest: OciManifest = serde_json::from_slice(raw).map_err(|e| Error::ResolveDigest {
        reference: reference.whole(),
        message: format!("manifest is not a valid OCI or Docker manifest: {e}"),
    })?;
    Ok((manifest, digest))
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
