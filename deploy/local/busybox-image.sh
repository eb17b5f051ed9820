#!/usr/bin/env bash
# Imports a tiny image (busybox-static, with /data) as TAG into the running dockerd, for
# machines that cannot pull images.
set -euo pipefail
tag=${1:-busybox:local}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/data" "$rootfs/etc"
cp /bin/busybox "$rootfs/bin/"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
tar -C "$rootfs" -cf "$work/image.tar" .
docker import "$work/image.tar" "$tag"
