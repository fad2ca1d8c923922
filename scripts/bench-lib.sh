# Sourced by the bench-*.sh scripts that run the release binaries against simulated clusters.
# Afterwards the working directory is the repository root, `root` and `bin` (the freshly built
# release binaries) are set, and the simulated-cluster tooling finds its binaries.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -q --release -p capd-inplace -p capd-inplace-e2e -p capd-inplace-simnode >&2
bin="$root/target/release"
export CAPD_SIMNODE_BIN="$bin/simnode" CAPD_INPLACE_BIN="$bin/capd-inplace"

# The HTTP load generator of the hook benchmarks, installed into .cache/tools on first use
# (minutes of compiling, once); sets `oha`.
ensure_oha() {
  oha="$root/.cache/tools/bin/oha"
  if [ ! -x "$oha" ]; then
    echo "installing oha into .cache/tools (first run only)" >&2
    local start=$SECONDS
    cargo install oha --locked --root "$root/.cache/tools" >&2
    echo "oha installed in $((SECONDS - start)) s" >&2
  fi
}

# For the scripts that start one server after another (bench-hook-instructions.sh,
# profile-hooks.sh): sets `work`, a scratch directory named after $1 and removed on exit, with
# the CanUpdateMachine request of the load test in $work/request.json; `certs`, where the
# extension writes its dev certificate; and `server_pid`, the server that `stop_server` and the
# exit stop. Each server logs to $work/server.log.
one_server_at_a_time() { # scratch directory's name
  work="$(mktemp -d "/var/tmp/capd-inplace-$1.XXXXXX")"
  server_pid=""
  trap one_server_cleanup EXIT
  trap 'exit 130' INT TERM
  certs="$work/certs"
  mkdir -p "$work/no-mirror"
  "$bin/bench-setup" can-update-request "$work/request.json"
}

# The command words the servers run under (none, or valgrind's).
wrapper=()
# Starts the extension as bench-hooks.sh does, or a ceiling server answering $work/answer.json,
# on a port of its own (a port just closed may still be taken for a while; below the kernel's
# ephemeral range, where the clients' own ends are); sets `url` and `server_pid`.
start_server() { # extension | ceiling [--validate-json]
  local port=$((20000 + RANDOM % 12000))
  if [ "$1" = extension ]; then
    url="https://127.0.0.1:$port/hooks.runtime.cluster.x-k8s.io/v1alpha1/canupdatemachine/can-update-machine"
    RUST_LOG=warn "${wrapper[@]}" "$bin/capd-inplace" serve \
      --bind-address "127.0.0.1:$port" --cert-dir "$certs" --dev-self-signed \
      --health-probe-bind-address "127.0.0.1:$((port + 1))" --metrics-bind-address 0 \
      --artifact-url "file://$work/no-mirror" --artifact-cache-dir "$work/cache" \
      >>"$work/server.log" 2>&1 &
  else
    url="https://127.0.0.1:$port/"
    "${wrapper[@]}" "$bin/bench-ceiling" "127.0.0.1:$port" "$certs" "$work/answer.json" "${@:2}" \
      >>"$work/server.log" 2>&1 &
  fi
  server_pid=$!
}

stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
one_server_cleanup() {
  local status=$?
  stop_server
  rm -rf "$work"
  exit "$status"
}

# POSTs the request to the server; its answer on stdout.
post_request() { curl -fsS --cacert "$certs/ca.crt" --data-binary "@$work/request.json" "$url"; }

# Waits up to $1 seconds for the server to answer, or fails with its log's tail.
await_server() { # seconds
  local deadline=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$deadline" ]; do
    post_request >/dev/null 2>&1 && return
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "the server on $url does not answer; its log:" >&2
  grep -v '^ *[0-9]*: \|^ *at ' "$work/server.log" | tail -n 20 >&2
  exit 1
}
