#!/usr/bin/env bash
# The local test environment: etcd, kube-apiserver and kube-controller-manager (garbage collector,
# namespaces, service accounts) with Istio's and our CRDs, a real OCI registry and a real istiod
# (pilot-discovery; WASMFILTER_ISTIOD=0 leaves it out), all on 127.0.0.1. Without --node there
# is no kubelet: tests create pods as API objects, and run Istio gateway proxies with
# e2e/istio-proxy.sh. With --node (root only) a one-node cluster runs pods for real: containerd,
# the kubelet, kube-scheduler, kube-proxy and the controllers pods need (see e2e/lib/node.sh).
#
#   e2e/env.sh up [--node]   start it (or reuse a healthy one) and print the env file to source
#   e2e/env.sh down          stop it, delete its state and undo the node's host changes
#
# State lives in $WASMFILTER_ENV_DIR (default target/e2e-env); its `env` file exports
# KUBECONFIG, WASMFILTER_REGISTRY, WASMFILTER_ENVOY_DIR and a PATH with kubectl.
source "$(dirname "$0")/lib/common.sh"
source "$(dirname "$0")/lib/node.sh"

ENV_DIR=${WASMFILTER_ENV_DIR:-$ROOT/target/e2e-env}

stop_all() {
  for f in "$ENV_DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
  done
  # Give them a moment to exit, bounded.
  for _ in $(seq 1 20); do
    alive=0
    for f in "$ENV_DIR"/pids/*.pid; do
      [ -e "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.25
  done
  for f in "$ENV_DIR"/pids/*.pid; do
    [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
}

healthy() {
  [ -s "$ENV_DIR/env" ] || return 1
  # shellcheck disable=SC1091
  ( source "$ENV_DIR/env" && kubectl get --raw /readyz >/dev/null 2>&1 \
      && curl -fsS "http://$WASMFILTER_REGISTRY/v2/" >/dev/null 2>&1 \
      && { [ -z "${WASMFILTER_ISTIOD_HTTP:-}" ] || curl -fsS "http://$WASMFILTER_ISTIOD_HTTP/ready" >/dev/null 2>&1; } \
      && { [ "$NODE" = 0 ] || { [ "${WASMFILTER_NODE:-0}" = 1 ] \
             && kubectl wait --for condition=Ready --timeout 5s node/localhost >/dev/null 2>&1; }; } )
}

start() { # start NAME CMD...: runs CMD in the background, logging to $ENV_DIR/logs/NAME.log
  local name=$1; shift
  nohup "$@" >"$ENV_DIR/logs/$name.log" 2>&1 &
  echo $! >"$ENV_DIR/pids/$name.pid"
}

pki() {
  local d=$ENV_DIR/pki
  mkdir -p "$d"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$d/ca.key" -subj "/CN=wasmfilter-test-ca" -days 30 -out "$d/ca.crt" 2>/dev/null
  # name CN O SAN
  cert() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$1.key" 2>/dev/null
    openssl req -new -key "$d/$1.key" -subj "/CN=$2${3:+/O=$3}" -out "$d/$1.csr" 2>/dev/null
    local ext="$d/$1.ext"
    if [ -n "${4:-}" ]; then printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$4" >"$ext"
    else printf 'extendedKeyUsage=clientAuth\n' >"$ext"; fi
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 30 -extfile "$ext" -out "$d/$1.crt" 2>/dev/null
  }
  # 10.96.0.1: the `kubernetes` Service, how pods on the test node reach the API server.
  cert apiserver kube-apiserver "" "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin admin system:masters
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/sa.key" 2>/dev/null
  openssl pkey -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() { # kubeconfig FILE PORT
  local d=$ENV_DIR/pki
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority-data: $(base64 -w0 "$d/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$d/admin.crt")
    client-key-data: $(base64 -w0 "$d/admin.key")
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
KC
}

up() {
  if healthy; then
    log "test environment already up ($ENV_DIR/env)"
    echo "$ENV_DIR/env"
    return
  fi
  "$ROOT/e2e/setup.sh"
  stop_all
  node_down
  rm -rf "$ENV_DIR"
  mkdir -p "$ENV_DIR"/{logs,pids,etcd,registry}
  pki
  # Without a node: no service accounts are made, so their admission stays off (pods are API
  # objects only). With one: the API server advertises the bridge address for the `kubernetes`
  # Service, reaches the kubelet as `localhost`, and pods get their service account tokens.
  local api_node_flags=(--advertise-address 127.0.0.1 --disable-admission-plugins ServiceAccount)
  local controllers=garbagecollector,namespace
  if [ "$NODE" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--node needs root (a bridge, nftables, mounts)"
    node_network_up
    api_node_flags=(--advertise-address "$NODE_HOST_IP"
      --kubelet-client-certificate "$ENV_DIR/pki/admin.crt" --kubelet-client-key "$ENV_DIR/pki/admin.key"
      --kubelet-preferred-address-types Hostname)
    controllers=$controllers,deployment,replicaset,serviceaccount,serviceaccount-token,root-ca-cert-publisher,endpointslice,nodelifecycle,podgc
  fi

  local etcd_port peer_port api_port reg_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); reg_port=$(free_port)

  log "starting etcd on 127.0.0.1:$etcd_port"
  start etcd "$K8S_BIN/etcd" --name default --data-dir "$ENV_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/health"

  log "starting kube-apiserver on https://127.0.0.1:$api_port"
  local d=$ENV_DIR/pki
  start kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 "${api_node_flags[@]}" --secure-port "$api_port" \
    --tls-cert-file "$d/apiserver.crt" --tls-private-key-file "$d/apiserver.key" \
    --client-ca-file "$d/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$d/sa.pub" --service-account-signing-key-file "$d/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --authorization-mode RBAC \
    --enable-priority-and-fairness=false --profiling=false -v=1
  kubeconfig "$ENV_DIR/kubeconfig" "$api_port"
  wait_for kube-apiserver 90 "$K8S_BIN/kubectl" --kubeconfig "$ENV_DIR/kubeconfig" get --raw /readyz

  log "starting kube-controller-manager ($controllers)"
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$ENV_DIR/kubeconfig" --secure-port 0 --leader-elect=false \
    --controllers "$controllers" \
    --service-account-private-key-file "$ENV_DIR/pki/sa.key" --root-ca-file "$ENV_DIR/pki/ca.crt" \
    --concurrent-gc-syncs 5 --namespace-sync-period 10s -v=1

  log "starting OCI registry (docker-registry) on 127.0.0.1:$reg_port"
  cat >"$ENV_DIR/registry.yml" <<RC
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $ENV_DIR/registry}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$reg_port
RC
  start registry /usr/bin/docker-registry serve "$ENV_DIR/registry.yml"
  wait_for registry 30 curl -fsS "http://127.0.0.1:$reg_port/v2/"

  local node_env=""
  if [ "$NODE" = 1 ]; then
    node_up "$api_port" "$reg_port"
    node_env="export WASMFILTER_NODE=1
export WASMFILTER_NODE_REGISTRY=$NODE_HOST_IP:$reg_port
export WASMFILTER_NODE_TAINT=$NODE_TAINT"
  fi

  log "installing Istio $ISTIO_API_VERSION CRDs, Argo CD's and Flux's (for gitops/), and the WasmFilter CRD"
  local kc=("$K8S_BIN/kubectl" --kubeconfig "$ENV_DIR/kubeconfig")
  "${kc[@]}" apply --server-side -f "$ISTIO_CRDS" >/dev/null
  "${kc[@]}" apply --server-side -f "$GITOPS_CRDS" >/dev/null
  "${kc[@]}" apply --server-side -f "$ROOT/crds/wasmfilter.dev_wasmfilters.yaml" >/dev/null
  "${kc[@]}" wait --for condition=Established --timeout 60s crd --all >/dev/null

  local istio_env=""
  if [ "${WASMFILTER_ISTIOD:-1}" != 0 ]; then
    local xds_port http_port mon_port
    xds_port=$(free_port); http_port=$(free_port); mon_port=$(free_port)
    log "starting istiod (pilot-discovery) with plaintext xDS on 127.0.0.1:$xds_port"
    "${kc[@]}" create namespace istio-system >/dev/null
    cat >"$ENV_DIR/mesh.yaml" <<MESH
# No mTLS between proxies: there is no CA here, and the tests' backends are plain HTTP.
enableAutoMtls: false
MESH
    # What is switched off, and why:
    # - ENABLE_CA_SERVER=false: no Istio CA (proxies run with FILE_MOUNTED_CERTS, see
    #   e2e/istio-proxy.sh); --secureGRPCAddr/--httpsAddr "": no TLS ports, so no certificates;
    # - INJECTION_/VALIDATION_WEBHOOK_CONFIG_NAME empty: no webhook configurations to patch;
    # - PILOT_ENABLE_GATEWAY_API=false: the Gateway API CRDs are not installed;
    # - PILOT_ENABLE_METADATA_EXCHANGE=false, PILOT_ENABLE_ALPN_FILTER=false: istio.metadata_exchange
    #   and istio.alpn exist only in Istio's Envoy build; upstream Envoy refuses listeners and
    #   clusters naming them;
    # - PILOT_SCOPE_GATEWAY_TO_NAMESPACE=true: a Gateway selects proxies in its own namespace only,
    #   so tests in parallel namespaces never share one;
    # - --ctrlz_port 0: ControlZ on a free loopback port instead of 9876.
    ENABLE_CA_SERVER=false INJECTION_WEBHOOK_CONFIG_NAME= VALIDATION_WEBHOOK_CONFIG_NAME= \
    PILOT_ENABLE_GATEWAY_API=false PILOT_ENABLE_METADATA_EXCHANGE=false PILOT_ENABLE_ALPN_FILTER=false \
    PILOT_SCOPE_GATEWAY_TO_NAMESPACE=true POD_NAMESPACE=istio-system \
      start istiod "$ISTIO_BIN/pilot-discovery" discovery --kubeconfig "$ENV_DIR/kubeconfig" \
        --meshConfig "$ENV_DIR/mesh.yaml" --networksConfig /dev/null --domain cluster.local \
        --grpcAddr "127.0.0.1:$xds_port" --httpAddr "127.0.0.1:$http_port" \
        --monitoringAddr "127.0.0.1:$mon_port" --secureGRPCAddr "" --httpsAddr "" --ctrlz_port 0
    wait_for istiod 60 curl -fsS "http://127.0.0.1:$http_port/ready"
    local node_istiod=""
    if [ "$NODE" = 1 ]; then
      # Istio proxies in pods reach istiod's xDS at the bridge address, like the API server.
      start bridge-istiod socat "TCP-LISTEN:$xds_port,bind=$NODE_HOST_IP,fork,reuseaddr" "TCP:127.0.0.1:$xds_port"
      node_istiod="export WASMFILTER_NODE_ISTIOD=$NODE_HOST_IP:$xds_port"
    fi
    istio_env="export WASMFILTER_ISTIOD_XDS=127.0.0.1:$xds_port
export WASMFILTER_ISTIOD_HTTP=127.0.0.1:$http_port
export WASMFILTER_ISTIO_BIN=$ISTIO_BIN
export WASMFILTER_ISTIO_ENVOY=$WASMFILTER_CACHE/envoy/$ISTIO_ENVOY_VERSION/envoy
export WASMFILTER_ISTIO_PROXY=$ROOT/e2e/istio-proxy.sh
$node_istiod"
  fi

  cat >"$ENV_DIR/env" <<ENV
export KUBECONFIG=$ENV_DIR/kubeconfig
export WASMFILTER_REGISTRY=127.0.0.1:$reg_port
export WASMFILTER_REGISTRY_ROOT=$ENV_DIR/registry
export WASMFILTER_ENV_PIDS=$ENV_DIR/pids
export WASMFILTER_ENVOY_DIR=$WASMFILTER_CACHE/envoy
export WASMFILTER_ENVOY_VERSIONS="$ENVOY_VERSIONS"
export WASMFILTER_ORAS=$ORAS_BIN/oras
export WASMFILTER_COSIGN=$COSIGN_BIN/cosign
export WASMFILTER_HELM=$HELM_BIN/helm
export WASMFILTER_KSTATUS=$KSTATUS_BIN/kstatus
export WASMFILTER_FIXTURE_MODULES=$FIXTURE_MODULES
export PATH=$K8S_BIN:\$PATH
$istio_env
$node_env
ENV
  log "test environment up: source $ENV_DIR/env"
  echo "$ENV_DIR/env"
}

NODE=0
[ "${2:-}" = --node ] && NODE=1
case "${1:-}" in
  up) up ;;
  down) stop_all; node_down; rm -rf "$ENV_DIR"; log "test environment stopped" ;;
  *) echo "usage: $0 up [--node] | down" >&2; exit 2 ;;
esac
