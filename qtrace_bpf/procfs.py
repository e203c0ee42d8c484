"""Where processes are read: /proc, or the host's proc mounted elsewhere when qtrace runs in
a container that traces its host (`proc_root`, --path.procfs=/host/proc, as node_exporter
spells it).

One setting per process, made once at start-up before any pid is read: the tracker, the
binaries' trust checks and the BPF program must all number processes the same way, so the
program is compiled to report pids as this proc numbers them (pid_namespace)."""

from __future__ import annotations

import os

from qtrace_bpf.errors import QtraceError

DEFAULT = "/proc"
# The host's PID namespace (PROC_PID_INIT_INO): there BPF's own pids are the ones to use.
INIT_PIDNS_INO = 0xEFFFFFFC
_root = DEFAULT


def root() -> str:
    return _root


def path(pid: int | str, *rest: str) -> str:
    """/proc/PID/... under the configured root."""
    return "/".join((_root, str(pid), *rest))


def fstype(mount_point: str) -> str | None:
    """The filesystem type mounted exactly at `mount_point` (this process's mount table)."""
    want = os.path.realpath(mount_point)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            if point == want:
                found = fields[sep + 1]  # the last mount on a point is the one seen
    return found


def problem(proc_root: str) -> str:
    """Why `proc_root` cannot be where processes are read ("" if it can)."""
    if proc_root.rstrip("/") == DEFAULT:
        return ""
    if not os.path.isdir(proc_root):
        return "no such directory"
    kind = fstype(proc_root)
    if kind != "proc":
        return (f"not a proc filesystem ({kind or 'not a mount point'}): mount the host's "
                "/proc there (e.g. -v /proc:/host/proc:ro) or leave it at /proc")
    return ""


def use(proc_root: str) -> None:
    """Read processes from `proc_root` from now on (checked: a clear error if it is no proc)."""
    global _root
    why = problem(proc_root)
    if why:
        raise QtraceError(f"proc_root {proc_root}: {why}")
    _root = proc_root.rstrip("/") or DEFAULT


def _members(limit: int = 256) -> list[int]:
    """Pids of processes in exactly the PID namespace this proc shows (NSpid has one entry:
    no deeper namespace), a few, the first ones first."""
    names = sorted(int(e) for e in os.listdir(_root) if e.isdigit())[:limit]
    found = []
    for pid in names:
        try:
            with open(path(pid, "status")) as f:
                nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(nspid) == 1:
            found.append(pid)
    return found


def pid_namespace() -> tuple[int, int] | None:
    """(nsfs dev, inode) of the PID namespace this proc shows, unless it is the host's: the
    BPF program then reports pids as that namespace numbers them (kernel >= 5.7).  For
    /proc that is this process's own namespace; for another root (a host's /proc mounted
    into a container), the namespace of a process that lives in it (pid 1 may refuse even
    root a look at its namespace: the next one will do)."""
    if _root == DEFAULT:
        st = os.stat("/proc/self/ns/pid")
    else:
        for pid in _members():
            try:
                st = os.stat(path(pid, "ns", "pid"))
                break
            except OSError:
                continue
        else:
            raise QtraceError(f"cannot tell which PID namespace {_root} shows: no process's "
                              f"{_root}/PID/ns/pid can be read (needs CAP_SYS_PTRACE)")
    return None if st.st_ino == INIT_PIDNS_INO else (st.st_dev, st.st_ino)
