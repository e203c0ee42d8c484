"""What /metrics says: per-VM families (VmCollector) and qtrace's health (self_metrics),
read from the BPF maps and the tracker at scrape time, never pushed; Exposition renders them.

The exporter only reads what `Observed` names and writes nothing back; the daemon hands
VmCollector.carry to the tracker itself.  Metric names and labels are a contract
(docs/architecture.md): dashboards and alerts rely on them.  Per-VM samples with equal
labels are summed (two processes of one domain name, one restarted within the grace period).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from qtrace_bpf.contract import abi, decoders, maps

from .exposition import OPENMETRICS, Family, Histogram, SharedRender, le, render
from .observed import Observed
from .self_metrics import SelfCollector

# Resets nobody on the host asked for (watchdog and panic actions report guest-reset /
# guest-panic); the alert rules use the same list.
UNEXPECTED_CAUSES = ("host-error", "guest-reset", "guest-panic")
# The ShutdownCauses QEMU resets with (QMP RESET `reason`), zero-filled per VM; the
# shutdown-only ones (host-qmp-quit, host-signal, guest-shutdown) and `none` (the boot-time
# reset, part of boot) would be series that never move: exported only if they ever count.
RESET_CAUSES = ("host-error", "host-qmp-system-reset", "host-ui", "guest-reset", "guest-panic",
                "subsystem-reset", "snapshot-load")

Labels = maps.Labels


class VmCollector:
    """Per-VM families.  A domain that restarts keeps its `vm` label, and its counters go on:
    when the old process's entries are forgotten while a VM of the same name remains, its
    counts are carried (in memory) and added to that name's series."""

    def __init__(self, daemon: Observed) -> None:
        self.daemon = daemon
        self.carried: dict[str, dict[tuple[str, Labels], int]] = {}
        self._memo: dict[str, dict[bytes, Labels]] = {}
        self.last_seconds = 0.0  # how long the last families() took (a self-metric)

    def last_seconds_of(self) -> float:
        return self.last_seconds

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on what is running

    def carry(self, gone) -> None:
        """Subscribed to the tracker's "VM forgotten" (its lock is held)."""
        d = self.daemon
        if not any(v.name == gone.name and v.vm_id != gone.vm_id for v in d.tracker.vms.values()):
            self.carried.pop(gone.name, None)  # the name is gone with it
            return
        into = self.carried.setdefault(gone.name, defaultdict(int))
        for spec in maps.COUNTERS:
            for vm_id, row, n in spec.rows(d.prog.maps.items(spec.name), d.catalog):
                if vm_id == gone.vm_id:
                    into[(spec.name, (gone.name, *spec.label_values(row)))] += n

    def _sums(self, vms: dict, carried: dict) -> dict[str, dict[Labels, int]]:
        """Label tuples -> counts, by map.  A key's bytes after its VM id decode to the same
        labels every time: decoded once, then looked up; ~10x cheaper at 10k series."""
        d = self.daemon
        sums: dict[str, dict[Labels, int]] = {s.name: defaultdict(int) for s in maps.COUNTERS}
        for spec in maps.COUNTERS:
            into = sums[spec.name]
            memo = self._memo.setdefault(spec.name, {})
            if len(memo) > 200_000:
                memo.clear()
            for key, n in d.prog.maps.items(spec.name):
                raw = bytes(key)
                vm = vms.get(int.from_bytes(raw[:4], "little"))  # vm is every key's first u32
                if vm is None:
                    continue
                rest = memo.get(raw[4:])
                if rest is None:
                    rest = memo[raw[4:]] = spec.label_values(spec.fields(key, d.catalog))
                into[(vm.name, *rest)] += n
        names = {vm.name for vm in vms.values()}
        for name, rows in carried.items():
            if name in names:
                for (table, labels), n in rows.items():
                    sums[table][labels] += n
        return sums

    def families(self) -> list[Family]:
        started = time.perf_counter()
        d = self.daemon
        if d.prog is None:
            return []  # still starting: the self-metrics say so
        with d.tracker.lock:  # VMs and carried counts from one moment
            vms = d.tracker.snapshot()
            carried = {name: dict(rows) for name, rows in self.carried.items()}
        sums = self._sums(vms, carried)
        out = [Family(s.family, s.help, "counter", ("vm", *s.labels), dict(sums[s.name]))
               for s in maps.COUNTERS if s.family]
        names = sorted({vm.name for vm in vms.values()})
        resets = sums[maps.RESETS.name]
        # every known cause, zeros too: increase() sees a VM's first reset
        counted = {(n, c): v for (n, c, follow), v in resets.items() if not follow}
        out.append(Family(
            "qtrace_vm_resets", "Machine resets by ShutdownCause, as QEMU reports them on QMP",
            "counter", ("vm", "cause"),
            {**{(n, c): 0 for n in names for c in RESET_CAUSES}, **counted}))
        out.append(Family(
            "qtrace_vm_resets_following_host",
            "Guest-initiated resets within 2 s of a host-requested one (the firmware's reboot "
            "after a QMP system_reset): subtract them to get the unexpected ones",
            "counter", ("vm", "cause"),
            {(n, c): resets.get((n, c, "1"), 0) for n in names for c in UNEXPECTED_CAUSES}))
        out.append(self._unexpected(sums[maps.WRITES.name]))
        out.append(durations(sums[maps.STEP_DURATIONS.name]))
        out += self._values(vms)
        kube = decoders.kubevirt_name if d.kubevirt_names else lambda _vm: ("", "")
        out.append(Family(
            "qtrace_vm_info", "One series per traced VM, value 1 (namespace and name: the "
            "KubeVirt VMI, when kubevirt_names is on and the domain is NAMESPACE_NAME)", "gauge",
            ("vm", "pid", "uuid", "qemu_version", "build_id", "namespace", "name"),
            {(vm.name, str(vm.pid), vm.uuid, vm.qemu_version, vm.build_id, *kube(vm.name)): 1
             for vm in vms.values()}))
        self.last_seconds = time.perf_counter() - started
        return out

    def _unexpected(self, writes: dict[Labels, int]) -> Family:
        """Writes of a catalog [[expect]] ioctl outside its phases, from the same counts as
        qtrace_kvm_state_writes_total.  Every vCPU that made such a write at all has a
        series, zeros too: increase() then sees the first unexpected one."""
        catalog = self.daemon.catalog
        ruled = {e.ioctl for e in catalog.expects}
        samples: dict[Labels, int] = {}
        for (vm, vcpu, ioctl, phase), n in writes.items():
            if ioctl in ruled:
                key = (vm, vcpu, ioctl)
                samples[key] = samples.get(key, 0) + (n if catalog.unexpected(ioctl, phase)
                                                      else 0)
        return Family("qtrace_unexpected_state_writes", "State writes seen outside the "
                      "lifecycle phases the catalog expects them in ([[expect]] rules)",
                      "counter", ("vm", "vcpu", "ioctl"), samples)

    def _values(self, vms: dict) -> list[Family]:
        """The last TSC frequency and APIC base QEMU wrote per vCPU (successful writes:
        the BPF C keeps them in last_val).  A value is never a label."""
        gauges = {"tsc_khz": Family("qtrace_vcpu_tsc_khz", "The TSC frequency (kHz) QEMU last "
                                    "set with KVM_SET_TSC_KHZ", "gauge", ("vm", "vcpu")),
                  "apic_base": Family("qtrace_vcpu_apic_base", "The IA32_APIC_BASE value QEMU "
                                      "last wrote (SET_SREGS/SREGS2, MSR 0x1b): BSP bit 8, "
                                      "x2APIC bit 10, enable bit 11", "gauge", ("vm", "vcpu"))}
        for key, value in self.daemon.prog.maps.items(maps.LAST_VAL):
            vm = vms.get(key.vm)
            fam = gauges.get(decoders.value(key.which))
            if vm is not None and fam is not None and key.vcpu >= 0:
                fam.samples[(vm.name, str(key.vcpu))] = float(value)
        return list(gauges.values())

    def collect(self) -> Iterator[Metric]:
        """The same families through prometheus_client (its registry, its renderer)."""
        for fam in self.families():
            if fam.kind == "histogram":
                hist = HistogramMetricFamily(fam.name, fam.help, labels=list(fam.labels))
                for labels, h in fam.samples.items():
                    hist.add_metric(list(labels), [(le(b), n) for b, n in h.buckets], h.sum)
                yield hist
                continue
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            metric = cls(fam.name, fam.help, labels=list(fam.labels))
            for labels, value in fam.samples.items():
                metric.add_metric(list(labels), value)
            yield metric


