# Sourced by the bench-*.sh scripts that run the release binaries against simulated clusters.
# Afterwards the working directory is the repository root, `root` and `bin` (the freshly built
# release binaries) are set, and the simulated-cluster tooling finds its binaries.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -q --release -p capd-inplace -p capd-inplace-e2e -p capd-inplace-simnode >&2
bin="$root/target/release"
export CAPD_SIMNODE_BIN="$bin/simnode" CAPD_INPLACE_BIN="$bin/capd-inplace"
