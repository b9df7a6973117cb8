#!/usr/bin/env bash
# Regenerates every generated file from its one source, so they never drift (tests check):
#   crds/ and the copies in charts/ and config/crd/   <- `wasmfilter crd`
#   config/default/operator.yaml                      <- `helm template` of the chart
# Needs the helm the test tools build (e2e/setup.sh).
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"
"$ROOT/e2e/setup.sh" >/dev/null
cargo run --quiet --locked -- crd >crds/wasmfilter.dev_wasmfilters.yaml
cp crds/wasmfilter.dev_wasmfilters.yaml charts/wasmfilter-operator/crds/
cp crds/wasmfilter.dev_wasmfilters.yaml config/crd/
"$HELM_BIN/helm" template wasmfilter-operator charts/wasmfilter-operator --namespace wasmfilter-system \
  | sed '/^# Source: /d' >config/default/operator.yaml
log "generated: crds/, charts/wasmfilter-operator/crds/, config/crd/, config/default/operator.yaml"
