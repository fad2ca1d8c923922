#!/usr/bin/env bash
# `make bench`: every benchmark, unattended, one after the other (they share 2 cores and must not
# overlap), each writing its Markdown fragment into docs/benchmarks.md between its markers
# (`<!-- bench:NAME -->` … `<!-- /bench:NAME -->`), so the document always shows the last run.
#
# BENCH="decision hooks hook-instructions staging overhead scale" picks which ones run (default: all).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
doc=docs/benchmarks.md
out=target/bench
mkdir -p "$out"

bash scripts/ensure-docker.sh >/dev/null
# The hook load test reads oha's JSON and the hooks' answers with jq.
command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq >/dev/null; }
bash scripts/build-simnode-image.sh >/dev/null
cargo build -q --release --workspace --bins

# Replaces what is between the markers of $1 in the document with the file $2.
splice() {
  grep -qx "<!-- bench:$1 -->" "$doc" || { echo "no marker for $1 in $doc" >&2; return 1; }
  awk -v name="$1" -v file="$2" '
    $0 == "<!-- bench:" name " -->" { print; while ((getline line < file) > 0) print line; skip = 1; next }
    $0 == "<!-- /bench:" name " -->" { skip = 0 }
    !skip { print }
  ' "$doc" > "$doc.tmp"
  mv "$doc.tmp" "$doc"
}

machine="$(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), \
Docker Engine $(docker version --format '{{.Server.Version}}') ($(docker info --format '{{.Driver}}')), \
$(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -r)"
{
  echo "Last \`make bench\`: $(date -u +%Y-%m-%d), $machine."
} > "$out/machine.md"
splice machine "$out/machine.md"

total_start=$SECONDS
for name in ${BENCH:-decision hooks hook-instructions staging overhead scale}; do
  echo "== bench: $name" >&2
  start=$SECONDS
  bash "scripts/bench-$name.sh" > "$out/$name.md"
  echo "" >> "$out/$name.md"
  echo "_Ran in $((SECONDS - start)) s._" >> "$out/$name.md"
  splice "$name" "$out/$name.md"
  echo "== bench: $name took $((SECONDS - start)) s" >&2
done
echo "== all benchmarks took $((SECONDS - total_start)) s; tables written to $doc" >&2
