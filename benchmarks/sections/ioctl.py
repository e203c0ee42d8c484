"""The KVM ioctl path of a traced process, the BPF programs' own run time per ioctl, and what
unrelated processes pay while the tracers run."""

from __future__ import annotations

import shutil
import subprocess

from benchmarks.harness import Ctx, Table, build, run_shuffled, timed_config
from benchmarks.tracers import (
    Bpftrace,
    Floor,
    PerfTrace,
    QtraceDaemon,
    QtraceWatch,
    Strace,
    Tracer,
    bpf_progs,
    per_run_ns,
    run_workload,
)

COUNT_IOCTLS = ("tracepoint:syscalls:sys_enter_ioctl /pid == PID/ { @[args->cmd] = count(); }")


def ioctl_path(ctx: Ctx) -> Table:
    exe = build("kvm_loop", ctx.tmp)
    qemu_named = ctx.tmp / "qemu-system-kvmloop"  # watch traces QEMU processes only
    shutil.copy(exe, qemu_named)
    n = ctx.n(100_000)
    t = Table(f"KVM ioctl path of a traced process (kernel hook: {ctx.hook})",
              ("KVM_CHECK_EXTENSION", "KVM_SET_MSRS (write)", "KVM_SET_REGS (write)"), "ns")
    tracers: list[Tracer] = [Floor(), QtraceDaemon(), Bpftrace(COUNT_IOCTLS), Strace()]
    if PerfTrace.available():
        tracers.append(PerfTrace())
    else:
        t.notes.append("perf trace: does not run on this kernel/perf pair (not measured)")
    configs = {tr.name: timed_config(tr, lambda tr: run_workload(exe, n, tr)) for tr in tracers}
    watch = QtraceWatch()
    configs[watch.name] = timed_config(watch, lambda tr: run_workload(str(qemu_named), n, tr))
    run_shuffled(t, configs, ctx.reps, baseline=lambda: run_workload(exe, n, Tracer()))
    t.notes.append("qtrace daemon: production mode (pinned program, scraped every second); "
                   "qtrace watch: every state write also goes through the ring buffer to a "
                   "printing process; bpftrace: a per-ioctl count map on sys_enter_ioctl only")
    return [t, bpf_time(ctx, exe, n)]


def bpf_time(ctx: Ctx, exe: str, n: int) -> Table:
    """The BPF programs' own run time per ioctl (kernel.bpf_stats_enabled): far steadier
    than wall times, which carry the machine's noise."""
    t = Table(f"BPF programs' own run time per traced ioctl (bpf_stats; hook: {ctx.hook})",
              ("ns per ioctl",), "ns")

    def measure(tracer: Tracer) -> list[float]:
        ids_before = set(bpf_progs())
        tracer.start()
        got: list[float] = []
        try:
            snap: dict = {}

            def start_stats() -> None:
                snap["ids"] = set(bpf_progs()) - ids_before

            class Stats(Tracer):  # attach the tracer, then note its programs
                name = tracer.name

                def attach(self, pid: int, exe: str) -> None:
                    tracer.attach(pid, exe)
                    start_stats()
                    snap["before"] = bpf_progs()

                def detach(self) -> None:
                    tracer.detach()

            run_workload(exe, n, Stats(), before_detach=lambda: got.append(
                per_run_ns(snap["before"], bpf_progs(), snap["ids"], n)))
        finally:
            tracer.stop()
        return got

    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=False)
    try:
        tracers = [Floor(), QtraceDaemon(), Bpftrace(COUNT_IOCTLS)]
        run_shuffled(t, {tr.name: (lambda tr=tr: measure(tr)) for tr in tracers}, ctx.reps)
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
    t.notes.append("summed over the tracer's programs (qtrace and the floor: enter and exit; "
                   "bpftrace: enter), over the workload's mix of CHECK_EXTENSION, SET_MSRS and "
                   "SET_REGS and anything else on the host meanwhile; the kernel's timing "
                   "adds ~20 ns per run to each")
    return t


def bystanders(ctx: Ctx) -> Table:
    exe = build("bystander", ctx.tmp)
    n = ctx.n(200_000)
    t = Table(f"Bystanders: unrelated processes while the tracers run (hook: {ctx.hook})",
              ("getppid", "ioctl FIONREAD (pipe)"), "ns")
    tracers: list[Tracer] = [Floor(), QtraceDaemon(), BystanderBpftrace()]
    configs = {tr.name: timed_config(tr, lambda tr: run_workload(exe, n, tr)) for tr in tracers}
    run_shuffled(t, configs, ctx.reps, baseline=lambda: run_workload(exe, n, Tracer()))
    t.notes.append("the bystander is not traced: what it pays is the hook's dispatch and the "
                   "BPF program's early exit (not a tracked process)")
    return t


class BystanderBpftrace(Bpftrace):
    """bpftrace counting another process's ioctls: its program runs for everyone's."""

    def __init__(self):
        super().__init__(COUNT_IOCTLS, "bpftrace (counting pid 1)")

    def start(self) -> None:
        super().attach(1, "")

    def attach(self, pid: int, exe: str) -> None:
        pass

    def detach(self) -> None:
        pass

    def stop(self) -> None:
        super().detach()
