"""Writes a one-layer OCI image layout without a container engine (e2e/image.sh, the test node).

    python3 e2e/lib/image.py OUT SPEC_JSON

SPEC_JSON: {"ref_name": "...", "dirs": ["etc", ...],
            "files": [{"dest": "etc/passwd", "src": "/path" | "text": "...", "mode": 420}, ...],
            "config": {...the image config's "config" object...}}
Every entry belongs to root, has mtime 0 and is gzipped with mtime 0, so the same inputs give
the same digests. Prints the manifest digest.
"""
import gzip, hashlib, io, json, os, sys, tarfile

out, spec = sys.argv[1], json.loads(sys.argv[2])
os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)


def add(tar, name, data=None, mode=0o755, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime, info.type = mode, 0, 0, 0, kind
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for d in spec.get("dirs", []):
        add(tar, d, kind=tarfile.DIRTYPE)
    for f in spec.get("files", []):
        if "src" in f:
            with open(f["src"], "rb") as src:
                data = src.read()
        else:
            data = f["text"].encode()
        add(tar, f["dest"], data, f.get("mode", 0o644))
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
    "config": spec["config"],
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    "history": [{"created_by": "e2e/lib/image.py"}],
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
        "annotations": {"org.opencontainers.image.ref.name": spec["ref_name"]}}]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
print(digest)
