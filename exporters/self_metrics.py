"""qtrace's own metrics (qtrace_ready, qtrace_build_info, probes attached, maps full, HTTP
connections, ...): few series, so they go through prometheus_client's collectors."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qtrace_bpf import __version__, build_info, revision
from qtrace_bpf.contract import abi, decoders

from .observed import Observed

LABEL_MAX = 128  # a binary's path is chosen by whoever installed it: bounded as a label


def bounded(value: str) -> str:
    """At most LABEL_MAX characters, keeping the end (a file name says more than its dirs)."""
    return value if len(value) <= LABEL_MAX else "..." + value[-(LABEL_MAX - 3):]


class SelfCollector:
    """qtrace's own health, through prometheus_client: start-up, HTTP, probes, maps."""

    def __init__(self, daemon: Observed, scrape_seconds: Callable[[], float]) -> None:
        self.daemon = daemon
        self.scrape_seconds = scrape_seconds  # how long the last per-VM collection took

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
                                  labels=["version", "revision", "branch", "python", "bcc",
                                          "kernel", "abi"])
        build.add_metric([__version__, revision(), build_info()["branch"],
                          platform.python_version(),
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
        seen: set[tuple[str, str]] = set()
        for plan in list(d.binaries.plans.values()):
            labels = [bounded(plan.display), (plan.resolution.build_id or "")[:LABEL_MAX]]
            if tuple(labels) in seen:  # one path, two files (a container's copy)
                labels[0] = bounded(f"{plan.display} ({plan.key[0]}:{plan.key[1]})")
            seen.add((labels[0], labels[1]))
            attached.add_metric(labels, len(plan.attached) - len(plan.missing))
            missing.add_metric(labels, len(plan.missing))
            for a in plan.attached:
                per_event.add_metric([*labels, a.probe.event], 1 if a.ok else 0)
        yield attached
        yield missing
        yield per_event
        yield CounterMetricFamily("qtrace_untrusted_binaries", "Distinct QEMU-looking files "
                                  "not parsed nor probed: writable by, or in a directory "
                                  "writable by, an untrusted user",
                                  value=d.binaries.untrusted_total)
        yield GaugeMetricFamily("qtrace_binary_errors", "QEMU binaries that could not be resolved "
                                "(non-ELF, truncated, unreadable)", value=len(d.binaries.errors))
        hook = GaugeMetricFamily("qtrace_kernel_hook_info", "The kernel hook on KVM ioctls in "
                                 "use, and how uprobes attach (multi: uprobe_multi links; "
                                 "perf: a perf event each)", labels=["mode", "uprobes"])
        hook.add_metric([d.prog.hook_mode, d.prog.uprobes], 1)
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
        for field in ("phase", "ioctl", "cause", "probe", "value", "step"):
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
        for reason in ("vanished", "unusable_binary", "untrusted_binary", "attach_failed"):
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
                                value=self.scrape_seconds())
