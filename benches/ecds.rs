//! ECDS benchmark (issue "Plain Envoy over ECDS"). Against the real test environment, a release
//! operator serving ECDS, and a real Envoy:
//! 1. apply → new behaviour: from the moment a changed WasmFilter is sent to the API server to
//!    the first response through Envoy that shows it, over 50 config changes (p50, p99, max);
//!    beside it, measured in the same run, the floor any controller has: the time from the same
//!    patch to a plain watch on WasmFilters seeing it;
//! 2. the operator's resident memory (now and peak);
//! 3. one change pushed to 500 connected ECDS streams (a bounded load generator on loopback:
//!    50 connections × 10 streams, each naming its own selected pod and ACKing what it gets):
//!    time until every stream holds the new config, beside the same change to one stream;
//! 4. a 20 MiB module (inline in every response) sent to 50 streams connecting at once: time
//!    until all hold it and the operator's peak memory, with the default send budget
//!    (`--xds-send-budget-bytes`, 256 MiB) and with a budget too large to ever bind.
//!
//! Run with `e2e/bench.sh ecds`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{
    BuildVersion, Node, TypedExtensionConfig, node::UserAgentVersionType,
};
use envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::google::protobuf::{StringValue, Struct, Value, value::Kind};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use prost::Message;
use support::*;
use wasmfilter::api::WasmFilter;
use wasmfilter::render::ecds::TYPED_EXTENSION_CONFIG_URL;

const UPDATES: usize = 50;
const STREAMS: usize = 500;
const CONNECTIONS: usize = 50;
const ROUNDS: usize = 5;
const BIG_STREAMS: usize = 50;
const BIG_MODULE: usize = 20 << 20;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn set_greeting(api: &Api<WasmFilter>, greeting: &str) {
    let patch = serde_json::json!({"spec": {"config": {"greeting": greeting}}});
    api.patch("bench", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The greeting in an ECDS response's first resource.
fn greeting_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Option<String> {
    let any = resp.resources.first()?;
    let typed = TypedExtensionConfig::decode(any.value.as_slice()).ok()?;
    #[derive(Clone, PartialEq, prost::Message)]
    struct Wasm {
        #[prost(message, optional, tag = "1")]
        config: Option<PluginConfig>,
    }
    let wasm = Wasm::decode(typed.typed_config?.value.as_slice()).ok()?;
    let conf = StringValue::decode(wasm.config?.configuration?.value.as_slice()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&conf.value).ok()?;
    v["greeting"].as_str().map(String::from)
}

fn node(ns: &str, pod: &str) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    Node {
        id: format!("{pod}.{ns}"),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_string(), s(ns)),
                ("NAME".to_string(), s(pod)),
            ]
            .into(),
        }),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(SemanticVersion {
                major_number: 1,
                minor_number: 40,
                patch: 0,
            }),
            metadata: None,
        })),
        ..Default::default()
    }
}

