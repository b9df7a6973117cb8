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
python3 - "$bin" "$out" "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile

binary, out, version = sys.argv[1], sys.argv[2], sys.argv[3]

def add(tar, name, data=None, mode=0o755, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime, info.type = mode, 0, 0, 0, kind
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)

raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for d in ["etc", "etc/ssl", "etc/ssl/certs"]:
        add(tar, d, kind=tarfile.DIRTYPE)
    with open("/etc/ssl/certs/ca-certificates.crt", "rb") as f:
        add(tar, "etc/ssl/certs/ca-certificates.crt", f.read(), 0o644)
    # Who 65532 is, for tools that look the user up; no login, no shell.
    add(tar, "etc/passwd", b"nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n", 0o644)
    add(tar, "etc/group", b"nonroot:x:65532:\n", 0o644)
    with open(binary, "rb") as f:
        add(tar, "wasmfilter", f.read(), 0o755)
layer_tar = raw.getvalue()
gz = io.BytesIO()
with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as g:
    g.write(layer_tar)
layer = gz.getvalue()

def blob(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest

config = {
    "architecture": "amd64",
    "os": "linux",
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
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    "history": [{"created_by": "e2e/image.sh (see Containerfile)"}],
}
config_bytes = json.dumps(config, sort_keys=True).encode()
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": blob(config_bytes), "size": len(config_bytes)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": blob(layer), "size": len(layer)}],
}
manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
digest = blob(manifest_bytes)
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest, "size": len(manifest_bytes),
        "annotations": {"org.opencontainers.image.ref.name": version}}]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
print(digest)
PY
log "OCI image layout in $out ($(du -sh "$out" | cut -f1))"

if [ -n "$ref" ]; then
  plain=()
  case "$ref" in 127.0.0.1:*|localhost:*) plain=(--to-plain-http) ;; esac
  version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$out/index.json")
  "$ORAS_BIN/oras" cp "${plain[@]}" --from-oci-layout "$out:$version" "$ref" >/dev/null
  log "pushed $ref"
fi
