//! Private and misbehaving registries: TLS with a CA the test makes, htpasswd basic auth,
//! token auth, the SSRF guard, interop with the real `oras` CLI, and registry faults that must
//! never replace a working filter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::registries::{Auth, Fault, FaultProxy, Pki, TestRegistry, TokenServer};
use support::*;
use wasmfilter::api::WasmFilter;
use wasmfilter::cache::sha256_hex;

const WAT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/modules/add_header.wat"
);

/// Runs the CLI with a HOME of its own (no stray ~/.docker/config.json) plus `envs`.
fn cli(home: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args(args)
        .env("HOME", home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("WASMFILTER_REGISTRY_USERNAME")
        .env_remove("WASMFILTER_REGISTRY_PASSWORD")
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

fn docker_config_json(registry: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    json!({"auths": {registry: {"auth": auth}}}).to_string()
}

fn create_pull_secret(ns: &str, name: &str, registry: &str, user: &str, password: &str) {
    let out = kubectl(&[
        "-n",
        ns,
        "create",
        "secret",
        "docker-registry",
        name,
        &format!("--docker-server={registry}"),
        &format!("--docker-username={user}"),
        &format!("--docker-password={password}"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Everything a person or a log collector can see about a filter: status, Events, logs.
fn visible_text(ns: &str, op: &Operator) -> String {
    let wf = kubectl(&["-n", ns, "get", "wasmfilters", "-o", "yaml"]);
    let events = kubectl(&["-n", ns, "get", "events", "-o", "yaml"]);
    format!("{}{}{}", stdout(&wf), stdout(&events), op.logs())
}

/// Neither a credential nor any encoding of it appears in status, Events or logs: the password,
/// `user:password` in base64 (as in a docker config and a Basic header), the pull secret's whole
/// `.dockerconfigjson` (decoded and as stored), and `bearer` tokens (their signatures).
fn assert_no_credentials(
    ns: &str,
    op: &Operator,
    user: &str,
    password: &str,
    secret: &str,
    bearer: &[String],
) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let seen = visible_text(ns, op);
    let stored = kubectl(&[
        "-n",
        ns,
        "get",
        "secret",
        secret,
        "-o",
        "jsonpath={.data.\\.dockerconfigjson}",
    ]);
    let stored = stdout(&stored);
    assert!(
        !stored.is_empty(),
        "secret {secret} has a .dockerconfigjson"
    );
    let blob = String::from_utf8(b64.decode(stored.trim()).unwrap()).unwrap();
    let mut secrets = vec![
        ("the password", password.to_string()),
        (
            "base64 user:password",
            b64.encode(format!("{user}:{password}")),
        ),
        ("the .dockerconfigjson as stored", stored.trim().to_string()),
        ("the .dockerconfigjson decoded", blob),
    ];
    for token in bearer {
        let signature = token.rsplit('.').next().unwrap().to_string();
        secrets.push(("a bearer token", signature));
    }
    for (what, secret) in secrets {
        assert!(
            !seen.contains(&secret),
            "{what} leaked into status, Events or logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_with_basic_auth_via_cli_and_pull_secret() {
    let client = client().await;
    let home = tempfile::tempdir().unwrap();
    let pki = Pki::new(home.path());
    let password = format!("pw-{:016x}", fastrand::u64(..));
    let reg = TestRegistry::start(
        Some(&pki),
        Auth::Basic {
            user: "alice".into(),
            password: password.clone(),
        },
    )
    .await;
    let image = format!("{}/private/add-header:1.0", reg.addr);
    let ca = pki.ca_cert.to_str().unwrap();

    // Push with flags (password from the environment).
    let out = cli(
        home.path(),
        &["push", WAT, &image, "--ca-file", ca, "--username", "alice"],
        &[("WASMFILTER_REGISTRY_PASSWORD", &password)],
    );
    assert!(out.status.success(), "push: {}", stderr(&out));

    let dest = home.path().join("m.wasm");
    let dest_s = dest.to_str().unwrap();
    // Anonymous: refused, in one line, saying no credentials were sent.
    let out = cli(
        home.path(),
        &["pull", &image, "-o", dest_s, "--ca-file", ca],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no credentials were sent"), "{err}");
    // Without the CA, TLS fails (system roots do not know the test CA).
    std::fs::create_dir_all(home.path().join(".docker")).unwrap();
    std::fs::write(
        home.path().join(".docker/config.json"),
        docker_config_json(&reg.addr, "alice", &password),
    )
    .unwrap();
    let out = cli(home.path(), &["pull", &image, "-o", dest_s], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).to_lowercase().contains("certificate"),
        "{}",
        stderr(&out)
    );
    // Credentials from ~/.docker/config.json, CA from the flag.
    let out = cli(
        home.path(),
        &["pull", &image, "-o", dest_s, "--ca-file", ca],
        &[],
    );
    assert!(out.status.success(), "pull: {}", stderr(&out));
    let module = wat::parse_file(WAT).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), module);

    // The operator: pull secret in the filter's namespace, CA from its flag.
    let ns = TestNamespace::new("tls");
    let op = Operator::start(&ns.name, &["--registry-ca-file", ca]).await;
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &ns.name);

    // Missing secret: says which and how to create it.
    Filter::new(&ns.name, "f", &image)
        .pull_secret("regcred")
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "PullSecretNotFound", "{}", ready.message);
    assert!(
        ready.message.contains("create secret docker-registry"),
        "{}",
        ready.message
    );

    // Wrong password: refused by the registry.
    create_pull_secret(&ns.name, "wrong", &reg.addr, "alice", "not-the-password");
    Filter::new(&ns.name, "f", &image)
        .pull_secret("wrong")
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, "RegistryDenied");

    // A Secret of another type is refused as such.
    let out = kubectl(&[
        "-n",
        &ns.name,
        "create",
        "secret",
        "generic",
        "opaque",
        "--from-literal=x=y",
    ]);
    assert!(out.status.success());
    Filter::new(&ns.name, "f", &image)
        .pull_secret("opaque")
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidPullSecret");
    assert!(
        ready.message.contains("kubernetes.io/dockerconfigjson"),
        "{}",
        ready.message
    );

    // The right secret: deployed.
    create_pull_secret(&ns.name, "regcred", &reg.addr, "alice", &password);
    Filter::new(&ns.name, "f", &image)
        .pull_secret("regcred")
        .pull_policy(PullPolicy::IfNotPresent)
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "True").await;
    assert_eq!(
        wf.status.unwrap().artifact.unwrap().module_sha256,
        sha256_hex(&module)
    );
    drop(api);
    assert_no_credentials(&ns.name, &op, "alice", &password, "regcred", &[]);
}

/// A token-auth registry (users `pusher` and `puller`, tokens valid `lifetime_secs`) holding
/// one module pushed by the CLI as `pusher`.
async fn token_registry_with_a_module(
    home: &std::path::Path,
    lifetime_secs: u64,
    repo: &str,
) -> (TokenServer, TestRegistry, String) {
    let tokens = TokenServer::start(
        home,
        &[("pusher", "push-pw"), ("puller", "pull-pw")],
        Duration::from_secs(lifetime_secs),
    )
    .await;
    let reg = TestRegistry::start(None, tokens.registry_auth()).await;
    let image = format!("{}/{repo}/add-header:1.0", reg.addr);
    let out = cli(
        home,
        &["push", WAT, &image, "--plain-http", "--username", "pusher"],
        &[("WASMFILTER_REGISTRY_PASSWORD", "push-pw")],
    );
    assert!(out.status.success(), "push: {}", stderr(&out));
    (tokens, reg, image)
}

/// An operator deploying `image` as filter `f` with `puller`'s pull secret `regcred`,
/// re-resolving it every second (`pullPolicy: Always`); returned once the filter is Ready.
async fn operator_pulling_every_second(
    client: &kube::Client,
    ns: &str,
    registry: &str,
    image: &str,
) -> Operator {
    let op = Operator::start(
        ns,
        &["--insecure-registry", registry, "--resync-seconds", "1"],
    )
    .await;
    create_pull_secret(ns, "regcred", registry, "puller", "pull-pw");
    Filter::new(ns, "f", image)
        .pull_secret("regcred")
        .pull_policy(PullPolicy::Always)
        .apply();
    wait_condition(client, ns, "f", "Ready", "True").await;
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_reuses_tokens_and_never_shares_them_between_credentials() {
    let client = client().await;
    let home = tempfile::tempdir().unwrap();
    let (tokens, reg, image) = token_registry_with_a_module(home.path(), 300, "token").await;
    let ns = TestNamespace::new("token");
    let op = operator_pulling_every_second(&client, &ns.name, &reg.addr, &image).await;
    // pullPolicy Always re-resolves every second: several pulls, one token.
    wait_for("at least 4 pulls", Duration::from_secs(30), || async {
        let pulls = op
            .metric("wasmfilter_module_pulls_total{result=\"pulled\"}")
            .await;
        (pulls >= 4.0).then_some(())
    })
    .await;
    assert_eq!(
        tokens.issued_to("puller"),
        1,
        "the token must be reused until it expires"
    );

    // A second filter of the same operator, same image, no secret: its anonymous requests must
    // not ride on the first filter's token.
    Filter::new(&ns.name, "g", &image)
        .pull_policy(PullPolicy::IfNotPresent)
        .config(json!({"attempt": 1}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "g", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "RegistryDenied", "{}", ready.message);
    assert!(
        ready.message.contains("set spec.module.pullSecret"),
        "{}",
        ready.message
    );
    assert_no_credentials(
        &ns.name,
        &op,
        "puller",
        "pull-pw",
        "regcred",
        &tokens.tokens(),
    );
}

/// Tokens are renewed shortly (10 s) before they expire, and reused until then: with 14 s
/// tokens and a pull every second, a few tokens serve many pulls and no pull is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_before_they_expire() {
    let client = client().await;
    let home = tempfile::tempdir().unwrap();
    let (tokens, reg, image) = token_registry_with_a_module(home.path(), 14, "renew").await;
    let ns = TestNamespace::new("renew");
    let op = operator_pulling_every_second(&client, &ns.name, &reg.addr, &image).await;
    // Over 20 s: each token is reusable for its first 4 s, so several are issued.
    let pulls = wait_for("20 pulls", Duration::from_secs(60), || async {
        let pulls = op
            .metric("wasmfilter_module_pulls_total{result=\"pulled\"}")
            .await;
        (pulls >= 20.0).then_some(pulls)
    })
    .await;
    let issued = tokens.issued_to("puller");
    assert!(
        issued >= 2 && (issued as f64) < pulls,
        "{issued} tokens for {pulls} pulls: renewed, and reused in between"
    );
    assert_eq!(
        op.metric("wasmfilter_reconcile_errors_total").await,
        0.0,
        "no pull was refused: {}",
        op.logs()
    );
}

/// A token endpoint that answers with a redirect is not followed: credentials never go to
/// where it points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_follow_no_redirects() {
    client().await;
    let home = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(home.path(), &[("u", "p")], Duration::from_secs(300)).await;
    // Where the redirect points: it counts who comes.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_addr = elsewhere.local_addr().unwrap();
    let visits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = visits.clone();
    let sink = tokio::spawn(async move {
        while let Ok((_conn, _)) = elsewhere.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The realm: every token request is redirected there.
    let realm = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm_addr = realm.local_addr().unwrap();
    let location = format!("http://{elsewhere_addr}/token");
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            (
                axum::http::StatusCode::FOUND,
                [(axum::http::header::LOCATION, location)],
            )
        }
    });
    let redirector = tokio::spawn(async move { axum::serve(realm, app).await });
    let reg = TestRegistry::start(
        None,
        tokens.registry_auth_with_realm(&format!("http://{realm_addr}/token")),
    )
    .await;
    let out = cli(
        home.path(),
        &[
            "pull",
            &format!("{}/redirect/f:1", reg.addr),
            "-o",
            "/dev/null",
            "--plain-http",
            "--username",
            "u",
        ],
        &[("WASMFILTER_REGISTRY_PASSWORD", "p")],
    );
    assert!(
        !out.status.success(),
        "a redirected token request cannot succeed"
    );
    assert!(
        stderr(&out).contains(
            "token service answered HTTP 302 Found: a redirect, which token requests never follow"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        visits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the redirect was followed: {}",
        stderr(&out)
    );
    sink.abort();
    redirector.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_realm_on_a_metadata_address_is_never_contacted() {
    let client = client().await;
    let home = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(home.path(), &[("u", "p")], Duration::from_secs(300)).await;
    // A registry that sends clients to the cloud metadata endpoint for tokens.
    let reg = TestRegistry::start(
        None,
        tokens.registry_auth_with_realm("http://169.254.169.254/latest/meta-data/iam"),
    )
    .await;
    let image = format!("{}/ssrf/f:1", reg.addr);
    let out = cli(
        home.path(),
        &[
            "pull",
            &image,
            "-o",
            "/dev/null",
            "--plain-http",
            "--username",
            "u",
        ],
        &[("WASMFILTER_REGISTRY_PASSWORD", "p")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refuses to contact"), "{err}");
    assert!(err.contains("link-local or cloud metadata"), "{err}");

    let ns = TestNamespace::new("ssrf");
    let _op = Operator::start(&ns.name, &["--insecure-registry", &reg.addr]).await;
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::IfNotPresent)
        .config(json!({"attempt": 1}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "TokenRealmRefused", "{}", ready.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_and_wasmfilter_read_each_others_artifacts() {
    let env = env();
    let oras = std::env::var("WASMFILTER_ORAS").expect("WASMFILTER_ORAS (set by e2e/env.sh)");
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let module = module("oras-interop");
    std::fs::write(dir.join("plugin.wasm"), &module).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"type":"envoy_proxy","abi_versions":["0.2.1"],"config":{"root_ids":["add_header"]}}"#,
    )
    .unwrap();
    let oras_run = |args: &[&str]| {
        let out = Command::new(&oras)
            .current_dir(dir)
            .env("HOME", dir)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "oras {args:?}: {}", stderr(&out));
        out
    };
    let tag = format!("{:08x}", fastrand::u32(..));

    // oras pushes each format; we pull and verify it.
    for (format, config, layer) in [
        (
            "solo-oci",
            "config.json:application/vnd.module.wasm.config.v1+json",
            "plugin.wasm:application/vnd.module.wasm.content.layer.v1+wasm",
        ),
        (
            "cncf",
            "config.json:application/vnd.wasm.config.v0+json",
            "plugin.wasm:application/wasm",
        ),
    ] {
        let image = format!("{}/oras/{format}:{tag}", env.registry);
        oras_run(&["push", "--plain-http", "--config", config, &image, layer]);
        let out_file = dir.join(format!("{format}.wasm"));
        let out = cli(
            dir,
            &["inspect", &image, "--plain-http", "--output", "json"],
            &[],
        );
        assert!(out.status.success(), "inspect: {}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["format"], format);
        assert_eq!(report["moduleSha256"], sha256_hex(&module));
        assert_eq!(report["abiVersion"], "0.2.1");
        if format == "solo-oci" {
            // The snake_case spelling of the runtime config is read too.
            assert_eq!(report["declaredAbiVersions"], json!(["0.2.1"]));
            assert_eq!(report["rootIds"], json!(["add_header"]));
        }
        let out = cli(
            dir,
            &[
                "pull",
                &image,
                "--plain-http",
                "-o",
                out_file.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "pull: {}", stderr(&out));
        assert_eq!(std::fs::read(&out_file).unwrap(), module);
    }

    // We push each format; oras fetches the module file.
    for format in ["solo-oci", "cncf"] {
        let image = format!("{}/ours/{format}:{tag}", env.registry);
        let wasm = dir.join("plugin.wasm");
        let out = cli(
            dir,
            &[
                "push",
                wasm.to_str().unwrap(),
                &image,
                "--plain-http",
                "--format",
                format,
            ],
            &[],
        );
        assert!(out.status.success(), "push: {}", stderr(&out));
        let into = dir.join(format!("oras-{format}"));
        oras_run(&["pull", "--plain-http", &image, "-o", into.to_str().unwrap()]);
        assert_eq!(std::fs::read(into.join("plugin.wasm")).unwrap(), module);
    }
    // The compat image: oras sees a layer it can fetch by digest; we read plugin.wasm back.
    let image = format!("{}/ours/compat:{tag}", env.registry);
    let wasm = dir.join("plugin.wasm");
    let out = cli(
        dir,
        &[
            "push",
            wasm.to_str().unwrap(),
            &image,
            "--plain-http",
            "--format",
            "compat",
        ],
        &[],
    );
    assert!(out.status.success(), "push: {}", stderr(&out));
    let manifest = oras_run(&["manifest", "fetch", "--plain-http", &image]);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let out = cli(dir, &["inspect", &image, "--plain-http", "-o", "json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["format"], "compat");
    assert_eq!(report["moduleSha256"], sha256_hex(&module));
}

/// Bumps the spec (so the operator looks again at once) and waits for `Ready=False` with
/// `reason`; then checks the child still pins the good module.
async fn expect_failure(
    client: &kube::Client,
    ns: &str,
    image: &str,
    attempt: u32,
    reason: &str,
    good_sha: &str,
) -> String {
    Filter::new(ns, "f", image)
        .pull_policy(PullPolicy::Always)
        .config(json!({"attempt": attempt}))
        .apply();
    let wf = wait_status(
        client,
        ns,
        "f",
        &format!("Ready=False reason {reason}"),
        |wf| {
            condition(wf, "Ready").is_some_and(|c| {
                c.status == "False"
                    && c.reason == reason
                    && c.observed_generation == wf.metadata.generation
            })
        },
    )
    .await;
    let deployed = condition(&wf, "Deployed").unwrap();
    assert_eq!(deployed.reason, "KeptPreviousModule", "{reason}");
    assert_eq!(
        wf.status
            .as_ref()
            .unwrap()
            .artifact
            .as_ref()
            .unwrap()
            .module_sha256,
        good_sha
    );
    let child = child_api(client, ns, "WasmPlugin").get("f").await.unwrap();
    assert!(
        child.data.to_string().contains(good_sha),
        "{reason}: the child must keep the working module"
    );
    condition(&wf, "Ready").unwrap().message.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_never_replace_a_working_filter() {
    let env = env();
    let client = client().await;
    let proxy = FaultProxy::start(&env.registry).await;
    let ns = TestNamespace::new("faults");
    let op = Operator::start(
        &ns.name,
        &[
            "--insecure-registry",
            &proxy.addr,
            "--resync-seconds",
            "1",
            "--registry-timeout-seconds",
            "2",
        ],
    )
    .await;
    let good = module(&format!("faults-{}", ns.name));
    let good_sha = sha256_hex(&good);
    push_module(&format!("{}/faults/{}:v1", env.registry, ns.name), good).await;
    let image = format!("{}/faults/{}:v1", proxy.addr, ns.name);
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::Always)
        .config(json!({"attempt": 0}))
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;

    let cases = [
        (
            Fault::TamperManifest,
            "ManifestDigestMismatch",
            "does not match its digest",
        ),
        (Fault::HugeManifest, "ManifestTooLarge", "too large"),
        (Fault::Status(401), "RegistryDenied", "injected 401"),
        (Fault::Status(403), "RegistryDenied", "injected 403"),
        (Fault::Status(404), "ManifestNotFound", "not found"),
        (Fault::Status(429), "RegistryThrottled", "Retry-After 1 s"),
        (Fault::Status(500), "RegistryUnavailable", "injected 500"),
        (Fault::Status(503), "RegistryUnavailable", "injected 503"),
        (Fault::Stall, "RegistryUnavailable", "timed out"),
    ];
    for (i, (fault, reason, says)) in cases.into_iter().enumerate() {
        proxy.set(fault.clone());
        let message =
            expect_failure(&client, &ns.name, &image, i as u32 + 1, reason, &good_sha).await;
        assert!(message.contains(says), "{fault:?}: {message}");
        proxy.set(Fault::None);
    }

    // Blob faults need a module not in the cache: move the tag to a new one.
    let newer = module(&format!("faults-new-{}", ns.name));
    push_module(
        &format!("{}/faults/{}:v1", env.registry, ns.name),
        newer.clone(),
    )
    .await;
    for (i, (fault, reason)) in [
        (Fault::TruncateBlobs, "FetchBlob"),
        (Fault::CorruptBlobs, "BlobDigestMismatch"),
    ]
    .into_iter()
    .enumerate()
    {
        proxy.set(fault);
        expect_failure(&client, &ns.name, &image, 100 + i as u32, reason, &good_sha).await;
    }
    proxy.set(Fault::None);

    // Healthy again: the moved tag's module is deployed, and the operator never restarted.
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::Always)
        .config(json!({"attempt": 200}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "True").await;
    assert_eq!(
        wf.status.unwrap().artifact.unwrap().module_sha256,
        sha256_hex(&newer)
    );
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"module": {"pullPolicy": "IfNotPresent"}}})),
    )
    .await
    .unwrap();
}

/// `wasmfilter pull` writes the module while it downloads, but under a temporary name: bytes
/// that fail a check never take the output's name (an older file there stays) nor stay behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_fails_its_checks_leaves_the_output_as_it_was() {
    let env = env();
    let proxy = FaultProxy::start(&env.registry).await;
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("filter.wasm");
    std::fs::write(&output, b"the module that works").unwrap();
    let marker = format!("corrupt-{}", fastrand::u32(..));
    push_module(
        &format!("{}/clipull/{marker}:v1", env.registry),
        module_of_size(256 * 1024),
    )
    .await;
    proxy.set(Fault::CorruptBlobs);
    let image = format!("{}/clipull/{marker}:v1", proxy.addr);
    let pull = || {
        let output = output.to_str().unwrap();
        cli(
            home.path(),
            &["pull", &image, "--plain-http", "-o", output],
            &[],
        )
    };
    let out = pull();
    assert_pull_refused_and_kept(
        &out,
        "does not match that digest",
        &output,
        b"the module that works",
    );

    // Healthy again: the same command replaces it.
    proxy.set(Fault::None);
    let out = pull();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&output).unwrap(), module_of_size(256 * 1024));
}

