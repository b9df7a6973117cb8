//! Every pod in scope, kept from one watch and trimmed to what a verdict needs (labels, the
//! version annotation, container names and images), indexed by namespace and label so that
//! selecting a filter's pods reads only pods carrying its rarest label: no LIST per reconcile
//! and no scan of every pod per filter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::{ANNOTATION_ENVOY_VERSION, Workload, selects};

/// The pods of one namespace, and who carries each label.
#[derive(Default)]
struct Namespace {
    pods: HashMap<String, Arc<Workload>>,
    by_label: HashMap<(String, String), HashSet<String>>,
}

impl Namespace {
    fn insert(&mut self, pod: Arc<Workload>) {
        let name = pod.name.clone();
        self.remove(&name);
        for (k, v) in &pod.labels {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(name.clone());
        }
        self.pods.insert(name, pod);
    }

    fn remove(&mut self, name: &str) {
        let Some(old) = self.pods.remove(name) else {
            return;
        };
        for (k, v) in &old.labels {
            let key = (k.clone(), v.clone());
            if let Some(names) = self.by_label.get_mut(&key) {
                names.remove(name);
                if names.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
    }
}

#[derive(Default)]
struct Pods {
    namespaces: HashMap<String, Namespace>,
}

impl Pods {
    fn insert(&mut self, pod: &Pod) {
        let pod = Workload::of(pod);
        self.namespaces
            .entry(pod.namespace.clone())
            .or_default()
            .insert(Arc::new(pod));
    }

    fn remove(&mut self, pod: &Pod) {
        let ns = pod.namespace().unwrap_or_default();
        if let Some(n) = self.namespaces.get_mut(&ns) {
            n.remove(&pod.name_any());
            if n.pods.is_empty() {
                self.namespaces.remove(&ns);
            }
        }
    }

    fn len(&self) -> usize {
        self.namespaces.values().map(|n| n.pods.len()).sum()
    }
}

/// The pod index, fed by [`PodIndex::apply`] with the events of one pod watch.
pub struct PodIndex {
    live: RwLock<Pods>,
    /// A relist in progress: it replaces `live` when complete.
    relist: RwLock<Option<Pods>>,
    synced: watch::Sender<bool>,
}

impl Default for PodIndex {
    fn default() -> Self {
        PodIndex {
            live: RwLock::default(),
            relist: RwLock::default(),
            synced: watch::channel(false).0,
        }
    }
}

impl PodIndex {
    /// Takes one watch event (pods already trimmed by [`trim`]).
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => *write(&self.relist) = Some(Pods::default()),
            watcher::Event::InitApply(pod) => {
                if let Some(pods) = write(&self.relist).as_mut() {
                    pods.insert(pod);
                }
            }
            watcher::Event::InitDone => {
                if let Some(pods) = write(&self.relist).take() {
                    *write(&self.live) = pods;
                }
                self.synced.send_replace(true);
            }
            watcher::Event::Apply(pod) => write(&self.live).insert(pod),
            watcher::Event::Delete(pod) => write(&self.live).remove(pod),
        }
    }

    /// The pods of `ns` whose labels include all of `selector`, not being deleted, by name.
    pub fn select(&self, ns: &str, selector: &BTreeMap<String, String>) -> Vec<Arc<Workload>> {
        let live = read(&self.live);
        let Some(n) = live.namespaces.get(ns) else {
            return Vec::new();
        };
        // Start from the rarest label of the selector; an empty selector (refused by the
        // schema) selects nothing rather than everything.
        let Some(rarest) = selector
            .iter()
            .map(|(k, v)| n.by_label.get(&(k.clone(), v.clone())))
            .min_by_key(|names| names.map_or(0, HashSet::len))
        else {
            return Vec::new();
        };
        let mut pods: Vec<Arc<Workload>> = rarest
            .into_iter()
            .flatten()
            .filter_map(|name| n.pods.get(name))
            .filter(|p| !p.deleting && selects(selector, &p.labels))
            .cloned()
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }

