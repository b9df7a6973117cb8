//! The operator binary against the real API server, registry and Envoy: what a user sees after
//! `kubectl apply` of a WasmFilter, for good modules and for every kind of bad one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{DeleteParams, DynamicObject};
use support::registries::{Fault, FaultProxy};
use support::*;
use wasmfilter::api::WasmFilter;
use wasmfilter::cache::sha256_hex;

fn cache_url(op: &Operator, sha: &str) -> String {
    format!(
        "http://127.0.0.1:{}/modules/sha256/{sha}.wasm",
        op.cache_port
    )
}

#[tokio::test]
async fn wasm_plugin_points_at_the_cached_module_and_is_collected_with_its_filter() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("wp");
    let op = Operator::start(&ns.name, &[]).await;
    let module = module("wasm-plugin");
    let image = format!("{}/filters/wp-{}:v1", env.registry, ns.name);
    let manifest_digest = push_module(&image, module.clone()).await;

    // No `target`: WasmPlugin is the default.
    apply_ok(
        &Filter::new(&ns.name, "add-header", &image)
            .config(json!({"greeting": "hello"}))
            .yaml_without("target"),
    );
    let out = kubectl(&[
        "wait",
        "--for=condition=Ready",
        "wf/add-header",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);
    assert!(
        out.status.success(),
        "kubectl wait: {}\n{}",
        stderr(&out),
        op.logs()
    );

    let table = stdout(&kubectl(&["get", "wf", "-n", &ns.name]));
    let short = &manifest_digest["sha256:".len().."sha256:".len() + 12];
    assert!(
        table.contains("READY") && table.contains("DIGEST") && table.contains("ABI"),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with("add-header")).unwrap();
    for cell in ["True", "WasmPlugin", short, "0.2.1"] {
        assert!(
            row.contains(cell),
            "`kubectl get wf` row lacks {cell}: {row}"
        );
    }

    let sha = sha256_hex(&module);
    let wf: WasmFilter = Api::namespaced(client.clone(), &ns.name)
        .get("add-header")
        .await
        .unwrap();
    let artifact = wf.status.as_ref().unwrap().artifact.clone().unwrap();
    assert_eq!(artifact.manifest_digest, manifest_digest);
    assert_eq!(artifact.module_sha256, sha);
    assert_eq!(artifact.format, "solo-oci");
    assert_eq!(artifact.size, module.len() as u64);

    let wp = child_api(&client, &ns.name, "WasmPlugin")
        .get("add-header")
        .await
        .unwrap();
    assert_eq!(
        wp.data["spec"]["url"],
        format!("{CACHE_URL}/modules/sha256/{sha}.wasm")
    );
    assert_eq!(wp.data["spec"]["sha256"], sha);
    assert_eq!(wp.data["spec"]["pluginName"], "add_header");
    assert_eq!(wp.data["spec"]["pluginConfig"]["greeting"], "hello");
    assert_eq!(wp.data["spec"]["selector"]["matchLabels"]["app"], "web");
    let owner = &wp.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("WasmFilter", Some(true))
    );
    // One field manager, server-side apply, for the child and for the filter's status.
    let managers = |fields: &Option<
        Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry>,
    >,
                    subresource: Option<&str>| {
        fields
            .iter()
            .flatten()
            .filter(|m| m.subresource.as_deref() == subresource)
            .map(|m| {
                (
                    m.manager.clone().unwrap_or_default(),
                    m.operation.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let ours = vec![("wasmfilter.dev/operator".to_string(), "Apply".to_string())];
    assert_eq!(managers(&wp.metadata.managed_fields, None), ours);
    assert_eq!(managers(&wf.metadata.managed_fields, Some("status")), ours);
    // It never writes a WasmFilter's spec or metadata, so GitOps tools see no drift: only
    // kubectl (the user) manages the main resource.
    let main = managers(&wf.metadata.managed_fields, None);
    assert!(
        !main.is_empty() && main.iter().all(|(m, _)| m.starts_with("kubectl")),
        "{main:?}"
    );

    // The cache serves exactly those bytes, with HEAD, ETag and ranges.
    let http = reqwest::Client::new();
    let r = http.get(cache_url(&op, &sha)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"sha256:{sha}\""));
    assert_eq!(r.headers()["content-type"], "application/wasm");
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
    let r = http.head(cache_url(&op, &sha)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        module.len().to_string().as_str()
    );
    let r = http
        .get(cache_url(&op, &sha))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = http
        .get(cache_url(&op, &sha))
        .header("range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], b"\0asm");
    let r = http
        .get(cache_url(&op, &"0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!(
            "http://127.0.0.1:{}/modules/sha256/..%2F..%2Fetc%2Fpasswd.wasm",
            op.cache_port
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Deleting the filter garbage-collects its child (kube-controller-manager's collector).
    let out = kubectl(&["delete", "wf/add-header", "-n", &ns.name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let wps = child_api(&client, &ns.name, "WasmPlugin");
    wait_for(
        "WasmPlugin garbage-collected",
        Duration::from_secs(60),
        || async { matches!(wps.get_opt("add-header").await, Ok(None)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn envoy_filter_patch_loads_in_real_envoy_and_acts_on_requests() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("ef");
    let op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/filters/ef-{}:v1", env.registry, ns.name);
    push_module(&image, module("envoy-filter")).await;
    Filter::new(&ns.name, "add-header", &image)
        .target(Target::EnvoyFilter)
        .config(json!({"greeting": "hello"}))
        .apply();
    wait_condition(&client, &ns.name, "add-header", "Ready", "True").await;

    let ef = child_api(&client, &ns.name, "EnvoyFilter")
        .get("add-header")
        .await
        .unwrap();
    let patch = &ef.data["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["patch"]["operation"], "INSERT_BEFORE");
    let filter = patch["patch"]["value"].clone();
    let remote = &filter["typed_config"]["config"]["vm_config"]["code"]["remote"];
    let cluster = remote["http_uri"]["cluster"].as_str().unwrap().to_string();
    assert_eq!(
        cluster,
        "outbound|8080||wasmfilter-cache.wasmfilter-system.svc.cluster.local"
    );

    for version in &env.envoy_versions {
        let envoy = Envoy::start(version, &filter, &cluster, op.cache_port);
        envoy.wait_live().await;
        let r = reqwest::get(format!("http://127.0.0.1:{}/", envoy.listen_port))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "envoy {version}:\n{}", envoy.logs());
        assert_eq!(
            r.headers().get("x-wasmfilter").map(|v| v.to_str().unwrap()),
            Some("on"),
            "envoy {version} did not run the filter:\n{}",
            envoy.logs()
        );
        assert_eq!(
            r.headers()["x-wasmfilter-config"],
            r#"{"greeting":"hello"}"#
        );
        assert_eq!(r.text().await.unwrap(), "hello from envoy\n");
    }
}

/// Every bad module gives `Ready=False` with its own reason and a Warning Event, and no child.
#[tokio::test]
async fn bad_modules_are_reported_and_never_deployed() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("bad");
    let op = Operator::start(&ns.name, &[]).await;
    let repo = format!("{}/filters/bad-{}", env.registry, ns.name);

    // A blob whose bytes no longer match its digest: corrupt it in the registry's storage.
    let corrupt = module("corrupt-blob");
    let corrupt_sha = sha256_hex(&corrupt);
    push_module(&format!("{repo}/corrupt:v1"), corrupt.clone()).await;
    let data = env.blob_path(&corrupt_sha);
    let mut tampered = corrupt.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 0xff;
    std::fs::write(&data, &tampered).unwrap();

    push_raw(
        &format!("{repo}/text:v1"),
        "application/vnd.module.wasm.config.v1+json",
        &[(
            b"this is not wasm",
            "application/vnd.module.wasm.content.layer.v1+wasm",
        )],
    )
    .await;
    push_raw(
        &format!("{repo}/image:v1"),
        "application/vnd.oci.image.config.v1+json",
        &[(b"layer", "application/vnd.oci.image.layer.v1.tar")],
    )
    .await;
    let good = module("pinned");
    push_module(&format!("{repo}/pinned:v1"), good).await;
    // A manifest whose module layer claims a negative size (the registry stores it as sent).
    push_module(&format!("{repo}/negative:v1"), module("negative")).await;
    let repository = repo.split_once('/').unwrap().1;
    let mut manifest = get_manifest(&env.registry, &format!("{repository}/negative"), "v1").await;
    manifest["layers"][0]["size"] = (-1).into();
    put_manifest(
        &env.registry,
        &format!("{repository}/negative"),
        "v2",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().into_bytes(),
    )
    .await;
    let down = format!("127.0.0.1:{}/filters/x:v1", free_port());

    let cases = [
        (
            "missing-tag",
            format!("{repo}/corrupt:nope"),
            "ManifestNotFound",
            "not found",
        ),
        (
            "registry-down",
            down,
            "RegistryUnavailable",
            "could not be reached",
        ),
        (
            "not-wasm",
            format!("{repo}/text:v1"),
            "NotAWasmArtifact",
            "Wasm magic",
        ),
        (
            "not-a-wasm-artifact",
            format!("{repo}/image:v1"),
            "NotAWasmArtifact",
            "application/vnd.oci.image.layer.v1.tar",
        ),
        (
            "negative-size",
            format!("{repo}/negative:v2"),
            "InvalidManifest",
            "negative size (-1)",
        ),
        (
            "corrupt",
            format!("{repo}/corrupt:v1"),
            "BlobDigestMismatch",
            "does not match",
        ),
        (
            "wrong-pin",
            format!("{repo}/pinned:v1"),
            "ModuleSha256Mismatch",
            "does not match spec.module.sha256",
        ),
    ];
    for (name, image, _, _) in &cases {
        let mut filter = Filter::new(&ns.name, name, image).config(json!({"greeting": "hello"}));
        if *name == "wrong-pin" {
            filter = filter.sha256(&"0".repeat(64));
        }
        filter.apply();
    }
    let wps = child_api(&client, &ns.name, "WasmPlugin");
    for (name, _, reason, words) in &cases {
        let wf = wait_condition(&client, &ns.name, name, "Ready", "False").await;
        let ready = condition(&wf, "Ready").unwrap();
        assert_eq!(ready.reason, *reason, "{name}: {}", ready.message);
        assert!(
            ready.message.contains(words),
            "{name}: {:?} lacks {words:?}",
            ready.message
        );
        assert_eq!(condition(&wf, "Resolved").unwrap().status, "False");
        assert_eq!(condition(&wf, "Deployed").unwrap().status, "False");
        assert!(wf.status.as_ref().unwrap().artifact.is_none(), "{name}");
        assert!(
            wps.get_opt(name).await.unwrap().is_none(),
            "{name}: a child was written"
        );
        wait_for(
            &format!("{name}: Warning Event {reason}"),
            Duration::from_secs(30),
            || async {
                warning_events(&ns.name, name)
                    .iter()
                    .any(|(r, _)| r == reason)
                    .then_some(())
            },
        )
        .await;
    }
    // A corrupt blob is never served from the cache either.
    let r = reqwest::get(cache_url(&op, &corrupt_sha)).await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
}

/// Every accepted artifact format deploys, and status names the format it was found in.
#[tokio::test]
async fn every_artifact_format_is_accepted() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("formats");
    let op = Operator::start(&ns.name, &[]).await;
    let repo = format!("{}/filters/formats-{}", env.registry, ns.name);
    let cases = [
        (
            "cncf",
            "application/vnd.wasm.config.v0+json",
            "application/wasm",
            false,
        ),
        (
            "wasm-to-oci",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.wasm.content.layer.v1+wasm",
            false,
        ),
        (
            "compat",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            true,
        ),
        (
            "docker",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            true,
        ),
    ];
    for (format, config, layer_type, tarred) in &cases {
        let module = module(format);
        let layer = if *tarred {
            plugin_layer(&module)
        } else {
            module.clone()
        };
        push_raw(
            &format!("{repo}/{format}:v1"),
            config,
            &[(&layer, layer_type)],
        )
        .await;
        if *format == "docker" {
            // A real Docker v2 manifest (schema 2), as `docker push` writes it, over the same blobs.
            let repository = format!("filters/formats-{}/docker", ns.name);
            let mut manifest = get_manifest(&env.registry, &repository, "v1").await;
            let docker_v2 = "application/vnd.docker.distribution.manifest.v2+json";
            manifest["mediaType"] = docker_v2.into();
            manifest.as_object_mut().unwrap().remove("annotations");
            put_manifest(
                &env.registry,
                &repository,
                "v1",
                docker_v2,
                manifest.to_string().into_bytes(),
            )
            .await;
            let stored: serde_json::Value = serde_json::from_slice(
                &reqwest::Client::new()
                    .get(format!(
                        "http://{}/v2/{repository}/manifests/v1",
                        env.registry
                    ))
                    .header("Accept", docker_v2)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(stored["mediaType"], docker_v2);
        }
        Filter::new(&ns.name, format, &format!("{repo}/{format}:v1"))
            .config(json!({"greeting": "hello"}))
            .apply();
    }
    for (format, ..) in &cases {
        let wf = wait_condition(&client, &ns.name, format, "Ready", "True").await;
        let artifact = wf.status.unwrap().artifact.unwrap();
        assert_eq!(artifact.format, *format);
        let sha = sha256_hex(&module(format));
        assert_eq!(
            artifact.module_sha256, sha,
            "{format}: the module, not the layer, is hashed"
        );
        let served = reqwest::get(cache_url(&op, &sha))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256_hex(&served), sha);
    }
}

#[tokio::test]
async fn module_over_the_size_cap_is_refused() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("cap");
    let _op = Operator::start(&ns.name, &["--max-module-size", "256"]).await;
    let image = format!("{}/filters/cap-{}:v1", env.registry, ns.name);
    push_module(&image, module("too-big")).await;
    Filter::new(&ns.name, "big", &image)
        .config(json!({"greeting": "hello"}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "big", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "ModuleTooLarge");
    assert!(ready.message.contains("256-byte cap"), "{}", ready.message);
    assert!(
        child_api(&client, &ns.name, "WasmPlugin")
            .get_opt("big")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_ready_filter_updated_to_a_bad_module_keeps_its_child() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("keep");
    let op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/filters/keep-{}:v1", env.registry, ns.name);
    let good = module("keep");
    push_module(&image, good.clone()).await;
    Filter::new(&ns.name, "f", &image)
        .target(Target::EnvoyFilter)
        .config(json!({"greeting": "hello"}))
        .apply();
    let before_wf = wait_condition(&client, &ns.name, "f", "Ready", "True").await;
    let efs = child_api(&client, &ns.name, "EnvoyFilter");
    let before: DynamicObject = efs.get("f").await.unwrap();

    let missing = image.replace(":v1", ":v2-never-pushed");
    Filter::new(&ns.name, "f", &missing)
        .target(Target::EnvoyFilter)
        .config(json!({"greeting": "hello"}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    assert_eq!(wf.metadata.generation, Some(2));
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "ManifestNotFound");
    assert!(
        ready.message.contains("stays deployed"),
        "{}",
        ready.message
    );
    let deployed = condition(&wf, "Deployed").unwrap();
    assert_eq!(
        (deployed.status.as_str(), deployed.reason.as_str()),
        ("True", "KeptPreviousModule")
    );
    assert_eq!(
        wf.status.as_ref().unwrap().artifact,
        before_wf.status.as_ref().unwrap().artifact,
        "status.artifact must still describe the deployed module"
    );
    // A registry that is down is retried with backoff; after three failed attempts nothing
    // has touched the child either.
    let down = format!("127.0.0.1:{}/filters/keep:v1", free_port());
    Filter::new(&ns.name, "f", &down)
        .target(Target::EnvoyFilter)
        .config(json!({"greeting": "hello"}))
        .apply();
    wait_for("3 failed retries", Duration::from_secs(60), || async {
        let failed = op
            .metric("wasmfilter_reconcile_errors_total{reason=\"RegistryUnavailable\"}")
            .await;
        (failed >= 3.0).then_some(())
    })
    .await;
    let after: DynamicObject = efs.get("f").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(after.data, before.data);
    assert!(
        after.data.to_string().contains(&sha256_hex(&good)),
        "child must still pin the good module"
    );
}

#[tokio::test]
async fn changing_the_target_replaces_the_child() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("switch");
    let op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/filters/switch-{}:v1", env.registry, ns.name);
    push_module(&image, module("switch")).await;
    Filter::new(&ns.name, "f", &image)
        .config(json!({"greeting": "hello"}))
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;
    let wps = child_api(&client, &ns.name, "WasmPlugin");
    assert!(wps.get_opt("f").await.unwrap().is_some());
    // A new filter: its child applied and its status written once, plus a `Reconciling` status
    // first only if its first reconcile took a second or more (tests/gitops.rs sees that one
    // on a filter whose registry never answers). Each further reconcile: child and status.
    let reconciles = op.metric("wasmfilter_reconciles_total").await;
    let took = op.metric("wasmfilter_reconcile_duration_seconds_sum").await;
    let patches = op
        .metric("wasmfilter_api_requests_total{verb=\"patch\"}")
        .await;
    let taken_up = if reconciles == 1.0 && took < 0.95 {
        0.0
    } else if reconciles == 1.0 && took > 1.05 {
        1.0
    } else {
        patches - 2.0 * reconciles // more than one reconcile, or too close to call
    };
    assert_eq!(
        patches,
        2.0 * reconciles + taken_up,
        "{reconciles} reconciles, {took} s in all"
    );
    assert!(taken_up == 0.0 || taken_up == 1.0, "{patches} patches");
    // Its watches listed once each at start; a reconcile LISTs nothing (pods come from the
    // operator's own index).
    let lists = || op.metric("wasmfilter_api_requests_total{verb=\"list\"}");
    let listed_at_start = lists().await;
    assert!(
        listed_at_start >= 4.0,
        "the watches' initial lists are counted"
    );

    Filter::new(&ns.name, "f", &image)
        .target(Target::EnvoyFilter)
        .config(json!({"greeting": "hello"}))
        .apply();
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &ns.name);
    wait_for("Ready at generation 2", Duration::from_secs(60), || async {
        let wf = api.get("f").await.ok()?;
        let c = condition(&wf, "Ready")?;
        (c.status == "True" && c.observed_generation == Some(2)).then_some(())
    })
    .await;
    assert!(
        child_api(&client, &ns.name, "EnvoyFilter")
            .get_opt("f")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        wps.get_opt("f").await.unwrap().is_none(),
        "old WasmPlugin must be removed"
    );
    assert_eq!(
        lists().await,
        listed_at_start,
        "a reconcile listed something"
    );

    // Ecds on an operator started without --xds-listen: said so, with the fix, not ignored.
    Filter::new(&ns.name, "f", &image)
        .target(Target::Ecds)
        .config(json!({"greeting": "hello"}))
        .apply();
    let wf = wait_for(
        "Ready=False at generation 3",
        Duration::from_secs(60),
        || async {
            let wf = api.get("f").await.ok()?;
            let c = condition(&wf, "Ready")?;
            (c.status == "False" && c.observed_generation == Some(3)).then_some(wf)
        },
    )
    .await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, "Unsupported");
    assert!(
        condition(&wf, "Ready")
            .unwrap()
            .message
            .contains("start it with --xds-listen ADDR"),
        "{:?}",
        condition(&wf, "Ready")
    );
    let _ = api.delete("f", &DeleteParams::default()).await;
}

/// `pullPolicy: IfNotPresent` (the default) needs no registry once the module is cached: a spec
/// change still deploys after the artifact vanished from the registry.
#[tokio::test]
async fn if_not_present_reuses_the_cached_module_without_the_registry() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("cached");
    let _op = Operator::start(&ns.name, &[]).await;
    let repo = format!("filters/cached-{}", ns.name);
    let image = format!("{}/{repo}:v1", env.registry);
    let digest = push_module(&image, module("cached")).await;
    Filter::new(&ns.name, "f", &image)
        .config(json!({"greeting": "hello"}))
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;

    let r = reqwest::Client::new()
        .delete(format!(
            "http://{}/v2/{repo}/manifests/{digest}",
            env.registry
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "registry refused the manifest delete");

    apply_ok(
        &Filter::new(&ns.name, "f", &image)
            .config(json!({"greeting": "hello"}))
            .yaml()
            .replace("hello", "again"),
    );
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &ns.name);
    let wf = wait_for("Ready at generation 2", Duration::from_secs(60), || async {
        let wf = api.get("f").await.ok()?;
        let c = condition(&wf, "Ready")?;
        (c.observed_generation == Some(2)).then_some(wf)
    })
    .await;
    assert_eq!(
        condition(&wf, "Ready").unwrap().status,
        "True",
        "{:?}",
        wf.status
    );
    let wp = child_api(&client, &ns.name, "WasmPlugin")
        .get("f")
        .await
        .unwrap();
    assert_eq!(wp.data["spec"]["pluginConfig"]["greeting"], "again");
}

/// Cluster-scoped RBAC a test created, deleted when it ends.
struct ClusterRbac(String);

impl Drop for ClusterRbac {
    fn drop(&mut self) {
        kubectl(&[
            "delete",
            "clusterrolebinding,clusterrole",
            &self.0,
            "--ignore-not-found",
        ]);
    }
}

/// SIGTERM ends the operator promptly even while a watch cannot list (here: an identity that
/// may read the CRDs and nothing else, so the controller waits for stores that never fill).
#[tokio::test]
async fn sigterm_ends_the_operator_promptly_while_its_watches_cannot_list() {
    client().await;
    let ns = TestNamespace::new("sigterm");
    let n = &ns.name;
    let rbac = ClusterRbac(format!("wasmfilter-test-{n}"));
    for args in [
        vec!["create", "serviceaccount", "op", "-n", n],
        vec![
            "create",
            "clusterrole",
            &rbac.0,
            "--verb=get",
            "--resource=customresourcedefinitions.apiextensions.k8s.io",
        ],
    ] {
        let out = kubectl(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let subject = format!("--serviceaccount={n}:op");
    let role = format!("--clusterrole={}", rbac.0);
    let out = kubectl(&["create", "clusterrolebinding", &rbac.0, &role, &subject]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(n, "op", dir.path());

    let mut op = Operator::launch_as(n, &[], &kubeconfig);
    wait_for(
        "the operator's watches refused",
        Duration::from_secs(30),
        || async { op.logs().contains("forbidden").then_some(()) },
    )
    .await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", op.admin_port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while it cannot list");
    let start = std::time::Instant::now();
    let status = op.terminate(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "not ended cleanly within 5 s of SIGTERM ({status:?}):\n{}",
        op.logs()
    );
    assert!(op.logs().contains("stopped"), "{}", op.logs());
    println!("ended {:?} after SIGTERM", start.elapsed());
}

/// After SIGTERM a reconcile in flight may finish, but for at most 10 s: here it waits on a
/// registry that accepts connections and never answers.
#[tokio::test]
async fn sigterm_waits_for_a_reconcile_in_flight_for_at_most_10_s() {
    client().await;
    let ns = TestNamespace::new("sigterm-busy");
    let mut silent = SilentRegistry::start().await;
    let registry = silent.addr.clone();
    let mut op = Operator::start(
        &ns.name,
        &[
            "--insecure-registry",
            &registry,
            "--registry-timeout-seconds",
            "120",
        ],
    )
    .await;
    Filter::new(&ns.name, "f", &format!("{registry}/filters/silent:v1"))
        .config(json!({"greeting": "hello"}))
        .apply();
    // The reconcile is waiting on the registry.
    tokio::time::timeout(Duration::from_secs(30), silent.accepted.recv())
        .await
        .expect("the operator connects to the registry");
    let start = std::time::Instant::now();
    let status = op.terminate(Duration::from_secs(15));
    let took = start.elapsed();
    assert!(status.is_some(), "still running 15 s after SIGTERM");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "ended {took:?} after SIGTERM:\n{}",
        op.logs()
    );
    assert!(
        op.logs()
            .contains("reconciles still in flight; exiting anyway")
    );
}

/// An image index is followed to its Wasm entry (platform `wasm`/`wasip1`), whatever else it
/// lists; an index with no Wasm entry and several others is refused, naming what it found.
#[tokio::test]
async fn an_image_index_is_followed_to_its_wasm_entry() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("index");
    let n = &ns.name;
    let _op = Operator::start(n, &[]).await;
    let repository = format!("index/{n}");
    let wasm = module(&format!("index-wasm-{n}"));
    let other = module(&format!("index-other-{n}"));
    let entry = |digest: &str, size: usize, arch: &str, os: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"architecture": arch, "os": os},
        })
    };
    let mut entries = Vec::new();
    for (tag, m, arch, os) in [
        ("amd64", &other, "amd64", "linux"),
        ("wasm", &wasm, "wasm", "wasip1"),
    ] {
        let digest = push_module(&format!("{}/{repository}:{tag}", env.registry), m.clone()).await;
        let size = get_manifest_bytes(&env.registry, &repository, tag)
            .await
            .len();
        entries.push(entry(&digest, size, arch, os));
    }
    let index_type = "application/vnd.oci.image.index.v1+json";
    let index = |manifests: &[serde_json::Value]| {
        serde_json::json!({"schemaVersion": 2, "mediaType": index_type, "manifests": manifests})
            .to_string()
            .into_bytes()
    };
    put_manifest(
        &env.registry,
        &repository,
        "multi",
        index_type,
        index(&entries),
    )
    .await;
    let mut no_wasm = entries.clone();
    no_wasm[1] = entry(
        entries[1]["digest"].as_str().unwrap(),
        entries[1]["size"].as_u64().unwrap() as usize,
        "arm64",
        "linux",
    );
    put_manifest(
        &env.registry,
        &repository,
        "no-wasm",
        index_type,
        index(&no_wasm),
    )
    .await;

    Filter::new(n, "multi", &format!("{}/{repository}:multi", env.registry))
        .config(json!({"greeting": "hello"}))
        .apply();
    Filter::new(
        n,
        "no-wasm",
        &format!("{}/{repository}:no-wasm", env.registry),
    )
    .config(json!({"greeting": "hello"}))
    .apply();
    let wf = wait_condition(&client, n, "multi", "Ready", "True").await;
    assert_eq!(
        wf.status.unwrap().artifact.unwrap().module_sha256,
        sha256_hex(&wasm)
    );
    let wf = wait_condition(&client, n, "no-wasm", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "NotAWasmArtifact", "{}", ready.message);
}

/// `wasmfilter_reconcile_queue_depth` counts the filters waiting for their turn: with one
/// reconcile at a time and that one stuck on a registry that does not answer, the other two
/// wait; once the registry answers, every filter is reconciled and none waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_counts_the_filters_waiting_for_their_turn() {
    let env = env();
    let client = client().await;
    let proxy = FaultProxy::start(&env.registry).await;
    let ns = TestNamespace::new("queue");
    let n = &ns.name;
    let op = Operator::start(
        n,
        &[
            "--insecure-registry",
            &proxy.addr,
            "--max-concurrent-reconciles",
            "1",
            "--registry-timeout-seconds",
            "10",
        ],
    )
    .await;
    let depth = || op.metric("wasmfilter_reconcile_queue_depth");
    assert_eq!(depth().await, 0.0);
    push_module(
        &format!("{}/queue/{n}:v1", env.registry),
        module(&format!("queue-{n}")),
    )
    .await;
    proxy.set(Fault::Stall);
    let names = ["a", "b", "c"];
    for f in names {
        Filter::new(n, f, &format!("{}/queue/{n}:v1", proxy.addr)).apply();
    }
    wait_for(
        "two filters to wait behind the stuck one",
        Duration::from_secs(30),
        || async { (depth().await == 2.0).then_some(()) },
    )
    .await;
    assert_eq!(proxy.manifest_requests.lock().unwrap().len(), 1);
    proxy.set(Fault::None);
    for f in names {
        wait_condition(&client, n, f, "Ready", "True").await;
    }
    wait_for("no filter to wait", Duration::from_secs(30), || async {
        (depth().await == 0.0).then_some(())
    })
    .await;
}

/// The filter's Warning Events as the API server holds them: (reason, note, series count).
fn warning_event_objects(ns: &str, name: &str) -> Vec<(String, String, i64)> {
    event_objects(ns, name, "Warning")
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
                e["series"]["count"].as_i64().unwrap_or(1),
            )
        })
        .collect()
}

