//! Signing a module's manifest as `cosign sign --key` does, in cosign's tag scheme: a
//! simple-signing payload naming the digest, signed with ECDSA P-256 / SHA-256 (ASN.1 DER,
//! base64 in the `dev.cosignproject.cosign/signature` annotation), added as a layer of the
//! `sha256-<hex>.sig` manifest beside the module, after the signatures already there (kept as
//! they are, annotations and all). `cosign verify --key` accepts the result, and so does
//! [`super::signature::verify`].
//!
//! Keys: cosign's own encrypted private key (`cosign generate-key-pair`: PKCS#8 sealed with
//! NaCl secretbox under a scrypt key, the password from `COSIGN_PASSWORD` as cosign reads it),
//! or an unencrypted PKCS#8 PEM `PRIVATE KEY`.

use std::collections::BTreeMap;

use base64::Engine as _;
use crypto_secretbox::XSalsa20Poly1305;
use crypto_secretbox::aead::{Aead as _, KeyInit as _};
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use serde::Deserialize;

use super::signature::{SIGNATURE_ANNOTATION, SIMPLE_SIGNING, signature_tag};
use super::{Credentials, Error as OciError, Resolver};
use crate::cache::sha256_hex;

/// PEM labels of cosign's encrypted private keys (the second one is cosign 1.x's).
const ENCRYPTED_LABELS: [&str; 2] = [
    "ENCRYPTED SIGSTORE PRIVATE KEY",
    "ENCRYPTED COSIGN PRIVATE KEY",
];
/// The largest scrypt cost accepted (cosign uses N = 2^15, r = 8, p = 1).
const MAX_SCRYPT_LOG_N: u32 = 20;
const MAX_SCRYPT_R: u32 = 32;
const MAX_SCRYPT_P: u32 = 16;
/// What a cosign signature manifest's config and layers are.
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the signing key is not a PEM private key: {0}")]
    NotPem(String),

    #[error("the signing key is a PEM {0:?}, not a cosign key or a PKCS#8 PRIVATE KEY")]
    UnknownLabel(String),

    #[error("the cosign key cannot be read: {0}")]
    Malformed(String),

    #[error(
        "the cosign key does not open with this password (set COSIGN_PASSWORD, as for cosign), \
         or it is damaged"
    )]
    WrongPassword,

    #[error("the signing key is not an ECDSA P-256 private key: {0}")]
    NotP256(String),

    #[error(transparent)]
    Registry(#[from] OciError),
}

/// A private key to sign manifests with.
pub struct Signer {
    key: SigningKey,
}

#[derive(Deserialize)]
struct Sealed {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| Error::Malformed(format!("{what} is not base64: {e}")))
}

impl Signer {
    /// Reads a PEM private key; `password` opens cosign's encrypted ones.
    pub fn from_pem(pem: &str, password: &[u8]) -> Result<Self, Error> {
        let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes())
            .map_err(|e| Error::NotPem(e.to_string()))?;
        let pkcs8 = if ENCRYPTED_LABELS.contains(&label) {
            open(&der, password)?
        } else if label == "PRIVATE KEY" {
            der
        } else {
            return Err(Error::UnknownLabel(label.to_string()));
        };
        let key = SigningKey::from_pkcs8_der(&pkcs8).map_err(|e| Error::NotP256(e.to_string()))?;
        Ok(Signer { key })
    }

    /// The base64 ASN.1 DER signature of `payload`, as cosign writes it.
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig: Signature = self.key.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }

    /// The matching public key, PEM (what `cosign verify --key` and the operator trust).
    pub fn public_key_pem(&self) -> Result<String, Error> {
        use p256::pkcs8::EncodePublicKey as _;
        self.key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| Error::NotP256(e.to_string()))
    }
}

/// Opens cosign's sealed key: scrypt derives the secretbox key from the password.
fn open(sealed: &[u8], password: &[u8]) -> Result<Vec<u8>, Error> {
    let sealed: Sealed = serde_json::from_slice(sealed)
        .map_err(|e| Error::Malformed(format!("not cosign's sealed key JSON: {e}")))?;
    if sealed.kdf.name != "scrypt" || sealed.cipher.name != "nacl/secretbox" {
        return Err(Error::Malformed(format!(
            "sealed with {} and {}, not scrypt and nacl/secretbox",
            sealed.kdf.name, sealed.cipher.name
        )));
    }
    let ScryptParams { n, r, p } = sealed.kdf.params;
    let log_n = n.trailing_zeros();
    if !n.is_power_of_two()
        || log_n == 0
        || log_n > MAX_SCRYPT_LOG_N
        || r > MAX_SCRYPT_R
        || p > MAX_SCRYPT_P
    {
        return Err(Error::Malformed(format!(
            "scrypt parameters N={n} r={r} p={p} out of range"
        )));
    }
    let params = scrypt::Params::new(log_n as u8, r, p, 32)
        .map_err(|e| Error::Malformed(format!("scrypt parameters: {e}")))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(
        password,
        &b64("the salt", &sealed.kdf.salt)?,
        &params,
        &mut key,
    )
    .map_err(|e| Error::Malformed(format!("scrypt: {e}")))?;
    let nonce = b64("the nonce", &sealed.cipher.nonce)?;
    if nonce.len() != 24 {
        return Err(Error::Malformed(format!(
            "the nonce has {} bytes, not 24",
            nonce.len()
        )));
    }
    XSalsa20Poly1305::new(&key.into())
        .decrypt(
            crypto_secretbox::Nonce::from_slice(&nonce),
            b64("the ciphertext", &sealed.ciphertext)?.as_slice(),
        )
        .map_err(|_| Error::WrongPassword)
}

