//! On the test node (`e2e/env.sh up --node`: containerd, the kubelet, kube-scheduler,
//! kube-proxy and CoreDNS), the chart's operator runs as users run it: a pod from the operator's
//! image, pulled by containerd from the registry, Ready through its real probes, under the
//! chart's securityContext, reaching the API server through the `kubernetes` Service and the
//! registry from the pod network, serving its cache through its Service; `helm upgrade` rolls it
//! and `helm uninstall` leaves nothing behind (not even the leader Lease the operator made).
//! Two replicas hand over the Lease when the leader's pod goes; an Envoy pod and an Istio
//! gateway pod load their filters from the operator running in the cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;
use support::*;

fn the_node() -> TestNode {
    test_node().expect(
        "these tests need the test node: run `e2e/test.sh`, or `source $(e2e/env.sh up --node)` \
         then `cargo test --test node`",
    )
}

/// The operator's image (the static binary CI built, packed by `e2e/image.sh`), pushed once per
/// test run; its repository and tag.
fn operator_image() -> &'static (String, String) {
    static IMAGE: OnceLock<(String, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let repository = format!("{}/wasmfilter/operator", env().registry);
        let tag = format!("node-{:08x}", fastrand::u32(..));
        ok(
            Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/image.sh"))
                .args(["--no-build", &format!("{repository}:{tag}")])
                .output()
                .unwrap(),
        );
        (repository, tag)
    })
}

/// `helm install` into `ns`, watching `ns` only, scheduled on the test node, waiting until the
/// chart's pods are Ready (helm --wait reads the Deployment the kubelet's probes drive).
fn install(node: &TestNode, release: &str, ns: &str, extra: &[&str]) {
    let (repository, tag) = operator_image();
    let sets = [
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        format!("tolerations[0].key={}", node.taint),
        "tolerations[0].operator=Exists".to_string(),
        format!("registry.insecure[0]={}", node.registry),
        format!("watchNamespace={ns}"),
    ];
    let mut args = vec!["install", release, CHART, "--namespace", ns];
    for set in &sets {
        args.extend(["--set", set.as_str()]);
    }
    args.extend(extra);
    args.extend(["--wait", "--timeout", "120s"]);
    ok(helm(&args));
}

/// One test's installation: its namespace, the release installed there (watching it only)
/// and a client.
struct Installed {
    node: TestNode,
    client: kube::Client,
    ns: TestNamespace,
    release: String,
}

impl Installed {
    /// A new namespace `prefix-…` with the chart installed by `helm install … EXTRA --wait`.
    async fn new(prefix: &str, extra: &[&str]) -> Self {
        let node = the_node();
        let client = client().await;
        let ns = TestNamespace::new(prefix);
        let release = format!("r{}", &ns.name[ns.name.len() - 8..]);
        install(&node, &release, &ns.name, extra);
        Installed {
            node,
            client,
            ns,
            release,
        }
    }

    fn n(&self) -> &str {
        &self.ns.name
    }

    /// Pushes a module (`marker` makes it unique) for this test; its bytes, its sha256 and its
    /// reference as the operator's pod reaches the registry.
    async fn push_module(&self, marker: &str) -> (Vec<u8>, String, String) {
        let module = module(marker);
        let sha = wasmfilter::cache::sha256_hex(&module);
        let n = self.n();
        push_module(&format!("{}/node/{n}:v1", env().registry), module.clone()).await;
        (module, sha, format!("{}/node/{n}:v1", self.node.registry))
    }
}

async fn operator_pods(client: &kube::Client, ns: &str, release: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("app.kubernetes.io/instance={release}");
    pods.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits (bounded) until the release has exactly `count` pods, all Ready and none terminating.
async fn wait_ready_pods(client: &kube::Client, ns: &str, release: &str, count: usize) -> Vec<Pod> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pods = operator_pods(client, ns, release).await;
        if pods.len() == count && pods.iter().all(is_ready) {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{release} in {ns}: wanted {count} Ready pods, have {:?}",
            pods.iter()
                .map(|p| (p.metadata.name.clone(), is_ready(p)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The status of the pod's (first) container.
fn container_status(pod: &Pod) -> &k8s_openapi::api::core::v1::ContainerStatus {
    &pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .expect("no container statuses")[0]
}

/// The id containerd gave the pod's (first) container.
fn container_id(pod: &Pod) -> String {
    let id = container_status(pod).container_id.as_deref().unwrap();
    id.strip_prefix("containerd://").unwrap_or(id).to_string()
}

/// The host processes in a container's cgroup (the kubelet's cgroupfs layout names its id).
fn container_pids(id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(id))
        })
        .collect()
}

/// The host process of a pod's container that runs `/wasmfilter`.
fn container_process(pod: &Pod) -> u32 {
    let id = container_id(pod);
    for pid in container_pids(&id) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"/wasmfilter\0") {
            return pid;
        }
    }
    panic!("no /wasmfilter process in the cgroup of container {id}");
}

