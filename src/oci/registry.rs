//! The pull side of the distribution protocol over `reqwest`: GET a manifest, GET a blob, with
//! the auth dance done here rather than inside a client library, because it is policy:
//!
//! - credentials are per WasmFilter (its own pull secret), so tokens are cached per
//!   (registry, repository, credentials) and never shared between different credentials;
//! - a bearer challenge's realm is checked (scheme, SSRF guard) before anything is sent to it,
//!   and token requests follow no redirects;
//! - tokens are reused until shortly before they expire.
//!
//! Every response is size-capped and every request is bounded in time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::Reference;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, IF_NONE_MATCH, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode, Url};
use serde::Deserialize;

use super::Error;
use super::RegistryConfig;
use super::auth::{self, Challenge, Credentials};

/// Largest manifest accepted (the OCI distribution spec's suggested minimum a registry should
/// accept is 4 MiB; nothing legitimate for a Wasm module comes close).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Largest token response accepted.
const MAX_TOKEN_BYTES: u64 = 1024 * 1024;
/// A token is renewed this long before it expires.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(10);
/// Bearer tokens without `expires_in` last this long (distribution token spec).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Bound on remembered tokens; expired ones go first, then everything if still full.
const MAX_CACHED_TOKENS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    registry: String,
    repository: String,
    /// sha256 of the credentials, so tokens obtained with one secret never serve another.
    credentials: [u8; 32],
}

struct CachedAuth {
    /// The `Authorization` header value.
    header: String,
    expires: Option<Instant>,
}

pub struct RegistryClient {
    http: reqwest::Client,
    token_http: reqwest::Client,
    /// For token clients pinned to checked addresses.
    settings: ClientSettings,
    plain_http: Vec<String>,
    max_manifest_bytes: u64,
    tokens: Mutex<HashMap<TokenKey, CachedAuth>>,
}

