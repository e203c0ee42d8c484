"""Prometheus collectors: BPF maps and tracker state read at scrape time, never pushed.

Metric names and labels are a contract (shared/ARCHITECTURE.md): dashboards and alerts
rely on them.  VmCollector: per-VM families, from the counter maps through decoders.rows();
samples with equal labels are summed (two processes of one domain name, one restarted
within the grace period).  SelfCollector: qtrace's own health.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qtrace_bpf import abi, decoders

VM_WIDE = "vm"  # the vcpu label of VM-wide ioctls (KVM_SET_CLOCK, KVM_SET_IRQCHIP, ...)
# Resets nobody on the host asked for (watchdog and panic actions report guest-reset /
# guest-panic); the alert rules use the same list.
UNEXPECTED_CAUSES = ("host-error", "guest-reset", "guest-panic")

# map -> (family, help, label names after `vm`, row -> label values)
_FAMILIES = {
    "write_counts": ("qtrace_kvm_state_writes",
                     "KVM state-writing ioctls QEMU made, by vCPU and phase",
                     ["vcpu", "ioctl", "phase"],
                     lambda r: [VM_WIDE if r["vcpu"] is None else str(r["vcpu"]), r["ioctl"],
                                r["phase"]]),
    "error_counts": ("qtrace_kvm_ioctl_errors",
                     "State-writing KVM ioctls that failed (negative return)",
                     ["ioctl"], lambda r: [r["ioctl"]]),
    "lifecycle_counts": ("qtrace_lifecycle_events", "QEMU lifecycle functions entered (uprobes)",
                         ["event"], lambda r: [r["event"]]),
}


class VmCollector:
    def __init__(self, daemon) -> None:  # a qtrace_bpf.daemon.Daemon
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on what is running

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        d = self.daemon
        vms = d.tracker.snapshot()
        for table, (name, help_, labels, values) in _FAMILIES.items():
            sums: dict[tuple[str, ...], int] = defaultdict(int)
            for vm_id, row, n in decoders.rows(d.prog.items(table), table, d.catalog):
                vm = vms.get(vm_id)
                if vm is not None:
                    sums[(vm.name, *values(row))] += n
            family = CounterMetricFamily(name, help_, labels=["vm", *labels])
            for key, n in sums.items():
                family.add_metric(list(key), n)
            yield family

        resets: dict[tuple[str, str], int] = defaultdict(int)
        following: dict[tuple[str, str], int] = defaultdict(int)
        for vm_id, row, n in decoders.rows(d.prog.items("reset_counts"), "reset_counts",
                                           d.catalog):
            vm = vms.get(vm_id)
            if vm is not None:
                into = following if row["following_host"] else resets
                into[(vm.name, row["cause"])] += n
        reset_f = CounterMetricFamily(
            "qtrace_vm_resets", "Machine resets by ShutdownCause, as QEMU reports them on QMP",
            labels=["vm", "cause"])
        follow_f = CounterMetricFamily(
            "qtrace_vm_resets_following_host",
            "Guest-initiated resets within 2 s of a host-requested one (the firmware's reboot "
            "after a QMP system_reset): subtract them to get the unexpected ones",
            labels=["vm", "cause"])
        for name in sorted({vm.name for vm in vms.values()}):
            for cause in abi.CAUSES[1:]:  # zeros too: increase() sees the first reset
                reset_f.add_metric([name, cause], resets.get((name, cause), 0))
            for cause in UNEXPECTED_CAUSES:  # zeros too: alerts subtract one-to-one
                follow_f.add_metric([name, cause], following.get((name, cause), 0))
        yield reset_f
        yield follow_f

        info = GaugeMetricFamily("qtrace_vm_info", "One series per traced VM, value 1",
                                 labels=["vm", "pid", "uuid", "qemu_version", "build_id"])
        for vm in vms.values():
            info.add_metric([vm.name, str(vm.pid), vm.uuid, vm.qemu_version, vm.build_id], 1)
        d.last_scrape_seconds = time.perf_counter() - started
        yield info


class SelfCollector:
    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        t = d.tracker
        attached = GaugeMetricFamily("qtrace_probes_attached",
                                     "Catalog probes attached per QEMU binary",
                                     labels=["binary", "build_id"])
        missing = GaugeMetricFamily("qtrace_probes_missing",
                                    "Catalog probes that did not resolve per QEMU binary",
                                    labels=["binary", "build_id"])
        per_event = GaugeMetricFamily("qtrace_probe_attached",
                                      "1 if the catalog event's probe is attached in this binary",
                                      labels=["binary", "build_id", "event"])
        for plan in list(d.binaries.plans.values()):
            labels = [plan.display, plan.resolution.build_id or ""]
            attached.add_metric(labels, len(plan.attached) - len(plan.missing))
            missing.add_metric(labels, len(plan.missing))
            for a in plan.attached:
                per_event.add_metric([*labels, a.probe.event], 1 if a.ok else 0)
        yield attached
        yield missing
        yield per_event
        yield GaugeMetricFamily("qtrace_binary_errors", "QEMU binaries that could not be resolved "
                                "(non-ELF, truncated, unreadable)", value=len(d.binaries.errors))
        hook = GaugeMetricFamily("qtrace_kernel_hook_info", "The kernel hook on KVM ioctls in use",
                                 labels=["mode"])
        hook.add_metric([d.prog.hook_mode], 1)
        yield hook
        yield CounterMetricFamily("qtrace_events_lost", "Ring-buffer events dropped (counters "
                                  "are unaffected)", value=d.prog.events_lost())
        failed = CounterMetricFamily("qtrace_map_updates_failed",
                                     "BPF map inserts refused because the map was full (raise "
                                     "max_vms / max_vcpus_per_vm)", labels=["map"])
        for name, n in d.prog.update_failures().items():
            failed.add_metric([name], n)
        yield failed
        decode = CounterMetricFamily("qtrace_decode_errors",
                                     "Numbers from the kernel with no name (shown as placeholders)",
                                     labels=["field"])
        for field in ("phase", "ioctl", "cause", "probe"):
            decode.add_metric([field], decoders.DECODE_ERRORS[field])
        yield decode
        yield GaugeMetricFamily("qtrace_tracked_vms", "VMs being traced now",
                                value=sum(1 for v in t.snapshot().values() if v.exited_at is None))
        yield CounterMetricFamily("qtrace_vms_refused", "VMs not traced because max_vms was "
                                  "reached", value=t.refused)
        yield CounterMetricFamily("qtrace_counting_gaps", "Times counting started late for a VM "
                                  "(daemon restart, missed exec)", value=t.gaps)
        yield GaugeMetricFamily("qtrace_scrape_duration_seconds",
                                "Time the last collection of the per-VM families took",
                                value=d.last_scrape_seconds)
