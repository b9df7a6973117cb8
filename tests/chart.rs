//! The Helm chart, with the real `helm` CLI against the real API server: it lints, renders what
//! the API server accepts, refuses wrong values with a clear message, installs, upgrades and
//! uninstalls; and the RBAC it grants is enough for a full reconcile and no more (the operator
//! binary runs with the installed Deployment's arguments as the chart's ServiceAccount).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use kube::Api;
use support::*;
use wasmfilter::api::WasmFilter;

#[test]
fn chart_lints_and_every_rendering_is_accepted_by_the_api_server() {
    let ns = TestNamespace::new("chart-render");
    let n = ns.name.as_str();
    ok(helm(&["lint", "--strict", CHART]));
    let variants: &[&[&str]] = &[
        &[],
        &[
            "--set",
            &format!("watchNamespace={n}"),
            "--set",
            "cache.persistence.enabled=true",
            "--set",
            "podDisruptionBudget.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "xds.enabled=true",
            "--set",
            "cache.maxBytes=1000000",
            "--set",
            "registry.insecure[0]=registry.local:5000",
            "--set",
            "registry.caConfigMap=registry-ca",
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "istio.loadStatus=true",
        ],
        &["--set", "replicaCount=3"],
        &["--set", "replicaCount=2", "--set", "xds.enabled=true"],
    ];
    for extra in variants {
        let mut args = vec!["template", "rel", CHART, "--namespace", n];
        args.extend_from_slice(extra);
        let rendered = ok(helm(&args));
        let out = kubectl_stdin(
            &["apply", "--dry-run=server", "-n", n, "-f", "-"],
            &rendered,
        );
        assert!(
            out.status.success(),
            "{extra:?}: {}\n{rendered}",
            stderr(&out)
        );
    }
    // The ServiceMonitor renders (its CRD is not installed here, so no server-side check).
    let rendered = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ]));
    assert!(rendered.contains("kind: ServiceMonitor"), "{rendered}");
    assert!(rendered.contains("port: http-metrics"), "{rendered}");
}

/// Every metric the Grafana dashboard queries is one the operator exports (a renamed metric
/// would leave a panel empty), and the chart ships the dashboard as it is in the repo.
#[tokio::test]
async fn the_dashboard_queries_only_metrics_the_operator_exports() {
    let file =
        std::fs::read_to_string(format!("{CHART}/dashboards/wasmfilter-operator.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&file).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    // An operator that deployed one filter and failed another: every series has a sample.
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("dashboard");
    let n = ns.name.as_str();
    let op = Operator::start(n, &[]).await;
    let image = format!("{}/dashboard/{n}:v1", env.registry);
    push_module(&image, module(&format!("dashboard-{n}"))).await;
    Filter::new(n, "ok", &image).apply();
    Filter::new(n, "missing", &image.replace(":v1", ":nope")).apply();
    wait_condition(&client, n, "ok", "Ready", "True").await;
    wait_condition(&client, n, "missing", "Ready", "False").await;
    let exported = op.metrics_text().await;
    let name = regex::Regex::new(r"wasmfilter_[a-z_]+").unwrap();
    for expr in &exprs {
        for m in name.find_iter(expr) {
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.as_str().strip_suffix(s))
                .unwrap_or(m.as_str());
            assert!(
                exported.contains(&format!("# TYPE {base} ")),
                "the dashboard queries {} (in {expr}), which the operator does not export:\n{exported}",
                m.as_str()
            );
        }
    }
    let rendered = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--set",
        "grafanaDashboard.enabled=true",
    ]));
    let configmap = rendered
        .split("\n---\n")
        .find(|d| d.contains("grafana_dashboard"))
        .expect("a dashboard ConfigMap");
    let configmap: serde_json::Value = serde_norway::from_str(configmap).unwrap();
    let shipped: serde_json::Value = serde_json::from_str(
        configmap["data"]["wasmfilter-operator.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, dashboard);
}

/// With ECDS and several replicas, each replica says where it serves ECDS (its pod IP), so the
/// followers relay Envoys' streams to the leader; a single replica without leader election
/// says nothing.
#[test]
fn replicas_serving_ecds_advertise_their_pod_address() {
    let rendered = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--set",
        "replicaCount=2,xds.enabled=true",
    ]));
    assert!(
        rendered.contains("- --xds-advertise-address=$(POD_IP):18000"),
        "{rendered}"
    );
    assert!(rendered.contains("fieldPath: status.podIP"), "{rendered}");
    let single = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--set",
        "xds.enabled=true,leaderElection.enabled=false",
    ]));
    assert!(!single.contains("xds-advertise-address"), "{single}");
    assert!(!single.contains("status.podIP"), "{single}");
}

