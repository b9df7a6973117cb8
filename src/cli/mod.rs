//! The `wasmfilter` command line: the binary's edge, where errors become messages and exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use oci_client::secrets::RegistryAuth;

use crate::api::WasmFilter;
use crate::cache::{self, ModuleCache};
use crate::controller::{self, Context, Settings};
use crate::error::Backoff;
use crate::leader::{self, Elector};
use crate::metrics::{self, Metrics};
use crate::oci::{self, Credentials, Format, RegistryConfig, Resolver};
use crate::render::ModuleServer;
use crate::render::ecds::{self, ApiType};
use crate::xds::{self, Xds};

#[derive(Debug, Parser)]
#[command(
    name = "wasmfilter",
    version,
    about = "Deploys proxy-wasm filters into Envoy and Istio"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller and the module cache server.
    Operator(Box<OperatorArgs>),
    /// Print the WasmFilter CustomResourceDefinition as YAML.
    Crd,
    /// Publish a Wasm module (.wasm, or WebAssembly text .wat) to an OCI registry.
    Push(PushArgs),
    /// Fetch and verify a module from any accepted artifact format.
    Pull(PullArgs),
    /// Show a module's format, digests, declared ABI and root ids, exports and imports.
    Inspect(InspectArgs),
    /// Print the filter-chain entry that makes a plain Envoy subscribe to a `target: Ecds`
    /// WasmFilter (an `http_filters` item, or a network `filters` item with --type NETWORK).
    EcdsEntry(EcdsEntryArgs),
    /// Say whether given Envoy versions will load a module, and if not, every reason.
    /// Exit 0: every Envoy loads it; 1: some Envoy refuses it; 2: the input cannot be read
    /// or parsed, or an Envoy version has no measured host data.
    Check(CheckArgs),
    /// Run a module in a sandbox as a proxy would start it (start, context, vm start,
    /// configure with --config), then one request and response through its HTTP callbacks,
    /// printing its log lines and every header change it made. Exit 0: it configured and ran;
    /// 1: it refused its configuration, trapped or ran out of time; 2: the input cannot
    /// be read.
    Run(RunArgs),
    /// Verify that a module's manifest carries a cosign signature (the `sha256-<digest>.sig`
    /// tag, or a Sigstore bundle referring to it) by one of the given public keys, or (keyless)
    /// with a certificate a trusted root's authority issued to the given identity. Exit 0: it
    /// does; 1: it is
    /// unsigned, signed by none of the keys, or the signature is not valid; 2: the input cannot
    /// be read.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The artifact, e.g. registry.example.com/filters/add-header:1.2.0
    pub reference: String,
    /// A PEM public key (ECDSA P-256, as `cosign generate-key-pair` writes). Repeatable: one
    /// signature by any of them is enough.
    #[arg(
        long = "key",
        value_name = "FILE",
        required_unless_present = "certificate_identity",
        conflicts_with = "certificate_identity"
    )]
    pub keys: Vec<PathBuf>,
    /// Keyless: the signing certificate must name this subject (an email or a URI).
    #[arg(long, requires_all = ["certificate_oidc_issuer", "trusted_root"])]
    pub certificate_identity: Option<String>,
    /// Keyless: the OIDC issuer the certificate must name.
    #[arg(long, requires = "certificate_identity")]
    pub certificate_oidc_issuer: Option<String>,
    /// Keyless: a Sigstore trusted root (`trusted_root.json`) whose certificate authorities
    /// are trusted.
    #[arg(long, value_name = "FILE", requires = "certificate_identity")]
    pub trusted_root: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A module file (.wasm or .wat), or an artifact reference.
    pub target: String,
    /// The plugin configuration, as the proxy hands it over (a WasmFilter's spec.config is
    /// handed over as its JSON).
    #[arg(long, default_value = "")]
    pub config: String,
    /// The plugin's root id.
    #[arg(long, default_value = "")]
    pub root_id: String,
    /// A request header, NAME=VALUE. Repeatable. :method GET, :path /, :scheme http and
    /// :authority localhost are sent unless given.
    #[arg(long = "request-header", value_name = "NAME=VALUE", value_parser = header_arg)]
    pub request_headers: Vec<(String, String)>,
    /// A response header, NAME=VALUE. Repeatable. :status 200 is sent unless given.
    #[arg(long = "response-header", value_name = "NAME=VALUE", value_parser = header_arg)]
    pub response_headers: Vec<(String, String)>,
    /// Only start and configure the module; send no request.
    #[arg(long)]
    pub no_request: bool,
    /// Milliseconds the whole run may take.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// The module's memory, at most, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: usize,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub source: SourceArgs,
}

fn namespaced_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

