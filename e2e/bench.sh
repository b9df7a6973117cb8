#!/usr/bin/env bash
# Runs the benchmarks against the real test environment (release build):
#   e2e/bench.sh [NAME...]   (default: every benchmark under benches/)
# Installs what it needs first (e2e/setup.sh), brings the environment up, and down after.
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"
"$ROOT/e2e/setup.sh"
benches=("$@")
if ((${#benches[@]} == 0)); then
  for f in benches/*.rs; do benches+=("$(basename "$f" .rs)"); done
fi
run_with_heartbeat "cargo build --release (benchmarks)" cargo bench --no-run --locked "${benches[@]/#/--bench=}"
"$ROOT/e2e/env.sh" down >/dev/null 2>&1 || true
# No istiod: the benchmarks measure the operator, and istiod translating thousands of
# WasmPlugins would share the same cores.
export WASMFILTER_ISTIOD=0
envfile=$("$ROOT/e2e/env.sh" up | tail -n1)
trap '"$ROOT/e2e/env.sh" down >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1090
source "$envfile"
for b in "${benches[@]}"; do
  log "benchmark: $b"
  cargo bench --locked --bench "$b"
done
