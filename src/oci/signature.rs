//! cosign signatures of a module's manifest, in either of cosign's two forms:
//! - its tag scheme (cosign 2's default): the manifest tagged `sha256-<hex of the signed
//!   manifest digest>.sig` in the same repository, each of its layers a "simple signing" payload
//!   (`application/vnd.dev.cosign.simplesigning.v1+json`) naming the signed digest, with the
//!   signature in the `dev.cosignproject.cosign/signature` annotation (base64 ECDSA P-256 /
//!   SHA-256 over the payload bytes, as `cosign sign --key` writes);
//! - Sigstore bundles (`application/vnd.dev.sigstore.bundle.v0.3+json`, cosign 3's default and
//!   cosign 2's `--new-bundle-format`), each the layer of a manifest whose `subject` is the
//!   signed manifest, found through the OCI 1.1 referrers API or, on registries without it,
//!   its fallback tag `sha256-<hex>`: a DSSE envelope of an in-toto statement naming the
//!   digest with cosign's signing predicate, signed over DSSE's pre-authentication encoding.
//!
//! Fetching is [`Resolver::cosign_signatures`] (every digest checked like a module's);
//! deciding is [`verify`], pure. Keys are PEM `PUBLIC KEY`s (cosign's own, ECDSA P-256). No
//! transparency log is consulted (as `cosign verify --insecure-ignore-tlog`). Keyless
//! signatures (a certificate instead of a key) are judged by [`verify_keyless`] against a
//! trusted root ([`super::keyless`]).

use oci_client::Reference;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use serde::Deserialize;

use super::keyless::{KeylessTrust, LogEntry};
use super::{Credentials, Error as OciError, Resolver};
use crate::cache::sha256_hex;

/// The media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The annotation holding a keyless signature's PEM certificate.
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// The annotation holding a transparency log's promise (cosign's "bundle" of the tag scheme).
pub const LOG_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// The largest payload read (cosign's are a few hundred bytes).
const MAX_PAYLOAD_BYTES: u64 = 64 << 10;
/// Signatures looked at, at most (of each form).
const MAX_SIGNATURES: usize = 32;
/// The media types (and artifact types) of a Sigstore bundle.
pub const BUNDLE_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
];
/// A DSSE envelope's payload type for an in-toto statement.
const IN_TOTO: &str = "application/vnd.in-toto+json";
/// The predicate type of cosign's image signature statement.
const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// One signature as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// What was signed: the simple-signing payload, or the DSSE envelope's payload.
    pub payload: Vec<u8>,
    /// The base64 signature, if there was one.
    pub signature: Option<String>,
    /// From a Sigstore bundle; `None`: cosign's tag scheme.
    pub bundle: Option<Bundled>,
    /// The signing certificate (DER) of a keyless signature.
    pub certificate: Option<Vec<u8>>,
    /// A transparency log's promise that it recorded the signature, and when.
    pub log: Option<LogEntry>,
}

/// Where a signature from a Sigstore bundle came from, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundled {
    /// The digest of the manifest holding the bundle.
    pub manifest_digest: String,
    /// The DSSE envelope's payload type.
    pub payload_type: String,
    /// Why the bundle cannot be used, when it cannot.
    pub problem: Option<String>,
}

/// The signatures of one manifest: those under the signature tag (and the digest of the
/// manifest there, empty when there is none), then those of the bundles referring to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signatures {
    pub tag: String,
    pub manifest_digest: String,
    pub found: Vec<Found>,
}

/// A trusted public key, with a name to report.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Where it came from (`ConfigMap signing-keys, key team.pub`, a file name).
    pub name: String,
    key: VerifyingKey,
    /// `sha256:<hex>` of the key's DER (SubjectPublicKeyInfo) encoding, as a stable id.
    pub fingerprint: String,
}

