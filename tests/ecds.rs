//! Plain Envoys over ECDS: real Envoys (1.36.2 and 1.40.0, state of the world and delta)
//! connected to the operator's `--xds-listen` port, configured from the README's bootstrap
//! (`examples/ecds-bootstrap.yaml`) with the entry `wasmfilter ecds-entry` prints. Every
//! assertion is what a user sees: a response header through Envoy, Envoy's own counters, or
//! the WasmFilter's status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::ecds::*;
use support::*;

const OLD: &str = "1.36.2";
const NEW: &str = "1.40.0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_load_the_filter_and_take_config_and_image_changes_live() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-live");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "sotw", "web", "v1.36.2"));
    apply_ok(&envoy_pod_yaml(n, "delta", "web", "v1.40.0"));
    let (_op, xds) = operator(n).await;
    let v1 = format!("{}/ecds/{n}:v1", env.registry);
    push_module(&v1, wasm(&variant("on", &format!("one-{n}")))).await;
    ecds_filter(n, "hdr", &v1, "hello").apply();
    let filters = [format!("{n}/hdr")];
    // Old Envoy over state of the world, new Envoy over delta, each naming its pod its own way.
    let old = Envoy::start_ecds(
        OLD,
        &EcdsNode {
            metadata: false,
            ..node(n, "sotw", &filters, false, xds)
        },
    );
    let new = Envoy::start_ecds(NEW, &node(n, "delta", &filters, true, xds));
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter-config", Some(r#"{"greeting":"hello"}"#), 200)
            .await;
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    let wf = wait_status(&client, n, "hdr", "both proxies loaded", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded") && cond_is(wf, "Ready", "True", "Ready")
    })
    .await;
    let s = wf.status.as_ref().unwrap();
    assert_eq!(
        (s.selected_workloads, s.loaded_workloads),
        (Some(2), Some(2))
    );
    for (pod, version) in [("sotw", OLD), ("delta", NEW)] {
        let w = workload(&wf, pod).unwrap();
        assert_eq!(w.loaded, Some(true), "{w:?}");
        assert_eq!(
            w.version_source, "xds-node",
            "the node's own report beats the image tag"
        );
        assert_eq!(w.envoy_version.as_deref(), Some(version));
    }
    let wide = stdout(&kubectl(&["get", "wf", "hdr", "-n", n, "-o", "wide"]));
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("SELECTED"), col("LOADED")), ("2", "2"), "{wide}");

    // A config change reaches both without a restart.
    ecds_filter(n, "hdr", &v1, "again").apply();
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter-config", Some(r#"{"greeting":"again"}"#), 200)
            .await;
    }
    // So does a new module.
    let v2 = format!("{}/ecds/{n}:v2", env.registry);
    push_module(&v2, wasm(&variant("v2", &format!("two-{n}")))).await;
    ecds_filter(n, "hdr", &v2, "again").apply();
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter", Some("v2"), 200).await;
    }
    wait_status(&client, n, "hdr", "both loaded v2", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
            && wf.status.as_ref().unwrap().loaded_workloads == Some(2)
    })
    .await;
    for e in [&old, &new] {
        assert_eq!(
            e.stat(&format!(
                "extension_config_discovery.http_filter.{n}/hdr.config_fail"
            ))
            .await,
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_an_envoy_would_refuse_is_never_sent_to_it() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-abi");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "old", "web", "v1.36.2"));
    apply_ok(&envoy_pod_yaml(n, "new", "web", "v1.40.0"));
    let (_op, xds) = operator(n).await;
    let good = format!("{}/ecds/{n}:good", env.registry);
    push_module(&good, wasm(&variant("on", &format!("good-{n}")))).await;
    ecds_filter(n, "hdr", &good, "hello").apply();
    let filters = [format!("{n}/hdr")];
    let old = Envoy::start_ecds(OLD, &node(n, "old", &filters, true, xds));
    let new = Envoy::start_ecds(NEW, &node(n, "new", &filters, false, xds));
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    let rejected = format!("extension_config_discovery.http_filter.{n}/hdr.update_rejected");
    let updated = format!("extension_config_discovery.http_filter.{n}/hdr.update_success");
    let old_updates = old.stat(&updated).await;

    // Block (the default): 1.36.2 would refuse the new module, so no node gets it.
    let newer = format!("{}/ecds/{n}:needs-1-39", env.registry);
    push_module(&newer, needs_1_39("v3", &format!("new-{n}"))).await;
    ecds_filter(n, "hdr", &newer, "hello").apply();
    let wf = wait_status(&client, n, "hdr", "blocked", |wf| {
        cond_is(wf, "Ready", "False", "Incompatible")
    })
    .await;
    let w = workload(&wf, "old").unwrap();
    assert_eq!(
        (w.compatible, w.version_source.as_str()),
        (Some(false), "xds-node")
    );
    assert!(w.reasons[0].contains("fd_pread"), "{w:?}");
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }

    // Warn: the Envoy that loads it gets it; the one that would refuse it keeps what it had.
    ecds_filter(n, "hdr", &newer, "hello")
        .on_incompatible(OnIncompatible::Warn)
        .apply();
    new.wait_header("x-wasmfilter", Some("v3"), 200).await;
    let wf = wait_status(&client, n, "hdr", "warned and loaded where it can", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;
    let w = workload(&wf, "old").unwrap();
    assert_eq!(w.loaded, Some(false));
    let err = w.load_error.as_deref().unwrap();
    assert!(
        err.starts_with("not sent: Envoy 1.36.2 would refuse the module")
            && err.contains("fd_pread"),
        "{err}"
    );
    assert_eq!(workload(&wf, "new").unwrap().loaded, Some(true));
    assert!(
        condition(&wf, "Loaded")
            .unwrap()
            .message
            .contains("not sent to 1 whose Envoy would refuse it (old)"),
        "{:?}",
        condition(&wf, "Loaded")
    );
    old.wait_header("x-wasmfilter", Some("on"), 200).await;
    // Never sent: the old Envoy neither rejected nor took any update since.
    assert_eq!(old.stat(&rejected).await, 0);
    assert_eq!(old.stat(&updated).await, old_updates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_envoy_refuses_to_load_keeps_the_previous_one_serving_and_says_why() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-nack");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "p-old", "web", "v1.36.2"));
    apply_ok(&envoy_pod_yaml(n, "p-new", "web", "v1.40.0"));
    // Without the pre-flight, which would refuse this module before any Envoy saw it
    // (tests/preflight.rs): what a module that fails only in Envoy looks like.
    let (_op, xds) = operator_with(n, &["--preflight=false"]).await;
    let good = format!("{}/ecds/{n}:good", env.registry);
    push_module(&good, wasm(&variant("on", &format!("good-{n}")))).await;
    ecds_filter(n, "hdr", &good, "hello").apply();
    let filters = [format!("{n}/hdr")];
    let old = Envoy::start_ecds(OLD, &node(n, "p-old", &filters, false, xds));
    let new = Envoy::start_ecds(NEW, &node(n, "p-new", &filters, true, xds));
    wait_status(&client, n, "hdr", "loaded", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;

    // The ABI check passes (the module is well formed); only running it tells.
    let bad = format!("{}/ecds/{n}:bad", env.registry);
    push_module(&bad, configure_fails(&format!("bad-{n}"))).await;
    ecds_filter(n, "hdr", &bad, "hello").apply();
    let wf = wait_status(&client, n, "hdr", "both refused it", |wf| {
        cond_is(wf, "Loaded", "False", "LoadFailed") && cond_is(wf, "Ready", "False", "LoadFailed")
    })
    .await;
    for pod in ["p-old", "p-new"] {
        let w = workload(&wf, pod).unwrap();
        assert_eq!(w.loaded, Some(false), "{w:?}");
        assert_eq!(
            w.load_error.as_deref(),
            Some(format!("Unable to create Wasm plugin {n}/hdr").as_str()),
            "Envoy's own words"
        );
    }
    let msg = &condition(&wf, "Loaded").unwrap().message;
    assert!(
        msg.starts_with("2 of 2 connected proxies did not load module"),
        "{msg}"
    );
    assert!(msg.contains("keeps the config it had"), "{msg}");
    assert_eq!(wf.status.as_ref().unwrap().loaded_workloads, Some(0));
    for e in [&old, &new] {
        // Envoy says it refused it, and the previous module keeps answering.
        assert!(
            e.stat(&format!(
                "extension_config_discovery.http_filter.{n}/hdr.update_rejected"
            ))
            .await
                >= 1
        );
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
        assert!(e.logs().contains("Failed to configure base Wasm plugin"));
    }

    // Back to a good module: loaded again.
    ecds_filter(n, "hdr", &good, "fixed").apply();
    for e in [&old, &new] {
        e.wait_header("x-wasmfilter-config", Some(r#"{"greeting":"fixed"}"#), 200)
            .await;
    }
    wait_status(&client, n, "hdr", "loaded again", |wf| {
        cond_is(wf, "Ready", "True", "Ready")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_envoy_restarts_neither_drop_nor_reload_filters() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-restart");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "a", "web", "v1.40.0"));
    apply_ok(&envoy_pod_yaml(n, "b", "web", "v1.36.2"));
    let (op, xds) = operator(n).await;
    let image = format!("{}/ecds/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("on", &format!("r-{n}")))).await;
    ecds_filter(n, "hdr", &image, "hello").apply();
    let filters = [format!("{n}/hdr")];
    let sotw = Envoy::start_ecds(NEW, &node(n, "a", &filters, false, xds));
    let mut delta = Envoy::start_ecds(OLD, &node(n, "b", &filters, true, xds));
    for e in [&sotw, &delta] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    wait_status(&client, n, "hdr", "loaded", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;
    let reload = format!("extension_config_discovery.http_filter.{n}/hdr.config_reload");
    let fail = format!("extension_config_discovery.http_filter.{n}/hdr.config_fail");
    let before = (sotw.stat(&reload).await, delta.stat(&reload).await);

    // The operator goes away: Envoys keep serving what they have.
    let cache = op.take_cache_dir();
    for e in [&sotw, &delta] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    // It comes back on the same port (and cache): the Envoys reconnect and are re-sent the same
    // config, which neither reloads nor fails.
    let op =
        Operator::start_with_cache(n, &["--xds-listen", &format!("127.0.0.1:{xds}")], cache).await;
    wait_for(
        "both proxies back on the ECDS server",
        Duration::from_secs(30),
        || async {
            let logs = op.logs();
            (logs.matches("ECDS stream opened").count() >= 2
                && logs.matches("Envoy loaded the filter (ACK)").count() >= 2)
                .then_some(())
        },
    )
    .await;
    wait_status(&client, n, "hdr", "loaded after the restart", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
            && wf.status.as_ref().unwrap().loaded_workloads == Some(2)
    })
    .await;
    assert_eq!(
        (sotw.stat(&reload).await, delta.stat(&reload).await),
        before
    );
    assert_eq!((sotw.stat(&fail).await, delta.stat(&fail).await), (0, 0));
    for e in [&sotw, &delta] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }

    // An Envoy that restarts gets the current state.
    delta.kill();
    let delta = Envoy::start_ecds(OLD, &node(n, "b", &filters, true, xds));
    delta.wait_header("x-wasmfilter", Some("on"), 200).await;
    wait_status(&client, n, "hdr", "loaded by the restarted Envoy", |wf| {
        workload(wf, "b").is_some_and(|w| w.loaded == Some(true))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_filters_unknown_pods_and_proxies_that_do_not_subscribe() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-edges");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "keeps", "web", "v1.40.0"));
    apply_ok(&envoy_pod_yaml(n, "drops", "web", "v1.40.0"));
    apply_ok(&envoy_pod_yaml(n, "elsewhere", "web", "v1.40.0"));
    let (op, xds) = operator(n).await;
    let image = format!("{}/ecds/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("on", &format!("e-{n}")))).await;
    ecds_filter(n, "hdr", &image, "hello").apply();
    let ours = [format!("{n}/hdr")];
    let other = [format!("{n}/something-else")];
    apply_ok(&envoy_pod_yaml(n, "falls-back", "web", "v1.40.0"));
    let sotw = Envoy::start_ecds(NEW, &node(n, "keeps", &ours, false, xds));
    let delta = Envoy::start_ecds(NEW, &node(n, "drops", &ours, true, xds));
    // Its bootstrap entry carries a default_config: the same filter answering "df".
    let fallback = Envoy::start_ecds(
        NEW,
        &EcdsNode {
            default_module: Some(wasm(&variant("df", &format!("df-{n}")))),
            ..node(n, "falls-back", &ours, true, xds)
        },
    );
    // Selected, connected, but its bootstrap asks for another name.
    let _unsubscribed = Envoy::start_ecds(NEW, &node(n, "elsewhere", &other, true, xds));
    // Names a pod that does not exist.
    let ghost = Envoy::start_ecds(NEW, &node(n, "ghost", &ours, true, xds));
    for e in [&sotw, &delta, &fallback] {
        e.wait_header("x-wasmfilter", Some("on"), 200).await;
    }
    // (Two proxies do not subscribe: "drops" may be the first one heard of.)
    let wf = wait_status(&client, n, "hdr", "the unsubscribed proxy reported", |wf| {
        cond_is(wf, "Loaded", "False", "NotSubscribed")
            && workload(wf, "elsewhere").is_some_and(|w| w.loaded.is_some())
    })
    .await;
    let w = workload(&wf, "elsewhere").unwrap();
    assert_eq!(w.loaded, Some(false), "{:#?}\n{}", wf.status, op.logs());
    let err = w.load_error.as_deref().unwrap();
    assert!(
        err.contains(&format!("subscribes to no ECDS filter named \"{n}/hdr\""))
            && err.contains(&format!("wasmfilter ecds-entry {n}/hdr")),
        "{err}"
    );
    // The ghost gets nothing: it is told the filter does not exist for it (Envoy accepts that
    // answer, loads no config, and keeps its listener warming: it serves nothing).
    let heard = format!("extension_config_discovery.http_filter.{n}/hdr.update_success");
    let loaded = format!("extension_config_discovery.http_filter.{n}/hdr.config_reload");
    wait_for(
        "the ghost to hear back",
        Duration::from_secs(20),
        || async { (ghost.try_stat(&heard).await >= Some(1)).then_some(()) },
    )
    .await;
    assert_eq!(ghost.stat(&loaded).await, 0);
    assert!(ghost.get().await.is_none(), "its listener is still warming");
    wait_for(
        "the unknown pod logged",
        Duration::from_secs(10),
        || async {
            op.logs()
                .contains("naming a pod that does not exist")
                .then_some(())
        },
    )
    .await;
    assert!(workload(&wf, "ghost").is_none());

    // Deleted: a delta Envoy is told it is gone: without a default_config its listener answers
    // 500, with one it runs the default; state of the world cannot take one filter away, so that
    // Envoy keeps the last config.
    kubectl(&["delete", "wasmfilter", "hdr", "-n", n]);
    delta.wait_header("x-wasmfilter", None, 500).await;
    fallback.wait_header("x-wasmfilter", Some("df"), 200).await;
    sotw.wait_header("x-wasmfilter", Some("on"), 200).await;
    assert_eq!(
        op.logs()
            .matches("naming a pod that does not exist")
            .count(),
        1,
        "logged once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecds_port_can_serve_tls() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-tls");
    let n = &ns.name;
    let dir = tempfile::tempdir().unwrap();
    let pki = registries::Pki::new(dir.path());
    apply_ok(&envoy_pod_yaml(n, "tls", "web", "v1.40.0"));
    let xds = free_port();
    let _op = Operator::start(
        n,
        &[
            "--xds-listen",
            &format!("127.0.0.1:{xds}"),
            "--xds-tls-cert",
            pki.server_cert.to_str().unwrap(),
            "--xds-tls-key",
            pki.server_key.to_str().unwrap(),
        ],
    )
    .await;
    let image = format!("{}/ecds/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("ok", &format!("tls-{n}")))).await;
    ecds_filter(n, "hdr", &image, "hello").apply();
    let filters = [format!("{n}/hdr")];
    let e = Envoy::start_ecds(
        NEW,
        &EcdsNode {
            tls_ca: Some(pki.ca_cert.clone()),
            ..node(n, "tls", &filters, false, xds)
        },
    );
    e.wait_header("x-wasmfilter", Some("ok"), 200).await;
    wait_status(&client, n, "hdr", "loaded over TLS", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;
    let connected =
        format!("extension_config_discovery.http_filter.{n}/hdr.control_plane.connected_state");
    assert_eq!(e.stat(&connected).await, 1);
    // A plain-text client never gets a stream.
    let plain = Envoy::start_ecds(NEW, &node(n, "tls", &filters, false, xds));
    wait_for(
        "the plain-text Envoy to try",
        Duration::from_secs(20),
        || async {
            (plain
                .try_stat("cluster.wasmfilter_xds.upstream_cx_total")
                .await
                >= Some(1))
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(plain.stat(&connected).await, 0);
    assert!(
        plain
            .get()
            .await
            .is_none_or(|(_, h)| h.get("x-wasmfilter").is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_filters_are_served_too() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ecds-l4");
    let n = &ns.name;
    apply_ok(&envoy_pod_yaml(n, "l4", "web", "v1.40.0"));
    let (_op, xds) = operator(n).await;
    let image = format!("{}/ecds/{n}:v1", env.registry);
    push_module(&image, wasm(&variant("on", &format!("l4-{n}")))).await;
    ecds_filter(n, "tcp", &image, "hello")
        .edit(|spec| spec.filter_type = wasmfilter::api::FilterType::Network)
        .apply();
    let name = format!("{n}/tcp");
    let e = Envoy::start_ecds(
        NEW,
        &EcdsNode {
            network_filter: Some(&name),
            ..node(n, "l4", &[], true, xds)
        },
    );
    let wf = wait_status(&client, n, "tcp", "the network filter loaded", |wf| {
        cond_is(wf, "Loaded", "True", "Loaded")
    })
    .await;
    assert_eq!(workload(&wf, "l4").unwrap().loaded, Some(true));
    // The counter lives under network_filter: Envoy took it as a network filter. (Under load it
    // has read 2 in a run whose operator log shows one send and one ACK, so the count is
    // Envoy's own and not asserted.)
    let loaded = format!("extension_config_discovery.network_filter.{name}.config_reload");
    assert!(
        e.stat(&loaded).await >= 1,
        "Envoy counted it as a network filter"
    );
    // Traffic flows through the TCP listener whose chain holds it.
    let r = reqwest::get(format!("http://127.0.0.1:{}/", e.tcp_port.unwrap()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_readme_shows_the_bootstrap_the_tests_run() {
    let readme = include_str!("../README.md");
    let bootstrap = include_str!("../examples/ecds-bootstrap.yaml");
    assert!(
        readme.contains(bootstrap.trim_end()),
        "README.md must quote examples/ecds-bootstrap.yaml verbatim"
    );
    // The entry in it is the one the CLI prints.
    let b: serde_json::Value = serde_norway::from_str(bootstrap).unwrap();
    let entry = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0];
    assert_eq!(*entry, ecds_entry(&["shop/add-header"]));
}
