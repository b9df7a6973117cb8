//! Shared by the integration tests: the real test environment (`e2e/env.sh up`), the operator
//! binary run per test in its own namespace, pushes to the real registry, real Envoys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod ecds;
pub mod gitops;
pub mod istio;
pub mod registries;

// What building and applying a `Filter` needs, for every test file.
pub use serde_json::json;
pub use wasmfilter::api::{OnIncompatible, PullPolicy, Target};

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::DynamicObject;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;
use wasmfilter::api::{ModuleSource, WasmFilter, WasmFilterSpec, WorkloadSelector};

/// The environment the image and the chart give the operator (glibc's malloc arenas), so tests
/// and benchmarks run it as deployed.
pub const DEPLOYED_ENV: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "2")];

/// URL the tests' operators advertise for their cache (as a Service would be named).
pub const CACHE_URL: &str = "http://wasmfilter-cache.wasmfilter-system.svc:8080";

pub struct Env {
    pub registry: String,
    pub registry_root: PathBuf,
    pub envoy_dir: PathBuf,
    pub envoy_versions: Vec<String>,
}

/// The environment `e2e/env.sh up` started. Tests need it and say so plainly when it is absent.
pub fn env() -> Env {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!(
                "{k} is not set: these tests run against the real test environment; \
                 run `e2e/test.sh`, or `source $(e2e/env.sh up)` then `cargo test`"
            )
        })
    };
    Env {
        registry: var("WASMFILTER_REGISTRY"),
        registry_root: var("WASMFILTER_REGISTRY_ROOT").into(),
        envoy_dir: var("WASMFILTER_ENVOY_DIR").into(),
        envoy_versions: var("WASMFILTER_ENVOY_VERSIONS")
            .split_whitespace()
            .map(String::from)
            .collect(),
    }
}

/// The test node (`e2e/env.sh up --node`): where its pods reach the registry, and the taint a
/// pod tolerates to be scheduled there (pods of other tests are API objects only).
pub struct TestNode {
    pub registry: String,
    pub taint: String,
}

/// The test node, if the environment has one.
pub fn test_node() -> Option<TestNode> {
    if std::env::var("WASMFILTER_NODE").ok()? != "1" {
        return None;
    }
    Some(TestNode {
        registry: std::env::var("WASMFILTER_NODE_REGISTRY").ok()?,
        taint: std::env::var("WASMFILTER_NODE_TAINT").ok()?,
    })
}

impl Env {
    /// Where the test registry stores the blob `sha256` (hex) on disk.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.registry_root
            .join("docker/registry/v2/blobs/sha256")
            .join(&sha256[..2])
            .join(sha256)
            .join("data")
    }
}

pub async fn client() -> kube::Client {
    env();
    tls_provider();
    kube::Client::try_default().await.expect("kube client")
}

pub fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("run kubectl")
}

/// `kubectl ARGS` with `input` on stdin.
pub fn kubectl_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `kubectl apply -f -` with `yaml` on stdin.
pub fn kubectl_apply(yaml: &str) -> Output {
    kubectl_stdin(&["apply", "-f", "-"], yaml)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `wasmfilter pull` into `file` that failed with `expected` in its error, leaving `file` as
/// it was (`kept`) and nothing else behind in its directory.
pub fn assert_pull_refused_and_kept(
    out: &Output,
    expected: &str,
    file: &std::path::Path,
    kept: &[u8],
) {
    assert!(!out.status.success(), "{}", stdout(out));
    assert!(
        stderr(out).contains(expected),
        "{expected}: {}",
        stderr(out)
    );
    assert_eq!(std::fs::read(file).unwrap(), kept);
    let left: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [file.file_name().unwrap().to_os_string()]);
}

/// The real `helm` CLI (built by e2e/setup.sh), with its own config, cache and data directories.
pub fn helm(args: &[&str]) -> Output {
    let bin = std::env::var("WASMFILTER_HELM").expect("WASMFILTER_HELM (set by e2e/env.sh)");
    let home = std::env::temp_dir().join("wasmfilter-helm-home");
    Command::new(bin)
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .unwrap()
}

/// The project's Helm chart.
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/wasmfilter-operator");

