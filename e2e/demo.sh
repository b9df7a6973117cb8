#!/usr/bin/env bash
# The main job on the embedded default: a local control plane, registry and Envoy, brought up by
# the project itself. Pushes a filter, applies a WasmFilter, lets the operator resolve, verify,
# cache and deploy it, then sends a request through a real Envoy configured from the generated
# EnvoyFilter and prints the response: its x-wasmfilter headers are the filter at work.
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

log "1/6 tools"
"$ROOT/e2e/setup.sh"
log "2/6 build the operator"
run_with_heartbeat "cargo build" cargo build --locked --bin wasmfilter
bin=$ROOT/target/debug/wasmfilter

log "3/6 local control plane and registry"
env_file=$("$ROOT/e2e/env.sh" up | tail -n 1)
# shellcheck disable=SC1090
source "$env_file"
work=$ROOT/target/e2e-env/demo
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

log "4/6 operator"
cache_port=$(free_port); admin_port=$(free_port)
"$bin" operator --cache-url http://wasmfilter-cache.wasmfilter-system.svc:8080 \
  --cache-listen "127.0.0.1:$cache_port" --admin-listen "127.0.0.1:$admin_port" \
  --cache-dir "$work/cache" --insecure-registry "$WASMFILTER_REGISTRY" >"$work/operator.log" 2>&1 &
pids+=($!)
wait_for "operator /readyz" 60 curl -fsS "http://127.0.0.1:$admin_port/readyz"

log "5/6 push a filter and apply a WasmFilter"
image=$WASMFILTER_REGISTRY/filters/add-header:1.0.0
"$bin" push tests/fixtures/modules/add_header.wat "$image" --plain-http --root-id add_header
kubectl delete namespace shop --ignore-not-found --wait=true --timeout=60s >/dev/null
kubectl create namespace shop >/dev/null
envoy_version=$(echo "$ENVOY_VERSIONS" | awk '{print $NF}')
# The workload the filter selects: a pod object (no kubelet here) running the Envoy below.
cat <<YAML | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: checkout, namespace: shop, labels: {app: checkout}}
spec: {containers: [{name: envoy, image: "docker.io/envoyproxy/envoy:v$envoy_version"}]}
YAML
cat <<YAML | tee "$work/wasmfilter.yaml" | kubectl apply -f -
apiVersion: wasmfilter.dev/v1alpha1
kind: WasmFilter
metadata: {name: add-header, namespace: shop}
spec:
  module: {image: "$image"}
  selector: {matchLabels: {app: checkout}}
  target: EnvoyFilter
  rootId: add_header
  config: {greeting: hello}
YAML
kubectl wait --for=condition=Ready wf/add-header -n shop --timeout=60s \
  || { tail -n 20 "$work/operator.log"; die "WasmFilter did not become Ready"; }
kubectl get wf -n shop
log "the operator checked the module against the selected workload's Envoy before deploying:"
kubectl get wf add-header -n shop -o jsonpath='{.status.conditions[?(@.type=="Compatible")].message}{"\n"}'
"$bin" check tests/fixtures/modules/add_header.wat $(for v in $ENVOY_VERSIONS; do printf -- '--envoy %s ' "$v"; done)
kubectl get envoyfilter add-header -n shop -o json >"$work/envoyfilter.json"

log "6/6 a real Envoy ($envoy_version) with the generated filter"
listen_port=$(free_port); envoy_admin=$(free_port)
python3 "$ROOT/e2e/envoy/bootstrap.py" "$work/envoyfilter.json" "$listen_port" "$envoy_admin" "$cache_port" >"$work/envoy.json"
"$WASMFILTER_ENVOY_DIR/$envoy_version/envoy" -c "$work/envoy.json" \
  --base-id "$RANDOM" --concurrency 1 --log-path "$work/envoy.log" >/dev/null 2>&1 &
pids+=($!)
wait_for "envoy" 30 curl -fsS "http://127.0.0.1:$envoy_admin/ready"
echo
echo "\$ curl -i http://127.0.0.1:$listen_port/"
curl -sS -i "http://127.0.0.1:$listen_port/"
echo
log "the x-wasmfilter headers above were added by the Wasm filter, fetched by Envoy from the operator's cache (sha256-pinned)"
log "the control plane is still up: source $env_file; kubectl get wf -A. Stop it with e2e/env.sh down"
