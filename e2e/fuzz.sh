#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ for a bounded time each:
#   e2e/fuzz.sh [SECONDS [TARGET...]]   (default 60 s each, every target; 0: build only, as CI does,
#   unoptimised: the optimised, instrumented build took 8 to 24 minutes cold on 2 cores)
# Installs cargo-fuzz (into ~/.cache/wasmfilter/bin, keyed by version) and runs libFuzzer on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its sanitizer flags). The build lives
# in ~/.cache/wasmfilter/fuzz-target, so a fresh clone reuses it. Corpora and any crash found
# stay in fuzz/corpus/ and fuzz/artifacts/; a crash fails the script. Inputs that once failed
# are kept in fuzz/regressions/TARGET/ and replayed first on every run.
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

seconds=${1:-60}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] || die "usage: e2e/fuzz.sh [SECONDS [TARGET...]]"
CARGO_FUZZ_VERSION=0.13.2
bin="$WASMFILTER_CACHE/bin/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$bin/bin/cargo-fuzz" ]; then
  run_with_heartbeat "cargo install cargo-fuzz $CARGO_FUZZ_VERSION" \
    cargo install --locked --root "$bin" --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi
export PATH="$bin/bin:$PATH" RUSTC_BOOTSTRAP=1

cd fuzz
target_dir="$WASMFILTER_CACHE/fuzz-target"
if (($# > 0)); then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
if [ "$seconds" = 0 ]; then
  run_with_heartbeat "cargo fuzz build --dev (${targets[*]})" cargo fuzz build --dev --target-dir "$target_dir"
  log "fuzz targets built: ${targets[*]}"
  exit 0
fi
run_with_heartbeat "cargo fuzz build (${targets[*]})" cargo fuzz build --target-dir "$target_dir"
for t in "${targets[@]}"; do
  log "fuzz $t for $seconds s"
  mkdir -p "corpus/$t" "regressions/$t"
  # -timeout: one input taking over 10 s is a finding too.
  cargo fuzz run --target-dir "$target_dir" "$t" "corpus/$t" "regressions/$t" -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)|ERROR|SUMMARY|panicked' || true
  found=$(find "artifacts/$t" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) 2>/dev/null)
  if [ -n "$found" ]; then
    die "fuzz target $t found inputs that fail (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t FILE): $found"
  fi
done
log "fuzzing done: ${targets[*]}, $seconds s each"
