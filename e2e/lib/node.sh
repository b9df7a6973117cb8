# The test environment's node (e2e/env.sh up --node): containerd, the kubelet, kube-scheduler,
# kube-proxy and CoreDNS, so pods run for real. Sourced by e2e/env.sh after lib/common.sh, never
# run. One node environment per machine (one bridge, one DNS port).
#
# Layout and what it changes on the host (node_down undoes each):
# - Pods get addresses on the bridge wfcni0, 10.244.0.0/24, host side 10.244.0.1 (CNI bridge
#   plugin, host-local IPAM). The bridge reaches nothing beyond this machine: no NAT, no route out.
#   Pods reach the API server, the registry and istiod through socat on 10.244.0.1 only (their
#   ports as on 127.0.0.1): nothing of ours listens beyond loopback and that bridge.
# - kube-proxy (nftables mode) routes Service IPs (10.96.0.0/16) to endpoints: its tables
#   `ip kube-proxy` and `ip6 kube-proxy`. Forwarding (pod -> Service -> pod) is switched on, and
#   our table `inet wasmfilter-node` drops every forwarded packet that does not stay on wfcni0,
#   so the host routes nothing it did not route before.
# - The kubelet writes a few kernel sysctls (vm.overcommit_memory, kernel.panic...) and iptables
#   canary chains (KUBE-*, in tables iptables-nft creates); containerd's CRI plugin mounts pod
#   network namespaces under /run/netns (cni-*) and its shims' sockets under /run/containerd;
#   pod cgroups live under kubepods/ in each cgroup v1 hierarchy. Everything else (containerd's
#   root and state, the kubelet's root, CNI state) is under $ENV_DIR/node.
# Cluster DNS is CoreDNS (its kubernetes plugin) as a host process on 10.244.0.1:53.
# The node is named `localhost` (the API server reaches its kubelet at 127.0.0.1) and tainted
# wasmfilter.dev/e2e-node:NoSchedule: the suite's many pods that are API objects only stay
# unscheduled, and a test that wants a pod to run tolerates the taint.

NODE_BRIDGE=wfcni0
NODE_HOST_IP=10.244.0.1
NODE_POD_CIDR=10.244.0.0/24
NODE_SERVICE_CIDR=10.96.0.0/16
NODE_TAINT=wasmfilter.dev/e2e-node
PAUSE_IMAGE_NAME=wasmfilter-e2e/pause:1
# Kernel settings the kubelet and kube-proxy may write; saved on up, restored on down.
NODE_SYSCTLS="net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet net.netfilter.nf_conntrack_max"

# node_stale_cleanup: a run that was killed (CI's time limit, a lost terminal) leaves its node
# running with nothing to stop it: its state directory may be gone. Its processes are found by
# what they run, and its host changes undone, before a new node starts. ip_forward goes back to
# 0 (its value on this machine before any node; the old run's saved value is lost with it).
node_stale_cleanup() {
  local pattern stale=0 ns
  for pattern in 'containerd --config .*/node/containerd\.toml' 'kubelet --config .*/node/kubelet\.yaml' \
      'kube-proxy .*--proxy-mode nftables --hostname-override localhost' 'coredns -conf .*/node/Corefile' \
      "socat TCP-LISTEN:[0-9]*,bind=$NODE_HOST_IP" 'containerd-shim-runc-v2 .*-address .*/node/containerd\.sock'; do
    if pgrep -f "$pattern" >/dev/null; then
      stale=1
      pkill -9 -f "$pattern" || true
    fi
  done
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && stale=1
  [ "$stale" = 1 ] || return 0
  log "node: cleaning up a node an earlier run left behind"
  node_kill_pods
  sleep 0.5
  findmnt -rn -o TARGET | grep -E '/node/(containerd|kubelet)(/|$)' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
  for ns in $(ls /run/netns 2>/dev/null | grep '^cni-'); do
    [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] || ip netns delete "$ns" 2>/dev/null || true
  done
  node_host_cleanup
  # The tables iptables-nft made for those chains, when nothing is left in them but ACCEPT
  # policies (an empty table does nothing, so this changes nothing another tool set up).
  local tool family table
  for tool in iptables ip6tables; do
    family=ip; [ "$tool" = ip6tables ] && family=ip6
    for table in mangle nat filter; do
      nft list table "$family" "$table" >/dev/null 2>&1 || continue
      if ! "$tool" -t "$table" -S 2>/dev/null | grep -qv '^-P [A-Z]* ACCEPT$'; then
        nft delete table "$family" "$table" 2>/dev/null || true
      fi
    done
  done
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  sysctl -qw net.ipv4.ip_forward=0
}