impl TrustedKey {
    /// Parses a PEM `PUBLIC KEY` (ECDSA P-256, what `cosign generate-key-pair` writes).
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, String> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| format!("{name} is not an ECDSA P-256 PEM public key: {e}"))?;
        let der = key
            .to_public_key_der()
            .map_err(|e| format!("{name}: cannot encode the key: {e}"))?;
        Ok(TrustedKey {
            name: name.to_string(),
            fingerprint: format!("sha256:{}", sha256_hex(der.as_bytes())),
            key,
        })
    }
}

/// Who signed what was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `cosign` (the tag scheme) or `sigstore-bundle`.
    pub scheme: String,
    /// The trusted key's name and fingerprint.
    pub key: String,
    pub key_fingerprint: String,
    /// The digest of the signature manifest (`sha256-<hex>.sig`).
    pub signature_digest: String,
}

/// Why a manifest is not verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{digest} has no cosign signature (no {tag} in the repository, and no Sigstore bundle refers to it)"
    )]
    Missing { digest: String, tag: String },

    #[error("the cosign signature of {digest} is not valid: {message}")]
    Invalid { digest: String, message: String },

    #[error(
        "no cosign signature of {digest} verifies with the trusted keys ({keys}): signed by another key, or altered"
    )]
    NotTrusted { digest: String, keys: String },

    #[error(
        "no keyless cosign signature of {digest} is by a required identity under {trust}: {why}"
    )]
    IdentityNotTrusted {
        digest: String,
        trust: String,
        why: String,
    },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing { .. } => "SignatureMissing",
            Refusal::Invalid { .. } => "SignatureInvalid",
            Refusal::NotTrusted { .. } | Refusal::IdentityNotTrusted { .. } => "SignerNotTrusted",
        }
    }
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The cosign tag of a manifest digest: `sha256:abc…` → `sha256-abc….sig`.
pub fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replacen(':', "-", 1))
}

