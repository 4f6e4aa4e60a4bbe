#!/usr/bin/env bash
# System packages the tests and the demo use: iptables and busybox (capture rules and test apps in
# network namespaces; Debian's python3 runs test clients as the proxy's uid). Idempotent; installs only what is missing; needs root to install.
set -euo pipefail
need=()
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/bin/python3 ] || need+=(python3)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]}; run as root to install them (tests that need them will skip, loudly)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
