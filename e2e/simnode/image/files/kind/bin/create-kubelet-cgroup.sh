#!/bin/sh
# Creates the cgroup that kind's kubelet flag cgroup-root=/kubelet points at.
set -eu
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  mkdir -p /sys/fs/cgroup/kubelet
elif [ -d /sys/fs/cgroup/systemd ]; then
  mkdir -p /sys/fs/cgroup/systemd/kubelet
fi
