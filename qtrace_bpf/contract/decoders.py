"""Numbers from the maps and events -> names, one small function per key field.

maps.py says which of them each counter map's key fields take.  An unknown number keeps a
readable placeholder (phase-7, cause-12, KVM_IOCTL_0x...) and is counted in DECODE_ERRORS
(exported as qtrace_decode_errors_total).
"""

from __future__ import annotations

import re
from collections import Counter

from qtrace_bpf.contract import abi
from qtrace_bpf.contract.catalog import Catalog
from qtrace_bpf.contract.kvm_ioctls import IOCTLS

DECODE_ERRORS: Counter = Counter()  # field -> unknown numbers seen
PUT_LEVELS = {1: "runtime", 2: "reset", 3: "full"}  # QEMU's KVM_PUT_*_STATE


def _named(names: tuple[str, ...], value: int, field: str) -> str:
    """names[value], or the placeholder `field-value` (counted) for a number with no name."""
    if 0 <= value < len(names):
        return names[value]
    DECODE_ERRORS[field] += 1
    return f"{field}-{value}"


def phase(value: int) -> str:
    return _named(abi.PHASES, value, "phase")


def ioctl(value: int) -> str:
    entry = IOCTLS.get(value & 0xFFFFFFFF)
    if entry is not None:
        return entry.name
    DECODE_ERRORS["ioctl"] += 1
    return f"KVM_IOCTL_{value & 0xFFFFFFFF:#x}"


def cause(value: int) -> str:
    """A ShutdownCause number (without FOLLOWUP_FLAG) -> QEMU's QAPI name."""
    return _named(abi.CAUSES, value, "cause")


def reset_cause(value: int) -> tuple[str, bool]:
    """reset_counts' cause field -> (cause name, follows a host-requested reset)."""
    return cause(value & ~abi.FOLLOWUP_FLAG), bool(value & abi.FOLLOWUP_FLAG)


def value(which: int) -> str:
    """A V_* slot -> its name (apic_base, tsc_khz, ...)."""
    return _named(abi.VALUES, which, "value")


def step(value: int) -> str:
    """An S_* number -> reset, hotplug, migration."""
    return _named(abi.STEPS, value, "step")


def bucket(value: int) -> str:
    """A step_durations bucket -> its `le` ("0.001" ... "+Inf"), or "sum" (nanoseconds)."""
    if value == abi.DUR_SUM:
        return "sum"
    if 0 <= value < len(abi.DURATION_BUCKETS):
        return repr(abi.DURATION_BUCKETS[value])
    return "+Inf"


def vcpu(value: int) -> int | None:
    """-1 marks a VM-wide ioctl (no vCPU)."""
    return value if value >= 0 else None


def event_name(slot: int, catalog: Catalog) -> str:
    if 0 <= slot < len(catalog.probes):
        return catalog.by_slot(slot).event
    DECODE_ERRORS["probe"] += 1
    return f"probe-{slot}"


# KubeVirt names a VMI's libvirt domain (so QEMU's -name guest=) NAMESPACE_NAME: a
# namespace is a DNS-1123 label (no "_"), a VM name a DNS-1123 subdomain.
_KUBEVIRT = re.compile(r"([a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)_"
                       r"([a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?)")
VM_LABEL_MAX = 64  # the `vm` label's length cap (vms.targets.VM_NAME_MAX): a cut name


def kubevirt_name(vm: str) -> tuple[str, str]:
    """(namespace, name) of a KubeVirt domain name, so that qtrace_vm_info joins
    kubevirt_vmi_*; ("", "") for any other name, and for a `vm` label that may have been cut
    to its length cap (its name would be wrong)."""
    m = _KUBEVIRT.fullmatch(vm) if len(vm) < VM_LABEL_MAX else None
    return (m.group(1), m.group(2)) if m else ("", "")