#[test]
fn wrong_values_are_refused_at_install_time_naming_the_value() {
    let cases = [
        (
            "replicaCount=11",
            "'/replicaCount': maximum: got 11, want 10",
        ),
        // Two replicas without leader election would both write.
        (
            "replicaCount=2,leaderElection.enabled=false",
            "'/leaderElection/enabled': value must be true",
        ),
        (
            "cache.port=99999",
            "'/cache/port': maximum: got 99,999, want 65,535",
        ),
        ("logFormat=xml", "'/logFormat'"),
        ("istio.loadStatus=sometimes", "'/istio/loadStatus'"),
        ("watchNamespace=Not_A_Namespace", "'/watchNamespace'"),
        ("cache.persistence.size=lots", "'/cache/persistence/size'"),
        ("signatures.requireKeys=nope", "'/signatures/requireKeys'"),
        ("unknownValue=1", "unknownValue"),
    ];
    for (set, field) in cases {
        let out = helm(&["template", "rel", CHART, "--set", set]);
        assert!(!out.status.success(), "{set} accepted");
        let err = stderr(&out);
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(field),
            "{set}: {err}"
        );
    }
}

#[test]
fn defaults_point_the_operator_at_its_own_cache_service() {
    let rendered = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--namespace",
        "wasmfilter-system",
    ]));
    assert!(
        rendered.contains(
            "--cache-url=http://rel-wasmfilter-operator-cache.wasmfilter-system.svc:8080"
        ),
        "{rendered}"
    );
    // Reading Istio proxies' metrics is asked for, never assumed.
    assert!(!rendered.contains("--istio-load-status"), "{rendered}");
    let with = ok(helm(&[
        "template",
        "rel",
        CHART,
        "--set",
        "istio.loadStatus=true",
    ]));
    assert!(with.contains("- --istio-load-status\n"), "{with}");
    // The operator runs with the allocator settings its image sets, whatever the image.
    for (k, v) in DEPLOYED_ENV {
        assert!(
            rendered.contains(&format!("- {{name: {k}, value: \"{v}\"}}")),
            "{k}: {rendered}"
        );
    }
    assert!(
        rendered.contains("name: rel-wasmfilter-operator-cache"),
        "{rendered}"
    );
    for hardening in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
    ] {
        assert!(rendered.contains(hardening), "lacks {hardening}");
    }
    // No wildcard anywhere in the RBAC; Secrets only by get.
    assert!(
        !rendered.contains("'*'") && !rendered.contains("\"*\""),
        "{rendered}"
    );
    let secrets = rendered
        .lines()
        .skip_while(|l| !l.contains("resources: [secrets]"))
        .nth(1)
        .unwrap();
    assert_eq!(secrets.trim(), "verbs: [get]");
}