fn header_arg(s: &str) -> Result<(String, String), String> {
    // A pseudo-header's name starts with ':' and may not contain '='.
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err(format!("{s:?} has no header name"));
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

#[derive(Debug, Args)]
pub struct EcdsEntryArgs {
    /// The WasmFilter, as NAMESPACE/NAME (its ECDS resource name).
    pub filter: String,
    /// HTTP (an http_filters item) or NETWORK (a listener filter_chains filters item).
    #[arg(long = "type", value_enum, default_value_t = EntryType::Http)]
    pub filter_type: EntryType,
    /// Name of the bootstrap's cluster that reaches the operator's --xds-listen port.
    #[arg(long, default_value = "wasmfilter_xds")]
    pub xds_cluster: String,
    /// Subscribe with incremental xDS (DELTA_GRPC) instead of state of the world (GRPC).
    #[arg(long)]
    pub delta: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EntryType {
    #[value(name = "HTTP")]
    Http,
    #[value(name = "NETWORK")]
    Network,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A module file (.wasm or .wat), or an artifact reference.
    pub target: String,
    /// Envoy version to check against (e.g. 1.36.2). Repeatable.
    #[arg(long = "envoy", required = true, value_name = "VERSION")]
    pub envoys: Vec<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// How the CLI reaches a registry.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (for local registries).
    #[arg(long)]
    pub plain_http: bool,
    /// PEM file of CA certificates to trust besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Registry user name (default: the entry for the registry in ~/.docker/config.json).
    #[arg(long, env = "WASMFILTER_REGISTRY_USERNAME")]
    pub username: Option<String>,
    /// Registry password or token (prefer the environment variable to the flag).
    #[arg(
        long,
        env = "WASMFILTER_REGISTRY_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    pub password: Option<String>,
    /// Seconds a registry connection may stay silent before it counts as stalled.
    #[arg(long, default_value_t = 30)]
    pub timeout_seconds: u64,
}

impl RegistryArgs {
    /// Credentials for `registry`: the flags, else the docker config, else anonymous.
    fn credentials(&self, registry: &str) -> anyhow::Result<Credentials> {
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            return Ok(Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            });
        }
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(Credentials::Anonymous),
            },
        };
        let json = match std::fs::read(&path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials::Anonymous);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match oci::auth::credentials_from_docker_config(&json, registry) {
            Ok(creds) => Ok(creds),
            Err(oci::auth::DockerConfigError::NoEntry { .. }) => Ok(Credentials::Anonymous),
            Err(e) => bail!("{} {e}", path.display()),
        }
    }

    fn config(&self, registry: &str, max_module_bytes: u64) -> anyhow::Result<RegistryConfig> {
        let mut config = RegistryConfig {
            plain_http: if self.plain_http {
                vec![registry.to_string()]
            } else {
                Vec::new()
            },
            max_module_bytes,
            read_timeout: Duration::from_secs(self.timeout_seconds.max(1)),
            ..Default::default()
        };
        if let Some(file) = &self.ca_file {
            trust_ca_file(&mut config, file)?;
        }
        Ok(config)
    }
}

