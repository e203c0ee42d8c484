"""A real QEMU/KVM guest: boot, system_reset and device_add, traced by the daemon or not."""

from __future__ import annotations

import time

from benchmarks.harness import Ctx, Table, run_shuffled, timed_config
from benchmarks.tracers import (
    QtraceDaemon,
    Tracer,
)


def real_vm(ctx: Ctx) -> Table:
    from qtrace_bpf.commands.demo_vm import DemoQemu

    t = Table("A real QEMU/KVM guest (Debian's QEMU 7.2, SeaBIOS), traced by the daemon or not "
              f"(hook: {ctx.hook})",
              ("boot to SeaBIOS' first byte", "system_reset (QMP)", "device_add CPU (QMP)"),
              "ms")

    def life(_tracer: Tracer) -> list[float]:
        con = ctx.tmp / f"debugcon-{time.monotonic_ns()}"
        t0 = time.monotonic()
        with DemoQemu("bench-vm", paused=False, smp="1,maxcpus=4", extra=[
                "-debugcon", f"file:{con}", "-global", "isa-debugcon.iobase=0x402"]) as vm:
            while not con.exists() or con.stat().st_size == 0:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("SeaBIOS wrote nothing")
                time.sleep(0.001)
            boot = time.monotonic() - t0
            time.sleep(0.3)
            resets = []
            for _ in range(3):
                r0 = time.monotonic()
                vm.cmd("system_reset")
                resets.append(time.monotonic() - r0)
                time.sleep(0.2)
            hot = []
            for _ in range(3):
                h0 = time.monotonic()
                vm.hotplug_cpu()
                hot.append(time.monotonic() - h0)
                time.sleep(0.2)
            vm.quit()
        con.unlink(missing_ok=True)
        return [boot * 1e3, sorted(resets)[1] * 1e3, sorted(hot)[1] * 1e3]

    daemon = QtraceDaemon()
    run_shuffled(t, {daemon.name: timed_config(daemon, life)}, ctx.reps,
                 baseline=lambda: life(Tracer()))
    t.notes.append("boot: from starting QEMU (QMP connect included) to SeaBIOS' first byte on "
                   "the debug console; system_reset and device_add: the median of 3 per VM")
    return t