/// One pull is bounded as a whole, not only by silence: a registry that sends a byte every
/// 50 ms (never silent for `--registry-timeout-seconds`) is cut off at `--pull-timeout-seconds`
/// (600 unless set), and the working module stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_never_finishes_is_cut_off_at_the_pull_cap() {
    let help = stdout(
        &Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
            .args(["operator", "--help"])
            .output()
            .unwrap(),
    );
    let line = help
        .lines()
        .skip_while(|l| !l.contains("--pull-timeout-seconds"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(line.contains("[default: 600]"), "{help}");

    let env = env();
    let client = client().await;
    let proxy = FaultProxy::start(&env.registry).await;
    let ns = TestNamespace::new("pullcap");
    let op = Operator::start(
        &ns.name,
        &[
            "--insecure-registry",
            &proxy.addr,
            "--registry-timeout-seconds",
            "2",
            "--pull-timeout-seconds",
            "4",
        ],
    )
    .await;
    let reference = format!("{}/pullcap/{}:v1", env.registry, ns.name);
    let good = module(&format!("pullcap-{}", ns.name));
    let good_sha = sha256_hex(&good);
    push_module(&reference, good).await;
    let image = format!("{}/pullcap/{}:v1", proxy.addr, ns.name);
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::Always)
        .config(json!({"attempt": 0}))
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;

    // A new module behind the same tag, whose blob now trickles in (a byte every 50 ms: about
    // a minute for the module).
    push_module(&reference, module(&format!("pullcap-new-{}", ns.name))).await;
    proxy.set(Fault::Trickle(Duration::from_millis(50)));
    let message = expect_failure(
        &client,
        &ns.name,
        &image,
        1,
        "RegistryUnavailable",
        &good_sha,
    )
    .await;
    assert!(
        message.contains("pull did not finish within 4 s"),
        "{message}"
    );
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
}

