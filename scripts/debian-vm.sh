#!/usr/bin/env bash
# Run a command as root inside a Debian guest booted on that release's own kernel, with
# the qtrace package built from this tree installed by apt and its service enabled, as on
# a real host.  The guest runs under TCG (-cpu max: it has SVM, so kvm-amd loads inside and
# QEMU there runs VMs with -accel kvm): a host's kernel hooks (fentry, kprobes, perf
# uprobes) on a machine whose own kernel offers none of them.
#
#   bash scripts/debian-vm.sh [--release bookworm|trixie] [--share DIR] -- COMMAND...
#   bash scripts/debian-vm.sh [--release R] --prepare     (build what is cached, boot nothing)
#
# COMMAND runs once qtrace.service is active (or has failed: its journal is printed
# first); its output is printed and its exit status is this script's.  --share DIR: DIR is
# readable and writable in the guest at the same path (9p).  The guest's port 10471 is
# forwarded to a free host port, printed on stderr and exported to COMMAND's caller as
# QTRACE_VM_PORT in DIR/.vm-port when --share is given.
#
# Cached under /var/cache/qtrace/debian-vm/ (QTRACE_VM_CACHE): the release's root (built
# once with debootstrap; ~5 min) and a disk image per package build (~1 min).  Each run
# boots a throwaway overlay of that image: the cached image never changes.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'debian-vm: %s\n' "$*" >&2; }
# The serial console's first kernel oops (the one that matters: later ones follow from it),
# then its last lines.
console() {
  local first
  first=$(grep -n -m1 -E 'Oops|BUG:|Kernel panic|WARNING: CPU' "$run/serial.log" | cut -d: -f1)
  if [ -n "$first" ]; then
    say "the guest kernel's first oops, from line $first of its console:"
    sed -n "$((first > 5 ? first - 5 : 1)),$((first + 45))p" "$run/serial.log" >&2
    say "the end of its console:"
  fi
  tail -40 "$run/serial.log" >&2
}
die() { say "$*"; exit 2; }

release=bookworm
share=""
prepare=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) release=${2:-}; shift 2 ;;
    --release=*) release=${1#*=}; shift ;;
    --share) share=${2:-}; shift 2 ;;
    --share=*) share=${1#*=}; shift ;;
    --prepare) prepare=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ $# -gt 0 ] || [ -n "$prepare" ] || die "no command given: bash scripts/debian-vm.sh [--release R] -- COMMAND..."
case "$release" in
  bookworm|trixie) ;;
  *) die "unknown release '$release': bookworm (Debian 12) or trixie (Debian 13)" ;;
esac
if [ -n "$share" ]; then
  [ -d "$share" ] || die "--share $share: not a directory"
  share=$(cd "$share" && pwd)
fi
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"

. scripts/apt-ensure.sh
apt_ensure debootstrap qemu-system-x86 qemu-utils e2fsprogs

cache=${QTRACE_VM_CACHE:-/var/cache/qtrace/debian-vm}
version=1  # bump when the root's package list or set-up changes
root="$cache/$release-v$version/root"
mkdir -p "$cache"
exec 9>"$cache/.lock-$release"
flock 9  # one build of a release at a time

mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
         | grep -v security | head -n1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"

PKGS=(linux-image-amd64 linux-headers-amd64 initramfs-tools systemd-sysv udev kmod
      iproute2 qemu-system-x86 seabios ipxe-qemu strace bpftool python3 python3-bpfcc
      libbpf1 python3-pyelftools python3-prometheus-client python3-click python3-bcrypt
      python3-yaml procps curl)

build_root() {
  local dir=$1 log="$cache/$release-v$version/build.log"
  say "building the $release root in $dir (debootstrap and ${#PKGS[@]} packages; ~5 min, once)"
  rm -rf "$dir" && mkdir -p "$dir"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,adduser,ca-certificates \
    "$release" "$dir" "$mirror" >"$log" 2>&1 || { tail -20 "$log" >&2; die "debootstrap failed (no network to $mirror?)"; }
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"  # no service starts in the chroot
  chmod +x "$dir/usr/sbin/policy-rc.d"
  chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${PKGS[@]}" >>"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get install failed in the $release root"; }
  # the headers BCC needs are those of the kernel that boots: the same version exactly
  local kver hver
  kver=$(ls "$dir"/lib/modules | sort -V | tail -n1)
  hver=$(ls -d "$dir"/usr/src/linux-headers-*-amd64 | sed 's|.*/linux-headers-||' | sort -V | tail -n1)
  [ "$kver" = "$hver" ] || die "$release: kernel $kver but headers $hver"
  chroot "$dir" apt-get clean
  rm -f "$dir/usr/sbin/policy-rc.d"
  # the guest: DHCP on user networking, root on /dev/vda, kvm-amd loaded, a serial console
  mkdir -p "$dir/etc/systemd/network"
  printf '[Match]\nName=en*\n[Network]\nDHCP=yes\n' >"$dir/etc/systemd/network/80-dhcp.network"
  chroot "$dir" systemctl enable systemd-networkd >/dev/null 2>&1
  chroot "$dir" systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
  printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$dir/etc/fstab"
  printf 'kvm_amd\n9p\n9pnet_virtio\n' >"$dir/etc/modules-load.d/qtrace-vm.conf"
  echo "qtrace-$release" >"$dir/etc/hostname"
  passwd -R "$dir" -d root >/dev/null
  touch "$dir/.complete"
}

if [ ! -e "$root/.complete" ]; then
  build_root "$root"
fi

