#!/usr/bin/env bash
# Scale benchmark: simulated clusters of one control plane and W workers (W = 1, 5, 10, 20)
# upgraded in place through the real `capd-inplace serve` process, driven by the CAPI-faithful
# driver with MachineDeployment maxUnavailable = W (all workers at once) and a warm artifact
# cache. Reports the whole upgrade's and the worker phase's wall time, the extension's peak RSS,
# and the per-step durations at the largest W (e2e/src/bench_scale_main.rs).
#
#   scripts/bench-scale.sh                # WORKERS=1,5,10,20 by default
#   WORKERS=1,5 scripts/bench-scale.sh
#
# Markdown on stdout, progress on stderr. Local Docker Engine only; the clusters are removed on
# exit, also after a failure or an interrupt.
set -euo pipefail

WORKERS="${WORKERS:-1,5,10,20}"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

cleanup() {
  for name in warmup ${WORKERS//,/ }; do
    "$bin/simcluster" down "bench-scale-$name" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command="scripts/bench-scale.sh"
[ "$WORKERS" = "1,5,10,20" ] || command="WORKERS=$WORKERS $command"
"$bin/bench-scale" --workers "$WORKERS" --invoked-as "$command"