/// A 429's `Retry-After` is honoured: the next attempt comes no sooner, although the filter
/// re-resolves its tag every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let env = env();
    let client = client().await;
    let proxy = FaultProxy::start(&env.registry).await;
    let ns = TestNamespace::new("throttle");
    let _op = Operator::start(
        &ns.name,
        &["--insecure-registry", &proxy.addr, "--resync-seconds", "1"],
    )
    .await;
    push_module(
        &format!("{}/throttle/{}:v1", env.registry, ns.name),
        module(&format!("throttle-{}", ns.name)),
    )
    .await;
    let image = format!("{}/throttle/{}:v1", proxy.addr, ns.name);
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::Always)
        .config(json!({"attempt": 0}))
        .apply();
    wait_condition(&client, &ns.name, "f", "Ready", "True").await;

    const RETRY_AFTER: u64 = 3;
    proxy.set(Fault::Throttle(RETRY_AFTER));
    let start = std::time::Instant::now();
    let throttled = wait_for(
        "three throttled attempts",
        Duration::from_secs(60),
        || async {
            let times: Vec<_> = proxy
                .manifest_requests
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|t| *t >= start)
                .collect();
            (times.len() >= 3).then_some(times)
        },
    )
    .await;
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, "RegistryThrottled");
    proxy.set(Fault::None);
    for pair in throttled.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(RETRY_AFTER * 1000 - 100),
            "retried after {gap:?}, before Retry-After {RETRY_AFTER} s: {throttled:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_blob_that_is_not_json_is_refused() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("badconfig");
    let _op = Operator::start(&ns.name, &[]).await;
    let image = format!("{}/badconfig/{}:v1", env.registry, ns.name);
    push_raw_with_config(
        &image,
        b"\x7fELF this is not JSON",
        "application/vnd.module.wasm.config.v1+json",
        &[(
            &module("badconfig"),
            "application/vnd.module.wasm.content.layer.v1+wasm",
        )],
    )
    .await;
    Filter::new(&ns.name, "f", &image)
        .pull_policy(PullPolicy::IfNotPresent)
        .config(json!({"attempt": 0}))
        .apply();
    let wf = wait_condition(&client, &ns.name, "f", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidArtifactConfig", "{}", ready.message);
    assert!(
        ready.message.contains("config blob is not JSON"),
        "{}",
        ready.message
    );
}

