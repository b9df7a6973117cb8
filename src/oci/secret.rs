//! Registry credentials from a filter's pull secret: one Secret, read by name from the filter's
//! own namespace (never listed or watched).

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::{Credentials, Error};

const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";

/// Credentials for `image`'s registry from the `kubernetes.io/dockerconfigjson` Secret `name`
/// in namespace `ns`; anonymous without a secret.
pub async fn pull_credentials(
    client: &kube::Client,
    ns: &str,
    name: Option<&str>,
    image: &str,
) -> Result<Credentials, Error> {
    let Some(name) = name else {
        return Ok(Credentials::Anonymous);
    };
    let err = |message: String, missing: bool| Error::PullSecret {
        name: name.to_string(),
        message,
        missing,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| match &e {
            kube::Error::Api(status) if status.code == 403 => Error::PullSecretForbidden {
                name: name.to_string(),
                namespace: ns.to_string(),
                message: status.message.clone(),
            },
            _ => err(format!("cannot read it: {e}"), true),
        })?
        .ok_or_else(|| {
            err(
                format!(
                    "no Secret {name:?} in namespace {ns:?}; create it with \
                     `kubectl -n {ns} create secret docker-registry {name} ...`"
                ),
                true,
            )
        })?;
    let reference = super::parse_reference(image)?;
    credentials_from_secret(&secret, reference.resolve_registry())
        .map_err(|message| err(message, false))
}

/// Credentials for `registry` in a docker-config Secret, or why it holds none usable.
fn credentials_from_secret(secret: &Secret, registry: &str) -> Result<Credentials, String> {
    if secret.type_.as_deref() != Some(DOCKER_CONFIG_JSON) {
        return Err(format!(
            "has type {:?}; it must be {DOCKER_CONFIG_JSON}",
            secret.type_.clone().unwrap_or_default()
        ));
    }
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .ok_or("has no .dockerconfigjson key")?;
    super::auth::credentials_from_docker_config(&data.0, registry).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, data: Option<&str>) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: data
                .map(|d| BTreeMap::from([(".dockerconfigjson".to_string(), ByteString(d.into()))])),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_of_another_type_or_without_the_key_is_refused_by_name() {
        let e = credentials_from_secret(&secret("Opaque", Some("{}")), "r.example").unwrap_err();
        assert!(e.contains("must be kubernetes.io/dockerconfigjson"), "{e}");
        let e =
            credentials_from_secret(&secret(DOCKER_CONFIG_JSON, None), "r.example").unwrap_err();
        assert!(e.contains(".dockerconfigjson"), "{e}");
    }

    #[test]
    fn the_entry_for_the_image_registry_is_used() {
        let config = r#"{"auths":{"r.example:5000":{"username":"u","password":"p"}}}"#;
        let creds =
            credentials_from_secret(&secret(DOCKER_CONFIG_JSON, Some(config)), "r.example:5000")
                .unwrap();
        assert!(!creds.is_anonymous());
    }
}
