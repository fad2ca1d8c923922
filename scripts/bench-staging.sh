#!/usr/bin/env bash
# Staging benchmark: kubeadm, kubelet and kubectl padded to the real binaries' sizes (about 70, 80
# and 55 MB) pushed into simulated clusters of 1, 5 and 10 nodes, four ways in one run:
# capd-inplace stage with a cold and with a warm artifact cache, docker cp in parallel (the
# floor), and a naive docker exec curl per node. Reports wall times, ratios to docker cp and the
# bytes each variant read from the simulated mirror (e2e/src/bench_staging_main.rs).
#
#   scripts/bench-staging.sh              # NODES=1,5,10 by default
#   NODES=1,3 scripts/bench-staging.sh
#
# Markdown on stdout, progress on stderr. Local Docker Engine only; the clusters are removed on
# exit, also after a failure or an interrupt.
set -euo pipefail

NODES="${NODES:-1,5,10}"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

cleanup() {
  for n in ${NODES//,/ }; do "$bin/simcluster" down "bench-stage-$n" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command="scripts/bench-staging.sh"
[ "$NODES" = "1,5,10" ] || command="NODES=$NODES $command"
"$bin/bench-staging" --nodes "$NODES" --invoked-as "$command"
