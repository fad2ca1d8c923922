#!/usr/bin/env bash
# The hook-path load test: the real `capd-inplace serve` (release build, dev certificate, quiet
# log level) under HTTP load from oha, next to a ceiling server (e2e/src/bin/bench_ceiling.rs:
# the same TLS and HTTP stack answering a fixed copy of the extension's answer) in the same run.
#
#   1. CanUpdateMachine with the ~30 KB request of the criterion bench (benches/can_update.rs).
#   2. UpdateMachine polls while WORKERS node upgrades run in the extension: a simulated cluster
#      of one control plane and WORKERS workers, the control plane upgraded first (skew rules),
#      then every worker's upgrade started and held in `kubeadm upgrade node` by a delay fault.
#      Every poll of the load must be answered in-progress (checked on /metrics).
#
# Each load lasts DURATION, HTTPS with keep-alive, HTTP/1.1, loopback only; each row (concurrency
# 1, 16, 64) is the median of ROUNDS interleaved rounds of the extension and the ceiling. Prints
# a Markdown fragment on stdout (tables and a verdict against the aims: at concurrency 16, at
# least 70% of the ceiling's rps and a p99 under 10 ms); progress on stderr.
# Installs oha into .cache/tools on first use (minutes of compiling, once); needs curl, jq and a
# Docker Engine with the simulated node image (scripts/build-simnode-image.sh).
set -euo pipefail

DURATION="${DURATION:-3s}"
# Rounds per row; the median is shown. Five short rounds rather than three long ones: a burst of
# other work on the machine (one ran through all three 5 s ceiling rounds of a row once) then
# spoils fewer of them than the median can absorb.
ROUNDS="${ROUNDS:-5}"
CONCURRENCY=(1 16 64)
WORKERS=10
FROM=v1.31.4
TO=v1.32.3
# Long enough to outlast the whole UpdateMachine part; the upgrades never finish, the cluster is
# removed instead.
DELAY_MS=600000
# One per run (the shell's pid), so that two runs at once do not share a cluster.
CLUSTER="bench-hooks-$$"

command="scripts/bench-hooks.sh"
log() { echo "bench-hooks: $*" >&2; }
script_start=$SECONDS

log "building release binaries"
build_start=$SECONDS
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
build_seconds=$((SECONDS - build_start))

for tool in curl jq docker; do
  command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done

ensure_oha

# Other work on the machine shows in every figure; the fragment says how busy it was.
loadavg="$(cut -d' ' -f1 /proc/loadavg)"