/// A tag resolved before is asked for again with `If-None-Match` (its last digest): while it
/// has not moved, the registry answers `304 Not Modified` and sends no manifest, and the
/// resolution is the same; once the tag moves, the new manifest comes back in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmoved_tag_is_answered_not_modified_and_a_moved_one_in_full() {
    use wasmfilter::cache::ModuleCache;
    use wasmfilter::oci::{Credentials, RegistryConfig, Resolver};
    let env = env();
    let proxy = FaultProxy::start(&env.registry).await;
    let repo = format!("conditional/m-{:08x}:v1", fastrand::u32(..));
    let first = module("conditional-first");
    push_module(&format!("{}/{repo}", env.registry), first.clone()).await;
    let image = format!("{}/{repo}", proxy.addr);
    let resolver = Resolver::new(RegistryConfig {
        plain_http: vec![proxy.addr.clone()],
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = ModuleCache::open(dir.path().join("modules")).unwrap();
    let fetch = || resolver.fetch(&image, None, None, &cache, &Credentials::Anonymous);
    let a = fetch().await.unwrap();
    let b = fetch().await.unwrap();
    assert_eq!(b.artifact.manifest_digest, a.artifact.manifest_digest);
    assert_eq!(b.artifact.module_sha256, sha256_hex(&first));
    assert_eq!(*proxy.manifest_statuses.lock().unwrap(), [200, 304]);

    let second = module("conditional-second");
    push_module(&format!("{}/{repo}", env.registry), second.clone()).await;
    let c = fetch().await.unwrap();
    assert_ne!(c.artifact.manifest_digest, a.artifact.manifest_digest);
    assert_eq!(c.artifact.module_sha256, sha256_hex(&second));
    assert_eq!(*proxy.manifest_statuses.lock().unwrap(), [200, 304, 200]);
}
