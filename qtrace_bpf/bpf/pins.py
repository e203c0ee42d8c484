"""Pins in bpffs: where a program layout's maps and links live, and which links this
process holds, so that counters and probes outlive a daemon restart.

Layout policy: <root>/v<ABI>-<max_vms>x<max_vcpus>-<catalog hash> (loader.layout_name).
Pins of another layout (an older qtrace, other map sizes, another catalog) are never
read: removed, and the restart counted as a gap.  A link pin holding the same program
(same tag) is adopted as it is; one holding another program is replaced.  See
docs/bpf-pinning.md.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os

from qtrace_bpf.bpf import bpfsys
from qtrace_bpf.errors import QtraceError

BPFFS_MAGIC = 0xCAFE4A11


def is_bpffs(path: str) -> bool:
    """Pins need a bpf filesystem (systemd mounts one at /sys/fs/bpf)."""

    class StatFs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_long * 15)]

    st = StatFs()
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if ct.CDLL(None, use_errno=True).statfs(path.encode(), ct.byref(st)) != 0:
        return False
    return st.f_type & 0xFFFFFFFF == BPFFS_MAGIC


def remove_other_layouts(root: str, keep: str) -> list[str]:
    """Unpin every layout under root but `keep`; returns the names removed."""
    if not os.path.isdir(root):
        return []
    stale = sorted(set(os.listdir(root)) - {keep})
    for name in stale:
        remove_pins(os.path.join(root, name))
    return stale


def remove_pins(root: str) -> list[str]:
    """Unpin everything under root (maps and links go once no process holds them)."""
    removed = []
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            os.unlink(os.path.join(dirpath, f))
            removed.append(os.path.join(dirpath, f))
        os.rmdir(dirpath)
    return removed


def same_program(link_fd: int, prog_fd: int) -> bool:
    """Does the pinned link hold this program: the very object (a daemon restarted on its
    loader's pins), or the same code (a program compiled again: equal tags; reading the
    link's program needs CAP_SYS_ADMIN, so a non-root daemon only has the first)."""
    linked = bpfsys.link_prog_id(link_fd)
    if linked and linked == bpfsys.prog_id(prog_fd):
        return True
    tag = bpfsys.link_prog_tag(link_fd)
    return bool(tag) and tag == bpfsys.prog_tag(prog_fd)


class PinDir:
    """One layout's directory: maps/ (BCC pins them at load) and links/ (pinned here)."""

    def __init__(self, path: str):
        self.path = path
        self.maps = os.path.join(path, "maps")
        self.links = os.path.join(path, "links")
        try:
            os.makedirs(self.maps, exist_ok=True)
            os.makedirs(self.links, exist_ok=True)
        except OSError as exc:
            raise QtraceError(f"cannot make the pin directory {path}: {exc.strerror} (a unit "
                              "needs ReadWritePaths= on it, and no ProtectKernelTunables=, "
                              "which makes /sys/fs/bpf read-only)") from None
        self.carried = bool(os.listdir(self.maps))  # counters of a previous daemon continue
        self.kept: list[str] = []  # link pins adopted as they were
        self.replaced: list[str] = []  # link pins of another program, replaced
        self._claimed: set[str] = set()  # link pins this process holds

    def adopt(self, pin_name: str, prog_fd: int) -> int | None:
        """The pinned link's fd if it holds this very program (now claimed); None when a
        new link must be made (a pin of another program is removed first)."""
        path = os.path.join(self.links, pin_name)
        if not os.path.exists(path):
            return None
        old = bpfsys.get_pinned(path)
        if old is not None and same_program(old, prog_fd):
            self._claimed.add(pin_name)
            self.kept.append(pin_name)
            return old
        if old is not None:
            os.close(old)
        os.unlink(path)  # another program: its attachment goes, ours takes its place
        self.replaced.append(pin_name)
        return None

    def claim(self, pin_name: str) -> None:
        """A link pin someone else made for this layout (the loader): not to be pruned."""
        self._claimed.add(pin_name)

    def pin(self, link_fd: int, pin_name: str) -> None:
        bpfsys.pin(link_fd, os.path.join(self.links, pin_name))
        self._claimed.add(pin_name)

    def unpin(self, pin_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.links, pin_name))
        self._claimed.discard(pin_name)

    def prune(self) -> list[str]:
        """Unpin the link pins nobody claimed since start (files no process runs from any
        more, catalog slots that changed): their uprobes go away."""
        gone = [n for n in os.listdir(self.links) if n not in self._claimed]
        for name in gone:
            os.unlink(os.path.join(self.links, name))
        return gone

    def clear_maps(self) -> None:
        """Unpin the maps a failed load pinned (never counts a previous daemon left)."""
        remove_pins(self.maps)
        os.makedirs(self.maps, exist_ok=True)

    def remove(self) -> None:
        """Everything, and the root too when this layout was all it held."""
        remove_pins(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))
