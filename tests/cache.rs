//! Tags that move, and a module cache users can trust: verified on start and before serving,
//! refilled on demand, bounded without ever evicting a module in use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime};

use support::*;
use wasmfilter::cache::sha256_hex;

fn set_old(path: &std::path::Path) {
    let t = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .append(true)
        .open(path)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_is_deployed_only_after_its_new_module_passes_every_check() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("tagmove");
    let op = Operator::start(&ns.name, &["--resync-seconds", "1"]).await;
    let image = format!("{}/tagmove/{}:stable", env.registry, ns.name);
    let first = module("tagmove-first");
    let first_digest = push_module(&image, first.clone()).await;
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::Always)
        .apply();
    wait_module(&client, &ns.name, "f", &sha256_hex(&first)).await;
    // No --cache-max-bytes: the cache's size is reported all the same.
    wait_for("the cache size metric", Duration::from_secs(10), || async {
        (op.metric("wasmfilter_cache_bytes").await == first.len() as f64).then_some(())
    })
    .await;
    let children = child_api(&client, &ns.name, "WasmPlugin");

    // The tag moves to something that is not a module: refused, the child keeps the first.
    push_raw(
        &image,
        "application/vnd.module.wasm.config.v1+json",
        &[(
            b"#!/bin/sh\necho not wasm\n",
            "application/vnd.module.wasm.content.layer.v1+wasm",
        )],
    )
    .await;
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, "NotAWasmArtifact");
    let child = children.get("f").await.unwrap();
    assert!(child.data.to_string().contains(&sha256_hex(&first)));

    // Then to a good module: deployed, with old and new digest in status and an Event.
    let second = module("tagmove-second");
    let second_digest = push_module(&image, second.clone()).await;
    let wf = wait_module(&client, &ns.name, "f", &sha256_hex(&second)).await;
    let artifact = wf.status.as_ref().unwrap().artifact.clone().unwrap();
    assert_eq!(artifact.manifest_digest, second_digest);
    assert_eq!(
        artifact.previous_manifest_digest.as_deref(),
        Some(first_digest.as_str())
    );
    assert!(
        condition(&wf, "Resolved")
            .unwrap()
            .message
            .contains(&format!("the tag moved from {first_digest}")),
    );
    let child = children.get("f").await.unwrap();
    assert!(child.data.to_string().contains(&sha256_hex(&second)));
    let moved = wait_for("a TagMoved Event", Duration::from_secs(10), || async {
        events(&ns.name, "f", "Normal")
            .into_iter()
            .find(|(reason, _)| reason == "TagMoved")
    })
    .await;
    assert!(
        moved.1.contains(&first_digest) && moved.1.contains(&second_digest),
        "{}",
        moved.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_module_is_fetched_again_on_demand_and_never_served() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ondemand");
    let op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/ondemand/{}:v1", env.registry, ns.name);
    let m = module("ondemand");
    let sha = sha256_hex(&m);
    push_module(&image, m.clone()).await;
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    wait_module(&client, &ns.name, "f", &sha).await;
    let url = format!(
        "http://127.0.0.1:{}/modules/sha256/{sha}.wasm",
        op.cache_port
    );
    let get = || async { reqwest::get(&url).await.unwrap() };
    assert_eq!(get().await.bytes().await.unwrap().to_vec(), m);
    let misses = op.metric("wasmfilter_cache_misses_total").await;

    // Bit rot (or tampering) on disk: the bad bytes are never served; the module is fetched
    // again from the registry and served.
    let path = op.cached_module_path(&sha);
    let mut rotten = m.clone();
    rotten[20] ^= 0x55;
    std::fs::write(&path, &rotten).unwrap();
    let resp = get().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), m);
    assert_eq!(std::fs::read(&path).unwrap(), m);

    // A replica that never had it (here: the file is gone) fetches it too.
    std::fs::remove_file(&path).unwrap();
    let resp = get().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), m);
    assert!(op.metric("wasmfilter_cache_misses_total").await >= misses + 2.0);

    // When the registry cannot give it back either, the proxy is told to come back later.
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(env.blob_path(&sha)).unwrap();
    let resp = get().await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert!(!path.exists(), "nothing half-fetched is left to serve");

    // A module nobody deploys is a plain 404.
    let unknown = format!(
        "http://127.0.0.1:{}/modules/sha256/{}.wasm",
        op.cache_port,
        "0".repeat(64)
    );
    assert_eq!(reqwest::get(&unknown).await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_drops_corrupt_modules_and_fetches_them_again() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("restart");
    let op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/restart/{}:v1", env.registry, ns.name);
    let m = module("restart");
    let sha = sha256_hex(&m);
    push_module(&image, m.clone()).await;
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    wait_module(&client, &ns.name, "f", &sha).await;
    let path = op.cached_module_path(&sha);
    let cache_dir = op.take_cache_dir();
    std::fs::write(&path, b"\0asm\x01\0\0\0 not the module any more").unwrap();

    let op = Operator::start_with_cache(&ns.name, &[], cache_dir).await;
    assert!(
        op.logs().contains("dropped corrupt or stray files"),
        "{}",
        op.logs()
    );
    wait_for(
        "the module back in the cache",
        Duration::from_secs(30),
        || async { (std::fs::read(&path).ok()? == m).then_some(()) },
    )
    .await;
    wait_module(&client, &ns.name, "f", &sha).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_bounded_but_never_removes_a_module_in_use() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("evict");
    let cache_dir = tempfile::tempdir().unwrap();
    // A module left from long ago that nothing uses any more.
    let stale = module("evict-stale");
    let stale_path = cache_dir
        .path()
        .join("modules/sha256")
        .join(format!("{}.wasm", sha256_hex(&stale)));
    std::fs::create_dir_all(stale_path.parent().unwrap()).unwrap();
    std::fs::write(&stale_path, &stale).unwrap();
    set_old(&stale_path);

    let op = Operator::start_with_cache(&ns.name, &["--cache-max-bytes", "1"], cache_dir).await;
    let a = module("evict-a");
    let a_image = format!("{}/evict/{}-a:v1", env.registry, ns.name);
    push_module(&a_image, a.clone()).await;
    Filter::new(&ns.name, "a", &a_image)
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    wait_module(&client, &ns.name, "a", &sha256_hex(&a)).await;
    // The pull's eviction pass removed the stale module.
    wait_for(
        "the stale module evicted",
        Duration::from_secs(10),
        || async { (!stale_path.exists()).then_some(()) },
    )
    .await;

    // Module a, in use, grows old; another pull runs an eviction pass: a stays, over the bound.
    let a_path = op.cached_module_path(&sha256_hex(&a));
    set_old(&a_path);
    let b = module("evict-b");
    let b_image = format!("{}/evict/{}-b:v1", env.registry, ns.name);
    push_module(&b_image, b.clone()).await;
    Filter::new(&ns.name, "b", &b_image)
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    wait_module(&client, &ns.name, "b", &sha256_hex(&b)).await;
    // The pass after b's pull has run once the size it reports holds both.
    let both = (a.len() + b.len()) as f64;
    wait_for(
        "the eviction pass after b's pull",
        Duration::from_secs(10),
        || async { (op.metric("wasmfilter_cache_bytes").await == both).then_some(()) },
    )
    .await;
    assert!(a_path.exists(), "a module in use was evicted");
    assert!(op.cached_module_path(&sha256_hex(&b)).exists());
    assert!(op.metric("wasmfilter_cache_evictions_total").await >= 1.0);
    assert!(
        op.logs()
            .contains("modules in use exceed --cache-max-bytes"),
        "{}",
        op.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_sharing_a_module_download_it_once() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("once");
    let image = format!("{}/once/{}:v1", env.registry, ns.name);
    let m = module("shared-once");
    push_module(&image, m.clone()).await;
    // The filters exist before the operator starts, so its first reconciles of them run at
    // once (and would each download the module without taking turns).
    const FILTERS: usize = 8;
    for i in 0..FILTERS {
        Filter::new(&ns.name, &format!("f{i}"), &image).apply();
    }
    let op = Operator::start(&ns.name, &[]).await;
    for i in 0..FILTERS {
        wait_module(&client, &ns.name, &format!("f{i}"), &sha256_hex(&m)).await;
    }
    assert_eq!(op.metric("wasmfilter_cache_misses_total").await, 1.0);
    // Each still resolved the tag itself.
    assert_eq!(
        op.metric("wasmfilter_module_pulls_total{result=\"pulled\"}")
            .await,
        FILTERS as f64
    );
}
