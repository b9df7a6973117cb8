//! Which Envoy runs in each selected workload, and whether it will load the module: decided
//! per pod, from (first that applies) the `wasmfilter.dev/envoy-version` annotation, the
//! `istio-proxy` container's Istio release (through a documented Istio → Envoy table), or an
//! Envoy image tag. An Envoy we cannot place is reported as unknown, never guessed.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use serde::Deserialize;

use crate::abi::ModuleInfo;
use crate::abi::check::{self, Verdict};
use crate::api::WorkloadStatus;

pub mod index;
pub mod istio;

/// Pod annotation that states the pod's Envoy version outright.
pub const ANNOTATION_ENVOY_VERSION: &str = "wasmfilter.dev/envoy-version";

/// The Istio release → Envoy release table (documented, not measured).
const ISTIO_ENVOY: &str = include_str!("../../data/istio-envoy.json");

#[derive(Debug, Deserialize)]
struct IstioTable {
    /// Istio `major.minor` → Envoy `major.minor`.
    istio: BTreeMap<String, String>,
}

fn istio_table() -> &'static IstioTable {
    static T: OnceLock<IstioTable> = OnceLock::new();
    T.get_or_init(|| {
        serde_json::from_str(ISTIO_ENVOY).unwrap_or(IstioTable {
            istio: BTreeMap::new(),
        })
    })
}

/// Where a workload's Envoy version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reported live by the pod's Envoy over ECDS (`user_agent_build_version`).
    XdsNode,
    Annotation,
    IstioProxyImage,
    EnvoyImage,
    Unknown,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::XdsNode => "xds-node",
            Source::Annotation => "annotation",
            Source::IstioProxyImage => "istio-proxy-image",
            Source::EnvoyImage => "envoy-image",
            Source::Unknown => "unknown",
        }
    }
}

/// A pod's Envoy, as far as it can be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyVersion {
    /// `1.36.2`, or `1.36` when only the minor release is known (from an Istio release).
    pub version: Option<String>,
    pub source: Source,
    /// How it was worked out, or why it could not be.
    pub detail: String,
}

/// `1.2.3`, `v1.2.3`, `1.2` → the numeric dotted part; anything else → `None`.
fn numeric_version(s: &str) -> Option<String> {
    let v = s.trim().trim_start_matches('v');
    let parts: Vec<_> = v.split('.').collect();
    let ok = (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| v.to_string())
}

/// `docker.io/istio/proxyv2:1.28.0-distroless` → (`docker.io/istio/proxyv2`, `1.28.0-distroless`)
fn split_image(image: &str) -> (&str, Option<&str>) {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], Some(&image[last_slash + i + 1..])),
        None => (image, None),
    }
}

/// A pod reduced to what selecting it and placing its Envoy need: a few strings, where a
/// `Pod` (even trimmed) carries kilobytes of empty container fields. The pod index holds these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The [`ANNOTATION_ENVOY_VERSION`] annotation, when set.
    pub version_annotation: Option<String>,
    /// Name and image of each container, init containers last (Istio's native-sidecar mode
    /// runs istio-proxy as an init container).
    pub containers: Vec<(String, String)>,
    /// The pod is being deleted.
    pub deleting: bool,
    /// The pod's IP, once it has one.
    pub ip: Option<String>,
    /// The istio-agent's status port (the pod's `status.sidecar.istio.io/port`, else 15020).
    pub status_port: u16,
}

impl Workload {
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let containers = spec
            .map(|s| s.containers.iter())
            .into_iter()
            .flatten()
            .chain(
                spec.and_then(|s| s.init_containers.as_ref())
                    .map(|c| c.iter())
                    .into_iter()
                    .flatten(),
            )
            .map(|c: &Container| (c.name.clone(), c.image.clone().unwrap_or_default()))
            .collect();
        Workload {
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            labels: pod.labels().clone(),
            version_annotation: pod.annotations().get(ANNOTATION_ENVOY_VERSION).cloned(),
            containers,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
            status_port: pod
                .annotations()
                .get(istio::ANNOTATION_STATUS_PORT)
                .and_then(|p| p.parse().ok())
                .unwrap_or(istio::DEFAULT_STATUS_PORT),
        }
    }
}

