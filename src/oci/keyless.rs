//! Keyless cosign signatures: the signature is made with a short-lived key whose certificate a
//! certificate authority (Sigstore's Fulcio, or your own) issued for an identity (an email or a
//! URI, such as a CI workflow) vouched for by an OIDC issuer. Verified offline against a
//! configured Sigstore trusted root (`trusted_root.json`): the certificate must chain to one of
//! its certificate authorities, be valid now, allow code signing, and name one of the required
//! identities with its issuer (Fulcio's extension `1.3.6.1.4.1.57264.1.8`, else `.1.1`); then
//! the signature must verify with the certificate's key (ECDSA P-256). The time all that is
//! judged at is when the signature was made, as a transparency log of the trusted root promises
//! it (its signed entry timestamp, read from the signature: no call to the log), for an entry
//! that records this very signature; without one, the current time (so Fulcio's ten-minute
//! certificates need the log's promise).

use base64::Engine as _;
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use crate::cache::sha256_hex;

/// Fulcio's issuer extension: DER UTF8String (v2), and the raw string (v1).
const OID_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
const OID_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
/// Certificate authorities read from a trusted root, at most.
const MAX_AUTHORITIES: usize = 64;

/// Who must have signed: the certificate's subject (email or URI) and its OIDC issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
}

/// One certificate authority of a trusted root: its chain (issuing certificate first) and when
/// it may be used (Unix seconds).
#[derive(Debug, Clone)]
struct Authority {
    name: String,
    chain: Vec<Vec<u8>>,
    start: Option<i64>,
    end: Option<i64>,
}

/// The trust keyless signatures are checked against.
#[derive(Debug, Clone)]
pub struct KeylessTrust {
    /// Where the trusted root came from, for messages.
    pub name: String,
    authorities: Vec<Authority>,
    /// Its transparency logs (ECDSA P-256 keys; others are skipped).
    logs: Vec<Log>,
    pub identities: Vec<Identity>,
    /// `sha256:<hex>` of the trusted root and the identities: what makes a verdict.
    pub fingerprint: String,
}