# node_network_up: the bridge, before the API server advertises its address.
node_network_up() {
  local n=$ENV_DIR/node
  node_stale_cleanup
  mkdir -p "$n"
  : >"$n/sysctls"
  for s in $NODE_SYSCTLS; do
    v=$(sysctl -n "$s" 2>/dev/null) && printf '%s=%s\n' "$s" "$v" >>"$n/sysctls"
  done
  ls /run/netns 2>/dev/null | sort >"$n/netns-before" || true
  nft list tables 2>/dev/null | sort >"$n/nft-before" || true
  [ -e /run/containerd ] || touch "$n/no-run-containerd"
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 || ip link add "$NODE_BRIDGE" type bridge
  ip addr replace "$NODE_HOST_IP/24" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  sysctl -qw net.ipv4.ip_forward=1
  # A pod's reply to another pod that reached it through a Service IP crosses the bridge
  # directly: only bridged traffic passing netfilter's conntrack gets its source translated back.
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null ||
    die "the kernel's br_netfilter is missing: pods could not reach each other through Services"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  nft -f - <<NFT
table inet wasmfilter-node {
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "$NODE_BRIDGE" oifname "$NODE_BRIDGE" accept
    drop
  }
}
NFT
}

# node_up API_PORT REGISTRY_PORT: the rest, once the API server and the registry run.
node_up() {
  local api_port=$1 reg_port=$2 n=$ENV_DIR/node d=$ENV_DIR/pki
  mkdir -p "$n"/{containerd,kubelet,cni,cni-state,runc}

  log "node: socat on $NODE_HOST_IP for the API server (:$api_port) and the registry (:$reg_port)"
  start bridge-apiserver socat "TCP-LISTEN:$api_port,bind=$NODE_HOST_IP,fork,reuseaddr" "TCP:127.0.0.1:$api_port"
  start bridge-registry socat "TCP-LISTEN:$reg_port,bind=$NODE_HOST_IP,fork,reuseaddr" "TCP:127.0.0.1:$reg_port"

  log "node: the pod sandbox image ($PAUSE_IMAGE_NAME) into the registry"
  local layout=$n/pause-image
  rm -rf "$layout"
  python3 "$ROOT/e2e/lib/image.py" "$layout" "$(printf '{"ref_name":"1","files":[{"dest":"pause","src":"%s","mode":493}],"config":{"Entrypoint":["/pause"],"User":"65535:65535"}}' "$PAUSE_BIN/pause")" >/dev/null
  "$ORAS_BIN/oras" cp --to-plain-http --from-oci-layout "$layout:1" "127.0.0.1:$reg_port/$PAUSE_IMAGE_NAME" >/dev/null

  # containerd pulls from the local registry over plain HTTP, by either address.
  local host
  for host in "127.0.0.1:$reg_port" "$NODE_HOST_IP:$reg_port"; do
    mkdir -p "$n/certs.d/$host"
    cat >"$n/certs.d/$host/hosts.toml" <<HOSTS
server = "http://$host"
[host."http://$host"]
  capabilities = ["pull", "resolve"]
HOSTS
  done
  cat >"$n/cni/10-wasmfilter.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "wasmfilter-e2e",
  "plugins": [{
    "type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$n/cni-state",
             "ranges": [[{"subnet": "$NODE_POD_CIDR", "gateway": "$NODE_HOST_IP"}]],
             "routes": [{"dst": "$NODE_SERVICE_CIDR"}]}
  }]
}
CNI
  cat >"$n/containerd.toml" <<TOML
