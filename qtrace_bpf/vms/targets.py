"""Discovery in user space: QEMU processes (read from /proc once, as a Target) and the
host's QEMU binaries (from the configured globs).

A binary replaced on disk by a package upgrade (deleted inode) or a QEMU in another
mount namespace is still reached through /proc/PID/exe, which names the mapped inode.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from qtrace_bpf import procfs
from qtrace_bpf.contract.decoders import VM_LABEL_MAX
from qtrace_bpf.errors import QtraceError

_VCPU_FD_RE = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")
VM_NAME_MAX = VM_LABEL_MAX


DELETED = " (deleted)"


@dataclass(frozen=True)
class Target:
    """One QEMU process as /proc showed it once: read here, passed on, never re-read."""

    pid: int
    start_time: int  # /proc/PID/stat starttime: (pid, start_time) is the process
    exe: str  # the binary as an operator names it (its path, without " (deleted)")
    exe_path: str  # a path that opens the mapped binary: /proc/PID/exe
    name: str  # vm label: -name guest=NAME, -name NAME, else pid-PID (sanitised)
    uuid: str
    vcpu_fds: dict[int, int] = field(default_factory=dict)  # fd -> vCPU id, at open time


def _unescape_opt(value: str) -> str:
    return value.replace(",,", "\0")


def parse_name(argv: list[str]) -> str | None:
    """The VM name from QEMU's -name option (guest=NAME,... or NAME,...; ',,' is a comma)."""
    for i, arg in enumerate(argv):
        if arg in ("-name", "--name") and i + 1 < len(argv):
            raw = _unescape_opt(argv[i + 1])
            parts = raw.split(",")
            name = None
            for j, part in enumerate(parts):
                if part.startswith("guest="):
                    name = part[len("guest="):]
                elif j == 0 and "=" not in part:
                    name = part
            if name:
                return name.replace("\0", ",")
    return None


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")


def parse_uuid(argv: list[str]) -> str:
    """-uuid, canonical lowercase; anything else is no uuid (it becomes a label: a 128 KiB
    value would fail Prometheus' whole scrape)."""
    for i, arg in enumerate(argv):
        if arg in ("-uuid", "--uuid") and i + 1 < len(argv):
            raw = argv[i + 1]
            if not _UUID_RE.fullmatch(raw):
                return ""
            h = raw.replace("-", "").lower()
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return ""


def sanitize_label(name: str, limit: int = VM_NAME_MAX) -> str:
    """Untrusted VM names become printable, bounded labels."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean[:limit]


def read_cmdline(pid: int) -> list[str]:
    with open(procfs.path(pid, "cmdline"), "rb") as f:
        raw = f.read()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_qemu_exe(exe: str) -> bool:
    base = os.path.basename(exe.removesuffix(DELETED))
    return base.startswith("qemu-system") or base.startswith("qemu-kvm")


def open_target(pid: int) -> Target:
    """The VM behind `pid`, or a QtraceError saying why it is not one we can trace."""
    if pid <= 0:
        raise QtraceError(f"pid {pid}: not a valid process id")
    if not os.path.exists(procfs.path(pid)):
        raise QtraceError(f"pid {pid}: no such process")
    started = start_time(pid)
    try:
        exe = os.readlink(procfs.path(pid, "exe"))
        argv = read_cmdline(pid)
    except PermissionError:
        raise QtraceError(
            f"pid {pid}: permission denied reading {procfs.path(pid, 'exe')} (run as root, or with "
            "CAP_SYS_PTRACE)") from None
    except FileNotFoundError:
        raise QtraceError(f"pid {pid}: no such process (or a kernel thread)") from None
    if not is_qemu_exe(exe):
        raise QtraceError(f"pid {pid}: not a QEMU process (exe is {exe})")
    name = parse_name(argv) or f"pid-{pid}"
    return Target(pid, started, exe.removesuffix(DELETED), procfs.path(pid, "exe"),
                  sanitize_label(name), parse_uuid(argv), vcpu_fds(pid))


def vcpu_fds(pid: int) -> dict[int, int]:
    """fd -> vCPU id for the vCPU fds a running QEMU already holds."""
    out: dict[int, int] = {}
    try:
        entries = os.listdir(procfs.path(pid, "fd"))
    except OSError:
        return out
    for entry in entries:
        try:
            link = os.readlink(procfs.path(pid, "fd", entry))
        except OSError:
            continue
        m = _VCPU_FD_RE.match(link)
        if m:
            out[int(entry)] = int(m.group(1))
    return out


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, names a process."""
    try:
        with open(procfs.path(pid, "stat"), "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise QtraceError(f"pid {pid}: no such process") from None
    except OSError as exc:
        raise QtraceError(f"pid {pid}: cannot read {procfs.path(pid, 'stat')}: "
                          f"{exc.strerror}") from None
    # comm (field 2) may hold spaces and parentheses: count from the last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def alive(pid: int, started: int) -> bool:
    """Is (pid, start time) still the same running process?"""
    try:
        return start_time(pid) == started
    except QtraceError:
        return False


def running_qemus() -> dict[int, int]:
    """pid -> start time of every QEMU process now."""
    out = {}
    for entry in os.listdir(procfs.root()):
        if not entry.isdigit():
            continue
        try:
            if is_qemu_exe(os.readlink(procfs.path(entry, "exe"))):
                out[int(entry)] = start_time(int(entry))
        except (OSError, QtraceError):
            continue
    return out


def pid_of_vm(name: str) -> int:
    """The pid of the running QEMU whose `vm` label (as the daemon exports it) is `name`."""
    found, names = [], []
    for pid in sorted(running_qemus()):
        try:
            label = sanitize_label(parse_name(read_cmdline(pid)) or f"pid-{pid}")
        except OSError:
            continue
        names.append(label)
        if label == name:
            found.append(pid)
    if not found:
        running = ", ".join(sorted(set(names))) or "none"
        raise QtraceError(f"no running QEMU is VM {name!r} (-name guest={name}); running: "
                          f"{running}")
    if len(found) > 1:
        raise QtraceError(f"VM {name!r} is more than one QEMU process (pids "
                          f"{', '.join(map(str, found))}): give the pid")
    return found[0]


# Package managers write the new file beside the old one first (qemu-system-x86_64.dpkg-new,
# qemu-kvm;5f3a9c2e with rpm), then rename it: a glob sees that half-written file.
_TEMP_NAME = re.compile(r"\.(dpkg-(new|tmp|old|dist|bak)|rpm(new|save|orig))$|;[0-9a-f]{8}$")


def _starts_with_elf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return True  # let the resolver report why it cannot be read


def host_binaries(patterns: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(path, "") for each executable ELF file the globs match, or (path, why skipped) for
    a file that is not one (e.g. Debian's qemu-system-i386, a shell wrapper)."""
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if _TEMP_NAME.search(path) or not (os.path.isfile(path) and
                                               os.access(path, os.X_OK)):
                continue
            if not _starts_with_elf_magic(path):
                yield path, "not an ELF file (a wrapper script?)"
                continue
            yield path, ""