/// A `/proc/PID/status` field, e.g. `Uid`.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The mount options of what a process sees as `/` (the last mount there wins).
fn root_mount_options(pid: u32) -> String {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .rev()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            (fields.get(4) == Some(&"/")).then(|| fields[5].to_string())
        })
        .expect("no / in mountinfo")
}

/// The body of a successful GET of `url`, retried (bounded) while the connection is refused: a
/// Service's rules follow its pods' readiness a moment later (the endpointslice controller, then
/// kube-proxy).
async fn get_bytes(url: &str) -> Vec<u8> {
    let response = wait_for(
        &format!("a connection to {url}"),
        Duration::from_secs(30),
        || async { reqwest::get(url).await.ok() },
    )
    .await;
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.bytes().await.unwrap().to_vec()
}

/// The filter's `x-wasmfilter` header in a 200 answer from `url`, waited for (bounded).
async fn wait_filter_header(url: &str) -> String {
    wait_for(
        &format!("a 200 with the filter's header from {url}"),
        Duration::from_secs(60),
        || async {
            let response = reqwest::get(url).await.ok()?;
            let value = response
                .headers()
                .get("x-wasmfilter")?
                .to_str()
                .ok()?
                .to_string();
            (response.status() == 200).then_some(value)
        },
    )
    .await
}

/// Waits until the WasmFilter `hdr` says the pod `pod` loaded its module.
async fn wait_loaded(client: &kube::Client, ns: &str, pod: &str) -> wasmfilter::api::WasmFilter {
    wait_status(
        client,
        ns,
        "hdr",
        &format!("{pod} loaded the module"),
        |wf| {
            wf.status.as_ref().is_some_and(|s| {
                s.workloads
                    .iter()
                    .any(|w| w.name == pod && w.loaded == Some(true))
            })
        },
    )
    .await
}