/// A certificate that passed every check: its key, and who it names.
#[derive(Debug, Clone)]
pub struct Certified {
    pub key: VerifyingKey,
    /// `dev@example.com (issuer https://…, CA …)`.
    pub who: String,
    /// `sha256:<hex>` of the certificate's DER.
    pub fingerprint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrustedRoot {
    #[serde(default)]
    certificate_authorities: Vec<CertificateAuthority>,
    #[serde(default)]
    tlogs: Vec<TransparencyLog>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TransparencyLog {
    public_key: RawBytes,
    log_id: KeyId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyId {
    key_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertificateAuthority {
    #[serde(default)]
    uri: String,
    cert_chain: CertChain,
    #[serde(default)]
    valid_for: Option<ValidFor>,
}

#[derive(Deserialize)]
struct CertChain {
    certificates: Vec<RawBytes>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBytes {
    raw_bytes: String,
}

#[derive(Deserialize)]
struct ValidFor {
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
}

fn seconds(t: &str) -> Result<i64, String> {
    t.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| format!("{t:?} is not an RFC 3339 time: {e}"))
}

impl KeylessTrust {
    /// Reads the certificate authorities of a Sigstore trusted root (`trusted_root.json`).
    pub fn from_trusted_root(
        name: &str,
        json: &str,
        identities: Vec<Identity>,
    ) -> Result<Self, String> {
        let root: TrustedRoot = serde_json::from_str(json)
            .map_err(|e| format!("{name} is not a Sigstore trusted root: {e}"))?;
        let mut authorities = Vec::new();
        for ca in root
            .certificate_authorities
            .into_iter()
            .take(MAX_AUTHORITIES)
        {
            let chain = ca
                .cert_chain
                .certificates
                .iter()
                .map(|c| {
                    base64::engine::general_purpose::STANDARD
                        .decode(&c.raw_bytes)
                        .map_err(|e| format!("{name}: a certificate is not base64: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let Some(first) = chain.first() else { continue };
            let (_, cert) = x509_parser::parse_x509_certificate(first)
                .map_err(|e| format!("{name}: a certificate authority does not parse: {e}"))?;
            let (start, end) = match &ca.valid_for {
                Some(v) => (
                    v.start.as_deref().map(seconds).transpose()?,
                    v.end.as_deref().map(seconds).transpose()?,
                ),
                None => (None, None),
            };
            authorities.push(Authority {
                name: if ca.uri.is_empty() {
                    cert.subject().to_string()
                } else {
                    ca.uri.clone()
                },
                chain,
                start,
                end,
            });
        }
        if authorities.is_empty() {
            return Err(format!("{name} names no certificate authority"));
        }
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).ok();
        let logs = root
            .tlogs
            .iter()
            .take(MAX_AUTHORITIES)
            .filter_map(|l| {
                Some(Log {
                    id: b64(&l.log_id.key_id)?,
                    key: VerifyingKey::from_public_key_der(&b64(&l.public_key.raw_bytes)?).ok()?,
                })
            })
            .collect();
        let mut material = json.as_bytes().to_vec();
        for i in &identities {
            material.extend_from_slice(format!("\n{}\n{}", i.issuer, i.subject).as_bytes());
        }
        Ok(KeylessTrust {
            name: name.to_string(),
            authorities,
            logs,
            identities,
            fingerprint: format!("sha256:{}", sha256_hex(&material)),
        })
    }

    /// Checks the certificate `leaf` (DER) at `now` (Unix seconds): issued by a trusted
    /// authority, valid, for code signing, naming a required identity.
    pub fn check(&self, leaf: &[u8], now: i64) -> Result<Certified, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the signing certificate does not parse: {e}"))?;
        let authority = self.issuer_of(&cert, now).ok_or_else(|| {
            format!(
                "the signing certificate (issued by {}) was not issued by a certificate \
                     authority of {} valid now",
                cert.issuer(),
                self.name
            )
        })?;
        let at = ASN1Time::from_timestamp(now).map_err(|e| e.to_string())?;
        if !cert.validity().is_valid_at(at) {
            return Err(format!(
                "the signing certificate is valid from {} to {}, not now",
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        let code_signing = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .is_some_and(|e| e.value.code_signing);
        if !code_signing {
            return Err("the signing certificate does not allow code signing".into());
        }
        let subjects = subjects(&cert);
        let issuer = oidc_issuer(&cert);
        let Some(identity) = self.identities.iter().find(|i| {
            subjects.contains(&i.subject) && issuer.as_deref() == Some(i.issuer.as_str())
        }) else {
            return Err(format!(
                "the signing certificate names {} (issuer {}), not a required identity",
                if subjects.is_empty() {
                    "no email or URI".to_string()
                } else {
                    subjects.join(", ")
                },
                issuer.as_deref().unwrap_or("none")
            ));
        };
        let key = VerifyingKey::from_public_key_der(cert.public_key().raw)
            .map_err(|e| format!("the signing certificate's key is not ECDSA P-256: {e}"))?;
        Ok(Certified {
            key,
            who: format!(
                "{} (issuer {}, certificate authority {})",
                identity.subject, identity.issuer, authority
            ),
            fingerprint: format!("sha256:{}", sha256_hex(leaf)),
        })
    }

    /// The name of the trusted authority whose issuing certificate signed `cert`.
    fn issuer_of(&self, cert: &X509Certificate<'_>, now: i64) -> Option<&str> {
        self.authorities
            .iter()
            .filter(|a| a.start.is_none_or(|s| s <= now) && a.end.is_none_or(|e| now <= e))
            .find(|a| {
                let Some(Ok((_, issuing))) = a
                    .chain
                    .first()
                    .map(|d| x509_parser::parse_x509_certificate(d))
                else {
                    return false;
                };
                issuing.subject() == cert.issuer()
                    && cert.verify_signature(Some(issuing.public_key())).is_ok()
            })
            .map(|a| a.name.as_str())
    }

    /// The required identities, for messages.
    pub fn describe(&self) -> String {
        let ids: Vec<String> = self
            .identities
            .iter()
            .map(|i| format!("{} from {}", i.subject, i.issuer))
            .collect();
        format!("{} ({})", self.name, ids.join(", "))
    }
}

/// A transparency log's promise about one signature: the log (`log_id`, the sha256 of its
/// key) recorded `body` (base64 canonical JSON) at `integrated_time` as entry `log_index`, and
/// signed that (`set`, DER ECDSA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub log_id: Vec<u8>,
    pub log_index: i64,
    pub integrated_time: i64,
    pub body: String,
    pub set: Vec<u8>,
}

/// A transparency log of a trusted root: its id and key.
#[derive(Debug, Clone)]
struct Log {
    id: Vec<u8>,
    key: VerifyingKey,
}

impl KeylessTrust {
    /// When a trusted log says the signature was made: its promise verifies with the log's key,
    /// and the entry records this very signature (`signature`, base64) of `payload` with
    /// `certificate` (DER).
    pub fn logged_time(
        &self,
        entry: &LogEntry,
        payload: &[u8],
        signature: &str,
        certificate: &[u8],
    ) -> Result<i64, String> {
        use p256::ecdsa::signature::Verifier as _;
        let Some(log) = self.logs.iter().find(|l| l.id == entry.log_id) else {
            return Err(format!(
                "its transparency log entry is from a log {} does not trust",
                self.name
            ));
        };
        let promise = serde_json::json!({
            "body": entry.body,
            "integratedTime": entry.integrated_time,
            "logID": hex::encode(&entry.log_id),
            "logIndex": entry.log_index,
        })
        .to_string();
        let set = p256::ecdsa::Signature::from_der(&entry.set)
            .map_err(|_| "its transparency log promise is not a signature".to_string())?;
        log.key.verify(promise.as_bytes(), &set).map_err(|_| {
            "its transparency log promise does not verify with the log's key".to_string()
        })?;
        let body = base64::engine::general_purpose::STANDARD
            .decode(&entry.body)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .ok_or_else(|| "its transparency log entry's body is not JSON".to_string())?;
        let payload_hash = sha256_hex(payload);
        let same_cert = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|pem| pem_rfc7468::decode_vec(&pem).ok().map(|(_, der)| der))
                .is_some_and(|der| der == certificate)
        };
        let spec = &body["spec"];
        let records = match body["kind"].as_str() {
            Some("dsse") => {
                spec.pointer("/payloadHash/value").and_then(|v| v.as_str())
                    == Some(payload_hash.as_str())
                    && spec["signatures"].as_array().is_some_and(|sigs| {
                        sigs.iter().any(|s| {
                            s["signature"].as_str() == Some(signature) && same_cert(&s["verifier"])
                        })
                    })
            }
            Some("hashedrekord") => {
                spec.pointer("/data/hash/value").and_then(|v| v.as_str())
                    == Some(payload_hash.as_str())
                    && spec.pointer("/signature/content").and_then(|v| v.as_str())
                        == Some(signature)
                    && spec
                        .pointer("/signature/publicKey/content")
                        .is_some_and(same_cert)
            }
            other => {
                return Err(format!(
                    "its transparency log entry is of kind {}, not dsse or hashedrekord",
                    other.unwrap_or("none")
                ));
            }
        };
        if !records {
            return Err("its transparency log entry records another signature".into());
        }
        Ok(entry.integrated_time)
    }
}

/// The certificate's email and URI subject alternative names.
fn subjects(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::RFC822Name(s) | GeneralName::URI(s) => Some((*s).to_string()),
            _ => None,
        })
        .collect()
}

/// Fulcio's OIDC issuer extension: the v2 one (a DER UTF8String), else the v1 one (raw).
fn oidc_issuer(cert: &X509Certificate<'_>) -> Option<String> {
    let ext = |oid: &str| {
        cert.extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
            .map(|e| e.value)
    };
    if let Some(v) = ext(OID_ISSUER_V2) {
        return utf8_string(v);
    }
    ext(OID_ISSUER_V1).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A DER UTF8String's text.
fn utf8_string(der: &[u8]) -> Option<String> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), &rest[1..]),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    std::str::from_utf8(body.get(..len)?)
        .ok()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    use p256::pkcs8::DecodePrivateKey as _;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    const ISSUER: &str = "https://issuer.example";
    const NOW: i64 = 1_800_000_000; // 2027-01-15

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca { params, key, der }
    }

    fn der_utf8(s: &str) -> Vec<u8> {
        let mut out = vec![0x0c, u8::try_from(s.len()).unwrap()];
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// A leaf for `subject`, from `ca`; `v2`/`v1`: Fulcio's issuer extensions.
    struct Leaf<'a> {
        subject: &'a str,
        v2: Option<&'a str>,
        v1: Option<&'a str>,
        code_signing: bool,
        years: (i32, i32),
    }

    impl Default for Leaf<'_> {
        fn default() -> Self {
            Leaf {
                subject: "dev@example.com",
                v2: Some(ISSUER),
                v1: None,
                code_signing: true,
                years: (2026, 2028),
            }
        }
    }

