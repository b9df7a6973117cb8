//! Registry credentials and the pieces of the distribution auth flow that are policy rather
//! than protocol: where credentials come from (a `kubernetes.io/dockerconfigjson` Secret or
//! `~/.docker/config.json`), which registry an entry belongs to, what a `WWW-Authenticate`
//! challenge asks for, and which token realms we agree to contact (the SSRF guard).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

/// Credentials for one registry. Never printed: `Debug` redacts them, and no error message
/// built in this crate includes them.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Credentials {
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Credentials::Anonymous)
    }

    /// The `Authorization` value for HTTP basic auth, when there are credentials.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                STANDARD.encode(format!("{username}:{password}"))
            )),
        }
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Why a docker config could not give credentials. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerConfigError {
    #[error("is not a docker config (JSON with an \"auths\" map): {0}")]
    Malformed(String),
    #[error("has no credentials for {registry} (it has entries for: {found})")]
    NoEntry { registry: String, found: String },
    #[error("entry for {registry} has an \"auth\" value that is not base64 of user:password")]
    BadAuth { registry: String },
}

/// Credentials for `registry` (`host[:port]`) from a docker config file's JSON (the content
/// of `~/.docker/config.json` or of a `.dockerconfigjson` Secret key).
pub fn credentials_from_docker_config(
    json: &[u8],
    registry: &str,
) -> Result<Credentials, DockerConfigError> {
    let config: DockerConfig =
        serde_json::from_slice(json).map_err(|e| DockerConfigError::Malformed(e.to_string()))?;
    let wanted = normalize_registry(registry);
    let Some((key, entry)) = config
        .auths
        .iter()
        .find(|(k, _)| normalize_registry(k) == wanted)
    else {
        let found = if config.auths.is_empty() {
            "none".to_string()
        } else {
            config.auths.keys().cloned().collect::<Vec<_>>().join(", ")
        };
        return Err(DockerConfigError::NoEntry {
            registry: registry.to_string(),
            found,
        });
    };
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let bad = || DockerConfigError::BadAuth {
        registry: key.clone(),
    };
    let decoded = STANDARD
        .decode(entry.auth.as_deref().ok_or_else(bad)?.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Credentials::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// `https://index.docker.io/v1/` → `docker.io`; `Reg.Example:5000/` → `reg.example:5000`.
fn normalize_registry(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// What a registry's `WWW-Authenticate` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value, preferring a Bearer challenge when several are offered.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let challenges = http_auth::parse_challenges(header).ok()?;
    let mut basic = false;
    for c in &challenges {
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            return Some(Challenge::Bearer {
                realm: param("realm")?,
                service: param("service"),
                scope: param("scope"),
            });
        }
        basic |= c.scheme.eq_ignore_ascii_case("basic");
    }
    basic.then_some(Challenge::Basic)
}

/// The kinds of address a token realm must not point at unless the registry itself does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1, 0.0.0.0, ::.
    Loopback,
    /// 169.254.0.0/16, fe80::/10, and the cloud metadata endpoints.
    LinkLocal,
    Other,
}

/// Cloud metadata endpoints that are not link-local themselves.
const METADATA_ADDRESSES: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), // Alibaba Cloud
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), // AWS IMDS over IPv6
];

/// Host names of metadata services, refused without resolving them.
const METADATA_HOSTS: &[&str] = &["metadata.google.internal", "metadata", "instance-data"];

pub fn classify_address(ip: IpAddr) -> AddressClass {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if METADATA_ADDRESSES.contains(&ip) {
        return AddressClass::LinkLocal;
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() => AddressClass::Loopback,
        IpAddr::V4(v4) if v4.is_link_local() => AddressClass::LinkLocal,
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => AddressClass::Loopback,
        IpAddr::V6(v6) if v6.is_unicast_link_local() => AddressClass::LinkLocal,
        _ => AddressClass::Other,
    }
}

/// Where a host name points: the class of each address, and the addresses themselves (empty
/// for a literal IP or a known metadata name, which need no lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub classes: Vec<AddressClass>,
    pub addrs: Vec<std::net::SocketAddr>,
}

/// The classes of every address `host` resolves to (a literal IP resolves to itself).
pub async fn classify_host(host: &str, port: u16) -> Result<Resolved, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if METADATA_HOSTS.contains(&bare.to_ascii_lowercase().as_str()) {
        return Ok(Resolved {
            classes: vec![AddressClass::LinkLocal],
            addrs: Vec::new(),
        });
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(Resolved {
            classes: vec![classify_address(ip)],
            addrs: Vec::new(),
        });
    }
    let addrs: Vec<_> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("cannot resolve {bare}: {e}"))?
        .collect();
    let mut classes: Vec<_> = addrs.iter().map(|a| classify_address(a.ip())).collect();
    classes.sort();
    classes.dedup();
    if classes.is_empty() {
        return Err(format!("{bare} resolves to no address"));
    }
    Ok(Resolved { classes, addrs })
}

