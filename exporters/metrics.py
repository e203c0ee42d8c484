"""What /metrics says: per-VM families (VmCollector) and qtrace's health (SelfCollector),
read from the BPF maps and the tracker at scrape time, never pushed; Exposition renders them.

The exporter only reads what `Observed` names and writes nothing back; the daemon hands
VmCollector.carry to the tracker itself.  Metric names and labels are a contract
(docs/architecture.md): dashboards and alerts rely on them.  Per-VM samples with equal
labels are summed (two processes of one domain name, one restarted within the grace period).
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qtrace_bpf import __version__, abi, decoders, maps, revision
from qtrace_bpf.catalog import Catalog

from .exposition import OPENMETRICS, Family, SharedRender, render

# Resets nobody on the host asked for (watchdog and panic actions report guest-reset /
# guest-panic); the alert rules use the same list.
UNEXPECTED_CAUSES = ("host-error", "guest-reset", "guest-panic")
# The ShutdownCauses QEMU resets with (QMP RESET `reason`), zero-filled per VM; the
# shutdown-only ones (host-qmp-quit, host-signal, guest-shutdown) and `none` (the boot-time
# reset, part of boot) would be series that never move: exported only if they ever count.
RESET_CAUSES = ("host-error", "host-qmp-system-reset", "host-ui", "guest-reset", "guest-panic",
                "subsystem-reset", "snapshot-load")

Labels = maps.Labels


class Observed(Protocol):
    """The daemon as the exporter sees it: read at scrape time, never written."""

    catalog: Catalog
    ready: bool
    stage: str
    prog: Any  # QtraceProgram | None (None while starting): items(), hook_mode, ...
    tracker: Any  # Tracker: lock, snapshot(), counters of what it refused
    binaries: Any  # QemuBinaries: plans, errors
    http: Any  # the server, for its connection counters (None before it starts)
    resource_errors: dict[str, int]  # errno name -> times the loop ran out and retried


class VmCollector:
    """Per-VM families.  A domain that restarts keeps its `vm` label, and its counters go on:
    when the old process's entries are forgotten while a VM of the same name remains, its
    counts are carried (in memory) and added to that name's series."""

    def __init__(self, daemon: Observed) -> None:
        self.daemon = daemon
        self.carried: dict[str, dict[tuple[str, Labels], int]] = {}
        self._memo: dict[str, dict[bytes, Labels]] = {}
        self.last_seconds = 0.0  # how long the last families() took (a self-metric)

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
        out += self._values(vms)
        out.append(Family(
            "qtrace_vm_info", "One series per traced VM, value 1", "gauge",
            ("vm", "pid", "uuid", "qemu_version", "build_id"),
            {(vm.name, str(vm.pid), vm.uuid, vm.qemu_version, vm.build_id): 1
             for vm in vms.values()}))
        self.last_seconds = time.perf_counter() - started
        return out

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
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            metric = cls(fam.name, fam.help, labels=list(fam.labels))
            for labels, value in fam.samples.items():
                metric.add_metric(list(labels), value)
            yield metric


