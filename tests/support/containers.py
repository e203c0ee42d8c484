"""A container as KubeVirt's virt-launcher is one, made with util-linux alone: its own mount
and PID namespaces, a tmpfs root holding its own copy of the QEMU binary (as an image layer
would), the host's libraries and /dev bound in, its own /proc."""

from __future__ import annotations

from pathlib import Path

SCRIPT = r"""
set -eu
R=$1; SHARE=$2; TRACE=$3; QEMU=$4; shift 4
mount -t tmpfs -o mode=755 rootfs "$R"
mkdir -p "$R/usr/bin" "$R/usr/lib" "$R/usr/lib64" "$R/usr/share" "$R/dev" "$R/proc" \
         "$R/old" "$R/run"
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
for d in usr/lib usr/lib64 usr/share dev; do mount --rbind "/$d" "$R/$d"; done
if [ -n "$SHARE" ]; then mkdir -p "$R$SHARE"; mount --bind "$SHARE" "$R$SHARE"; fi
cp "$QEMU" "$R/usr/bin/qemu-system-x86_64"
cp /usr/bin/strace "$R/usr/bin/strace"
mount -t proc proc "$R/proc"
cd "$R"
pivot_root . old
/old/usr/bin/umount -l /old
if [ -n "$TRACE" ]; then
  exec /usr/bin/strace -f -y -ttt -e trace=ioctl -o "$TRACE" /usr/bin/qemu-system-x86_64 "$@"
fi
exec /usr/bin/qemu-system-x86_64 "$@"
"""


def container(root: Path, share: str = "", trace: str = "") -> list[str]:
    """The argv prefix that runs `QEMU ARGS...` in a container rooted at `root` (an empty
    directory).  share: a host directory seen at the same path inside (QMP sockets);
    trace: a path under `share` where strace inside writes QEMU's ioctls."""
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGKILL", "sh", "-c",
            SCRIPT, "sh", str(root), share, trace]