version = 2
root = "$n/containerd/root"
state = "$n/containerd/state"
[grpc]
  address = "$n/containerd.sock"
[ttrpc]
  address = "$n/containerd-ttrpc.sock"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "127.0.0.1:$reg_port/$PAUSE_IMAGE_NAME"
  # No permission to lower oom_score_adj below containerd's own in this VM.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroup v1 and no systemd here: cgroupfs, as the kubelet.
        SystemdCgroup = false
        Root = "$n/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$n/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$n/certs.d"
TOML
  log "node: starting containerd"
  start containerd containerd --config "$n/containerd.toml"
  wait_for containerd 30 test -S "$n/containerd.sock"

  # Cluster DNS: CoreDNS's kubernetes plugin answers for Services and pods under cluster.local
  # (and nothing else: there is no upstream here), on the bridge address pods use.
  cat >"$n/Corefile" <<COREFILE
.:53 {
    bind $NODE_HOST_IP
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $ENV_DIR/kubeconfig local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
}
COREFILE
  log "node: starting CoreDNS on $NODE_HOST_IP:53"
  start coredns "$COREDNS_BIN/coredns" -conf "$n/Corefile"
  wait_for CoreDNS 30 python3 "$ROOT/e2e/lib/dns-query.py" "$NODE_HOST_IP" kubernetes.default.svc.cluster.local
  : >"$n/resolv.conf"

  local kubelet_port healthz_port
  kubelet_port=$(free_port); healthz_port=$(free_port)
  cat >"$n/kubelet.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $d/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$n/containerd.sock
# This VM has cgroup v1 and no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$NODE_HOST_IP]
# Pods resolve through the cluster DNS only (the host's resolver settings stay out of them).
resolvConf: $n/resolv.conf
registerWithTaints:
- {key: $NODE_TAINT, value: "true", effect: NoSchedule}
# Free space of a shared disk says nothing about the pods here.
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
KUBELET
  log "node: starting the kubelet (node localhost) and kube-scheduler"
  start kubelet "$K8S_BIN/kubelet" --config "$n/kubelet.yaml" --kubeconfig "$ENV_DIR/kubeconfig" \
    --root-dir "$n/kubelet" --hostname-override localhost -v=1
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$ENV_DIR/kubeconfig" \
    --authentication-kubeconfig "$ENV_DIR/kubeconfig" --authorization-kubeconfig "$ENV_DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false -v=1
  local kc=("$K8S_BIN/kubectl" --kubeconfig "$ENV_DIR/kubeconfig")
  wait_for "node Ready" 60 "${kc[@]}" wait --for condition=Ready --timeout 1s node/localhost

  log "node: starting kube-proxy (nftables)"
  start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig "$ENV_DIR/kubeconfig" --proxy-mode nftables \
    --hostname-override localhost --cluster-cidr "$NODE_POD_CIDR" \
    --nodeport-addresses "$NODE_HOST_IP/32" \
    --healthz-bind-address "127.0.0.1:$(free_port)" --metrics-bind-address "127.0.0.1:$(free_port)" \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 -v=1
  wait_for "kube-proxy's Service rules" 60 nft list table ip kube-proxy
}

# node_down: stops what node_up started and undoes its host changes (env.sh's stop_all has
# already signalled the processes it started).
node_down() {
  local n=$ENV_DIR/node
  [ -d "$n" ] || return 0
  # Containers outlive containerd (their shims keep them): kill every process in the pods'
  # cgroups, then the shims of this containerd.
  local i
  for i in 1 2 3; do
    node_kill_pods
    pkill -9 -f "containerd-shim-runc-v2 .*-address $n/containerd.sock" 2>/dev/null || true
    sleep 0.2
  done
  # Mounts under the node's directory (overlay roots, volumes, sandbox shm), deepest first.
  findmnt -rn -o TARGET | grep "^$n/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
  # Network namespaces the CRI plugin made.
  for ns in $(ls /run/netns 2>/dev/null | grep '^cni-'); do
    grep -qx "$ns" "$n/netns-before" 2>/dev/null || ip netns delete "$ns" 2>/dev/null || true
  done
  if findmnt -rn -o TARGET | grep -q "^$n/"; then
    die "mounts under $n remain (findmnt | grep $n): not deleting it"
  fi
  node_host_cleanup
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  # Tables iptables-nft made for those chains (none were there before), and containerd's
  # shim socket directory.
  nft list tables 2>/dev/null | sort | comm -13 "$n/nft-before" - | while read -r _ family name; do
    nft delete table "$family" "$name" 2>/dev/null || true
  done
  [ ! -e "$n/no-run-containerd" ] || rm -rf /run/containerd
  if [ -s "$n/sysctls" ]; then
    while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null || true; done <"$n/sysctls"
  fi
  node_leftovers
}

