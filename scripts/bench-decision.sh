#!/usr/bin/env bash
# The in-process CanUpdateMachine decision (criterion, benches/can_update.rs) on a realistic
# 30 KB request. Prints a Markdown fragment on stdout; criterion's own report goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo bench -q --bench can_update -- --warm-up-time 1 --measurement-time 5 --noplot 2>&1 |
  tee "$log" >&2

echo "### In-process CanUpdateMachine decision"
echo
echo "\`scripts/bench-decision.sh\` (criterion, \`benches/can_update.rs\`): a CanUpdateMachine request"
echo "padded to 30 KB with files in the KubeadmConfig, as real clusters carry them. The floor is"
echo "the extension's scanner (\`src/hooks/scan.rs\`) checking that the whole request is JSON and keeping"
echo "nothing; the reference is serde_json doing the same, as the validating ceiling of the hook load does."
echo
echo "| what | estimate | 95% interval | aim |"
echo "|---|---|---|---|"
# criterion prints the name, then `time: [low estimate high]` (on the same line when it fits).
awk '
  /^can_update_machine/ { name = $0; sub(/ *time:.*/, "", name); sub(/ +$/, "", name) }
  /time:/ {
    sub(/.*\[/, ""); sub(/\].*/, "")
    split($0, t, " ")
    aim = (name ~ /encode/) ? "< 200 µs" : ""
    printf "| %s | %s %s | %s %s – %s %s | %s |\n", name, t[3], t[4], t[1], t[2], t[5], t[6], aim
  }
' "$log"
