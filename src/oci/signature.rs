//! cosign signatures of a module's manifest, in cosign's tag scheme: the manifest tagged
//! `sha256-<hex of the signed manifest digest>.sig` in the same repository, each of its layers a
//! "simple signing" payload (`application/vnd.dev.cosign.simplesigning.v1+json`) naming the
//! signed digest, with the signature in the `dev.cosignproject.cosign/signature` annotation
//! (base64 ECDSA P-256 / SHA-256 over the payload bytes, as `cosign sign --key` writes).
//!
//! Fetching is [`Resolver::cosign_signatures`] (every digest checked like a module's);
//! deciding is [`verify`], pure. Keys are PEM `PUBLIC KEY`s (cosign's own, ECDSA P-256).

use oci_client::Reference;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use serde::Deserialize;

use super::{Credentials, Error as OciError, Resolver};
use crate::cache::sha256_hex;

/// The media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The largest payload read (cosign's are a few hundred bytes).
const MAX_PAYLOAD_BYTES: u64 = 64 << 10;
/// Signatures looked at, at most.
const MAX_SIGNATURES: usize = 32;

/// One signature as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub payload: Vec<u8>,
    /// The base64 signature annotation, if the layer had one.
    pub signature: Option<String>,
}

/// The signatures of one manifest, and the digest of the manifest that holds them.
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
    /// The trusted key's name and fingerprint.
    pub key: String,
    pub key_fingerprint: String,
    /// The digest of the signature manifest (`sha256-<hex>.sig`).
    pub signature_digest: String,
}

/// Why a manifest is not verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{digest} has no cosign signature (no {tag} in the repository)")]
    Missing { digest: String, tag: String },

    #[error("the cosign signature of {digest} is not valid: {message}")]
    Invalid { digest: String, message: String },

    #[error(
        "no cosign signature of {digest} verifies with the trusted keys ({keys}): signed by another key, or altered"
    )]
    NotTrusted { digest: String, keys: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing { .. } => "SignatureMissing",
            Refusal::Invalid { .. } => "SignatureInvalid",
            Refusal::NotTrusted { .. } => "SignerNotTrusted",
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
    let tag = signature_tag(digest);
    let Some(sigs) = signatures.filter(|s| !s.found.is_empty()) else {
        return Err(Refusal::Missing {
            digest: digest.to_string(),
            tag,
        });
    };
    let mut problems = Vec::new();
    let mut well_formed = 0;
    for found in &sigs.found {
        let payload: Payload = match serde_json::from_slice(&found.payload) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!(
                    "a payload is not a cosign simple-signing payload: {e}"
                ));
                continue;
            }
        };
        if payload.critical.kind != "cosign container image signature" {
            problems.push(format!(
                "a payload has type {:?}, not a cosign container image signature",
                payload.critical.kind
            ));
            continue;
        }
        if payload.critical.image.docker_manifest_digest != digest {
            problems.push(format!(
                "a payload signs {}, not {digest}",
                payload.critical.image.docker_manifest_digest
            ));
            continue;
        }
        let Some(signature) = found
            .signature
            .as_deref()
            .and_then(base64_decode)
            .and_then(|der| Signature::from_der(&der).ok())
        else {
            problems.push("a layer has no readable signature annotation".into());
            continue;
        };
        well_formed += 1;
        if let Some(key) = keys
            .iter()
            .find(|k| k.key.verify(&found.payload, &signature).is_ok())
        {
            return Ok(Verified {
                key: key.name.clone(),
                key_fingerprint: key.fingerprint.clone(),
                signature_digest: sigs.manifest_digest.clone(),
            });
        }
    }
    if well_formed == 0 {
        return Err(Refusal::Invalid {
            digest: digest.to_string(),
            message: problems.join("; "),
        });
    }
    Err(Refusal::NotTrusted {
        digest: digest.to_string(),
        keys: keys
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

impl Resolver {
    /// The cosign signatures of `manifest_digest` in `image`'s repository; `None` when there
    /// are none (no signature tag). Every digest is checked: the signature manifest's, and
    /// each payload's against its descriptor.
    pub async fn cosign_signatures(
        &self,
        image: &str,
        manifest_digest: &str,
        creds: &Credentials,
    ) -> Result<Option<Signatures>, OciError> {
        let source = super::parse_reference(image)?;
        let tag = signature_tag(manifest_digest);
        let reference = Reference::with_tag(
            source.registry().to_string(),
            source.repository().to_string(),
            tag.clone(),
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
            let payload = self
                .fetch_blob(&reference, layer, size, creds, None)
                .await?;
            found.push(Found {
                payload,
                signature: layer
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                    .cloned(),
            });
        }
        Ok(Some(Signatures {
            tag,
            manifest_digest: digest,
            found,
        }))
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

    #[test]
    fn keys_must_be_p256_pem_public_keys() {
        assert!(TrustedKey::from_pem("x", "not a key").is_err());
        assert_eq!(
            signature_tag(DIGEST),
            format!("sha256-{}.sig", &DIGEST[7..])
        );
    }
}
