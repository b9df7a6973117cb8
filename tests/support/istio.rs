//! What the Istio tests share: a gateway proxy run by the real istio-agent against the test
//! environment's real istiod (`e2e/istio-proxy.sh`), a backend behind it, and the Istio
//! objects that route the gateway to the backend.

use super::*;
use std::os::unix::process::CommandExt;

/// Where the test environment's Istio lives (`e2e/env.sh up` exports it).
pub struct IstioEnv {
    pub proxy_script: PathBuf,
    pub istiod_xds: String,
}

pub fn istio_env() -> IstioEnv {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run `source $(e2e/env.sh up | tail -n1)` (with istiod)")
        })
    };
    IstioEnv {
        proxy_script: var("WASMFILTER_ISTIO_PROXY").into(),
        istiod_xds: var("WASMFILTER_ISTIOD_XDS"),
    }
}

/// A plain HTTP backend on loopback answering every request with 200 `hello`.
pub struct Backend {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                let app = axum::Router::new().fallback(|| async { "hello" });
                let task = tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
                return Backend { port, task };
            }
        }
        panic!("backend could not bind a port in 5 attempts");
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An Istio gateway proxy: the real pilot-agent running a real Envoy, configured by istiod,
/// labelled `app: <name>` in its namespace.
pub struct IstioProxy {
    child: Child,
    pub name: String,
    /// Envoy's admin port.
    pub admin: u16,
    /// The port the gateway's listener uses (see [`route_to_backend`]).
    pub port: u16,
    /// The agent's status port (its merged metrics), reachable from the host.
    pub status: u16,
    dir: tempfile::TempDir,
}

impl IstioProxy {
    /// Starts the proxy `name` in `ns`; `reaches` are the loopback ports it may connect to
    /// besides istiod's (the operator's cache, backends), `hosts` names it resolves to
    /// 127.0.0.1. Waits until Envoy is live.
    pub async fn start(ns: &str, name: &str, reaches: &[u16], hosts: &[&str]) -> Self {
        Self::start_as("router", ns, name, reaches, hosts, None, None).await
    }

    /// A sidecar instead of a gateway (`pilot-agent proxy sidecar`, no iptables): its inbound
    /// listener is the one [`sidecar_in_front_of`] declares, on [`IstioProxy::port`].
    pub async fn start_sidecar(ns: &str, name: &str, reaches: &[u16]) -> Self {
        Self::start_as("sidecar", ns, name, reaches, &[], None, None).await
    }

    /// A gateway whose agent runs Envoy `version` (one of the suite's) instead of the one the
    /// environment pairs with its Istio.
    pub async fn start_with_envoy(ns: &str, name: &str, reaches: &[u16], version: &str) -> Self {
        Self::start_as("router", ns, name, reaches, &[], Some(version), None).await
    }

    /// A gateway whose agent serves its metrics on `status` (a port chosen before it starts,
    /// as a pod's annotation names it before its agent is up).
    pub async fn start_with_status_port(
        ns: &str,
        name: &str,
        reaches: &[u16],
        status: u16,
    ) -> Self {
        Self::start_as("router", ns, name, reaches, &[], None, Some(status)).await
    }

    async fn start_as(
        kind: &str,
        ns: &str,
        name: &str,
        reaches: &[u16],
        hosts: &[&str],
        envoy: Option<&str>,
        status: Option<u16>,
    ) -> Self {
        let env = istio_env();
        // Envoy 1.36's V8 takes SIGSEGV on CPUs with memory protection keys once a Wasm
        // filter reaches the running proxy (e2e/lib/no-pkeys.py); later releases do not.
        let no_pkeys = envoy.is_some_and(|v| v.starts_with("1.36."));
        let envoy = envoy.map(|v| super::env().envoy_dir.join(v).join("envoy"));
        let (admin, port) = (free_port(), free_port());
        let status = status.unwrap_or_else(free_port);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let reaches: Vec<String> = reaches.iter().map(u16::to_string).collect();
        let child = Command::new(&env.proxy_script)
            .arg(dir.path().join("run"))
            .args([name, ns, &json!({"app": name}).to_string()])
            .args([admin.to_string(), reaches.join(" "), port.to_string()])
            // Its own process group: stopping the proxy stops the agent, Envoy and the bridges.
            .process_group(0)
            .env("ISTIO_PROXY_HOSTS", hosts.join(" "))
            .env("ISTIO_PROXY_TYPE", kind)
            .env("ISTIO_PROXY_STATUS_PORT", status.to_string())
            .envs(envoy.map(|e| ("WASMFILTER_ISTIO_ENVOY", e)))
            .env("ISTIO_PROXY_NO_PKEYS", if no_pkeys { "1" } else { "0" })
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start e2e/istio-proxy.sh");
        let mut proxy = IstioProxy {
            child,
            name: name.to_string(),
            admin,
            port,
            status,
            dir,
        };
        proxy.wait_live().await;
        proxy
    }

