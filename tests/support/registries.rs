//! Registries of the tests' own: real `docker-registry` processes with TLS (a CA the test
//! creates), htpasswd basic auth or token auth (a small token server here, signing ES256 JWTs
//! the registry verifies against the test's certificate), and a fault-injecting proxy in front
//! of the real registry for what no well-behaved registry does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::free_port;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate for 127.0.0.1 signed by it, made fresh for one test.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=wasmfilter test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&dir, &ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(&dir, &csr);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        Pki {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            dir,
        }
    }
}

/// How a test registry authenticates clients.
pub enum Auth {
    None,
    /// htpasswd basic auth with one user.
    Basic {
        user: String,
        password: String,
    },
    /// Token auth: the registry sends clients to `realm` and trusts tokens signed with the
    /// certificate in `cert`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert: PathBuf,
    },
}

/// A `docker-registry` process on 127.0.0.1, with its own storage.
pub struct TestRegistry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub tls: bool,
    log: PathBuf,
}

impl TestRegistry {
    /// Starts a registry; `pki` turns TLS on. Waits until it answers.
    pub async fn start(pki: Option<&Pki>, auth: Auth) -> Self {
        let mut dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let mut config = format!(
                "version: 0.1\nlog: {{level: info, accesslog: {{disabled: true}}}}\n\
                 storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                 http:\n  addr: {addr}\n  secret: wasmfilter-tests\n",
                dir.path().join("data").display()
            );
            if let Some(pki) = pki {
                config.push_str(&format!(
                    "  tls: {{certificate: {}, key: {}}}\n",
                    pki.server_cert.display(),
                    pki.server_key.display()
                ));
            }
            match &auth {
                Auth::None => {}
                Auth::Basic { user, password } => {
                    let hash = bcrypt::hash(password, 4).unwrap();
                    let path = dir.path().join("htpasswd");
                    std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
                    config.push_str(&format!(
                        "auth:\n  htpasswd: {{realm: wasmfilter-tests, path: {}}}\n",
                        path.display()
                    ));
                }
                Auth::Token {
                    realm,
                    service,
                    issuer,
                    cert,
                } => config.push_str(&format!(
                    "auth:\n  token: {{realm: \"{realm}\", service: {service}, issuer: {issuer}, rootcertbundle: {}}}\n",
                    cert.display()
                )),
            }
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = dir.path().join(format!("registry-{port}.log"));
            let child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::options().append(true).open(&log).unwrap())
                .spawn()
                .expect("start docker-registry");
            let mut reg = TestRegistry {
                child,
                addr,
                dir,
                tls: pki.is_some(),
                log,
            };
            if reg.wait_listening().await {
                return reg;
            }
            let logs = reg.logs();
            assert!(
                logs.contains("address already in use"),
                "registry did not start:\n{logs}"
            );
            dir = std::mem::replace(&mut reg.dir, tempfile::tempdir().unwrap());
        }
        panic!("registry could not bind a port in 5 attempts");
    }

    async fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("registry not listening in 20 s:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- registry log ---\n{}", self.logs());
        }
    }
}

