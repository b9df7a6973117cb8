//! Istio for real: the operator's WasmPlugins and EnvoyFilters consumed by the test
//! environment's istiod (pilot-discovery), served to a gateway proxy run by the real istio-agent
//! (pilot-agent) and its Envoy, which fetch the module from the operator's cache. Every
//! assertion is what a user sees: an answer through the gateway, or Envoy's own config and
//! counters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::ecds::{cond_is, needs_1_39, variant, wasm};
use support::istio::*;
use support::*;
use wasmfilter::api::{FailurePolicy, FilterType, Phase, TrafficMode};

/// An operator whose cache URL is its own loopback port, as the agent fetches it.
async fn operator(ns: &str) -> Operator {
    operator_with(ns, &[]).await
}

/// Like [`operator`], started with `args` too.
async fn operator_with(ns: &str, args: &[&str]) -> Operator {
    Operator::start_advertising(ns, args, &|port| format!("http://127.0.0.1:{port}")).await
}

/// An operator whose cache URL is a Service's `<name>.<namespace>.svc` host, as users name it
/// (the operator derives Istio's cluster for it, `outbound|PORT||<name>.<namespace>.svc.cluster.local`),
/// and that Service: a ServiceEntry standing in for it, since endpoints on loopback are refused
/// in a Service. Returns the operator and the host name.
async fn operator_behind_service(ns: &str, args: &[&str]) -> (Operator, String) {
    let service = format!("wasmfilter-cache.{ns}.svc");
    let op =
        Operator::start_advertising(ns, args, &|port| format!("http://{service}:{port}")).await;
    apply_ok(&loopback_service(
        ns,
        "wasmfilter-cache",
        &format!("{service}.cluster.local"),
        op.cache_port,
    ));
    (op, service)
}

/// The x-wasmfilter values of an answer, waiting until they are `expected`.
async fn wait_headers(gw: &IstioProxy, what: &str, expected: &[&str]) {
    gw.wait_for_answer(what, |status, headers, _| {
        status == 200 && filter_headers(headers) == expected
    })
    .await;
}

/// Like [`wait_headers`], the filter answering with the configuration `config` too.
async fn wait_configured(gw: &IstioProxy, what: &str, expected: &[&str], config: &str) {
    gw.wait_for_answer(what, |status, headers, _| {
        status == 200
            && filter_headers(headers) == expected
            && headers
                .get("x-wasmfilter-config")
                .is_some_and(|v| v == config)
    })
    .await;
}

/// Whether the filter `name` has no child of `kind`.
async fn no_child(client: &kube::Client, ns: &str, kind: &str, name: &str) -> bool {
    child_api(client, ns, kind)
        .get_opt(name)
        .await
        .unwrap()
        .is_none()
}

/// The filter's first (only) pod, as its status lists it.
fn first_pod(wf: &wasmfilter::api::WasmFilter) -> wasmfilter::api::WorkloadStatus {
    wf.status.as_ref().unwrap().workloads[0].clone()
}

