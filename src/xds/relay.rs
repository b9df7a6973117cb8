//! Relaying ECDS between replicas: with several replicas (`--leader-elect`), an Envoy's ECDS
//! stream reaches whichever one its connection landed on, but only the leader reconciles, so
//! only it knows what to send and needs every Envoy's ACK or NACK. A follower therefore opens
//! the same stream to the leader (at the address the leader wrote on the Lease) and passes
//! messages both ways unchanged: the leader sees the Envoy's own node and answers. When either
//! side ends, so does the other, and the Envoy reconnects (to a new leader, after a takeover).

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use futures::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use super::server::ResponseStream;

/// How long connecting to the leader may take before the Envoy is told to try again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an ECDS stream that arrives now is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// By this replica: it leads, or runs alone.
    Here,
    /// By the leader, at this address (`host:port`).
    Leader(String),
    /// Nobody yet: no replica leads, or the leader did not say where it serves ECDS. The
    /// Envoy is told to try again (`UNAVAILABLE`), and retries with its backoff.
    Nobody,
}

/// Decides, per new stream, where it is served.
pub type Route = std::sync::Arc<dyn Fn() -> Upstream + Send + Sync>;

/// A state-of-the-world stream, relayed to the leader at `address`.
pub async fn sotw(
    address: &str,
    request: Request<Streaming<DiscoveryRequest>>,
) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
    let mut client = connect(address).await?;
    let answers = client
        .stream_extension_configs(forward(request.into_inner()))
        .await?
        .into_inner();
    tracing::info!(leader = address, "relaying an ECDS stream to the leader");
    Ok(Response::new(Box::pin(answers)))
}

/// A delta stream, relayed to the leader at `address`.
pub async fn delta(
    address: &str,
    request: Request<Streaming<DeltaDiscoveryRequest>>,
) -> Result<Response<ResponseStream<DeltaDiscoveryResponse>>, Status> {
    let mut client = connect(address).await?;
    let answers = client
        .delta_extension_configs(forward(request.into_inner()))
        .await?
        .into_inner();
    tracing::info!(
        leader = address,
        "relaying an ECDS delta stream to the leader"
    );
    Ok(Response::new(Box::pin(answers)))
}

/// The Envoy's messages, until its stream ends or breaks.
fn forward<T: Send + 'static>(inbound: Streaming<T>) -> impl Stream<Item = T> + Send + 'static {
    inbound
        .take_while(|m| futures::future::ready(m.is_ok()))
        .filter_map(|m| futures::future::ready(m.ok()))
}

async fn connect(address: &str) -> Result<ExtensionConfigDiscoveryServiceClient<Channel>, Status> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Status::unavailable(format!(
            "relaying to the leader's ECDS server at {address}: {e}"
        ))
    };
    let channel = Endpoint::from_shared(url(address))
        .map_err(|e| unavailable(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| unavailable(&crate::oci::error_chain(&e)))?;
    // Modules travel inline.
    Ok(ExtensionConfigDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// `http://host:port`, an IPv6 host in brackets (a pod IP may be one: `$(POD_IP):18000`).
fn url(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && !host.starts_with('[') => {
            format!("http://[{host}]:{port}")
        }
        _ => format!("http://{address}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_ip_of_either_family_makes_a_url() {
        assert_eq!(url("10.0.0.7:18000"), "http://10.0.0.7:18000");
        assert_eq!(url("fd00::7:18000"), "http://[fd00::7]:18000");
        assert_eq!(url("[fd00::7]:18000"), "http://[fd00::7]:18000");
        assert_eq!(url("op.ns.svc:18000"), "http://op.ns.svc:18000");
    }
}