/// Adds the CA certificates of a PEM file to a registry configuration.
fn trust_ca_file(config: &mut RegistryConfig, file: &std::path::Path) -> anyhow::Result<()> {
    let pem = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    config
        .trust_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// Where a module comes from when it is given as a reference, and how much of it to accept.
#[derive(Debug, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = oci::DEFAULT_MAX_MODULE_BYTES)]
    pub max_module_size: u64,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The artifact, e.g. registry.example.com/filters/add-header:1.2.0
    pub reference: String,
    /// Where to write the module.
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A module file (.wasm or .wat), or an artifact reference.
    pub target: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Formats `wasmfilter push` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PushFormat {
    /// Solo's "oci" Wasm image (raw module layer); read by Istio, Envoy Gateway and us.
    SoloOci,
    /// The CNCF Wasm OCI artifact (`application/wasm` layer).
    Cncf,
    /// An OCI image with `plugin.wasm` in a tar+gzip layer (Istio's "compat" image).
    Compat,
}

impl From<PushFormat> for Format {
    fn from(f: PushFormat) -> Format {
        match f {
            PushFormat::SoloOci => Format::SoloOci,
            PushFormat::Cncf => Format::Cncf,
            PushFormat::Compat => Format::Compat,
        }
    }
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WASMFILTER_NAMESPACE")]
    pub namespace: Option<String>,
    /// URL proxies use to reach this operator's module cache, e.g.
    /// http://wasmfilter-cache.wasmfilter-system.svc:8080
    #[arg(long, env = "WASMFILTER_CACHE_URL")]
    pub cache_url: String,
    /// Envoy cluster name for the cache (default: Istio's outbound|PORT||HOST for --cache-url).
    #[arg(long)]
    pub cache_cluster: Option<String>,
    /// Address the module cache serves on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub cache_listen: SocketAddr,
    /// Address /metrics, /healthz and /readyz are served on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin_listen: SocketAddr,
    /// Directory of the on-disk module cache.
    #[arg(
        long,
        env = "WASMFILTER_CACHE_DIR",
        default_value = "/var/cache/wasmfilter"
    )]
    pub cache_dir: PathBuf,
    /// A registry (host[:port]) that may be reached over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// PEM file of CA certificates to trust for registries besides the system roots.
    #[arg(long, value_name = "FILE", env = "WASMFILTER_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
    /// Seconds a registry connection may stay silent before it counts as stalled.
    #[arg(long, default_value_t = 30)]
    pub registry_timeout_seconds: u64,
    /// Seconds one whole resolve-and-pull may take, however steadily bytes arrive.
    #[arg(long, default_value_t = 600)]
    pub pull_timeout_seconds: u64,
    /// A ConfigMap (NAMESPACE/NAME) of PEM public keys every module must be signed by (cosign),
    /// whatever its WasmFilter says.
    #[arg(long, value_name = "NAMESPACE/CONFIGMAP", value_parser = namespaced_name)]
    pub require_signature_keys: Option<(String, String)>,
    /// For the Istio targets (WasmPlugin, TrafficExtension, EnvoyFilter), read each selected
    /// pod's istio-agent metrics (`http://POD_IP:15020/stats/prometheus`, or the port in the pod's
    /// `status.sidecar.istio.io/port`) to tell, per pod, whether its proxy runs a Wasm plugin
    /// for the filter (`status.workloads[].loaded`, the `Loaded` condition). Needs the
    /// operator to reach the pods on that port, as Prometheus does.
    #[arg(long)]
    pub istio_load_status: bool,
    /// Run every new module with each filter's configuration in a sandbox before deploying
    /// it (`--preflight=false` to deploy without).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub preflight: bool,
    /// Milliseconds a pre-flight run (start and configure) may take.
    #[arg(long, default_value_t = 5000)]
    pub preflight_timeout_ms: u64,
    /// A pre-flight module's memory, at most, in MiB.
    #[arg(long, default_value_t = 256)]
    pub preflight_memory_mib: usize,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = oci::DEFAULT_MAX_MODULE_BYTES)]
    pub max_module_size: u64,
    /// Bound on the on-disk module cache, in bytes; least recently used modules no
    /// WasmFilter deploys are evicted beyond it (modules in use never are).
    #[arg(long)]
    pub cache_max_bytes: Option<u64>,
    /// Seconds between re-resolving tags of filters with pullPolicy: Always.
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Reconciles that may run at once; more wait their turn (each holds its requests and
    /// their bodies until it ends).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Seconds to wait at start for the WasmFilter and Istio CRDs before giving up.
    #[arg(long, default_value_t = 300)]
    pub crd_wait_seconds: u64,
    /// This replica's name, reported in Events and used as its leader-election identity.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Run as one of several replicas: only the holder of a Lease reconciles and writes; the
    /// others serve the module cache and wait to take over. A leader that cannot renew the
    /// Lease exits before another may start.
    #[arg(long, requires = "leader_election_namespace")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "wasmfilter-operator")]
    pub leader_election_lease: String,
    /// The operator's Deployment (in the Lease's namespace): the Lease names it as its owner, so
    /// deleting the install deletes the Lease too. Needs `get` on that Deployment.
    #[arg(long, value_name = "NAME", requires = "leader_elect")]
    pub lease_owner_deployment: Option<String>,
    /// Seconds a leader Lease stays valid after its last renewal: how long a dead leader's
    /// replicas wait before one takes over. The leader renews every fifth of it and gives up
    /// leading after two thirds without a renewal.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_duration_seconds: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve plain Envoys over ECDS (gRPC, state of the world and delta) on this address;
    /// `target: Ecds` filters need it.
    #[arg(long, value_name = "ADDR", env = "WASMFILTER_XDS_LISTEN")]
    pub xds_listen: Option<SocketAddr>,
    /// With --leader-elect: where the other replicas reach this one's ECDS port (e.g.
    /// `$(POD_IP):18000`). The leader writes it on the Lease; a follower relays each ECDS stream
    /// it receives there, so an Envoy may connect to any replica. Plain gRPC between replicas.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_parser = host_and_port,
        requires_all = ["xds_listen", "leader_elect"],
        conflicts_with = "xds_tls_cert"
    )]
    pub xds_advertise_address: Option<String>,
    /// PEM certificate (chain) for TLS on the ECDS port.
    #[arg(long, value_name = "FILE", requires_all = ["xds_listen", "xds_tls_key"])]
    pub xds_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the ECDS port.
    #[arg(long, value_name = "FILE", requires = "xds_tls_cert")]
    pub xds_tls_key: Option<PathBuf>,
    /// Bytes of ECDS responses (which carry modules inline) that may exist at once across all
    /// connected Envoys; pushes beyond it wait their turn.
    #[arg(long, value_name = "BYTES", default_value_t = xds::server::DEFAULT_SEND_BUDGET)]
    pub xds_send_budget_bytes: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The module: a .wasm binary, or a .wat text module compiled on the fly.
    pub file: PathBuf,
    /// Where to push it, e.g. registry.example.com/filters/add-header:1.2.0
    pub reference: String,
    /// Artifact format; the default is one Istio, Envoy Gateway and this operator all read.
    #[arg(long, value_enum, default_value_t = PushFormat::SoloOci)]
    pub format: PushFormat,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// ABI version to declare in the artifact config (default: the one the module exports).
    #[arg(long = "abi")]
    pub abi_versions: Vec<String>,
    /// Root id to declare in the artifact config. Repeatable.
    #[arg(long = "root-id")]
    pub root_ids: Vec<String>,
    /// Sign the pushed manifest as `cosign sign --key` does (the `sha256-<digest>.sig` tag
    /// beside it, keeping the signatures already there), with the key `--key` names.
    #[arg(long, requires = "key")]
    pub sign: bool,
    /// The private key to sign with: cosign's (`cosign generate-key-pair`; its password is read
    /// from COSIGN_PASSWORD, as cosign reads it) or a PKCS#8 PEM ECDSA P-256 key.
    #[arg(long, requires = "sign", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // One TLS provider for the whole process (kube and the OCI client both use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Operator(args) => operator(*args).await,
        Command::Crd => {
            print!("{}", crd_yaml()?);
            Ok(())
        }
        Command::Push(args) => push(args).await,
        Command::Pull(args) => pull(args).await,
        Command::Inspect(args) => inspect(args).await,
        Command::Check(args) => check(args).await,
        Command::Run(args) => run_module(args).await,
        Command::Verify(args) => verify(args).await,
        Command::EcdsEntry(args) => ecds_entry(&args),
    }
}

