#!/usr/bin/env bash
# A Debian 12 root whose PID 1 is systemd, for tests of the package under a real systemd
# (tests/integration/test_package_under_systemd.py boots it with systemd-nspawn --volatile=overlay: it stays pristine).
# Built once with debootstrap from the mirror apt already uses, cached; prints its path.
# Holds what the qtrace package depends on (so that installing the .deb needs no network),
# QEMU to run a VM inside, and the kernel headers BCC compiles against.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-ensure.sh
apt_ensure debootstrap systemd-container
cache=${QTRACE_NSPAWN_CACHE:-/var/cache/qtrace/nspawn}
version=1  # bump when the list below changes
root="$cache/bookworm-v$version"
if [ -e "$root/.complete" ]; then echo "$root"; exit 0; fi
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
         | grep -v security | head -n1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
rm -rf "$root" && mkdir -p "$cache"
echo "nspawn-root: debootstrap bookworm into $root (about a minute)" >&2
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,adduser,procps \
  bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
  tail -20 "$cache/debootstrap.log" >&2; exit 1; }
pkgs=(python3-bpfcc libbpf1 python3-pyelftools python3-prometheus-client python3-click
      python3-bcrypt python3-yaml linux-headers-amd64 qemu-system-x86 seabios ipxe-qemu
      systemd-container)
echo "nspawn-root: installing ${pkgs[*]}" >&2
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "${pkgs[@]}" >"$cache/apt.log" 2>&1 || {
  tail -20 "$cache/apt.log" >&2; exit 1; }
chroot "$root" apt-get clean
# no getty on the container's console, no network set-up to wait for
chroot "$root" systemctl mask console-getty.service systemd-networkd-wait-online.service \
  >/dev/null 2>&1 || true
touch "$root/.complete"
echo "$root"
