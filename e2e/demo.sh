#!/usr/bin/env bash
# The main job on the embedded default: a local control plane, registry, the operator and two
# real Envoys of different versions, all brought up by the project itself on 127.0.0.1.
#   1. pushes a filter, applies a WasmFilter with target: Ecds; the operator resolves, verifies,
#      caches and checks it, and serves it to both Envoys over ECDS;
#   2. prints a response through each Envoy (the x-wasmfilter headers are the filter at work),
#      changes the filter's config and shows the change live, then the per-workload status
#      (each Envoy's reported version and whether it loaded the module);
#   3. the Istio path: the environment's real istiod, a gateway proxy run by the real
#      istio-agent (e2e/istio-proxy.sh), a WasmFilter with target: WasmPlugin, and a request
#      through the gateway.
# Stops everything it started at the end (WASMFILTER_KEEP_ENV=1 keeps the control plane up).
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

log "1/7 tools"
"$ROOT/e2e/setup.sh"
log "2/7 build the operator"
run_with_heartbeat "cargo build" cargo build --locked --bin wasmfilter
bin=$ROOT/target/debug/wasmfilter

log "3/7 local control plane and registry"
env_file=$("$ROOT/e2e/env.sh" up | tail -n 1)
# shellcheck disable=SC1090
source "$env_file"
work=$ROOT/target/e2e-env/demo
rm -rf "$work" && mkdir -p "$work"
pids=()
gateway_pid=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The gateway proxy runs in its own process group (the agent, Envoy, the port bridges).
  [ -z "$gateway_pid" ] || kill -TERM -- "-$gateway_pid" 2>/dev/null || true
  if [ "${WASMFILTER_KEEP_ENV:-0}" = 1 ]; then
    log "the control plane is still up: source $env_file; kubectl get wf -A. Stop it with e2e/env.sh down"
  else
    "$ROOT/e2e/env.sh" down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

log "4/7 operator (module cache, ECDS server)"
cache_port=$(free_port); admin_port=$(free_port); xds_port=$(free_port)
"$bin" operator --cache-url "http://wasmfilter-cache.wasmfilter-system.svc:$cache_port" \
  --cache-listen "127.0.0.1:$cache_port" --admin-listen "127.0.0.1:$admin_port" \
  --xds-listen "127.0.0.1:$xds_port" --istio-load-status \
  --cache-dir "$work/cache" --insecure-registry "$WASMFILTER_REGISTRY" >"$work/operator.log" 2>&1 &
pids+=($!)
wait_for "operator /readyz" 60 curl -fsS "http://127.0.0.1:$admin_port/readyz"