class SelfCollector:
    def __init__(self, daemon: Observed, vms: VmCollector) -> None:
        self.daemon = daemon
        self.vms = vms  # for how long its last collection took

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield GaugeMetricFamily("qtrace_ready", "1 once the kernel hook is attached and the "
                                "host's QEMU processes were scanned", value=1 if d.ready else 0)
        stage = GaugeMetricFamily("qtrace_startup_info", "What the daemon is doing (start-up "
                                  "stages, then tracing)", labels=["stage"])
        stage.add_metric([d.stage], 1)
        yield stage
        build = GaugeMetricFamily("qtrace_build_info", "qtrace's version and what it runs on",
                                  labels=["version", "revision", "python", "bcc", "kernel",
                                          "abi"])
        build.add_metric([__version__, revision(), platform.python_version(),
                          getattr(d.prog, "bcc_version", "") if d.prog else "",
                          os.uname().release, str(abi.QTRACE_ABI_VERSION)], 1)
        yield build
        http = getattr(d, "http", None)
        if http is not None:
            yield GaugeMetricFamily("qtrace_http_connections", "HTTP connections open now",
                                    value=http.active)
            closed = CounterMetricFamily(
                "qtrace_http_connections_closed", "HTTP connections the server closed: "
                "evicted (idle, to make room), refused (at max_connections), timeout",
                labels=["reason"])
            for reason, n in (("evicted", http.evicted), ("refused", http.refused),
                              ("timeout", http.timeouts)):
                closed.add_metric([reason], n)
            yield closed
            yield GaugeMetricFamily("qtrace_http_max_connections", "HTTP connections allowed "
                                    "at once: the config's max_connections, capped to fit the "
                                    "fd limit", value=http.limits.max_connections)
        errors = CounterMetricFamily("qtrace_resource_errors", "Times the daemon ran out of a "
                                     "resource (EMFILE, ENFILE, ENOMEM, ...) and retried, by "
                                     "errno and where", labels=["errno", "where"])
        for where, counts in (("http", getattr(http, "resource_errors", {})),
                              ("tracking", getattr(d, "resource_errors", {}))):
            for name in ("EMFILE", "ENFILE", "ENOMEM", *sorted(set(counts) - {
                    "EMFILE", "ENFILE", "ENOMEM"})):
                errors.add_metric([name, where], counts.get(name, 0))
        yield errors
        if d.prog is None:
            return
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
        lost = CounterMetricFamily("qtrace_events_lost", "Ring-buffer events dropped, by kind "
                                   "(counters are unaffected)", labels=["kind"])
        for kind, n in d.prog.maps.events_lost().items():
            lost.add_metric([kind], n)
        yield lost
        failed = CounterMetricFamily("qtrace_map_updates_failed",
                                     "BPF map inserts refused because the map was full (raise "
                                     "max_vms / max_vcpus_per_vm)", labels=["map"])
        for name, n in d.prog.maps.update_failures().items():
            failed.add_metric([name], n)
        yield failed
        decode = CounterMetricFamily("qtrace_decode_errors",
                                     "Numbers from the kernel with no name (shown as placeholders)",
                                     labels=["field"])
        for field in ("phase", "ioctl", "cause", "probe", "value"):
            decode.add_metric([field], decoders.DECODE_ERRORS[field])
        yield decode
        yield GaugeMetricFamily("qtrace_tracked_vms", "VMs being traced now",
                                value=sum(1 for v in t.snapshot().values() if v.exited_at is None))
        yield GaugeMetricFamily("qtrace_tracked_processes", "QEMU processes tracked now, VMs or "
                                "not yet (no vCPU so far)",
                                value=sum(1 for v in t.vms.copy().values() if v.exited_at is None))
        yield CounterMetricFamily("qtrace_vms_refused", "VMs not traced because max_vms was "
                                  "reached", value=t.refused)
        yield CounterMetricFamily("qtrace_non_vm_processes", "QEMU processes that exited "
                                  "without creating a vCPU (e.g. libvirt's capability probes): "
                                  "never exported as VMs", value=t.not_vms)
        errors = CounterMetricFamily("qtrace_attach_errors", "QEMU processes or binaries that "
                                     "could not be traced, by reason", labels=["reason"])
        for reason in ("vanished", "unusable_binary", "attach_failed"):
            errors.add_metric([reason], t.attach_errors.get(reason, 0))
        yield errors
        gaps = CounterMetricFamily(
            "qtrace_counting_gaps", "Times counting stopped or started late: found_running (a "
            "VM adopted by a scan), program_replaced / layout_replaced (a restart that could not "
            "keep the previous program or maps)", labels=["vm", "reason"])
        for (vm, reason), n in sorted(t.gaps.items()):
            gaps.add_metric([vm, reason], n)
        yield gaps
        yield GaugeMetricFamily("qtrace_scrape_duration_seconds",
                                "Time the last collection of the per-VM families took",
                                value=self.vms.last_seconds)


class Exposition:
    """/metrics for one daemon: the per-VM families rendered directly, qtrace's own through
    prometheus_client (with its process_* collector); concurrent scrapes share renders."""

    def __init__(self, daemon: Observed, share_window: float = 0.25) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.vms = VmCollector(daemon)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SelfCollector(daemon, self.vms))
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