/// Works out the Envoy version of `pod`.
pub fn envoy_version(pod: &Workload) -> EnvoyVersion {
    if let Some(v) = &pod.version_annotation {
        return match numeric_version(v) {
            Some(version) => EnvoyVersion {
                version: Some(version),
                source: Source::Annotation,
                detail: format!("annotation {ANNOTATION_ENVOY_VERSION}={v}"),
            },
            None => EnvoyVersion {
                version: None,
                source: Source::Unknown,
                detail: format!(
                    "annotation {ANNOTATION_ENVOY_VERSION}={v:?} is not a version like 1.36.2"
                ),
            },
        };
    }
    if let Some((_, image)) = pod
        .containers
        .iter()
        .find(|(name, _)| name == "istio-proxy")
    {
        let tag = split_image(image).1.unwrap_or_default();
        let istio = tag.split('-').next().and_then(numeric_version);
        let minor = istio
            .as_deref()
            .map(|v| v.split('.').take(2).collect::<Vec<_>>().join("."));
        let envoy = minor
            .as_deref()
            .and_then(|m| istio_table().istio.get(m).cloned());
        return match (istio, envoy) {
            (Some(istio), Some(envoy)) => EnvoyVersion {
                version: Some(envoy.clone()),
                source: Source::IstioProxyImage,
                detail: format!("istio-proxy image {image}: Istio {istio} ships Envoy {envoy}"),
            },
            (Some(istio), None) => EnvoyVersion {
                version: None,
                source: Source::Unknown,
                detail: format!(
                    "istio-proxy image {image}: Istio {istio} is not in the Istio → Envoy table; \
                     set the {ANNOTATION_ENVOY_VERSION} annotation"
                ),
            },
            (None, _) => EnvoyVersion {
                version: None,
                source: Source::Unknown,
                detail: format!(
                    "istio-proxy image {image:?} has no Istio version tag; set the \
                     {ANNOTATION_ENVOY_VERSION} annotation"
                ),
            },
        };
    }
    for (container, image) in &pod.containers {
        let (repo, tag) = split_image(image);
        let repo_name = repo.rsplit('/').next().unwrap_or(repo);
        if !(repo.contains("envoyproxy/") && repo_name.starts_with("envoy")) {
            continue;
        }
        // v1.33.2, distroless-v1.33.2, contrib-v1.33.2
        let version = tag
            .and_then(|t| t.rsplit('-').next())
            .and_then(numeric_version);
        return match version {
            Some(v) => EnvoyVersion {
                version: Some(v.clone()),
                source: Source::EnvoyImage,
                detail: format!("container {container} runs {image}"),
            },
            None => EnvoyVersion {
                version: None,
                source: Source::Unknown,
                detail: format!(
                    "container {container} runs {image}, whose tag names no version; set the \
                     {ANNOTATION_ENVOY_VERSION} annotation"
                ),
            },
        };
    }
    EnvoyVersion {
        version: None,
        source: Source::Unknown,
        detail: format!(
            "no {ANNOTATION_ENVOY_VERSION} annotation, istio-proxy container or \
             envoyproxy/envoy image"
        ),
    }
}

/// Whether `pod`'s Envoy will load the module.
pub fn assess(pod: &Workload, info: &ModuleInfo) -> WorkloadStatus {
    assess_live(pod, info, None)
}

/// Like [`assess`], with the version the pod's connected Envoy reported over xDS, which
/// beats every other source: it is the exact build that will load the module.
pub fn assess_live(pod: &Workload, info: &ModuleInfo, live: Option<String>) -> WorkloadStatus {
    let envoy = match live {
        Some(v) => EnvoyVersion {
            detail: format!("its Envoy reported {v} over xDS"),
            version: Some(v),
            source: Source::XdsNode,
        },
        None => envoy_version(pod),
    };
    let verdict: Option<Result<Verdict, String>> = envoy.version.as_deref().map(|v| {
        check::host_for(v)
            .map(|(host, measured)| check::check(info, &measured, host))
            .ok_or_else(|| check::no_host_reason(v))
    });
    let (compatible, reasons) = match verdict {
        Some(Ok(v)) => (
            Some(v.compatible),
            v.problems.into_iter().map(|p| p.message).collect(),
        ),
        Some(Err(why)) => (None, vec![why]),
        None => (None, vec![envoy.detail.clone()]),
    };
    WorkloadStatus {
        name: pod.name.clone(),
        envoy_version: envoy.version,
        version_source: envoy.source.as_str().to_string(),
        compatible,
        reasons,
        ..Default::default()
    }
}

