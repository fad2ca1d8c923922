#!/usr/bin/env bash
# A simulated CAPD/kind cluster on this machine's Docker Engine.
#
#   scripts/simcluster.sh up NAME CONTROL_PLANES WORKERS VERSION   e.g. up demo 1 1 v1.31.4
#   scripts/simcluster.sh down NAME
#
# `up ... --real-size-artifacts` makes the mirror publish kubeadm, kubelet and kubectl padded to
# the sizes of the real binaries (about 70, 80 and 55 MB).
#
# Nodes are NAME-cp-<i> and NAME-md-0-<i>; try
#   docker exec NAME-cp-0 kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes -o json
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -q -p capd-inplace-simnode -p capd-inplace-e2e --bin simnode --bin simcluster
exec "$root/target/debug/simcluster" "$@"
