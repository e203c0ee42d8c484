"""QEMU processes as VMs: identity from /proc, binary through /proc/PID/exe.

A binary replaced on disk by a package upgrade (deleted inode) or a QEMU in another
mount namespace is still reached through /proc/PID/exe, which names the mapped inode.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import QtraceError

_VCPU_FD_RE = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")
VM_NAME_MAX = 64


@dataclass
class Target:
    pid: int
    exe: str  # what /proc/PID/exe names (may end with " (deleted)")
    exe_path: str  # a path that opens the mapped binary: /proc/PID/exe
    name: str  # vm label: -name guest=NAME, -name NAME, else pid-PID
    uuid: str


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


def parse_uuid(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("-uuid", "--uuid") and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def sanitize_label(name: str, limit: int = VM_NAME_MAX) -> str:
    """Untrusted VM names become printable, bounded labels."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean[:limit]


def read_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        raw = f.read()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_qemu_exe(exe: str) -> bool:
    base = os.path.basename(exe.removesuffix(" (deleted)"))
    return base.startswith("qemu-system") or base.startswith("qemu-kvm")


def open_target(pid: int) -> Target:
    """The VM behind `pid`, or a QtraceError saying why it is not one we can trace."""
    if pid <= 0:
        raise QtraceError(f"pid {pid}: not a valid process id")
    if not os.path.exists(f"/proc/{pid}"):
        raise QtraceError(f"pid {pid}: no such process")
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        argv = read_cmdline(pid)
    except PermissionError:
        raise QtraceError(
            f"pid {pid}: permission denied reading /proc/{pid}/exe (run as root, or with "
            "CAP_SYS_PTRACE)") from None
    except FileNotFoundError:
        raise QtraceError(f"pid {pid}: no such process (or a kernel thread)") from None
    if not is_qemu_exe(exe):
        raise QtraceError(f"pid {pid}: not a QEMU process (exe is {exe})")
    name = parse_name(argv) or f"pid-{pid}"
    return Target(pid, exe, f"/proc/{pid}/exe", sanitize_label(name), parse_uuid(argv))


def vcpu_fds(pid: int) -> dict[int, int]:
    """fd -> vCPU id for the vCPU fds a running QEMU already holds."""
    out: dict[int, int] = {}
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for entry in entries:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        m = _VCPU_FD_RE.match(link)
        if m:
            out[int(entry)] = int(m.group(1))
    return out


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, names a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise QtraceError(f"pid {pid}: no such process") from None
    except OSError as exc:
        raise QtraceError(f"pid {pid}: cannot read /proc/{pid}/stat: {exc.strerror}") from None
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
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if is_qemu_exe(os.readlink(f"/proc/{entry}/exe")):
                out[int(entry)] = start_time(int(entry))
        except (OSError, QtraceError):
            continue
    return out
