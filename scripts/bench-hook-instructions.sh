#!/usr/bin/env bash
# Instructions per CanUpdateMachine request over HTTPS, counted by callgrind: the extension, the
# ceiling server (the same TLS and HTTP stack answering a fixed copy of the extension's answer)
# and the validating ceiling (the same, after checking that the request is JSON). Each server runs
# under `valgrind --tool=callgrind`, gets a warm-up, has its counters zeroed, then serves REQUESTS
# requests from oha over one keep-alive connection (concurrency 1; the one TLS handshake is
# counted, about 0.5% of the total); the counters are dumped and divided by REQUESTS.
#
# Unlike requests per second, an instruction count does not depend on what else the machine is
# doing: the same binaries and request give the same figures within a fraction of a percent, so
# this table is the one to compare builds with. Instructions are not time (a vector copy of 30 KB
# is a handful of instructions, a cache miss is one), so the rps tables stay the verdict.
#
# Prints a Markdown fragment on stdout; progress on stderr. Needs valgrind (installed from
# Debian's packages when missing), curl and jq; installs oha like bench-hooks.sh.
set -euo pipefail

REQUESTS="${REQUESTS:-1000}"
WARM_UP=20

command="scripts/bench-hook-instructions.sh"
log() { echo "bench-hook-instructions: $*" >&2; }

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
ensure_oha
command -v valgrind >/dev/null || { apt-get update -qq >&2 && apt-get install -y -qq valgrind >&2; }
for tool in curl jq valgrind callgrind_control callgrind_annotate; do
  command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done

one_server_at_a_time bench-instructions

# The extension once without valgrind: it writes the dev certificate and gives the answer the
# ceilings repeat, which must be an in-place decision.
start_server extension
await_server 60
post_request >"$work/answer.json"
jq -e '.status == "Success" and .machinePatch != null' "$work/answer.json" >/dev/null ||
  { log "CanUpdateMachine did not answer in place: $(cat "$work/answer.json")"; exit 1; }
stop_server

oha_requests() { # count: requests over one connection; fails unless every answer is a 200
  "$oha" --no-tui --output-format json --cacert "$certs/ca.crt" -m POST -D "$work/request.json" \
    -c 1 -n "$1" "$url" >"$work/oha.json"
  jq -e --argjson n "$1" '.statusCodeDistribution["200"] == $n' "$work/oha.json" >/dev/null ||
    { log "not every answer was a 200: $(jq -c '.statusCodeDistribution, .errorDistribution' "$work/oha.json")"; exit 1; }
}

# Counts one server (started by "$@" under callgrind) and sets `counted` to its instructions per
# request; its profile is left in $work/$name.out.1. Runs in this shell, not in a $(…), so that
# `set -e` and the cleanup's `server_pid` hold inside it.
counted=""
count() { # name start-function args...
  local name=$1 out="$work/$1.out"
  shift
  wrapper=(valgrind --tool=callgrind --callgrind-out-file="$out" -q)
  "$@"
  await_server 60
  oha_requests "$WARM_UP"
  callgrind_control -z "$server_pid" >>"$work/callgrind_control.log" 2>&1 ||
    { log "callgrind_control could not zero the counters of $name"; exit 1; }
  oha_requests "$REQUESTS"
  callgrind_control -d "$server_pid" >>"$work/callgrind_control.log" 2>&1 ||
    { log "callgrind_control could not dump the counters of $name"; exit 1; }
  # The dump is written by the server itself, a moment after the request to dump.
  for _ in $(seq 100); do [ -s "$out.1" ] && break; sleep 0.1; done
  stop_server
  counted="$(awk -v n="$REQUESTS" '/^totals:/ {printf "%.0f", $2 / n}' "$out.1" 2>/dev/null || true)"
  [[ "$counted" =~ ^[0-9]+$ ]] || { log "no instruction count in the profile of $name"; exit 1; }
}

log "counting the ceiling, the validating ceiling and the extension, $REQUESTS requests each"
start=$SECONDS
count ceiling start_server ceiling
plain=$counted
count validating start_server ceiling --validate-json
validating=$counted
count extension start_server extension
extension=$counted
log "done in $((SECONDS - start)) s"

# Inclusive instructions per request of one function of the extension's profile, by its full
# name (empty when inlining left no such function). callgrind lists a function under more than one
# file name (the source files of the code inlined into it, and its own by relative and by absolute
# path); the entry with the largest inclusive count is the function with all it calls.
inclusive() { # function name
  callgrind_annotate --inclusive=yes --threshold=100 "$work/extension.out.1" 2>/dev/null |
    awk -v name="$1" -v n="$REQUESTS" '
      /^ *[0-9,]+ \(/ {
        entry = $0
        sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", entry)
        sub(/ \[[^]]*\]$/, "", entry)
        if (substr(entry, index(entry, ":") + 1) == name) {
          count = $1; gsub(",", "", count)
          if (!found || count + 0 > best) best = count + 0
          found = 1
        }
      }
      END { if (found) printf "%.0f", best / n }'
}
decode=$(inclusive "capd_inplace::hooks::types::read_can_update")
skim=$(inclusive "capd_inplace::hooks::scan::Scanner::skip")
decide=$(inclusive "capd_inplace::hooks::can_update::can_update_machine")
drop=$(inclusive "core::ptr::drop_in_place<capd_inplace::hooks::types::CanUpdateMachineRequest>")

thousands() { if [ -n "$1" ]; then awk -v x="$1" 'BEGIN {printf "%.0fk", x / 1000}'; else echo "n/a"; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

echo "### Instructions per CanUpdateMachine request"
echo
echo "Command: \`$command\` (callgrind, $REQUESTS requests of $(wc -c <"$work/request.json") bytes over one keep-alive HTTPS connection after $WARM_UP unmeasured ones; every answer a 200, the extension's in place)."
echo
echo "| server | instructions per request | to the ceiling |"
echo "|---|---|---|"
echo "| ceiling: fixed answer | $(thousands "$plain") | 1.00 |"
echo "| validating ceiling: checks the request is JSON, then the fixed answer | $(thousands "$validating") | $(ratio "$validating" "$plain") |"
echo "| capd-inplace | $(thousands "$extension") | $(ratio "$extension" "$plain") |"
echo
echo "Checking with serde_json that the request is JSON costs the validating ceiling $(thousands $((validating - plain))) instructions per request. The extension checks it with its own scanner (\`src/hooks/scan.rs\`), which passes over the desired side's copy of a spec the current side has already shown with a byte comparison. Of the extension's $(thousands "$extension"):"
echo
echo "- reading the request: $(thousands "$decode"), of which the scanner checking values (decoded or not): $(thousands "$skim");"
echo "- deciding and building the answer: $(thousands "$decide"); dropping the request: $(thousands "$drop");"
if [ -n "$decode" ] && [ -n "$decide" ] && [ -n "$drop" ]; then
  echo "- everything else (TLS, HTTP, layers, writing the answer): $(thousands $((extension - decode - decide - drop))), against the ceiling's $(thousands "$plain")."
fi
