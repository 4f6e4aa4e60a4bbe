#!/usr/bin/env bash
# System packages the tests and the demo use: iptables, iproute2 and python3 (capture rules in network
# namespaces, test clients run as the proxy's uid), busybox (the local sidecar image), and podman with
# runc where no Docker engine answers (pods in containers). Idempotent; installs only what is missing; needs root to install.
set -euo pipefail
need=()
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/bin/python3 ] || need+=(python3)
# Containers without Docker: podman's Docker-compatible API, with runc (crun fails on these hosts).
if ! docker info >/dev/null 2>&1; then
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v runc >/dev/null 2>&1 || need+=(runc)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]}; run as root to install them (tests that need them will skip, loudly)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