# The package from this tree: one image per .deb (its hash names it)
deb=$(bash scripts/build-deb.sh | tail -n1)
sum=$(cat "$deb" "$0" | sha256sum | cut -c1-16)  # the package and how the image is made
image="$cache/$release-v$version/qtrace-$sum.img"
if [ ! -e "$image" ]; then
  say "making the $release image with $(basename "$deb")"
  rm -f "$cache/$release-v$version"/qtrace-*.img "$cache/$release-v$version"/qtrace-*.img.tmp  # older builds
  stage="$cache/$release-v$version/stage"
  rm -rf "$stage" && cp -a "$root" "$stage"
  cp "$deb" "$stage/tmp/qtrace.deb"
  printf '#!/bin/sh\nexit 101\n' >"$stage/usr/sbin/policy-rc.d"
  chmod +x "$stage/usr/sbin/policy-rc.d"
  log="$cache/$release-v$version/install.log"
  chroot "$stage" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    /tmp/qtrace.deb >"$log" 2>&1 || { tail -20 "$log" >&2; die "apt install of the package failed on $release"; }
  rm -f "$stage/usr/sbin/policy-rc.d" "$stage/tmp/qtrace.deb"
  chroot "$stage" systemctl is-enabled qtrace.service >/dev/null || die "qtrace.service not enabled by the package"
  # the guest's command runner (run.sh waits for qtrace.service itself), then power off
  cat >"$stage/etc/systemd/system/qtvm-run.service" <<'UNIT'
[Unit]
Description=Run the host's command (scripts/debian-vm.sh)
After=local-fs.target systemd-modules-load.service network.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /run/qtvm && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 qtvm /run/qtvm && exec /bin/bash /run/qtvm/run.sh'
ExecStopPost=/bin/systemctl poweroff --no-block
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
UNIT
  chroot "$stage" systemctl enable qtvm-run.service >/dev/null 2>&1
  # TCG runs the BPF loader's compile ~10x slower than a host: more time to start, and no
  # CPU quota (sized for a host, it would double that again)
  mkdir -p "$stage/etc/systemd/system/qtrace.service.d"
  # and no start limit: the tier restarts the service on purpose, many times
  printf '[Unit]\nStartLimitIntervalSec=0\n[Service]\nTimeoutStartSec=900s\nWatchdogSec=0\nCPUQuota=\n' \
    >"$stage/etc/systemd/system/qtrace.service.d/tcg.conf"
  mkfs.ext4 -q -F -L root -d "$stage" "$image.tmp" 6G >"$log.mkfs" 2>&1 \
    || { cat "$log.mkfs" >&2; die "mkfs.ext4 -d failed"; }
  mv "$image.tmp" "$image"
  rm -rf "$stage"
fi
if [ -n "$prepare" ]; then echo "$image"; exit 0; fi
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)

run=$(mktemp -d /tmp/qtrace-guest.XXXXXX)
qpid=""
cleanup() {
  [ -n "$qpid" ] && kill -9 "$qpid" 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT INT TERM
qemu-img create -q -f qcow2 -b "$image" -F raw "$run/disk.qcow2"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "guest port 10471 is 127.0.0.1:$port on the host"
[ -n "$share" ] && echo "$port" >"$share/.vm-port"
{
  printf '#!/bin/bash\n'
  printf 'exec >/run/qtvm/out 2>&1\n'
  if [ -n "$share" ]; then
    printf 'mkdir -p %q && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share %q\n' "$share" "$share"
  fi
  # wait for qtrace.service to settle: active, or failed (then its journal first)
  [ -n "${QTRACE_VM_NOWAIT:-}" ] || cat <<'WAIT'
for i in $(seq 1 900); do
  s=$(systemctl is-active qtrace.service)
  case "$s" in active|failed|inactive) break ;; esac
  sleep 1
done
if [ "$s" != active ]; then
  echo "debian-vm: qtrace.service is $s; its journal:"
  journalctl -u qtrace.service --no-pager | tail -60
fi
WAIT
  printf 'cd /\n'
  printf '%q ' "$@"
  printf '\necho $? >/run/qtvm/rc\nsync\n'
} >"$run/run.sh"

timeout=${QTRACE_VM_TIMEOUT:-1800}
# Multi-threaded TCG.  Once it let a trixie guest die of "Oops: int3" at a static-key site (a
# breakpoint text_poke_bp had removed); single-threaded TCG is slower and did not help the
# other fault seen here (kvm_vm_ioctl's fentry trampoline left out of ftrace: qtrace now
# checks for that and links again).  See docs/debian-hosts.md.
qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 3072 -nodefaults \
  -display none -no-reboot -kernel "$kernel" -initrd "$initrd" \
  -append "root=/dev/vda rw console=ttyS0 quiet mitigations=off panic=-1" \
  -drive "file=$run/disk.qcow2,if=virtio,format=qcow2,cache=unsafe" \
  -virtfs "local,path=$run,mount_tag=qtvm,security_model=none" \
  ${share:+-virtfs "local,path=$share,mount_tag=share,security_model=none"} \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:10471" -device virtio-net-pci,netdev=n0 \
  -serial "file:$run/serial.log" &
qpid=$!
started=$SECONDS
while kill -0 "$qpid" 2>/dev/null; do
  if [ $((SECONDS - started)) -ge "$timeout" ]; then
    kill -9 "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    qpid=""
    say "the guest did not finish within ${timeout}s: killed; its serial console:"
    console
    exit 124
  fi
  sleep 1
done
wait "$qpid" || true
qpid=""
[ -e "$run/out" ] && cat "$run/out"
if [ ! -e "$run/rc" ]; then
  say "the command did not complete in the guest; its serial console:"
  console
  exit 125
fi
exit "$(cat "$run/rc")"