/// A failure that repeats (a registry that refuses connections, retried with backoff) is one
/// Warning Event whose series counts the repeats, not an Event per attempt; a failure with
/// other words (another registry) is an Event of its own, not a count on the old one.
#[tokio::test]
async fn a_repeated_warning_is_one_event_counting_its_repeats() {
    let client = client().await;
    let ns = TestNamespace::new("series");
    let _op = Operator::start(&ns.name, &[]).await;
    let closed = |port: u16| format!("127.0.0.1:{port}/filters/down:v1");
    Filter::new(&ns.name, "down", &closed(free_port())).apply();
    let reason = "RegistryUnavailable";
    let first = wait_for(
        "one RegistryUnavailable Event counting two attempts or more",
        Duration::from_secs(60),
        || async {
            let events: Vec<_> = warning_event_objects(&ns.name, "down")
                .into_iter()
                .filter(|(r, _, _)| r == reason)
                .collect();
            match events.as_slice() {
                [(_, note, count)] if *count >= 2 => Some(note.clone()),
                [] | [_] => None,
                more => panic!("an Event per attempt: {more:?}"),
            }
        },
    )
    .await;
    let other = closed(free_port());
    Filter::new(&ns.name, "down", &other).apply();
    wait_for(
        "a second Event for the other registry",
        Duration::from_secs(60),
        || async {
            let events = warning_event_objects(&ns.name, "down");
            let notes: Vec<_> = events
                .iter()
                .filter(|(r, _, _)| r == reason)
                .map(|(_, n, _)| n.clone())
                .collect();
            (notes.len() == 2 && notes.contains(&first)).then_some(())
        },
    )
    .await;
    let wf = wait_condition(&client, &ns.name, "down", "Ready", "False").await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, reason);
}