fn ecds_entry(args: &EcdsEntryArgs) -> anyhow::Result<()> {
    let Some((ns, name)) = args.filter.split_once('/') else {
        bail!("name the WasmFilter as NAMESPACE/NAME, e.g. shop/add-header");
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        bail!("name the WasmFilter as NAMESPACE/NAME, e.g. shop/add-header");
    }
    let filter_type = match args.filter_type {
        EntryType::Http => crate::api::FilterType::Http,
        EntryType::Network => crate::api::FilterType::Network,
    };
    let api = if args.delta {
        ApiType::DeltaGrpc
    } else {
        ApiType::Grpc
    };
    let entry = ecds::filter_entry(
        &ecds::resource_name(ns, name),
        filter_type,
        &args.xds_cluster,
        api,
    );
    print!("{}", serde_norway::to_string(&entry)?);
    Ok(())
}

/// The CRD as committed under `crds/`.
pub fn crd_yaml() -> anyhow::Result<String> {
    Ok(format!(
        "# Generated by `wasmfilter crd`; do not edit.\n{}",
        serde_norway::to_string(&WasmFilter::crd())?
    ))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// How long reconciles in flight may take to finish after SIGTERM or SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the operator until SIGTERM or SIGINT, then exits as soon as no reconcile is in flight
/// (at most [`SHUTDOWN_GRACE`] later), whatever state it is in: waiting for CRDs, for a watch
/// that cannot list, or in the middle of a pull.
async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let late_ctx: Arc<OnceLock<Arc<Context>>> = Arc::new(OnceLock::new());
    let elector: Arc<OnceLock<Arc<Elector>>> = Arc::new(OnceLock::new());
    // Kept running after a signal: dropping it would cancel the reconciles in flight.
    let mut run = std::pin::pin!(run_operator(args, late_ctx.clone(), elector.clone()));
    let signal = tokio::select! {
        result = &mut run => return result,
        signal = shutdown_signal() => signal,
    };
    tracing::info!(
        signal,
        "shutting down once reconciles in flight finish (a second signal: now)"
    );
    if let Some(ctx) = late_ctx.get() {
        ctx.stop();
    }
    let drained = async {
        while late_ctx.get().is_some_and(|c| c.reconciles_in_flight() > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = &mut run => {}
        () = drained => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "reconciles still in flight; exiting anyway");
        }
        again = shutdown_signal() => tracing::warn!(signal = again, "exiting now"),
    }
    // Nothing of this replica is in flight any more: another may lead at once.
    if let Some(elector) = elector.get() {
        elector.release().await;
    }
    tracing::info!("stopped");
    // Not a return: the runtime would wait for blocking tasks (a cache write, a hash).
    std::process::exit(0)
}

/// The first SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            tracing::warn!("cannot listen for signals");
            std::future::pending().await
        }
    }
}

