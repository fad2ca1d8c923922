#!/usr/bin/env bash
# Orchestration overhead of one node upgrade: capd-inplace against a plain sequential script of
# the same `docker exec` steps (the way kinder-style scripts upgrade kind nodes), each on a fresh
# simulated 1-node cluster, v1.31.4 -> v1.32.3, with the binaries already on the host (warm cache).
#
# Prints a Markdown fragment on stdout (progress on stderr): a row per run, the median ratio, the
# execs each contender ran (counted from the Engine's exec_create events, not from the code), and
# where capd-inplace's time went by step (from its `step finished` log lines). Bounded: RUNS + 1
# clusters of one node per contender, on the local Docker Engine only.
set -euo pipefail

RUNS="${RUNS:-3}"
FROM=v1.31.4
TO=v1.32.3
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
work="$(mktemp -d /var/tmp/capd-inplace-bench.XXXXXX)"
clusters=()
watcher=""
cleanup() {
  [ -n "$watcher" ] && kill "$watcher" 2>/dev/null
  for c in "${clusters[@]}"; do "$bin/simcluster" down "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

up() { # name -> prints the host mirror URL
  clusters+=("$1")
  "$bin/simcluster" up "$1" 1 0 "$FROM" | awk '/^mirror \(host\):/ {print $3}'
}

now() { date +%s.%N; }

# Counts the execs started in container $1 until stop_counting; the count lands in $work/$2.
count_execs() {
  docker events --filter event=exec_create --filter "container=$1" --format x > "$work/$2" &
  watcher=$!
  sleep 0.5 # let the subscription start before the work does
}
stop_counting() {
  sleep 0.5
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null || true
  watcher=""
}

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
echo "bench-overhead: preparing binaries" >&2
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

rows=()
ratios=()
# Run 0 warms caches and is not reported.
for i in $(seq 0 "$RUNS"); do
  echo "bench-overhead: run $i of $RUNS" >&2
  up "bench-a$i" >/dev/null
  count_execs "bench-a$i-cp-0" execs-ours
  start="$(now)"
  RUST_LOG=capd_inplace=info "$bin/capd-inplace" --log-format json upgrade --cluster "bench-a$i" \
    --to "$TO" --artifact-url "file://$local_mirror" --artifact-cache-dir "$work/cache" \
    >/dev/null 2>"$work/log-$i"
  ours="$(elapsed "$start" "$(now)")"
  stop_counting
  "$bin/simcluster" down "bench-a$i" >/dev/null
  up "bench-b$i" >/dev/null
  count_execs "bench-b$i-cp-0" execs-plain
  start="$(now)"
  plain_upgrade "bench-b$i-cp-0"
  plain="$(elapsed "$start" "$(now)")"
  stop_counting
  "$bin/simcluster" down "bench-b$i" >/dev/null
  [ "$i" -eq 0 ] && continue
  ratio="$(awk -v a="$ours" -v b="$plain" 'BEGIN {printf "%.2f", a / b}')"
  ratios+=("$ratio")
  rows+=("| $i | $ours | $plain | $ratio | $(awk -v a="$ours" -v b="$plain" 'BEGIN {printf "%.2f", a - b}') |")
done
median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"

echo "### One node upgrade: capd-inplace against a plain script"
echo
echo "\`RUNS=$RUNS scripts/bench-overhead.sh\`: a fresh simulated one-node cluster per run and"
echo "contender, $FROM to $TO, binaries already local (a \`file://\` mirror that capd-inplace still"
echo "verifies into its cache; \`docker cp\` for the script). Run 0 warms caches and is not reported."
echo
echo "| run | capd-inplace (s) | plain script (s) | ratio | difference (s) |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Median ratio **$median** (aim: 1.1 or less). Execs in the node in the last run, counted from"
echo "the Engine's \`exec_create\` events: capd-inplace $(wc -l < "$work/execs-ours"), plain script $(wc -l < "$work/execs-plain")."
echo
echo "Where capd-inplace's time went, mean over the reported runs (\`step finished\` log lines):"
echo
echo "| step | mean (ms) |"
echo "|---|---|"
for i in $(seq 1 "$RUNS"); do cat "$work/log-$i"; done | grep '"step finished"' |
  sed -n 's/.*"step":"\([a-z-]*\)","elapsed_ms":\([0-9]*\).*/\1 \2/p' |
  awk -v runs="$RUNS" '!($1 in sum) {order[++n] = $1} {sum[$1] += $2}
    END {for (i = 1; i <= n; i++) printf "| %s | %.0f |\n", order[i], sum[order[i]] / runs}'
