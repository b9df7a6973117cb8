//! The extension config discovery service (ECDS) for plain Envoys.
//!
//! The controller publishes, per `target: Ecds` WasmFilter, the pods it selects and the verified
//! module with the spec ([`Xds::publish`]). Each connected Envoy names its pod ([`node`]); for
//! every filter name it subscribes to, [`Xds::decide`] says what it gets: the filter rendered
//! for its own Envoy version, nothing (not selected, or its Envoy would refuse the module), or
//! "say nothing yet". Its ACK or NACK of what was sent is recorded per resource and read back
//! by the controller into `status.workloads[].loaded`.
//!
//! A restarted operator answers only once every `Ecds` filter it knows was decided once (or a
//! bounded wait passed), and never tells an Envoy to drop a filter it has not decided about.

pub mod node;
pub mod relay;
pub mod server;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{mpsc, watch};

use crate::abi::ModuleInfo;
use crate::abi::check;
use crate::api::WasmFilterSpec;
use crate::render::ecds::{self, PolicyField};
pub use node::{NodeInfo, PodRef};

/// A verified module and the spec to serve it with.
pub struct Offer {
    pub spec: WasmFilterSpec,
    pub module_sha256: String,
    pub module: Arc<Vec<u8>>,
    pub info: Arc<ModuleInfo>,
    /// Encoded once per policy spelling, shared by every stream.
    rendered: Mutex<HashMap<PolicyField, Arc<Any>>>,
}

impl Offer {
    pub fn new(
        spec: WasmFilterSpec,
        module_sha256: String,
        module: Arc<Vec<u8>>,
        info: Arc<ModuleInfo>,
    ) -> Self {
        Offer {
            spec,
            module_sha256,
            module,
            info,
            rendered: Mutex::new(HashMap::new()),
        }
    }

    fn rendered(&self, name: &str, field: PolicyField) -> Arc<Any> {
        let mut r = self.rendered.lock().unwrap_or_else(|p| p.into_inner());
        r.entry(field)
            .or_insert_with(|| {
                Arc::new(ecds::extension_config(
                    name,
                    &self.spec,
                    &self.module,
                    field,
                ))
            })
            .clone()
    }
}

/// What a node gets for one subscribed name.
#[derive(Debug, Clone)]
pub enum Decision {
    /// This resource, at this version.
    Send { version: String, resource: Arc<Any> },
    /// Nothing: its Envoy would refuse the module (Envoy's own words).
    Refused(String),
    /// Nothing new, and nothing taken away: not decided yet, or no module passed yet.
    Hold,
    /// No such filter for this node (deleted, not selected, or not an ECDS filter).
    Absent,
}

/// The last thing known about one resource on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Sent(String),
    Acked(String),
    Nacked(String, String),
    Refused(String),
}

/// Whether a selected pod's Envoy loaded a filter's current module, as far as ECDS tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    Loaded,
    /// Envoy refused it (NACK), in its own words; it keeps what it had.
    Failed(String),
    /// Sent, or about to be; no answer yet.
    Pending,
    /// Not sent: the node's Envoy would refuse it.
    NotSent(String),
    /// Connected, but subscribed to none of this filter's names.
    NotSubscribed,
}

/// While a rollout runs: the pods given the offer (the candidate); every other selected pod is
/// given `stable`.
#[derive(Clone)]
pub struct Split {
    pub stable: Arc<Offer>,
    pub candidate_pods: BTreeSet<String>,
}

struct Filter {
    namespace: String,
    selected: BTreeSet<String>,
    offer: Option<Arc<Offer>>,
    split: Option<Split>,
}

struct Stream {
    node: NodeInfo,
    subscribed: BTreeSet<String>,
    reports: HashMap<String, Report>,
}

#[derive(Default)]
struct State {
    filters: HashMap<String, Filter>,
    streams: HashMap<u64, Stream>,
    next_stream: u64,
    /// `None` until the controller listed every filter once.
    expected: Option<HashSet<String>>,
    decided: HashSet<String>,
    ready: bool,
    /// Node ids already logged as naming no usable pod.
    logged: HashSet<String>,
}

impl State {
    fn update_ready(&mut self) -> bool {
        let was = self.ready;
        if let Some(expected) = &self.expected {
            self.ready = self.ready || expected.is_subset(&self.decided);
        }
        !was && self.ready
    }

