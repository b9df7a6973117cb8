//! Step 1a, the signature: when the filter (`spec.module.verify`) or the operator
//! (`--require-signature-keys`) requires one, the resolved manifest must carry a cosign
//! signature by a trusted key before anything else happens to it. Both requirements hold when
//! both are set. A verified manifest and key set is remembered; a refusal is not (a signature
//! may be pushed after the module).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

use super::{Context, Error};
use crate::api::{CertificateIdentity, KeySource, WasmFilter};
use crate::oci::Artifact;
use crate::oci::keyless::{Identity, KeylessTrust};
use crate::oci::signature::{self, Signatures, TrustedKey};

/// Where a set of trusted keys lives.
#[derive(Debug, Clone, PartialEq)]
pub struct KeysAt {
    pub namespace: String,
    pub source: KeySource,
}

impl KeysAt {
    fn describe(&self) -> String {
        match (&self.source.config_map, &self.source.secret) {
            (Some(name), _) => format!("ConfigMap {}/{name}", self.namespace),
            (_, Some(name)) => format!("Secret {}/{name}", self.namespace),
            _ => format!("nothing in {}", self.namespace),
        }
    }
}

/// What a module must be signed by: keys, or a keyless signer trusted by a trusted root.
#[derive(Debug, Clone, PartialEq)]
pub enum Requirement {
    Keys(KeysAt),
    Keyless {
        namespace: String,
        /// The ConfigMap holding `trusted_root.json`.
        trusted_root: String,
        identities: Vec<CertificateIdentity>,
    },
}

impl Requirement {
    fn describe(&self) -> String {
        match self {
            Requirement::Keys(at) => at.describe(),
            Requirement::Keyless {
                namespace,
                trusted_root,
                ..
            } => format!("ConfigMap {namespace}/{trusted_root}"),
        }
    }
}

/// The ConfigMap key holding a Sigstore trusted root.
pub const TRUSTED_ROOT_KEY: &str = "trusted_root.json";

/// What `wf`'s module must be signed by: the operator's keys first, then the filter's own.
pub fn requirements(wf: &WasmFilter, ns: &str, operator: Option<&KeysAt>) -> Vec<Requirement> {
    let own = wf.spec.module.verify.as_ref().and_then(|v| {
        match (&v.cosign.public_keys, &v.cosign.keyless) {
            (Some(keys), _) => Some(Requirement::Keys(KeysAt {
                namespace: ns.to_string(),
                source: keys.clone(),
            })),
            (None, Some(k)) => Some(Requirement::Keyless {
                namespace: ns.to_string(),
                trusted_root: k.trusted_root.clone(),
                identities: k.identities.clone(),
            }),
            (None, None) => None,
        }
    });
    operator
        .cloned()
        .map(Requirement::Keys)
        .into_iter()
        .chain(own)
        .collect()
}

/// Verifies `artifact`'s manifest against every requirement, recording the signature of the
/// last one (the filter's own when it has one) in `artifact.signature`.
pub(super) async fn check(
    wf: &WasmFilter,
    ns: &str,
    artifact: &mut Artifact,
    ctx: &Context,
) -> Result<(), Error> {
    let required = requirements(wf, ns, ctx.settings.required_signature_keys.as_ref());
    if required.is_empty() {
        return Ok(());
    }
    let mut signatures: Option<Option<Signatures>> = None;
    for requirement in required {
        let trust = match &requirement {
            Requirement::Keys(at) => Trust::Keys(load_keys(&ctx.client, at).await?),
            Requirement::Keyless {
                namespace,
                trusted_root,
                identities,
            } => Trust::Keyless(
                load_trusted_root(&ctx.client, namespace, trusted_root, identities).await?,
            ),
        };
        // The trust by where it is and what it holds: a verified signature names its signer by
        // where the trust came from.
        let memo_key = (
            artifact.manifest_digest.clone(),
            format!("{} {}", requirement.describe(), trust.fingerprint()),
        );
        if let Some(v) = ctx.remembered_signature(&memo_key) {
            artifact.signature = Some(v);
            continue;
        }
        if signatures.is_none() {
            let creds = ctx.pull_credentials(wf, ns).await?;
            signatures = Some(
                ctx.resolver
                    .cosign_signatures(wf.image(), &artifact.manifest_digest, &creds)
                    .await?,
            );
        }
        let found = signatures.as_ref().and_then(Option::as_ref);
        let digest = &artifact.manifest_digest;
        let verified = match &trust {
            Trust::Keys(keys) => signature::verify(digest, found, keys)?,
            Trust::Keyless(k) => {
                signature::verify_keyless(digest, found, k, jiff::Timestamp::now().as_second())?
            }
        };
        ctx.remember_signature(memo_key, verified.clone());
        artifact.signature = Some(verified);
    }
    Ok(())
}