async fn run_operator(
    args: OperatorArgs,
    late_ctx: Arc<OnceLock<Arc<Context>>>,
    late_elector: Arc<OnceLock<Arc<Elector>>>,
) -> anyhow::Result<()> {
    #[cfg(feature = "preflight")]
    let preflight = preflight_sandbox(&args)?;
    let cache = ModuleCache::open(&args.cache_dir)
        .with_context(|| format!("opening cache dir {}", args.cache_dir.display()))?;
    let metrics = Arc::new(Metrics::default());

    let cache_listener = tokio::net::TcpListener::bind(args.cache_listen)
        .await
        .with_context(|| format!("binding cache server to {}", args.cache_listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding admin server to {}", args.admin_listen))?;
    tracing::info!(cache = %args.cache_listen, admin = %args.admin_listen, "serving");
    match tokio::task::spawn_blocking({
        let cache = cache.clone();
        move || cache.verify_all()
    })
    .await?
    {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::warn!(
                ?dropped,
                "dropped corrupt or stray files from the module cache"
            );
        }
        Ok(_) => {}
        Err(e) => return Err(e).context("verifying the module cache"),
    }
    let cache_app = cache::router(cache.clone(), Some(late_ctx.clone()));
    let admin_app = metrics::router(metrics.clone());
    tokio::spawn(async move { axum::serve(cache_listener, cache_app).await });
    tokio::spawn(async move { axum::serve(admin_listener, admin_app).await });

    let config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    // Every request to the API server is counted, by verb (`wasmfilter_api_requests_total`).
    let counted = metrics.clone();
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes API client")?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |req: axum::http::Request<kube::client::Body>| {
                counted.api_request(req.method(), req.uri());
                req
            },
        ))
        .build();
    controller::wait_for_crds(&client, Duration::from_secs(args.crd_wait_seconds))
        .await
        .map_err(anyhow::Error::msg)?;
    let installed = controller::installed(&client)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        traffic_extension = installed.traffic_extension,
        "optional Istio CRDs"
    );

    let mut module_server = ModuleServer::new(&args.cache_url);
    if let Some(cluster) = args.cache_cluster {
        module_server.cluster = cluster;
    }
    let mut registry_config = RegistryConfig {
        plain_http: args.insecure_registries,
        max_module_bytes: args.max_module_size,
        read_timeout: Duration::from_secs(args.registry_timeout_seconds.max(1)),
        pull_timeout: Duration::from_secs(args.pull_timeout_seconds.max(1)),
        ..Default::default()
    };
    if let Some(file) = &args.registry_ca_file {
        trust_ca_file(&mut registry_config, file)?;
    }
    let resolver = Resolver::new(registry_config)?;
    let election = match (args.leader_elect, args.leader_election_namespace) {
        (true, Some(namespace)) => Some(leader::Config {
            owner: match &args.lease_owner_deployment {
                Some(name) => leader::deployment_owner(client.clone(), &namespace, name).await,
                None => None,
            },
            namespace,
            name: args.leader_election_lease.clone(),
            identity: args
                .instance
                .clone()
                .unwrap_or_else(|| format!("wasmfilter-{:016x}", fastrand::u64(..))),
            duration: Duration::from_secs(args.lease_duration_seconds),
            xds_address: args.xds_advertise_address.clone(),
        }),
        _ => None,
    };
    let settings = Settings {
        installed,
        istio_load_status: args.istio_load_status,
        namespace: args.namespace,
        module_server,
        resync: Duration::from_secs(args.resync_seconds),
        backoff: Backoff::default(),
        instance: args.instance,
        cache_max_bytes: args.cache_max_bytes,
        required_signature_keys: args
            .require_signature_keys
            .clone()
            .map(|(namespace, name)| controller::verify::KeysAt {
                namespace,
                source: crate::api::KeySource {
                    config_map: Some(name),
                    secret: None,
                },
            }),
        concurrency: args.max_concurrent_reconciles,
    };
    let (xds, xds_events) = match args.xds_listen {
        Some(addr) => {
            let tls = match (&args.xds_tls_cert, &args.xds_tls_key) {
                (Some(cert), Some(key)) => Some((
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
                )),
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the ECDS server to {addr}"))?;
            let (xds, events) = Xds::new();
            tracing::info!(%addr, tls = tls.is_some(), "serving ECDS");
            let serving = xds.clone();
            let client = client.clone();
            let route = xds_route(
                election.is_some(),
                late_elector.clone(),
                args.xds_advertise_address.clone(),
            );
            tokio::spawn(async move {
                let budget = args.xds_send_budget_bytes;
                if let Err(e) =
                    xds::server::serve(listener, serving, Some(client), tls, budget, route).await
                {
                    tracing::error!(error = %e, "the ECDS server stopped");
                }
            });
            (Some(xds), Some(events))
        }
        None => (None, None),
    };
    let ctx = Context::new(client, metrics, resolver, cache, settings, xds);
    #[cfg(feature = "preflight")]
    let ctx = ctx.with_preflight(preflight);
    let ctx = Arc::new(ctx);
    let _ = late_ctx.set(ctx.clone());
    match election {
        Some(config) => {
            // A follower serves the module cache (fetching on demand what some filter deploys)
            // and waits to lead.
            controller::follow_filters(&ctx);
            ctx.metrics.set_ready();
            let elector = Arc::new(Elector::new(ctx.client.clone(), config));
            let _ = late_elector.set(elector.clone());
            tracing::info!(
                identity = %elector.config().identity,
                lease = %elector.config().name,
                "waiting to lead"
            );
            elector.lead().await;
            ctx.metrics.set_leader(true);
            tracing::info!("leading");
            let metrics = ctx.metrics.clone();
            tokio::spawn(async move {
                elector.lost().await;
                metrics.set_leader(false);
                if !elector.is_released() {
                    tracing::error!(
                        "lost the leader Lease: exiting before another replica may lead, so \
                         that no write of this one follows"
                    );
                    std::process::exit(1);
                }
            });
        }
        None => ctx.metrics.set_leader(true),
    }
    tracing::info!(namespace = ?ctx.settings.namespace, "controller starting");
    controller::run(ctx, xds_events).await;
    Ok(())
}

/// `HOST:PORT` (an IPv6 host bare or in brackets), as `--xds-advertise-address` takes it.
fn host_and_port(value: &str) -> Result<String, String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, e.g. 10.0.0.7:18000")?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(format!("{port:?} is not a port (1-65535)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return Err(format!("{host:?} is not a host name or address"));
    }
    Ok(value.to_string())
}