#[tokio::test]
async fn the_chart_runs_the_operator_as_a_pod_that_reconciles_and_upgrade_and_uninstall_follow() {
    let t = Installed::new("node", &[]).await;
    let (client, n, release) = (&t.client, t.n(), t.release.as_str());
    let pods = wait_ready_pods(client, n, release, 1).await;
    let first = &pods[0];
    let status = container_status(first);
    assert_eq!(status.restart_count, 0, "{status:?}");
    let pod_spec = first.spec.as_ref().unwrap();
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some(format!("{release}-wasmfilter-operator").as_str()),
        "runs as the chart's ServiceAccount"
    );
    let spec = &pod_spec.containers[0];
    assert!(spec.readiness_probe.is_some() && spec.liveness_probe.is_some());

    // The chart's securityContext, as the kernel applies it to the running process.
    let pid = container_process(first);
    assert_eq!(proc_status(pid, "Uid"), "65532\t65532\t65532\t65532");
    assert_eq!(proc_status(pid, "Gid"), "65532\t65532\t65532\t65532");
    assert_eq!(
        proc_status(pid, "NoNewPrivs"),
        "1",
        "allowPrivilegeEscalation: false"
    );
    assert_eq!(
        proc_status(pid, "CapEff"),
        "0000000000000000",
        "capabilities: drop ALL"
    );
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "seccompProfile: RuntimeDefault"
    );
    let root = root_mount_options(pid);
    assert!(
        root.split(',').any(|o| o == "ro"),
        "root filesystem mounted {root}"
    );

    // It reconciles from inside the pod network: the API server through the `kubernetes`
    // Service, the module from the registry at the node's address.
    let (module, sha, image) = t.push_module("node-pod").await;
    Filter::new(n, "hdr", &image).apply();
    wait_module(client, n, "hdr", &sha).await;
    let plugin = child_api(client, n, "WasmPlugin").get("hdr").await.unwrap();
    let url = plugin.data["spec"]["url"].as_str().unwrap().to_string();
    let path = format!("/modules/sha256/{sha}.wasm");
    assert!(
        url.starts_with(&format!(
            "http://{release}-wasmfilter-operator-cache.{n}.svc"
        )) && url.ends_with(&path),
        "{url}"
    );
    // The cache serves the module through its Service (kube-proxy's rules) and at the pod.
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let svc = services
        .get(&format!("{release}-wasmfilter-operator-cache"))
        .await
        .unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();
    assert_eq!(
        get_bytes(&format!("http://{cluster_ip}:8080{path}")).await,
        module
    );
    let pod_ip = first.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert_eq!(
        get_bytes(&format!("http://{pod_ip}:8080{path}")).await,
        module
    );

    // `helm upgrade` with a changed value rolls the pod; the new one takes over.
    helm_upgrade_set(
        release,
        n,
        "resyncSeconds=120",
        &["--wait", "--timeout", "120s"],
    );
    let pods = wait_ready_pods(client, n, release, 1).await;
    let second = &pods[0];
    assert_ne!(
        second.metadata.name, first.metadata.name,
        "the pod was not replaced"
    );
    let args = second.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.contains(&"--resync-seconds=120".to_string()),
        "{args:?}"
    );
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "the first pod's process still runs"
    );
    Filter::new(n, "hdr", &image)
        .config(json!({"after": "upgrade"}))
        .apply();
    let wf = wait_condition(client, n, "hdr", "Ready", "True").await;
    assert_eq!(
        wf.status.unwrap().observed_generation,
        Some(2),
        "the new pod reconciled the change"
    );

    // `helm uninstall` stops the pod and leaves nothing of the release.
    ok(helm(&[
        "uninstall",
        release,
        "--namespace",
        n,
        "--wait",
        "--timeout",
        "120s",
    ]));
    wait_for(
        "no pod left after uninstall",
        Duration::from_secs(60),
        || async {
            operator_pods(client, n, release)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        container_pids(&container_id(second)),
        Vec::<u32>::new(),
        "the operator's processes still run after uninstall"
    );
    let selector = format!("app.kubernetes.io/instance={release}");
    for kind in ["deploy", "replicaset", "svc", "sa", "role", "rolebinding"] {
        let out = kubectl(&["get", kind, "-n", n, "-l", &selector, "-o", "name"]);
        assert_eq!(stdout(&out).trim(), "", "{kind} left after uninstall");
    }
    for kind in ["clusterrole", "clusterrolebinding"] {
        let out = kubectl(&["get", kind, "-l", &selector, "-o", "name"]);
        assert_eq!(stdout(&out).trim(), "", "{kind} left after uninstall");
    }
    // The leader Lease the operator made goes with its Deployment (the garbage collector
    // follows the owner reference the operator set).
    wait_for(
        "no Lease left after uninstall",
        Duration::from_secs(30),
        || async {
            let leases = stdout(&kubectl(&["get", "lease", "-n", n, "-o", "name"]));
            leases.trim().is_empty().then_some(())
        },
    )
    .await;
}