    fn issue(ca: &Ca, leaf: Leaf<'_>) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::Rfc822Name(leaf.subject.try_into().unwrap())];
        if leaf.code_signing {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        }
        if let Some(i) = leaf.v2 {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 57264, 1, 8],
                    der_utf8(i),
                ));
        }
        if let Some(i) = leaf.v1 {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 57264, 1, 1],
                    i.as_bytes().to_vec(),
                ));
        }
        params.not_before = rcgen::date_time_ymd(leaf.years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(leaf.years.1, 1, 1);
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        let der = params.signed_by(&key, &issuer).unwrap().der().to_vec();
        (der, key)
    }

    fn root(ca: &Ca, end: Option<&str>) -> String {
        serde_json::json!({
            "certificateAuthorities": [{
                "uri": "https://ca.test",
                "certChain": {"certificates": [{"rawBytes": base64::engine::general_purpose::STANDARD.encode(&ca.der)}]},
                "validFor": {"start": "2020-01-01T00:00:00Z", "end": end},
            }]
        })
        .to_string()
    }

    fn trust(ca: &Ca, end: Option<&str>, subject: &str) -> KeylessTrust {
        let identity = Identity {
            issuer: ISSUER.into(),
            subject: subject.into(),
        };
        KeylessTrust::from_trusted_root("root", &root(ca, end), vec![identity]).unwrap()
    }

    #[test]
    fn a_certificate_from_a_trusted_authority_for_a_required_identity_is_accepted() {
        let ca = ca("test ca");
        let (leaf, key) = issue(&ca, Leaf::default());
        let certified = trust(&ca, None, "dev@example.com")
            .check(&leaf, NOW)
            .unwrap();
        assert_eq!(
            certified.who,
            "dev@example.com (issuer https://issuer.example, certificate authority https://ca.test)"
        );
        // Its key is the certificate's: what the leaf's private key signs verifies with it.
        let signing = p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der()).unwrap();
        let sig: p256::ecdsa::Signature = signing.sign(b"payload");
        assert!(certified.key.verify(b"payload", &sig).is_ok());
        // Fulcio's first issuer extension (raw) is read when the second is absent.
        let (v1, _) = issue(
            &ca,
            Leaf {
                v2: None,
                v1: Some(ISSUER),
                ..Leaf::default()
            },
        );
        assert!(trust(&ca, None, "dev@example.com").check(&v1, NOW).is_ok());
    }

    #[test]
    fn certificates_are_refused_saying_what_is_wrong() {
        let ca = ca("test ca");
        let t = trust(&ca, None, "dev@example.com");
        let refused = |leaf: Leaf<'_>, trust: &KeylessTrust| {
            let (der, _) = issue(&ca, leaf);
            trust.check(&der, NOW).unwrap_err()
        };
        let e = refused(
            Leaf {
                subject: "ops@example.com",
                ..Leaf::default()
            },
            &t,
        );
        assert!(
            e.contains(
                "names ops@example.com (issuer https://issuer.example), not a required identity"
            ),
            "{e}"
        );
        let e = refused(
            Leaf {
                v2: Some("https://elsewhere.example"),
                ..Leaf::default()
            },
            &t,
        );
        assert!(e.contains("not a required identity"), "{e}");
        let e = refused(
            Leaf {
                v2: None,
                ..Leaf::default()
            },
            &t,
        );
        assert!(e.contains("(issuer none)"), "{e}");
        let e = refused(
            Leaf {
                code_signing: false,
                ..Leaf::default()
            },
            &t,
        );
        assert!(e.contains("does not allow code signing"), "{e}");
        let e = refused(
            Leaf {
                years: (2024, 2025),
                ..Leaf::default()
            },
            &t,
        );
        assert!(e.contains("not now"), "{e}");
        // Another authority's certificate; an authority the root no longer vouches for.
        let stranger = self::ca("stranger");
        let (der, _) = issue(&stranger, Leaf::default());
        let e = t.check(&der, NOW).unwrap_err();
        assert!(
            e.contains("was not issued by a certificate authority of root valid now"),
            "{e}"
        );
        let ended = trust(&ca, Some("2025-01-01T00:00:00Z"), "dev@example.com");
        let e = refused(Leaf::default(), &ended);
        assert!(e.contains("valid now"), "{e}");
    }

    #[test]
    fn der_utf8_strings_read_in_short_and_long_form() {
        assert_eq!(utf8_string(b"\x0c\x03abc").as_deref(), Some("abc"));
        let long = "x".repeat(200);
        let mut der = vec![0x0c, 0x81, 200];
        der.extend_from_slice(long.as_bytes());
        assert_eq!(utf8_string(&der), Some(long));
        assert_eq!(
            utf8_string(b"\x13\x03abc"),
            None,
            "a PrintableString is not UTF8"
        );
        assert_eq!(utf8_string(b"\x0c\x05ab"), None, "truncated");
    }

    #[test]
    fn a_trusted_root_without_authorities_or_json_is_refused() {
        assert!(KeylessTrust::from_trusted_root("r", "not json", vec![]).is_err());
        let e = KeylessTrust::from_trusted_root(
            "r",
            r#"{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1"}"#,
            vec![],
        )
        .unwrap_err();
        assert!(e.contains("names no certificate authority"), "{e}");
    }
    #[test]
    fn a_logged_signature_is_judged_at_the_time_the_log_promises() {
        use base64::engine::general_purpose::STANDARD;
        let ca = ca("test ca");
        // A certificate that expired long ago (Fulcio's expire ten minutes after issue).
        let (leaf, leaf_key) = issue(
            &ca,
            Leaf {
                years: (2024, 2025),
                ..Leaf::default()
            },
        );
        let log_key = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
        let log_der = {
            use p256::pkcs8::EncodePublicKey as _;
            log_key
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        let log_id = hex::decode(sha256_hex(&log_der)).unwrap();
        let mut root: serde_json::Value = serde_json::from_str(&root(&ca, None)).unwrap();
        root["tlogs"] = serde_json::json!([{
            "baseUrl": "https://log.test",
            "publicKey": {"rawBytes": STANDARD.encode(&log_der)},
            "logId": {"keyId": STANDARD.encode(&log_id)},
        }]);
        let identity = Identity {
            issuer: ISSUER.into(),
            subject: "dev@example.com".into(),
        };
        let trust =
            KeylessTrust::from_trusted_root("root", &root.to_string(), vec![identity]).unwrap();

        let payload = b"the statement".to_vec();
        let signing = p256::ecdsa::SigningKey::from_pkcs8_der(&leaf_key.serialize_der()).unwrap();
        let sig: p256::ecdsa::Signature = signing.sign(&payload);
        let signature = STANDARD.encode(sig.to_der().as_bytes());
        let cert_pem =
            pem_rfc7468::encode_string("CERTIFICATE", pem_rfc7468::LineEnding::LF, &leaf).unwrap();
        let body_for = |payload: &[u8]| {
            STANDARD.encode(
                serde_json::json!({
                    "apiVersion": "0.0.1",
                    "kind": "dsse",
                    "spec": {
                        "payloadHash": {"algorithm": "sha256", "value": sha256_hex(payload)},
                        "signatures": [{"signature": signature, "verifier": STANDARD.encode(&cert_pem)}],
                    }
                })
                .to_string(),
            )
        };
        // Mid-2024, inside the certificate's validity.
        let logged_at = 1_719_792_000;
        let entry = |body: String, time: i64, key: &p256::ecdsa::SigningKey| {
            let promise = serde_json::json!({
                "body": body, "integratedTime": time, "logID": hex::encode(&log_id), "logIndex": 7,
            })
            .to_string();
            let set: p256::ecdsa::Signature = key.sign(promise.as_bytes());
            LogEntry {
                log_id: log_id.clone(),
                log_index: 7,
                integrated_time: time,
                body,
                set: set.to_der().as_bytes().to_vec(),
            }
        };
        let good = entry(body_for(&payload), logged_at, &log_key);
        let at = trust
            .logged_time(&good, &payload, &signature, &leaf)
            .unwrap();
        assert_eq!(at, logged_at);
        assert!(trust.check(&leaf, at).is_ok(), "valid when it was logged");
        assert!(trust.check(&leaf, NOW).unwrap_err().contains("not now"));

        // A promise altered, by another log, or about another signature: refused.
        let mut moved = good.clone();
        moved.integrated_time += 1;
        let e = trust
            .logged_time(&moved, &payload, &signature, &leaf)
            .unwrap_err();
        assert!(e.contains("does not verify with the log's key"), "{e}");
        let stranger = p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap();
        let e = trust
            .logged_time(
                &entry(body_for(&payload), logged_at, &stranger),
                &payload,
                &signature,
                &leaf,
            )
            .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let mut unknown = good.clone();
        unknown.log_id = vec![0; 32];
        let e = trust
            .logged_time(&unknown, &payload, &signature, &leaf)
            .unwrap_err();
        assert!(e.contains("from a log root does not trust"), "{e}");
        let other = entry(body_for(b"another statement"), logged_at, &log_key);
        let e = trust
            .logged_time(&other, &payload, &signature, &leaf)
            .unwrap_err();
        assert!(e.contains("records another signature"), "{e}");

        // Through verification: a cosign tag-scheme signature with its log promise
        // (`hashedrekord`) verifies years after its certificate expired; without the promise,
        // or with one that does not verify, it is judged now and refused.
        use crate::oci::signature::{Found, Signatures, verify_keyless};
        let digest = format!("sha256:{}", "1".repeat(64));
        let simple = crate::oci::sign::payload("registry.example/f", &digest);
        let sig: p256::ecdsa::Signature = signing.sign(&simple);
        let signature = STANDARD.encode(sig.to_der().as_bytes());
        let rekord = STANDARD.encode(
            serde_json::json!({
                "apiVersion": "0.0.1",
                "kind": "hashedrekord",
                "spec": {
                    "data": {"hash": {"algorithm": "sha256", "value": sha256_hex(&simple)}},
                    "signature": {"content": signature, "publicKey": {"content": STANDARD.encode(&cert_pem)}},
                }
            })
            .to_string(),
        );
        let found = |log: Option<LogEntry>| Signatures {
            tag: String::new(),
            manifest_digest: "sha256:2".into(),
            found: vec![Found {
                payload: simple.clone(),
                signature: Some(signature.clone()),
                bundle: None,
                certificate: Some(leaf.clone()),
                log,
            }],
        };
        let logged = entry(rekord, logged_at, &log_key);
        let v = verify_keyless(&digest, Some(&found(Some(logged.clone()))), &trust, NOW).unwrap();
        assert!(v.key.starts_with("dev@example.com"), "{}", v.key);
        let e = verify_keyless(&digest, Some(&found(None)), &trust, NOW).unwrap_err();
        assert!(e.to_string().contains("not now"), "{e}");
        let mut tampered = logged;
        tampered.integrated_time += 1;
        let e = verify_keyless(&digest, Some(&found(Some(tampered))), &trust, NOW).unwrap_err();
        assert!(e.to_string().contains("so it was judged now"), "{e}");
    }
}