log "5/7 push a filter, two Envoy workloads, and a WasmFilter (target: Ecds)"
image=$WASMFILTER_REGISTRY/filters/add-header:1.0.0
"$bin" push tests/fixtures/modules/add_header.wat "$image" --plain-http --root-id add_header
kubectl delete namespace shop --ignore-not-found --wait=true --timeout=60s >/dev/null
kubectl create namespace shop >/dev/null
old_envoy=$(echo "$ENVOY_VERSIONS" | awk '{print $1}')
new_envoy=$(echo "$ENVOY_VERSIONS" | awk '{print $NF}')
# The workloads: pod objects (no kubelet here), each standing for one Envoy process below.
for v in "$old_envoy" "$new_envoy"; do
  cat <<YAML | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: checkout-${v//./-}, namespace: shop, labels: {app: checkout}}
spec: {containers: [{name: envoy, image: "docker.io/envoyproxy/envoy:v$v"}]}
YAML
done
cat <<YAML | tee "$work/wasmfilter.yaml" | kubectl apply -f -
apiVersion: wasmfilter.dev/v1alpha1
kind: WasmFilter
metadata: {name: add-header, namespace: shop}
spec:
  module: {image: "$image"}
  selector: {matchLabels: {app: checkout}}
  target: Ecds
  rootId: add_header
  config: {greeting: hello}
YAML

log "6/7 two real Envoys ($old_envoy over state-of-the-world ECDS, $new_envoy over delta), from examples/ecds-bootstrap.yaml"
declare -A listen
for v in "$old_envoy" "$new_envoy"; do
  pod=checkout-${v//./-}; listen[$v]=$(free_port); envoy_admin=$(free_port)
  api=GRPC; [ "$v" = "$new_envoy" ] && api=DELTA_GRPC
  sed -e "s/checkout-7d9f/$pod/g" -e "s/port_value: 9901/port_value: $envoy_admin/" \
      -e "s/port_value: 10000/port_value: ${listen[$v]}/" -e "s/port_value: 18000/port_value: $xds_port/" \
      -e "s/api_type: GRPC /api_type: $api /" examples/ecds-bootstrap.yaml >"$work/envoy-$v.yaml"
  "$WASMFILTER_ENVOY_DIR/$v/envoy" -c "$work/envoy-$v.yaml" --base-id "$RANDOM" --concurrency 1 \
    --log-path "$work/envoy-$v.log" >/dev/null 2>&1 &
  pids+=($!)
  wait_for "envoy $v" 30 curl -fsS "http://127.0.0.1:$envoy_admin/ready"
done
kubectl wait --for=condition=Ready wf/add-header -n shop --timeout=60s \
  || { tail -n 20 "$work/operator.log"; die "WasmFilter did not become Ready"; }
for v in "$old_envoy" "$new_envoy"; do
  echo; echo "\$ curl -si http://127.0.0.1:${listen[$v]}/    # Envoy $v"
  curl -sS -i "http://127.0.0.1:${listen[$v]}/"
done

log "changing the filter's config: greeting hello -> bonjour"
kubectl patch wf add-header -n shop --type merge -p '{"spec":{"config":{"greeting":"bonjour"}}}' >/dev/null
for v in "$old_envoy" "$new_envoy"; do
  wait_for "Envoy $v to run the new config" 30 \
    sh -c "curl -sS -i http://127.0.0.1:${listen[$v]}/ | grep -q bonjour"
  echo "Envoy $v: $(curl -sS -i "http://127.0.0.1:${listen[$v]}/" | grep -i '^x-wasmfilter-config')"
done
loaded_now() {
  [ "$(kubectl get wf add-header -n shop -o jsonpath='{.metadata.generation}/{.status.loadedWorkloads}')" = \
    "$(kubectl get wf add-header -n shop -o jsonpath='{.status.observedGeneration}')/2" ]
}
wait_for "both Envoys to report the new config loaded" 30 loaded_now
echo
kubectl get wf -n shop -o wide
echo
log "per workload: the Envoy version each proxy reported over xDS, and whether it loaded the module"
kubectl get wf add-header -n shop -o jsonpath='{range .status.workloads[*]}{.name}{"\t"}Envoy {.envoyVersion} ({.versionSource}){"\t"}compatible={.compatible}{"\t"}loaded={.loaded}{"\n"}{end}'
kubectl get wf add-header -n shop -o jsonpath='{.status.conditions[?(@.type=="Loaded")].message}{"\n"}'

log "7/7 the Istio path: istiod, a gateway proxy run by the real istio-agent, a WasmFilter with target: WasmPlugin"
# The operator's cache, as a Service name the gateway's pod resolves (here: its own /etc/hosts).
backend_port=$(free_port); gateway_port=$(free_port); gateway_admin=$(free_port); gateway_status=$(free_port)
mkdir -p "$work/www" && echo "hello from the backend" >"$work/www/index.html"
python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$work/www" >"$work/backend.log" 2>&1 &
pids+=($!)
setsid env ISTIO_PROXY_HOSTS=wasmfilter-cache.wasmfilter-system.svc ISTIO_PROXY_STATUS_PORT="$gateway_status" "$WASMFILTER_ISTIO_PROXY" \
  "$work/gateway" gateway shop '{"app":"gateway"}' "$gateway_admin" "$cache_port $backend_port" "$gateway_port" \
  >"$work/gateway.log" 2>&1 &
gateway_pid=$!
wait_for "the gateway's Envoy (through pilot-agent)" 60 curl -fsS "http://127.0.0.1:$gateway_admin/ready"
# Its pod object (no kubelet here), with the IP and status port its agent's metrics are at:
# the operator (--istio-load-status) reads them for the per-pod load status.
istio_envoy=$(basename "$(dirname "$WASMFILTER_ISTIO_ENVOY")")
cat <<YAML | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata:
  name: gateway
  namespace: shop
  labels: {app: gateway}
  annotations: {wasmfilter.dev/envoy-version: "$istio_envoy", status.sidecar.istio.io/port: "$gateway_status"}
spec: {containers: [{name: istio-proxy, image: "docker.io/istio/proxyv2:1.31.0"}]}
YAML
kubectl patch pod gateway -n shop --subresource=status --type=merge \
  -p '{"status":{"podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}' >/dev/null
cat <<YAML | kubectl apply -f - >/dev/null
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend, namespace: shop}
spec:
  hosts: [backend.shop.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: $backend_port, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gateway, namespace: shop}
spec:
  selector: {app: gateway}
  servers: [{port: {number: $gateway_port, name: http, protocol: HTTP}, bind: 127.0.0.1, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [gateway]
  http: [{route: [{destination: {host: backend.shop.test, port: {number: $backend_port}}}]}]
YAML
cat <<YAML | tee "$work/wasmfilter-istio.yaml" | kubectl apply -f -
apiVersion: wasmfilter.dev/v1alpha1
kind: WasmFilter
metadata: {name: add-header-istio, namespace: shop}
spec:
  module: {image: "$image"}
  selector: {matchLabels: {app: gateway}}
  target: WasmPlugin
  rootId: add_header
  config: {greeting: hello through Istio}
YAML
kubectl wait --for=condition=Ready wf/add-header-istio -n shop --timeout=60s \
  || { tail -n 20 "$work/operator.log"; die "WasmFilter did not become Ready"; }
wait_for "the filter in the gateway" 30 \
  sh -c "curl -sS -i http://127.0.0.1:$gateway_port/ | grep -qi '^x-wasmfilter-config'"
echo "\$ kubectl get wasmplugin add-header-istio -n shop -o jsonpath='{.spec.url}'"
kubectl get wasmplugin add-header-istio -n shop -o jsonpath='{.spec.url}{"\n"}'
echo "\$ curl -si http://127.0.0.1:$gateway_port/    # the Istio gateway: istiod -> pilot-agent -> Envoy $(basename "$(dirname "$WASMFILTER_ISTIO_ENVOY")")"
curl -sS -i "http://127.0.0.1:$gateway_port/"
istio_loaded() {
  [ "$(kubectl get wf add-header-istio -n shop -o jsonpath='{.status.loadedWorkloads}')" = 1 ]
}
wait_for "the gateway's metrics to show the filter running" 30 istio_loaded
echo
kubectl get wf -n shop -o wide
echo
log "per workload, for the Istio gateway: read from its istio-agent's metrics"
kubectl get wf add-header-istio -n shop -o jsonpath='{range .status.workloads[*]}{.name}{"\t"}Envoy {.envoyVersion} ({.versionSource}){"\t"}compatible={.compatible}{"\t"}loaded={.loaded}{"\n"}{end}'
kubectl get wf add-header-istio -n shop -o jsonpath='{.status.conditions[?(@.type=="Loaded")].message}{"\n"}'
log "done: the x-wasmfilter headers above were added by the Wasm filter; over ECDS it came inline, sha256-verified by the operator; through Istio the agent fetched it from the operator's cache, pinned by its sha256"