    /// Filter names a change about `node`'s pod or `subscribed` may touch.
    fn affected(&self, stream: &Stream) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = stream.subscribed.clone();
        if let Some(pod) = &stream.node.pod {
            names.extend(
                self.filters
                    .iter()
                    .filter(|(_, f)| f.namespace == pod.namespace && f.selected.contains(&pod.name))
                    .map(|(n, _)| n.clone()),
            );
        }
        names
    }
}

/// The ECDS state shared by the controller and the gRPC streams.
pub struct Xds {
    state: Mutex<State>,
    /// Bumped on every change a stream may have to answer.
    changed: watch::Sender<u64>,
    /// Names of filters whose load status may have changed, for the controller to reconcile.
    events: mpsc::UnboundedSender<String>,
}

impl Xds {
    /// The state and the receiving end of its status events.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (events, rx) = mpsc::unbounded_channel();
        let (changed, _) = watch::channel(0);
        (
            Arc::new(Xds {
                state: Mutex::new(State::default()),
                changed,
                events,
            }),
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn notify<'a>(&self, names: impl IntoIterator<Item = &'a String>) {
        for n in names {
            let _ = self.events.send(n.clone());
        }
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The controller's decision for filter `name`: the pods it selects, and the module to
    /// serve (`None` keeps whatever was offered before), to all of them or, while a rollout
    /// runs, to the pods `split` names (the others get its stable module).
    pub fn publish(
        &self,
        name: &str,
        namespace: &str,
        selected: BTreeSet<String>,
        offer: Option<Arc<Offer>>,
        split: Option<Split>,
    ) {
        let mut s = self.lock();
        let entry = s.filters.entry(name.to_string()).or_insert_with(|| Filter {
            namespace: namespace.to_string(),
            selected: BTreeSet::new(),
            offer: None,
            split: None,
        });
        entry.selected = selected;
        if offer.is_some() {
            entry.offer = offer;
            entry.split = split;
        }
        s.decided.insert(name.to_string());
        s.update_ready();
        drop(s);
        self.bump();
    }

    /// The controller looked at `name` and has nothing new for it (it failed): proxies keep
    /// what they have.
    pub fn decided(&self, name: &str) {
        let mut s = self.lock();
        // Known from now on, so it is held (not reported absent) until it has a module.
        if let Some((namespace, _)) = name.split_once('/') {
            s.filters.entry(name.to_string()).or_insert_with(|| Filter {
                namespace: namespace.to_string(),
                selected: BTreeSet::new(),
                offer: None,
                split: None,
            });
        }
        s.decided.insert(name.to_string());
        let now_ready = s.update_ready();
        drop(s);
        if now_ready {
            self.bump();
        }
    }

    /// The offered module of `name`, if any, by sha256.
    pub fn offered(&self, name: &str) -> Option<Arc<Offer>> {
        self.lock().filters.get(name)?.offer.clone()
    }

    /// While a rollout of `name` runs: the stable module its other pods are given.
    pub fn offered_stable(&self, name: &str) -> Option<Arc<Offer>> {
        Some(
            self.lock()
                .filters
                .get(name)?
                .split
                .as_ref()?
                .stable
                .clone(),
        )
    }

    /// Filter `name` is gone (deleted, or no longer targets ECDS).
    pub fn withdraw(&self, name: &str) {
        let mut s = self.lock();
        let removed = s.filters.remove(name).is_some();
        if let Some(expected) = s.expected.as_mut() {
            expected.remove(name);
        }
        s.update_ready();
        drop(s);
        if removed {
            self.bump();
        }
    }

    /// Every ECDS filter that exists, after the controller listed them: forgets any other,
    /// and (the first time) waits for each of these to be decided before answering.
    pub fn sync(&self, names: HashSet<String>) {
        let mut s = self.lock();
        s.filters.retain(|n, _| names.contains(n));
        if s.expected.is_none() {
            s.expected = Some(names);
        }
        s.update_ready();
        drop(s);
        self.bump();
    }

    /// Stops waiting for undecided filters (a bounded start-up).
    pub fn force_ready(&self) {
        let mut s = self.lock();
        let was = s.ready;
        s.ready = true;
        drop(s);
        if !was {
            tracing::warn!(
                "ECDS answering before every filter was decided; undecided ones are held"
            );
            self.bump();
        }
    }

    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// What `node` gets for `name`.
    pub fn decide(&self, node: &NodeInfo, name: &str) -> Decision {
        let s = self.lock();
        if !s.ready {
            return Decision::Hold;
        }
        let Some(filter) = s.filters.get(name) else {
            return Decision::Absent;
        };
        // A filter that never passed keeps every proxy as it is, selected or not: its
        // selection is not known yet either.
        let Some(offer) = filter.offer.clone() else {
            return Decision::Hold;
        };
        let Some(pod) = &node.pod else {
            return Decision::Absent;
        };
        if filter.namespace != pod.namespace || !filter.selected.contains(&pod.name) {
            return Decision::Absent;
        }
        let offer = match &filter.split {
            Some(split) if !split.candidate_pods.contains(&pod.name) => split.stable.clone(),
            _ => offer,
        };
        drop(s);
        if let Some(v) = node.envoy_version.as_deref()
            && let Some((host, measured)) = check::host_for(v)
        {
            let verdict = check::check(&offer.info, &measured, host);
            if !verdict.compatible {
                let why = verdict
                    .problems
                    .first()
                    .map_or_else(String::new, |p| p.message.clone());
                return Decision::Refused(format!("Envoy {v} would refuse the module: {why}"));
            }
        }
        let field = PolicyField::for_envoy(node.envoy_version.as_deref());
        Decision::Send {
            version: ecds::version(&offer.spec, &offer.module_sha256, field),
            resource: offer.rendered(name, field),
        }
    }

    /// A stream from `node` opened.
    pub fn open_stream(&self, node: NodeInfo) -> u64 {
        let mut s = self.lock();
        s.next_stream += 1;
        let id = s.next_stream;
        if node.pod.is_none() && s.logged.insert(node.id.clone()) {
            tracing::warn!(
                node = %node.id,
                "an Envoy connected without naming its pod (node metadata NAMESPACE and NAME, \
                 or node id <pod>.<namespace>); it gets no filters"
            );
        }
        let stream = Stream {
            node,
            subscribed: BTreeSet::new(),
            reports: HashMap::new(),
        };
        let names = s.affected(&stream);
        s.streams.insert(id, stream);
        drop(s);
        self.notify(&names);
        id
    }

    pub fn close_stream(&self, id: u64) {
        let mut s = self.lock();
        let names = s
            .streams
            .remove(&id)
            .map(|st| s.affected(&st))
            .unwrap_or_default();
        drop(s);
        self.notify(&names);
    }

    /// Logs once that a node names a pod that does not exist.
    pub fn log_unknown_pod(&self, node: &NodeInfo) {
        let Some(pod) = &node.pod else { return };
        if self.lock().logged.insert(node.id.clone()) {
            tracing::warn!(
                node = %node.id,
                pod = %format!("{}/{}", pod.namespace, pod.name),
                "an Envoy connected naming a pod that does not exist; it gets no filters until that pod exists"
            );
        }
    }

    pub fn set_subscriptions(&self, id: u64, names: BTreeSet<String>) {
        let mut s = self.lock();
        let Some(st) = s.streams.get_mut(&id) else {
            return;
        };
        if st.subscribed == names {
            return;
        }
        let mut touched: BTreeSet<String> = st
            .subscribed
            .symmetric_difference(&names)
            .cloned()
            .collect();
        st.reports.retain(|n, _| names.contains(n));
        st.subscribed = names;
        if let Some(st) = s.streams.get(&id) {
            touched.extend(s.affected(st));
        }
        drop(s);
        self.notify(&touched);
    }

    pub fn report(&self, id: u64, name: &str, report: Report) {
        let mut s = self.lock();
        let Some(st) = s.streams.get_mut(&id) else {
            return;
        };
        if st.reports.get(name) == Some(&report) {
            return;
        }
        match &report {
            Report::Nacked(v, e) => {
                tracing::warn!(node = %st.node.id, filter = name, version = v, error = %e, "Envoy refused the filter config (NACK)")
            }
            Report::Acked(v) => {
                tracing::debug!(node = %st.node.id, filter = name, version = v, "Envoy loaded the filter (ACK)")
            }
            _ => {}
        }
        st.reports.insert(name.to_string(), report);
        drop(s);
        let _ = self.events.send(name.to_string());
    }

    /// The Envoy version the pod's connected proxy reports, if one is connected.
    pub fn node_version(&self, namespace: &str, pod: &str) -> Option<String> {
        let s = self.lock();
        s.streams
            .values()
            .filter(|st| {
                st.node
                    .pod
                    .as_ref()
                    .is_some_and(|p| p.namespace == namespace && p.name == pod)
            })
            .find_map(|st| st.node.envoy_version.clone())
    }

    /// Whether the pod's proxy loaded `name` at the version `current` names (as
    /// [`ecds::version`] without the policy suffix); `None` when no proxy of that pod is
    /// connected.
    pub fn load(&self, name: &str, namespace: &str, pod: &str, current: &str) -> Option<Load> {
        let s = self.lock();
        let streams: Vec<&Stream> = s
            .streams
            .values()
            .filter(|st| {
                st.node
                    .pod
                    .as_ref()
                    .is_some_and(|p| p.namespace == namespace && p.name == pod)
            })
            .collect();
        if streams.is_empty() {
            return None;
        }
        let Some(st) = streams.iter().find(|st| st.subscribed.contains(name)) else {
            // Not subscribed: only once the Envoy said what it subscribes to. A stream that
            // asked for nothing yet (its listeners are still being built) may still ask.
            return Some(if streams.iter().all(|st| st.subscribed.is_empty()) {
                Load::Pending
            } else {
                Load::NotSubscribed
            });
        };
        let is_current = |v: &str| v.split('-').next() == Some(current);
        Some(match st.reports.get(name) {
            Some(Report::Acked(v)) if is_current(v) => Load::Loaded,
            Some(Report::Nacked(v, e)) if is_current(v) => Load::Failed(e.clone()),
            Some(Report::Refused(why)) => Load::NotSent(why.clone()),
            _ => Load::Pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WasmFilterSpec {
        serde_norway::from_str("module: {image: r/f:1}\nselector: {matchLabels: {a: b}}\n").unwrap()
    }

    fn offer(wat: &str) -> Arc<Offer> {
        let module = wat::parse_str(wat).unwrap();
        let info = crate::abi::inspect(&module).unwrap();
        Arc::new(Offer::new(
            spec(),
            crate::cache::sha256_hex(&module),
            Arc::new(module),
            Arc::new(info),
        ))
    }

    const GOOD: &str = include_str!("../../tests/fixtures/modules/add_header.wat");
    const NEEDS_1_39: &str = include_str!("../../tests/fixtures/abi/wasi_call_added_in_1_39.wat");

    fn node(pod: Option<(&str, &str)>, version: &str) -> NodeInfo {
        NodeInfo {
            id: "n".into(),
            pod: pod.map(|(ns, name)| PodRef {
                namespace: ns.into(),
                name: name.into(),
            }),
            envoy_version: Some(version.into()),
        }
    }

    #[test]
    fn nothing_is_said_before_every_known_filter_was_decided() {
        let (xds, _rx) = Xds::new();
        let n = node(Some(("shop", "p")), "1.40.0");
        xds.sync(["shop/f".to_string(), "shop/g".to_string()].into());
        xds.publish(
            "shop/f",
            "shop",
            ["p".to_string()].into(),
            Some(offer(GOOD)),
            None,
        );
        assert!(matches!(xds.decide(&n, "shop/f"), Decision::Hold));
        assert!(matches!(xds.decide(&n, "shop/gone"), Decision::Hold));
        // g failed to resolve: decided, but nothing to offer, so held rather than removed.
        xds.decided("shop/g");
        assert!(matches!(xds.decide(&n, "shop/f"), Decision::Send { .. }));
        assert!(matches!(xds.decide(&n, "shop/g"), Decision::Hold));
        assert!(matches!(xds.decide(&n, "shop/gone"), Decision::Absent));
    }

    #[test]
    fn only_selected_pods_whose_envoy_loads_it_get_the_module() {
        let (xds, _rx) = Xds::new();
        xds.sync(HashSet::new());
        xds.publish(
            "shop/f",
            "shop",
            ["p".to_string()].into(),
            Some(offer(NEEDS_1_39)),
            None,
        );
        assert!(matches!(
            xds.decide(&node(Some(("shop", "p")), "1.40.0"), "shop/f"),
            Decision::Send { .. }
        ));
        let Decision::Refused(why) = xds.decide(&node(Some(("shop", "p")), "1.36.2"), "shop/f")
        else {
            panic!("1.36.2 lacks the import")
        };
        assert!(
            why.contains("Envoy 1.36.2 would refuse the module"),
            "{why}"
        );
        for other in [
            node(Some(("shop", "q")), "1.40.0"),
            node(Some(("else", "p")), "1.40.0"),
            node(None, "1.40.0"),
        ] {
            assert!(matches!(xds.decide(&other, "shop/f"), Decision::Absent));
        }
    }

    #[test]
    fn acks_and_nacks_count_only_for_the_current_version() {
        let (xds, mut rx) = Xds::new();
        xds.sync(HashSet::new());
        let o = offer(GOOD);
        xds.publish(
            "shop/f",
            "shop",
            ["p".to_string()].into(),
            Some(o.clone()),
            None,
        );
        let n = node(Some(("shop", "p")), "1.40.0");
        let id = xds.open_stream(n.clone());
        // Connected, asking for nothing yet: it may still ask.
        assert_eq!(xds.load("shop/f", "shop", "p", "x"), Some(Load::Pending));
        assert_eq!(xds.load("shop/f", "shop", "q", "x"), None);
        // Asking for other filters only: it does not subscribe to this one.
        xds.set_subscriptions(id, ["shop/other".to_string()].into());
        assert_eq!(
            xds.load("shop/f", "shop", "p", "x"),
            Some(Load::NotSubscribed)
        );
        xds.set_subscriptions(id, ["shop/f".to_string()].into());
        let Decision::Send { version, .. } = xds.decide(&n, "shop/f") else {
            panic!()
        };
        let current = version.split('-').next().unwrap().to_string();
        xds.report(id, "shop/f", Report::Sent(version.clone()));
        assert_eq!(
            xds.load("shop/f", "shop", "p", &current),
            Some(Load::Pending)
        );
        xds.report(id, "shop/f", Report::Acked(version.clone()));
        assert_eq!(
            xds.load("shop/f", "shop", "p", &current),
            Some(Load::Loaded)
        );
        // A newer module is published: the old ACK no longer says it loaded.
        assert_eq!(
            xds.load("shop/f", "shop", "p", "other"),
            Some(Load::Pending)
        );
        xds.report(id, "shop/f", Report::Nacked(version, "bad".into()));
        assert_eq!(
            xds.load("shop/f", "shop", "p", &current),
            Some(Load::Failed("bad".into()))
        );
        assert_eq!(xds.node_version("shop", "p").as_deref(), Some("1.40.0"));
        xds.close_stream(id);
        assert_eq!(xds.load("shop/f", "shop", "p", &current), None);
        let mut seen = HashSet::new();
        while let Ok(n) = rx.try_recv() {
            seen.insert(n);
        }
        assert!(seen.contains("shop/f"));
    }

    #[test]
    fn during_a_rollout_only_the_candidate_pods_get_the_new_module() {
        let (xds, _rx) = Xds::new();
        xds.sync(HashSet::new());
        let stable = offer(GOOD);
        let candidate = offer(&GOOD.replace("\"on\"", "\"v2\""));
        let version = |pod: &str| match xds.decide(&node(Some(("shop", pod)), "1.40.0"), "shop/f") {
            Decision::Send { version, .. } => version,
            other => panic!("{other:?}"),
        };
        let pods: BTreeSet<String> = ["p".to_string(), "q".to_string()].into();
        xds.publish("shop/f", "shop", pods.clone(), Some(stable.clone()), None);
        let old = version("q");
        xds.publish(
            "shop/f",
            "shop",
            pods.clone(),
            Some(candidate.clone()),
            Some(Split {
                stable: stable.clone(),
                candidate_pods: ["p".to_string()].into(),
            }),
        );
        assert_ne!(version("p"), old);
        assert_eq!(version("q"), old, "the other pod keeps the stable module");
        assert_eq!(
            xds.offered_stable("shop/f")
                .map(|o| o.module_sha256.clone()),
            Some(stable.module_sha256.clone())
        );
        // The rollout ends (or is rolled back): one module for all again.
        xds.publish("shop/f", "shop", pods, Some(stable), None);
        assert_eq!(version("p"), old);
        assert!(xds.offered_stable("shop/f").is_none());
    }

    #[test]
    fn a_withdrawn_filter_is_absent_and_no_longer_awaited() {
        let (xds, _rx) = Xds::new();
        xds.sync(["shop/f".to_string()].into());
        assert!(!xds.is_ready());
        xds.withdraw("shop/f");
        assert!(xds.is_ready());
        assert!(matches!(
            xds.decide(&node(Some(("shop", "p")), "1.40.0"), "shop/f"),
            Decision::Absent
        ));
    }
}