work="$(mktemp -d /var/tmp/capd-inplace-bench-hooks.XXXXXX)"
ext_pid=""
ceiling_pid=""
validating_pid=""
cluster_up=0
cleanup() {
  local status=$?
  # Everything below runs whatever fails; a killed server's exit status is no error of ours.
  set +e
  trap - EXIT INT TERM
  [ -n "$ceiling_pid" ] && kill "$ceiling_pid" 2>/dev/null && wait "$ceiling_pid" 2>/dev/null
  [ -n "$validating_pid" ] && kill "$validating_pid" 2>/dev/null && wait "$validating_pid" 2>/dev/null
  [ -n "$ext_pid" ] && kill "$ext_pid" 2>/dev/null && wait "$ext_pid" 2>/dev/null
  if [ "$cluster_up" = 1 ]; then
    "$bin/simcluster" down "$CLUSTER" >/dev/null 2>&1 || log "could not remove cluster $CLUSTER"
  fi
  if [ "$status" != 0 ] && [ -f "$work/serve.log" ]; then
    log "extension log tail:"
    tail -n 20 "$work/serve.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nobody listens on (checked, then used right away).
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

ext_port="$(free_port)"
health_port="$(free_port)"
metrics_port="$(free_port)"
ext="https://127.0.0.1:$ext_port"
certs="$work/certs"
# The cluster's mirror reaches the extension per request (the artifactURL setting); the default
# source is an empty local directory, so nothing can reach outside.
mkdir -p "$work/no-mirror"
log "starting capd-inplace serve on $ext"
RUST_LOG=warn "$bin/capd-inplace" serve \
  --bind-address "127.0.0.1:$ext_port" --cert-dir "$certs" --dev-self-signed \
  --health-probe-bind-address "127.0.0.1:$health_port" \
  --metrics-bind-address "127.0.0.1:$metrics_port" \
  --artifact-url "file://$work/no-mirror" --artifact-cache-dir "$work/cache" \
  --max-concurrent-upgrades "$WORKERS" --shutdown-grace-seconds 1 \
  >"$work/serve.log" 2>&1 &
ext_pid=$!
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$health_port/readyz" && break
  sleep 0.1
done
curl -fs -o /dev/null "http://127.0.0.1:$health_port/readyz" || { log "extension not ready"; exit 1; }

ceiling_port="$(free_port)"
ceiling="https://127.0.0.1:$ceiling_port"
wait_answering() { # url what
  for _ in $(seq 100); do
    curl -fs --cacert "$certs/ca.crt" -o /dev/null "$1" && return
    sleep 0.1
  done
  log "the $2 does not answer on $1"
  exit 1
}
start_ceiling() { # answer file
  stop_ceiling
  "$bin/bench-ceiling" "127.0.0.1:$ceiling_port" "$certs" "$1" 2>>"$work/ceiling.log" &
  ceiling_pid=$!
  wait_answering "$ceiling/" "ceiling server"
}
stop_ceiling() {
  if [ -n "$ceiling_pid" ]; then
    kill "$ceiling_pid" 2>/dev/null || true
    wait "$ceiling_pid" 2>/dev/null || true
    ceiling_pid=""
  fi
}

median_round() { # one line per round, its ratio first -> the line with the median ratio
  sort -n <<<"${1%$'\n'}" | sed -n "$(((ROUNDS + 1) / 2))p"
}

post() { # url body-file -> answer on stdout
  curl -fsS --cacert "$certs/ca.crt" --data-binary "@$2" "$1"
}

metric() { # exact series, e.g. capd_inplace_upgrades_in_flight
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" |
    awk -v series="$1" '$1 == series {value = $2} END {print value + 0}'
}

cpu_ticks() { # pid -> user + system clock ticks so far
  awk '{print $14 + $15}' "/proc/$1/stat"
}

rss() { # pid -> "VmRSS VmHWM" in MiB
  awk '/^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} END {printf "%.0f %.0f", r / 1024, h / 1024}' "/proc/$1/status"
}

per_request() { # ticks clock-ticks-per-second requests -> microseconds per request
  awk -v t="$1" -v hz="$2" -v n="$3" 'BEGIN {printf "%.0f", t / hz * 1e6 / n}'
}

# oha against a URL with a body; prints "rps p50_ms p99_ms requests" and fails unless every
# request got a 200.
load() { # url body-file concurrency duration
  local out="$work/oha.json"
  "$oha" --no-tui --output-format json --cacert "$certs/ca.crt" -m POST -D "$2" \
    -c "$3" -z "$4" -w "$1" >"$out"
  jq -r '
    (.statusCodeDistribution | to_entries) as $codes
    | if ([$codes[] | select(.key != "200")] | length) > 0 or (.errorDistribution | length) > 0
      then error("non-200 answers or errors: \($codes) \(.errorDistribution)")
      else "\(.summary.requestsPerSec) \(.latencyPercentiles.p50 * 1000) \(.latencyPercentiles.p99 * 1000) \([$codes[].value] | add)"
      end' "$out"
}

warm() { # url body-file: one second of load, not measured
  "$oha" --no-tui --cacert "$certs/ca.crt" -m POST -D "$2" -c 16 -z 1s -w "$1" >/dev/null
}

hz="$(getconf CLK_TCK)"
# A load against a server, with its CPU time: prints "rps p50_ms p99_ms requests µs_per_request".
measure() { # pid url body-file concurrency
  local ticks line m
  ticks="$(cpu_ticks "$1")"
  line="$(load "$2" "$3" "$4" "$DURATION")"
  read -r -a m <<<"$line"
  ticks=$(($(cpu_ticks "$1") - ticks))
  echo "${m[*]} $(per_request "$ticks" "$hz" "${m[3]}")"
}

# One table: for each concurrency, ROUNDS rounds of the extension then the ceiling (interleaved,
# so a change in the machine's background load hits both), after a one-second warm-up of each;
# the round with the median ratio is shown, since one round's ratio varies by a fifth here.
# check_before/check_after name functions run around each extension load, with the oha request
# count as argument to check_after.
# Also prints each server's CPU time per request (from /proc/<pid>/stat): less sensitive to other
# work on the machine than rps, which depends on how much CPU the run happened to get.
table() { # ext-url ceiling-url body-file check_before check_after
  local c round line e ce mem r rounds median r16="" p16="" cpu_ext="" cpu_ceiling=""
  warm "$1" "$3"
  warm "$2" "$3"
  echo "| concurrency | ext rps | ceiling rps | ratio | ext p50 (ms) | ext p99 (ms) | ceiling p99 (ms) | ext RSS / peak (MiB) |"
  echo "|---|---|---|---|---|---|---|---|"
  for c in "${CONCURRENCY[@]}"; do
    rounds=""
    for round in $(seq "$ROUNDS"); do
      "$4"
      log "  concurrency $c, round $round: extension"
      line="$(measure "$ext_pid" "$1" "$3" "$c")"
      read -r -a e <<<"$line"
      "$5" "${e[3]}"
      line="$(rss "$ext_pid")"
      read -r -a mem <<<"$line"
      log "  concurrency $c, round $round: ceiling"
      line="$(measure "$ceiling_pid" "$2" "$3" "$c")"
      read -r -a ce <<<"$line"
      r="$(awk -v a="${e[0]}" -v b="${ce[0]}" 'BEGIN {printf "%.2f", a / b}')"
      rounds+="$r ${e[*]} ${mem[*]} ${ce[*]}"$'\n'
    done
    # ratio, ext (rps p50 p99 requests cpu), RSS and peak, ceiling (rps p50 p99 requests cpu)
    median="$(median_round "$rounds")"
    read -r r e0 e1 e2 _ e4 m0 m1 c0 _ c2 _ c4 <<<"$median"
    cpu_ext+="$e4 "
    cpu_ceiling+="$c4 "
    printf '| %s | %.0f | %.0f | %s | %.2f | %.2f | %.2f | %s / %s |\n' \
      "$c" "$e0" "$c0" "$r" "$e1" "$e2" "$c2" "$m0" "$m1"
    if [ "$c" = 16 ]; then r16="$r" p16="$e2"; fi
  done
  echo
  cpu_ext="${cpu_ext% }" cpu_ceiling="${cpu_ceiling% }"
  echo "Server CPU time per request (user + system, µs) at concurrency $(IFS=/; echo "${CONCURRENCY[*]}"):" \
    "extension ${cpu_ext// //}, ceiling ${cpu_ceiling// //}."
  echo
  awk -v r="$r16" -v p="$p16" 'BEGIN {
    ok_r = r >= 0.70; ok_p = p < 10
    printf "Verdict at concurrency 16: %s (%.0f%% of the ceiling'"'"'s rps, aim >= 70%%; p99 %.2f ms, aim < 10 ms).\n",
      (ok_r && ok_p) ? "meets both aims" : (ok_r ? "misses the p99 aim" : (ok_p ? "misses the rps aim" : "misses both aims")),
      r * 100, p
  }'
}

