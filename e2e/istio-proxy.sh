#!/usr/bin/env bash
# One Istio proxy (a gateway, or a sidecar) as a pod runs it: the real istio-agent (pilot-agent)
# starting a real Envoy, configured by the test environment's istiod. Used by the tests and the
# demo.
#
#   e2e/istio-proxy.sh DIR POD NAMESPACE LABELS_JSON ADMIN_PORT "REACHES" "SERVES"
#
# DIR        working directory (the agent's cwd, Envoy's config, the sockets below)
# POD        pod name and NAMESPACE the proxy says it is (the xDS node is POD.NAMESPACE)
# LABELS_JSON the proxy's labels, e.g. '{"istio":"gw"}' (Gateways and WasmPlugins select on them)
# ADMIN_PORT Envoy's admin port, reachable from the host at 127.0.0.1:ADMIN_PORT
# REACHES    loopback ports of the host the proxy connects to (istiod, the module cache, backends)
# SERVES     ports the proxy listens on (gateway listeners, a sidecar's inbound ports),
#            reachable from the host at the same number on 127.0.0.1
#
# The agent binds its status server (a port it refuses to leave unset) on every interface, and
# keeps downloaded Wasm modules in the fixed /var/lib/istio/data. So the agent and its Envoy run
# in their own network and mount namespaces, as in a pod: loopback only, and DIR/var-lib mounted
# on /var/lib. Each port in REACHES and SERVES is carried between the two loopbacks by a pair of
# socat processes meeting at a Unix socket in DIR; nothing listens beyond 127.0.0.1 on the host
# and nothing is changed on it. Ends when the agent ends; stop it by signalling its process group.
#
# Environment: WASMFILTER_ISTIO_BIN (pilot-agent, envoy_bootstrap.json), WASMFILTER_ISTIOD_XDS
# (istiod's plaintext xDS address, 127.0.0.1:PORT) and WASMFILTER_ISTIO_ENVOY (the Envoy binary);
# ISTIO_PROXY_HOSTS, if set, names hosts the proxy resolves to 127.0.0.1 (its own /etc/hosts, as
# a pod has; say a Service's name, `wasmfilter-cache.wasmfilter-system.svc`).
# ISTIO_PROXY_STATUS_PORT, if set, is the agent's status port (its merged metrics at
# /stats/prometheus), reachable from the host at the same number; else 15020, in the proxy's
# namespace only.
# ISTIO_PROXY_NO_PKEYS=1 runs Envoy with memory protection keys refused (e2e/lib/no-pkeys.py:
# Envoy 1.36's V8 crashes on CPUs that have them once a Wasm filter reaches a running proxy).
# ISTIO_PROXY_TYPE=sidecar runs a sidecar instead of a gateway (`pilot-agent proxy sidecar`),
# with interception mode NONE: no iptables, so its inbound listeners are the ones a `Sidecar`
# resource's `ingress` declares, bound where it says (Istio's mode for VMs without iptables).
set -euo pipefail
(($# == 7)) || { sed -n '6,14p' "$0" >&2; exit 2; }
dir=$1 pod=$2 namespace=$3 labels=$4 admin=$5 reaches=$6 serves=$7
: "${WASMFILTER_ISTIO_BIN:?}" "${WASMFILTER_ISTIOD_XDS:?}" "${WASMFILTER_ISTIO_ENVOY:?}"
mkdir -p "$dir"
istiod_port=${WASMFILTER_ISTIOD_XDS##*:}
status_port=${ISTIO_PROXY_STATUS_PORT:-15020}
[ -z "${ISTIO_PROXY_STATUS_PORT:-}" ] || serves="$serves $status_port"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# Host side: the proxy's connections out arrive on DIR/out-PORT.sock; connections to its ports
# leave through DIR/in-PORT.sock.
for p in $istiod_port $reaches; do
  socat "UNIX-LISTEN:$dir/out-$p.sock,fork,unlink-early" "TCP:127.0.0.1:$p" &
  pids+=($!)
done
for p in $admin $serves; do
  socat "TCP-LISTEN:$p,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$dir/in-$p.sock" &
  pids+=($!)
done

# The agent's settings, each switching off what needs a real cluster:
# - FILE_MOUNTED_CERTS: no certificate from a CA (istiod runs without one; the gateway serves
#   plain HTTP), so the agent starts its SDS server without a CA client;
# - controlPlaneAuthPolicy NONE: plaintext xDS to istiod;
# - proxyBootstrapTemplatePath: Istio's template with its wildcard listeners on loopback;
# - drain durations of a second, so a stopped proxy goes at once;
# - proxyStatsMatcher: Envoy's ECDS and Wasm counters, which Istio's bootstrap leaves out unless
#   asked (as a pod asks with the proxy.istio.io/config annotation).
envoy=$WASMFILTER_ISTIO_ENVOY
if [ "${ISTIO_PROXY_NO_PKEYS:-0}" = 1 ]; then
  # The agent runs binaryPath with Envoy's arguments.
  envoy=$dir/envoy-no-pkeys
  printf '#!/bin/sh\nexec /usr/bin/python3 %q %q "$@"\n' \
    "$(cd "$(dirname "$0")" && pwd)/lib/no-pkeys.py" "$WASMFILTER_ISTIO_ENVOY" >"$envoy"
  chmod +x "$envoy"
fi
export PROXY_CONFIG="{\"binaryPath\": \"$envoy\", \"configPath\": \"$dir/envoy\",
  \"discoveryAddress\": \"127.0.0.1:$istiod_port\", \"controlPlaneAuthPolicy\": \"NONE\",
  \"proxyAdminPort\": $admin, \"statusPort\": $status_port, \"proxyBootstrapTemplatePath\": \"$WASMFILTER_ISTIO_BIN/envoy_bootstrap.json\",
  \"drainDuration\": \"1s\", \"terminationDrainDuration\": \"1s\", \"concurrency\": 1,
  \"proxyStatsMatcher\": {\"inclusionPrefixes\": [\"extension_config_discovery\", \"wasm\"]}}"
export FILE_MOUNTED_CERTS=true POD_NAME=$pod POD_NAMESPACE=$namespace INSTANCE_IP=127.0.0.1 \
  ISTIO_METAJSON_LABELS=$labels
proxy_type=${ISTIO_PROXY_TYPE:-router}
case "$proxy_type" in
  router) ;;
  sidecar) export ISTIO_META_INTERCEPTION_MODE=NONE ;;
  *) echo "ISTIO_PROXY_TYPE must be router or sidecar, not $proxy_type" >&2; exit 2 ;;