/// Where this replica's ECDS server sends a new stream: alone or leading, it serves it; a
/// follower relays it to the leader's address on the Lease (never to itself).
fn xds_route(
    elected: bool,
    elector: Arc<OnceLock<Arc<Elector>>>,
    own: Option<String>,
) -> xds::relay::Route {
    use xds::relay::Upstream;
    Arc::new(move || {
        if !elected {
            return Upstream::Here;
        }
        match elector.get() {
            Some(e) if e.is_leading() => Upstream::Here,
            Some(e) => match e.leader_xds() {
                Some(leader) if Some(&leader) != own.as_ref() => Upstream::Leader(leader),
                _ => Upstream::Nobody,
            },
            None => Upstream::Nobody,
        }
    })
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let module = read_module(&args.file)?;
    // The key opens before anything is pushed: a wrong password leaves no unsigned module.
    let signer = match &args.key {
        Some(path) if args.sign => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the signing key {}", path.display()))?;
            let password = std::env::var("COSIGN_PASSWORD").unwrap_or_default();
            let signer = oci::sign::Signer::from_pem(&pem, password.as_bytes())
                .with_context(|| format!("reading the signing key {}", path.display()))?;
            Some(signer)
        }
        _ => None,
    };
    let reference = oci::parse_reference(&args.reference)?;
    let registry = reference.resolve_registry().to_string();
    let config = args.registry.config(&registry, u64::MAX)?;
    let client = oci::client(&config);
    let creds = args.registry.credentials(&registry)?;
    let auth = match creds.clone() {
        Credentials::Anonymous => RegistryAuth::Anonymous,
        Credentials::Basic { username, password } => RegistryAuth::Basic(username, password),
    };
    let size = module.len();
    let opts = oci::PushOptions {
        abi_versions: args.abi_versions,
        root_ids: args.root_ids,
    };
    let format = Format::from(args.format);
    let digest = oci::push_module(&client, &auth, &reference, module, format, &opts).await?;
    println!(
        "pushed {} ({format}, {size} bytes) digest {digest}",
        reference.whole()
    );
    if let Some(signer) = signer {
        let resolver = Resolver::new(config)?;
        let tag = oci::sign::push_signature(
            &resolver, &creds, &client, &auth, &reference, &digest, &signer,
        )
        .await?;
        println!("signed {digest} under {tag}");
    }
    Ok(())
}

/// A resolver and credentials for `image`'s registry, from the CLI's registry settings.
fn registry_for(image: &str, source: &SourceArgs) -> anyhow::Result<(Resolver, Credentials)> {
    let reference = oci::parse_reference(image)?;
    let host = reference.resolve_registry().to_string();
    let resolver = Resolver::new(source.registry.config(&host, source.max_module_size)?)?;
    Ok((resolver, source.registry.credentials(&host)?))
}

/// Resolves and verifies a module with the CLI's registry settings.
async fn fetch(image: &str, source: &SourceArgs) -> anyhow::Result<(oci::Artifact, Vec<u8>)> {
    let (resolver, creds) = registry_for(image, source)?;
    Ok(resolver.pull(image, None, None, &creds).await?)
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let (resolver, creds) = registry_for(&args.reference, &args.source)?;
    // The module is written beside the output as it downloads, and takes the output's name
    // only once every check passed.
    let tmp = args.output.with_extension("wasm.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    let pulled = resolver.pull_into(&args.reference, &creds, file).await;
    let (artifact, module) = match pulled {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    // An unpacked module (not a raw layer) comes back to be written here.
    if let Some(module) = module {
        std::fs::write(&tmp, &module).with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "pulled {} digest {} format {} size {} module sha256:{} -> {}",
        artifact.image,
        artifact.manifest_digest,
        artifact.format,
        artifact.size,
        artifact.module_sha256,
        args.output.display()
    );
    Ok(())
}

/// What `wasmfilter inspect` reports.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Inspection {
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_digest: Option<String>,
    module_sha256: String,
    size: u64,
    abi_version: Option<String>,
    abi_versions: Vec<String>,
    declared_abi_versions: Vec<String>,
    root_ids: Vec<String>,
    exports: Vec<crate::abi::Export>,
    imports: Vec<crate::abi::Import>,
}

async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let path = std::path::Path::new(&args.target);
    let (artifact, module) = if path.is_file() {
        (None, read_module(path)?)
    } else {
        let (a, m) = fetch(&args.target, &args.source).await?;
        (Some(a), m)
    };
    let info = crate::abi::inspect(&module)
        .with_context(|| format!("{} is not a loadable module", args.target))?;
    let report = Inspection {
        source: args.target.clone(),
        format: artifact.as_ref().map(|a| a.format.to_string()),
        manifest_digest: artifact.as_ref().map(|a| a.manifest_digest.clone()),
        module_sha256: cache::sha256_hex(&module),
        size: module.len() as u64,
        abi_version: info.abi_version().map(str::to_string),
        abi_versions: info.abi_versions.clone(),
        declared_abi_versions: artifact
            .as_ref()
            .map(|a| a.declared_abi_versions.clone())
            .unwrap_or_default(),
        root_ids: artifact
            .as_ref()
            .map(|a| a.root_ids.clone())
            .unwrap_or_default(),
        exports: info.exports,
        imports: info.imports,
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", inspection_text(&report)),
    }
    Ok(())
}

