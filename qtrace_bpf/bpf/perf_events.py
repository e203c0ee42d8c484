"""Perf events that a BPF link can hold a program on: a uprobe (file + offset, through the
uprobe PMU) or a tracepoint (by its tracefs id).

BCC attaches with PERF_EVENT_IOC_SET_BPF, which cannot be pinned (and a perf event BCC
attached cannot be given to BPF_LINK_CREATE: EEXIST).  Opening the event here and linking
it (bpfsys.link) gives an attachment that can be pinned in bpffs and so outlives the
process; see docs/bpf-pinning.md.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from qtrace_bpf.errors import AttachError, QtraceError

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
NR_PERF_EVENT_OPEN = 298  # x86-64
TRACEFS = "/sys/kernel/tracing"

_libc = ct.CDLL(None, use_errno=True)


class PerfEventAttr(ct.Structure):
    """struct perf_event_attr, as far as these attachments need it (PERF_ATTR_SIZE_VER5)."""

    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64),
                ("read_format", ct.c_uint64), ("flags", ct.c_uint64),
                ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64),
                ("branch_sample_type", ct.c_uint64), ("sample_regs_user", ct.c_uint64),
                ("sample_stack_user", ct.c_uint32), ("clockid", ct.c_int32),
                ("sample_regs_intr", ct.c_uint64), ("aux_watermark", ct.c_uint32),
                ("sample_max_stack", ct.c_uint16), ("reserved", ct.c_uint16)]


def _perf_event_open(attr: PerfEventAttr) -> int:
    attr.size = ct.sizeof(attr)
    fd = _libc.syscall(NR_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
    return fd


def _pmu_type(name: str) -> int:
    with open(f"/sys/bus/event_source/devices/{name}/type") as f:
        return int(f.read())


def uprobe_event(path: str, offset: int, retprobe: bool, ref_ctr: int = 0) -> int:
    """A perf event on the uprobe at (file, offset), all processes.  ref_ctr: the file
    offset of a USDT semaphore the kernel counts up while the probe is attached."""
    attr = PerfEventAttr()
    attr.type = _pmu_type("uprobe")
    # format/retprobe: config:0; format/ref_ctr_offset: config:32-63
    attr.config = (1 if retprobe else 0) | (ref_ctr << 32)
    path_buf = ct.create_string_buffer(path.encode())
    attr.config1 = ct.addressof(path_buf)
    attr.config2 = offset
    try:
        return _perf_event_open(attr)
    except OSError as exc:
        reason = "vanished" if exc.errno in (errno.ENOENT, errno.ESRCH) else "attach_failed"
        raise AttachError(f"uprobe {path}+{offset:#x}: {exc.strerror}", reason) from None


def kprobe_event(function: str, retprobe: bool) -> int:
    """A perf event on a kprobe at a kernel function's entry (or return)."""
    attr = PerfEventAttr()
    try:
        attr.type = _pmu_type("kprobe")
    except OSError:
        raise QtraceError("no kprobe PMU (/sys/bus/event_source/devices/kprobe): kernel "
                          "built without CONFIG_KPROBES?") from None
    attr.config = 1 if retprobe else 0  # format/retprobe: config:0
    name_buf = ct.create_string_buffer(function.encode())
    attr.config1 = ct.addressof(name_buf)
    attr.config2 = 0
    try:
        return _perf_event_open(attr)
    except OSError as exc:
        raise QtraceError(f"kprobe {function}: {exc.strerror}") from None


def tracepoint_event(category: str, name: str) -> int:
    root = tracefs_root()
    if root is None:
        raise QtraceError("tracefs not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    with open(os.path.join(root, "events", category, name, "id")) as f:
        tp_id = int(f.read())
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_TRACEPOINT
    attr.config = tp_id
    try:
        return _perf_event_open(attr)
    except OSError as exc:
        raise QtraceError(f"tracepoint {category}:{name}: {exc.strerror}") from None


def tracefs_root() -> str | None:
    """Where tracefs is mounted (its event ids name tracepoints), or None."""
    for root in (TRACEFS, "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(root, "events")):
            return root
    return None
