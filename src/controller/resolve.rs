//! Step 1, the module: tag → digest → verified bytes in the cache. With `pullPolicy:
//! IfNotPresent`, the module this image resolved to before, while the cache still holds it:
//! no registry round trip, so a registry outage cannot fail a resync.

use std::time::Instant;

use kube::ResourceExt;

use super::{Context, Error};
use crate::api::{PullPolicy, WasmFilter};
use crate::cache::FetchFailure;
use crate::oci::{self, Artifact};

/// The filter's module, verified and in the cache.
pub(super) async fn resolve(wf: &WasmFilter, ns: &str, ctx: &Context) -> Result<Artifact, Error> {
    if let Some(artifact) = reusable(wf)
        && ctx
            .cache
            .verify_off_thread(&artifact.module_sha256)
            .await
            .unwrap_or(false)
    {
        ctx.cache.touch(&artifact.module_sha256);
        ctx.metrics.cache_hit();
        return Ok(artifact);
    }
    let creds = ctx.pull_credentials(wf, ns).await?;
    let start = Instant::now();
    let fetched = ctx
        .resolver
        .fetch(
            wf.image(),
            pinned_digest(wf),
            wf.spec.module.sha256.as_deref(),
            &ctx.cache,
            &creds,
        )
        .await;
    ctx.metrics
        .pulled(fetched.as_ref().map(|f| f.downloaded), start.elapsed());
    let fetched = fetched?;
    if let Some(info) = fetched.info {
        ctx.remember_info(&fetched.artifact.module_sha256, info);
    }
    // New bytes in the cache: time to look at its size (a cache hit adds none).
    if fetched.downloaded > 0 {
        ctx.evict_soon.notify_one();
    }
    Ok(fetched.artifact)
}

/// The digest to stick to: with `IfNotPresent`, the one the same image resolved to before.
pub(super) fn pinned_digest(wf: &WasmFilter) -> Option<&str> {
    if wf.spec.module.pull_policy != PullPolicy::IfNotPresent {
        return None;
    }
    wf.status
        .as_ref()?
        .artifact
        .as_ref()
        .filter(|a| a.image == wf.image())
        .map(|a| a.manifest_digest.as_str())
}

/// With `IfNotPresent`, the artifact this same image resolved to before (and that satisfies
/// the spec's sha256 pin), to reuse if the cache still holds its bytes.
pub(super) fn reusable(wf: &WasmFilter) -> Option<Artifact> {
    pinned_digest(wf)?;
    let a = wf.status.as_ref()?.artifact.as_ref()?;
    if wf
        .spec
        .module
        .sha256
        .as_ref()
        .is_some_and(|pin| *pin != a.module_sha256)
    {
        return None;
    }
    Some(Artifact {
        image: a.image.clone(),
        manifest_digest: a.manifest_digest.clone(),
        format: serde_json::from_value(serde_json::json!(a.format)).ok()?,
        module_sha256: a.module_sha256.clone(),
        size: a.size,
        abi_version: a.abi_version.clone(),
        declared_abi_versions: a.declared_abi_versions.clone(),
        root_ids: a.root_ids.clone(),
        // Verified again when required (a key may have been withdrawn since).
        signature: None,
        preflight_passed: None,
    })
}

/// Fetches the module `wf`'s status says is deployed (by its manifest digest and sha256), for
/// a proxy asking a replica whose cache lacks it.
pub(super) async fn fetch_deployed(
    ctx: &Context,
    wf: &WasmFilter,
    sha256: &str,
) -> Result<(), FetchFailure> {
    let unavailable = |e: oci::Error| FetchFailure::Unavailable(e.to_string());
    let artifact = wf
        .status
        .as_ref()
        .and_then(|s| s.artifact.clone())
        .ok_or(FetchFailure::Unknown)?;
    let ns = wf.namespace().ok_or(FetchFailure::Unknown)?;
    let creds = ctx.pull_credentials(wf, &ns).await.map_err(unavailable)?;
    tracing::info!(sha256, image = %artifact.image, "fetching a module on a proxy's request");
    let start = Instant::now();
    let fetched = ctx
        .resolver
        .fetch(
            &artifact.image,
            Some(&artifact.manifest_digest),
            Some(sha256),
            &ctx.cache,
            &creds,
        )
        .await;
    ctx.metrics
        .pulled(fetched.as_ref().map(|f| f.downloaded), start.elapsed());
    fetched.map(|_| ()).map_err(unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ArtifactStatus, WasmFilterStatus};

    fn filter(image: &str, policy: PullPolicy, deployed_image: Option<&str>) -> WasmFilter {
        let mut wf: WasmFilter = serde_json::from_value(serde_json::json!({
            "apiVersion": "wasmfilter.dev/v1alpha1",
            "kind": "WasmFilter",
            "metadata": {"name": "f", "namespace": "ns"},
            "spec": {
                "module": {"image": image},
                "selector": {"matchLabels": {"app": "web"}},
                "target": "WasmPlugin",
            }
        }))
        .unwrap();
        wf.spec.module.pull_policy = policy;
        wf.status = deployed_image.map(|image| WasmFilterStatus {
            artifact: Some(ArtifactStatus {
                image: image.into(),
                manifest_digest: "sha256:1111".into(),
                format: "cncf".into(),
                module_sha256: "ab".repeat(32),
                size: 10,
                ..Default::default()
            }),
            ..Default::default()
        });
        wf
    }

    #[test]
    fn if_not_present_sticks_to_the_digest_the_same_image_resolved_to() {
        let wf = filter(
            "r.example/m:v1",
            PullPolicy::IfNotPresent,
            Some("r.example/m:v1"),
        );
        assert_eq!(pinned_digest(&wf), Some("sha256:1111"));
        let reused = reusable(&wf).expect("the cached module is reused");
        assert_eq!(reused.module_sha256, "ab".repeat(32));
        assert_eq!(reused.manifest_digest, "sha256:1111");
    }

    #[test]
    fn always_resolves_the_tag_again() {
        let wf = filter("r.example/m:v1", PullPolicy::Always, Some("r.example/m:v1"));
        assert_eq!(pinned_digest(&wf), None);
        assert!(reusable(&wf).is_none());
    }

    #[test]
    fn a_changed_image_or_pin_resolves_again() {
        let wf = filter(
            "r.example/m:v2",
            PullPolicy::IfNotPresent,
            Some("r.example/m:v1"),
        );
        assert_eq!(pinned_digest(&wf), None);
        assert!(reusable(&wf).is_none());
        let mut pinned = filter(
            "r.example/m:v1",
            PullPolicy::IfNotPresent,
            Some("r.example/m:v1"),
        );
        pinned.spec.module.sha256 = Some("cd".repeat(32));
        assert_eq!(pinned_digest(&pinned), Some("sha256:1111"));
        assert!(reusable(&pinned).is_none(), "the pin no longer matches");
        assert!(reusable(&filter("r.example/m:v1", PullPolicy::IfNotPresent, None)).is_none());
    }
}
