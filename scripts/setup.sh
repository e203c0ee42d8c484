#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian host (root): system packages that BCC,
# the tests and the demo need, kernel headers visible to BCC, tracefs, and a venv.
# Fast when already done: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*" >&2; }

APT_PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 qemu-system-x86 python3-venv
          bpftool strace gcc make binutils xz-utils elfutils prometheus iproute2 openssl
          systemd util-linux libvirt-daemon-system libvirt-clients bpftrace linux-perf gdb
          dwz debuginfod qemu-utils lintian)

if [ "$(id -u)" != 0 ]; then say "must run as root (BPF, /dev/kvm, apt)"; exit 1; fi

. scripts/apt-ensure.sh
apt_ensure "${APT_PKGS[@]}"

# BCC compiles against kernel headers; this kernel ships none. Link Debian's closest
# headers (not an exact match: fine for uprobe/tracepoint programs, said out loud).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include/generated" ] || [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  if [ -z "$hdr" ]; then say "no /usr/src/linux-headers-*-amd64 found"; exit 1; fi
  common=${hdr%-amd64}-common   # Debian splits arch files (build) from the rest (source)
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  say "kernel headers for $(uname -r) missing: linked $(basename "$hdr") (not an exact match; fine for uprobe/tracepoint programs)"
fi

# libvirt (integration tests): /dev/kvm is 0600 root on these machines, so QEMU run as
# libvirt-qemu cannot use KVM, and libvirtd re-probes every binary's capabilities on each
# `virsh define` (48 s here).  Run the system instance's QEMUs as root, as the test domains'
# <seclabel> already asks.
qconf=/etc/libvirt/qemu.conf
if [ -f "$qconf" ] && [ "$(stat -c %a /dev/kvm 2>/dev/null)" = 600 ] && ! grep -q '^user = "+0"' "$qconf"; then
  sed -i 's/^#user = "libvirt-qemu"/user = "+0"/; s/^#group = "libvirt-qemu"/group = "+0"/' "$qconf"
  say "libvirt: QEMU runs as root (/dev/kvm is 0600): $qconf user/group = +0"
fi

# Pinned maps and links (counts that survive a daemon restart) need a bpf filesystem;
# systemd mounts one at /sys/fs/bpf, these machines have no systemd.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null && say "mounted bpffs at /sys/fs/bpf" || true
fi

if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -e /sys/kernel/debug/tracing ] && [ -d /sys/kernel/debug ]; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv (system site packages, for BCC)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