/// A token server for the registry's token auth: checks basic credentials and signs ES256
/// JWTs with a key whose self-signed certificate the registry trusts.
pub struct TokenServer {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub cert: PathBuf,
    /// Tokens issued, by user name.
    issued: Arc<Mutex<HashMap<String, u64>>>,
    /// Every token issued.
    tokens: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    users: HashMap<String, String>,
    service: String,
    issuer: String,
    lifetime: u64,
    issued: Arc<Mutex<HashMap<String, u64>>>,
    tokens: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    /// Serves tokens to `users` (name → password), each valid for `lifetime`.
    pub async fn start(dir: &Path, users: &[(&str, &str)], lifetime: Duration) -> Self {
        let dir = dir.join("token");
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-days",
                "2",
                "-subj",
                "/CN=wasmfilter test token signer",
            ],
        );
        openssl(
            &dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "token.key",
                "-outform",
                "DER",
                "-out",
                "token.p8",
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-in",
                "token.crt",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        );
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &std::fs::read(dir.join("token.p8")).unwrap(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let issued = Arc::new(Mutex::new(HashMap::new()));
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let signer = Arc::new(Signer {
            key,
            cert_der: std::fs::read(dir.join("token.der")).unwrap(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            service: "wasmfilter-test-registry".into(),
            issuer: "wasmfilter-test-token-server".into(),
            lifetime: lifetime.as_secs(),
            issued: issued.clone(),
            tokens: tokens.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/token", axum::routing::get(issue_token))
            .with_state(signer.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer {
            // A host name, not an IP: the operator resolves it, checks it and pins the request to it.
            realm: format!("http://localhost:{port}/token"),
            service: signer.service.clone(),
            issuer: signer.issuer.clone(),
            cert: dir.join("token.crt"),
            issued,
            tokens,
            task,
        }
    }

    pub fn registry_auth(&self) -> Auth {
        self.registry_auth_with_realm(&self.realm)
    }

    /// Token auth trusting this server's tokens, but sending clients to `realm` for them.
    pub fn registry_auth_with_realm(&self, realm: &str) -> Auth {
        Auth::Token {
            realm: realm.to_string(),
            service: self.service.clone(),
            issuer: self.issuer.clone(),
            cert: self.cert.clone(),
        }
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }

    /// Tokens issued to `user` so far.
    pub fn issued_to(&self, user: &str) -> u64 {
        self.issued.lock().unwrap().get(user).copied().unwrap_or(0)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issue_token(
    State(s): State<Arc<Signer>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let user = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|up| {
            let (u, p) = up.split_once(':')?;
            (s.users.get(u).map(String::as_str) == Some(p)).then(|| u.to_string())
        });
    let Some(user) = user else {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"details\":\"bad credentials\"}",
        )
            .into_response();
    };
    // scope=repository:<name>:<actions>; grant what is asked.
    let access: Vec<_> = q
        .get("scope")
        .and_then(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .into_iter()
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&s.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": s.issuer, "sub": user, "aud": s.service,
        "exp": now + s.lifetime, "nbf": now - 5, "iat": now,
        "jti": format!("{:016x}", fastrand::u64(..)), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = s
        .key
        .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
        .unwrap();
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    *s.issued.lock().unwrap().entry(user).or_default() += 1;
    s.tokens.lock().unwrap().push(token.clone());
    let body = serde_json::json!({
        "token": token, "access_token": token, "expires_in": s.lifetime,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What the fault proxy does to the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Answer every request with this status (and `Retry-After: 1` for 429).
    Status(u16),
    /// Manifests come back with one byte changed (the registry's digest header kept), sent
    /// in full even to a conditional request.
    TamperManifest,
    /// Manifests claim and send more than the operator's manifest cap.
    HugeManifest,
    /// Blobs come back cut in half (with a matching Content-Length).
    TruncateBlobs,
    /// Blobs come back with their bytes altered.
    CorruptBlobs,
    /// Requests are accepted and never answered.
    Stall,
    /// 429 with `Retry-After` of this many seconds.
    Throttle(u64),
    /// Blobs come back whole and correct, one byte per this interval: never silent for long,
    /// never finished.
    Trickle(Duration),
}

/// A reverse proxy in front of a real registry that misbehaves on request.
pub struct FaultProxy {
    pub addr: String,
    fault: Arc<Mutex<Fault>>,
    pub requests: Arc<AtomicU64>,
    /// When each manifest request arrived.
    pub manifest_requests: Arc<Mutex<Vec<std::time::Instant>>>,
    /// The status of each manifest answer passed on from the registry, in order.
    pub manifest_statuses: Arc<Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    fault: Arc<Mutex<Fault>>,
    requests: Arc<AtomicU64>,
    manifest_requests: Arc<Mutex<Vec<std::time::Instant>>>,
    manifest_statuses: Arc<Mutex<Vec<u16>>>,
    http: reqwest::Client,
}

impl FaultProxy {
    /// Proxies plain HTTP to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        super::tls_provider();
        let fault = Arc::new(Mutex::new(Fault::None));
        let requests = Arc::new(AtomicU64::new(0));
        let manifest_requests = Arc::new(Mutex::new(Vec::new()));
        let manifest_statuses = Arc::new(Mutex::new(Vec::new()));
        let state = ProxyState {
            upstream: upstream.to_string(),
            fault: fault.clone(),
            requests: requests.clone(),
            manifest_requests: manifest_requests.clone(),
            manifest_statuses: manifest_statuses.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let app = Router::new().fallback(proxy).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            addr: addr.to_string(),
            fault,
            requests,
            manifest_requests,
            manifest_statuses,
            task,
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(State(s): State<ProxyState>, req: Request) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let fault = s.fault.lock().unwrap().clone();
    let path = req.uri().path().to_string();
    let is_manifest = path.contains("/manifests/");
    let is_blob = path.contains("/blobs/");
    if is_manifest {
        s.manifest_requests
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
    }
    match &fault {
        Fault::Throttle(secs) if path != "/v2/" => {
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                "{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"slow down\"}]}",
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            return resp;
        }
        Fault::Status(code) if path != "/v2/" => {
            let mut resp = (
                StatusCode::from_u16(*code).unwrap(),
                format!("{{\"errors\":[{{\"code\":\"FAULT\",\"message\":\"injected {code}\"}}]}}"),
            )
                .into_response();
            if *code == 429 {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return resp;
        }
        Fault::Stall if path != "/v2/" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Fault::HugeManifest if is_manifest => {
            let body = vec![b' '; 5 * 1024 * 1024];
            return Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.manifest.v1+json",
                )
                .body(Body::from(body))
                .unwrap();
        }
        _ => {}
    }
    let url = format!(
        "http://{}{}",
        s.upstream,
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut up = s.http.request(req.method().clone(), &url);
    // A registry that tampers with manifests sends one whatever the client already holds:
    // the upstream is not asked whether the client's copy is current.
    let tampering = matches!(fault, Fault::TamperManifest) && is_manifest;
    for (k, v) in req.headers() {
        if k != header::HOST && !(tampering && k == header::IF_NONE_MATCH) {
            up = up.header(k, v);
        }
    }
    let body = axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    let resp = match up.body(body).send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status();
    if is_manifest {
        s.manifest_statuses.lock().unwrap().push(status.as_u16());
    }
    let headers = resp.headers().clone();
    let mut bytes = resp.bytes().await.unwrap_or_default().to_vec();
    if status.is_success() {
        match fault {
            Fault::TamperManifest if is_manifest => {
                // Same JSON, one more space: a different digest, still a valid manifest.
                bytes.insert(1, b' ');
            }
            Fault::TruncateBlobs if is_blob => bytes.truncate(bytes.len() / 2),
            Fault::CorruptBlobs if is_blob => {
                if let Some(b) = bytes.last_mut() {
                    *b ^= 0xff;
                }
            }
            _ => {}
        }
    }
    let mut out = Response::builder().status(status);
    for (k, v) in &headers {
        if k != header::CONTENT_LENGTH && k != header::TRANSFER_ENCODING {
            out = out.header(k, v);
        }
    }
    let out = out.header(header::CONTENT_LENGTH, bytes.len());
    match fault {
        Fault::Trickle(every) if is_blob && status.is_success() => {
            let bytes = bytes::Bytes::from(bytes);
            let chunks = futures::stream::unfold(0usize, move |at| {
                let bytes = bytes.clone();
                async move {
                    if at >= bytes.len() {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((Ok::<_, std::io::Error>(bytes.slice(at..at + 1)), at + 1))
                }
            });
            out.body(Body::from_stream(chunks)).unwrap()
        }
        _ => out.body(Body::from(bytes)).unwrap(),
    }
}