# ---- 1. CanUpdateMachine ------------------------------------------------------------------------
"$bin/bench-setup" can-update-request "$work/can-update.json"
can_update_url="$ext/hooks.runtime.cluster.x-k8s.io/v1alpha1/canupdatemachine/can-update-machine?timeout=10s"
post "$can_update_url" "$work/can-update.json" >"$work/can-update.answer.json"
jq -e '.status == "Success" and .machinePatch != null' "$work/can-update.answer.json" >/dev/null ||
  { log "CanUpdateMachine did not answer in place: $(cat "$work/can-update.answer.json")"; exit 1; }
in_place='capd_inplace_decisions_total{hook="can-update-machine",outcome="in_place",reason="version_change"}'
decisions_before=0
count_decisions() { decisions_before="$(metric "$in_place")"; }
check_decisions() { # requests
  local now
  now="$(metric "$in_place")"
  [ $((now - decisions_before)) = "$1" ] ||
    { log "$1 requests but $((now - decisions_before)) in-place decisions"; exit 1; }
}
start_ceiling "$work/can-update.answer.json"
log "CanUpdateMachine: $(wc -c <"$work/can-update.json") byte request, $(wc -c <"$work/can-update.answer.json") byte answer"
echo "### CanUpdateMachine under load"
echo
echo "Command: \`$command\` ($(nproc) cores, load average $loadavg at the start; oha, HTTP/1.1 over TLS with keep-alive, $DURATION per load, the median of $ROUNDS interleaved rounds per row;"
echo "a $(wc -c <"$work/can-update.json") byte request, the criterion bench's; every answer checked in place on /metrics)."
echo
table "$can_update_url" "${can_update_url/#$ext/$ceiling}" "$work/can-update.json" count_decisions check_decisions
echo

# Any extension must at least check that this request is JSON. A ceiling that checks it with
# serde_json and does nothing else (bench-ceiling --validate-json), against the plain ceiling, at
# concurrency 16.
validating_port="$(free_port)"
validating="https://127.0.0.1:$validating_port"
"$bin/bench-ceiling" "127.0.0.1:$validating_port" "$certs" "$work/can-update.answer.json" \
  --validate-json 2>>"$work/ceiling.log" &
