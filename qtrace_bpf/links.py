"""BPF links on perf events, which can be pinned in bpffs and so outlive the daemon.

BCC attaches with PERF_EVENT_IOC_SET_BPF, which cannot be pinned (and a perf event BCC
attached cannot be given to BPF_LINK_CREATE: EEXIST).  Here the perf event is opened
directly (a uprobe through the uprobe PMU: file + offset; a tracepoint by its tracefs id)
and a BPF_LINK_CREATE link (attach type BPF_PERF_EVENT) holds the program on it.  A pinned
link keeps counting with no process holding it (../shared/facts/bpf-pinning.md), and goes
when its pin and every fd to it are gone.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from . import hooks
from .errors import AttachError, QtraceError

BPF_PERF_EVENT = 41  # enum bpf_attach_type
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
NR_PERF_EVENT_OPEN = 298  # x86-64
BPFFS_MAGIC = 0xCAFE4A11

_libc = ct.CDLL(None, use_errno=True)
_libbpf = ct.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
_libbpf.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_libbpf.bpf_obj_get.argtypes = [ct.c_char_p]
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_libbpf.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]


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


def uprobe_event(path: str, offset: int, retprobe: bool) -> int:
    """A perf event on the uprobe at (file, offset), all processes."""
    attr = PerfEventAttr()
    attr.type = _pmu_type("uprobe")
    attr.config = 1 if retprobe else 0  # format/retprobe: config:0
    path_buf = ct.create_string_buffer(path.encode())
    attr.config1 = ct.addressof(path_buf)
    attr.config2 = offset
    try:
        return _perf_event_open(attr)
    except OSError as exc:
        reason = "vanished" if exc.errno in (errno.ENOENT, errno.ESRCH) else "attach_failed"
        raise AttachError(f"uprobe {path}+{offset:#x}: {exc.strerror}", reason) from None


def tracepoint_event(category: str, name: str) -> int:
    root = hooks.tracefs_root()
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


def link(prog_fd: int, perf_fd: int) -> int:
    """A BPF link holding prog_fd on the perf event; the perf fd can be closed after."""
    fd = _libbpf.bpf_link_create(prog_fd, perf_fd, BPF_PERF_EVENT, None)
    if fd < 0:
        raise QtraceError(f"BPF_LINK_CREATE: {os.strerror(-fd if fd < -1 else ct.get_errno())}")
    return fd


def pin(fd: int, path: str) -> None:
    if _libbpf.bpf_obj_pin(fd, path.encode()) != 0:
        err = ct.get_errno()
        raise QtraceError(f"cannot pin {path}: {os.strerror(err)}")


def get_pinned(path: str) -> int | None:
    fd = _libbpf.bpf_obj_get(path.encode())
    return fd if fd >= 0 else None


class _ProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_ubyte * 8),
                ("pad", ct.c_ubyte * 216)]


class _LinkInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
                ("pad", ct.c_ubyte * 116)]


def prog_tag(prog_fd: int) -> str:
    info = _ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if _libbpf.bpf_obj_get_info_by_fd(prog_fd, ct.byref(info), ct.byref(size)) != 0:
        return ""
    return bytes(info.tag).hex()


def link_prog_tag(link_fd: int) -> str:
    """The tag of the program a (pinned) link holds: equal tags, equal code."""
    info = _LinkInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if _libbpf.bpf_obj_get_info_by_fd(link_fd, ct.byref(info), ct.byref(size)) != 0:
        return ""
    prog = _libbpf.bpf_prog_get_fd_by_id(info.prog_id)
    if prog < 0:
        return ""
    try:
        return prog_tag(prog)
    finally:
        os.close(prog)


def is_bpffs(path: str) -> bool:
    """Pins need a bpf filesystem (systemd mounts one at /sys/fs/bpf)."""

    class StatFs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_long * 15)]

    st = StatFs()
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if _libc.statfs(path.encode(), ct.byref(st)) != 0:
        return False
    return st.f_type & 0xFFFFFFFF == BPFFS_MAGIC
