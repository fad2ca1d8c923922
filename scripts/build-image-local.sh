#!/usr/bin/env bash
# Builds the capd-inplace runtime image without pulling anything: the release binary comes from
# the host's cargo, the root filesystem is assembled by hand (the binary, the shared libraries
# ldd finds for it, /etc/passwd with the `nonroot` user 65532, CA certificates) and loaded with
# `docker import`. The result has the same layout, user and entrypoint as the Dockerfile's
# runtime stage, which needs a registry for its base images.
#
# Usage: scripts/build-image-local.sh [IMAGE]     (default capd-inplace:dev)
# Env:   CARGO (default cargo); CAPD_INPLACE_BINARY=path skips the cargo build and packages that
#        binary instead.
#
# The image is also tagged capd-inplace:content-<hash of the binary, its libraries and this
# script>, so an unchanged build only re-tags and returns in seconds. Prints the image on stdout.
set -euo pipefail

image="${1:-capd-inplace:dev}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

for tool in docker ldd sha256sum tar; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-image-local: '$tool' is required but not installed" >&2
    exit 1
  fi
done
if ! docker info >/dev/null 2>&1; then
  echo "build-image-local: no Docker Engine answers; run scripts/ensure-docker.sh first" >&2
  exit 1
fi

if [ -n "${CAPD_INPLACE_BINARY:-}" ]; then
  binary="$CAPD_INPLACE_BINARY"
else
  echo "build-image-local: cargo build --release --bin capd-inplace" >&2
  "${CARGO:-cargo}" build --release --locked --bin capd-inplace >&2
  binary="$repo_root/target/release/capd-inplace"
fi
if [ ! -x "$binary" ]; then
  echo "build-image-local: no executable at $binary" >&2
  exit 1
fi

ca_bundle=/etc/ssl/certs/ca-certificates.crt
if [ ! -s "$ca_bundle" ]; then
  echo "build-image-local: $ca_bundle is missing; install the ca-certificates package" >&2
  exit 1
fi

# Absolute paths of the shared objects the binary loads, the dynamic loader included. ldd prints
# "name => /path (addr)" for libraries and "/path (addr)" for the loader; vdso has no path.
mapfile -t libraries < <(ldd "$binary" | awk '
  $2 == "=>" && $3 ~ /^\// { print $3; next }
  $1 ~ /^\// { print $1 }')
if [ "${#libraries[@]}" -eq 0 ]; then
  # A static binary needs none; anything else means ldd failed to read it.
  if ! ldd "$binary" 2>&1 | grep -q 'not a dynamic executable\|statically linked'; then
    echo "build-image-local: ldd found no libraries for $binary" >&2
    exit 1
  fi
fi

content_hash="$(
  {
    sha256sum "$binary" "${BASH_SOURCE[0]}" "$ca_bundle" | cut -d' ' -f1
    for library in "${libraries[@]}"; do
      printf '%s %s\n' "$library" "$(sha256sum "$(readlink -f "$library")" | cut -d' ' -f1)"
    done
    printf '%s\n' "$image"
  } | sha256sum | cut -c1-16
)"
# The repository part of IMAGE: drop a tag, but not a registry port (localhost:5000/x:dev).
image_repository="$image"
case "${image##*/}" in
  *:*) image_repository="${image%:*}" ;;
esac
content_image="${image_repository}:content-${content_hash}"

if docker image inspect "$content_image" >/dev/null 2>&1; then
  docker tag "$content_image" "$image"
  echo "build-image-local: unchanged, $image is $content_image" >&2
  echo "$image"
  exit 0
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/capd-inplace-rootfs.XXXXXX")"
archive="$(mktemp "${TMPDIR:-/tmp}/capd-inplace-rootfs.XXXXXX.tar")"
trap 'rm -rf "$rootfs" "$archive"' EXIT

mkdir -p "$rootfs"/{usr/local/bin,etc/ssl/certs,var/cache/capd-inplace,home/nonroot,tmp}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/usr/local/bin/capd-inplace"
for library in "${libraries[@]}"; do
  # Same path inside the image as on the host, which is where the binary's ELF headers and the
  # loader's search path expect it; -L stores the file the symlink points to.
  mkdir -p "$rootfs$(dirname "$library")"
  cp -L "$library" "$rootfs$library"
done
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
# glibc resolves names through these; Docker and the kubelet supply /etc/hosts and resolv.conf.
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

# Everything belongs to root except the two directories the default user writes to. Two tar
# passes instead of chown, so the script also works for a non-root member of the docker group.
tar -C "$rootfs" -cf "$archive" --numeric-owner --owner=0 --group=0 \
  --exclude=./var/cache/capd-inplace --exclude=./home/nonroot .
tar -C "$rootfs" -rf "$archive" --numeric-owner --owner=65532 --group=65532 \
  ./var/cache/capd-inplace ./home/nonroot

# Engine 20.10's import accepts only CMD, ENTRYPOINT, ENV, EXPOSE, ONBUILD, USER, VOLUME and
# WORKDIR changes, so the Dockerfile's LABELs are not repeated here.
docker import \
  -c 'USER 65532:65532' \
  -c 'WORKDIR /' \
  -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  -c 'EXPOSE 9443 8080 8081' \
  -c 'ENTRYPOINT ["/usr/local/bin/capd-inplace"]' \
  -c 'CMD ["serve"]' \
  "$archive" "$content_image" >&2
docker tag "$content_image" "$image"
echo "build-image-local: built $image ($content_image)" >&2
echo "$image"
