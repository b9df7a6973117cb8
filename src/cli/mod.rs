//! The `wasmfilter` command line: the binary's edge, where errors become messages and exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

use crate::api::WasmFilter;
use crate::cache::{self, ModuleCache};
use crate::controller::{self, Context, Settings};
use crate::error::Backoff;
use crate::metrics::{self, Metrics};
use crate::oci::{self, RegistryConfig, Resolver};
use crate::render::ModuleServer;

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
    Operator(OperatorArgs),
    /// Print the WasmFilter CustomResourceDefinition as YAML.
    Crd,
    /// Publish a Wasm module (.wasm, or WebAssembly text .wat) to an OCI registry.
    Push(PushArgs),
    /// Fetch and verify a module from any accepted artifact format.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The artifact, e.g. registry.example.com/filters/add-header:1.2.0
    pub reference: String,
    /// Where to write the module.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Talk plain HTTP to the registry (for local registries).
    #[arg(long)]
    pub plain_http: bool,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = oci::DEFAULT_MAX_MODULE_BYTES)]
    pub max_module_size: u64,
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
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = oci::DEFAULT_MAX_MODULE_BYTES)]
    pub max_module_size: u64,
    /// Seconds between re-resolving tags of filters with pullPolicy: Always.
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Seconds to wait at start for the WasmFilter and Istio CRDs before giving up.
    #[arg(long, default_value_t = 300)]
    pub crd_wait_seconds: u64,
    /// This replica's name, reported in Events.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    /// Talk plain HTTP to the registry (for local registries).
    #[arg(long)]
    pub plain_http: bool,
    /// ABI version to declare in the artifact config (default: the one the module exports).
    #[arg(long = "abi")]
    pub abi_versions: Vec<String>,
    /// Root id to declare in the artifact config. Repeatable.
    #[arg(long = "root-id")]
    pub root_ids: Vec<String>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // One TLS provider for the whole process (kube and the OCI client both use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Operator(args) => operator(args).await,
        Command::Crd => {
            print!("{}", crd_yaml()?);
            Ok(())
        }
        Command::Push(args) => push(args).await,
        Command::Pull(args) => pull(args).await,
    }
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

async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
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
    let cache_app = cache::router(cache.clone());
    let admin_app = metrics::router(metrics.clone());
    tokio::spawn(async move { axum::serve(cache_listener, cache_app).await });
    tokio::spawn(async move { axum::serve(admin_listener, admin_app).await });

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    controller::wait_for_crds(&client, Duration::from_secs(args.crd_wait_seconds))
        .await
        .map_err(anyhow::Error::msg)?;

    let mut module_server = ModuleServer::new(&args.cache_url);
    if let Some(cluster) = args.cache_cluster {
        module_server.cluster = cluster;
    }
    let resolver = Resolver::new(RegistryConfig {
        plain_http: args.insecure_registries,
        max_module_bytes: args.max_module_size,
        ..Default::default()
    });
    let settings = Settings {
        namespace: args.namespace,
        module_server,
        resync: Duration::from_secs(args.resync_seconds),
        backoff: Backoff::default(),
        instance: args.instance,
    };
    let ctx = Arc::new(Context::new(client, metrics, resolver, cache, settings));
    tracing::info!(namespace = ?ctx.settings.namespace, "controller starting");
    controller::run(ctx).await;
    Ok(())
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let module = read_module(&args.file)?;
    let reference = oci::parse_reference(&args.reference)?;
    let client = oci_client::Client::new(ClientConfig {
        protocol: if args.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    let size = module.len();
    let opts = oci::PushOptions {
        abi_versions: args.abi_versions,
        root_ids: args.root_ids,
    };
    let (format, digest) =
        oci::push_module(&client, &RegistryAuth::Anonymous, &reference, module, &opts).await?;
    println!(
        "pushed {} ({format}, {size} bytes) digest {digest}",
        reference.whole()
    );
    Ok(())
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let reference = oci::parse_reference(&args.reference)?;
    let resolver = Resolver::new(RegistryConfig {
        plain_http: if args.plain_http {
            vec![reference.resolve_registry().to_string()]
        } else {
            Vec::new()
        },
        max_module_bytes: args.max_module_size,
        ..Default::default()
    });
    let (artifact, module) = resolver.pull(&args.reference, None, None, None).await?;
    let tmp = args.output.with_extension("wasm.partial");
    std::fs::write(&tmp, &module).with_context(|| format!("writing {}", tmp.display()))?;
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