/// Trust material, loaded.
enum Trust {
    Keys(Vec<TrustedKey>),
    Keyless(KeylessTrust),
}

impl Trust {
    /// What identifies the material: the keys' fingerprints, or the trusted root's and the
    /// identities' digest.
    fn fingerprint(&self) -> String {
        match self {
            Trust::Keys(keys) => fingerprints(keys),
            Trust::Keyless(k) => k.fingerprint.clone(),
        }
    }
}

/// A Sigstore trusted root from a ConfigMap (key `trusted_root.json`), with the identities.
pub async fn load_trusted_root(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    identities: &[CertificateIdentity],
) -> Result<KeylessTrust, Error> {
    let where_ = format!("ConfigMap {namespace}/{name}");
    let missing = |message: String| Error::VerificationKeys {
        keys: where_.clone(),
        message,
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get_opt(name)
        .await
        .map_err(|e| missing(format!("cannot read it: {e}")))?
        .ok_or_else(|| missing("it does not exist".into()))?;
    let json = cm
        .data
        .unwrap_or_default()
        .remove(TRUSTED_ROOT_KEY)
        .ok_or_else(|| missing(format!("it has no key {TRUSTED_ROOT_KEY}")))?;
    let identities = identities
        .iter()
        .map(|i| Identity {
            issuer: i.issuer.clone(),
            subject: i.subject.clone(),
        })
        .collect();
    KeylessTrust::from_trusted_root(&where_, &json, identities).map_err(missing)
}

fn fingerprints(keys: &[TrustedKey]) -> String {
    let mut f: Vec<&str> = keys.iter().map(|k| k.fingerprint.as_str()).collect();
    f.sort_unstable();
    f.join(",")
}

/// The PEM public keys in a ConfigMap's or Secret's values (read with one GET).
pub async fn load_keys(client: &kube::Client, at: &KeysAt) -> Result<Vec<TrustedKey>, Error> {
    let missing = |message: String| Error::VerificationKeys {
        keys: at.describe(),
        message,
    };
    let values: BTreeMap<String, String> = match (&at.source.config_map, &at.source.secret) {
        (Some(name), _) => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &at.namespace);
            let cm = api
                .get_opt(name)
                .await
                .map_err(|e| missing(format!("cannot read it: {e}")))?
                .ok_or_else(|| missing("it does not exist".into()))?;
            cm.data.unwrap_or_default()
        }
        (_, Some(name)) => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &at.namespace);
            let secret = api
                .get_opt(name)
                .await
                .map_err(|e| missing(format!("cannot read it: {e}")))?
                .ok_or_else(|| missing("it does not exist".into()))?;
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        }
        _ => return Err(missing("names neither a ConfigMap nor a Secret".into())),
    };
    let keys: Vec<TrustedKey> = values
        .iter()
        .filter_map(|(k, pem)| {
            TrustedKey::from_pem(&format!("{} key {k}", at.describe()), pem).ok()
        })
        .collect();
    if keys.is_empty() {
        let names: Vec<&str> = values.keys().map(String::as_str).collect();
        return Err(missing(format!(
            "none of its values is a PEM ECDSA P-256 public key (values: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(verify: Option<&str>) -> WasmFilter {
        let mut spec = serde_json::json!({
            "module": {"image": "r.example/f:1"},
            "selector": {"matchLabels": {"app": "web"}},
        });
        if let Some(cm) = verify {
            spec["module"]["verify"] =
                serde_json::json!({"cosign": {"publicKeys": {"configMap": cm}}});
        }
        WasmFilter::new("f", serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn the_operators_keys_and_the_filters_own_are_both_required() {
        let platform = KeysAt {
            namespace: "platform".into(),
            source: KeySource {
                config_map: Some("required".into()),
                secret: None,
            },
        };
        assert!(requirements(&wf(None), "shop", None).is_empty());
        let own = requirements(&wf(Some("team-keys")), "shop", None);
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].describe(), "ConfigMap shop/team-keys");
        let both = requirements(&wf(Some("team-keys")), "shop", Some(&platform));
        assert_eq!(
            both.iter().map(Requirement::describe).collect::<Vec<_>>(),
            ["ConfigMap platform/required", "ConfigMap shop/team-keys"]
        );
        assert_eq!(requirements(&wf(None), "shop", Some(&platform)).len(), 1);
    }
}
