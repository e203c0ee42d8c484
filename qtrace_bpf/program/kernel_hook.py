"""The kernel hook on KVM ioctls: fentry -> kprobe -> syscall tracepoints.

Production hosts take fentry or kprobe on kvm_vcpu_ioctl/kvm_vm_ioctl (they fire for KVM
ioctls only).  Where neither works (kprobes compiled out, fentry refused) the
syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints do, filtered in BPF to tracked pids
and ioctl type 0xAE; never the raw sys_enter, which taxes every syscall on the host.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from qtrace_bpf.bpf.perf_events import TRACEFS, tracefs_root

MODES = ("fentry", "kprobe", "tracepoint")
KVM_FUNCS = ("kvm_vcpu_ioctl", "kvm_vm_ioctl")
BTF_DIR = "/sys/kernel/btf"


@dataclass
class HookCheck:
    mode: str
    usable: bool
    reason: str


def btf_functions(names: tuple[str, ...]) -> set[str]:
    """Which of `names` the kernel's BTF knows (vmlinux, or the kvm module's split BTF).

    BTF, not /proc/kallsyms: the shipped unit's ProtectKernelTunables hides kallsyms, and a
    check that cannot read it must not push a host onto the slow syscall tracepoint.  A
    name in BTF's string section is what fentry needs (BTF_KIND_FUNC names live there).
    """
    found: set[str] = set()
    for path in (f"{BTF_DIR}/vmlinux", f"{BTF_DIR}/kvm"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if len(data) < 24 or struct.unpack_from("<H", data)[0] != 0xEB9F:
            continue
        hdr_len, _t_off, _t_len, str_off, str_len = struct.unpack_from("<IIIII", data, 4)
        strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        found |= {n for n in names if b"\0" + n.encode() + b"\0" in strings}
    return found


def uprobe_multi() -> bool:
    """Can uprobes be attached as uprobe_multi links (kernel >= 6.6)?  They need CAP_BPF and
    CAP_PERFMON only, so a non-root daemon can attach them; one link holds every offset of
    a handler in a binary."""
    return bool(btf_functions(("bpf_uprobe_multi_link_attach",)))


def traceable_functions(names: tuple[str, ...]) -> set[str] | None:
    """Which of `names` kprobes may attach to (tracefs), or None when it cannot be read."""
    root = tracefs_root()
    if root is None:
        return None
    try:
        with open(os.path.join(root, "available_filter_functions")) as f:
            wanted = set(names)
            return {fn for line in f if (fn := line.split(" ", 1)[0].strip()) in wanted}
    except OSError:
        return None


def ftrace_calls(function: str) -> bool | None:
    """Does ftrace call a trampoline at `function` (tracefs' enabled_functions lists it)?
    None when tracefs cannot tell (not mounted, not readable)."""
    root = tracefs_root()
    try:
        with open(os.path.join(root or TRACEFS, "enabled_functions")) as f:
            return any(line.split(" ", 1)[0] == function for line in f)
    except OSError:
        return None


def precheck(mode: str) -> HookCheck:
    """Cheap checks that need no compile: what can be ruled out before trying."""
    if mode == "fentry":
        if not os.path.exists(f"{BTF_DIR}/vmlinux"):
            return HookCheck(mode, False, f"no kernel BTF ({BTF_DIR}/vmlinux)")
        missing = [f for f in KVM_FUNCS if f not in btf_functions(KVM_FUNCS)]
        if missing:
            return HookCheck(mode, False,
                             f"{', '.join(missing)} not in the kernel's BTF (kvm not loaded?)")
        return HookCheck(mode, True, "kernel BTF names kvm_vcpu_ioctl and kvm_vm_ioctl")
    if mode == "kprobe":
        root = tracefs_root()
        pmu = os.path.exists("/sys/bus/event_source/devices/kprobe")
        events = root is not None and os.path.exists(os.path.join(root, "kprobe_events"))
        if not (pmu or events):
            return HookCheck(mode, False, "kprobes not available: no kprobe PMU and no "
                             "kprobe_events in tracefs (kernel built without CONFIG_KPROBES?)")
        known = traceable_functions(KVM_FUNCS)
        where = "available_filter_functions"
        if known is None:  # tracefs unreadable: BTF names the functions just as well
            known, where = btf_functions(KVM_FUNCS), "the kernel's BTF"
        missing = [f for f in KVM_FUNCS if f not in known]
        if missing:
            return HookCheck(mode, False, f"{', '.join(missing)} not in {where}")
        return HookCheck(mode, True, "kprobe support present")
    if mode == "tracepoint":
        root = tracefs_root()
        if root is None:
            return HookCheck(mode, False, "tracefs not mounted (mount -t tracefs nodev "
                             "/sys/kernel/tracing)")
        if not os.path.exists(os.path.join(root, "events/syscalls/sys_enter_ioctl")):
            return HookCheck(mode, False, "no syscalls:sys_enter_ioctl tracepoint "
                             "(CONFIG_FTRACE_SYSCALLS off)")
        return HookCheck(mode, True, "syscalls:sys_enter_ioctl/sys_exit_ioctl present")
    raise ValueError(mode)


def order(preference: str | None) -> list[str]:
    """Modes to try: the preferred one first when given, then the default chain."""
    if preference in (None, "", "auto"):
        return list(MODES)
    if preference not in MODES:
        raise ValueError(f"unknown kernel hook {preference!r} (choose from {', '.join(MODES)})")
    return [preference] + [m for m in MODES if m != preference]