/// `helm upgrade RELEASE` of the chart in `ns`, keeping its values but `set`, with `wait`'s
/// flags; asserts it succeeded.
pub fn helm_upgrade_set(release: &str, ns: &str, set: &str, wait: &[&str]) -> String {
    let mut args = vec![
        "upgrade",
        release,
        CHART,
        "--namespace",
        ns,
        "--reuse-values",
        "--set",
        set,
    ];
    args.extend_from_slice(wait);
    ok(helm(&args))
}

/// A command's stdout, after asserting it succeeded (its output in the failure otherwise).
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// A namespace of one test's own, deleted when the test ends.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str) -> Self {
        env();
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let out = kubectl(&["create", "namespace", &name]);
        assert!(out.status.success(), "create namespace: {}", stderr(&out));
        if test_node().is_some() {
            // With a node, service account admission is on: a pod is refused until the
            // namespace's `default` ServiceAccount exists (made by the controller manager).
            let deadline = Instant::now() + Duration::from_secs(30);
            while !kubectl(&["get", "serviceaccount", "default", "-n", &name])
                .status
                .success()
            {
                assert!(
                    Instant::now() < deadline,
                    "no default ServiceAccount in {name} after 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A free port on 127.0.0.1, drawn below the kernel's ephemeral range (32768+) so that no
/// outgoing connection of another test takes it between this check and its use, and never
/// handed out twice in one test process: two Envoys given one port both bind it (Envoy sets
/// `SO_REUSEPORT`) and the kernel splits connections between them.
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let port = (0..1000)
        .map(|_| fastrand::u16(10_000..30_000))
        .find(|p| !given.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("no free port in 10000-30000");
    given.insert(port);
    port
}

/// The operator binary, or, with `WASMFILTER_OPERATOR_WRAPPER` set (say `heaptrack -o FILE`
/// to profile a benchmark), that command running it.
fn operator_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_wasmfilter");
    match std::env::var("WASMFILTER_OPERATOR_WRAPPER") {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut words = wrapper.split_whitespace();
            let mut cmd = Command::new(words.next().unwrap());
            cmd.args(words).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

/// The process's TLS provider (reqwest and kube need one, even for plain HTTP); idempotent.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `f` until it yields a value, at most `timeout`; panics naming `what` otherwise.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A "registry" that accepts connections and never answers: a pull against it stays in flight.
/// `accepted` hears of each connection.
pub struct SilentRegistry {
    pub addr: String,
    pub accepted: tokio::sync::mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentRegistry {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
                let _ = tx.send(());
            }
        });
        SilentRegistry {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for SilentRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OCI image manifest from the test registry, as JSON.
pub async fn get_manifest(registry: &str, repository: &str, reference: &str) -> Value {
    serde_json::from_slice(&get_manifest_bytes(registry, repository, reference).await).unwrap()
}

/// Stores `body` (of `media_type`) as manifest `reference` of `repository`; returns its digest.
pub async fn put_manifest(
    registry: &str,
    repository: &str,
    reference: &str,
    media_type: &str,
    body: Vec<u8>,
) -> String {
    let digest = format!("sha256:{}", wasmfilter::cache::sha256_hex(&body));
    let r = reqwest::Client::new()
        .put(format!(
            "http://{registry}/v2/{repository}/manifests/{reference}"
        ))
        .header("Content-Type", media_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT manifest: {}", r.status());
    digest
}

/// The raw bytes of a manifest.
pub async fn get_manifest_bytes(registry: &str, repository: &str, reference: &str) -> Vec<u8> {
    get_manifest_as(
        registry,
        repository,
        reference,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await
}

/// The raw bytes of a manifest (or index) of media type `accept`.
pub async fn get_manifest_as(
    registry: &str,
    repository: &str,
    reference: &str,
    accept: &str,
) -> Vec<u8> {
    tls_provider();
    reqwest::Client::new()
        .get(format!(
            "http://{registry}/v2/{repository}/manifests/{reference}"
        ))
        .header("Accept", accept)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// A process's resident memory now and at its peak, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) process `pid` has used so far, in seconds; 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on: utime and
    // stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    field(14)
        .zip(field(15))
        .map_or(0.0, |(u, s)| (u + s) / ticks)
}

/// The pid of the test environment's process `name` (`kube-apiserver`, `etcd`, `registry`),
/// from `e2e/env.sh`'s pid files.
pub fn env_pid(name: &str) -> Option<u32> {
    let dir = std::env::var("WASMFILTER_ENV_PIDS").ok()?;
    std::fs::read_to_string(format!("{dir}/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A kubeconfig for ServiceAccount `ns/name` (a TokenRequest token), written into `dir`.
pub fn service_account_kubeconfig(ns: &str, name: &str, dir: &std::path::Path) -> PathBuf {
    let out = kubectl(&["create", "token", name, "-n", ns, "--duration", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    let out = kubectl(&["config", "view", "--raw", "--minify", "-o", "json"]);
    let current: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cluster = &current["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": name, "namespace": ns}}],
        "current-context": "sa",
    });
    let path = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// The operator binary, watching one namespace, with its own cache dir and ports.
pub struct Operator {
    child: Child,
    pub cache_port: u16,
    pub admin_port: u16,
    pub cache_dir: tempfile::TempDir,
    log: PathBuf,
}

impl Operator {
    /// Starts the operator; if another process took one of its ports first, tries again with
    /// new ones (a few times).
    pub async fn start(namespace: &str, extra: &[&str]) -> Self {
        Self::start_with_cache(namespace, extra, tempfile::tempdir().unwrap()).await
    }

    /// Like [`Operator::start`], with a given cache directory (to restart on the same cache).
    pub async fn start_with_cache(
        namespace: &str,
        extra: &[&str],
        cache_dir: tempfile::TempDir,
    ) -> Self {
        Self::start_with(namespace, extra, cache_dir, &|_| CACHE_URL.to_string()).await
    }

    /// Like [`Operator::start`], advertising the cache at `cache_url(cache port)`: proxies that
    /// really fetch modules from it (Istio's) need a URL that reaches it.
    pub async fn start_advertising(
        namespace: &str,
        extra: &[&str],
        cache_url: &dyn Fn(u16) -> String,
    ) -> Self {
        Self::start_with(namespace, extra, tempfile::tempdir().unwrap(), cache_url).await
    }

    async fn start_with(
        namespace: &str,
        extra: &[&str],
        mut cache_dir: tempfile::TempDir,
        cache_url: &dyn Fn(u16) -> String,
    ) -> Self {
        for _ in 0..5 {
            let mut op = Self::spawn_with(namespace, extra, cache_dir, None, cache_url);
            if op.ready_or_exited().await {
                return op;
            }
            assert!(
                op.logs().contains("Address already in use"),
                "operator exited:\n{}",
                op.logs()
            );
            cache_dir = op.take_cache_dir();
        }
        panic!("operator could not bind its ports in 5 attempts");
    }

    /// Stops the operator and hands back its cache directory.
    pub fn take_cache_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.cache_dir, tempfile::tempdir().unwrap())
    }

    /// Where the module with this sha256 lives in the operator's cache.
    pub fn cached_module_path(&self, sha256: &str) -> PathBuf {
        self.cache_dir
            .path()
            .join("modules/sha256")
            .join(format!("{sha256}.wasm"))
    }

    /// Starts the operator as the identity in `kubeconfig`, without waiting for it to be ready.
    pub fn launch_as(namespace: &str, extra: &[&str], kubeconfig: &std::path::Path) -> Self {
        Self::spawn_with(
            namespace,
            extra,
            tempfile::tempdir().unwrap(),
            Some(kubeconfig),
            &|_| CACHE_URL.to_string(),
        )
    }

    fn spawn_with(
        namespace: &str,
        extra: &[&str],
        cache_dir: tempfile::TempDir,
        kubeconfig: Option<&std::path::Path>,
        cache_url: &dyn Fn(u16) -> String,
    ) -> Self {
        // Its readiness and metrics are read over HTTP with reqwest.
        tls_provider();
        let env = env();
        let (cache_port, admin_port) = (free_port(), free_port());
        let log = cache_dir.path().join("operator.log");
        // An empty namespace: every namespace (benchmarks).
        let scope: &[&str] = if namespace.is_empty() {
            &[]
        } else {
            &["--namespace", namespace]
        };
        let child = operator_command()
            .args(["operator", "--cache-url", &cache_url(cache_port)])
            .args(scope)
            .args(["--cache-listen", &format!("127.0.0.1:{cache_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--insecure-registry", &env.registry])
            .arg("--cache-dir")
            .arg(cache_dir.path().join("modules"))
            .args(extra)
            .env("RUST_LOG", "info,wasmfilter=debug")
            .envs(DEPLOYED_ENV.iter().copied())
            .envs(kubeconfig.map(|k| ("KUBECONFIG", k)))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start operator");
        Operator {
            child,
            cache_port,
            admin_port,
            cache_dir,
            log,
        }
    }

    /// Runs the operator binary with exactly `args` (after `operator`) as the identity in
    /// `kubeconfig`, its listen addresses and cache directory replaced by loopback ports and a
    /// temporary directory; waits until it is ready.
    pub async fn run_as(args: &[String], kubeconfig: &std::path::Path) -> Self {
        tls_provider();
        let cache_dir = tempfile::tempdir().unwrap();
        let (cache_port, admin_port) = (free_port(), free_port());
        let local = |a: &String| {
            if a.starts_with("--cache-listen") {
                format!("--cache-listen=127.0.0.1:{cache_port}")
            } else if a.starts_with("--admin-listen") {
                format!("--admin-listen=127.0.0.1:{admin_port}")
            } else if a.starts_with("--cache-dir") {
                format!("--cache-dir={}", cache_dir.path().join("modules").display())
            } else {
                a.clone()
            }
        };
        let args: Vec<String> = args.iter().map(local).collect();
        let log = cache_dir.path().join("operator.log");
        let child = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
            .args(&args)
            .env("RUST_LOG", "info,wasmfilter=debug")
            .env("KUBECONFIG", kubeconfig)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start operator");
        let mut op = Operator {
            child,
            cache_port,
            admin_port,
            cache_dir,
            log,
        };
        assert!(
            op.ready_or_exited().await,
            "operator ({args:?}) exited:\n{}",
            op.logs()
        );
        op
    }

    /// Waits for `/readyz` (true) or the process's exit (false); panics after 60 s.
    async fn ready_or_exited(&mut self) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "operator not ready in 60s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The sum of the operator's metric lines starting with `name` (a name, or a name with
    /// labels such as `wasmfilter_reconcile_errors_total{reason="InvalidSpec"}`); 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The operator's whole `/metrics` page (empty when it does not answer).
    pub async fn metrics_text(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let out = Command::new("kill").args(["-TERM", &pid]).output().unwrap();
        assert!(out.status.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits up to `within` for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- operator log ---\n{}", self.logs());
        }
    }
}

/// The add-header fixture filter, made unique by `marker` so each test pushes its own blob.
pub fn module(marker: &str) -> Vec<u8> {
    let src = include_str!("../fixtures/modules/add_header.wat");
    let end = src.rfind(')').unwrap();
    let unique = format!(
        "{}  (data (i32.const 512) \"{}\")\n)\n",
        &src[..end],
        marker.replace('"', "")
    );
    wat::parse_str(unique).unwrap()
}

/// The add-header fixture padded with a custom section to `size` bytes: a valid module.
pub fn module_of_size(size: usize) -> Vec<u8> {
    let src = include_str!("../fixtures/modules/add_header.wat");
    let mut m = wat::parse_str(src).unwrap();
    let name = b"padding";
    let header = 1 + 5 + 1 + name.len();
    let payload = size.saturating_sub(m.len() + header);
    let body_len = 1 + name.len() + payload;
    m.push(0); // custom section id
    let mut n = body_len as u32;
    for i in 0..5 {
        // fixed-width LEB128, so the header size is known up front
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        m.push(if i < 4 { byte | 0x80 } else { byte });
    }
    m.push(name.len() as u8);
    m.extend_from_slice(name);
    m.resize(m.len() + payload, 0xa5);
    wasmparser::Validator::new().validate_all(&m).unwrap();
    m
}

pub fn registry_client() -> Client {
    tls_provider();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes a module in the Solo "oci" format with the product's own push code; returns the
/// manifest digest.
pub async fn push_module(reference: &str, module: Vec<u8>) -> String {
    let r: Reference = reference.parse().unwrap();
    wasmfilter::oci::push_module(
        &registry_client(),
        &RegistryAuth::Anonymous,
        &r,
        module,
        wasmfilter::oci::Format::SoloOci,
        &Default::default(),
    )
    .await
    .unwrap()
}

/// Pushes arbitrary layers under an arbitrary config media type; returns the manifest digest.
pub async fn push_raw(
    reference: &str,
    config_media_type: &str,
    layers: &[(&[u8], &str)],
) -> String {
    push_raw_with_config(reference, b"{}", config_media_type, layers).await
}

/// Like [`push_raw`], with the config blob's bytes given too.
pub async fn push_raw_with_config(
    reference: &str,
    config_data: &[u8],
    config_media_type: &str,
    layers: &[(&[u8], &str)],
) -> String {
    let r: Reference = reference.parse().unwrap();
    let client = registry_client();
    let layers: Vec<ImageLayer> = layers
        .iter()
        .map(|(data, mt)| ImageLayer::new(data.to_vec(), (*mt).to_string(), None))
        .collect();
    let config = Config::new(config_data.to_vec(), config_media_type.to_string(), None);
    client
        .push(&r, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .unwrap();
    client
        .fetch_manifest_digest(&r, &RegistryAuth::Anonymous)
        .await
        .unwrap()
}

/// A WasmFilter as tests write it, typed: selector `app: web`, target `WasmPlugin`, root id
/// `add_header`, and whatever the test sets on top. `yaml()` is what `kubectl apply` takes.
#[derive(Clone)]
pub struct Filter(WasmFilter);

impl Filter {
    pub fn new(ns: &str, name: &str, image: &str) -> Self {
        let spec = WasmFilterSpec {
            module: ModuleSource {
                image: image.to_string(),
                pull_secret: None,
                pull_policy: PullPolicy::IfNotPresent,
                sha256: None,
                verify: None,
            },
            selector: WorkloadSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
            },
            target: Target::WasmPlugin,
            root_id: Some("add_header".into()),
            config: None,
            phase: Default::default(),
            priority: None,
            failure_policy: Default::default(),
            filter_type: Default::default(),
            traffic: Vec::new(),
            on_incompatible: OnIncompatible::Block,
            rollout: None,
        };
        let mut wf = WasmFilter::new(name, spec);
        wf.metadata.namespace = Some(ns.to_string());
        Filter(wf)
    }

    pub fn target(mut self, target: Target) -> Self {
        self.0.spec.target = target;
        self
    }

    pub fn pull_policy(mut self, policy: PullPolicy) -> Self {
        self.0.spec.module.pull_policy = policy;
        self
    }

    pub fn pull_secret(mut self, secret: &str) -> Self {
        self.0.spec.module.pull_secret = Some(secret.to_string());
        self
    }

    /// A stepped rollout (`target: Ecds`).
    pub fn rollout(mut self, rollout: wasmfilter::api::Rollout) -> Self {
        self.0.spec.rollout = Some(rollout);
        self
    }

    pub fn on_incompatible(mut self, policy: OnIncompatible) -> Self {
        self.0.spec.on_incompatible = policy;
        self
    }

    /// Selects pods labelled `app: <app>` instead of `app: web`.
    pub fn app(mut self, app: &str) -> Self {
        self.0.spec.selector.match_labels = [("app".to_string(), app.to_string())].into();
        self
    }

    /// The plugin configuration (a JSON object).
    pub fn config(mut self, config: Value) -> Self {
        self.0.spec.config = config.as_object().cloned();
        self
    }

    /// Pins the module's own sha256.
    pub fn sha256(mut self, sha256: &str) -> Self {
        self.0.spec.module.sha256 = Some(sha256.to_string());
        self
    }

    /// Any other typed change of the spec.
    pub fn edit(mut self, edit: impl FnOnce(&mut WasmFilterSpec)) -> Self {
        edit(&mut self.0.spec);
        self
    }

    /// The manifest as JSON, for what the typed spec cannot say (a value out of its range).
    pub fn json(&self) -> Value {
        serde_json::to_value(&self.0).unwrap()
    }

    /// The manifest without the spec field `field` (as a user who leaves it to its default).
    pub fn yaml_without(&self, field: &str) -> String {
        let mut v = self.json();
        v["spec"].as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    /// The manifest for `kubectl apply` (JSON, which is YAML).
    pub fn yaml(&self) -> String {
        serde_json::to_string_pretty(&self.0).unwrap()
    }

    pub fn apply(&self) {
        apply_ok(&self.yaml());
    }
}

pub fn apply_ok(yaml: &str) {
    let out = kubectl_apply(yaml);
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        stderr(&out)
    );
}

pub fn condition<'a>(
    wf: &'a WasmFilter,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    wf.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until the filter's status describes its current generation and satisfies `ok`;
/// panics with `what` and the last status seen otherwise.
pub async fn wait_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    ok: impl Fn(&WasmFilter) -> bool,
) -> WasmFilter {
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), ns);
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(wf)) = api.get_opt(name).await {
            let current =
                wf.status.as_ref().and_then(|s| s.observed_generation) == wf.metadata.generation;
            if current && ok(&wf) {
                return wf;
            }
            last = wf.status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for WasmFilter {ns}/{name}: {what}; last status {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the filter is `Ready` with the module `sha256` deployed.
pub fn ready_with_module(wf: &WasmFilter, sha256: &str) -> bool {
    condition(wf, "Ready").is_some_and(|c| c.status == "True")
        && wf
            .status
            .as_ref()
            .and_then(|s| s.artifact.as_ref())
            .is_some_and(|a| a.module_sha256 == sha256)
}

/// Waits until the filter is `Ready` with the module `sha256` deployed.
pub async fn wait_module(client: &kube::Client, ns: &str, name: &str, sha256: &str) -> WasmFilter {
    wait_status(
        client,
        ns,
        name,
        &format!("Ready with module {sha256}"),
        |wf| ready_with_module(wf, sha256),
    )
    .await
}

/// Waits until the filter's condition `type_` has `status` for its current generation.
pub async fn wait_condition(
    client: &kube::Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> WasmFilter {
    wait_status(client, ns, name, &format!("{type_}={status}"), |wf| {
        condition(wf, type_)
            .is_some_and(|c| c.status == status && c.observed_generation == wf.metadata.generation)
    })
    .await
}

pub fn child_api(client: &kube::Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let ar = match kind {
        "WasmPlugin" => wasmfilter::render::wasm_plugin_resource(),
        "TrafficExtension" => wasmfilter::render::traffic_extension_resource(),
        _ => wasmfilter::render::envoy_filter_resource(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Warning Events about the filter, as `(reason, message)`.
pub fn warning_events(ns: &str, name: &str) -> Vec<(String, String)> {
    events(ns, name, "Warning")
}

/// (reason, note) of the Events of `type_` (Normal, Warning) about object `name`.
pub fn events(ns: &str, name: &str, type_: &str) -> Vec<(String, String)> {
    event_objects(ns, name, type_)
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The `events.k8s.io` Events of one type about the object `name`, as the API server holds them.
pub fn event_objects(ns: &str, name: &str, type_: &str) -> Vec<Value> {
    let out = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "-o",
        "json",
        "--field-selector",
        &format!("regarding.name={name},type={type_}"),
    ]);
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!({"items": []}));
    match v["items"].take() {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// Replaces every string value equal to a placeholder.
fn fill(node: Value, values: &[(&str, Value)]) -> Value {
    match node {
        Value::String(s) => values
            .iter()
            .find(|(k, _)| *k == s)
            .map_or(Value::String(s), |(_, v)| v.clone()),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| fill(v, values)).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k, fill(v, values))).collect())
        }
        other => other,
    }
}

/// A real Envoy process.
pub struct Envoy {
    child: Child,
    pub listen_port: u16,
    pub admin_port: u16,
    /// The TCP listener of [`EcdsNode::network_filter`], when there is one.
    pub tcp_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy `version` from `e2e/envoy/bootstrap.json`: one listener whose HTTP filter
    /// chain is `filter` then the router, answering every request itself, and a static cluster
    /// named `cluster` that reaches the operator's cache on `cache_port`.
    pub fn start(version: &str, filter: &Value, cluster: &str, cache_port: u16) -> Self {
        let env = env();
        let (listen_port, admin_port) = (free_port(), free_port());
        let bootstrap = fill(
            serde_json::from_str(include_str!("../../e2e/envoy/bootstrap.json")).unwrap(),
            &[
                ("__ADMIN_PORT__", json!(admin_port)),
                ("__LISTEN_PORT__", json!(listen_port)),
                ("__CACHE_PORT__", json!(cache_port)),
                ("__CACHE_CLUSTER__", json!(cluster)),
                ("__WASM_FILTER__", filter.clone()),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.json");
        std::fs::write(&config, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
        let log = dir.path().join("envoy.log");
        let child = Command::new(env.envoy_dir.join(version).join("envoy"))
            .arg("-c")
            .arg(&config)
            .args(["--base-id", &fastrand::u32(1..1_000_000).to_string()])
            .args(["--log-level", "info", "--concurrency", "1"])
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        Envoy {
            child,
            listen_port,
            admin_port,
            tcp_port: None,
            dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// Waits until the listener is serving (Envoy holds it until the module is fetched).
    pub async fn wait_live(&self) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin_port);
        let logs = || self.logs();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "envoy not ready in 30s:\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- envoy log ---\n{}", self.logs());
        }
    }
}

/// A tar+gzip layer holding `plugin.wasm` (Istio's image formats).
pub fn plugin_layer(module: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "plugin.wasm", module).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// How a test Envoy finds its pod and subscribes.
pub struct EcdsNode<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    /// ECDS names for its HTTP filter chain, in order (each entry printed by `wasmfilter
    /// ecds-entry`).
    pub filters: &'a [String],
    /// `DELTA_GRPC` rather than `GRPC`.
    pub delta: bool,
    /// Name the pod through node metadata `NAMESPACE`/`NAME` (else through the id only).
    pub metadata: bool,
    /// The operator's ECDS port.
    pub xds_port: u16,
    /// PEM CA to verify the ECDS port's TLS certificate with (plain gRPC when `None`).
    pub tls_ca: Option<PathBuf>,
    /// A `default_config` for every entry: this module inline, as a Wasm filter with root id
    /// `add_header`.
    pub default_module: Option<Vec<u8>>,
    /// An ECDS name for a network filter: a second listener (on `Envoy::tcp_port`) whose network
    /// chain is that filter then a TCP proxy to the HTTP listener.
    pub network_filter: Option<&'a str>,
}

/// `wasmfilter ecds-entry ARGS` as JSON: the filter-chain entry a user pastes.
pub fn ecds_entry(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .arg("ecds-entry")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ecds-entry: {}", stderr(&out));
    serde_norway::from_slice(&out.stdout).unwrap()
}

impl Envoy {
    /// Starts Envoy `version` from the README's bootstrap (`examples/ecds-bootstrap.yaml`),
    /// naming `node`'s pod and subscribing to its filters over ECDS; its one cluster is the
    /// operator's ECDS port.
    pub fn start_ecds(version: &str, node: &EcdsNode) -> Self {
        let env = env();
        let (listen_port, admin_port) = (free_port(), free_port());
        let mut b: Value =
            serde_norway::from_str(include_str!("../../examples/ecds-bootstrap.yaml")).unwrap();
        b["node"]["id"] = json!(format!("{}.{}", node.pod, node.namespace));
        if node.metadata {
            b["node"]["metadata"] = json!({"NAMESPACE": node.namespace, "NAME": node.pod});
        } else {
            b["node"].as_object_mut().unwrap().remove("metadata");
        }
        b["admin"]["address"]["socket_address"]["port_value"] = json!(admin_port);
        let listener = &mut b["static_resources"]["listeners"][0];
        listener["address"]["socket_address"]["port_value"] = json!(listen_port);
        let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
        let router = hcm["http_filters"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        let mut chain: Vec<Value> = node
            .filters
            .iter()
            .map(|f| {
                let mut args = vec![f.as_str()];
                if node.delta {
                    args.push("--delta");
                }
                let mut entry = ecds_entry(&args);
                if let Some(m) = &node.default_module {
                    use base64::Engine as _;
                    entry["config_discovery"]["default_config"] = json!({
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {"root_id": "add_header", "vm_config": {
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": {"local": {"inline_bytes": base64::engine::general_purpose::STANDARD.encode(m)}},
                        }},
                    });
                }
                entry
            })
            .collect();
        chain.push(router);
        hcm["http_filters"] = json!(chain);
        let cluster = &mut b["static_resources"]["clusters"][0];
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"] = json!(node.xds_port);
        if let Some(ca) = &node.tls_ca {
            cluster["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": "127.0.0.1",
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "validation_context": {
                            "trusted_ca": {"filename": ca},
                            "match_typed_subject_alt_names": [{"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}],
                        },
                    },
                },
            });
        }
        let tcp_port = node.network_filter.map(|name| {
            let port = free_port();
            let mut entry = ecds_entry(&[name, "--type", "NETWORK", "--delta"]);
            entry["config_discovery"]["config_source"]["api_config_source"]["api_type"] =
                json!(if node.delta { "DELTA_GRPC" } else { "GRPC" });
            let listeners = b["static_resources"]["listeners"].as_array_mut().unwrap();
            listeners.push(json!({
                "name": "tcp",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [entry, {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "tcp", "cluster": "http_listener"},
                }]}],
            }));
            let clusters = b["static_resources"]["clusters"].as_array_mut().unwrap();
            clusters.push(json!({
                "name": "http_listener", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "http_listener", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}}}}]}]},
            }));
            port
        });
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.json");
        std::fs::write(&config, serde_json::to_vec(&b).unwrap()).unwrap();
        let log = dir.path().join("envoy.log");
        let child = Command::new(env.envoy_dir.join(version).join("envoy"))
            .arg("-c")
            .arg(&config)
            .args(["--base-id", &fastrand::u32(1..1_000_000).to_string()])
            .args(["--log-level", "info", "--concurrency", "1"])
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        Envoy {
            child,
            listen_port,
            admin_port,
            tcp_port,
            dir,
        }
    }

    /// A GET through the listener: (status, response headers).
    pub async fn get(&self) -> Option<(u16, reqwest::header::HeaderMap)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/", self.listen_port))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.headers().clone()))
    }

    /// Waits until a response carries header `name` with `value` (`None`: until the response
    /// is `status` without that header).
    pub async fn wait_header(&self, name: &str, value: Option<&str>, status: u16) {
        let what = format!(
            "envoy :{} answering {status} with {name}={value:?}",
            self.listen_port
        );
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((s, h)) = self.get().await {
                let got = h.get(name).and_then(|v| v.to_str().ok()).map(String::from);
                if s == status && got.as_deref() == value {
                    return;
                }
                last = Some((s, got));
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last answer {last:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One of Envoy's counters or gauges (`/stats`), 0 when Envoy has none of that name.
    pub async fn stat(&self, name: &str) -> u64 {
        self.try_stat(name)
            .await
            .unwrap_or_else(|| panic!("envoy admin unreachable:\n{}", self.logs()))
    }

    /// Like [`Envoy::stat`]; `None` while the admin port does not answer.
    pub async fn try_stat(&self, name: &str) -> Option<u64> {
        admin_stat(self.admin_port, name).await
    }

    /// Kills it, as a crash or a node loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One of the counters of the Envoy whose admin port is `admin_port` (0 when it does not
/// exist); `None` while the admin port does not answer.
pub async fn admin_stat(admin_port: u16, name: &str) -> Option<u64> {
    let url = format!(
        "http://127.0.0.1:{admin_port}/stats?filter=^{}$",
        regex::escape(name)
    );
    let body = reqwest::get(url).await.ok()?.text().await.ok()?;
    Some(
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    )
}

/// A pod object (no kubelet runs it) labelled `app`, whose container image names an Envoy.
pub fn envoy_pod_yaml(ns: &str, name: &str, app: &str, envoy_image_tag: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec: {{containers: [{{name: envoy, image: \"docker.io/envoyproxy/envoy:{envoy_image_tag}\"}}]}}\n"
    )
}

/// Runs `envoy --mode validate` with an HTTP Wasm filter loading `module` with the plugin
/// `configuration`; Envoy builds the VM and configures the plugin while validating. Returns
/// whether it accepted the config, and its log.
pub fn envoy_validate(
    envoy: &std::path::Path,
    module: &std::path::Path,
    configuration: Option<&str>,
    dir: &std::path::Path,
) -> (bool, String) {
    let config = dir.join(format!(
        "{}-{:x}.json",
        module.file_stem().unwrap().to_string_lossy(),
        fastrand::u64(..)
    ));
    let mut bootstrap: Value = serde_json::from_str(
        &include_str!("../../e2e/envoy/validate-wasm.json")
            .replace("WASM_MODULE_PATH", &module.to_string_lossy()),
    )
    .unwrap();
    if let Some(c) = configuration {
        bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][0]["typed_config"]["config"]["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": c,
        });
    }
    std::fs::write(&config, bootstrap.to_string()).unwrap();
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-l", "warning", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), log)
}

/// A filter module `e2e/setup.sh` built from source (`go_sdk_filter`, `go_configured_filter`,
/// `clang_filter`): its path.
pub fn built_module(name: &str) -> PathBuf {
    let dir = std::env::var("WASMFILTER_FIXTURE_MODULES").expect(
        "WASMFILTER_FIXTURE_MODULES is not set: e2e/env.sh exports it after e2e/setup.sh built the filters",
    );
    let path = std::path::Path::new(&dir).join(format!("{name}.wasm"));
    assert!(path.is_file(), "{}: e2e/setup.sh builds it", path.display());
    path
}
