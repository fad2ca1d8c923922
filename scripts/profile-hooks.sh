#!/usr/bin/env bash
# Where each server's CPU goes per CanUpdateMachine request, by part of the stack: the extension,
# the ceiling server and the validating ceiling of `scripts/bench-hooks.sh`, each sampled with
# `perf record -e cpu-clock` (no hardware counters needed) while oha loads it at concurrency 16.
# Samples are sorted into parts by symbol name (a generic function counts in the first part its
# name matches, in the order of `part` below) and divided by the requests served, so the three
# columns can be read against each other. Sampling inflates every figure (by a quarter to a third
# against the CPU time bench-hooks.sh counts), and one run moves by a tenth on a shared machine:
# compare the columns of one run, not runs.
#
# Not part of `make bench` (perf is not on every machine, and this is analysis, not a figure with
# an aim). Prints a Markdown table on stdout; progress on stderr. Needs perf (installed from
# Debian's packages when missing), curl and jq; installs oha like bench-hooks.sh.
set -euo pipefail

DURATION="${DURATION:-5}"
# Samples per second per thread: enough for a stable split, little enough not to slow the server.
FREQUENCY=1999

log() { echo "profile-hooks: $*" >&2; }

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
ensure_oha
command -v perf >/dev/null || { apt-get update -qq >&2 && apt-get install -y -qq linux-perf >&2; }
for tool in curl jq perf; do
  command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done

one_server_at_a_time profile-hooks

start() { # extension | ceiling [--validate-json]
  start_server "$@"
  await_server 10
}

# The part of the stack a sampled symbol belongs to, in the order the table shows them.
PARTS=(handler allocator copying http tls runtime scheduling network other)
classify='
  function part(dso, symbol) {
    if (dso ~ /kernel/) {
      if (symbol ~ /finish_task_switch|schedule|irqentry|unlock_irqrestore|try_to_wake|futex|ep_poll|select_task|enqueue|dequeue|update_curr|switch_to/) return "scheduling"
      return "network"
    }
    if (symbol ~ /ring_core|rustls|aes_gcm|ghash/) return "tls"
    if (symbol ~ /^_?mi_|malloc|realloc|free$/) return "allocator"
    if (symbol ~ /memmove|memcpy|memset|memcmp/) return "copying"
    if (symbol ~ /capd_inplace|serde|ignored_any|from_utf8|base64/) return "handler"
    if (symbol ~ /hyper|http|axum|tower|matchit/) return "http"
    if (symbol ~ /tokio|mio|epoll|futex|writev|recv|clock_gettime/) return "runtime"
    return "other"
  }'

# Profiles one server (started by "$@") and writes "part µs-per-request" lines to $work/$name.
profile() { # name start-args...
  local name=$1 requests
  shift
  start "$@"
  "$oha" --no-tui --cacert "$certs/ca.crt" -m POST -D "$work/request.json" -c 16 -z 1s "$url" >/dev/null
  perf record -q -e cpu-clock -F "$FREQUENCY" -p "$server_pid" -o "$work/$name.data" \
    -- sleep "$DURATION" 2>>"$work/perf.log" &
  local perf_pid=$!
  requests="$("$oha" --no-tui --output-format json --cacert "$certs/ca.crt" -m POST \
    -D "$work/request.json" -c 16 -z "${DURATION}s" "$url" | jq '[.statusCodeDistribution[]] | add')"
  wait "$perf_pid" || { log "perf failed:"; cat "$work/perf.log" >&2; exit 1; }
  stop_server
  log "$name: $requests requests in ${DURATION} s"
  perf report -i "$work/$name.data" --no-children --sort dso,symbol -g none -F sample,dso,symbol \
    2>/dev/null | grep -v '^#' | grep -v '^$' |
    awk -v requests="$requests" -v hz="$FREQUENCY" "$classify"'
      { symbol = $4; for (i = 5; i <= NF; i++) symbol = symbol " " $i
        samples[part($2, symbol)] += $1 }
      END { for (p in samples) printf "%s %.1f\n", p, samples[p] / hz * 1e6 / requests }' \
    >"$work/$name"
}

# The extension once without perf: it writes the dev certificate and gives the answer the
# ceilings repeat.
start extension
post_request >"$work/answer.json"
stop_server

profile extension extension
profile ceiling ceiling
profile validating ceiling --validate-json

value() { awk -v p="$2" '$1 == p {v = $2} END {printf "%.1f", v + 0}' "$work/$1"; }
total() { awk '{t += $2} END {printf "%.1f", t}' "$work/$1"; }

echo "### CPU per CanUpdateMachine request, by part of the stack"
echo
echo "Command: \`scripts/profile-hooks.sh\` (perf, cpu-clock at $FREQUENCY Hz, ${DURATION} s of oha at concurrency 16 per server; µs of samples per request)."
echo
echo "| part | capd-inplace | ceiling | validating ceiling |"
echo "|---|---|---|---|"
for part in "${PARTS[@]}"; do
  echo "| $part | $(value extension "$part") | $(value ceiling "$part") | $(value validating "$part") |"
done
echo "| all | $(total extension) | $(total ceiling) | $(total validating) |"
echo
echo "Parts by symbol: handler is the extension's code, serde_json and the scanner (the validating"
echo "ceiling's JSON check); allocator is mimalloc; copying is libc's memcpy, memmove, memset and"
echo "memcmp, whoever calls them; http is hyper, axum and tower; tls is rustls and ring; runtime is"
echo "tokio, mio and the libc side of system calls; scheduling is the kernel switching and waking"
echo "threads, network the rest of the kernel; other is the standard library and the rest."
