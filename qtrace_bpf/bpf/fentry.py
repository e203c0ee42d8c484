"""fentry/fexit programs on KVM's ioctl handlers, loaded here rather than by BCC.

Why: on Debian (and most distributions) KVM is a module, so kvm_vcpu_ioctl lives in the
module's split BTF (/sys/kernel/btf/kvm), and BCC up to at least 0.26 looks fentry targets
up in vmlinux's BTF only.  BCC still compiles the programs (plain BPF_PROG functions, so it
attaches nothing); their instructions are loaded here as BPF_PROG_TYPE_TRACING with the
module's BTF object and the function's type id, and attached with BPF_LINK_CREATE.

Needs CAP_SYS_ADMIN for the module's BTF fd (BPF_BTF_GET_FD_BY_ID): the service's loader
runs privileged, the long-running daemon does not (docs/debian-hosts.md).
"""

from __future__ import annotations

import ctypes as ct
import functools
import os

from qtrace_bpf.errors import QtraceError

PROG_TYPE_TRACING = 26  # enum bpf_prog_type
TRACE_FENTRY, TRACE_FEXIT = 24, 25  # enum bpf_attach_type
BTF_KIND_FUNC = 12
BPF_PROG_LOAD = 5
NR_BPF = 321  # x86-64
LOG_SIZE = 1 << 16

_bpf = ct.CDLL("libbpf.so.1", use_errno=True)
_bpf.btf__load_vmlinux_btf.restype = ct.c_void_p
_bpf.btf__load_module_btf.restype = ct.c_void_p
_bpf.btf__load_module_btf.argtypes = [ct.c_char_p, ct.c_void_p]
_bpf.btf__find_by_name_kind.argtypes = [ct.c_void_p, ct.c_char_p, ct.c_uint32]
_bpf.btf__free.argtypes = [ct.c_void_p]
_bpf.bpf_btf_get_next_id.argtypes = [ct.c_uint32, ct.POINTER(ct.c_uint32)]
_bpf.bpf_btf_get_fd_by_id.argtypes = [ct.c_uint32]
_bpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_bpf.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
_libc = ct.CDLL(None, use_errno=True)