fn inspection_text(r: &Inspection) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(out, "source:          {}", r.source);
    if let Some(f) = &r.format {
        let _ = writeln!(out, "format:          {f}");
    }
    if let Some(d) = &r.manifest_digest {
        let _ = writeln!(out, "manifest digest: {d}");
    }
    let _ = writeln!(out, "module sha256:   {}", r.module_sha256);
    let _ = writeln!(out, "size:            {} bytes", r.size);
    let _ = writeln!(out, "ABI (exports):   {}", list(&r.abi_versions));
    if r.format.is_some() {
        let _ = writeln!(out, "ABI (declared):  {}", list(&r.declared_abi_versions));
        let _ = writeln!(out, "root ids:        {}", list(&r.root_ids));
    }
    if let (Some(actual), false) = (&r.abi_version, r.declared_abi_versions.is_empty())
        && !r.declared_abi_versions.iter().any(|d| d == actual)
    {
        let _ = writeln!(
            out,
            "note:            the artifact declares ABI {} but the module exports {actual}; the module wins",
            list(&r.declared_abi_versions)
        );
    }
    let _ = writeln!(out, "exports ({}):", r.exports.len());
    for e in &r.exports {
        let sig = e
            .signature
            .as_ref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {:?} {}{sig}", e.kind, e.name);
    }
    let _ = writeln!(out, "imports ({}):", r.imports.len());
    for i in &r.imports {
        let sig = i
            .signature
            .as_ref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {:?} {}.{}{sig}", i.kind, i.module, i.name);
    }
    out
}

/// A failure `check` reports with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// What `wasmfilter check --output json` prints.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CheckReport {
    source: String,
    compatible: bool,
    abi_version: Option<String>,
    /// Every problem, each naming the Envoy version that has it.
    problems: Vec<ReportedProblem>,
    warnings: Vec<crate::abi::check::Problem>,
    verdicts: Vec<crate::abi::check::Verdict>,
}

#[derive(Debug, serde::Serialize)]
struct ReportedProblem {
    code: &'static str,
    message: String,
    envoy: String,
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    use crate::abi::check;
    let unreadable = |m: String| anyhow::Error::new(Unreadable(m));
    let mut hosts = Vec::new();
    for v in &args.envoys {
        let host = check::host(v).ok_or_else(|| unreadable(check::no_host_reason(v)))?;
        hosts.push((v.trim_start_matches('v').to_string(), host));
    }
    let module = load_target(&args.target, &args.source).await?;
    let info =
        crate::abi::inspect(&module).map_err(|e| unreadable(format!("{}: {e}", args.target)))?;
    let verdicts: Vec<_> = hosts
        .iter()
        .map(|(v, h)| check::check(&info, v, h))
        .collect();
    let report = CheckReport {
        source: args.target.clone(),
        compatible: verdicts.iter().all(|v| v.compatible),
        abi_version: info.abi_version().map(str::to_string),
        problems: verdicts
            .iter()
            .flat_map(|v| {
                v.problems.iter().map(|p| ReportedProblem {
                    code: p.code,
                    message: p.message.clone(),
                    envoy: v.envoy.clone(),
                })
            })
            .collect(),
        warnings: verdicts
            .first()
            .map(|v| v.warnings.clone())
            .unwrap_or_default(),
        verdicts,
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => {
            for v in &report.verdicts {
                let abi = v.abi_version.as_deref().unwrap_or("none");
                if v.compatible {
                    println!("Envoy {}: loads (ABI {abi})", v.envoy);
                } else {
                    println!("Envoy {}: refuses (ABI {abi})", v.envoy);
                }
                for p in &v.problems {
                    println!("  {}: {}", p.code, p.message);
                }
            }
            for w in &report.warnings {
                println!("warning: {}: {}", w.code, w.message);
            }
        }
    }
    if report.compatible {
        Ok(())
    } else {
        Err(anyhow::Error::new(Incompatible))
    }
}