/// What every HTTP client of the registry client shares.
struct ClientSettings {
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl ClientSettings {
    /// A client following `redirects`, optionally resolving one host to fixed addresses.
    fn client(
        &self,
        redirects: reqwest::redirect::Policy,
        pin: Option<(&str, &[std::net::SocketAddr])>,
    ) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("wasmfilter/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout)
            .redirect(redirects)
            .tls_backend_preconfigured(self.tls.clone());
        if let Some((host, addrs)) = pin {
            b = b.resolve_to_addrs(host, addrs);
        }
        b.build().map_err(|e| super::error_chain(&e))
    }
}

/// Where a reference's manifest is: by digest when it has one, else by tag.
fn manifest_path(reference: &Reference) -> String {
    format!(
        "manifests/{}",
        reference.digest().or(reference.tag()).unwrap_or("latest")
    )
}

/// How to name the registry in messages.
fn registry_of(reference: &Reference) -> String {
    reference.resolve_registry().to_string()
}

fn fingerprint(creds: &Credentials) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    match creds {
        Credentials::Anonymous => h.update(b"anonymous"),
        Credentials::Basic { username, password } => {
            h.update(b"basic\0");
            h.update(username.as_bytes());
            h.update(b"\0");
            h.update(password.as_bytes());
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The registry's own explanation from an error envelope, if it sent one.
fn envelope_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Envelope {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let env: Envelope = serde_json::from_slice(body).ok()?;
    let parts: Vec<_> = env
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.code, e.message))
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

impl RegistryClient {
    pub fn new(config: &RegistryConfig) -> Result<Self, Error> {
        let tls = config
            .tls_config()
            .map_err(|message| Error::RegistryConfig { message })?;
        let settings = ClientSettings {
            tls,
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
        };
        let build = |redirects, pin| {
            settings
                .client(redirects, pin)
                .map_err(|message| Error::RegistryConfig { message })
        };
        Ok(RegistryClient {
            // Blob downloads may be redirected to storage; reqwest drops the Authorization
            // header when a redirect leaves the registry's origin.
            http: build(reqwest::redirect::Policy::limited(5), None)?,
            token_http: build(reqwest::redirect::Policy::none(), None)?,
            settings,
            plain_http: config.plain_http.clone(),
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, reference: &Reference, path: &str) -> String {
        let registry = registry_of(reference);
        format!(
            "{}://{}/v2/{}/{}",
            self.scheme(&registry),
            registry,
            reference.repository(),
            path
        )
    }

    fn key(reference: &Reference, creds: &Credentials) -> TokenKey {
        TokenKey {
            registry: registry_of(reference),
            repository: reference.repository().to_string(),
            credentials: fingerprint(creds),
        }
    }

    fn cached_auth(&self, key: &TokenKey) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let auth = tokens.get(key)?;
        match auth.expires {
            Some(t) if Instant::now() + TOKEN_RENEW_MARGIN >= t => None,
            _ => Some(auth.header.clone()),
        }
    }

    fn remember(&self, key: TokenKey, auth: CachedAuth) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_CACHED_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, a| a.expires.is_none_or(|t| t > now));
            if tokens.len() >= MAX_CACHED_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(key, auth);
    }

    fn forget(&self, key: &TokenKey) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// GETs `path` under the reference's repository (`manifests/<ref>`, `blobs/<digest>`),
    /// answering an auth challenge once. Any non-2xx status becomes the matching error.
    pub async fn get(
        &self,
        reference: &Reference,
        path: &str,
        accept: &[&str],
        creds: &Credentials,
    ) -> Result<Response, Error> {
        self.get_unless(reference, path, accept, creds, None).await
    }

    /// [`RegistryClient::get`]; with `etag`, sent as `If-None-Match`, a `304 Not Modified`
    /// comes back as it is instead of as an error.
    async fn get_unless(
        &self,
        reference: &Reference,
        path: &str,
        accept: &[&str],
        creds: &Credentials,
        etag: Option<&str>,
    ) -> Result<Response, Error> {
        let url = self.url(reference, path);
        let key = Self::key(reference, creds);
        let mut auth_header = self.cached_auth(&key);
        let mut answered_challenge = false;
        loop {
            let mut req = self.http.get(&url);
            if !accept.is_empty() {
                req = req.header(ACCEPT, accept.join(", "));
            }
            if let Some(h) = &auth_header {
                req = req.header(AUTHORIZATION, h);
            }
            if let Some(etag) = etag {
                req = req.header(IF_NONE_MATCH, format!("\"{etag}\""));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| self.transport_error(reference, &e))?;
            if etag.is_some() && resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            if resp.status() != StatusCode::UNAUTHORIZED || answered_challenge {
                if resp.status() == StatusCode::UNAUTHORIZED {
                    self.forget(&key);
                }
                return self.check_status(reference, resp, creds).await;
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(auth::parse_challenge);
            let Some(challenge) = challenge else {
                return self.check_status(reference, resp, creds).await;
            };
            let auth = self.answer(reference, &challenge, creds).await?;
            let Some(auth) = auth else {
                // A basic challenge and no credentials: nothing to answer with.
                return self.check_status(reference, resp, creds).await;
            };
            auth_header = Some(auth.header.clone());
            self.remember(key.clone(), auth);
            answered_challenge = true;
        }
    }

    /// Answers a challenge: basic credentials as they are, or a bearer token from the realm.
    async fn answer(
        &self,
        reference: &Reference,
        challenge: &Challenge,
        creds: &Credentials,
    ) -> Result<Option<CachedAuth>, Error> {
        match challenge {
            Challenge::Basic => Ok(creds.basic_header().map(|header| CachedAuth {
                header,
                expires: None,
            })),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let (realm, pinned) = self.checked_realm(reference, realm).await?;
                let scope = scope
                    .clone()
                    .unwrap_or_else(|| format!("repository:{}:pull", reference.repository()));
                self.fetch_token(reference, realm, &pinned, service.as_deref(), &scope, creds)
                    .await
                    .map(Some)
            }
        }
    }

    /// The SSRF guard and scheme rule for a token realm.
    /// Returns the realm and, for a host name, the addresses it was checked at (the token
    /// request is pinned to them, so a second DNS answer cannot move it elsewhere).
    async fn checked_realm(
        &self,
        reference: &Reference,
        realm: &str,
    ) -> Result<(Url, Vec<std::net::SocketAddr>), Error> {
        let registry = registry_of(reference);
        let refuse = |why: String| Error::TokenRealmRefused {
            registry: registry.clone(),
            realm: realm.to_string(),
            why,
        };
        let url = Url::parse(realm).map_err(|e| refuse(format!("it is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.scheme(&registry) == "http" => {}
            "http" => {
                return Err(refuse(
                    "it is plain HTTP and the registry is not on the operator's plain-HTTP list"
                        .into(),
                ));
            }
            other => return Err(refuse(format!("scheme {other:?} is not HTTP(S)"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse("it carries credentials in the URL".into()));
        }
        let realm_host = url
            .host_str()
            .ok_or_else(|| refuse("it has no host".into()))?;
        let realm_port = url.port_or_known_default().unwrap_or(443);
        let (reg_host, reg_port) = split_host_port(&registry, self.scheme(&registry));
        let unavailable = |message: String| Error::RegistryUnavailable {
            registry: registry.clone(),
            message,
        };
        let registry_classes = auth::classify_host(&reg_host, reg_port)
            .await
            .map_err(unavailable)?;
        let realm_classes = auth::classify_host(realm_host, realm_port)
            .await
            .map_err(unavailable)?;
        auth::realm_allowed(&registry_classes.classes, &realm_classes.classes).map_err(refuse)?;
        Ok((url, realm_classes.addrs))
    }

    async fn fetch_token(
        &self,
        reference: &Reference,
        mut realm: Url,
        pinned: &[std::net::SocketAddr],
        service: Option<&str>,
        scope: &str,
        creds: &Credentials,
    ) -> Result<CachedAuth, Error> {
        let registry = registry_of(reference);
        {
            let mut q = realm.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let pinned_client;
        let http = match realm.host_str() {
            Some(host) if !pinned.is_empty() => {
                pinned_client = self
                    .settings
                    .client(reqwest::redirect::Policy::none(), Some((host, pinned)))
                    .map_err(|message| Error::RegistryConfig { message })?;
                &pinned_client
            }
            _ => &self.token_http,
        };
        let mut req = http.get(realm.clone());
        if let Some(h) = creds.basic_header() {
            req = req.header(AUTHORIZATION, h);
        }
        let resp = req.send().await.map_err(|e| Error::RegistryUnavailable {
            registry: registry.clone(),
            message: format!(
                "token service {}: {}",
                realm.host_str().unwrap_or(""),
                super::error_chain(&e)
            ),
        })?;
        let status = resp.status();
        let body = read_capped(resp, MAX_TOKEN_BYTES)
            .await
            .map_err(|message| Error::RegistryUnavailable {
                registry: registry.clone(),
                message: format!("token service: {message}"),
            })?;
        if !status.is_success() {
            let detail = envelope_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
            let hint = if status.is_redirection() {
                "a redirect, which token requests never follow (credentials would go elsewhere)"
            } else if creds.is_anonymous() {
                "anonymous token refused; set spec.module.pullSecret"
            } else {
                "the credentials were refused"
            };
            return Err(if status.is_server_error() || status == 429 {
                Error::RegistryUnavailable {
                    registry,
                    message: format!("token service answered {detail}"),
                }
            } else {
                Error::RegistryDenied {
                    reference: reference.whole(),
                    message: format!("token service answered {detail}: {hint}"),
                }
            });
        }
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| Error::RegistryDenied {
                reference: reference.whole(),
                message: format!("token service sent no usable token: {e}"),
            })?;
        let value = token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::RegistryDenied {
                reference: reference.whole(),
                message: "token service sent an empty token".into(),
            })?;
        let lifetime = token
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(Duration::from_secs(24 * 3600));
        Ok(CachedAuth {
            header: format!("Bearer {value}"),
            expires: Some(Instant::now() + lifetime),
        })
    }

    fn transport_error(&self, reference: &Reference, e: &reqwest::Error) -> Error {
        Error::RegistryUnavailable {
            registry: registry_of(reference),
            message: super::error_chain(e),
        }
    }

    async fn check_status(
        &self,
        reference: &Reference,
        resp: Response,
        creds: &Credentials,
    ) -> Result<Response, Error> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
        let detail = envelope_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
        let registry = registry_of(reference);
        Err(match status {
            StatusCode::NOT_FOUND => Error::ManifestNotFound {
                reference: reference.whole(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::RegistryDenied {
                reference: reference.whole(),
                message: if creds.is_anonymous() {
                    format!("{detail}; no credentials were sent")
                } else {
                    format!("{detail}; the credentials were refused")
                },
            },
            StatusCode::TOO_MANY_REQUESTS => Error::RegistryThrottled {
                registry,
                retry_after,
            },
            s if s.is_server_error() => Error::RegistryUnavailable {
                registry,
                message: format!("registry answered {detail}"),
            },
            _ => Error::ResolveDigest {
                reference: reference.whole(),
                message: format!("registry answered {detail}"),
            },
        })
    }

    /// A manifest's raw bytes and the digest the registry says they have
    /// (`Docker-Content-Digest`), refusing anything over the manifest cap before and while
    /// reading.
    pub async fn manifest(
        &self,
        reference: &Reference,
        accept: &[&str],
        creds: &Credentials,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        let path = manifest_path(reference);
        self.whole_document(reference, &path, accept, creds).await
    }

    /// [`RegistryClient::manifest`] unless it is still the manifest with digest `known`: then
    /// `None` (the registry answered `304 Not Modified` to `If-None-Match`; a registry that
    /// ignores the header answers with the manifest, as without it).
    pub async fn manifest_unless(
        &self,
        reference: &Reference,
        accept: &[&str],
        creds: &Credentials,
        known: &str,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, Error> {
        let path = manifest_path(reference);
        self.document(reference, &path, accept, creds, Some(known))
            .await
    }

    /// The OCI 1.1 referrers API's index for `digest` in `reference`'s repository (raw bytes,
    /// capped like a manifest). A registry without the API answers 404 (or another 4xx).
    pub async fn referrers(
        &self,
        reference: &Reference,
        digest: &str,
        creds: &Credentials,
    ) -> Result<Vec<u8>, Error> {
        let path = format!("referrers/{digest}");
        let accept = ["application/vnd.oci.image.index.v1+json"];
        Ok(self
            .whole_document(reference, &path, &accept, creds)
            .await?
            .0)
    }

    /// [`RegistryClient::document`] asked without a condition: always the document.
    async fn whole_document(
        &self,
        reference: &Reference,
        path: &str,
        accept: &[&str],
        creds: &Credentials,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        self.document(reference, path, accept, creds, None)
            .await?
            .ok_or_else(|| Error::RegistryUnavailable {
                registry: registry_of(reference),
                message: "answered 304 Not Modified to a request that was not conditional".into(),
            })
    }

    /// A JSON document under `path`: its bytes and the digest the registry claims; `None`
    /// when `etag` was given and the registry says it still holds.
    async fn document(
        &self,
        reference: &Reference,
        path: &str,
        accept: &[&str],
        creds: &Credentials,
        etag: Option<&str>,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, Error> {
        let resp = self
            .get_unless(reference, path, accept, creds, etag)
            .await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let too_large = |size: String| Error::ManifestTooLarge {
            reference: reference.whole(),
            size,
            limit: self.max_manifest_bytes,
        };
        if let Some(len) = content_length(&resp)
            && len > self.max_manifest_bytes
        {
            return Err(too_large(format!("{len} bytes")));
        }
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        read_capped(resp, self.max_manifest_bytes)
            .await
            .map(|body| Some((body, claimed)))
            .map_err(|message| {
                if message.starts_with("more than") {
                    too_large(message)
                } else {
                    Error::RegistryUnavailable {
                        registry: registry_of(reference),
                        message: format!("reading manifest: {message}"),
                    }
                }
            })
    }
}

fn content_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a whole body, failing once it passes `limit` bytes.
async fn read_capped(mut resp: Response, limit: u64) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| super::error_chain(&e))? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(format!("more than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `host:port` → (host, port); `[::1]:5000` → ("::1", 5000); no port → the scheme's default.
fn split_host_port(registry: &str, scheme: &str) -> (String, u16) {
    let default = if scheme == "http" { 80 } else { 443 };
    if let Some(rest) = registry.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return (host.to_string(), port);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            (host.to_string(), port.parse().unwrap_or(default))
        }
        _ => (registry.to_string(), default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(
            split_host_port("127.0.0.1:5000", "http"),
            ("127.0.0.1".into(), 5000)
        );
        assert_eq!(split_host_port("[::1]:5000", "https"), ("::1".into(), 5000));
        assert_eq!(split_host_port("ghcr.io", "https"), ("ghcr.io".into(), 443));
    }

    #[test]
    fn envelope_messages_are_read() {
        assert_eq!(
            envelope_message(br#"{"errors":[{"code":"DENIED","message":"no access"}]}"#),
            Some("DENIED: no access".into())
        );
        assert_eq!(envelope_message(b"<html>"), None);
    }

    #[test]
    fn different_credentials_never_share_a_token() {
        let a = Credentials::Basic {
            username: "a".into(),
            password: "x".into(),
        };
        let b = Credentials::Basic {
            username: "a".into(),
            password: "y".into(),
        };
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&Credentials::Anonymous));
    }
}