validating_pid=$!
wait_answering "$validating/" "validating ceiling server"
warm "$validating/" "$work/can-update.json"
rounds=""
for round in $(seq "$ROUNDS"); do
  log "  concurrency 16, round $round: validating ceiling, then ceiling"
  line="$(load "$validating/" "$work/can-update.json" 16 "$DURATION")"
  read -r -a checked <<<"$line"
  line="$(load "$ceiling/" "$work/can-update.json" 16 "$DURATION")"
  read -r -a plain <<<"$line"
  rounds+="$(awk -v v="${checked[0]}" -v c="${plain[0]}" 'BEGIN {printf "%.4f %.0f %.0f", v / c, v, c}')"$'\n'
done
read -r r v c <<<"$(median_round "$rounds")"
awk -v r="$r" -v v="$v" -v c="$c" -v rounds="$ROUNDS" 'BEGIN {
  printf "A ceiling that also checks each request is JSON (`bench-ceiling --validate-json`, serde_json skipping every value) "
  printf "serves %.0f rps at concurrency 16, %.0f%% of the plain ceiling'"'"'s %.0f rps measured right after it ", v, 100 * r, c
  printf "(the median of %d rounds): about what an extension reaches on this machine that checks this request with serde_json and does nothing else.\n", rounds
}'
kill "$validating_pid" 2>/dev/null || true
wait "$validating_pid" 2>/dev/null || true
validating_pid=""
echo
stop_ceiling

# ---- 2. UpdateMachine polls while upgrades run --------------------------------------------------
log "bringing up $CLUSTER (1 control plane, $WORKERS workers) and starting $WORKERS worker upgrades"
cluster_up=1
poll_url="$("$bin/bench-setup" upgrades-in-flight "$CLUSTER" "$WORKERS" "$FROM" "$TO" "$ext" \
  "$certs/ca.crt" "$DELAY_MS" "$work/poll.json")"
post "$poll_url" "$work/poll.json" >"$work/poll.answer.json"
in_progress='capd_inplace_hook_requests_total{hook="update-machine",result="in-progress"}'
done_or_failed() {
  local done failed
  done="$(metric 'capd_inplace_hook_requests_total{hook="update-machine",result="done"}')"
  failed="$(metric 'capd_inplace_hook_requests_total{hook="update-machine",result="failure"}')"
  echo $((done + failed))
}
polls_before=0
others_before=0
count_polls() {
  local flight
  flight="$(metric capd_inplace_upgrades_in_flight)"
  [ "$flight" = "$WORKERS" ] || { log "$flight upgrades in flight, not $WORKERS"; exit 1; }
  polls_before="$(metric "$in_progress")"
  others_before="$(done_or_failed)"
}
check_polls() { # requests
  local polls others answer
  polls="$(metric "$in_progress")"
  others="$(done_or_failed)"
  polls=$((polls - polls_before)) others=$((others - others_before))
  [ "$polls" = "$1" ] && [ "$others" = 0 ] ||
    { log "$1 polls but $polls in-progress answers and $others done or failed"; exit 1; }
  answer="$(post "$poll_url" "$work/poll.json")"
  jq -e '.status == "Success" and .retryAfterSeconds > 0' <<<"$answer" >/dev/null ||
    { log "the upgrade is no longer in progress: $answer"; exit 1; }
}
jq -e '.status == "Success" and .retryAfterSeconds > 0' "$work/poll.answer.json" >/dev/null ||
  { log "UpdateMachine is not in progress: $(cat "$work/poll.answer.json")"; exit 1; }
start_ceiling "$work/poll.answer.json"
log "UpdateMachine: $(wc -c <"$work/poll.json") byte request, answer $(jq -c '{message, retryAfterSeconds}' "$work/poll.answer.json")"
echo "### UpdateMachine polls while $WORKERS upgrades run"
echo
echo "Command: \`$command\` (same run; a simulated cluster of 1 control plane and $WORKERS workers,"
echo "$FROM to $TO, the control plane upgraded first, then $WORKERS worker upgrades started and held in"
echo "\`kubeadm upgrade node\` by a delay; the load polls one worker's UpdateMachine, a $(wc -c <"$work/poll.json") byte"
echo "request; every poll checked in-progress on /metrics, with $WORKERS upgrades in flight before each row)."
echo
table "$poll_url" "${poll_url/#$ext/$ceiling}" "$work/poll.json" count_polls check_polls
echo
log "done in $((SECONDS - script_start)) s, $build_seconds s of it building (cleanup follows)"
