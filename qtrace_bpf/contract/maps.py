"""Every BPF map that Python reaches by name, said once: its name, whether a VM's entries
go with the VM, and for a counter map what its key means and which metric family it feeds.

Why: watch's summary, the Prometheus collector and Tracker.forget() all walk the counter
maps; each reads this table instead of repeating names.  probes/qtrace.bpf.c is the only
other place a map is named (tests/unit/test_layout.py checks both sides).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from qtrace_bpf.contract import decoders
from qtrace_bpf.contract.catalog import Catalog

Row = dict[str, object]
Labels = tuple[str, ...]

# Maps that are not counters.
PROCS = "procs"  # tgid -> struct proc_state: the processes the kernel tracks
VCPU_FDS = "vcpu_fds"  # struct vcpu_key -> vCPU id
LAST_VAL = "last_val"  # struct val_key -> the last value QEMU wrote
PROBE_CFG = "probe_cfg"  # catalog slot -> struct probe_cfg
WATCHED = "watched"  # ioctl number -> 1: the state writes the kernel hook counts
EVENTS = "events"  # the ring buffer of struct event
EVENTS_LOST = "events_lost"  # K_* -> ring-buffer events dropped
UPDATE_FAILED = "update_failed"  # M_* -> inserts a full map refused

VM_WIDE = "vm"  # the vcpu label of VM-wide ioctls (KVM_SET_CLOCK, KVM_SET_IRQCHIP, ...)


@dataclass(frozen=True)
class CounterMap:
    """A map of u64 counters whose key starts with the VM id.

    family: the Prometheus family it feeds directly (None: exported by its own families,
    as reset_counts is), with its help text and label names after `vm`.
    """

    name: str
    fields: Callable[[object, Catalog], Row]  # key -> decoded fields
    labels: Labels
    label_values: Callable[[Row], Labels]
    family: str | None = None
    help: str = ""

    def rows(self, items: Iterable[tuple[object, int]], catalog: Catalog) \
            -> Iterator[tuple[int, Row, int]]:
        """(vm id, decoded key fields, count) for each (key, count) read from this map."""
        for key, count in items:
            yield key.vm, self.fields(key, catalog), count


WRITES = CounterMap(
    "write_counts",
    lambda k, _c: {"vcpu": decoders.vcpu(k.vcpu), "ioctl": decoders.ioctl(k.cmd),
                   "phase": decoders.phase(k.phase)},
    ("vcpu", "ioctl", "phase"),
    lambda r: (VM_WIDE if r["vcpu"] is None else str(r["vcpu"]), r["ioctl"], r["phase"]),
    "qtrace_kvm_state_writes", "KVM state-writing ioctls QEMU made, by vCPU and phase")
ERRORS = CounterMap(
    "error_counts",
    lambda k, _c: {"ioctl": decoders.ioctl(k.cmd)},
    ("ioctl",), lambda r: (r["ioctl"],),
    "qtrace_kvm_ioctl_errors", "State-writing KVM ioctls that failed (negative return)")
LIFECYCLE = CounterMap(
    "lifecycle_counts",
    lambda k, c: {"event": decoders.event_name(k.probe, c)},
    ("event",), lambda r: (r["event"],),
    "qtrace_lifecycle_events", "QEMU lifecycle functions entered (uprobes)")
# Changes of the values the BPF C counts them for (V_APIC_BASE, V_TSC_KHZ).
VALUE_CHANGES = CounterMap(
    "value_changes",
    lambda k, _c: {"vcpu": decoders.vcpu(k.vcpu), "what": decoders.value(k.which)},
    ("vcpu", "what"), lambda r: (VM_WIDE if r["vcpu"] is None else str(r["vcpu"]), r["what"]),
    "qtrace_state_value_changes",
    "Writes that changed a value QEMU had written for the vCPU (tsc_khz, apic_base)")
RESETS = CounterMap(
    "reset_counts",
    lambda k, _c: dict(zip(("cause", "following_host"), decoders.reset_cause(k.cause),
                           strict=True)),
    ("cause", "following_host"),
    lambda r: (r["cause"], "1" if r["following_host"] else ""))

# Histograms of the lifecycle steps' durations: a count per bucket, and their sum in ns
# (bucket "sum"); exported as qtrace_lifecycle_duration_seconds by its own family.
STEP_DURATIONS = CounterMap(
    "step_durations",
    lambda k, _c: {"step": decoders.step(k.step), "bucket": decoders.bucket(k.bucket)},
    ("step", "bucket"), lambda r: (r["step"], r["bucket"]))

COUNTERS: tuple[CounterMap, ...] = (WRITES, ERRORS, LIFECYCLE, VALUE_CHANGES, RESETS,
                                    STEP_DURATIONS)

# Key and value types by their C names (abi.ctype); the same as the QT_HASH/QT_ARRAY lines
# of qtrace.bpf.c (tests/integration/test_compiled_program.py compares them with BCC's).
TYPES: dict[str, tuple[str, str]] = {
    PROCS: ("u32", "proc_state"), VCPU_FDS: ("vcpu_key", "s32"), LAST_VAL: ("val_key", "u64"),
    PROBE_CFG: ("int", "probe_cfg"), WATCHED: ("u32", "u32"), EVENTS_LOST: ("int", "u64"),
    UPDATE_FAILED: ("int", "u64"), WRITES.name: ("count_key", "u64"),
    ERRORS.name: ("err_key", "u64"), LIFECYCLE.name: ("lc_key", "u64"),
    VALUE_CHANGES.name: ("val_key", "u64"),
    RESETS.name: ("reset_key", "u64"), STEP_DURATIONS.name: ("step_key", "u64"),
}

# Maps whose keys start with the VM id: Tracker.forget() deletes a VM's entries from each.
# A test fails if a map of the compiled program keyed by `vm` is missing here.
PER_VM: tuple[str, ...] = (VCPU_FDS, LAST_VAL, *(c.name for c in COUNTERS))
