//! Who a connecting Envoy is: the pod it stands for, and the Envoy build it runs.

use envoy_types::pb::envoy::config::core::v3::{Node, node::UserAgentVersionType};
use envoy_types::pb::google::protobuf::value::Kind;

/// A pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// What the xDS node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub pod: Option<PodRef>,
    /// `major.minor.patch` from `user_agent_build_version`.
    pub envoy_version: Option<String>,
}

impl NodeInfo {
    /// Reads the pod as Istio's sidecars name it (metadata `NAMESPACE` and `NAME`), else from
    /// an id `<pod>.<namespace>` (or Istio's `sidecar~IP~<pod>.<namespace>~...`).
    pub fn from_node(node: &Node) -> Self {
        let meta = |key: &str| {
            node.metadata
                .as_ref()?
                .fields
                .get(key)
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })
        };
        let pod = match (meta("NAMESPACE"), meta("NAME")) {
            (Some(namespace), Some(name)) => Some(PodRef { namespace, name }),
            _ => pod_from_id(&node.id),
        };
        let envoy_version = match &node.user_agent_version_type {
            Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
                .version
                .as_ref()
                .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)),
            _ => None,
        };
        NodeInfo {
            id: node.id.clone(),
            pod,
            envoy_version,
        }
    }
}

/// `<pod>.<namespace>`: a namespace is a DNS label (no dots), a pod name may hold dots.
fn pod_from_id(id: &str) -> Option<PodRef> {
    let id = match id.split('~').collect::<Vec<_>>().as_slice() {
        [_, _, pod_ns, _] => pod_ns,
        _ => id,
    };
    let (name, namespace) = id.rsplit_once('.')?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let pod_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (label(namespace) && pod_name(name)).then(|| PodRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::BuildVersion;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 40,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str) -> Option<PodRef> {
        Some(PodRef {
            namespace: ns.into(),
            name: name.into(),
        })
    }

    #[test]
    fn metadata_wins_then_the_id() {
        let n = NodeInfo::from_node(&node("x.y", &[("NAMESPACE", "shop"), ("NAME", "web-1")]));
        assert_eq!(n.pod, pod("shop", "web-1"));
        assert_eq!(n.envoy_version.as_deref(), Some("1.40.0"));
        assert_eq!(
            NodeInfo::from_node(&node("web-1.shop", &[])).pod,
            pod("shop", "web-1")
        );
        assert_eq!(
            NodeInfo::from_node(&node("web.v2.shop", &[])).pod,
            pod("shop", "web.v2")
        );
        assert_eq!(
            NodeInfo::from_node(&node(
                "sidecar~10.1.2.3~web-1.shop~shop.svc.cluster.local",
                &[]
            ))
            .pod,
            pod("shop", "web-1")
        );
        for id in ["edge-proxy", "", "Web.shop", "web.", ".shop"] {
            assert_eq!(NodeInfo::from_node(&node(id, &[])).pod, None, "{id:?}");
        }
        // Only one of the two keys: fall back to the id.
        assert_eq!(
            NodeInfo::from_node(&node("a.b", &[("NAMESPACE", "shop")])).pod,
            pod("b", "a")
        );
    }
}