def durations(rows: dict[Labels, int]) -> Family:
    """step_durations' per-bucket counts and ns sums -> one cumulative histogram per
    (vm, step); a VM has a series for a step once the step happened."""
    per: dict[Labels, dict[str, int]] = defaultdict(dict)
    for (vm, step, bucket), n in rows.items():
        per[(vm, step)][bucket] = per[(vm, step)].get(bucket, 0) + n
    bounds = [*abi.DURATION_BUCKETS, float("inf")]
    samples: dict[Labels, Histogram] = {}
    for labels, counts in per.items():
        total, cumulative = 0, []
        for bound in bounds:
            total += counts.get("+Inf" if bound == float("inf") else repr(bound), 0)
            cumulative.append((bound, total))
        samples[labels] = Histogram(tuple(cumulative), counts.get("sum", 0) / 1e9)
    return Family("qtrace_lifecycle_duration_seconds", "How long lifecycle steps took: reset "
                  "(qemu_system_reset to the last post-reset put), hotplug (device_add to the "
                  "new vCPU's first full put), migration (incoming: loading the VM state)",
                  "histogram", ("vm", "step"), samples)


class Exposition:
    """/metrics for one daemon: the per-VM families rendered directly, qtrace's own through
    prometheus_client (with its process_* collector); concurrent scrapes share renders."""

    def __init__(self, daemon: Observed, share_window: float = 0.25) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.vms = VmCollector(daemon)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SelfCollector(daemon, self.vms.last_seconds_of))
        ProcessCollector(registry=self.registry)
        self.shared = SharedRender(self._render, share_window)

    def _render(self, fmt: str) -> bytes:
        from prometheus_client import exposition
        from prometheus_client.openmetrics import exposition as openmetrics

        if fmt == OPENMETRICS:
            own = openmetrics.generate_latest(self.registry)
            own = own.removesuffix(b"# EOF\n")
            return render(self.vms.families(), fmt).encode() + own + b"# EOF\n"
        return render(self.vms.families(), fmt).encode() + exposition.generate_latest(
            self.registry)

    def get(self, fmt: str, gzipped: bool) -> bytes:
        return self.shared.get(fmt, gzipped)