class _ProgLoadAttr(ct.Structure):
    """union bpf_attr for BPF_PROG_LOAD up to attach_btf_obj_fd (6.1's layout), zero tail."""

    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32),
                ("insns", ct.c_uint64), ("license", ct.c_uint64),
                ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32),
                ("prog_flags", ct.c_uint32), ("prog_name", ct.c_char * 16),
                ("prog_ifindex", ct.c_uint32), ("expected_attach_type", ct.c_uint32),
                ("prog_btf_fd", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("func_info", ct.c_uint64), ("func_info_cnt", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("line_info", ct.c_uint64),
                ("line_info_cnt", ct.c_uint32), ("attach_btf_id", ct.c_uint32),
                ("attach_btf_obj_fd", ct.c_uint32), ("tail", ct.c_uint8 * 28)]


class _BtfInfo(ct.Structure):
    _fields_ = [("btf", ct.c_uint64), ("btf_size", ct.c_uint32), ("id", ct.c_uint32),
                ("name", ct.c_uint64), ("name_len", ct.c_uint32),
                ("kernel_btf", ct.c_uint32)]


@functools.lru_cache(maxsize=8)
def btf_id(function: str, module: str = "kvm") -> tuple[int, bool]:
    """(BTF type id of `function`, whether it is in `module`'s split BTF rather than
    vmlinux's).  Parsing vmlinux's BTF takes a while: once per function and process."""
    vmlinux = _bpf.btf__load_vmlinux_btf()
    if not vmlinux:
        raise QtraceError("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")
    try:
        found = _bpf.btf__find_by_name_kind(vmlinux, function.encode(), BTF_KIND_FUNC)
        if found > 0:
            return found, False
        split = _bpf.btf__load_module_btf(module.encode(), vmlinux)
        if not split:
            raise QtraceError(f"{function} is not in vmlinux's BTF and the {module} module "
                              f"has none (/sys/kernel/btf/{module}: is {module} loaded?)")
        try:
            found = _bpf.btf__find_by_name_kind(split, function.encode(), BTF_KIND_FUNC)
        finally:
            _bpf.btf__free(split)
        if found <= 0:
            raise QtraceError(f"{function} is not in the {module} module's BTF")
        return found, True
    finally:
        _bpf.btf__free(vmlinux)


def target(function: str, module: str = "kvm") -> tuple[int, int | None]:
    """(BTF type id of `function`, fd of the BTF object it is in: None for vmlinux).
    A built-in KVM has its functions in vmlinux; a module's are in its split BTF."""
    found, in_module = btf_id(function, module)
    if not in_module:
        return found, None
    return found, module_btf_fd(module)


def module_btf_fd(module: str) -> int:
    """The fd of the kernel's BTF object of `module` (walks BTF ids: CAP_SYS_ADMIN)."""
    next_id = ct.c_uint32(0)
    while _bpf.bpf_btf_get_next_id(next_id.value, ct.byref(next_id)) == 0:
        fd = _bpf.bpf_btf_get_fd_by_id(next_id.value)
        if fd < 0:
            err = ct.get_errno()
            raise QtraceError(f"cannot open the kernel's BTF objects: {os.strerror(err)} "
                              "(fentry on a module needs CAP_SYS_ADMIN: the loader runs "
                              "privileged)")
        name = ct.create_string_buffer(64)
        info = _BtfInfo(name=ct.addressof(name), name_len=len(name))
        size = ct.c_uint32(ct.sizeof(info))
        if _bpf.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) == 0 and \
                info.kernel_btf and name.value == module.encode():
            return fd
        os.close(fd)
    err = ct.get_errno()
    raise QtraceError(f"no kernel BTF object named {module!r}"
                      + (f" ({os.strerror(err)})" if err not in (0, 2) else ""))


def load(insns: bytes, name: str, exit_: bool, function: str) -> int:
    """Load one fentry (or fexit, exit_=True) program on `function`; its fd."""
    btf_id, btf_fd = target(function)
    log = ct.create_string_buffer(LOG_SIZE)
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=PROG_TYPE_TRACING, insn_cnt=len(insns) // 8,
                         insns=ct.addressof(code), license=ct.addressof(lic),
                         prog_name=name.encode()[:15],
                         expected_attach_type=TRACE_FEXIT if exit_ else TRACE_FENTRY,
                         attach_btf_id=btf_id, attach_btf_obj_fd=btf_fd or 0)
    try:
        fd = _libc.syscall(NR_BPF, BPF_PROG_LOAD, ct.byref(attr), ct.sizeof(attr))
        err = ct.get_errno()
        if fd < 0:  # again with the verifier's log, for the reason
            attr.log_level, attr.log_size, attr.log_buf = 1, LOG_SIZE, ct.addressof(log)
            again = _libc.syscall(NR_BPF, BPF_PROG_LOAD, ct.byref(attr), ct.sizeof(attr))
            if again >= 0:
                os.close(again)
    finally:
        if btf_fd is not None:
            os.close(btf_fd)  # the program holds the module's BTF now
    if fd < 0:
        # the verifier's last words, less its statistics ("processed N insns ...")
        why = [ln for ln in log.value.decode(errors="replace").splitlines()
               if ln.strip() and not ln.startswith(("processed ", "verification time"))]
        raise QtraceError(f"{'fexit' if exit_ else 'fentry'} on {function}: "
                          f"{os.strerror(err)}" + (f" ({why[-1]})" if why else ""))
    return fd


def link(prog_fd: int, exit_: bool) -> int:
    """BPF_LINK_CREATE for a loaded fentry/fexit program: its trampoline is live."""
    fd = _bpf.bpf_link_create(prog_fd, 0, TRACE_FEXIT if exit_ else TRACE_FENTRY, None)
    if fd < 0:
        raise QtraceError(f"fentry link: {os.strerror(-fd if fd < -1 else ct.get_errno())}")
    return fd
