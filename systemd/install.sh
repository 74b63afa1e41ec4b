#!/bin/sh
# Install gatewayd's system files: the unit, the sysusers and tmpfiles entries, the example
# config (only if there is none yet), with the ownership the service needs:
#   /etc/gatewayd                root:gatewayd 0750
#   /etc/gatewayd/gatewayd.toml  root:gatewayd 0640  (the service reads it, only root writes it)
#   /etc/gatewayd/credentials    root:root     0700  (LoadCredential= sources)
#
# Usage (from a clone or the unpacked sdist, as root):  make install-system
#   DESTDIR=/some/root  install into another root (image builds, tests)
#   GATEWAYD_BIN=...    the installed gatewayd (default /opt/gatewayd/bin/gatewayd, as in README)
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
bin=${GATEWAYD_BIN:-/opt/gatewayd/bin/gatewayd}

install -D -m 0644 "$src/systemd/gatewayd.sysusers" "$root/usr/lib/sysusers.d/gatewayd.conf"
install -D -m 0644 "$src/systemd/gatewayd.tmpfiles" "$root/usr/lib/tmpfiles.d/gatewayd.conf"
install -D -m 0644 "$src/systemd/gatewayd.service" "$root/etc/systemd/system/gatewayd.service"
install -d -m 0755 "$root/usr/bin"
ln -sfn "$bin" "$root/usr/bin/gatewayd"

if [ -n "$root" ]; then
  systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/gatewayd.conf"
else
  systemd-sysusers /usr/lib/sysusers.d/gatewayd.conf
fi
# Numeric ids from the target root's own user database (the host may not know the user).
gid=$(awk -F: '$1 == "gatewayd" { print $3 }' "$root/etc/group")
uid=$(awk -F: '$1 == "gatewayd" { print $3 }' "$root/etc/passwd")
[ -n "$gid" ] && [ -n "$uid" ] || { echo "install.sh: no gatewayd user after systemd-sysusers" >&2; exit 1; }

install -d -m 0750 -o 0 -g "$gid" "$root/etc/gatewayd"
install -d -m 0700 -o 0 -g 0 "$root/etc/gatewayd/credentials"
install -d -m 0750 -o "$uid" -g "$gid" "$root/var/lib/gatewayd"
if [ -e "$root/etc/gatewayd/gatewayd.toml" ]; then
  echo "install.sh: keeping the existing /etc/gatewayd/gatewayd.toml (ownership fixed)"
  chown 0:"$gid" "$root/etc/gatewayd/gatewayd.toml"
  chmod 0640 "$root/etc/gatewayd/gatewayd.toml"
else
  install -m 0640 -o 0 -g "$gid" "$src/config.example.toml" "$root/etc/gatewayd/gatewayd.toml"
fi
echo "install.sh: installed; next: edit /etc/gatewayd/gatewayd.toml, put secrets in /etc/gatewayd/credentials,"
echo "  then: gatewayd check --no-secrets -c /etc/gatewayd/gatewayd.toml && systemctl enable --now gatewayd"
