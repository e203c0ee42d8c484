#!/usr/bin/env bash
# Build qtrace's container image with Debian's podman/buildah, offline from any registry:
# the base is a Debian 12 minbase root made by debootstrap (cached) and imported with
# `podman import`; the .deb built from this tree is installed in it by apt
# (deploy/container/Containerfile, which takes any Debian 12 base as BASE).  Prints the
# image's name: localhost/qtrace:VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-ensure.sh
apt_ensure podman buildah debootstrap catatonit
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman.conf}
# crun refuses a hybrid cgroup layout whose v2 hierarchy holds a controller (hugetlb here,
# the one controller no v1 hierarchy had taken): give it a v1 hierarchy, as the others have
if [ -r /sys/fs/cgroup/unified/cgroup.controllers ] && \
   [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers)" ]; then
  for c in $(cat /sys/fs/cgroup/unified/cgroup.controllers); do
    mkdir -p "/sys/fs/cgroup/$c" && mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
  done
fi
cache=${QTRACE_IMAGE_CACHE:-/var/cache/qtrace/image}
base=localhost/qtrace-base:bookworm-v1
if ! podman image exists "$base"; then
  root="$cache/bookworm-minbase-v1"
  if [ ! -e "$root/.complete" ]; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources \
             2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    rm -rf "$root" && mkdir -p "$cache"
    echo "build-image: debootstrap bookworm (minbase) into $root" >&2
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    chroot "$root" apt-get clean
    touch "$root/.complete"
  fi
  tar -C "$root" --exclude=./.complete -c . | podman import -q - "$base" >/dev/null
fi
deb=$(bash scripts/build-deb.sh | tail -n1)
ver=$(sed -n 's/^__version__ = "\(.*\)".*/\1/p' qtrace_bpf/__init__.py)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$deb" "$ctx/qtrace.deb"
echo "build-image: building localhost/qtrace:$ver from $(basename "$deb")" >&2
podman build -q --network=host --build-arg BASE="$base" -f deploy/container/Containerfile \
  -t "localhost/qtrace:$ver" "$ctx" >&2
echo "localhost/qtrace:$ver"
