//! Waiting for the CRDs the operator watches, saying which are missing.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};

/// CRDs the operator needs before it can watch anything.
pub const REQUIRED_CRDS: &[&str] = &[
    "wasmfilters.wasmfilter.dev",
    "wasmplugins.extensions.istio.io",
    "envoyfilters.networking.istio.io",
];

/// Waits, bounded by `timeout`, until every CRD in [`REQUIRED_CRDS`] is established, saying
/// every few seconds which ones are missing.
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    let mut last_report = None::<Instant>;
    loop {
        let mut missing = Vec::new();
        for name in REQUIRED_CRDS {
            if !established(&api, name).await? {
                missing.push(*name);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let msg = format!(
            "CRDs not installed: {} (install ours with `wasmfilter crd | kubectl apply -f -`; \
             Istio's come with Istio)",
            missing.join(", ")
        );
        if Instant::now() >= deadline {
            return Err(msg);
        }
        if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("{msg}; waiting");
            last_report = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether the CRD `name` exists and is established.
async fn established(api: &Api<CustomResourceDefinition>, name: &str) -> Result<bool, String> {
    match api.get_opt(name).await {
        Ok(Some(crd)) => Ok(crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")),
        Ok(None) => Ok(false),
        Err(e) => Err(format!("cannot read CRD {name}: {e}")),
    }
}

/// The optional CRDs installed now, read once at start: what `target: Auto` means and which
/// children are watched depend on it.
pub async fn installed(client: &Client) -> Result<crate::render::Installed, String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(crate::render::Installed {
        traffic_extension: established(&api, crate::names::istio::TRAFFIC_EXTENSION_CRD).await?,
    })
}