esac

unshare_flags=(--net --mount)
[ "$(id -u)" = 0 ] || unshare_flags+=(--map-root-user)
cd "$dir"
unshare "${unshare_flags[@]}" bash -c '
  set -euo pipefail
  dir=$1 reaches=$2 serves=$3; shift 3
  ip link set lo up
  mkdir -p "$dir/var-lib/istio/data"
  mount --bind "$dir/var-lib" /var/lib
  if [ -n "${ISTIO_PROXY_HOSTS:-}" ]; then
    { cat /etc/hosts; echo "127.0.0.1 $ISTIO_PROXY_HOSTS"; } >"$dir/hosts"
    mount --bind "$dir/hosts" /etc/hosts
  fi
  trap "kill \$(jobs -p) 2>/dev/null || true" EXIT
  for p in $reaches; do
    socat "TCP-LISTEN:$p,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$dir/out-$p.sock" &
  done
  for p in $serves; do
    socat "UNIX-LISTEN:$dir/in-$p.sock,fork,unlink-early" "TCP:127.0.0.1:$p" &
  done
  "$@"
' istio-proxy "$dir" "$istiod_port $reaches" "$admin $serves" \
  "$WASMFILTER_ISTIO_BIN/pilot-agent" proxy "$proxy_type" --proxyLogLevel warning
