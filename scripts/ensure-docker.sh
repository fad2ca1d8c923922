#!/usr/bin/env bash
# Makes sure a Docker Engine answers on the default socket. Returns at once when one does;
# otherwise, on Debian as root, installs docker.io from Debian's packages, starts dockerd in
# the background and waits for it. Docker is the project's one prerequisite.
set -euo pipefail

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-docker: no Docker Engine answers, and only root can install one; start Docker and retry" >&2
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  echo "ensure-docker: installing docker.io" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
  echo "ensure-docker: starting dockerd" >&2
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi

for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "ensure-docker: dockerd did not answer within 60 s; see /var/log/dockerd.log" >&2
exit 1
