"""Prometheus collector: BPF maps and daemon state read at scrape time, never pushed.

Metric names and labels are a contract (shared/ARCHITECTURE.md): dashboards and alerts
rely on them.  Every VM known to the daemon gets zero-valued reset series for each known
cause, so increase() sees the first reset of a VM.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qtrace_bpf.events import FOLLOWUP_FLAG, phase_name
from qtrace_bpf.kvm_ioctls import ioctl_name
from qtrace_bpf.qemu_abi import cause_name, shutdown_causes

VM_WIDE = "vm"  # the vcpu label of VM-wide ioctls (KVM_SET_CLOCK, KVM_SET_IRQCHIP, ...)
# Resets nobody on the host asked for (watchdog and panic actions report guest-reset /
# guest-panic); the alert rules use the same list.
UNEXPECTED_CAUSES = ("host-error", "guest-reset", "guest-panic")


class QtraceCollector:
    def __init__(self, daemon) -> None:  # a qtrace_bpf.daemon.Daemon
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on what is running

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        d = self.daemon
        s = d.session
        vms = d.snapshot()

        def per_vm(family: CounterMetricFamily, table: str, labels) -> CounterMetricFamily:
            """One sample per map entry of a known VM; labels(vm, key) -> values."""
            for k, n in s.table_items(table):
                vm = vms.get(k.tgid)
                if vm is not None:
                    family.add_metric(labels(vm, k), n)
            return family

        yield per_vm(CounterMetricFamily(
            "qtrace_kvm_state_writes", "KVM state-writing ioctls QEMU made, by vCPU and phase",
            labels=["vm", "vcpu", "ioctl", "phase"]), "write_counts",
            lambda vm, k: [vm.name, str(k.vcpu) if k.vcpu >= 0 else VM_WIDE,
                           ioctl_name(k.cmd), phase_name(k.phase)])
        yield per_vm(CounterMetricFamily(
            "qtrace_kvm_ioctl_errors", "State-writing KVM ioctls that failed (negative return)",
            labels=["vm", "ioctl"]), "error_counts", lambda vm, k: [vm.name, ioctl_name(k.cmd)])
        yield per_vm(CounterMetricFamily(
            "qtrace_lifecycle_events", "QEMU lifecycle functions entered (uprobes)",
            labels=["vm", "event"]), "lifecycle_counts",
            lambda vm, k: [vm.name, d.catalog.by_slot(k.probe).event])

        resets: dict[tuple[int, str], int] = {}
        following: dict[tuple[int, str], int] = {}
        for k, n in s.table_items("reset_counts"):
            vm = vms.get(k.tgid)
            if vm is None:
                continue
            into = following if k.cause & FOLLOWUP_FLAG else resets
            into[(k.tgid, cause_name(k.cause & ~FOLLOWUP_FLAG, vm.qemu_version))] = n
        reset_f = CounterMetricFamily(
            "qtrace_vm_resets", "Machine resets by ShutdownCause, as QEMU reports them on QMP",
            labels=["vm", "cause"])
        follow_f = CounterMetricFamily(
            "qtrace_vm_resets_following_host",
            "Guest-initiated resets within 2 s of a host-requested one (the firmware's reboot "
            "after a QMP system_reset): subtract them to get the unexpected ones",
            labels=["vm", "cause"])
        for pid, vm in vms.items():
            for cause in shutdown_causes(vm.qemu_version)[1:]:
                reset_f.add_metric([vm.name, cause], resets.get((pid, cause), 0))
            for cause in UNEXPECTED_CAUSES:  # zeros too: alerts subtract one-to-one
                follow_f.add_metric([vm.name, cause], following.get((pid, cause), 0))
        yield reset_f
        yield follow_f

        info = GaugeMetricFamily("qtrace_vm_info", "One series per traced VM, value 1",
                                 labels=["vm", "pid", "uuid", "qemu_version", "build_id"])
        for pid, vm in vms.items():
            info.add_metric([vm.name, str(pid), vm.uuid, vm.qemu_version, vm.build_id], 1)
        yield info

        attached = GaugeMetricFamily("qtrace_probes_attached",
                                     "Catalog probes attached per QEMU binary",
                                     labels=["binary", "build_id"])
        missing = GaugeMetricFamily("qtrace_probes_missing",
                                    "Catalog probes that did not resolve per QEMU binary",
                                    labels=["binary", "build_id"])
        per_event = GaugeMetricFamily("qtrace_probe_attached",
                                      "1 if the catalog event's probe is attached in this binary",
                                      labels=["binary", "build_id", "event"])
        for plan in s.binaries.values():
            labels = [plan.resolution.path, plan.resolution.build_id or ""]
            attached.add_metric(labels, len(plan.attached) - len(plan.missing))
            missing.add_metric(labels, len(plan.missing))
            for a in plan.attached:
                per_event.add_metric([*labels, a.probe.event], 1 if a.ok else 0)
        yield attached
        yield missing
        yield per_event
        yield GaugeMetricFamily("qtrace_binary_errors", "QEMU binaries that could not be resolved "
                                "(non-ELF, truncated, unreadable)", value=len(d.binary_errors))

        hook = GaugeMetricFamily("qtrace_kernel_hook_info", "The kernel hook on KVM ioctls in use",
                                 labels=["mode"])
        hook.add_metric([s.hook_mode], 1)
        yield hook
        yield CounterMetricFamily("qtrace_events_lost", "Ring-buffer events dropped (counters "
                                  "are unaffected)", value=s.events_lost())
        yield GaugeMetricFamily("qtrace_tracked_vms", "VMs being traced now",
                                value=sum(1 for v in vms.values() if v.exited_at is None))
        yield CounterMetricFamily("qtrace_vms_refused", "VMs not traced because max_vms was "
                                  "reached", value=d.refused)
        yield CounterMetricFamily("qtrace_counting_gaps", "Times counting started late for a VM "
                                  "(daemon restart, missed exec)", value=d.gaps)
        yield GaugeMetricFamily("qtrace_scrape_duration_seconds",
                                "Time this collector took to read the maps",
                                value=time.perf_counter() - started)
