#!/usr/bin/env bash
# Build the local base image local/bookworm-python:3.11 from Debian packages (no image registry
# is needed): debootstrap a minimal bookworm with python3 and python3-venv, strip what a runtime
# never reads (apt caches and lists, docs, man pages, locales), import it. Cached: does nothing if
# the image exists (FORCE=1 rebuilds). Needs root and debootstrap. About 1-2 minutes.
set -euo pipefail
IMAGE=${BASE_IMAGE:-local/bookworm-python:3.11}
if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: cached"
  exit 0
fi

# The Debian mirror apt already uses (deb822 or one-line sources), else deb.debian.org.
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
             | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -E '/debian/?$' \
             | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d /var/tmp/gatewayd-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "base image $IMAGE: debootstrap bookworm from $mirror"
t0=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log"; exit 1; }
r="$work/rootfs"
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* \
       "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/*.log \
       "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar -C "$r" -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["/bin/bash"]' -m "debootstrap minbase bookworm + python3 (gatewayd docker/base-image.sh)" \
  - "$IMAGE" >/dev/null
echo "base image $IMAGE: built in $(( $(date +%s) - t0 )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
