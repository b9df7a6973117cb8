//! The gRPC side: `ExtensionConfigDiscoveryService`, state of the world and delta.
//!
//! Each stream keeps what it sent (per resource name and version) and which nonce carried it,
//! so an ACK or NACK is attributed to the resources that response changed. Responses go out
//! only when something a node should have differs from what it was sent.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use futures::Stream;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};

use super::relay::{self, Route, Upstream};
use super::{Decision, NodeInfo, Report, Xds};
use crate::render::ecds::TYPED_EXTENSION_CONFIG_URL;

/// Unanswered responses remembered per stream.
const MAX_PENDING: usize = 64;

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Bytes of responses that may exist at once across all streams, by default: modules travel
/// inline, and without a bound one large module pushed to many Envoys at once would hold a copy
/// per stream.
pub const DEFAULT_SEND_BUDGET: u64 = 256 << 20;

/// Serves ECDS on `listener` until the process ends. `send_budget` bounds the bytes of
/// responses in flight across all streams (a single response larger than it still goes, alone).
/// `route` says, per new stream, whether this replica serves it or relays it to the leader.
pub async fn serve(
    listener: tokio::net::TcpListener,
    xds: Arc<Xds>,
    client: Option<kube::Client>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    send_budget: u64,
    route: Route,
) -> Result<(), tonic::transport::Error> {
    let budget = Budget::new(send_budget);
    let service = ExtensionConfigDiscoveryServiceServer::new(Service {
        xds,
        client,
        budget,
        route,
    })
    // Modules travel inline; requests from Envoy are small.
    .max_encoding_message_size(usize::MAX);
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?;
    }
    builder
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

struct Service {
    xds: Arc<Xds>,
    client: Option<kube::Client>,
    budget: Budget,
    route: Route,
}

/// Why a stream that arrives while no replica can serve it is refused.
const NOBODY_LEADS: &str =
    "no replica leads yet, or the leader does not say where it serves ECDS; try again";

/// The shared bound on response bytes in flight, counted in KiB.
#[derive(Clone)]
struct Budget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

impl Budget {
    fn new(bytes: u64) -> Self {
        let total_kib = u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX >> 4);
        Budget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits for room for a response of `len` bytes.
    async fn reserve(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(len / 1024 + 1)
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        self.permits.clone().acquire_many_owned(kib).await.ok()
    }
}

/// Sends what `build` makes on a stream's channel, `need` bytes of it: first a slot (the
/// previous response was taken by the transport), then room in the budget, and only then are
/// the responses built, since building copies the module into each. So a client that stops
/// reading holds budget for at most the one response waiting for it, and a push to many
/// streams holds at most the budget in responses. The budget goes back with the last one.
async fn send_batch<T: Message>(
    tx: &mpsc::Sender<Outgoing<T>>,
    budget: &Budget,
    need: usize,
    build: impl FnOnce() -> Vec<T>,
) -> Result<(), ()> {
    let slot = tx.reserve().await.map_err(|_| ())?;
    let mut permit = budget.reserve(need).await;
    let mut items = build().into_iter().peekable();
    let Some(first) = items.next() else {
        return Ok(());
    };
    let last = items.peek().is_none();
    slot.send((Ok(first), if last { permit.take() } else { None }));
    while let Some(item) = items.next() {
        let last = items.peek().is_none();
        let held = if last { permit.take() } else { None };
        tx.send((Ok(item), held)).await.map_err(|_| ())?;
    }
    Ok(())
}

type Outgoing<T> = (Result<T, Status>, Option<OwnedSemaphorePermit>);

/// The response stream: each response's budget is given back when the transport asks for the
/// next one: by then it has encoded the previous one and handed it to HTTP/2, which asks for
/// more only as the connection's flow-control window lets it send.
fn outgoing<T: Send + 'static>(rx: mpsc::Receiver<Outgoing<T>>) -> ResponseStream<T> {
    let held: Option<OwnedSemaphorePermit> = None;
    Box::pin(futures::stream::unfold(
        (rx, held),
        |(mut rx, held)| async move {
            drop(held);
            let (item, permit) = rx.recv().await?;
            Some((item, (rx, permit)))
        },
    ))
}

