"""The daemon: at rest with idle VMs, its start-up, watch's start, and /metrics at scale."""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.harness import Ctx, Table, run_shuffled
from benchmarks.tracers import (
    QtraceDaemon,
    QtraceWatch,
)


def daemon_costs(ctx: Ctx) -> list[Table]:
    from qtrace_bpf.commands.demo_vm import DemoQemu

    out = []
    counts = (0, 10, 30) if ctx.scale >= 1 else (0, 2)
    idle = Table("The daemon at rest: CPU (% of one core) and RSS with idle VMs",
                 ("CPU idle %", "CPU, scraped every 15 s %", "RSS MB"), "")
    vms: list = []
    try:
        for count in counts:
            while len(vms) < count:
                vms.append(DemoQemu(f"idle-{len(vms)}", memory="64"))
            d = QtraceDaemon(scrape=3600.0)
            d.start()
            try:
                wait_exported(d, count)
                window = 4.0 if ctx.scale >= 1 else 1.0
                for _ in range(ctx.reps):
                    cpu0 = cpu_seconds(d.proc.pid)
                    time.sleep(window)
                    idle_pct = (cpu_seconds(d.proc.pid) - cpu0) / window * 100
                    cpu1 = cpu_seconds(d.proc.pid)
                    d.get("/metrics")
                    scrape_cpu = cpu_seconds(d.proc.pid) - cpu1
                    idle.add(f"{count} VMs", [idle_pct, idle_pct + scrape_cpu / 15 * 100,
                                              rss_mb(d.proc.pid)])
            finally:
                d.stop()
    finally:
        for vm in vms:
            vm.close()
    idle.notes.append("CPU: the daemon's threads' run time (schedstat) over windows without a "
                      "scrape; for the second column, one scrape's CPU spread over 15 s is "
                      "added")
    out.append(idle)

    n_vms = 10 if ctx.scale >= 1 else 2
    start = Table(f"Daemon start-up, {n_vms} VMs already running",
                  ("to /-/ready", f"to all {n_vms} VMs exported"), "s")
    running = [DemoQemu(f"startup-{i}", memory="64") for i in range(n_vms)]

    def start_time(warm: bool) -> list[float]:
        root = f"/sys/fs/bpf/qtrace-bench-warm-{time.monotonic_ns()}"
        if warm:  # a first start leaves its pins and links (keep_on_exit), as a restart finds
            first = QtraceDaemon(scrape=3600.0, keep=True, pin_root=root)
            first.start()
            first.stop()
        d = QtraceDaemon(scrape=3600.0, pin_root=root)
        t0 = time.monotonic()
        d.start()
        ready = time.monotonic() - t0
        wait_exported(d, n_vms)
        exported = time.monotonic() - t0
        d.stop()
        return [ready, exported]

    try:
        run_shuffled(start, {"cold (the loader compiles)": lambda: start_time(False),
                             "warm (matching pins: nothing compiled)": lambda: start_time(True)},
                     ctx.reps)
    finally:
        for vm in running:
            vm.close()
    watch_t = Table("qprobe watch: start to attached", ("seconds",), "s")
    with DemoQemu("watch-start") as vm:
        def attach_time() -> list[float]:
            w = QtraceWatch()
            t0 = time.monotonic()
            w.attach(vm.pid, "")
            took = time.monotonic() - t0
            w.proc.terminate()
            w.proc.wait(30)
            return [took]
        run_shuffled(watch_t, {"qprobe watch PID": attach_time}, ctx.reps)
    out += [start, watch_t, scrape_table(ctx)]
    return out


def wait_exported(d: QtraceDaemon, count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        body = d.get("/metrics") or b""
        if body.count(b"qtrace_vm_info{") >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon never exported {count} VMs")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread, from schedstat (ns; /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape_table(ctx: Ctx) -> Table:
    """/metrics at 1k, 10k, 30k series: qtrace's renderer and server beside
    prometheus_client's generate_latest and start_http_server on the same families."""
    from prometheus_client import CollectorRegistry, generate_latest
    from qtrace_bpf.exporters.exposition import TEXT
    from qtrace_bpf.exporters.http import Server, make_app
    from qtrace_bpf.exporters.metrics import Exposition, VmCollector

    from benchmarks import bench_scrape as bs
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.program.compiled import QtraceProgram

    t = Table("/metrics at scale", ("series", "qtrace render", "generate_latest",
                                    "20 scrapers p50", "20 scrapers p99"), "ms")
    sizes = ((5, 8), (50, 8), (150, 8)) if ctx.scale >= 1 else ((2, 2),)
    for vms, vcpus in sizes:
        with QtraceProgram(load_catalog(), max_vms=vms, max_vcpus=vcpus) as prog:
            d = bs.FakeDaemon(prog, vms, vcpus)
            fresh = Exposition(d, share_window=0.0)
            ours = Exposition(d, share_window=0.25)
            series = sum(1 for ln in fresh.get(TEXT, False).splitlines()
                         if ln.startswith(b"qtrace_"))
            reg = CollectorRegistry(auto_describe=False)
            reg.register(VmCollector(d))
            server = Server(make_app(ours.get, lambda: (True, "ok")), [("127.0.0.1", 0)])
            server.start()
            try:
                for _ in range(ctx.reps):
                    mine = bs.timed(lambda: fresh.get(TEXT, False), 3)  # noqa: B023
                    theirs = bs.timed(lambda: generate_latest(reg), 3)  # noqa: B023
                    _n, p50, p99, _err = bs.hammer(
                        f"http://127.0.0.1:{server.ports[0]}/metrics",
                        2.0 if ctx.scale >= 1 else 0.5)
                    t.add(f"{vms} VMs x {vcpus} vCPUs", [series, mine * 1e3, theirs * 1e3,
                                                         p50 * 1e3, p99 * 1e3])
            finally:
                server.shutdown()
    t.notes.append("real BPF maps filled as bench_scrape.py fills them (25 series a vCPU); "
                   "scrapers: 20 threads for 2 s per repetition, shared renders on")
    return t
