"""Which events `qprobe watch` prints: --vcpu, --ioctl and --phase, as one predicate.

Why separate: the filters only choose what is printed.  Counting happens in the kernel
whatever is printed, so the summary always covers every write.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtrace_bpf.contract import abi
from qtrace_bpf.contract.kvm_ioctls import BY_NAME
from qtrace_bpf.errors import QtraceError


def ioctl_name(text: str) -> str:
    """'set_tsc_khz', 'KVM_SET_TSC_KHZ' -> 'KVM_SET_TSC_KHZ' (a state-writing KVM ioctl)."""
    name = text.strip().upper()
    name = name if name.startswith("KVM_") else f"KVM_{name}"
    entry = BY_NAME.get(name)
    if entry is None or not entry.state_write:
        writes = sorted(n for n, e in BY_NAME.items() if e.state_write)
        raise QtraceError(f"--ioctl {text}: not a state-writing KVM ioctl; one of "
                          f"{', '.join(writes)}")
    return name


@dataclass(frozen=True)
class EventFilter:
    """Empty sets match everything.  vcpus: state writes of these vCPUs (lifecycle events,
    which belong to no vCPU, still show); ioctls: only these state writes (no lifecycle or
    step lines); phases: events of these phases."""

    vcpus: frozenset[int] = frozenset()
    ioctls: frozenset[str] = frozenset()
    phases: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, vcpus: tuple[int, ...], ioctls: tuple[str, ...],
              phases: tuple[str, ...]) -> EventFilter:
        bad = [p for p in phases if p not in abi.PHASES]
        if bad:
            raise QtraceError(f"--phase {bad[0]}: one of {', '.join(abi.PHASES)}")
        return cls(frozenset(vcpus), frozenset(map(ioctl_name, ioctls)), frozenset(phases))

    def __call__(self, ev: dict) -> bool:
        if self.phases and ev.get("phase") not in self.phases:
            return False
        if ev["kind"] != "state_write":
            return not self.ioctls
        if self.ioctls and ev["event"] not in self.ioctls:
            return False
        return not self.vcpus or ev.get("vcpu") in self.vcpus

    def describe(self) -> str:
        parts = [f"{k} {','.join(map(str, sorted(v)))}" for k, v in
                 (("vcpu", self.vcpus), ("ioctl", self.ioctls), ("phase", self.phases)) if v]
        return "; ".join(parts)
