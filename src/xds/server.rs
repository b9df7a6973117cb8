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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Decision, NodeInfo, Report, Xds};
use crate::render::ecds::TYPED_EXTENSION_CONFIG_URL;

/// Unanswered responses remembered per stream.
const MAX_PENDING: usize = 64;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves ECDS on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    xds: Arc<Xds>,
    client: Option<kube::Client>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<(), tonic::transport::Error> {
    let service = ExtensionConfigDiscoveryServiceServer::new(Service { xds, client })
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
        let peer: Option<SocketAddr> = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let service = Service {
            xds: self.xds.clone(),
            client: self.client.clone(),
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
                                let _ = tx.send(Err(e)).await;
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
                if let Some(resp) = session.sotw_response(&xds)
                    && tx.send(Ok(resp)).await.is_err()
                {
                    break;
                }
            }
            if let Some(id) = session.id {
                xds.close_stream(id);
            }
            tracing::info!(node = ?session.node.map(|n| n.id), ?peer, "ECDS stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        let peer: Option<SocketAddr> = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let service = Service {
            xds: self.xds.clone(),
            client: self.client.clone(),
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
                                let _ = tx.send(Err(e)).await;
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
                for resp in session.delta_responses(&xds) {
                    if tx.send(Ok(resp)).await.is_err() {
                        break 'stream;
                    }
                }
            }
            if let Some(id) = session.id {
                xds.close_stream(id);
            }
            tracing::info!(node = ?session.node.map(|n| n.id), ?peer, "ECDS delta stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