/// Waits until `--istio-load-status` says the filter `name`'s one proxy runs it: its pod
/// `loaded`, `Loaded` and `Ready` true.
async fn wait_pod_loaded(client: &kube::Client, ns: &str, name: &str) {
    let wf = wait_status(client, ns, name, "its proxy runs it", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;
    assert_eq!(first_pod(&wf).loaded, Some(true), "{name}");
    assert!(cond_is(&wf, "Ready", "True", "Ready"), "{:?}", wf.status);
}

/// Waits until `--istio-load-status` says the filter `name`'s one proxy does not run it: its
/// pod `loaded: false`, `Loaded` and `Ready` false with `LoadFailed`. Returns the pod's
/// `loadError`.
async fn wait_pod_failed(client: &kube::Client, ns: &str, name: &str) -> String {
    let wf = wait_status(client, ns, name, "its proxy's failure said", |wf| {
        cond_is(wf, "Loaded", "False", "LoadFailed")
    })
    .await;
    let w = first_pod(&wf);
    assert_eq!(w.loaded, Some(false), "{name}");
    assert!(
        cond_is(&wf, "Ready", "False", "LoadFailed"),
        "{:?}",
        wf.status
    );
    w.load_error.unwrap()
}

#[tokio::test]
async fn a_wasm_plugin_reaches_a_gateway_through_istiod_and_follows_config_and_image_changes() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-wp");
    let n = &ns.name;
    let op = operator(n).await;
    let (gw, _backend) = gateway(n, "gw", &[op.cache_port]).await;

    let v1 = format!("{}/istio/{n}:v1", env.registry);
    push_module(&v1, wasm(&variant("v1", &format!("v1-{n}")))).await;
    Filter::new(n, "hdr", &v1)
        .app("gw")
        .config(json!({"greeting": "hello"}))
        .apply();
    // The plugin runs with the WasmFilter's config, in front of the backend.
    wait_configured(&gw, "the filter", &["v1"], r#"{"greeting":"hello"}"#).await;
    assert_eq!(gw.get("/").await.unwrap().2, "hello");
    // The agent fetched it from the operator's cache and gave Envoy a local file: the module
    // Envoy runs is the one the operator verified.
    let wp = child_api(&client, n, "WasmPlugin")
        .get("hdr")
        .await
        .unwrap();
    let sha = wp.data["spec"]["sha256"].as_str().unwrap().to_string();
    let ecds = gw.config_dump("ecds_filters").await.to_string();
    assert!(ecds.contains(&format!("{sha}.wasm")), "{ecds}");

    // A config change is live without a new fetch.
    Filter::new(n, "hdr", &v1)
        .app("gw")
        .config(json!({"greeting": "bonjour"}))
        .apply();
    wait_configured(&gw, "the new config", &["v1"], r#"{"greeting":"bonjour"}"#).await;

    // An image change is live: the gateway runs the new module.
    let v2 = format!("{}/istio/{n}:v2", env.registry);
    push_module(&v2, wasm(&variant("v2", &format!("v2-{n}")))).await;
    Filter::new(n, "hdr", &v2)
        .app("gw")
        .config(json!({"greeting": "bonjour"}))
        .apply();
    wait_headers(&gw, "the new module", &["v2"]).await;
}

#[tokio::test]
async fn phase_and_priority_order_two_filters_in_the_gateway() {
    let env = env();
    let ns = TestNamespace::new("istio-order");
    let n = &ns.name;
    let op = operator(n).await;
    let (gw, _backend) = gateway(n, "gw", &[op.cache_port]).await;
    let (first, second, authn) = (
        format!("{}/istio/{n}:aa", env.registry),
        format!("{}/istio/{n}:bb", env.registry),
        format!("{}/istio/{n}:cc", env.registry),
    );
    push_module(&first, wasm(&variant("aa", &format!("aa-{n}")))).await;
    push_module(&second, wasm(&variant("bb", &format!("bb-{n}")))).await;
    push_module(&authn, wasm(&variant("cc", &format!("cc-{n}")))).await;

    // Same phase: the higher priority runs first on the request, so last on the response
    // (Envoy runs response filters in reverse): its header is added last.
    Filter::new(n, "high", &first)
        .app("gw")
        .edit(|s| s.priority = Some(10))
        .apply();
    Filter::new(n, "low", &second)
        .app("gw")
        .edit(|s| s.priority = Some(1))
        .apply();
    wait_headers(&gw, "both filters, high before low", &["bb", "aa"]).await;

    // Swapping the priorities swaps them in the chain.
    Filter::new(n, "high", &first)
        .app("gw")
        .edit(|s| s.priority = Some(1))
        .apply();
    Filter::new(n, "low", &second)
        .app("gw")
        .edit(|s| s.priority = Some(10))
        .apply();
    wait_headers(&gw, "the priorities swapped", &["aa", "bb"]).await;

    // A phase comes before priority: an AUTHN filter with the lowest priority runs before both.
    Filter::new(n, "authn", &authn)
        .app("gw")
        .edit(|s| {
            s.phase = Phase::Authn;
            s.priority = Some(-100);
        })
        .apply();
    wait_headers(&gw, "the AUTHN filter first", &["aa", "bb", "cc"]).await;
}

#[tokio::test]
async fn failure_policy_decides_what_the_gateway_does_when_the_module_cannot_be_fetched() {
    let env = env();
    let ns = TestNamespace::new("istio-fail");
    let n = &ns.name;
    let _op = operator(n).await;
    // The gateway cannot reach the operator's cache: every fetch of the module fails.
    let (gw, _backend) = gateway(n, "gw", &[]).await;
    let image = format!("{}/istio/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("on", &format!("fail-{n}")))).await;

    Filter::new(n, "f", &image)
        .app("gw")
        .edit(|s| s.failure_policy = FailurePolicy::FailOpen)
        .apply();
    let client = client().await;
    wait_condition(&client, n, "f", "Ready", "True").await;
    // Fail open: traffic passes without the filter.
    gw.keeps_answering(10, &[]).await;
    assert!(
        gw.logs().contains("cannot fetch Wasm module"),
        "the agent tried and failed:\n{}",
        gw.logs()
    );

    // Fail closed: the agent puts a deny-all filter in its place.
    Filter::new(n, "f", &image)
        .app("gw")
        .edit(|s| s.failure_policy = FailurePolicy::FailClosed)
        .apply();
    gw.wait_for_answer("requests refused", |status, _, _| status == 403)
        .await;
}

#[tokio::test]
async fn a_network_filter_loads_in_the_gateways_listener() {
    let env = env();
    let ns = TestNamespace::new("istio-l4");
    let n = &ns.name;
    let op = operator(n).await;
    let (gw, _backend) = gateway(n, "gw", &[op.cache_port]).await;
    let image = format!("{}/istio/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("on", &format!("l4-{n}")))).await;
    Filter::new(n, "tcp", &image)
        .app("gw")
        .edit(|s| s.filter_type = FilterType::Network)
        .apply();
    // Envoy took it as a network filter, from the file the agent fetched.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let dump = loop {
        let dump = gw.config_dump("ecds_filters").await;
        let network = dump["configs"].as_array().into_iter().flatten().find(|c| {
            c["ecds_filter"]["typed_config"]["@type"]
                == "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
        });
        if let Some(c) = network {
            break c.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no network Wasm filter in 30 s: {dump}\n{}",
            gw.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let config = &dump["ecds_filter"]["typed_config"]["config"];
    assert!(
        config["vm_config"]["code"]["local"]["filename"]
            .as_str()
            .is_some_and(|f| f.ends_with(".wasm")),
        "{dump}"
    );
    let name = dump["ecds_filter"]["name"].as_str().unwrap();
    assert!(
        gw.stat(&format!(
            "extension_config_discovery.network_filter.{name}.config_reload"
        ))
        .await
            >= 1,
        "Envoy counted it as a network filter"
    );
    // Traffic flows through the listener whose chain holds it.
    let (status, _, body) = gw.get("/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "hello"));
}

#[tokio::test]
async fn an_envoy_filter_target_runs_through_istiod_from_the_cache_service() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-ef");
    let n = &ns.name;
    let (op, service) = operator_behind_service(n, &[]).await;
    let cluster = format!("outbound|{}||{service}.cluster.local", op.cache_port);
    let (gw, _backend) = gateway_resolving(n, "gw", &[op.cache_port], &[&service]).await;

    // First a WasmPlugin: the agent fetches the module from the Service's URL.
    let wp_image = format!("{}/istio/{n}:wp", env.registry);
    push_module(&wp_image, wasm(&variant("wp", &format!("wp-{n}")))).await;
    Filter::new(n, "hdr", &wp_image).app("gw").apply();
    wait_headers(&gw, "the WasmPlugin's filter", &["wp"]).await;

    // Then the same filter as an EnvoyFilter: Envoy fetches the module itself, through the
    // cluster istiod made for the Service, and the WasmPlugin's filter is gone.
    let ef_image = format!("{}/istio/{n}:ef", env.registry);
    push_module(&ef_image, wasm(&variant("ef", &format!("ef-{n}")))).await;
    Filter::new(n, "hdr", &ef_image)
        .app("gw")
        .target(Target::EnvoyFilter)
        .apply();
    wait_headers(&gw, "the EnvoyFilter's filter alone", &["ef"]).await;
    let ef = child_api(&client, n, "EnvoyFilter")
        .get("hdr")
        .await
        .unwrap();
    assert!(
        serde_json::to_string(&ef.data).unwrap().contains(&cluster),
        "{:?}",
        ef.data
    );
    let listeners = gw.config_dump("dynamic_listeners").await.to_string();
    assert!(listeners.contains(&cluster), "{listeners}");
    assert!(no_child(&client, n, "WasmPlugin", "hdr").await);
}

#[tokio::test]
async fn a_private_module_reaches_the_gateway_and_its_credential_stays_in_the_operator() {
    use support::registries::{Auth, TestRegistry};
    let client = client().await;
    let ns = TestNamespace::new("istio-private");
    let n = &ns.name;
    let password = format!("pw-{:016x}", fastrand::u64(..));
    let reg = TestRegistry::start(
        None,
        Auth::Basic {
            user: "alice".into(),
            password: password.clone(),
        },
    )
    .await;
    let image = format!("{}/private/{n}:v1", reg.addr);
    wasmfilter::oci::push_module(
        &registry_client(),
        &oci_client::secrets::RegistryAuth::Basic("alice".into(), password.clone()),
        &image.parse().unwrap(),
        wasm(&variant("pv", &format!("pv-{n}"))),
        wasmfilter::oci::Format::SoloOci,
        &Default::default(),
    )
    .await
    .unwrap();
    let out = kubectl(&[
        "-n",
        n,
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={}", reg.addr),
        "--docker-username=alice",
        &format!("--docker-password={password}"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let op = operator_with(n, &["--insecure-registry", &reg.addr]).await;
    let (gw, _backend) = gateway(n, "gw", &[op.cache_port]).await;

    Filter::new(n, "private", &image)
        .app("gw")
        .pull_secret("regcred")
        .apply();
    wait_headers(&gw, "the private module's filter", &["pv"]).await;

    // Istio got the cache's URL, pinned by sha256, and no pull secret.
    let wp = child_api(&client, n, "WasmPlugin")
        .get("private")
        .await
        .unwrap();
    let spec = &wp.data["spec"];
    assert!(spec.get("imagePullSecret").is_none(), "{spec}");
    let url = spec["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!(
            "http://127.0.0.1:{}/modules/sha256/",
            op.cache_port
        )),
        "{url}"
    );
    // Nothing the agent or its Envoy holds or logged names the registry or the credential.
    let dump = reqwest::get(format!(
        "http://127.0.0.1:{}/config_dump?include_eds",
        gw.admin
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("alice:{password}"),
    );
    for secret in [password.as_str(), reg.addr.as_str(), basic.as_str()] {
        assert!(!dump.contains(secret), "Envoy's config holds {secret}");
        assert!(!gw.logs().contains(secret), "the agent logged {secret}");
    }
}

#[tokio::test]
async fn traffic_extension_and_auto_targets_reach_the_gateway_through_istiod() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-te");
    let n = &ns.name;
    // The test environment installs Istio 1.30's CRDs: TrafficExtension is there, so `Auto`
    // means a TrafficExtension.
    let op = operator(n).await;
    let (gw, _backend) = gateway(n, "gw", &[op.cache_port]).await;
    let image = format!("{}/istio/{n}:te", env.registry);
    push_module(&image, wasm(&variant("te", &format!("te-{n}")))).await;

    Filter::new(n, "hdr", &image)
        .app("gw")
        .target(Target::TrafficExtension)
        .config(json!({"greeting": "te"}))
        .apply();
    wait_configured(
        &gw,
        "the TrafficExtension's filter",
        &["te"],
        r#"{"greeting":"te"}"#,
    )
    .await;
    let te = child_api(&client, n, "TrafficExtension")
        .get("hdr")
        .await
        .unwrap();
    let url = te.data["spec"]["wasm"]["url"].as_str().unwrap();
    let sha = te.data["spec"]["wasm"]["sha256"].as_str().unwrap();
    assert!(
        url.ends_with(&format!("/modules/sha256/{sha}.wasm")),
        "{url}"
    );
    let wf = wait_condition(&client, n, "hdr", "Ready", "True").await;
    let deployed = condition(&wf, "Deployed").unwrap();
    assert!(
        deployed.message.contains("TrafficExtension"),
        "{}",
        deployed.message
    );

    // Auto: the same child.
    Filter::new(n, "hdr", &image)
        .app("gw")
        .target(Target::Auto)
        .config(json!({"greeting": "auto"}))
        .apply();
    wait_configured(&gw, "Auto's filter", &["te"], r#"{"greeting":"auto"}"#).await;
    assert!(no_child(&client, n, "WasmPlugin", "hdr").await);

    // Back to a WasmPlugin: the TrafficExtension goes, the filter stays in the gateway, once.
    Filter::new(n, "hdr", &image)
        .app("gw")
        .target(Target::WasmPlugin)
        .config(json!({"greeting": "wp"}))
        .apply();
    wait_configured(
        &gw,
        "the WasmPlugin's filter alone",
        &["te"],
        r#"{"greeting":"wp"}"#,
    )
    .await;
    assert!(no_child(&client, n, "TrafficExtension", "hdr").await);
}

#[tokio::test]
async fn a_sidecar_runs_server_mode_filters_on_inbound_traffic_and_not_client_mode_ones() {
    let env = env();
    let ns = TestNamespace::new("istio-sidecar");
    let n = &ns.name;
    let op = operator(n).await;
    let (app, _backend) = sidecar(n, "app", &[op.cache_port]).await;
    let (inbound, outbound) = (
        format!("{}/istio/{n}:in", env.registry),
        format!("{}/istio/{n}:out", env.registry),
    );
    push_module(&inbound, wasm(&variant("in", &format!("in-{n}")))).await;
    push_module(&outbound, wasm(&variant("ou", &format!("ou-{n}")))).await;
    let traffic = |mode: TrafficMode| {
        move |s: &mut wasmfilter::api::WasmFilterSpec| {
            s.traffic = vec![wasmfilter::api::TrafficSelector {
                mode,
                ports: Vec::new(),
            }];
        }
    };
    // Both select the workload; only the SERVER one applies to what comes in.
    Filter::new(n, "outbound", &outbound)
        .app("app")
        .edit(traffic(TrafficMode::Client))
        .apply();
    Filter::new(n, "inbound", &inbound)
        .app("app")
        .edit(traffic(TrafficMode::Server))
        .apply();
    wait_headers(&app, "the SERVER filter on inbound traffic", &["in"]).await;
    let client = client().await;
    wait_condition(&client, n, "outbound", "Ready", "True").await;
    // The CLIENT one was deployed too, and stays off the inbound listener.
    app.keeps_answering(5, &["in"]).await;
}

#[tokio::test]
async fn a_module_the_gateways_envoy_would_refuse_never_reaches_istio() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-abi");
    let n = &ns.name;
    let op = operator(n).await;
    // A gateway whose agent runs Envoy 1.36.2, and the pod object saying so.
    let backend = Backend::start().await;
    let gw = IstioProxy::start_with_envoy(n, "gw", &[op.cache_port, backend.port], "1.36.2").await;
    apply_ok(&proxy_pod(n, &gw, "1.36.2"));
    apply_ok(&route_to_backend(n, &gw, &backend));
    let good = format!("{}/istio/{n}:good", env.registry);
    push_module(&good, wasm(&variant("ok", &format!("ok-{n}")))).await;
    Filter::new(n, "hdr", &good).app("gw").apply();
    wait_headers(&gw, "the module 1.36.2 loads", &["ok"]).await;
    let wf = wait_condition(&client, n, "hdr", "Ready", "True").await;
    let w = &wf.status.as_ref().unwrap().workloads;
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        (
            w[0].name.as_str(),
            w[0].envoy_version.as_deref(),
            w[0].compatible
        ),
        ("gw", Some("1.36.2"), Some(true))
    );
    // Only what is seen: an Istio proxy does not say whether it loaded the module.
    assert_eq!(w[0].loaded, None, "{w:?}");
    let pinned = child_api(&client, n, "WasmPlugin")
        .get("hdr")
        .await
        .unwrap()
        .data["spec"]["sha256"]
        .clone();

    // A module importing what only Envoy 1.39+ has: refused for this workload, the WasmPlugin
    // keeps the module it had, and the gateway keeps running it.
    let newer = format!("{}/istio/{n}:needs-1-39", env.registry);
    let module = needs_1_39("nu", &format!("nu-{n}"));
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &module));
    push_module(&newer, module).await;
    Filter::new(n, "hdr", &newer).app("gw").apply();
    let wf = wait_status(&client, n, "hdr", "blocked", |wf| {
        condition(wf, "Ready").is_some_and(|c| c.status == "False" && c.reason == "Incompatible")
    })
    .await;
    let w = &wf.status.as_ref().unwrap().workloads[0];
    assert_eq!(w.compatible, Some(false), "{w:?}");
    assert!(w.reasons.iter().any(|r| r.contains("fd_pread")), "{w:?}");
    let wp = child_api(&client, n, "WasmPlugin")
        .get("hdr")
        .await
        .unwrap();
    assert_eq!(wp.data["spec"]["sha256"], pinned);
    gw.keeps_answering(5, &["ok"]).await;

    // What the check spared it: the same module put in a WasmPlugin by hand (from the
    // operator's cache, which verified it) is refused by this Envoy for that very import.
    apply_ok(&format!(
        "apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: by-hand, namespace: {n}}}
spec:
  selector: {{matchLabels: {{app: gw}}}}
  url: http://127.0.0.1:{}/modules/sha256/{sha}.wasm
  sha256: {sha}
  pluginName: add_header
  failStrategy: FAIL_OPEN
",
        op.cache_port
    ));
    let refused = format!(
        "extension_config_discovery.http_filter.extensions.istio.io/trafficextension/{n}.by-hand~istio-translated-wasmplugin.update_rejected"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gw.stat(&refused).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Envoy 1.36.2 did not refuse it:\n{}",
            gw.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(gw.logs().contains("fd_pread"), "{}", gw.logs());
}

#[tokio::test]
async fn with_istio_load_status_each_pod_says_whether_its_proxy_runs_the_filter() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-load");
    let n = &ns.name;
    // Without the pre-flight, so a module whose configure fails reaches Envoy.
    let op = operator_with(n, &["--istio-load-status", "--preflight=false"]).await;
    // Three gateways: one fetches and runs a good module, one cannot reach the cache, one
    // fetches a module whose proxy_on_configure fails.
    let (good, _b1) = gateway(n, "good", &[op.cache_port]).await;
    let (unreachable, _b2) = gateway(n, "unreachable", &[]).await;
    let (refusing, _b3) = gateway(n, "refusing", &[op.cache_port]).await;
    for gw in [&good, &unreachable, &refusing] {
        register_pod(n, gw, "1.39.3");
    }
    let ok = format!("{}/istio/{n}:ok", env.registry);
    push_module(&ok, wasm(&variant("ok", &format!("ok-{n}")))).await;
    let bad = format!("{}/istio/{n}:bad", env.registry);
    push_module(&bad, support::ecds::configure_fails(&format!("bad-{n}"))).await;
    // (As a TrafficExtension: its plugin is named differently from a WasmPlugin's.)
    Filter::new(n, "good", &ok)
        .app("good")
        .target(Target::TrafficExtension)
        .apply();
    Filter::new(n, "unreachable", &ok)
        .app("unreachable")
        .edit(|s| s.failure_policy = FailurePolicy::FailOpen)
        .apply();
    Filter::new(n, "refusing", &bad).app("refusing").apply();

    wait_pod_loaded(&client, n, "good").await;
    wait_headers(&good, "the good module", &["ok"]).await;

    let why = wait_pod_failed(&client, n, "unreachable").await;
    assert!(
        why.contains("failed module fetches (download_failure"),
        "{why}"
    );
    // The agent's allow-all stand-in (FailOpen) passes requests without the filter.
    let (status, headers, _) = unreachable.get("/").await.unwrap();
    assert_eq!((status, filter_headers(&headers).len()), (200, 0));

    let why = wait_pod_failed(&client, n, "refusing").await;
    assert!(why.contains("Envoy refused its config"), "{why}");
    assert!(
        refusing.logs().contains("Unable to create Wasm"),
        "{}",
        refusing.logs()
    );
}

#[tokio::test]
async fn with_istio_load_status_an_envoy_filters_pods_say_what_their_proxy_shows() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-ef-load");
    let n = &ns.name;
    // Envoy fetches an EnvoyFilter's module itself, through the cluster istiod makes for the
    // cache's Service name.
    let (op, service) =
        operator_behind_service(n, &["--istio-load-status", "--preflight=false"]).await;
    // Four gateways: one runs a good module, one cannot reach the cache, one fetches a module
    // whose proxy_on_configure fails, and one runs a WasmPlugin's filter beside the
    // EnvoyFilter's.
    let (good, _b1) = gateway_resolving(n, "good", &[op.cache_port], &[&service]).await;
    let (unreachable, _b2) = gateway_resolving(n, "unreachable", &[], &[&service]).await;
    let (refusing, _b3) = gateway_resolving(n, "refusing", &[op.cache_port], &[&service]).await;
    let (shared, _b4) = gateway_resolving(n, "shared", &[op.cache_port], &[&service]).await;
    for gw in [&good, &unreachable, &refusing, &shared] {
        register_pod(n, gw, "1.39.3");
    }
    let ok = format!("{}/istio/{n}:ok", env.registry);
    push_module(&ok, wasm(&variant("ok", &format!("ok-{n}")))).await;
    let other = format!("{}/istio/{n}:other", env.registry);
    push_module(&other, wasm(&variant("wp", &format!("wp-{n}")))).await;
    let bad = format!("{}/istio/{n}:bad", env.registry);
    push_module(&bad, support::ecds::configure_fails(&format!("bad-{n}"))).await;
    for (name, image, app) in [
        ("good", &ok, "good"),
        ("unreachable", &ok, "unreachable"),
        ("refusing", &bad, "refusing"),
        ("shared", &ok, "shared"),
    ] {
        Filter::new(n, name, image)
            .app(app)
            .target(Target::EnvoyFilter)
            .apply();
    }
    Filter::new(n, "beside", &other).app("shared").apply();

    wait_pod_loaded(&client, n, "good").await;
    wait_headers(&good, "the good module", &["ok"]).await;

    // Envoy retries the fetch while the listener warms, then gives up: no Wasm VM runs.
    // Only the unreachable one counted a failed fetch.
    for (name, gw, log, failed_fetch) in [
        ("unreachable", &unreachable, "Retry limit exceeded", true),
        ("refusing", &refusing, "Failed to configure", false),
    ] {
        let why = wait_pod_failed(&client, n, name).await;
        assert!(
            why.contains("no Wasm VM runs in the proxy"),
            "{name}: {why}"
        );
        assert_eq!(
            why.contains("1 failed module fetch"),
            failed_fetch,
            "{name}: {why}"
        );
        assert!(gw.logs().contains(log), "{name}: {}", gw.logs());
        // FailClosed (the default): the listener refuses requests without its filter.
        let (status, _, _) = gw.get("/").await.unwrap();
        assert_eq!(status, 503, "{name}");
    }

    // Beside a WasmPlugin's filter, both run, but the proxy-wide VM count cannot say whose VMs
    // run: the EnvoyFilter's pod keeps `loaded` absent, the WasmPlugin's says true.
    wait_headers(&shared, "both filters", &["ok", "wp"]).await;
    wait_pod_loaded(&client, n, "beside").await;
    let wf = wait_status(&client, n, "shared", "undecided", |wf| {
        cond_is(wf, "Loaded", "Unknown", "LoadUndecided")
    })
    .await;
    assert_eq!(first_pod(&wf).loaded, None);
    assert!(cond_is(&wf, "Ready", "True", "Ready"), "{:?}", wf.status);
}

#[tokio::test]
async fn with_istio_load_status_a_pod_whose_agent_comes_up_late_is_looked_at_again() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("istio-late");
    let n = &ns.name;
    let op = operator_with(n, &["--istio-load-status"]).await;
    // The pod exists (with its IP and the agent's status port) before its agent answers, as
    // a new pod does while istio-agent starts.
    let status = free_port();
    register_pod_at(n, "late", status, "1.39.3");
    let ok = format!("{}/istio/{n}:ok", env.registry);
    push_module(&ok, wasm(&variant("ok", &format!("ok-{n}")))).await;
    Filter::new(n, "late", &ok).app("late").apply();
    let wf = wait_status(&client, n, "late", "its agent not answering", |wf| {
        cond_is(wf, "Loaded", "Unknown", "ProxyMetricsUnread")
    })
    .await;
    assert_eq!(first_pod(&wf).loaded, None);

    // The agent comes up; nothing about the pod, the filter or its child changes, and the
    // resync is minutes away (300 s): only the operator's own second look can see it.
    let (late, _backend) = gateway_with_status_port(n, "late", &[op.cache_port], status).await;
    wait_headers(&late, "the module", &["ok"]).await;
    wait_pod_loaded(&client, n, "late").await;
}