    async fn wait_live(&mut self) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("istio proxy exited ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "istio proxy not live in 60 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// A request through the gateway: status, headers and body.
    pub async fn get(&self, path: &str) -> Option<(u16, reqwest::header::HeaderMap, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Some((status, headers, r.text().await.ok()?))
    }

    /// Waits until a request through the gateway passes `check` (30 s at most) and returns
    /// that answer.
    pub async fn wait_for_answer(
        &self,
        what: &str,
        check: impl Fn(u16, &reqwest::header::HeaderMap, &str) -> bool,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Some((status, headers, body)) = self.get("/").await {
                if check(status, &headers, &body) {
                    return (status, headers, body);
                }
                last = Some((status, headers, body));
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen through the gateway in 30 s; last answer {last:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that every request through the gateway for `secs` seconds (one every half
    /// second) gets status 200 and exactly the filter headers `expected`.
    pub async fn keeps_answering(&self, secs: u64, expected: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            let (status, headers, body) = self.get("/").await.unwrap();
            assert_eq!((status, body.as_str()), (200, "hello"));
            assert_eq!(filter_headers(&headers), expected);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Envoy's config dump for one resource type (`dynamic_listeners`, `ecds_filters`, ...);
    /// `Null` while Envoy has none of that type (it answers with a line of text then).
    pub async fn config_dump(&self, resource: &str) -> Value {
        let text = reqwest::get(format!(
            "http://127.0.0.1:{}/config_dump?resource={resource}",
            self.admin
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// One of Envoy's counters, 0 when it does not exist.
    pub async fn stat(&self, name: &str) -> u64 {
        admin_stat(self.admin, name)
            .await
            .unwrap_or_else(|| panic!("envoy admin unreachable:\n{}", self.logs()))
    }
}

impl Drop for IstioProxy {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- istio proxy log ---\n{}", self.logs());
        }
    }
}

/// A `ServiceEntry` giving `host:port` one endpoint on loopback, as a Service would for an
/// in-cluster backend: Istio names its cluster `outbound|port||host`.
pub fn loopback_service(ns: &str, name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1}}]
"
    )
}

/// A `Gateway` on the proxy's port (bound to loopback) and a `VirtualService` sending all its
/// traffic to the backend.
pub fn route_to_backend(ns: &str, proxy: &IstioProxy, backend: &Backend) -> String {
    let (name, port, backend_port) = (&proxy.name, proxy.port, backend.port);
    // One per proxy: several gateways in a namespace each reach their own backend.
    let backend_host = format!("{name}.backend.{ns}.test");
    format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [\"*\"]
  gateways: [{name}]
  http: [{{route: [{{destination: {{host: {backend_host}, port: {{number: {backend_port}}}}}}}]}}]
",
        loopback_service(ns, &format!("{name}-backend"), &backend_host, backend_port)
    )
}

/// A `Sidecar` giving the sidecar proxy one inbound HTTP listener on its port (bound to
/// loopback) in front of the backend, as the app it would sit beside, and plaintext between
/// proxies (there is no CA to issue mTLS certificates).
pub fn sidecar_in_front_of(ns: &str, proxy: &IstioProxy, backend: &Backend) -> String {
    let (name, port, backend_port) = (&proxy.name, proxy.port, backend.port);
    format!(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}, namespace: {ns}}}
spec:
  workloadSelector: {{labels: {{app: {name}}}}}
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{backend_port}
  egress: [{{hosts: [\"./*\"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: plaintext, namespace: {ns}}}
spec:
  mtls: {{mode: DISABLE}}
"
    )
}

/// A sidecar proxy named `name` in front of a new backend, serving (200 `hello`) inbound
/// before it returns; `reaches` as in [`IstioProxy::start`].
pub async fn sidecar(ns: &str, name: &str, reaches: &[u16]) -> (IstioProxy, Backend) {
    let backend = Backend::start().await;
    let reaches: Vec<u16> = reaches.iter().copied().chain([backend.port]).collect();
    let proxy = IstioProxy::start_sidecar(ns, name, &reaches).await;
    apply_ok(&sidecar_in_front_of(ns, &proxy, &backend));
    proxy
        .wait_for_answer("the backend's answer", |status, _, body| {
            status == 200 && body == "hello"
        })
        .await;
    (proxy, backend)
}

/// The pod object a proxy stands for (there is no kubelet): its labels, an `istio-proxy`
/// container, the Envoy release it runs in the `wasmfilter.dev/envoy-version` annotation, and
/// the agent's status port in Istio's `status.sidecar.istio.io/port`.
pub fn proxy_pod(ns: &str, proxy: &IstioProxy, envoy_version: &str) -> String {
    pod_at(ns, &proxy.name, proxy.status, envoy_version)
}

/// Like [`proxy_pod`], for a proxy `name` whose agent serves (or will serve) its metrics on
/// `status`.
fn pod_at(ns: &str, name: &str, status: u16, envoy_version: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: {name}}}
  annotations: {{wasmfilter.dev/envoy-version: \"{envoy_version}\", status.sidecar.istio.io/port: \"{status}\"}}
spec: {{containers: [{{name: istio-proxy, image: \"docker.io/istio/proxyv2:1.31.0\"}}]}}
"
    )
}

/// Creates the proxy's pod object ([`proxy_pod`]) with the IP a kubelet would report: the
/// proxy's metrics are at `127.0.0.1:<status>`.
pub fn register_pod(ns: &str, proxy: &IstioProxy, envoy_version: &str) {
    register_pod_at(ns, &proxy.name, proxy.status, envoy_version);
}

/// Like [`register_pod`], for a proxy `name` whose agent is to serve its metrics on `status`
/// and may not have started yet.
pub fn register_pod_at(ns: &str, name: &str, status: u16, envoy_version: &str) {
    apply_ok(&pod_at(ns, name, status, envoy_version));
    let out = kubectl(&[
        "-n",
        ns,
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A gateway proxy named `name` routing to a new backend, serving (200 `hello`) before it
/// returns; `reaches` as in [`IstioProxy::start`].
pub async fn gateway(ns: &str, name: &str, reaches: &[u16]) -> (IstioProxy, Backend) {
    gateway_resolving(ns, name, reaches, &[]).await
}

/// Like [`gateway`], the proxy resolving `hosts` to 127.0.0.1.
pub async fn gateway_resolving(
    ns: &str,
    name: &str,
    reaches: &[u16],
    hosts: &[&str],
) -> (IstioProxy, Backend) {
    serving(ns, reaches, |reaches| async move {
        IstioProxy::start(ns, name, &reaches, hosts).await
    })
    .await
}

/// Like [`gateway`], its agent serving its metrics on `status`
/// ([`IstioProxy::start_with_status_port`]).
pub async fn gateway_with_status_port(
    ns: &str,
    name: &str,
    reaches: &[u16],
    status: u16,
) -> (IstioProxy, Backend) {
    serving(ns, reaches, |reaches| async move {
        IstioProxy::start_with_status_port(ns, name, &reaches, status).await
    })
    .await
}

/// A new backend, a proxy `start`ed reaching it besides `reaches`, and the route between them,
/// once it answers.
async fn serving<F: std::future::Future<Output = IstioProxy>>(
    ns: &str,
    reaches: &[u16],
    start: impl FnOnce(Vec<u16>) -> F,
) -> (IstioProxy, Backend) {
    let backend = Backend::start().await;
    let reaches: Vec<u16> = reaches.iter().copied().chain([backend.port]).collect();
    let proxy = start(reaches).await;
    apply_ok(&route_to_backend(ns, &proxy, &backend));
    proxy
        .wait_for_answer("the backend's answer", |status, _, body| {
            status == 200 && body == "hello"
        })
        .await;
    (proxy, backend)
}

/// The values of the filters' `x-wasmfilter` response header, in the order they were added.
pub fn filter_headers(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all("x-wasmfilter")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}
