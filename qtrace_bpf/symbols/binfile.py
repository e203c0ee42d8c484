"""A QEMU binary opened once: checked as trusted, then parsed and attached through that one
open file, never by its name again.

Why: a uprobe writes an int3 into the page cache of a file, which every process mapping it
executes.  Where the probes go must be decided by the file itself, and only by a file no
unprivileged process could have written.  Opening by name twice (once to parse, once to
attach) lets a process that execs something else, or swaps a symlink in between, steer
offsets read from one file into another; so the parse reads the fd, and the kernel is handed
/proc/self/fd/N, which names the very inode that was parsed.

Trusted: a regular file owned by a trusted uid (root), writable by its owner only, whose
directories (as far as they can be seen) are owned by a trusted uid and writable by their
owner only, or sticky (like /tmp: nobody else may rename or remove the entries in it).
A container's QEMU passes when its image layer holds it as root (what podman, containerd
and KubeVirt's virt-launcher images do); a user-namespaced container's files belong to a
mapped uid and are refused unless that uid is configured as trusted.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from qtrace_bpf import procfs
from qtrace_bpf.errors import AttachError

FileKey = tuple[int, int]  # (st_dev, st_ino)
Version = tuple[int, int]  # (st_size, st_mtime_ns): a file rewritten in place changes it
TRUSTED_UIDS = (0,)


@dataclass
class BinaryFile:
    """One open binary: its identity when opened, and a path that reaches that inode."""

    fd: int
    key: FileKey
    version: Version
    display: str  # what an operator calls it
    untrusted: str = ""  # why it may have been written by an untrusted user ("": trusted)

    @property
    def path(self) -> str:
        """Opens this very inode (the kernel resolves it at attach time)."""
        return f"/proc/self/fd/{self.fd}"

    def unchanged(self) -> bool:
        """Still the file that was parsed: same inode, size and mtime (checked at attach:
        a file rewritten in place would make the parsed offsets another file's)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return ((st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)) == (self.key, self.version)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def untrusted_reason(st: os.stat_result, uids: tuple[int, ...] = TRUSTED_UIDS) -> str:
    """Why a file or directory may have been written by someone untrusted ("" if not)."""
    if st.st_uid not in uids:
        return f"owned by uid {st.st_uid}"
    if stat.S_ISDIR(st.st_mode):
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"directory writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        return ""
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _names(fd: int, key: FileKey, display: str, pid: int | None) -> tuple[str, str] | None:
    """(root, path) such that root + path names this inode now: the kernel's own name for
    the open file in our mount namespace, else the process's name for it under its root
    (a QEMU in a container); None for a deleted or replaced file."""
    cands = []
    try:
        cands.append(("", os.readlink(f"/proc/self/fd/{fd}")))
    except OSError:
        pass
    if pid is not None:
        cands.append((procfs.path(pid, "root"), display))
    for root, path in cands:
        if not path.startswith("/"):
            continue
        try:
            st = os.stat(root + path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            return root, path
    return None


def _check_dirs(display: str, root: str, uids: tuple[int, ...]) -> str:
    """Every directory from `root` down to the file `display` names in it: trusted?"""
    parts = [p for p in display.split("/")[:-1] if p]
    current = root or "/"
    for i in range(len(parts) + 1):
        try:
            st = os.lstat(current) if i else os.stat(current)
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current}: not a directory"
        why = untrusted_reason(st, uids)
        if why:
            return f"directory {current[len(root):] or '/'} {why}"
        if i < len(parts):
            current = os.path.join(current, parts[i])
    return ""


def open_binary(path: str, display: str, pid: int | None = None,
                uids: tuple[int, ...] = TRUSTED_UIDS) -> BinaryFile:
    """Open `path` (a file, or /proc/PID/exe) once and say whether it is trusted
    (`untrusted`: why not; the caller closes it and probes nothing).

    Raises AttachError: "vanished" when it cannot be opened, "unusable_binary" when it is
    not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise AttachError(f"{display}: {exc.strerror}", "vanished") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AttachError(f"{display}: not a regular file", "unusable_binary")
        key = (st.st_dev, st.st_ino)
        why = untrusted_reason(st, uids)
        if not why:
            named = _names(fd, key, display, pid)
            if named is not None:  # else deleted or replaced: no name can be swapped any more
                why = _check_dirs(named[1], named[0], uids)
        return BinaryFile(fd, key, (st.st_size, st.st_mtime_ns), display, why)
    except BaseException:
        os.close(fd)
        raise