    /// How many pods the index holds.
    pub fn len(&self) -> usize {
        read(&self.live).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the first full list is in, for at most `timeout`; whether it is.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// A pod reduced to what selecting it and placing its Envoy need: name, namespace, uid,
/// labels, the version annotation, deletion, container names and images.
pub fn trim(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == ANNOTATION_ENVOY_VERSION || k == super::istio::ANNOTATION_STATUS_PORT)
        .collect();
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        annotations: (!annotations.is_empty()).then_some(annotations),
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    };
    let containers = |cs: Vec<Container>| -> Vec<Container> {
        cs.into_iter()
            .map(|c| Container {
                name: c.name,
                image: c.image,
                ..Container::default()
            })
            .collect()
    };
    pod.spec = pod.spec.take().map(|s| PodSpec {
        containers: containers(s.containers),
        init_containers: s.init_containers.map(containers),
        ..PodSpec::default()
    });
    // The IP alone, where the istio-agent's metrics are read.
    pod.status =
        pod.status
            .take()
            .and_then(|s| s.pod_ip)
            .map(|ip| k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(ip),
                ..Default::default()
            });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": ns,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "annotations": {ANNOTATION_ENVOY_VERSION: "1.36.2", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"containers": [{"name": "envoy", "image": "envoyproxy/envoy:v1.40.0", "args": ["-c", "x"], "env": [{"name": "A", "value": "b"}]}]},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(pods: &[Arc<Workload>]) -> Vec<String> {
        pods.iter().map(|p| p.name.clone()).collect()
    }

    fn synced(pods: Vec<Pod>) -> PodIndex {
        let index = PodIndex::default();
        index.apply(&watcher::Event::Init);
        for p in pods {
            index.apply(&watcher::Event::InitApply(p));
        }
        index.apply(&watcher::Event::InitDone);
        index
    }

    #[test]
    fn selects_by_every_label_within_the_namespace_only() {
        let index = synced(vec![
            pod("a", "web-1", &[("app", "web"), ("tier", "front")]),
            pod("a", "web-2", &[("app", "web")]),
            pod("a", "db", &[("app", "db"), ("tier", "front")]),
            pod("b", "web-3", &[("app", "web"), ("tier", "front")]),
        ]);
        assert_eq!(
            names(&index.select("a", &sel(&[("app", "web")]))),
            ["web-1", "web-2"]
        );
        assert_eq!(
            names(&index.select("a", &sel(&[("app", "web"), ("tier", "front")]))),
            ["web-1"]
        );
        assert_eq!(
            names(&index.select("b", &sel(&[("app", "web")]))),
            ["web-3"]
        );
        assert!(index.select("a", &sel(&[("app", "none")])).is_empty());
        assert!(index.select("c", &sel(&[("app", "web")])).is_empty());
        assert!(index.select("a", &sel(&[])).is_empty());
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn follows_label_changes_deletes_and_relists() {
        let index = synced(vec![pod("a", "p", &[("app", "web")])]);
        index.apply(&watcher::Event::Apply(pod("a", "p", &[("app", "api")])));
        assert!(index.select("a", &sel(&[("app", "web")])).is_empty());
        assert_eq!(names(&index.select("a", &sel(&[("app", "api")]))), ["p"]);

        let mut going = pod("a", "p", &[("app", "api")]);
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        index.apply(&watcher::Event::Apply(going.clone()));
        assert!(
            index.select("a", &sel(&[("app", "api")])).is_empty(),
            "terminating"
        );
        index.apply(&watcher::Event::Delete(going));
        assert!(index.is_empty());

        // A relist replaces the whole content once done; until then the old one serves.
        index.apply(&watcher::Event::Apply(pod("a", "old", &[("app", "web")])));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(pod(
            "a",
            "new",
            &[("app", "web")],
        )));
        assert_eq!(names(&index.select("a", &sel(&[("app", "web")]))), ["old"]);
        index.apply(&watcher::Event::InitDone);
        assert_eq!(names(&index.select("a", &sel(&[("app", "web")]))), ["new"]);
    }

    #[test]
    fn trimming_keeps_what_a_verdict_needs_only() {
        let mut p = pod("a", "p", &[("app", "web")]);
        trim(&mut p);
        assert_eq!(p.labels()["app"], "web");
        assert_eq!(
            p.annotations().keys().collect::<Vec<_>>(),
            [ANNOTATION_ENVOY_VERSION]
        );
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.status.is_none());
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            (c.name.as_str(), c.image.as_deref()),
            ("envoy", Some("envoyproxy/envoy:v1.40.0"))
        );
        assert!(c.args.is_none() && c.env.is_none());
    }

    #[tokio::test]
    async fn is_synced_after_the_first_full_list() {
        let index = PodIndex::default();
        assert!(!index.wait_synced(Duration::from_millis(10)).await);
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitDone);
        assert!(index.wait_synced(Duration::from_millis(10)).await);
    }
}