/// The SSRF guard: a realm may point at a loopback or link-local (metadata) address only
/// when the registry itself has an address of that same class.
pub fn realm_allowed(registry: &[AddressClass], realm: &[AddressClass]) -> Result<(), String> {
    for class in realm {
        let name = match class {
            AddressClass::Other => continue,
            AddressClass::Loopback => "a loopback address",
            AddressClass::LinkLocal => "a link-local or cloud metadata address",
        };
        if !registry.contains(class) {
            return Err(format!(
                "it points at {name} and the registry itself is not one"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Credentials {
        Credentials::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn docker_config_entries_match_by_host() {
        let auth = STANDARD.encode("alice:s3cret:with:colons");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "Reg.Example:5000":{{"username":"bob","password":"pw"}}}}}}"#
        );
        assert_eq!(
            credentials_from_docker_config(json.as_bytes(), "docker.io"),
            Ok(basic("alice", "s3cret:with:colons"))
        );
        assert_eq!(
            credentials_from_docker_config(json.as_bytes(), "reg.example:5000"),
            Ok(basic("bob", "pw"))
        );
        let err = credentials_from_docker_config(json.as_bytes(), "ghcr.io").unwrap_err();
        assert_eq!(
            err.to_string(),
            "has no credentials for ghcr.io (it has entries for: Reg.Example:5000, https://index.docker.io/v1/)"
        );
    }

    #[test]
    fn docker_config_errors_never_show_secrets() {
        let json = br#"{"auths":{"r.io":{"auth":"bm90LWEtcGFpcg=="}}}"#; // "not-a-pair"
        let err = credentials_from_docker_config(json, "r.io").unwrap_err();
        assert!(!err.to_string().contains("not-a-pair"), "{err}");
        assert!(matches!(
            credentials_from_docker_config(b"not json", "r.io"),
            Err(DockerConfigError::Malformed(_))
        ));
        assert_eq!(
            format!("{:?}", basic("u", "hunter2")),
            r#"Basic { username: "u", password: "<redacted>" }"#
        );
    }

    #[test]
    fn challenges_are_parsed() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn addresses_are_classified() {
        let c = |s: &str| classify_address(s.parse().unwrap());
        assert_eq!(c("127.0.0.1"), AddressClass::Loopback);
        assert_eq!(c("127.9.9.9"), AddressClass::Loopback);
        assert_eq!(c("0.0.0.0"), AddressClass::Loopback);
        assert_eq!(c("::1"), AddressClass::Loopback);
        assert_eq!(c("::ffff:127.0.0.1"), AddressClass::Loopback);
        assert_eq!(c("169.254.169.254"), AddressClass::LinkLocal);
        assert_eq!(c("fe80::1"), AddressClass::LinkLocal);
        assert_eq!(c("fd00:ec2::254"), AddressClass::LinkLocal);
        assert_eq!(c("100.100.100.200"), AddressClass::LinkLocal);
        assert_eq!(c("10.0.0.1"), AddressClass::Other);
        assert_eq!(c("203.0.113.7"), AddressClass::Other);
    }

    #[test]
    fn realms_on_special_addresses_need_a_registry_of_the_same_kind() {
        use AddressClass::*;
        assert!(realm_allowed(&[Other], &[Other]).is_ok());
        assert!(realm_allowed(&[Loopback], &[Loopback]).is_ok());
        assert!(realm_allowed(&[Other], &[Loopback]).is_err());
        assert!(realm_allowed(&[Loopback], &[LinkLocal]).is_err());
        assert!(realm_allowed(&[Other], &[Other, LinkLocal]).is_err());
    }

    #[tokio::test]
    async fn metadata_host_names_are_link_local_without_lookup() {
        assert_eq!(
            classify_host("metadata.google.internal", 80)
                .await
                .map(|r| r.classes),
            Ok(vec![AddressClass::LinkLocal])
        );
        assert_eq!(
            classify_host("[::1]", 80).await.map(|r| r.classes),
            Ok(vec![AddressClass::Loopback])
        );
        let local = classify_host("localhost", 80).await.unwrap();
        assert_eq!(local.classes, vec![AddressClass::Loopback]);
        assert!(!local.addrs.is_empty());
    }
}
