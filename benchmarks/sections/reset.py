"""Where a traced reset's time goes: the probes (kernel) vs the daemon's reaction (user space).

The daemon is measured twice in each repetition: running, and SIGSTOPped with its programs
still attached and counting.  The stopped daemon's added cost is what the probes cost; the
rest of the running daemon's is its own reaction (wake-ups, Python work competing with
QEMU's threads for the host's CPUs).  Beside the times: uprobe hits per reset (the daemon's
lifecycle counters) and the daemon's context switches per reset beyond its idle rate.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

from benchmarks.harness import Table, run_shuffled
from benchmarks.tracers import QtraceDaemon

RESETS = 40
RUNNING, STOPPED = "qtrace daemon", "daemon SIGSTOPped (probes only)"


def switches(pid: int) -> int:
    """Context switches of all the process's threads so far (each is a wake-up or a
    preemption)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def lifecycle_hits(daemon: QtraceDaemon) -> float:
    text = (daemon.get("/metrics") or b"").decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("qtrace_lifecycle_events_total{"))


def reset_breakdown(ctx) -> Table:
    from qtrace_bpf.commands.demo_vm import DemoQemu

    resets = max(3, int(RESETS * ctx.scale)) if ctx.scale < 1 else RESETS
    t = Table(f"Where a traced system_reset's time goes (2-vCPU q35 guest, median of {resets} "
              f"QMP round trips per repetition; hook: {ctx.hook})",
              ("system_reset (QMP)", "uprobe hits per reset", "daemon switches per reset"),
              "ms")

    def rounds(vm) -> float:
        times = []
        for _ in range(resets):
            r0 = time.monotonic()
            vm.cmd("system_reset")
            times.append(time.monotonic() - r0)
            time.sleep(0.02)
        return statistics.median(times) * 1e3

    def measure(daemon: QtraceDaemon | None, stop: bool) -> list[float]:
        with DemoQemu("bench-reset", paused=False, smp="2") as vm:
            time.sleep(0.5)  # SeaBIOS running, the daemon tracking it
            if daemon is None:
                return [rounds(vm), 0.0, 0.0]
            pid = daemon.proc.pid
            hits0 = lifecycle_hits(daemon)
            idle0, i0 = switches(pid), time.monotonic()
            time.sleep(1.0)
            idle_rate = (switches(pid) - idle0) / (time.monotonic() - i0)
            if stop:
                os.kill(pid, signal.SIGSTOP)
            s0, t0 = switches(pid), time.monotonic()
            try:
                ms = rounds(vm)
            finally:
                if stop:
                    os.kill(pid, signal.SIGCONT)
            extra = switches(pid) - s0 - idle_rate * (time.monotonic() - t0)
            time.sleep(0.5)  # a scrape after SIGCONT sees the kernel's counts
            hits = (lifecycle_hits(daemon) - hits0) / resets
            return [ms, hits, max(extra, 0.0) / resets]

    def config(stop: bool):
        def go() -> list[float]:
            d = QtraceDaemon()
            d.start()
            try:
                return measure(d, stop)
            finally:
                d.stop()
        return go

    run_shuffled(t, {RUNNING: config(False), STOPPED: config(True)}, ctx.reps,
                 baseline=lambda: measure(None, False))
    t.notes.append("uprobe hits: the daemon's qtrace_lifecycle_events_total per reset (each "
                   "catalog function the reset passes through, per vCPU where it runs per "
                   "vCPU); switches: the daemon's context switches during the resets beyond "
                   "its idle rate, per reset (0 when SIGSTOPped)")
    return t