/// Two replicas: deleting the leader's pod (as a drain does) makes it give the Lease up, and
/// another replica (the other one, or the replacement the Deployment brings, whichever looks
/// first) takes it and carries on reconciling.
#[tokio::test]
async fn when_the_leader_pod_is_deleted_the_other_replica_takes_over() {
    let t = Installed::new("node-ha", &["--set", "replicaCount=2"]).await;
    let (client, n, release) = (&t.client, t.n(), t.release.as_str());
    let pods = wait_ready_pods(client, n, release, 2).await;
    let (_, sha, image) = t.push_module("node-ha").await;
    Filter::new(n, "hdr", &image).apply();
    wait_module(client, n, "hdr", &sha).await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let lease = format!("{release}-wasmfilter-operator");
    let holder = |lease: &Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    };
    let leader = holder(&leases.get(&lease).await.unwrap());
    let names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        names.contains(&leader),
        "{leader} leads, pods are {names:?}"
    );

    let pod_api: Api<Pod> = Api::namespaced(client.clone(), n);
    pod_api
        .delete(&leader, &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let successor = wait_for(
        &format!("the Lease to pass from {leader}"),
        Duration::from_secs(60),
        || async {
            let now = holder(&leases.get(&lease).await.unwrap());
            (!now.is_empty() && now != leader).then_some(now)
        },
    )
    .await;
    Filter::new(n, "hdr", &image)
        .config(json!({"after": "failover"}))
        .apply();
    let wf = wait_condition(client, n, "hdr", "Ready", "True").await;
    assert_eq!(wf.status.unwrap().observed_generation, Some(2));
    assert_eq!(
        holder(&leases.get(&lease).await.unwrap()),
        successor,
        "the change was reconciled under the new leader"
    );
    // The Deployment replaced the deleted pod; the new leader is one of the two running.
    let pods = wait_ready_pods(client, n, release, 2).await;
    let names: Vec<_> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        !names.contains(&leader) && names.contains(&successor),
        "{names:?}"
    );
}

/// An Envoy image (PyPI Envoy and the libraries it links, `e2e/envoy-image.sh`), pushed once.
fn envoy_image(version: &str) -> String {
    pushed_image(&format!("envoy:{version}"), &[version])
}

/// An Istio proxy image (the istio-agent and that Envoy, `e2e/envoy-image.sh --istio`).
fn istio_proxy_image(version: &str) -> String {
    pushed_image(&format!("istio-proxy:{version}"), &["--istio", version])
}

/// `e2e/envoy-image.sh ARGS` pushed as `name` in the test registry, once per test run.
fn pushed_image(name: &str, args: &[&str]) -> String {
    static PUSHED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let image = format!("{}/wasmfilter-e2e/{name}", env().registry);
    let mut pushed = PUSHED.lock().unwrap_or_else(|p| p.into_inner());
    if !pushed.contains(&image) {
        ok(
            Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/envoy-image.sh"))
                .args(args)
                .arg(&image)
                .output()
                .unwrap(),
        );
        pushed.push(image.clone());
    }
    image
}

/// The test backend's configuration: an Envoy answering every request on :8080 with 200
/// `hello from the backend`.
fn backend_config_map(ns: &str) -> serde_json::Value {
    let bootstrap = json!({
        "static_resources": {"listeners": [{
            "name": "backend",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "backend",
                    "route_config": {"virtual_hosts": [{
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                                    "direct_response": {"status": 200, "body": {"inline_string": "hello from the backend\n"}}}],
                    }]},
                    "http_filters": [{"name": "envoy.filters.http.router",
                                      "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                },
            }]}],
        }]},
    });
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "backend", "namespace": ns},
        "data": {"bootstrap.json": bootstrap.to_string()},
    })
}

/// The test backend's pod (label `app: backend`), from the Envoy image.
fn backend_pod(ns: &str, taint: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "backend", "namespace": ns, "labels": {"app": "backend"}},
        "spec": {
            "tolerations": [{"key": taint, "operator": "Exists"}],
            "containers": [{
                "name": "backend",
                "image": envoy_image("1.39.3"),
                "args": ["-c", "/etc/envoy/bootstrap.json"],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "bootstrap", "mountPath": "/etc/envoy"}],
            }],
            "volumes": [{"name": "bootstrap", "configMap": {"name": "backend"}}],
        },
    })
}