/// The simple-signing payload cosign signs for `repository` (`registry/path`) at `digest`.
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string()
    .into_bytes()
}

/// Signs the manifest `digest` of `module` (a reference to its repository) and adds the
/// signature to the `sha256-<hex>.sig` manifest beside it. Returns the signature tag; a
/// signature by the same key over the same payload already there is not added twice (ECDSA
/// here is deterministic, RFC 6979).
pub async fn push_signature(
    resolver: &Resolver,
    creds: &Credentials,
    client: &Client,
    auth: &RegistryAuth,
    module: &Reference,
    digest: &str,
    signer: &Signer,
) -> Result<String, Error> {
    let tag = signature_tag(digest);
    let reference = Reference::with_tag(
        module.registry().to_string(),
        module.repository().to_string(),
        tag.clone(),
    );
    let mut layers = match resolver.manifest(&reference, creds).await {
        Ok((OciManifest::Image(m), _)) => m.layers,
        Ok(_) => {
            return Err(OciError::ResolveDigest {
                reference: reference.whole(),
                message: "the signature tag names an index, not a signature manifest".into(),
            }
            .into());
        }
        Err(OciError::ManifestNotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let payload = payload(
        &format!("{}/{}", module.registry(), module.repository()),
        digest,
    );
    let signature = signer.sign(&payload);
    let payload_digest = format!("sha256:{}", sha256_hex(&payload));
    if layers.iter().any(|l| {
        l.digest == payload_digest
            && l.annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                == Some(&signature)
    }) {
        return Ok(tag);
    }
    let annotations = BTreeMap::from([(SIGNATURE_ANNOTATION.to_string(), signature)]);
    layers.push(OciDescriptor {
        media_type: SIMPLE_SIGNING.to_string(),
        digest: payload_digest,
        size: i64::try_from(payload.len()).unwrap_or(i64::MAX),
        annotations: Some(annotations.clone()),
        ..OciDescriptor::default()
    });
    // cosign's config: one history entry and one diff id (the payload's digest) per layer.
    let config = serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": layers.iter().map(|_| serde_json::json!({"created": "0001-01-01T00:00:00Z"})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        "config": {}
    })
    .to_string()
    .into_bytes();
    let config_descriptor = OciDescriptor {
        media_type: OCI_CONFIG.to_string(),
        digest: format!("sha256:{}", sha256_hex(&config)),
        size: i64::try_from(config.len()).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    };
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        config: config_descriptor,
        layers,
        ..OciImageManifest::default()
    };
    // Only the new payload and the config are uploaded; the other layers are there already.
    let new_layer = ImageLayer::new(payload, SIMPLE_SIGNING.to_string(), Some(annotations));
    client
        .push(
            &reference,
            &[new_layer],
            Config::new(config, OCI_CONFIG.to_string(), None),
            auth,
            Some(manifest),
        )
        .await
        .map_err(|e| OciError::PushModule {
            reference: reference.whole(),
            message: super::error_chain(&e),
        })?;
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePrivateKey as _;

    #[test]
    fn a_pkcs8_key_signs_what_its_public_key_verifies() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let pem = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
        let signer = Signer::from_pem(&pem, b"").unwrap();
        let digest = "sha256:".to_string() + &"1".repeat(64);
        let payload = payload("registry.example/filters/x", &digest);
        let found = super::super::signature::Found {
            signature: Some(signer.sign(&payload)),
            payload,
            bundle: None,
            certificate: None,
            log: None,
        };
        let trusted =
            super::super::signature::TrustedKey::from_pem("k", &signer.public_key_pem().unwrap())
                .unwrap();
        let sigs = super::super::signature::Signatures {
            tag: signature_tag(&digest),
            manifest_digest: "sha256:2".into(),
            found: vec![found],
        };
        assert!(super::super::signature::verify(&digest, Some(&sigs), &[trusted]).is_ok());
    }

    #[test]
    fn other_keys_and_garbage_are_refused_with_what_they_are() {
        assert!(matches!(
            Signer::from_pem("not a key", b""),
            Err(Error::NotPem(_))
        ));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            Signer::from_pem(cert, b""),
            Err(Error::UnknownLabel(l)) if l == "CERTIFICATE"
        ));
        let sealed = base64::engine::general_purpose::STANDARD.encode(br#"{"kdf":{"name":"argon2","params":{"N":2,"r":1,"p":1},"salt":""},"cipher":{"name":"nacl/secretbox","nonce":""},"ciphertext":""}"#);
        let lines: Vec<String> = sealed
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let pem = format!(
            "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{}\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
            lines.join("\n")
        );
        assert!(
            matches!(Signer::from_pem(&pem, b""), Err(Error::Malformed(m)) if m.contains("argon2"))
        );
    }
}