/// One simulated Envoy stream: subscribes, ACKs every response, reports each greeting it holds.
async fn fake_envoy(
    channel: tonic::transport::Channel,
    ns: String,
    pod: String,
    name: String,
    seen: tokio::sync::mpsc::UnboundedSender<(usize, String, Instant)>,
    idx: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut client =
        ExtensionConfigDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node(&ns, &pod)),
        resource_names: vec![name.clone()],
        type_url: TYPED_EXTENSION_CONFIG_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .stream_extension_configs(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = inbound.message() => {
                let Ok(Some(resp)) = msg else { return };
                if let Some(g) = greeting_of(&resp) {
                    let _ = seen.send((idx, g, Instant::now()));
                }
                let _ = tx.send(DiscoveryRequest {
                    version_info: resp.version_info.clone(),
                    response_nonce: resp.nonce.clone(),
                    resource_names: vec![name.clone()],
                    type_url: TYPED_EXTENSION_CONFIG_URL.into(),
                    ..Default::default()
                }).await;
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("bench-ecds");
    let n = ns.name.clone();
    let xds = free_port();
    let op = Operator::start(&n, &["--xds-listen", &format!("127.0.0.1:{xds}")]).await;
    let image = format!("{}/bench/ecds:v1", env.registry);
    push_module(&image, module(&format!("bench-{n}"))).await;
    apply_ok(&envoy_pod_yaml(&n, "envoy", "web", "v1.40.0"));
    apply_ok(&format!(
        "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {{name: bench, namespace: {n}}}\n\
         spec:\n  module: {{image: \"{image}\"}}\n  selector: {{matchLabels: {{app: web}}}}\n  \
         target: Ecds\n  rootId: add_header\n  config: {{greeting: start}}\n"
    ));
    let filters = [format!("{n}/bench")];
    let envoy = Envoy::start_ecds(
        "1.40.0",
        &EcdsNode {
            namespace: &n,
            pod: "envoy",
            filters: &filters,
            delta: false,
            metadata: true,
            xds_port: xds,
            tls_ca: None,
            default_module: None,
            network_filter: None,
        },
    );
    envoy
        .wait_header("x-wasmfilter-config", Some(r#"{"greeting":"start"}"#), 200)
        .await;
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &n);

    // The floor: a plain watch on WasmFilters, in this process, sees each patch.
    let (watch_tx, mut watch_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch_api = api.clone();
    tokio::spawn(async move {
        let mut w = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(Ok(ev)) = w.next().await {
            if let watcher::Event::Apply(wf) = ev
                && let Some(g) = wf
                    .spec
                    .config
                    .as_ref()
                    .and_then(|c| c.get("greeting")?.as_str().map(String::from))
            {
                let _ = watch_tx.send((g, Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    while watch_rx.try_recv().is_ok() {}

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/", envoy.listen_port);
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for i in 0..UPDATES {
        let greeting = format!("u{i}");
        let want = format!(r#"{{"greeting":"{greeting}"}}"#);
        let start = Instant::now();
        set_greeting(&api, &greeting).await;
        let deadline = start + Duration::from_secs(10);
        loop {
            let r = http.get(&url).send().await.unwrap();
            if r.headers()
                .get("x-wasmfilter-config")
                .and_then(|v| v.to_str().ok())
                == Some(want.as_str())
            {
                ours.push(start.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "update {i} not seen through Envoy in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        loop {
            let (g, at) = tokio::time::timeout(Duration::from_secs(10), watch_rx.recv())
                .await
                .expect("watch event")
                .unwrap();
            if g == greeting {
                floor.push(at - start);
                break;
            }
        }
        // Let the ACK's status write settle, as between real edits.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ours.sort();
    floor.sort();
    println!(
        "ECDS: kubectl apply -> new behaviour through a real Envoy 1.40.0, {UPDATES} config changes"
    );
    println!(
        "  operator + Envoy:        p50 {}  p99 {}  max {}",
        ms(pct(&ours, 0.5)),
        ms(pct(&ours, 0.99)),
        ms(*ours.last().unwrap())
    );
    println!(
        "  floor (patch -> watch):  p50 {}  p99 {}  max {}",
        ms(pct(&floor, 0.5)),
        ms(pct(&floor, 0.99)),
        ms(*floor.last().unwrap())
    );
    println!(
        "  ratio p50 {:.1}x of the floor; goal p50 < 150 ms, p99 < 500 ms",
        pct(&ours, 0.5).as_secs_f64() / pct(&floor, 0.5).as_secs_f64()
    );
    let pid = op.pid();
    let (rss, peak) = rss_kib(pid);
    println!(
        "  operator RSS {} MiB (peak {} MiB) with 1 stream",
        rss / 1024,
        peak / 1024
    );

    // 500 streams, each its own selected pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let start = Instant::now();
    for i in 0..STREAMS {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("load-{i}"), "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.40.0"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    println!("  created {STREAMS} pods in {}", ms(start.elapsed()));
    // Until the filter's selection holds them all (the operator reconciles on the pod events).
    wait_for(
        "every load pod selected",
        Duration::from_secs(120),
        || async {
            let wf = api.get("bench").await.ok()?;
            (wf.status?.selected_workloads? as usize > STREAMS).then_some(())
        },
    )
    .await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{xds}")).unwrap();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(endpoint.connect().await.unwrap());
    }
    for i in 0..STREAMS {
        tokio::spawn(fake_envoy(
            channels[i % CONNECTIONS].clone(),
            n.clone(),
            format!("load-{i}"),
            format!("{n}/bench"),
            seen_tx.clone(),
            i,
            stop.clone(),
        ));
    }
    // Each stream first gets the current config.
    let current = format!("u{}", UPDATES - 1);
    let mut have = vec![false; STREAMS];
    let deadline = Instant::now() + Duration::from_secs(60);
    while have.iter().any(|h| !h) {
        let (i, g, _) = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
            .await
            .expect("initial configs")
            .unwrap();
        if g == current {
            have[i] = true;
        }
    }
    let mut all = Vec::new();
    let mut per_stream = Vec::new();
    for round in 0..ROUNDS {
        let greeting = format!("load{round}");
        let mut got = vec![None; STREAMS];
        let start = Instant::now();
        set_greeting(&api, &greeting).await;
        let deadline = start + Duration::from_secs(60);
        while got.iter().any(Option::is_none) {
            let (i, g, at) = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
                .await
                .expect("every stream gets the change within 60 s")
                .unwrap();
            if g == greeting && got[i].is_none() {
                got[i] = Some(at - start);
            }
        }
        let mut times: Vec<Duration> = got.into_iter().map(Option::unwrap).collect();
        times.sort();
        all.push(*times.last().unwrap());
        per_stream.extend(times);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    all.sort();
    per_stream.sort();
    let (rss, peak) = rss_kib(pid);
    println!(
        "ECDS: one change pushed to {STREAMS} connected streams ({CONNECTIONS} connections), {ROUNDS} rounds"
    );
    println!(
        "  every stream holds it: median {}  worst {}; per stream p50 {}  p99 {}",
        ms(pct(&all, 0.5)),
        ms(*all.last().unwrap()),
        ms(pct(&per_stream, 0.5)),
        ms(pct(&per_stream, 0.99))
    );
    println!(
        "  ratio to one stream (p50 above): {:.1}x",
        pct(&all, 0.5).as_secs_f64() / pct(&ours, 0.5).as_secs_f64()
    );
    println!(
        "  operator RSS {} MiB (peak {} MiB) with {} streams",
        rss / 1024,
        peak / 1024,
        STREAMS + 1
    );
    stop.cancel();

    drop(op);
    drop(envoy);

    println!(
        "ECDS: a {} MiB module to {BIG_STREAMS} streams connecting at once",
        BIG_MODULE >> 20
    );
    for (label, budget) in [
        ("default send budget (256 MiB)", None),
        ("no budget (64 GiB)", Some("68719476736")),
    ] {
        let (all, rss_before, peak) = big_push(budget).await;
        println!(
            "  {label:<30} all hold it in {}  operator RSS before {} MiB, peak {} MiB",
            ms(all),
            rss_before / 1024,
            peak / 1024
        );
    }
}

/// Part 4: a fresh operator (so its peak memory is this push's), one big module selected by
/// `BIG_STREAMS` pods, then as many streams connecting at once. Returns the time until every
/// stream holds the module, the operator's RSS before they connect, and its peak.
async fn big_push(budget: Option<&str>) -> (Duration, u64, u64) {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("bench-big");
    let n = ns.name.clone();
    let xds = free_port();
    let listen = format!("127.0.0.1:{xds}");
    let mut args = vec!["--xds-listen", listen.as_str()];
    if let Some(b) = budget {
        args.extend(["--xds-send-budget-bytes", b]);
    }
    let op = Operator::start(&n, &args).await;
    let image = format!("{}/bench/ecds-big:{n}", env.registry);
    push_module(&image, module_of_size(BIG_MODULE)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    for i in 0..BIG_STREAMS {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("big-{i}"), "labels": {"app": "big"}},
            "spec": {"containers": [{"name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.40.0"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    apply_ok(&format!(
        "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {{name: big, namespace: {n}}}\n\
         spec:\n  module: {{image: \"{image}\"}}\n  selector: {{matchLabels: {{app: big}}}}\n  \
         target: Ecds\n  rootId: add_header\n  config: {{greeting: big}}\n"
    ));
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &n);
    wait_for(
        "the big module cached and every pod selected",
        Duration::from_secs(120),
        || async {
            let wf = api.get("big").await.ok()?;
            let st = wf.status?;
            (st.selected_workloads? as usize == BIG_STREAMS && st.artifact.is_some()).then_some(())
        },
    )
    .await;
    // Let the controller settle (status writes) before the streams connect.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, _) = rss_kib(op.pid());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{xds}")).unwrap();
    let channel = endpoint.connect().await.unwrap();
    let start = Instant::now();
    for i in 0..BIG_STREAMS {
        tokio::spawn(fake_envoy(
            channel.clone(),
            n.clone(),
            format!("big-{i}"),
            format!("{n}/big"),
            seen_tx.clone(),
            i,
            stop.clone(),
        ));
    }
    let mut have = [false; BIG_STREAMS];
    let deadline = start + Duration::from_secs(300);
    while have.iter().any(|h| !h) {
        let (i, g, _) = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
            .await
            .expect("every stream gets the big module within 300 s")
            .unwrap();
        if g == "big" {
            have[i] = true;
        }
    }
    let all = start.elapsed();
    let (_, peak) = rss_kib(op.pid());
    stop.cancel();
    (all, rss_before, peak)
}
