"""The bpf() system call, through Debian's libbpf: the one module that calls it.

Why one module: BCC compiles and loads, but links, pins, pinned-object lookups, program
tags, map access and the ring buffer are plain bpf() commands (and libbpf's ring-buffer
reader) that every part of qtrace needs the same way, and that the long-lived daemon must
do without BCC; here each one returns a Python value or raises QtraceError with the errno.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from qtrace_bpf.errors import QtraceError

BPF_PERF_EVENT = 41  # enum bpf_attach_type
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
BPF_LINK_CREATE = 28  # enum bpf_cmd
NR_BPF = 321  # x86-64
BPF_NOEXIST = 1  # map update flag: only if the key is absent

_lib = ct.CDLL("libbpf.so.1", use_errno=True)
_lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_RB_CALLBACK = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_lib.ring_buffer__new.restype = ct.c_void_p
_lib.ring_buffer__new.argtypes = [ct.c_int, _RB_CALLBACK, ct.c_void_p, ct.c_void_p]
_lib.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
_lib.ring_buffer__consume.argtypes = [ct.c_void_p]
_lib.ring_buffer__free.argtypes = [ct.c_void_p]
_lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]


def _errno(rc: int) -> int:
    """libbpf returns -errno (and sets errno): either says what went wrong."""
    return -rc if rc < -1 else (ct.get_errno() or -rc)


def link(prog_fd: int, perf_fd: int) -> int:
    """A BPF link holding prog_fd on the perf event; the perf fd can be closed after."""
    fd = _lib.bpf_link_create(prog_fd, perf_fd, BPF_PERF_EVENT, None)
    if fd < 0:
        raise QtraceError(f"BPF_LINK_CREATE: {os.strerror(_errno(fd))}")
    return fd


class _UprobeMultiAttr(ct.Structure):
    """union bpf_attr's link_create, as far as uprobe_multi needs it (libbpf 1.1 predates
    it); the tail stays zero, as the kernel requires."""

    _fields_ = [("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32),
                ("attach_type", ct.c_uint32), ("flags", ct.c_uint32), ("path", ct.c_uint64),
                ("offsets", ct.c_uint64), ("ref_ctr_offsets", ct.c_uint64),
                ("cookies", ct.c_uint64), ("cnt", ct.c_uint32), ("uflags", ct.c_uint32),
                ("pid", ct.c_uint32), ("tail", ct.c_uint8 * 68)]


_libc = ct.CDLL(None, use_errno=True)


def link_uprobe_multi(prog_fd: int, path: str, offsets: list[int], retprobe: bool,
                      ref_ctrs: list[int] | None = None) -> int:
    """One BPF link holding prog_fd on uprobes at these file offsets of `path`, every
    process (kernel >= 6.6).  Needs CAP_BPF and CAP_PERFMON only, where a uprobe perf event
    may need CAP_SYS_ADMIN; raises OSError with the errno.  ref_ctrs: per offset, the file
    offset of its USDT semaphore (0: none)."""
    offs = (ct.c_uint64 * len(offsets))(*offsets)
    refs = (ct.c_uint64 * len(offsets))(*ref_ctrs) if ref_ctrs and any(ref_ctrs) else None
    cpath = ct.create_string_buffer(path.encode())
    attr = _UprobeMultiAttr(prog_fd=prog_fd, attach_type=BPF_TRACE_UPROBE_MULTI,
                            path=ct.addressof(cpath), offsets=ct.addressof(offs),
                            ref_ctr_offsets=ct.addressof(refs) if refs is not None else 0,
                            cnt=len(offsets),
                            uflags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0)
    fd = _libc.syscall(NR_BPF, BPF_LINK_CREATE, ct.byref(attr), ct.sizeof(attr))
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def pin(fd: int, path: str) -> None:
    rc = _lib.bpf_obj_pin(fd, path.encode())
    if rc != 0:
        raise QtraceError(f"cannot pin {path}: {os.strerror(_errno(rc))}")


def get_pinned(path: str) -> int | None:
    """The pinned object's fd; None when nothing is pinned there.  Any other refusal is an
    error that says why: in a container, bpf() is often what was refused."""
    fd = _lib.bpf_obj_get(path.encode())
    if fd >= 0:
        return fd
    err = ct.get_errno()
    if err == errno.ENOENT:
        return None
    hint = (" (bpf() refused: CAP_BPF missing, or a seccomp profile that allows bpf() only "
            "with CAP_SYS_ADMIN, as container runtimes' default profiles may)"
            if err == errno.EPERM else "")
    raise QtraceError(f"cannot open the pin {path}: {os.strerror(err)}{hint}")


class _ProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_ubyte * 8),
                ("pad", ct.c_ubyte * 216)]


class _LinkInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
                ("pad", ct.c_ubyte * 116)]


def _info(fd: int, cls: type):
    """BPF_OBJ_GET_INFO_BY_FD into a cls (a program's or a link's), or None."""
    info = cls()
    size = ct.c_uint32(ct.sizeof(info))
    if _lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        return None
    return info


def prog_id(prog_fd: int) -> int:
    info = _info(prog_fd, _ProgInfo)
    return info.id if info else 0


def link_prog_id(link_fd: int) -> int:
    """The id of the program a (pinned) link holds (no CAP_SYS_ADMIN needed)."""
    info = _info(link_fd, _LinkInfo)
    return info.prog_id if info else 0


def prog_tag(prog_fd: int) -> str:
    info = _info(prog_fd, _ProgInfo)
    return bytes(info.tag).hex() if info else ""


def link_prog_tag(link_fd: int) -> str:
    """The tag of the program a (pinned) link holds: equal tags, equal code ("" when it
    cannot be read: BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN)."""
    linked = link_prog_id(link_fd)
    if not linked:
        return ""
    prog = _lib.bpf_prog_get_fd_by_id(linked)
    if prog < 0:
        return ""
    try:
        return prog_tag(prog)
    finally:
        os.close(prog)


def insert(map_fd: int, key: ct.Structure | ct._SimpleCData,
           value: ct.Structure | ct._SimpleCData) -> bool:
    """Insert key -> value unless the key is there (False then); QtraceError on a refusal
    (a full map: E2BIG/ENOMEM)."""
    rc = _lib.bpf_map_update_elem(map_fd, ct.byref(key), ct.byref(value), BPF_NOEXIST)
    if rc == 0:
        return True
    err = _errno(rc)
    if err == errno.EEXIST:
        return False
    raise QtraceError(os.strerror(err))


def lookup_batch(map_fd: int, key_type: type, value_type: type, chunk: int = 4096) \
        -> list[tuple[object, object]] | None:
    """Every (key, value) of a hash map, BPF_MAP_LOOKUP_BATCH: a few thousand entries a
    system call.  None when the kernel has no batch lookup for this map."""
    out: list[tuple[object, object]] = []
    token_in, token_out = ct.create_string_buffer(64), ct.create_string_buffer(64)
    count = ct.c_uint32()
    first = True
    while True:
        # fresh arrays each round: the keys handed out point into them
        keys, vals = (key_type * chunk)(), (value_type * chunk)()
        count.value = chunk
        rc = _lib.bpf_map_lookup_batch(map_fd, None if first else token_in, token_out,
                                       keys, vals, ct.byref(count), None)
        err = _errno(rc) if rc != 0 else 0
        out += [(keys[i], vals[i]) for i in range(count.value)]
        if rc != 0:
            if err == errno.ENOENT:
                return out  # the whole map was read
            if first and err in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                return None
            raise QtraceError(f"lookup batch failed: {os.strerror(err)}")
        first = False
        ct.memmove(token_in, token_out, 64)


class Map:
    """A BPF map by fd, with its ctypes key and value types (Key, Leaf: BCC's names)."""

    def __init__(self, fd: int, key: type, value: type, name: str = ""):
        self.map_fd, self.Key, self.Leaf, self.name = fd, key, value, name

    def __getitem__(self, key):
        value = self.Leaf()
        rc = _lib.bpf_map_lookup_elem(self.map_fd, ct.byref(key), ct.byref(value))
        if rc != 0:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value) -> None:
        rc = _lib.bpf_map_update_elem(self.map_fd, ct.byref(key), ct.byref(value), 0)
        if rc != 0:
            raise QtraceError(f"map {self.name}: update failed: {os.strerror(_errno(rc))}")

    def __delitem__(self, key) -> None:
        if _lib.bpf_map_delete_elem(self.map_fd, ct.byref(key)) != 0:
            raise KeyError(key)

    def keys(self) -> list:
        out, key, nxt = [], None, self.Key()
        while _lib.bpf_map_get_next_key(self.map_fd, None if key is None else ct.byref(key),
                                        ct.byref(nxt)) == 0:
            out.append(nxt)
            key, nxt = nxt, self.Key()
        return out

    def items(self) -> list:
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:
                pass  # deleted meanwhile
        return out


class RingBuffer:
    """libbpf's reader of a BPF ring buffer: `on_sample(data_pointer, size)` per record."""

    def __init__(self, map_fd: int, on_sample) -> None:
        def callback(_ctx, data, size):
            on_sample(data, size)
            return 0

        self._callback = _RB_CALLBACK(callback)  # kept alive as long as the reader
        self._rb = _lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not self._rb:
            raise QtraceError(f"ring buffer: {os.strerror(ct.get_errno())}")

    def poll(self, timeout_ms: int) -> None:
        _lib.ring_buffer__poll(self._rb, timeout_ms)

    def consume(self) -> None:
        _lib.ring_buffer__consume(self._rb)

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = None
