#!/usr/bin/env python3
"""qtrace side by side with the floor and with what operators use instead, in one run.

    bash scripts/bench.sh            # everything: BENCHMARKS.md and benchmarks/results.json
    .venv/bin/python benchmarks/suite.py --smoke --out /tmp/b   # tiny N, 1 repetition

Sections (each a table; the method is in harness.py): the KVM ioctl path of a traced
process, bystanders, the uprobe path, a real VM, the daemon, symbol resolution, placement.
Needs root, BCC, /dev/kvm, bpftrace, strace, gdb (and perf, if `perf trace` runs here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness import Table, build, run_shuffled  # noqa: E402
from reset_breakdown import reset_breakdown  # noqa: E402
from tracers import (  # noqa: E402
    Bpftrace,
    Floor,
    Gdb,
    PerfTrace,
    QtraceDaemon,
    QtraceUprobes,
    QtraceWatch,
    Strace,
    Tracer,
    bpf_progs,
    per_run_ns,
    run_workload,
)

COUNT_IOCTLS = ("tracepoint:syscalls:sys_enter_ioctl /pid == PID/ { @[args->cmd] = count(); }")
UPROBE_FNS = ("f_push", "f_endbr64", "f_xor", "f_test", "f_lea", "f_mov", "f_sub_rsp", "g_usdt")


@dataclass
class Ctx:
    reps: int
    scale: float
    tmp: Path
    hook: str

    def n(self, full: int) -> int:
        return max(100, int(full * self.scale))


def timed_config(tracer: Tracer, run: Callable[[Tracer], list[float]]) \
        -> Callable[[], list[float]]:
    """A configuration: start the tracer, run the workload under it, stop the tracer."""
    def go():
        tracer.start()
        try:
            return run(tracer)
        finally:
            tracer.stop()
    return go


# ---------------------------------------------------------------- 1. the KVM ioctl path

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


# ---------------------------------------------------------------- 2. bystanders

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


# ---------------------------------------------------------------- 3. the uprobe path

def uprobe_path(ctx: Ctx) -> tuple[Table, Table]:
    exe = build("uprobe_targets", ctx.tmp)
    from qtrace_bpf.symbols import elfsym

    res = elfsym.resolve(exe, UPROBE_FNS)
    site = res.usdt["bench:hit"][0].offset  # g_usdt is probed at its USDT site, not its entry
    offsets = tuple(res.found[fn][0].offset for fn in UPROBE_FNS[:-1]) + (site,)
    cols = tuple(f"{fn} [{res.found[fn][0].first_insn}]" for fn in UPROBE_FNS[:-1]) + (
        "USDT site [nop]",)
    t = Table("Uprobe path: ns per call of a function probed at its first instruction",
              cols, "ns")
    n = ctx.n(100_000)
    tracers: list[Tracer] = [Floor(offsets), QtraceUprobes(offsets), Bpftrace(
        "uprobe:EXE:f_* { @[probe] = count(); } usdt:EXE:bench:hit { @[probe] = count(); }")]
    configs = {tr.name: timed_config(tr, lambda tr: run_workload(exe, n, tr)) for tr in tracers}
    gdb = Gdb(UPROBE_FNS)
    configs[gdb.name] = timed_config(gdb, lambda tr: run_workload(exe, max(20, n // 500), tr))
    run_shuffled(t, configs, ctx.reps, baseline=lambda: run_workload(exe, n, Tracer()))
    t.notes.append(f"gdb runs {max(20, n // 500)} calls per function (each hit stops the "
                   "process), the others " + f"{n:,}")
    t.notes.append("floor: an empty program; qtrace: its catalog `mark` handler (count + "
                   "ring-buffer event), the process tracked; both on uprobe_multi links, as "
                   "the daemon attaches; bpftrace: perf-event uprobes, a count per probe; "
                   "gdb: a breakpoint at each function (the USDT one: its entry)")
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.symbols.binaries import plan_probes, resolve

    cat = load_catalog()
    bins = qemu_binaries()
    classes = Table("First instruction of every probed function, per QEMU binary, and where "
                    "the entry probe sits when that one is single-stepped (uprobe cost class: "
                    "emulated is cheap, single-stepped ~10x dearer)",
                    tuple(binary_name(b) for b in bins), "")
    for col, binary in enumerate(bins):
        for att in plan_probes(cat, resolve(cat, binary, binary)):
            row = classes.text.setdefault(att.probe.event, ["—"] * len(bins))
            if att.symbol is not None and att.entry_offset(False) != att.symbol.offset:
                row[col] = (f"`{att.symbol.first_insn}`, probed at +{att.symbol.entry_at} "
                            f"`{att.symbol.entry_insn}`: emulated")
            elif att.symbol is not None:
                row[col] = (f"`{att.symbol.first_insn}` "
                            f"{'emulated' if att.symbol.emulated else 'single-stepped'}")
            elif att.usdt_sites:
                row[col] = f"USDT `nop` emulated ({att.usdt})"
            elif att.inlined_offsets:
                row[col] = "inlined instances"
    return t, classes


def binary_name(path: str) -> str:
    return "Debian 7.2" if path.startswith("/usr/") else Path(path).parent.parent.name


def qemu_binaries() -> list[str]:
    import glob

    return ["/usr/bin/qemu-system-x86_64",
            *sorted(glob.glob("/var/cache/qtrace/qemu/*/bin/qemu-system-x86_64"))]


# ---------------------------------------------------------------- 4. a real VM

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


# ---------------------------------------------------------------- 5. the daemon

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
                    d._get("/metrics")
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
        body = d._get("/metrics") or b""
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
    import bench_scrape as bs
    from prometheus_client import CollectorRegistry, generate_latest
    from qtrace_bpf.exporters.exposition import TEXT
    from qtrace_bpf.exporters.http import Server, make_app
    from qtrace_bpf.exporters.metrics import Exposition, VmCollector

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


# ---------------------------------------------------------------- 6. symbol resolution

def resolution(ctx: Ctx) -> Table:
    t = Table("Symbol resolution of the whole catalog (a fresh interpreter each)",
              ("cold wall s", "cached wall s", "peak RSS MB"), "")
    for binary in qemu_binaries():
        name = binary_name(binary)
        for _ in range(ctx.reps):
            out = subprocess.run([sys.executable, "-c", RESOLVE, binary], check=True,
                                 capture_output=True, text=True, cwd=HERE.parent).stdout
            r = json.loads(out)
            t.add(name, [r["cold"], r["cached"], r["hwm_mb"]])
    via = debuginfod_row(ctx)
    if via is not None:
        for values in via:
            t.add("upstream, stripped, DWARF through debuginfod", values)
    t.notes.append("cached: the same build-id again in the process (a second VM of the same "
                   "binary); through debuginfod: the full-DWARF build stripped (`objcopy "
                   "--strip-all`), its `--only-keep-debug` file served by Debian's debuginfod "
                   "on loopback; cold = fetched (45 MB) and resolved, the cached column = a "
                   "new process that finds the file in qtrace's debuginfo cache")
    return t


def debuginfod_row(ctx: Ctx) -> list[list[float]] | None:
    """Resolution of a stripped binary whose debug file a real debuginfod server sends."""
    import urllib.request

    from qtrace_bpf.symbols import elf as elfio

    full = next((b for b in qemu_binaries() if "deb13" in b and "-dtrace" not in b), None)
    if full is None or not shutil.which("debuginfod"):
        return None
    work = ctx.tmp / "debuginfod"
    serve = work / "serve"
    serve.mkdir(parents=True, exist_ok=True)
    stripped = work / "qemu-system-x86_64"
    subprocess.run(["objcopy", "--only-keep-debug", full, str(serve / "qemu.debug")], check=True)
    subprocess.run(["objcopy", "--strip-all", full, str(stripped)], check=True)
    bid = elfio.read_build_id(str(stripped))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["debuginfod", "-F", "-d", str(work / "db.sqlite"), "-p",
                               str(port), "-t", "1", str(serve)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                # GET (debuginfod answers nothing else), one byte read: it serves the file
                with urllib.request.urlopen(f"{url}/buildid/{bid}/debuginfo", timeout=5) as r:
                    r.read(1)
                    break
            except OSError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.5)
        rows = []
        for rep in range(ctx.reps):
            cache = work / f"cache-{rep}"
            cold = json.loads(subprocess.run(
                [sys.executable, "-c", RESOLVE_VIA, str(stripped), url, str(cache)],
                check=True, capture_output=True, text=True, cwd=HERE.parent).stdout)
            warm = json.loads(subprocess.run(
                [sys.executable, "-c", RESOLVE_VIA, str(stripped), url, str(cache)],
                check=True, capture_output=True, text=True, cwd=HERE.parent).stdout)
            assert cold["dwarf"], "debuginfod sent nothing usable"
            rows.append([cold["cold"], warm["cold"], max(cold["hwm_mb"], warm["hwm_mb"])])
        return rows
    finally:
        server.terminate()
        server.wait(30)


RESOLVE_VIA = """
import json, sys, time
from qtrace_bpf import elfsym
from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.symbols.debuginfod import Debuginfod
names = load_catalog().functions
d = Debuginfod(urls=(sys.argv[2],), cache=sys.argv[3], allow_http=True)
t = time.perf_counter()
res = elfsym.resolve(sys.argv[1], names, inline_names=names, debuginfod=d)
cold = time.perf_counter() - t
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
print(json.dumps({"cold": cold, "hwm_mb": hwm / 1024, "dwarf": res.dwarf}))
"""


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its (large) parent's.
RESOLVE = """
import json, sys, time
from qtrace_bpf import elfsym
from qtrace_bpf.contract.catalog import load_catalog
names = load_catalog().functions
t = time.perf_counter()
elfsym.resolve_cached(sys.argv[1], names, inline_names=names)
cold = time.perf_counter() - t
t = time.perf_counter()
elfsym.resolve_cached(sys.argv[1], names, inline_names=names)
cached = time.perf_counter() - t
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
print(json.dumps({"cold": cold, "cached": cached, "hwm_mb": hwm / 1024}))
"""


# ---------------------------------------------------------------- 7. placement

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


# ---------------------------------------------------------------- the report

def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not available"

    import bcc

    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               "?")
    return {"machine": f"{os.cpu_count()} CPUs, {cpu}", "kernel": platform.release(),
            "qemu": first_line(["qemu-system-x86_64", "--version"]),
            "bcc": getattr(bcc, "__version__", "?"),
            "bpftrace": first_line(["bpftrace", "--version"]),
            "strace": first_line(["strace", "--version"]),
            "gdb": first_line(["gdb", "--version"]), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1,
                    help="whole runs of the suite; the report shows how far apart their "
                         "headline figures land (scripts/bench.sh: 3)")
    ap.add_argument("--smoke", action="store_true", help="tiny N, 1 repetition, a temp output")
    ap.add_argument("--out", type=Path, default=HERE.parent)
    ap.add_argument("--only", nargs="*", default=None, help="section names to run")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render BENCHMARKS.md from benchmarks/results.json, measure nothing")
    args = ap.parse_args()
    from report import render_report

    if args.report_only:
        saved = json.loads((args.out / "benchmarks" / "results.json").read_text())
        runs = [[(t["section"], Table.from_dict(t)) for t in run]
                for run in saved.get("runs", [saved["tables"]])]
        (args.out / "BENCHMARKS.md").write_text(render_report(saved["meta"], runs[-1], runs))
        return
    reps, scale = (1, 0.01) if args.smoke else (args.reps, 1.0)
    started = time.monotonic()
    runs: list[list[tuple[str, Table]]] = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="qtrace-bench-") as tmp:
            ctx = Ctx(reps, scale, Path(tmp), hooks_in_use())
            runs.append(run_sections(ctx, args.only, f"run {run}/{args.runs}"))
    meta = {**versions(), "kernel_hook": ctx.hook, "repetitions": reps, "runs": args.runs,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.monotonic() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "tables": [{"section": s, **t.as_dict()} for s, t in runs[-1]],
               "runs": [[{"section": s, **t.as_dict()} for s, t in run] for run in runs]}
    (args.out / "benchmarks").mkdir(exist_ok=True)
    (args.out / "benchmarks" / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "BENCHMARKS.md").write_text(render_report(meta, runs[-1], runs))
    print(f"bench: wrote {args.out / 'BENCHMARKS.md'} in {meta['seconds']} s", file=sys.stderr)


def run_sections(ctx: Ctx, only: list[str] | None, label: str) -> list[tuple[str, Table]]:
    """One whole run of the suite (or of the sections asked for)."""
    sections = {"ioctl": ioctl_path, "bystanders": bystanders, "uprobes": uprobe_path,
                "vm": real_vm, "reset": reset_breakdown, "daemon": daemon_costs,
                "resolution": resolution, "placement": placement}
    tables: list[tuple[str, Table]] = []
    for name, fn in sections.items():
        if only and name not in only:
            continue
        t0 = time.monotonic()
        got = fn(ctx)
        for tab in got if isinstance(got, list | tuple) else [got]:
            tables.append((name, tab))
        print(f"bench: {label}: {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return tables


def hooks_in_use() -> str:
    """The kernel hook qtrace takes here (what every ioctl table measured)."""
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.program.compiled import QtraceProgram

    with QtraceProgram(load_catalog()) as prog:
        return prog.hook_mode


if __name__ == "__main__":
    main()
