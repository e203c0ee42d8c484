#!/usr/bin/env bash
# What `apt install ./qtrace_*.deb` adds to a clean Debian 12 host (debootstrap minbase plus
# systemd, as a server has), with and without Recommends: the packages and the disk space
# apt reports.  Builds a throwaway root (~2 min); the README's install section quotes it.
#   bash scripts/apt-footprint.sh [DEB]
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(ls dist/qtrace_*_all.deb | tail -n1)}
. scripts/apt-ensure.sh
apt_ensure debootstrap
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
         | grep -v security | head -n1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
root=$(mktemp -d /var/tmp/qtrace-footprint.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
cp "$deb" "$root/tmp/qtrace.deb"
# Each case: packages apt would add, the space it reports, the largest of them (MB installed).
case_() {
  local label=$1; shift
  local out n size new big
  out=$(chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get install \
        --assume-no "$@" 2>&1 || true)
  n=$(sed -n 's/.* \([0-9]*\) newly installed.*/\1/p' <<<"$out")
  size=$(sed -n 's/^After this operation, \(.*\) of additional disk space.*/\1/p' <<<"$out")
  new=$(sed -n '/NEW packages will be installed/,/upgraded/{/^  /p}' <<<"$out")
  big=$(for p in $new; do
          kb=$(chroot "$root" apt-cache show --no-all-versions "$p" 2>/dev/null \
               | sed -n 's/^Installed-Size: //p' | head -n1)
          echo "${kb:-0} $p"
        done | sort -rn | head -n6 | awk '{printf "%s %d, ", $2, $1/1024}')
  printf '%s: %s packages, %s; largest (MB): %s\n' "$label" "$n" "$size" "${big%, }"
}
case_ "Depends only" --no-install-recommends /tmp/qtrace.deb
case_ "Depends + the kernel headers BCC compiles against" --no-install-recommends \
  /tmp/qtrace.deb linux-headers-amd64
case_ "with Recommends (apt's default)" /tmp/qtrace.deb