# node_kill_pods: kills every process in the pods' cgroups (containers outlive containerd).
node_kill_pods() {
  local procs
  for procs in /sys/fs/cgroup/pids/kubepods/cgroup.procs /sys/fs/cgroup/pids/kubepods/*/cgroup.procs \
      /sys/fs/cgroup/pids/kubepods/*/*/cgroup.procs /sys/fs/cgroup/pids/kubepods/*/*/*/cgroup.procs; do
    [ -e "$procs" ] && xargs -r kill -9 <"$procs" 2>/dev/null
  done
  return 0
}

# node_host_cleanup: once no pod runs, the pods' cgroups, kube-proxy's and our nftables tables
# and the kubelet's iptables chains.
node_host_cleanup() {
  local ctrl
  for ctrl in /sys/fs/cgroup/*/kubepods; do
    [ -d "$ctrl" ] && find "$ctrl" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  nft delete table ip kube-proxy 2>/dev/null || true
  nft delete table ip6 kube-proxy 2>/dev/null || true
  nft delete table inet wasmfilter-node 2>/dev/null || true
  node_iptables_cleanup
  return 0
}

# node_iptables_cleanup: the KUBE-* chains the kubelet (and kube-proxy's start) made, and the
# rules of the built-in chains that jump to them (KUBE-FIREWALL from INPUT…).
node_iptables_cleanup() {
  local tool table chain rule
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in mangle nat filter; do
      "$tool" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | sed 's/^-A /-D /' |
        while read -r rule; do eval "\"\$tool\" -t \"\$table\" $rule" 2>/dev/null || true; done || true
      for chain in $("$tool" -t "$table" -S 2>/dev/null | sed -n 's/^-N \(KUBE-[^ ]*\)$/\1/p'); do
        "$tool" -t "$table" -F "$chain" 2>/dev/null; "$tool" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  return 0
}

# node_leftovers: fails, naming them, if any of the node's processes or host changes remain.
node_leftovers() {
  local n=$ENV_DIR/node left=() kv tool table
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && left+=("the bridge $NODE_BRIDGE")
  for table in "ip kube-proxy" "ip6 kube-proxy" "inet wasmfilter-node"; do
    # shellcheck disable=SC2086
    nft list table $table >/dev/null 2>&1 && left+=("nftables table $table")
  done
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in mangle nat filter; do
      "$tool" -t "$table" -S 2>/dev/null | grep -q '^-N KUBE-' && left+=("$tool chains KUBE-* in $table")
    done
  done
  ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1 && left+=("kubepods cgroups")
  findmnt -rn -o TARGET | grep -q "^$n/" && left+=("mounts under $n")
  pgrep -f "$n/" >/dev/null && left+=("processes using $n: $(pgrep -f "$n/" | tr '\n' ' ')")
  for ns in $(ls /run/netns 2>/dev/null | grep '^cni-'); do
    grep -qx "$ns" "$n/netns-before" 2>/dev/null || left+=("network namespace $ns")
  done
  if [ -s "$n/sysctls" ]; then
    while IFS= read -r kv; do
      [ "$(sysctl -n "${kv%%=*}" 2>/dev/null)" = "${kv#*=}" ] || left+=("sysctl ${kv%%=*} (was ${kv#*=})")
    done <"$n/sysctls"
  fi
  ((${#left[@]} == 0)) || die "the test node left behind: ${left[*]}"
}
