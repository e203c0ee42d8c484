"""Placement: the tracer's process on the workload's CPU or another."""

from __future__ import annotations

import os

from benchmarks.harness import Ctx, Table, build, run_shuffled, timed_config
from benchmarks.tracers import (
    QtraceDaemon,
    Strace,
    Tracer,
    run_workload,
)


def placement(ctx: Ctx) -> Table:
    exe = build("kvm_loop", ctx.tmp)
    n = ctx.n(50_000)
    t = Table("Placement: the workload on CPU 0, the tracer's process on CPU 0 or CPU 1 "
              f"(hook: {ctx.hook})",
              ("KVM_CHECK_EXTENSION", "KVM_SET_MSRS (write)", "KVM_SET_REGS (write)"), "ns")
    configs = {
        "strace, same CPU": timed_config(Strace(0, "strace, same CPU"),
                                         lambda tr: run_workload(exe, n, tr, cpu=0)),
        "strace, other CPU": timed_config(Strace(1, "strace, other CPU"),
                                          lambda tr: run_workload(exe, n, tr, cpu=0)),
        "qtrace daemon, same CPU": timed_config(PinnedDaemon(0),
                                                lambda tr: run_workload(exe, n, tr, cpu=0)),
        "qtrace daemon, other CPU": timed_config(PinnedDaemon(1),
                                                 lambda tr: run_workload(exe, n, tr, cpu=0)),
    }
    run_shuffled(t, configs, ctx.reps, baseline=lambda: run_workload(exe, n, Tracer(), cpu=0))
    t.notes.append("qtrace's counting runs in the workload's own context (BPF), wherever its "
                   "daemon runs; strace's costs two context switches per system call")
    return t


class PinnedDaemon(QtraceDaemon):
    def __init__(self, cpu: int):
        super().__init__(name=f"qtrace daemon, cpu {cpu}")
        self.cpu = cpu

    def start(self) -> None:
        super().start()
        os.sched_setaffinity(self.proc.pid, {self.cpu})
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            os.sched_setaffinity(int(task), {self.cpu})
