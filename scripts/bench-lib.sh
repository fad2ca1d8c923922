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