/// Every selected pod's verdict, most urgent first (refusing, then unknown, then compatible;
/// by name within each). `live` gives the version a pod's connected Envoy reported, if any.
pub fn assess_all<'a>(
    pods: impl IntoIterator<Item = &'a Workload>,
    info: &ModuleInfo,
    live: impl Fn(&Workload) -> Option<String>,
) -> Vec<WorkloadStatus> {
    let mut workloads: Vec<WorkloadStatus> = pods
        .into_iter()
        .map(|p| assess_live(p, info, live(p)))
        .collect();
    workloads.sort_by_key(|w| {
        let rank = match w.compatible {
            Some(false) => 0,
            None => 1,
            Some(true) => 2,
        };
        (rank, w.name.clone())
    });
    workloads
}

/// Whether every label of `selector` is on `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Workload {
        Workload::of(&serde_norway::from_str::<Pod>(yaml).unwrap())
    }

    #[test]
    fn an_istio_proxys_metrics_are_at_its_ip_on_15020_or_the_annotated_port() {
        let p = pod("metadata: {name: a}\nstatus: {podIP: 10.0.0.7}");
        assert_eq!((p.ip.as_deref(), p.status_port), (Some("10.0.0.7"), 15020));
        let p = pod("metadata: {name: a, annotations: {status.sidecar.istio.io/port: \"15021\"}}");
        assert_eq!((p.ip, p.status_port), (None, 15021));
        // Not a port: Istio's default.
        let p = pod("metadata: {name: a, annotations: {status.sidecar.istio.io/port: nope}}");
        assert_eq!(p.status_port, 15020);
    }

    #[test]
    fn the_annotation_wins() {
        let p = pod(
            "metadata: {name: a, annotations: {wasmfilter.dev/envoy-version: v1.38.3}}\n\
             spec: {containers: [{name: istio-proxy, image: docker.io/istio/proxyv2:1.28.0}]}",
        );
        let v = envoy_version(&p);
        assert_eq!(v.version.as_deref(), Some("1.38.3"));
        assert_eq!(v.source, Source::Annotation);
    }

    #[test]
    fn an_istio_proxy_maps_through_the_release_table() {
        for image in [
            "docker.io/istio/proxyv2:1.28.0",
            "gcr.io/istio-release/proxyv2:1.28.2-distroless",
            "localhost:5000/istio/proxyv2:1.28.1@sha256:0123",
        ] {
            let p = pod(&format!(
                "metadata: {{name: a}}\nspec: {{initContainers: [{{name: istio-proxy, image: \"{image}\"}}], containers: [{{name: app, image: nginx}}]}}"
            ));
            let v = envoy_version(&p);
            assert_eq!(v.version.as_deref(), Some("1.36"), "{image}");
            assert_eq!(v.source, Source::IstioProxyImage);
        }
        let p = pod(
            "metadata: {name: a}\nspec: {containers: [{name: istio-proxy, image: docker.io/istio/proxyv2:1.99.0}]}",
        );
        let v = envoy_version(&p);
        assert_eq!((v.version, v.source), (None, Source::Unknown));
        assert!(
            v.detail.contains("not in the Istio → Envoy table"),
            "{}",
            v.detail
        );
    }

    #[test]
    fn an_envoy_image_tag_is_read() {
        for (image, want) in [
            ("envoyproxy/envoy:v1.33.2", Some("1.33.2")),
            (
                "docker.io/envoyproxy/envoy-distroless:v1.40.0",
                Some("1.40.0"),
            ),
            ("envoyproxy/envoy:distroless-v1.36.4", Some("1.36.4")),
            ("envoyproxy/envoy:dev-abc123", None),
        ] {
            let p = pod(&format!(
                "metadata: {{name: a}}\nspec: {{containers: [{{name: proxy, image: \"{image}\"}}]}}"
            ));
            assert_eq!(envoy_version(&p).version.as_deref(), want, "{image}");
        }
        let p = pod("metadata: {name: a}\nspec: {containers: [{name: app, image: nginx:1.27}]}");
        assert_eq!(envoy_version(&p).source, Source::Unknown);
    }

    #[test]
    fn a_bad_annotation_is_unknown_not_guessed() {
        let p = pod(
            "metadata: {name: a, annotations: {wasmfilter.dev/envoy-version: latest}}\nspec: {containers: []}",
        );
        let v = envoy_version(&p);
        assert_eq!((v.version, v.source), (None, Source::Unknown));
    }
}