impl Service {
    /// Registers the stream's node the first time a request names it.
    fn node(
        &self,
        session: &mut Session,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    ) {
        if session.id.is_some() {
            return;
        }
        let Some(node) = node else { return };
        let info = NodeInfo::from_node(node);
        tracing::info!(node = %info.id, pod = ?info.pod, envoy = ?info.envoy_version, "ECDS stream opened");
        if let (Some(pod), Some(client)) = (info.pod.clone(), self.client.clone()) {
            let xds = self.xds.clone();
            let info = info.clone();
            tokio::spawn(async move {
                let api: Api<Pod> = Api::namespaced(client, &pod.namespace);
                if let Ok(None) = api.get_opt(&pod.name).await {
                    xds.log_unknown_pod(&info);
                }
            });
        }
        session.id = Some(self.xds.open_stream(info.clone()));
        session.node = Some(info);
    }
}

/// One stream's memory of what it sent.
#[derive(Default)]
struct Session {
    id: Option<u64>,
    node: Option<NodeInfo>,
    subscribed: BTreeSet<String>,
    /// Per name: the version last sent (`None`: told it does not exist).
    sent: HashMap<String, Option<String>>,
    /// Per nonce: what that response changed.
    pending: HashMap<String, Vec<(String, Option<String>)>>,
    nonce: u64,
}

impl Session {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Keeps what a response changed until Envoy answers it; a client that never answers
    /// cannot grow this past [`MAX_PENDING`] (the oldest go first).
    fn remember(&mut self, nonce: String, changed: Vec<(String, Option<String>)>) {
        self.pending.insert(nonce, changed);
        while self.pending.len() > MAX_PENDING {
            let oldest = self
                .pending
                .keys()
                .filter_map(|k| k.parse::<u64>().ok())
                .min()
                .map(|k| k.to_string());
            match oldest {
                Some(k) => self.pending.remove(&k),
                None => break,
            };
        }
    }

    /// Records Envoy's answer to the response `nonce`.
    fn answer(&mut self, xds: &Xds, nonce: &str, error: Option<String>) {
        let Some(id) = self.id else { return };
        let Some(changed) = self.pending.remove(nonce) else {
            return;
        };
        // Envoy answers in order: anything older is superseded.
        if let Ok(n) = nonce.parse::<u64>() {
            self.pending
                .retain(|k, _| k.parse::<u64>().is_ok_and(|k| k > n));
        }
        for (name, version) in changed {
            let Some(version) = version else { continue };
            let report = match &error {
                None => Report::Acked(version),
                Some(e) => Report::Nacked(version, e.clone()),
            };
            xds.report(id, &name, report);
        }
    }

    /// What each subscribed name should have now, and the ones that differ from what was sent.
    fn decisions(&self, xds: &Xds) -> Vec<(String, Decision)> {
        let Some(node) = &self.node else {
            return Vec::new();
        };
        self.subscribed
            .iter()
            .map(|name| (name.clone(), xds.decide(node, name)))
            .collect()
    }

    fn refused(&self, xds: &Xds, name: &str, why: String) {
        if let Some(id) = self.id {
            xds.report(id, name, Report::Refused(why));
        }
    }

