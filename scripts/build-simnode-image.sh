#!/usr/bin/env bash
# Builds the images of the simulated kind node.
#
#   build-simnode-image.sh [--base]
#
# 1. The base: a Debian bookworm root filesystem with systemd as PID 1, made with debootstrap
#    and imported with `docker import`, because this project must build without a container
#    registry. Tagged capd-inplace/simnode-base:<hash of build_base>.
# 2. The layout: kind's node layout on top of the base (kubelet.service and its drop-ins,
#    /kind, /etc/kubernetes/manifests, /var/lib/kubelet), without any Kubernetes binary.
#    Tagged capd-inplace/simnode:<hash of the base tag and e2e/simnode/image>.
#    The launcher (e2e/src/sim*.rs) adds /usr/bin/kube{adm,let,ctl} and /kind/version per version.
#
# Both tags are content hashes, so a second run finds the images and returns in seconds.
# Prints the layout image reference on stdout (the base one with --base).
# With SIMNODE_FROM_REGISTRY=1 the layout is built from e2e/simnode/image/Dockerfile
# (FROM debian:bookworm) instead, for machines that can pull.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
context="$here/../e2e/simnode/image"

# The base recipe. Its own text is the cache key, so edits elsewhere in this script do not
# rebuild the 2-minute debootstrap.
build_base() {
  local image="$1"
  local mirror="${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
  mirror="${mirror:-http://deb.debian.org/debian}"

  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  fi

  local rootfs
  rootfs="$(mktemp -d /var/tmp/simnode-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' RETURN
  echo "debootstrap bookworm from ${mirror} (about 2 minutes)" >&2
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,procps,curl,ca-certificates,iproute2,util-linux \
    bookworm "$rootfs" "$mirror" >&2

  # Trim what a node never needs, so the image stays small.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  # Units that fail or make no sense inside a container.
  local unit
  for unit in systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service \
    systemd-remount-fs.service getty@tty1.service console-getty.service; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done

  # `docker import` takes no STOPSIGNAL; the layout image sets it.
  tar -C "$rootfs" -c . | docker import \
    -c 'ENTRYPOINT ["/sbin/init"]' -c 'ENV container=docker' \
    - "$image" >&2
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Hash of a directory's file names, modes and contents, stable across checkouts.
tree_hash() {
  (cd "$1" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z |
    while IFS= read -r -d '' f; do
      if [ -L "$f" ]; then printf '%s link %s\n' "$f" "$(readlink "$f")"; else
        printf '%s %s %s\n' "$f" "$(stat -c %a "$f")" "$(sha256sum <"$f" | cut -c1-64)"; fi
    done) | sha256sum | cut -c1-12
}

if [ "${SIMNODE_FROM_REGISTRY:-0}" = 1 ]; then
  layout="capd-inplace/simnode:registry-$(tree_hash "$context")"
  if ! image_exists "$layout"; then
    docker build -q -t "$layout" -f "$context/Dockerfile" "$context" >&2
  fi
  echo "$layout"
  exit 0
fi

base="capd-inplace/simnode-base:$(declare -f build_base | sha256sum | cut -c1-12)"
if ! image_exists "$base"; then
  build_base "$base"
fi
if [ "${1:-}" = "--base" ]; then
  echo "$base"
  exit 0
fi

layout="capd-inplace/simnode:$(printf '%s %s' "$base" "$(tree_hash "$context")" | sha256sum | cut -c1-12)"
if ! image_exists "$layout"; then
  echo "building ${layout} from ${base}" >&2
  DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base" -t "$layout" \
    -f "$context/Dockerfile.layout" "$context" >&2
fi
echo "$layout"