/// Installs the chart in namespaced mode, runs the operator as the chart's ServiceAccount with
/// the installed Deployment's arguments through a full reconcile (pull secret, child, status,
/// Event); shows a rule is needed by removing it; upgrades; uninstalls.
#[tokio::test]
async fn install_upgrade_uninstall_and_the_granted_rbac_is_exactly_enough() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("chart");
    let n = ns.name.as_str();
    // Cluster-scoped names derive from the release: one per test namespace.
    let release = format!("r{}", &n[n.len() - 8..]);
    let release = release.as_str();
    ok(helm(&[
        "install",
        release,
        CHART,
        "--namespace",
        n,
        "--set",
        &format!("watchNamespace={n}"),
        "--set",
        &format!("registry.insecure[0]={}", env.registry),
        "--set",
        "logFormat=text",
        "--wait=false",
    ]));
    let fullname = format!("{release}-wasmfilter-operator");
    let fullname = fullname.as_str();
    let deployment = || {
        let out = kubectl(&["get", "deploy", fullname, "-n", n, "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let args = |d: &serde_json::Value| -> Vec<String> {
        d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let installed = args(&deployment());
    assert!(
        installed.contains(&format!("--namespace={n}")),
        "{installed:?}"
    );
    assert!(
        installed.contains(&"--leader-elect".to_string())
            && installed.contains(&format!("--leader-election-namespace={n}")),
        "{installed:?}"
    );
    assert_eq!(
        deployment()["spec"]["template"]["spec"]["serviceAccountName"],
        fullname
    );

    // The operator as the chart's ServiceAccount, with the Deployment's own arguments.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(n, fullname, dir.path());
    let op = Operator::run_as(&installed, &kubeconfig).await;
    let image = format!("{}/chart/{n}:v1", env.registry);
    push_module(&image, module(&format!("chart-{n}"))).await;
    let secret = serde_json::json!({"auths": {env.registry.clone(): {"auth": "dXNlcjpwYXNz"}}});
    let out = kubectl(&[
        "create",
        "secret",
        "generic",
        "regcred",
        "-n",
        n,
        "--type=kubernetes.io/dockerconfigjson",
        &format!("--from-literal=.dockerconfigjson={secret}"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let with_secret = |name: &str| {
        Filter::new(n, name, &image)
            .config(json!({"greeting": "hello"}))
            .pull_secret("regcred")
            .yaml()
    };
    apply_ok(&with_secret("first"));
    let wf = wait_condition(&client, n, "first", "Ready", "True").await;
    assert!(wf.status.unwrap().artifact.is_some());
    // It reconciled as the holder of the chart's Lease (the Role for it is enough).
    let lease: k8s_openapi::api::coordination::v1::Lease = kube::Api::namespaced(client.clone(), n)
        .get(fullname)
        .await
        .unwrap();
    assert!(
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| !h.is_empty()),
        "the Lease has no holder"
    );
    child_api(&client, n, "WasmPlugin")
        .get("first")
        .await
        .unwrap();
    // Its Events are written too (a Normal one on success is not promised; force a Warning).
    Filter::new(n, "missing", &image.replace(":v1", ":nope"))
        .config(json!({"greeting": "hello"}))
        .apply();
    wait_condition(&client, n, "missing", "Ready", "False").await;
    wait_for("a Warning Event", Duration::from_secs(30), || async {
        (!warning_events(n, "missing").is_empty()).then_some(())
    })
    .await;
    assert!(!op.logs().contains("forbidden"), "{}", op.logs());

    // Without `get` on Secrets, a pull secret cannot be read: the same reconcile fails.
    let role: serde_json::Value =
        serde_json::from_slice(&kubectl(&["get", "role", fullname, "-n", n, "-o", "json"]).stdout)
            .unwrap();
    let index = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["resources"] == serde_json::json!(["secrets"]))
        .unwrap();
    let out = kubectl(&[
        "patch",
        "role",
        fullname,
        "-n",
        n,
        "--type=json",
        "-p",
        &format!(r#"[{{"op": "remove", "path": "/rules/{index}"}}]"#),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    apply_ok(&with_secret("second"));
    let wf = wait_condition(&client, n, "second", "Ready", "False").await;
    let ready = condition(&wf, "Ready").unwrap();
    assert_eq!(ready.reason, "PullSecretForbidden", "{}", ready.message);
    assert!(
        ready.message.contains("may not read it") && ready.message.contains("forbidden"),
        "{}",
        ready.message
    );
    drop(op);

    // Upgrade with a changed value: the Deployment's arguments follow.
    helm_upgrade_set(release, n, "cache.maxBytes=1000000", &["--wait=false"]);
    assert!(args(&deployment()).contains(&"--cache-max-bytes=1000000".to_string()));
    // The chart put its Role back.
    let role = stdout(&kubectl(&["get", "role", fullname, "-n", n, "-o", "yaml"]));
    assert!(role.contains("secrets"), "{role}");

    ok(helm(&["uninstall", release, "--namespace", n]));
    for kind in ["deploy", "role", "sa", "svc"] {
        let out = kubectl(&[
            "get",
            kind,
            "-n",
            n,
            "-l",
            "app.kubernetes.io/instance=wf",
            "-o",
            "name",
        ]);
        assert_eq!(stdout(&out).trim(), "", "{kind} left after uninstall");
    }
    let out = kubectl(&["get", "clusterrole", &format!("{fullname}-crds")]);
    assert!(!out.status.success(), "cluster role left after uninstall");
    // The CRD stays (Helm never deletes crds/), and so do the users' filters.
    let api: Api<WasmFilter> = Api::namespaced(client.clone(), n);
    api.get("first").await.unwrap();
    child_api(&client, n, "WasmPlugin")
        .get("first")
        .await
        .unwrap();
}

/// `signatures.requireKeys`: the operator, installed for one namespace and run as the chart's
/// ServiceAccount, reads the trusted keys from a ConfigMap in another namespace (the chart's
/// Role for that one ConfigMap is enough) and deploys only modules signed by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_signature_keys_from_the_chart_are_read_and_enforced() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("chart-keys");
    let keys_ns = TestNamespace::new("chart-trust");
    let (n, k) = (ns.name.as_str(), keys_ns.name.as_str());
    let release = format!("k{}", &n[n.len() - 8..]);
    let rendered = ok(helm(&[
        "template",
        &release,
        CHART,
        "--namespace",
        n,
        "--set",
        &format!("watchNamespace={n}"),
        "--set",
        &format!("signatures.requireKeys={k}/signing-keys"),
        "--set",
        &format!("registry.insecure[0]={}", env.registry),
        "--set",
        "logFormat=text",
    ]));
    // Every object names its namespace (the Role for the keys is in the other one).
    let out = kubectl_stdin(&["apply", "-f", "-"], &rendered);
    assert!(out.status.success(), "{}", stderr(&out));
    let fullname = format!("{release}-wasmfilter-operator");
    let out = kubectl(&["get", "deploy", &fullname, "-n", n, "-o", "json"]);
    let deployment: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(
        args.contains(&format!("--require-signature-keys={k}/signing-keys")),
        "{args:?}"
    );

    // A cosign key pair; its public key in the trusted ConfigMap.
    let dir = tempfile::tempdir().unwrap();
    let cosign = std::env::var("WASMFILTER_COSIGN").expect("WASMFILTER_COSIGN (set by e2e/env.sh)");
    let out = Command::new(cosign)
        .args(["generate-key-pair", "--output-key-prefix", "team"])
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kubectl(&[
        "create",
        "configmap",
        "signing-keys",
        "-n",
        k,
        &format!(
            "--from-file=team.pub={}",
            dir.path().join("team.pub").display()
        ),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = dir.path().join("m.wasm");
    std::fs::write(&file, module(&format!("keys-{n}"))).unwrap();
    let push = |image: &str, sign: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmfilter"));
        cmd.arg("push").arg(&file).args([image, "--plain-http"]);
        if sign {
            cmd.args(["--sign", "--key"])
                .arg(dir.path().join("team.key"));
        }
        ok(cmd.env("COSIGN_PASSWORD", "").output().unwrap())
    };
    let signed = format!("{}/chart-keys/{n}:signed", env.registry);
    push(&signed, true);
    let unsigned = format!("{}/chart-keys/{n}:unsigned", env.registry);
    std::fs::write(&file, module(&format!("keys-unsigned-{n}"))).unwrap();
    push(&unsigned, false);

    let kubeconfig = service_account_kubeconfig(n, &fullname, dir.path());
    let op = Operator::run_as(&args, &kubeconfig).await;
    Filter::new(n, "signed", &signed).apply();
    Filter::new(n, "unsigned", &unsigned).apply();
    let wf = wait_condition(&client, n, "signed", "Ready", "True").await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert!(
        signature
            .key
            .contains(&format!("ConfigMap {k}/signing-keys")),
        "{signature:?}"
    );
    let wf = wait_condition(&client, n, "unsigned", "Ready", "False").await;
    assert_eq!(condition(&wf, "Ready").unwrap().reason, "SignatureMissing");
    assert!(!op.logs().contains("forbidden"), "{}", op.logs());
    drop(op);
    let out = kubectl_stdin(&["delete", "--wait=false", "-f", "-"], &rendered);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// What `kubectl apply -k config/default` created, removed again (never the CRD: other tests'
/// filters live under it).
struct KustomizeInstall;

impl Drop for KustomizeInstall {
    fn drop(&mut self) {
        kubectl(&["delete", "namespace", "wasmfilter-system", "--wait=false"]);
        kubectl(&[
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            "app.kubernetes.io/instance=wasmfilter-operator",
        ]);
    }
}

#[test]
fn kustomize_installs_the_rendered_chart_and_the_samples_are_valid() {
    env();
    // config/default/operator.yaml is the chart rendered with its defaults.
    let rendered = ok(helm(&[
        "template",
        "wasmfilter-operator",
        CHART,
        "--namespace",
        "wasmfilter-system",
    ]));
    let rendered: String = rendered
        .lines()
        .filter(|l| !l.starts_with("# Source: "))
        .map(|l| format!("{l}\n"))
        .collect();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/default/operator.yaml"
    ))
    .unwrap();
    assert!(
        rendered == committed,
        "config/default/operator.yaml is stale: run e2e/generate.sh"
    );

    let _cleanup = KustomizeInstall;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default");
    ok(kubectl(&["apply", "-k", dir]));
    for (kind, name) in [
        ("deployment", "wasmfilter-operator"),
        ("serviceaccount", "wasmfilter-operator"),
        ("service", "wasmfilter-operator-cache"),
        ("service", "wasmfilter-operator-metrics"),
    ] {
        ok(kubectl(&["get", kind, name, "-n", "wasmfilter-system"]));
    }
    ok(kubectl(&["get", "clusterrole", "wasmfilter-operator"]));
    ok(kubectl(&[
        "get",
        "clusterrolebinding",
        "wasmfilter-operator-crds",
    ]));
    let out = kubectl(&[
        "auth",
        "can-i",
        "list",
        "secrets",
        "--as=system:serviceaccount:wasmfilter-system:wasmfilter-operator",
    ]);
    assert_eq!(
        stdout(&out).trim(),
        "no",
        "the operator must not list Secrets"
    );
    let out = kubectl(&[
        "auth",
        "can-i",
        "patch",
        "wasmplugins.extensions.istio.io",
        "-n",
        "default",
        "--as=system:serviceaccount:wasmfilter-system:wasmfilter-operator",
    ]);
    assert_eq!(stdout(&out).trim(), "yes");
    let out = kubectl(&[
        "auth",
        "can-i",
        "patch",
        "trafficextensions.extensions.istio.io",
        "-n",
        "default",
        "--as=system:serviceaccount:wasmfilter-system:wasmfilter-operator",
    ]);
    assert_eq!(stdout(&out).trim(), "yes");

    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/config/samples");
    ok(kubectl(&["apply", "--dry-run=server", "-k", samples]));
}
