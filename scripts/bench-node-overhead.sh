#!/usr/bin/env bash
# Orchestration overhead of one node upgrade: capd-inplace against a plain sequential script of
# the same `docker exec` steps (the way kinder-style scripts upgrade kind nodes), each on a fresh
# simulated 1-node cluster, v1.31.4 -> v1.32.3, with the binaries already on the host (warm cache).
#
# Prints a Markdown table row per run and the median ratio. Bounded: RUNS clusters of one node
# each, on the local Docker Engine only.
set -euo pipefail

RUNS="${RUNS:-3}"
FROM=v1.31.4
TO=v1.32.3
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build -q --release -p capd-inplace -p capd-inplace-e2e -p capd-inplace-simnode
bin="$root/target/release"
export CAPD_SIMNODE_BIN="$bin/simnode"
work="$(mktemp -d /var/tmp/capd-inplace-bench.XXXXXX)"
clusters=()
cleanup() {
  for c in "${clusters[@]}"; do "$bin/simcluster" down "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

up() { # name -> prints the host mirror URL
  clusters+=("$1")
  "$bin/simcluster" up "$1" 1 0 "$FROM" | awk '/^mirror \(host\):/ {print $3}'
}

now() { date +%s.%N; }

plain_upgrade() { # node
  local n="$1" kc=(kubectl --kubeconfig /etc/kubernetes/admin.conf)
  docker exec "$n" mkdir -p /var/lib/plain/bin
  for b in kubeadm kubelet kubectl; do docker cp -q "$work/bin/$b" "$n:/var/lib/plain/bin/$b"; done
  docker exec "$n" install -m 0755 /var/lib/plain/bin/kubeadm /usr/bin/kubeadm
  docker exec "$n" kubeadm upgrade apply "$TO" --yes >/dev/null
  docker exec "$n" "${kc[@]}" drain "$n" --ignore-daemonsets --delete-emptydir-data --force >/dev/null
  docker exec "$n" install -m 0755 /var/lib/plain/bin/kubelet /usr/bin/kubelet
  docker exec "$n" install -m 0755 /var/lib/plain/bin/kubectl /usr/bin/kubectl
  docker exec "$n" systemctl daemon-reload
  docker exec "$n" systemctl restart kubelet
  until [ "$(docker exec "$n" "${kc[@]}" get node "$n" \
      -o 'jsonpath={.status.nodeInfo.kubeletVersion} {.status.conditions[?(@.type=="Ready")].status}')" = "$TO True" ]; do
    sleep 0.2
  done
  docker exec "$n" "${kc[@]}" uncordon "$n" >/dev/null
  docker exec "$n" sh -c "echo $TO > /kind/version"
}

# The binaries, fetched once from a simulated mirror and laid out as a file:// mirror, so both
# contenders start from local files (capd-inplace still verifies them into its cache).
mirror="$(up bench-src)"
local_mirror="$work/mirror"
mkdir -p "$work/bin" "$local_mirror/$TO/bin/linux/amd64"
for b in kubeadm kubelet kubectl; do
  curl -fsS -o "$work/bin/$b" "$mirror/$TO/bin/linux/amd64/$b"
  cp "$work/bin/$b" "$local_mirror/$TO/bin/linux/amd64/$b"
  sha256sum "$work/bin/$b" | cut -d' ' -f1 > "$local_mirror/$TO/bin/linux/amd64/$b.sha256"
done
"$bin/simcluster" down bench-src >/dev/null

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }

echo "| run | capd-inplace (s) | plain script (s) | ratio | difference (s) |"
echo "|---|---|---|---|---|"
ratios=()
# Run 0 warms the cache and the page cache and is not reported.
for i in $(seq 0 "$RUNS"); do
  up "bench-a$i" >/dev/null
  start="$(now)"
  "$bin/capd-inplace" upgrade --cluster "bench-a$i" --to "$TO" --artifact-url "file://$local_mirror" \
    --artifact-cache-dir "$work/cache" >/dev/null
  ours="$(elapsed "$start" "$(now)")"
  "$bin/simcluster" down "bench-a$i" >/dev/null
  up "bench-b$i" >/dev/null
  start="$(now)"
  plain_upgrade "bench-b$i-cp-0"
  plain="$(elapsed "$start" "$(now)")"
  "$bin/simcluster" down "bench-b$i" >/dev/null
  [ "$i" -eq 0 ] && continue
  ratio="$(awk -v a="$ours" -v b="$plain" 'BEGIN {printf "%.2f", a / b}')"
  ratios+=("$ratio")
  echo "| $i | $ours | $plain | $ratio | $(awk -v a="$ours" -v b="$plain" 'BEGIN {printf "%.2f", a - b}') |"
done
median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
echo
echo "median ratio: $median (runs: $RUNS; $(nproc) cores)"