/// Waits (bounded) until the pod `name` is Ready.
async fn wait_pod_ready(client: &kube::Client, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pod = pods.get(name).await.unwrap();
        if is_ready(&pod) {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {ns}/{name} is not Ready: {:#?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An Envoy pod subscribed over ECDS to the operator inside the cluster, which it finds by the
/// operator Service's DNS name (CoreDNS) and reaches through kube-proxy's rules: it loads the
/// module, a request through the pod shows the filter's header, and the WasmFilter's status
/// lists the real pod with the version its Envoy reported and its ACK. When the kubelet
/// restarts the Envoy's container, the new Envoy loads the filter again.
#[tokio::test]
async fn an_envoy_pod_loads_the_module_from_the_in_cluster_operator_through_its_service() {
    let t = Installed::new("node-ecds", &["--set", "xds.enabled=true"]).await;
    let (client, n, release, node) = (&t.client, t.n(), t.release.as_str(), &t.node);
    let (_, sha, image) = t.push_module("node-ecds").await;
    Filter::new(n, "hdr", &image)
        .target(Target::Ecds)
        .app("envoy-web")
        .apply();

    // The bootstrap of the example, with the xDS cluster at the operator's Service name; the
    // node id (<pod>.<namespace>) comes from the pod's own name through --service-node.
    let mut b: serde_json::Value =
        serde_norway::from_str(include_str!("../examples/ecds-bootstrap.yaml")).unwrap();
    b.as_object_mut().unwrap().remove("node");
    b["admin"]["address"]["socket_address"]["port_value"] = json!(9901);
    let listener = &mut b["static_resources"]["listeners"][0];
    listener["address"]["socket_address"]["address"] = json!("0.0.0.0");
    let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"][0] = ecds_entry(&[&format!("{n}/hdr")]);
    let xds = &mut b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        [0]["endpoint"]["address"]["socket_address"];
    xds["address"] = json!(format!(
        "{release}-wasmfilter-operator-cache.{n}.svc.cluster.local"
    ));
    xds["port_value"] = json!(18000);
    let bootstrap = serde_json::to_string(&b).unwrap();
    let manifests = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "envoy", "namespace": n},
                "data": {"bootstrap.json": bootstrap},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "envoy-web", "namespace": n, "labels": {"app": "envoy-web"}},
                "spec": {
                    "tolerations": [{"key": node.taint, "operator": "Exists"}],
                    "containers": [{
                        "name": "envoy",
                        "image": envoy_image("1.39.3"),
                        "args": ["-c", "/etc/envoy/bootstrap.json",
                                 "--service-node", "$(POD_NAME).$(POD_NAMESPACE)",
                                 "--service-cluster", "envoy-web"],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        ],
                        "ports": [{"containerPort": 10000}],
                        // The listener serves only once its ECDS filter arrived.
                        "readinessProbe": {"tcpSocket": {"port": 10000}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "bootstrap", "mountPath": "/etc/envoy"}],
                    }],
                    "volumes": [{"name": "bootstrap", "configMap": {"name": "envoy"}}],
                },
            },
        ],
    });
    apply_ok(&serde_json::to_string(&manifests).unwrap());

    let pod = wait_pod_ready(client, n, "envoy-web").await;
    let first_container = container_id(&pod);
    let ip = pod.status.unwrap().pod_ip.unwrap();
    assert_eq!(
        wait_filter_header(&format!("http://{ip}:10000/")).await,
        "on"
    );

    let wf = wait_loaded(client, n, "envoy-web").await;
    let status = wf.status.unwrap();
    let w = status
        .workloads
        .iter()
        .find(|w| w.name == "envoy-web")
        .unwrap();
    assert_eq!(w.envoy_version.as_deref(), Some("1.39.3"), "{w:?}");
    assert_eq!(w.version_source, "xds-node", "{w:?}");
    assert_eq!(status.artifact.unwrap().module_sha256, sha);

    // The Envoy dies (killed on the host); the kubelet restarts its container, and the new
    // Envoy connects again and loads the filter again before its listener serves.
    for pid in container_pids(&first_container) {
        ok(Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output()
            .unwrap());
    }
    let restarted = wait_for(
        "the Envoy container restarted and Ready",
        Duration::from_secs(90),
        || async {
            let pod = wait_pod_ready(client, n, "envoy-web").await;
            (container_id(&pod) != first_container).then_some(pod)
        },
    )
    .await;
    assert_eq!(container_status(&restarted).restart_count, 1);
    assert_eq!(
        wait_filter_header(&format!("http://{ip}:10000/")).await,
        "on"
    );
    wait_loaded(client, n, "envoy-web").await;
}