/// A module file, or the module of an artifact reference; a failure is [`Unreadable`].
async fn load_target(target: &str, source: &SourceArgs) -> anyhow::Result<Vec<u8>> {
    let path = std::path::Path::new(target);
    let module = if path.is_file() {
        read_module(path)
    } else {
        fetch(target, source).await.map(|(_, module)| module)
    };
    module.map_err(|e| anyhow::Error::new(Unreadable(format!("{e:#}"))))
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    use crate::oci::signature::{self, TrustedKey};
    let unreadable = |m: String| anyhow::Error::new(Unreadable(m));
    let mut keys = Vec::new();
    for path in &args.keys {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| unreadable(format!("reading {}: {e}", path.display())))?;
        keys.push(TrustedKey::from_pem(&path.display().to_string(), &pem).map_err(unreadable)?);
    }
    let keyless = match (
        &args.certificate_identity,
        &args.certificate_oidc_issuer,
        &args.trusted_root,
    ) {
        (Some(subject), Some(issuer), Some(path)) => {
            let json = std::fs::read_to_string(path)
                .map_err(|e| unreadable(format!("reading {}: {e}", path.display())))?;
            let identity = crate::oci::keyless::Identity {
                issuer: issuer.clone(),
                subject: subject.clone(),
            };
            Some(
                crate::oci::keyless::KeylessTrust::from_trusted_root(
                    &path.display().to_string(),
                    &json,
                    vec![identity],
                )
                .map_err(unreadable)?,
            )
        }
        _ => None,
    };
    let (resolver, creds) =
        registry_for(&args.reference, &args.source).map_err(|e| unreadable(format!("{e:#}")))?;
    let (artifact, _) = resolver
        .pull(&args.reference, None, None, &creds)
        .await
        .map_err(|e| unreadable(format!("{e:#}")))?;
    let digest = &artifact.manifest_digest;
    let found = resolver
        .cosign_signatures(&args.reference, digest, &creds)
        .await
        .map_err(|e| unreadable(format!("reading the signatures of {digest}: {e:#}")))?;
    let verdict = match &keyless {
        Some(trust) => signature::verify_keyless(
            digest,
            found.as_ref(),
            trust,
            jiff::Timestamp::now().as_second(),
        ),
        None => signature::verify(digest, found.as_ref(), &keys),
    };
    match verdict {
        Ok(v) => {
            println!(
                "verified {}@{digest}: signed by {} ({}), signature {} ({})",
                artifact.image, v.key, v.key_fingerprint, v.signature_digest, v.scheme
            );
            Ok(())
        }
        Err(refusal) => {
            println!("{}: {refusal}", refusal.reason());
            Err(anyhow::Error::new(Incompatible))
        }
    }
}

/// The operator's pre-flight sandbox, unless `--preflight=false`.
#[cfg(feature = "preflight")]
fn preflight_sandbox(
    args: &OperatorArgs,
) -> anyhow::Result<Option<controller::preflight::Preflight>> {
    if !args.preflight {
        return Ok(None);
    }
    let limits = crate::preflight::Limits {
        timeout: Duration::from_millis(args.preflight_timeout_ms.max(1)),
        memory_bytes: args.preflight_memory_mib.saturating_mul(1 << 20),
    };
    let compiled = args.cache_dir.join("compiled");
    controller::preflight::Preflight::new(limits, Some(compiled))
        .map(Some)
        .context("setting up the pre-flight sandbox")
}

#[cfg(not(feature = "preflight"))]
async fn run_module(_: RunArgs) -> anyhow::Result<()> {
    bail!("this wasmfilter was built without the pre-flight sandbox (cargo feature `preflight`)")
}

#[cfg(feature = "preflight")]
async fn run_module(args: RunArgs) -> anyhow::Result<()> {
    use crate::preflight::{Limits, Plan, Request, Sandbox};
    let module = load_target(&args.target, &args.source).await?;
    let with_defaults = |given: &[(String, String)], defaults: &[(&str, &str)]| {
        let mut headers: Vec<(String, String)> = defaults
            .iter()
            .filter(|(k, _)| !given.iter().any(|(g, _)| g == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        headers.extend(given.iter().cloned());
        headers
    };
    let plan = Plan {
        configuration: args.config.clone().into_bytes(),
        vm_configuration: Vec::new(),
        root_id: args.root_id.clone(),
        name: args.root_id.clone(),
        request: (!args.no_request).then(|| Request {
            request_headers: with_defaults(
                &args.request_headers,
                &[
                    (":method", "GET"),
                    (":path", "/"),
                    (":scheme", "http"),
                    (":authority", "localhost"),
                ],
            ),
            response_headers: with_defaults(&args.response_headers, &[(":status", "200")]),
        }),
    };
    let limits = Limits {
        timeout: Duration::from_millis(args.timeout_ms),
        memory_bytes: args.memory_mib.saturating_mul(1 << 20),
    };
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let sandbox = Sandbox::new(limits, compile_cache_dir())?;
        Ok(match sandbox.compile(&module) {
            Ok(compiled) => sandbox.run(&compiled, &plan),
            Err(failure) => crate::preflight::Report::failed(failure),
        })
    })
    .await??;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", report.to_text()),
    }
    if report.passed() {
        Ok(())
    } else {
        Err(anyhow::Error::new(Incompatible))
    }
}

#[cfg(feature = "preflight")]
/// Where the CLI keeps compiled modules: `$XDG_CACHE_HOME/wasmfilter/compiled` or
/// `~/.cache/wasmfilter/compiled`; none without a home.
fn compile_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasmfilter").join("compiled"))
}

/// `check` found an Envoy that refuses the module, or `run` a module that failed (exit 1;
/// the report says why).
#[derive(Debug, thiserror::Error)]
#[error("the module is refused")]
pub struct Incompatible;

fn read_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "wat") {
        return wat::parse_bytes(&bytes)
            .map(|b| b.into_owned())
            .with_context(|| format!("compiling WebAssembly text {}", path.display()));
    }
    if !bytes.starts_with(crate::abi::WASM_MAGIC) {
        bail!("{} is not a Wasm module (no \\0asm magic)", path.display());
    }
    Ok(bytes)
}
