"""The kernel hook on KVM ioctls: fentry -> kprobe -> syscall tracepoints.

Production hosts take fentry or kprobe on kvm_vcpu_ioctl/kvm_vm_ioctl (they fire for KVM
ioctls only).  Where neither works (kprobes compiled out, fentry refused) the
syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints do, filtered in BPF to tracked pids
and ioctl type 0xAE; never the raw sys_enter, which taxes every syscall on the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MODES = ("fentry", "kprobe", "tracepoint")
KVM_FUNCS = ("kvm_vcpu_ioctl", "kvm_vm_ioctl")
TRACEFS = "/sys/kernel/tracing"


@dataclass
class HookCheck:
    mode: str
    usable: bool
    reason: str


def _ksym_exists(name: str) -> bool:
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == name:
                    return True
    except OSError:
        return False
    return False


def tracefs_root() -> str | None:
    for root in (TRACEFS, "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(root, "events")):
            return root
    return None


def precheck(mode: str) -> HookCheck:
    """Cheap checks that need no compile: what can be ruled out before trying."""
    if mode == "fentry":
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            return HookCheck(mode, False, "no kernel BTF (/sys/kernel/btf/vmlinux)")
        missing = [f for f in KVM_FUNCS if not _ksym_exists(f)]
        if missing:
            return HookCheck(mode, False,
                             f"{', '.join(missing)} not in /proc/kallsyms (kvm not loaded?)")
        if not _ksym_exists("bpf_trampoline_link_prog"):
            return HookCheck(mode, False, "kernel has no BPF trampolines")
        return HookCheck(mode, True, "kernel BTF and BPF trampolines present")
    if mode == "kprobe":
        root = tracefs_root()
        pmu = os.path.exists("/sys/bus/event_source/devices/kprobe")
        events = root is not None and os.path.exists(os.path.join(root, "kprobe_events"))
        if not (pmu or events):
            return HookCheck(mode, False, "kprobes not available: no kprobe PMU and no "
                             "kprobe_events in tracefs (kernel built without CONFIG_KPROBES?)")
        missing = [f for f in KVM_FUNCS if not _ksym_exists(f)]
        if missing:
            return HookCheck(mode, False, f"{', '.join(missing)} not in /proc/kallsyms")
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
