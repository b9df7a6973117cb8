//! Several replicas (`--leader-elect`): one leads and writes, the others serve the cache and
//! wait; a killed leader is replaced within the lease duration and nothing is written twice; a
//! leader that shuts down hands over at once; a leader that loses its Lease exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use support::registries::{Fault, FaultProxy};
use support::*;

const LEASE: &str = "wasmfilter-operator";
const LEASE_SECONDS: u64 = 4;

async fn replica(ns: &str, identity: &str, extra: &[&str]) -> Operator {
    let lease_seconds = LEASE_SECONDS.to_string();
    let mut args = vec![
        "--leader-elect",
        "--leader-election-namespace",
        ns,
        "--lease-duration-seconds",
        &lease_seconds,
        "--instance",
        identity,
    ];
    args.extend_from_slice(extra);
    Operator::start(ns, &args).await
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// Where the Lease says the leader serves ECDS.
async fn advertised(leases: &Api<Lease>) -> String {
    let lease = leases.get(LEASE).await.unwrap();
    lease.metadata.annotations.unwrap_or_default()[wasmfilter::names::ANNOTATION_XDS_ADDRESS]
        .clone()
}

async fn wait_holder(leases: &Api<Lease>, who: &str) {
    wait_for(
        &format!("{who} to hold the Lease"),
        Duration::from_secs(30),
        || async { (holder(leases).await.as_deref() == Some(who)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_and_nothing_is_written_twice() {
    let env = env();
    let client = client().await;
    let proxy = FaultProxy::start(&env.registry).await;
    let ns = TestNamespace::new("ha");
    let n = &ns.name;
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let mut a = replica(n, "a", &["--insecure-registry", &proxy.addr]).await;
    wait_holder(&leases, "a").await;
    let b = replica(n, "b", &["--insecure-registry", &proxy.addr]).await;
    // b is up and serving its cache (Operator::start waited for /readyz), and does not lead.
    assert_eq!(a.metric("wasmfilter_leader").await, 1.0);
    assert_eq!(b.metric("wasmfilter_leader").await, 0.0);

    // A reconcile in flight on the leader: its registry accepts the request and stalls.
    push_module(
        &format!("{}/ha/{n}:v1", env.registry),
        module(&format!("ha-{n}")),
    )
    .await;
    proxy.set(Fault::Stall);
    Filter::new(n, "f", &format!("{}/ha/{n}:v1", proxy.addr)).apply();
    wait_for(
        "the leader's pull to be in flight",
        Duration::from_secs(30),
        || async { (!proxy.manifest_requests.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;
    assert_eq!(b.metric("wasmfilter_reconciles_total").await, 0.0);

    a.kill();
    let killed = Instant::now();
    proxy.set(Fault::None);
    wait_holder(&leases, "b").await;
    let took_over = killed.elapsed();
    assert!(
        took_over <= Duration::from_secs(LEASE_SECONDS + 2),
        "b took over {took_over:?} after the kill; the lease is {LEASE_SECONDS} s"
    );
    wait_condition(&client, n, "f", "Ready", "True").await;
    assert_eq!(b.metric("wasmfilter_leader").await, 1.0);

    // Written once, by one manager: the dead leader never got to the child.
    let child = child_api(&client, n, "WasmPlugin").get("f").await.unwrap();
    assert_eq!(child.metadata.generation, Some(1), "{child:?}");
    let managers: Vec<String> = child
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, [wasmfilter::names::FIELD_MANAGER]);
    assert!(!a.logs().contains("Deployed"), "{}", a.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_at_once_and_one_that_loses_its_lease_exits() {
    let client = client().await;
    let ns = TestNamespace::new("ha-handover");
    let n = &ns.name;
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let mut a = replica(n, "a", &[]).await;
    wait_holder(&leases, "a").await;
    let mut b = replica(n, "b", &[]).await;

    // The follower serves what the leader deploys: a module it lacks, fetched on request.
    let env = env();
    let image = format!("{}/ha/{n}:v1", env.registry);
    let bytes = module(&format!("ha-handover-{n}"));
    push_module(&image, bytes.clone()).await;
    Filter::new(n, "f", &image).apply();
    let wf = wait_condition(&client, n, "f", "Ready", "True").await;
    let sha = wf.status.unwrap().artifact.unwrap().module_sha256;
    let url = format!(
        "http://127.0.0.1:{}/modules/sha256/{sha}.wasm",
        b.cache_port
    );
    let served = wait_for(
        "the follower to serve the module",
        Duration::from_secs(30),
        || async {
            let r = reqwest::get(&url).await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.bytes().await.ok()
        },
    )
    .await;
    assert_eq!(served.as_ref(), bytes.as_slice());
    assert_eq!(b.metric("wasmfilter_reconciles_total").await, 0.0);

    // SIGTERM: a releases the Lease, and b leads well before a lease duration.
    let stopped = Instant::now();
    let status = a.terminate(Duration::from_secs(15)).expect("a exits");
    assert!(status.success(), "{}", a.logs());
    wait_holder(&leases, "b").await;
    let handed_over = stopped.elapsed();
    assert!(
        handed_over < Duration::from_secs(LEASE_SECONDS),
        "b led {handed_over:?} after a stopped: a did not release the Lease"
    );
    assert!(
        a.logs().contains("released the leader Lease"),
        "{}",
        a.logs()
    );

    // Someone else takes the Lease (as a partition would let another replica do): b stops
    // leading at its next renewal, by exiting.
    let intruder = serde_json::json!({
        "spec": {
            "holderIdentity": "intruder",
            "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string(),
            "leaseDurationSeconds": 3600,
        }
    });
    leases
        .patch(LEASE, &PatchParams::default(), &Patch::Merge(&intruder))
        .await
        .unwrap();
    let status = b
        .wait_exit(Duration::from_secs(LEASE_SECONDS))
        .await
        .expect("b exits once it sees it lost the Lease");
    assert!(!status.success());
    assert!(b.logs().contains("lost the leader Lease"), "{}", b.logs());
}

/// With several replicas an Envoy may reach any of them: a follower relays its ECDS stream to
/// the leader (at the address the leader wrote on the Lease), which sends the filter and hears
/// the Envoy's ACK; the follower reconciles nothing. Once the leader is killed, the Envoy's
/// stream ends, it reconnects, and the new leader serves it and its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_connected_to_a_follower_is_served_by_the_leader() {
    use support::ecds::*;
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ha-ecds");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "web-1", "web", "v1.40.0"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let (xa, xb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{xa}"), format!("127.0.0.1:{xb}"));
    let mut a = replica(
        n,
        "a",
        &["--xds-listen", &la, "--xds-advertise-address", &la],
    )
    .await;
    wait_holder(&leases, "a").await;
    let b = replica(
        n,
        "b",
        &["--xds-listen", &lb, "--xds-advertise-address", &lb],
    )
    .await;
    assert_eq!(advertised(&leases).await, la);
    let v1 = format!("{}/ha-ecds/{n}:v1", env.registry);
    push_module(&v1, wasm(&variant("on", &format!("ha-{n}")))).await;
    ecds_filter(n, "hdr", &v1, "hello").apply();
    let filters = [format!("{n}/hdr")];
    let envoy = Envoy::start_ecds("1.40.0", &node(n, "web-1", &filters, true, xb));
    envoy
        .wait_header("x-wasmfilter-config", Some(r#"{"greeting":"hello"}"#), 200)
        .await;
    // The leader heard the Envoy's ACK through b.
    wait_status(
        &client,
        n,
        "hdr",
        "the Envoy behind b to have loaded it",
        |wf| {
            cond_is(wf, "Loaded", "True", "Loaded")
                && workload(wf, "web-1").is_some_and(|w| w.loaded == Some(true))
        },
    )
    .await;
    assert!(
        b.logs()
            .contains("relaying an ECDS delta stream to the leader")
    );
    assert_eq!(b.metric("wasmfilter_reconciles_total").await, 0.0);

    a.kill();
    wait_holder(&leases, "b").await;
    ecds_filter(n, "hdr", &v1, "again").apply();
    envoy
        .wait_header("x-wasmfilter-config", Some(r#"{"greeting":"again"}"#), 200)
        .await;
    wait_status(
        &client,
        n,
        "hdr",
        "b to hear the Envoy's ACK itself",
        |wf| {
            wf.status.as_ref().unwrap().observed_generation == Some(2)
                && cond_is(wf, "Loaded", "True", "Loaded")
        },
    )
    .await;
    assert_eq!(advertised(&leases).await, lb);
}

/// While the replica holding the Lease has not said where it serves ECDS (here: a holder that
/// is no replica at all), a follower refuses a new ECDS stream with `UNAVAILABLE`, saying why,
/// rather than holding it or serving it from its own empty state; Envoy retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_ecds_streams_while_no_leader_serves_them() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
    let client = client().await;
    let ns = TestNamespace::new("ha-nobody");
    let n = &ns.name;
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let ghost = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": n},
        "spec": {
            "holderIdentity": "ghost",
            "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string(),
            "leaseDurationSeconds": 3600,
        }
    });
    leases
        .create(&Default::default(), &serde_json::from_value(ghost).unwrap())
        .await
        .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let b = replica(
        n,
        "b",
        &["--xds-listen", &listen, "--xds-advertise-address", &listen],
    )
    .await;
    assert_eq!(b.metric("wasmfilter_leader").await, 0.0);
    let mut ecds = ExtensionConfigDiscoveryServiceClient::connect(format!("http://{listen}"))
        .await
        .unwrap();
    let refused = ecds
        .stream_extension_configs(futures::stream::iter([DiscoveryRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("no replica leads yet"),
        "{refused:?}"
    );
}
