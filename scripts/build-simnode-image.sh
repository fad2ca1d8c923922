#!/usr/bin/env bash
# Builds the base image of the simulated kind node: a Debian bookworm root filesystem with
# systemd as PID 1, made with debootstrap and imported with `docker import`, because this
# project must build without a container registry.
#
# The tag is a hash of this script, so a second run finds the image and returns in seconds.
# Prints the image reference on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
image="capd-inplace/simnode-base:${hash}"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

mirror="${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
fi

rootfs="$(mktemp -d /var/tmp/simnode-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from ${mirror} (about 2 minutes)" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,procps,curl,ca-certificates,iproute2,util-linux \
  bookworm "$rootfs" "$mirror" >&2

# Trim what a node never needs, so the image stays small.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
# Units that fail or make no sense inside a container.
for unit in systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service \
  systemd-remount-fs.service getty@tty1.service console-getty.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done

tar -C "$rootfs" -c . | docker import \
  -c 'ENTRYPOINT ["/sbin/init"]' -c 'ENV container=docker' \
  - "$image" >&2
echo "$image"