/// An Istio gateway as users run one: a pod of the real istio-agent and Envoy (the image
/// `e2e/envoy-image.sh --istio` builds), configured by the test environment's istiod, routing
/// to a backend Service's pod. The operator, installed by the chart with `istio.loadStatus`,
/// writes the WasmPlugin; the agent fetches the module from the operator's cache by its
/// Service's DNS name; a request through the gateway pod reaches the backend and shows the
/// filter's header; and the operator reads the pod's own metrics at its pod IP to say the
/// filter runs there.
#[tokio::test]
async fn an_istio_gateway_pod_runs_the_filter_and_the_in_cluster_operator_sees_it_loaded() {
    let istiod = std::env::var("WASMFILTER_NODE_ISTIOD")
        .expect("WASMFILTER_NODE_ISTIOD (e2e/env.sh up --node, with istiod)");
    let t = Installed::new("node-istio", &["--set", "istio.loadStatus=true"]).await;
    let (client, n, node) = (&t.client, t.n(), &t.node);
    let (_, sha, image) = t.push_module("node-istio").await;
    Filter::new(n, "hdr", &image).app("gw").apply();

    let proxy_config = json!({
        "binaryPath": "/usr/local/bin/envoy",
        "configPath": "./etc/istio/proxy",
        "discoveryAddress": istiod,
        "controlPlaneAuthPolicy": "NONE",
        "proxyAdminPort": 15000,
        "statusPort": 15020,
        "proxyBootstrapTemplatePath": "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json",
        "drainDuration": "1s",
        "terminationDrainDuration": "1s",
        "concurrency": 1,
        "proxyStatsMatcher": {"inclusionPrefixes": ["extension_config_discovery", "wasm"]},
    });
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let manifests = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "gw", "namespace": n},
                "spec": {
                    "selector": {"istio": "gw"},
                    "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}],
                },
            },
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": "gw", "namespace": n},
                "spec": {
                    "hosts": ["*"],
                    "gateways": ["gw"],
                    "http": [{"route": [{"destination": {
                        "host": format!("backend.{n}.svc.cluster.local"),
                        "port": {"number": 8080},
                    }}]}],
                },
            },
            backend_config_map(n),
            backend_pod(n, &node.taint),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "backend", "namespace": n},
                "spec": {"selector": {"app": "backend"}, "ports": [{"name": "http", "port": 8080}]},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "gw",
                    "namespace": n,
                    "labels": {"app": "gw", "istio": "gw"},
                    // The Envoy in the image; the operator checks the module against it.
                    "annotations": {"wasmfilter.dev/envoy-version": "1.39.3"},
                },
                "spec": {
                    "tolerations": [{"key": node.taint, "operator": "Exists"}],
                    "containers": [{
                        "name": "istio-proxy",
                        "image": istio_proxy_image("1.39.3"),
                        "args": ["proxy", "router", "--proxyLogLevel", "warning"],
                        // The agent keeps its sockets and Envoy's config under its working
                        // directory, and downloaded modules in /var/lib/istio/data.
                        "workingDir": "/home/istio-proxy",
                        "env": [
                            {"name": "PROXY_CONFIG", "value": proxy_config.to_string()},
                            {"name": "FILE_MOUNTED_CERTS", "value": "true"},
                            {"name": "ISTIO_METAJSON_LABELS", "value": r#"{"app":"gw","istio":"gw"}"#},
                            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
                            {"name": "INSTANCE_IP", "valueFrom": field("status.podIP")},
                        ],
                        "ports": [{"containerPort": 8080}, {"containerPort": 15020}],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020}, "periodSeconds": 1},
                        "volumeMounts": [
                            {"name": "home", "mountPath": "/home/istio-proxy"},
                            {"name": "data", "mountPath": "/var/lib/istio/data"},
                        ],
                    }],
                    "volumes": [{"name": "home", "emptyDir": {}}, {"name": "data", "emptyDir": {}}],
                },
            },
        ],
    });
    apply_ok(&serde_json::to_string(&manifests).unwrap());
    let pod = wait_pod_ready(client, n, "gw").await;
    let ip = pod.status.unwrap().pod_ip.unwrap();

    assert_eq!(
        wait_filter_header(&format!("http://{ip}:8080/")).await,
        "on"
    );
    let body = reqwest::get(format!("http://{ip}:8080/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        body, "hello from the backend\n",
        "routed to the backend Service's pod"
    );

    let wf = wait_loaded(client, n, "gw").await;
    assert_eq!(wf.status.unwrap().artifact.unwrap().module_sha256, sha);
}
