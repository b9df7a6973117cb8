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
            let established = match api.get_opt(name).await {
                Ok(Some(crd)) => crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                Ok(None) => false,
                Err(e) => return Err(format!("cannot read CRD {name}: {e}")),
            };
            if !established {
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