    /// Bytes of the SotW response [`Session::sotw_response`] would make now (0: none).
    fn sotw_pending(&self, xds: &Xds) -> usize {
        let decisions = self.decisions(xds);
        let changed = decisions.iter().any(|(name, d)| {
            matches!(d, Decision::Send { version, .. } if self.sent.get(name) != Some(&Some(version.clone())))
        });
        if !changed {
            return 0;
        }
        decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::Send { resource, .. } => Some(resource.encoded_len()),
                _ => None,
            })
            .sum()
    }

    /// Bytes of the delta responses [`Session::delta_responses`] would make now.
    fn delta_pending(&self, xds: &Xds) -> usize {
        self.decisions(xds)
            .iter()
            .filter_map(|(name, d)| match d {
                Decision::Send { version, resource }
                    if self.sent.get(name) != Some(&Some(version.clone())) =>
                {
                    Some(resource.encoded_len())
                }
                _ => None,
            })
            .sum()
    }

    /// State of the world: every resource the node should have, when any of them changed.
    /// A name with nothing to send is left out, which leaves Envoy's copy as it is.
    fn sotw_response(&mut self, xds: &Xds) -> Option<DiscoveryResponse> {
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        let mut changed = Vec::new();
        for (name, decision) in self.decisions(xds) {
            match decision {
                Decision::Send { version, resource } => {
                    if self.sent.get(&name) != Some(&Some(version.clone())) {
                        changed.push((name.clone(), Some(version.clone())));
                    }
                    versions.push(format!("{name}={version}"));
                    resources.push((*resource).clone());
                }
                Decision::Refused(why) => self.refused(xds, &name, why),
                Decision::Hold | Decision::Absent => {}
            }
        }
        if changed.is_empty() {
            return None;
        }
        let nonce = self.next_nonce();
        for (name, version) in &changed {
            self.sent.insert(name.clone(), version.clone());
            if let (Some(id), Some(v)) = (self.id, version) {
                xds.report(id, name, Report::Sent(v.clone()));
            }
        }
        self.remember(nonce.clone(), changed);
        let digest = ring::digest::digest(&ring::digest::SHA256, versions.join(",").as_bytes());
        Some(DiscoveryResponse {
            version_info: hex::encode(&digest.as_ref()[..8]),
            resources,
            type_url: TYPED_EXTENSION_CONFIG_URL.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Delta: one response per changed resource, so each ACK or NACK names exactly one.
    fn delta_responses(&mut self, xds: &Xds) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for (name, decision) in self.decisions(xds) {
            let (resource, version) = match decision {
                Decision::Send { version, resource } => {
                    if self.sent.get(&name) == Some(&Some(version.clone())) {
                        continue;
                    }
                    (Some(resource), Some(version))
                }
                // Said once, so Envoy stops waiting for it (or drops what it had).
                Decision::Absent => {
                    if self.sent.get(&name) == Some(&None) {
                        continue;
                    }
                    (None, None)
                }
                Decision::Refused(why) => {
                    self.refused(xds, &name, why);
                    continue;
                }
                Decision::Hold => continue,
            };
            let nonce = self.next_nonce();
            self.sent.insert(name.clone(), version.clone());
            if let (Some(id), Some(v)) = (self.id, &version) {
                xds.report(id, &name, Report::Sent(v.clone()));
            }
            self.remember(nonce.clone(), vec![(name.clone(), version.clone())]);
            out.push(match (resource, version) {
                (Some(resource), Some(version)) => DeltaDiscoveryResponse {
                    system_version_info: version.clone(),
                    resources: vec![Resource {
                        name,
                        version,
                        resource: Some((*resource).clone()),
                        ..Default::default()
                    }],
                    type_url: TYPED_EXTENSION_CONFIG_URL.to_string(),
                    nonce,
                    ..Default::default()
                },
                _ => DeltaDiscoveryResponse {
                    removed_resources: vec![name],
                    type_url: TYPED_EXTENSION_CONFIG_URL.to_string(),
                    nonce,
                    ..Default::default()
                },
            });
        }
        out
    }
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == TYPED_EXTENSION_CONFIG_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this server serves {TYPED_EXTENSION_CONFIG_URL}, not {type_url}"
        )))
    }
}