/// Decides whether `signatures` hold one, for `digest`, that a key in `keys` made. A payload
/// that names another digest, is not a cosign payload, or has no readable signature makes
/// the signatures invalid only when no other one verifies.
pub fn verify(
    digest: &str,
    signatures: Option<&Signatures>,
    keys: &[TrustedKey],
) -> Result<Verified, Refusal> {
    let judged = judge_each(digest, signatures, |_, signed, signature| {
        keys.iter()
            .find(|k| k.key.verify(signed, signature).is_ok())
            .map(|k| (k.name.clone(), k.fingerprint.clone()))
            .ok_or_else(String::new)
    });
    judged.map_err(|e| {
        e.refusal(digest, signatures, || Refusal::NotTrusted {
            digest: digest.to_string(),
            keys: keys
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    })
}

/// Decides whether `signatures` hold a keyless one, for `digest`, whose certificate `trust`
/// accepts at `now` (Unix seconds) for a required identity, made with that certificate's key.
pub fn verify_keyless(
    digest: &str,
    signatures: Option<&Signatures>,
    trust: &KeylessTrust,
    now: i64,
) -> Result<Verified, Refusal> {
    let judged = judge_each(digest, signatures, |found, signed, signature| {
        let Some(certificate) = &found.certificate else {
            return Err("a signature made with a key, not a certificate".into());
        };
        // Judged when a trusted log promises it was signed; else (no promise, or one that does
        // not verify) now, which is never more lenient.
        let logged = found.log.as_ref().map(|entry| {
            trust.logged_time(
                entry,
                &found.payload,
                found.signature.as_deref().unwrap_or_default(),
                certificate,
            )
        });
        let at = match &logged {
            Some(Ok(t)) => *t,
            _ => now,
        };
        let certified = trust.check(certificate, at).map_err(|why| match &logged {
            Some(Err(log)) => format!("{why} ({log}, so it was judged now)"),
            _ => why,
        })?;
        certified
            .key
            .verify(signed, signature)
            .map_err(|_| "a signature does not verify with its certificate's key".to_string())?;
        Ok((certified.who, certified.fingerprint))
    });
    judged.map_err(|e| {
        e.refusal(digest, signatures, || Refusal::IdentityNotTrusted {
            digest: digest.to_string(),
            trust: trust.describe(),
            why: e.untrusted.join("; "),
        })
    })
}

/// Why no signature was accepted: what was wrong with the malformed ones, how many were well
/// formed, and why the judge refused those.
struct Unaccepted {
    problems: Vec<String>,
    well_formed: usize,
    untrusted: Vec<String>,
}

impl Unaccepted {
    fn refusal(
        &self,
        digest: &str,
        signatures: Option<&Signatures>,
        not_trusted: impl FnOnce() -> Refusal,
    ) -> Refusal {
        if signatures.is_none_or(|s| s.found.is_empty()) {
            return Refusal::Missing {
                digest: digest.to_string(),
                tag: signature_tag(digest),
            };
        }
        if self.well_formed == 0 {
            return Refusal::Invalid {
                digest: digest.to_string(),
                message: self.problems.join("; "),
            };
        }
        not_trusted()
    }
}

/// Checks each signature's payload names `digest` and its signature parses, then asks `judge`
/// (with the signed bytes) who made it: the first it names is the verified signer.
fn judge_each(
    digest: &str,
    signatures: Option<&Signatures>,
    judge: impl Fn(&Found, &[u8], &Signature) -> Result<(String, String), String>,
) -> Result<Verified, Unaccepted> {
    let mut out = Unaccepted {
        problems: Vec::new(),
        well_formed: 0,
        untrusted: Vec::new(),
    };
    let Some(sigs) = signatures.filter(|s| !s.found.is_empty()) else {
        return Err(out);
    };
    for found in &sigs.found {
        let signed = match &found.bundle {
            None => simple_signing(digest, &found.payload).map(|()| found.payload.clone()),
            Some(b) => in_toto(digest, b, &found.payload),
        };
        let signed = match signed {
            Ok(s) => s,
            Err(p) => {
                out.problems.push(p);
                continue;
            }
        };
        let Some(signature) = found
            .signature
            .as_deref()
            .and_then(base64_decode)
            .and_then(|der| Signature::from_der(&der).ok())
        else {
            out.problems
                .push("a layer has no readable signature annotation".into());
            continue;
        };
        out.well_formed += 1;
        match judge(found, &signed, &signature) {
            Ok((key, key_fingerprint)) => {
                let (scheme, holder) = match &found.bundle {
                    None => ("cosign", sigs.manifest_digest.clone()),
                    Some(b) => ("sigstore-bundle", b.manifest_digest.clone()),
                };
                return Ok(Verified {
                    scheme: scheme.to_string(),
                    key,
                    key_fingerprint,
                    signature_digest: holder,
                });
            }
            Err(why) if !why.is_empty() && !out.untrusted.contains(&why) => out.untrusted.push(why),
            Err(_) => {}
        }
    }
    Err(out)
}

/// Checks a simple-signing payload names `digest`.
fn simple_signing(digest: &str, payload: &[u8]) -> Result<(), String> {
    let payload: Payload = serde_json::from_slice(payload)
        .map_err(|e| format!("a payload is not a cosign simple-signing payload: {e}"))?;
    if payload.critical.kind != "cosign container image signature" {
        return Err(format!(
            "a payload has type {:?}, not a cosign container image signature",
            payload.critical.kind
        ));
    }
    if payload.critical.image.docker_manifest_digest != digest {
        return Err(format!(
            "a payload signs {}, not {digest}",
            payload.critical.image.docker_manifest_digest
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "predicateType")]
    predicate_type: String,
    #[serde(default)]
    subject: Vec<Subject>,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    digest: std::collections::BTreeMap<String, String>,
}

/// Checks a bundle's in-toto statement is cosign's signature of `digest`; returns the bytes
/// its signature covers (DSSE's pre-authentication encoding of the payload).
fn in_toto(digest: &str, bundle: &Bundled, payload: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(p) = &bundle.problem {
        return Err(p.clone());
    }
    if bundle.payload_type != IN_TOTO {
        return Err(format!(
            "a bundle's envelope holds {:?}, not an in-toto statement",
            bundle.payload_type
        ));
    }
    let statement: Statement = serde_json::from_slice(payload)
        .map_err(|e| format!("a bundle's statement is not an in-toto statement: {e}"))?;
    if statement.predicate_type != COSIGN_SIGN_PREDICATE {
        return Err(format!(
            "a bundle attests {:?}, not cosign's signature ({COSIGN_SIGN_PREDICATE})",
            statement.predicate_type
        ));
    }
    let hex = digest.trim_start_matches("sha256:");
    if !statement
        .subject
        .iter()
        .any(|s| s.digest.get("sha256").map(String::as_str) == Some(hex))
    {
        let named: Vec<String> = statement
            .subject
            .iter()
            .filter_map(|s| s.digest.get("sha256"))
            .map(|h| format!("sha256:{h}"))
            .collect();
        return Err(format!(
            "a bundle signs {}, not {digest}",
            if named.is_empty() {
                "no sha256 digest".to_string()
            } else {
                named.join(", ")
            }
        ));
    }
    Ok(pae(&bundle.payload_type, payload))
}

/// DSSE's pre-authentication encoding: what a DSSE signature is over.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BundleDoc {
    #[serde(default)]
    verification_material: Option<serde_json::Value>,
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

/// A bundle that cannot be used, and why (reported only when no signature verifies).
fn unusable(holder: &str, problem: String) -> Found {
    Found {
        payload: Vec::new(),
        signature: None,
        certificate: None,
        log: None,
        bundle: Some(Bundled {
            manifest_digest: holder.to_string(),
            payload_type: String::new(),
            problem: Some(problem),
        }),
    }
}

/// A number protobuf's JSON may write as a string.
fn int(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// A bundle's transparency log entry, when it carries the log's promise.
fn bundle_log(entry: &serde_json::Value) -> Option<LogEntry> {
    Some(LogEntry {
        log_id: base64_decode(entry.pointer("/logId/keyId")?.as_str()?)?,
        log_index: int(&entry["logIndex"])?,
        integrated_time: int(&entry["integratedTime"])?,
        body: entry["canonicalizedBody"].as_str()?.to_string(),
        set: base64_decode(
            entry
                .pointer("/inclusionPromise/signedEntryTimestamp")?
                .as_str()?,
        )?,
    })
}

/// The tag scheme's log annotation: `{"SignedEntryTimestamp", "Payload": {"body",
/// "integratedTime", "logIndex", "logID" (hex)}}`.
fn tag_scheme_log(annotation: &str) -> Option<LogEntry> {
    let v: serde_json::Value = serde_json::from_str(annotation).ok()?;
    let p = &v["Payload"];
    Some(LogEntry {
        log_id: hex::decode(p["logID"].as_str()?).ok()?,
        log_index: int(&p["logIndex"])?,
        integrated_time: int(&p["integratedTime"])?,
        body: p["body"].as_str()?.to_string(),
        set: base64_decode(v["SignedEntryTimestamp"].as_str()?)?,
    })
}

/// The signatures in one Sigstore bundle (the manifest `holder` holds it).
fn parse_bundle(bytes: &[u8], holder: &str) -> Vec<Found> {
    let doc: BundleDoc = match serde_json::from_slice(bytes) {
        Ok(d) => d,
        Err(e) => {
            return vec![unusable(
                holder,
                format!("a bundle is not a Sigstore bundle: {e}"),
            )];
        }
    };
    let log = doc
        .verification_material
        .as_ref()
        .and_then(|v| v.pointer("/tlogEntries/0"))
        .and_then(bundle_log);
    // The signing certificate: v0.3 bundles hold it alone, older ones a chain, leaf first.
    let certificate = doc.verification_material.as_ref().and_then(|v| {
        let raw = v
            .pointer("/certificate/rawBytes")
            .or_else(|| v.pointer("/x509CertificateChain/certificates/0/rawBytes"))?;
        base64_decode(raw.as_str()?)
    });
    let Some(envelope) = doc.dsse_envelope else {
        return vec![unusable(
            holder,
            "a bundle holds no DSSE envelope (cosign signs images with one)".into(),
        )];
    };
    let Some(payload) = base64_decode(&envelope.payload) else {
        return vec![unusable(
            holder,
            "a bundle's envelope payload is not base64".into(),
        )];
    };
    envelope
        .signatures
        .into_iter()
        .take(MAX_SIGNATURES)
        .map(|s| Found {
            payload: payload.clone(),
            signature: Some(s.sig),
            certificate: certificate.clone(),
            log: log.clone(),
            bundle: Some(Bundled {
                manifest_digest: holder.to_string(),
                payload_type: envelope.payload_type.clone(),
                problem: None,
            }),
        })
        .collect()
}

impl Resolver {
    /// The cosign signatures of `manifest_digest` in `image`'s repository, of both forms;
    /// `None` when there are none (no signature tag, no bundle). Every digest is checked: the
    /// signature manifests', and each payload's or bundle's against its descriptor.
    pub async fn cosign_signatures(
        &self,
        image: &str,
        manifest_digest: &str,
        creds: &Credentials,
    ) -> Result<Option<Signatures>, OciError> {
        let source = super::parse_reference(image)?;
        let tag = signature_tag(manifest_digest);
        let (holder, mut found) = self
            .tag_scheme(&source, &tag, creds)
            .await?
            .unwrap_or_default();
        found.extend(self.bundles(&source, manifest_digest, creds).await?);
        if holder.is_empty() && found.is_empty() {
            return Ok(None);
        }
        Ok(Some(Signatures {
            tag,
            manifest_digest: holder,
            found,
        }))
    }

    /// The signatures under cosign's signature tag, and that manifest's digest.
    async fn tag_scheme(
        &self,
        source: &Reference,
        tag: &str,
        creds: &Credentials,
    ) -> Result<Option<(String, Vec<Found>)>, OciError> {
        let reference = Reference::with_tag(
            source.registry().to_string(),
            source.repository().to_string(),
            tag.to_string(),
        );
        let (manifest, digest) = match self.manifest(&reference, creds).await {
            Ok(m) => m,
            Err(OciError::ManifestNotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let oci_client::manifest::OciManifest::Image(manifest) = manifest else {
            return Err(OciError::ResolveDigest {
                reference: reference.whole(),
                message: "the signature tag names an index, not a signature manifest".into(),
            });
        };
        let mut found = Vec::new();
        for layer in manifest
            .layers
            .iter()
            .filter(|l| l.media_type == SIMPLE_SIGNING)
            .take(MAX_SIGNATURES)
        {
            let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
            if size > MAX_PAYLOAD_BYTES {
                continue;
            }
            let payload = self.fetch_blob(&reference, layer, size, creds).await?;
            let annotation = |name: &str| layer.annotations.as_ref()?.get(name).cloned();
            found.push(Found {
                payload,
                signature: annotation(SIGNATURE_ANNOTATION),
                bundle: None,
                certificate: annotation(CERTIFICATE_ANNOTATION).and_then(|pem| {
                    pem_rfc7468::decode_vec(pem.trim().as_bytes())
                        .ok()
                        .filter(|(label, _)| *label == "CERTIFICATE")
                        .map(|(_, der)| der)
                }),
                log: annotation(LOG_ANNOTATION).and_then(|b| tag_scheme_log(&b)),
            });
        }
        Ok(Some((digest, found)))
    }

    /// The signatures in the Sigstore bundles referring to `digest`: through the referrers
    /// API, else (a registry without it) its fallback tag `sha256-<hex>`.
    async fn bundles(
        &self,
        source: &Reference,
        digest: &str,
        creds: &Credentials,
    ) -> Result<Vec<Found>, OciError> {
        let (registry, repository) = (
            source.registry().to_string(),
            source.repository().to_string(),
        );
        let at = Reference::with_digest(registry.clone(), repository.clone(), digest.to_string());
        let index = match self.registry.referrers(&at, digest, creds).await {
            Ok(body) => body,
            Err(OciError::ManifestNotFound { .. } | OciError::ResolveDigest { .. }) => {
                let fallback = Reference::with_tag(
                    registry.clone(),
                    repository.clone(),
                    digest.replacen(':', "-", 1),
                );
                match self.registry.manifest(&fallback, &[OCI_INDEX], creds).await {
                    Ok((body, _)) => body,
                    Err(OciError::ManifestNotFound { .. }) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let index: Index = serde_json::from_slice(&index).map_err(|e| OciError::ResolveDigest {
            reference: at.whole(),
            message: format!("the index of what refers to it is not an OCI index: {e}"),
        })?;
        let mut found = Vec::new();
        for entry in index
            .manifests
            .iter()
            .filter(|m| match m.artifact_type.as_deref() {
                // cosign's fallback index names the empty config's type, not the manifest's.
                None | Some(OCI_EMPTY) => true,
                Some(t) => BUNDLE_MEDIA_TYPES.contains(&t),
            })
            .take(MAX_SIGNATURES)
        {
            let holder =
                Reference::with_digest(registry.clone(), repository.clone(), entry.digest.clone());
            let (manifest, holder_digest) = self.manifest(&holder, creds).await?;
            let oci_client::manifest::OciManifest::Image(m) = manifest else {
                found.push(unusable(
                    &holder_digest,
                    "a bundle's manifest is an index".into(),
                ));
                continue;
            };
            let is_bundle = |t: &str| BUNDLE_MEDIA_TYPES.contains(&t);
            if !m.artifact_type.as_deref().is_some_and(is_bundle)
                && !m.layers.iter().any(|l| is_bundle(&l.media_type))
            {
                // Something else refers to it (an SBOM, an attestation): not a signature.
                continue;
            }
            let subject = m.subject.as_ref().map(|s| s.digest.as_str());
            if subject != Some(digest) {
                found.push(unusable(
                    &holder_digest,
                    format!(
                        "a bundle's manifest refers to {}, not {digest}",
                        subject.unwrap_or("nothing")
                    ),
                ));
                continue;
            }
            let Some(layer) = m
                .layers
                .iter()
                .find(|l| BUNDLE_MEDIA_TYPES.contains(&l.media_type.as_str()))
            else {
                found.push(unusable(
                    &holder_digest,
                    "a bundle's manifest has no bundle layer".into(),
                ));
                continue;
            };
            let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
            if size > MAX_PAYLOAD_BYTES {
                found.push(unusable(
                    &holder_digest,
                    format!("a bundle is larger than {MAX_PAYLOAD_BYTES} bytes"),
                ));
                continue;
            }
            let bytes = self.fetch_blob(&holder, layer, size, creds).await?;
            found.extend(parse_bundle(&bytes, &holder_digest));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::LineEnding;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn key(seed: u8) -> (SigningKey, TrustedKey) {
        let signing = SigningKey::from_slice(&[seed; 32]).unwrap();
        let pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        (
            signing,
            TrustedKey::from_pem(&format!("key{seed}"), &pem).unwrap(),
        )
    }

    fn payload(digest: &str) -> Vec<u8> {
        serde_json::json!({
            "critical": {
                "identity": {"docker-reference": "registry.example/filters/x"},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature"
            },
            "optional": null
        })
        .to_string()
        .into_bytes()
    }

    fn signed(by: &SigningKey, payload: Vec<u8>) -> Found {
        use base64::Engine as _;
        let sig: Signature = by.sign(&payload);
        Found {
            signature: Some(
                base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
            ),
            payload,
            bundle: None,
            certificate: None,
            log: None,
        }
    }

    fn sigs(found: Vec<Found>) -> Signatures {
        Signatures {
            tag: signature_tag(DIGEST),
            manifest_digest: "sha256:2222".into(),
            found,
        }
    }

    #[test]
    fn a_signature_by_a_trusted_key_over_this_digest_verifies() {
        let (a, trusted_a) = key(1);
        let (_, trusted_b) = key(2);
        let s = sigs(vec![signed(&a, payload(DIGEST))]);
        let v = verify(DIGEST, Some(&s), &[trusted_b.clone(), trusted_a.clone()]).unwrap();
        assert_eq!(v.key, "key1");
        assert_eq!(v.key_fingerprint, trusted_a.fingerprint);
        assert_eq!(v.signature_digest, "sha256:2222");
        let refused = verify(DIGEST, Some(&s), &[trusted_b]).unwrap_err();
        assert_eq!(refused.reason(), "SignerNotTrusted");
    }

    #[test]
    fn missing_altered_and_misdirected_signatures_are_refused_with_their_reason() {
        let (a, trusted_a) = key(1);
        let keys = [trusted_a];
        assert_eq!(
            verify(DIGEST, None, &keys).unwrap_err().reason(),
            "SignatureMissing"
        );
        assert_eq!(
            verify(DIGEST, Some(&sigs(vec![])), &keys)
                .unwrap_err()
                .reason(),
            "SignatureMissing"
        );
        // Signed, but over another manifest.
        let other = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
        let e = verify(DIGEST, Some(&sigs(vec![signed(&a, payload(other))])), &keys).unwrap_err();
        assert_eq!(e.reason(), "SignatureInvalid");
        assert!(e.to_string().contains(other), "{e}");
        // The payload altered after signing.
        let mut altered = signed(&a, payload(DIGEST));
        altered.payload.push(b' ');
        let e = verify(DIGEST, Some(&sigs(vec![altered])), &keys).unwrap_err();
        assert_eq!(e.reason(), "SignerNotTrusted");
        // No signature annotation.
        let mut bare = signed(&a, payload(DIGEST));
        bare.signature = None;
        let e = verify(DIGEST, Some(&sigs(vec![bare])), &keys).unwrap_err();
        assert_eq!(e.reason(), "SignatureInvalid");
        // One good signature among bad ones is enough.
        let good = signed(&a, payload(DIGEST));
        let misdirected = signed(&a, payload(other));
        assert!(verify(DIGEST, Some(&sigs(vec![misdirected, good])), &keys).is_ok());
    }

    fn statement(digest: &str, predicate: &str) -> Vec<u8> {
        serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"digest": {"sha256": digest.trim_start_matches("sha256:")}}],
            "predicateType": predicate,
        })
        .to_string()
        .into_bytes()
    }

    fn bundled(by: &SigningKey, payload: Vec<u8>) -> Found {
        use base64::Engine as _;
        let sig: Signature = by.sign(&pae(IN_TOTO, &payload));
        Found {
            signature: Some(
                base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
            ),
            payload,
            certificate: None,
            log: None,
            bundle: Some(Bundled {
                manifest_digest: "sha256:4444".into(),
                payload_type: IN_TOTO.into(),
                problem: None,
            }),
        }
    }

    #[test]
    fn dsse_pre_authentication_encoding_matches_the_spec() {
        // The DSSE specification's own example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn a_bundle_verifies_only_as_cosigns_signature_of_this_digest_by_a_trusted_key() {
        let (a, trusted_a) = key(1);
        let (b, _) = key(2);
        let keys = [trusted_a];
        let good = bundled(&a, statement(DIGEST, COSIGN_SIGN_PREDICATE));
        let v = verify(DIGEST, Some(&sigs(vec![good.clone()])), &keys).unwrap();
        assert_eq!(
            (v.scheme.as_str(), v.signature_digest.as_str()),
            ("sigstore-bundle", "sha256:4444")
        );
        let other = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
        let e = verify(
            DIGEST,
            Some(&sigs(vec![bundled(
                &a,
                statement(other, COSIGN_SIGN_PREDICATE),
            )])),
            &keys,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "SignatureInvalid");
        assert!(
            e.to_string().contains(&format!("a bundle signs {other}")),
            "{e}"
        );
        // An attestation of something else (an SBOM, say) by the same key is no signature.
        let sbom = bundled(&a, statement(DIGEST, "https://spdx.dev/Document"));
        let e = verify(DIGEST, Some(&sigs(vec![sbom])), &keys).unwrap_err();
        assert_eq!(e.reason(), "SignatureInvalid");
        let e = verify(
            DIGEST,
            Some(&sigs(vec![bundled(
                &b,
                statement(DIGEST, COSIGN_SIGN_PREDICATE),
            )])),
            &keys,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "SignerNotTrusted");
        let mut altered = good.clone();
        altered.payload.push(b' ');
        let e = verify(DIGEST, Some(&sigs(vec![altered])), &keys).unwrap_err();
        assert_eq!(e.reason(), "SignerNotTrusted");
        // A bundle's certificate is read (for keyless verification), v0.3's and older ones'.
        let leaf = parse_bundle(
            br#"{"verificationMaterial": {"certificate": {"rawBytes": "AQI="}}, "dsseEnvelope": {"payload": "", "payloadType": "x", "signatures": [{"sig": ""}]}}"#,
            "sha256:5555",
        );
        assert_eq!(leaf[0].certificate.as_deref(), Some(&[1u8, 2][..]));
        let chain = parse_bundle(
            br#"{"verificationMaterial": {"x509CertificateChain": {"certificates": [{"rawBytes": "Aw=="}, {"rawBytes": "BA=="}]}}, "dsseEnvelope": {"payload": "", "payloadType": "x", "signatures": [{"sig": ""}]}}"#,
            "sha256:5555",
        );
        assert_eq!(chain[0].certificate.as_deref(), Some(&[3u8][..]));
        // Both forms side by side: either verifying is enough.
        let misdirected = signed(&a, payload(other));
        assert!(verify(DIGEST, Some(&sigs(vec![misdirected, good])), &keys).is_ok());
    }

    #[test]
    fn log_promises_are_read_from_both_forms() {
        let bundle = serde_json::json!({
            "logIndex": "42", "logId": {"keyId": "AQI="}, "integratedTime": "1700000000",
            "inclusionPromise": {"signedEntryTimestamp": "AwQ="}, "canonicalizedBody": "Ym9keQ==",
        });
        let entry = bundle_log(&bundle).unwrap();
        assert_eq!(
            (
                entry.log_id,
                entry.log_index,
                entry.integrated_time,
                entry.body.as_str(),
                entry.set
            ),
            (vec![1, 2], 42, 1_700_000_000, "Ym9keQ==", vec![3, 4])
        );
        let mut no_promise = bundle.clone();
        no_promise
            .as_object_mut()
            .unwrap()
            .remove("inclusionPromise");
        assert!(bundle_log(&no_promise).is_none());
        let tag = r#"{"SignedEntryTimestamp": "AwQ=", "Payload": {"body": "Ym9keQ==", "integratedTime": 1700000000, "logIndex": 42, "logID": "0102"}}"#;
        let entry = tag_scheme_log(tag).unwrap();
        assert_eq!((entry.log_id, entry.log_index), (vec![1, 2], 42));
        assert!(tag_scheme_log("not json").is_none());
    }

    #[test]
    fn keys_must_be_p256_pem_public_keys() {
        assert!(TrustedKey::from_pem("x", "not a key").is_err());
        assert_eq!(
            signature_tag(DIGEST),
            format!("sha256-{}.sig", &DIGEST[7..])
        );
    }
}
