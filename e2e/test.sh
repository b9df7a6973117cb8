#!/usr/bin/env bash
# The whole test suite, from a fresh machine or again on a used one:
#   format and lint, unit tests, and integration/e2e tests against a real kube-apiserver,
#   etcd, kube-controller-manager, OCI registry, istiod and Envoy, all on 127.0.0.1, and a real
#   node (containerd, kubelet, kube-scheduler, kube-proxy) running pods on a host-only bridge.
# Installs what it needs (e2e/setup.sh), brings the test environment up (e2e/env.sh) and, unless
# WASMFILTER_KEEP_ENV=1, stops it again at the end.
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

log "1/6 tools (apt, Go-built control plane, Istio CRDs, Envoy)"
"$ROOT/e2e/setup.sh"

log "2/6 format and lint"
cargo fmt --check
run_with_heartbeat "cargo clippy" cargo clippy --locked --all-targets -- -D warnings

log "3/6 build"
run_with_heartbeat "cargo build" cargo build --locked --all-targets

log "4/6 fuzz targets (built, not run: e2e/fuzz.sh SECONDS runs them) and the image's static binary"
"$ROOT/e2e/fuzz.sh" 0
"$ROOT/e2e/image.sh"

log "5/6 test environment (with a node: needs root)"
env_file=$("$ROOT/e2e/env.sh" up --node | tail -n 1)
if [ "${WASMFILTER_KEEP_ENV:-0}" != 1 ]; then
  trap '"$ROOT/e2e/env.sh" down' EXIT
fi
# shellcheck disable=SC1090
source "$env_file"

log "6/6 cargo test (unit, API server, registry, Envoy $ENVOY_VERSIONS)"
cargo test --locked --no-fail-fast -- --test-threads "${WASMFILTER_TEST_THREADS:-4}"
if [ "${WASMFILTER_KEEP_ENV:-0}" != 1 ]; then
  # Stopped here rather than only by the trap, so a node that leaves anything on the host
  # (e2e/lib/node.sh checks) fails the run.
  trap - EXIT
  "$ROOT/e2e/env.sh" down
fi
