"""Numbers from the maps and events -> names, one small function per key field.

ROWS says, for each counter map, which fields its key carries; watch's summary and the
Prometheus collector both read counters through rows(), so neither decodes keys itself.
An unknown number keeps a readable placeholder (phase-7, cause-12, KVM_IOCTL_0x...) and is
counted in DECODE_ERRORS (exported as qtrace_decode_errors_total).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from . import abi
from .catalog import Catalog
from .kvm_ioctls import IOCTLS

DECODE_ERRORS: Counter = Counter()  # field -> unknown numbers seen
PUT_LEVELS = {1: "runtime", 2: "reset", 3: "full"}  # QEMU's KVM_PUT_*_STATE


def phase(value: int) -> str:
    if 0 <= value < len(abi.PHASES):
        return abi.PHASES[value]
    DECODE_ERRORS["phase"] += 1
    return f"phase-{value}"


def ioctl(value: int) -> str:
    entry = IOCTLS.get(value & 0xFFFFFFFF)
    if entry is not None:
        return entry.name
    DECODE_ERRORS["ioctl"] += 1
    return f"KVM_IOCTL_{value & 0xFFFFFFFF:#x}"


def cause(value: int) -> str:
    """A ShutdownCause number (without FOLLOWUP_FLAG) -> QEMU's QAPI name."""
    if 0 <= value < len(abi.CAUSES):
        return abi.CAUSES[value]
    DECODE_ERRORS["cause"] += 1
    return f"cause-{value}"


def reset_cause(value: int) -> tuple[str, bool]:
    """reset_counts' cause field -> (cause name, follows a host-requested reset)."""
    return cause(value & ~abi.FOLLOWUP_FLAG), bool(value & abi.FOLLOWUP_FLAG)


def vcpu(value: int) -> int | None:
    """-1 marks a VM-wide ioctl (no vCPU)."""
    return value if value >= 0 else None


def event_name(slot: int, catalog: Catalog) -> str:
    if 0 <= slot < len(catalog.probes):
        return catalog.by_slot(slot).event
    DECODE_ERRORS["probe"] += 1
    return f"probe-{slot}"


Row = dict[str, object]
ROWS: dict[str, Callable[[object, Catalog], Row]] = {
    "write_counts": lambda k, _c: {"vcpu": vcpu(k.vcpu), "ioctl": ioctl(k.cmd),
                                   "phase": phase(k.phase)},
    "error_counts": lambda k, _c: {"ioctl": ioctl(k.cmd)},
    "lifecycle_counts": lambda k, c: {"event": event_name(k.probe, c)},
    "reset_counts": lambda k, _c: dict(zip(("cause", "following_host"), reset_cause(k.cause),
                                           strict=True)),
}


def rows(items: Iterable[tuple[object, int]], name: str, catalog: Catalog) \
        -> Iterator[tuple[int, Row, int]]:
    """(vm id, decoded key fields, count) for each entry of counter map `name`."""
    decode = ROWS[name]
    for key, count in items:
        yield key.vm, decode(key, catalog), count