fn error_text(status: Option<envoy_types::pb::google::rpc::Status>) -> Option<String> {
    status.map(|s| {
        if s.message.is_empty() {
            format!("rejected (code {})", s.code)
        } else {
            s.message
        }
    })
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Service {
    type StreamExtensionConfigsStream = ResponseStream<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        match (self.route)() {
            Upstream::Here => {}
            Upstream::Leader(address) => return relay::sotw(&address, request).await,
            Upstream::Nobody => return Err(Status::unavailable(NOBODY_LEADS)),
        }
        let peer: Option<SocketAddr> = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let service = Service {
            xds: self.xds.clone(),
            client: self.client.clone(),
            budget: self.budget.clone(),
            route: self.route.clone(),
        };
        tokio::spawn(async move {
            let xds = service.xds.clone();
            let mut changes = xds.subscribe_changes();
            let mut session = Session::default();
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Err(e) = check_type(&req.type_url) {
                                let _ = tx.send((Err(e), None)).await;
                                break;
                            }
                            service.node(&mut session, req.node.as_ref());
                            if !req.response_nonce.is_empty() {
                                session.answer(&xds, &req.response_nonce, error_text(req.error_detail));
                            }
                            session.subscribed = req.resource_names.into_iter().collect();
                            if let Some(id) = session.id {
                                xds.set_subscriptions(id, session.subscribed.clone());
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = changes.changed() => if changed.is_err() { break },
                }
                let need = session.sotw_pending(&xds);
                let build = || session.sotw_response(&xds).into_iter().collect();
                if send_batch(&tx, &service.budget, need, build).await.is_err() {
                    break;
                }
            }
            if let Some(id) = session.id {
                xds.close_stream(id);
            }
            tracing::info!(node = ?session.node.map(|n| n.id), ?peer, "ECDS stream closed");
        });
        Ok(Response::new(outgoing(rx)))
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        match (self.route)() {
            Upstream::Here => {}
            Upstream::Leader(address) => return relay::delta(&address, request).await,
            Upstream::Nobody => return Err(Status::unavailable(NOBODY_LEADS)),
        }
        let peer: Option<SocketAddr> = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let service = Service {
            xds: self.xds.clone(),
            client: self.client.clone(),
            budget: self.budget.clone(),
            route: self.route.clone(),
        };
        tokio::spawn(async move {
            let xds = service.xds.clone();
            let mut changes = xds.subscribe_changes();
            let mut session = Session::default();
            'stream: loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Err(e) = check_type(&req.type_url) {
                                let _ = tx.send((Err(e), None)).await;
                                break;
                            }
                            let first = session.id.is_none();
                            service.node(&mut session, req.node.as_ref());
                            // What the node already runs (after our restart, or its reconnect):
                            // it accepted it once, and it is not sent again while current.
                            let held: Vec<(String, String)> = if first {
                                req.initial_resource_versions.into_iter().collect()
                            } else {
                                Vec::new()
                            };
                            for (name, version) in &held {
                                session.sent.insert(name.clone(), Some(version.clone()));
                            }
                            if !req.response_nonce.is_empty() {
                                session.answer(&xds, &req.response_nonce, error_text(req.error_detail));
                            }
                            for name in req.resource_names_unsubscribe {
                                session.subscribed.remove(&name);
                                session.sent.remove(&name);
                            }
                            session.subscribed.extend(req.resource_names_subscribe);
                            if let Some(id) = session.id {
                                xds.set_subscriptions(id, session.subscribed.clone());
                                for (name, version) in held {
                                    xds.report(id, &name, Report::Acked(version));
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = changes.changed() => if changed.is_err() { break },
                }
                let need = session.delta_pending(&xds);
                let build = || session.delta_responses(&xds);
                if send_batch(&tx, &service.budget, need, build).await.is_err() {
                    break 'stream;
                }
            }
            if let Some(id) = session.id {
                xds.close_stream(id);
            }
            tracing::info!(node = ?session.node.map(|n| n.id), ?peer, "ECDS delta stream closed");
        });
        Ok(Response::new(outgoing(rx)))
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "REST-style fetch is not served; use api_type GRPC or DELTA_GRPC",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    fn response(bytes: usize) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: "x".repeat(bytes),
            ..Default::default()
        }
    }

    async fn send(
        tx: &mpsc::Sender<Outgoing<DiscoveryResponse>>,
        budget: &Budget,
        item: DiscoveryResponse,
    ) -> Result<(), ()> {
        send_batch(tx, budget, item.encoded_len(), || vec![item]).await
    }

    #[tokio::test]
    async fn responses_are_built_only_once_there_is_room_for_them() {
        let budget = Budget::new(100 << 10);
        let (tx_a, rx_a) = mpsc::channel(1);
        let mut stream_a = outgoing(rx_a);
        send(&tx_a, &budget, response(80 << 10)).await.unwrap();
        let built = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx_b, rx_b) = mpsc::channel(1);
        let mut stream_b = outgoing(rx_b);
        let waiting = tokio::spawn({
            let (budget, built) = (budget.clone(), built.clone());
            async move {
                send_batch(&tx_b, &budget, 80 << 10, || {
                    built.store(true, std::sync::atomic::Ordering::SeqCst);
                    vec![response(40 << 10), response(40 << 10)]
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !built.load(std::sync::atomic::Ordering::SeqCst),
            "built before there was room"
        );
        stream_a.next().await.unwrap().unwrap();
        drop(tx_a);
        assert!(stream_a.next().await.is_none());
        // Both of B's responses go; the budget comes back after the last one was taken.
        stream_b.next().await.unwrap().unwrap();
        stream_b.next().await.unwrap().unwrap();
        waiting.await.unwrap().unwrap();
        assert!(built.load(std::sync::atomic::Ordering::SeqCst));
        assert!(budget.permits.available_permits() < 100);
        assert!(stream_b.next().await.is_none());
        assert_eq!(budget.permits.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_push_waits_while_the_budget_is_held_by_responses_not_yet_taken() {
        let budget = Budget::new(100 << 10);
        let (tx_a, rx_a) = mpsc::channel(1);
        let (tx_b, rx_b) = mpsc::channel(1);
        let mut stream_a = outgoing(rx_a);
        let mut stream_b = outgoing(rx_b);

        send(&tx_a, &budget, response(60 << 10)).await.unwrap();
        // 60 KiB of 100 are held by stream A's response until its transport takes the next one.
        let second = tokio::spawn({
            let budget = budget.clone();
            async move { send(&tx_b, &budget, response(60 << 10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second push must wait for room");

        // A's transport takes its response: the budget is still held while it is written...
        let first = stream_a.next().await.unwrap().unwrap();
        assert_eq!(first.version_info.len(), 60 << 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        // ...and given back when the transport asks for A's next response.
        drop(tx_a);
        assert!(stream_a.next().await.is_none());
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second push goes once A's response was written")
            .unwrap()
            .unwrap();
        let got = stream_b.next().await.unwrap().unwrap();
        assert_eq!(got.version_info.len(), 60 << 10);
    }

    #[tokio::test]
    async fn a_response_larger_than_the_whole_budget_still_goes_alone() {
        let budget = Budget::new(16 << 10);
        let (tx, rx) = mpsc::channel(1);
        let mut stream = outgoing(rx);
        tokio::time::timeout(
            Duration::from_secs(5),
            send(&tx, &budget, response(1 << 20)),
        )
        .await
        .expect("an oversized response is not stuck")
        .unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap().version_info.len(),
            1 << 20
        );
        // Once written, the whole budget is free again.
        drop(tx);
        assert!(stream.next().await.is_none());
        assert_eq!(budget.permits.available_permits(), 16);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_holds_at_most_one_response_of_budget() {
        let budget = Budget::new(100 << 10);
        let (tx, _stalled) = mpsc::channel(1);
        send(&tx, &budget, response(30 << 10)).await.unwrap();
        // The next push to the stalled stream waits for a slot before it takes any budget.
        let blocked = tokio::spawn({
            let budget = budget.clone();
            async move { send(&tx, &budget, response(30 << 10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished());
        assert_eq!(budget.permits.available_permits(), 100 - 31);
        blocked.abort();
    }
}