/// A reconcile that finds nothing to change writes nothing: with a resync every second, a Ready
/// filter's reconciles leave the API server alone (no status patch, no child apply, no Event).
/// Someone else's edit of its WasmPlugin, or its deletion, is put back all the same.
#[tokio::test]
async fn reconciles_that_change_nothing_write_nothing_and_hand_edits_are_put_back() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("noop");
    let op = Operator::start(&ns.name, &["--resync-seconds", "1"]).await;
    let image = format!("{}/filters/noop-{}:v1", env.registry, ns.name);
    push_module(&image, module("noop")).await;
    // Always: the tag is resolved again on every resync.
    Filter::new(&ns.name, "f", &image)
        .pull_policy(wasmfilter::api::PullPolicy::Always)
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;
    let reconciles = || op.metric("wasmfilter_reconciles_total");
    let writes = || async {
        let mut n = 0.0;
        for verb in ["create", "patch", "update", "delete"] {
            n += op
                .metric(&format!("wasmfilter_api_requests_total{{verb=\"{verb}\"}}"))
                .await;
        }
        n
    };
    let more_reconciles = |n: f64| async move {
        let from = reconciles().await;
        wait_for(
            &format!("{n} more reconciles"),
            Duration::from_secs(30),
            || async { (reconciles().await >= from + n).then_some(()) },
        )
        .await;
    };
    // Ready is written before the reconcile's Events: one more reconcile, and all of the
    // first one's writes are done.
    more_reconciles(1.0).await;
    let before = writes().await;
    more_reconciles(3.0).await;
    assert_eq!(
        writes().await,
        before,
        "reconciles that changed nothing wrote to the API server\n{}",
        op.logs()
    );

    let children = child_api(&client, &ns.name, "WasmPlugin");
    let plugin_name = |wp: &DynamicObject| wp.data["spec"]["pluginName"].clone();
    let ours = plugin_name(&children.get("f").await.unwrap());
    children
        .patch(
            "f",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"pluginName": "edited"}})),
        )
        .await
        .unwrap();
    wait_for(
        "the edited child put back",
        Duration::from_secs(30),
        || async {
            let wp = children.get("f").await.ok()?;
            (plugin_name(&wp) == ours).then_some(())
        },
    )
    .await;
    children
        .delete("f", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deleted child created again",
        Duration::from_secs(30),
        || async {
            let wp = children.get_opt("f").await.ok()??;
            (wp.metadata.deletion_timestamp.is_none() && plugin_name(&wp) == ours).then_some(())
        },
    )
    .await;
}
