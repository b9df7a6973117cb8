#!/usr/bin/env bash
# Builds the operator's container image without a container engine, the same image the
# Containerfile describes, and optionally pushes it:
#   e2e/image.sh [--no-build] [REF]     e.g. e2e/image.sh 127.0.0.1:5000/wasmfilter/operator:dev
# --no-build packs the binary the last build left (tests use it: CI builds first).
# The image: one layer holding a static /wasmfilter and the CA bundle, entrypoint /wasmfilter,
# user 65532:65532 (non-root), no shell, nothing else (so it runs with a read-only root
# filesystem). The OCI layout is written to target/image/; pushing uses oras (plain HTTP for
# 127.0.0.1 registries). The static build lives in ~/.cache/wasmfilter/image-target.
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"
build=1
if [ "${1:-}" = --no-build ]; then build=0; shift; fi
ref=${1:-}

target_dir="$WASMFILTER_CACHE/image-target"
bin="$target_dir/x86_64-unknown-linux-gnu/release/wasmfilter"
if [ "$build" = 1 ]; then
  run_with_heartbeat "cargo build --release (static binary)" \
    env RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin wasmfilter
fi
[ -x "$bin" ] || die "no static binary at $bin: run e2e/image.sh (without --no-build) first"
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  die "$bin is dynamically linked; the image has no libc"
fi

out="$ROOT/target/image"
rm -rf "$out" && mkdir -p "$out/blobs/sha256"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
python3 "$ROOT/e2e/lib/image.py" "$out" "$(python3 - "$bin" "$version" <<'PY'
import json, sys
binary, version = sys.argv[1], sys.argv[2]
print(json.dumps({
    "ref_name": version,
    "dirs": ["etc", "etc/ssl", "etc/ssl/certs"],
    "files": [
        {"dest": "etc/ssl/certs/ca-certificates.crt", "src": "/etc/ssl/certs/ca-certificates.crt", "mode": 0o644},
        # Who 65532 is, for tools that look the user up; no login, no shell.
        {"dest": "etc/passwd", "text": "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n", "mode": 0o644},
        {"dest": "etc/group", "text": "nonroot:x:65532:\n", "mode": 0o644},
        {"dest": "wasmfilter", "src": binary, "mode": 0o755},
    ],
    "config": {
        "User": "65532:65532",
        "Entrypoint": ["/wasmfilter"],
        "Cmd": ["operator"],
        "WorkingDir": "/",
        # As in the Containerfile: two malloc arenas (see there).
        "Env": ["MALLOC_ARENA_MAX=2"],
        "Labels": {
            "org.opencontainers.image.title": "wasmfilter-operator",
            "org.opencontainers.image.version": version,
        },
    },
}))
PY
)"
log "OCI image layout in $out ($(du -sh "$out" | cut -f1))"

if [ -n "$ref" ]; then
  plain=()
  case "$ref" in 127.0.0.1:*|localhost:*) plain=(--to-plain-http) ;; esac
  version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$out/index.json")
  "$ORAS_BIN/oras" cp "${plain[@]}" --from-oci-layout "$out:$version" "$ref" >/dev/null
  log "pushed $ref"
fi
