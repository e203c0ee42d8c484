"""The tracers benchmarks/suite.py compares, each started before a workload and attached to
it once it is ready: nothing, the empty-program floor, qtrace (daemon or watch), bpftrace,
strace, perf trace, gdb breakpoints.  Each says when it is really attached before the
workload starts timing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QPROBE = [sys.executable, "-m", "qtrace_bpf.cli"]


class Tracer:
    name = "untraced"

    def start(self) -> None:
        """Before the workload exists (a daemon tracks it from its first KVM ioctl)."""

    def attach(self, pid: int, exe: str) -> None:
        """The workload is ready and waiting: attach to it, return once attached."""

    def detach(self) -> None:
        """The workload has exited."""

    def stop(self) -> None:
        """After the last workload."""


def _wait_line(stream, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if needle in line:
            return line
    raise RuntimeError(f"never saw {needle!r}")


class Floor(Tracer):
    """Empty BPF programs on qtrace's hooks (probes/bench_floor.bpf.c), through BCC."""

    def __init__(self, uprobe_offsets: tuple[int, ...] = ()):
        self.name = "floor (empty BPF)"
        self.offsets = uprobe_offsets  # file offsets in the workload's executable
        self.bpf = None

    def start(self) -> None:
        from bcc import BPF

        self.bpf = BPF(src_file=str(ROOT / "probes" / "bench_floor.bpf.c"))
        if not self.offsets:
            self.bpf.attach_tracepoint(tp="syscalls:sys_enter_ioctl", fn_name="floor_enter")
            self.bpf.attach_tracepoint(tp="syscalls:sys_exit_ioctl", fn_name="floor_exit")

    def attach(self, pid: int, exe: str) -> None:
        """The uprobes through one uprobe_multi link, as qtrace attaches its own."""
        from qtrace_bpf.bpf import bpfsys

        if self.offsets:
            fd = self.bpf.load_func(b"floor_uprobe", self.bpf.KPROBE, None,
                                    bpfsys.BPF_TRACE_UPROBE_MULTI).fd
            self._link = bpfsys.link_uprobe_multi(fd, exe, sorted(self.offsets), False)

    def detach(self) -> None:
        if self.offsets:
            os.close(self._link)

    def stop(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


class QtraceDaemon(Tracer):
    """`qprobe daemon`, scraped every `scrape` seconds by a thread (as Prometheus would)."""

    def __init__(self, scrape: float = 1.0, name: str = "qtrace daemon", keep: bool = False,
                 pin_root: str | None = None):
        self.name = name
        self.scrape = scrape
        self.keep = keep  # keep_on_exit: leave the programs attached for the next start
        self.pin_root = pin_root
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import socket

        self.tmp = tempfile.mkdtemp(prefix="qtrace-bench-")  # removed by stop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = Path(self.tmp) / "qtrace.toml"
        root = self.pin_root or f"/sys/fs/bpf/qtrace-bench-{self.port}"
        cfg.write_text(f'listen = "127.0.0.1:{self.port}"\nbpf_pin_root = "{root}"\n'
                       f'keep_on_exit = {"true" if self.keep else "false"}\n')
        self.log = Path(self.tmp) / "daemon.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([*QPROBE, "daemon", "--config", str(cfg)], cwd=ROOT,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not self.get("/-/ready"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                why = self.log.read_text()[-2000:]
                self.stop()  # the caller's finally covers only a started tracer
                raise RuntimeError("qtrace daemon did not get ready: " + why)
            time.sleep(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scrape, daemon=True)
        self._thread.start()

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def _scrape(self) -> None:
        while not self._stop.wait(self.scrape):
            self.get("/metrics")

    def stop(self) -> None:
        if self.proc is not None:
            if hasattr(self, "_stop"):
                self._stop.set()
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


class QtraceUprobes(Tracer):
    """qtrace's own uprobe handler (a catalog `mark` slot, built as the daemon builds it: a
    count, no event), attached the way the daemon attaches (uprobe_multi links), the process
    tracked, its ring buffer drained."""

    name = "qtrace"

    def __init__(self, offsets: tuple[int, ...]):
        self.offsets = offsets  # file offsets in the workload's executable
        self.prog = None

    def start(self) -> None:
        from qtrace_bpf.contract.catalog import load_catalog
        from qtrace_bpf.program.compiled import QtraceProgram

        self.prog = QtraceProgram(load_catalog())

    def attach(self, pid: int, exe: str) -> None:
        from qtrace_bpf.contract import abi
        from qtrace_bpf.symbols import elfsym
        from qtrace_bpf.symbols.binaries import AttachPlan, PlannedProbe
        from qtrace_bpf.symbols.elf import UsdtSite

        res = elfsym.resolve(exe, ())
        sites = [UsdtSite(off, 0, 0) for off in self.offsets]
        probe = self.prog.catalog.probes[0]  # a `mark` probe
        st = os.stat(exe)
        plan = AttachPlan((st.st_dev, st.st_ino), exe, exe, res, [
            PlannedProbe(probe, None, "bench", usdt="bench", usdt_sites=sites)])
        self.prog.attach_binary(plan)
        self.vm = abi.USER_VM_ID_BASE + pid
        self.prog.maps.insert_proc(pid, self.vm, boot_done=True)
        self._stop = threading.Event()
        self._drain = threading.Thread(target=self._poll, daemon=True)
        self._drain.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.prog.poll(50)
            self.prog.events.clear()

    def detach(self) -> None:
        self._stop.set()
        self._drain.join()

    def stop(self) -> None:
        if self.prog is not None:
            self.prog.close()
            self.prog = None


class QtraceWatch(Tracer):
    """`qprobe watch PID`: BCC in-process, every state write an event printed."""

    name = "qtrace watch"

    def attach(self, pid: int, exe: str) -> None:
        self.proc = subprocess.Popen([*QPROBE, "watch", str(pid), "--json"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        _wait_line(self.proc.stderr, "attached to vm")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def detach(self) -> None:
        self.proc.wait(60)


class Bpftrace(Tracer):
    """bpftrace with a program that counts the same thing; PID is replaced by the pid."""

    def __init__(self, program: str, name: str = "bpftrace"):
        self.name = name
        self.program = program

    def attach(self, pid: int, exe: str) -> None:
        prog = self.program.replace("PID", str(pid)).replace("EXE", exe)
        self.proc = subprocess.Popen(["bpftrace", "-e", prog], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        _wait_line(self.proc.stdout, "Attaching")
        time.sleep(0.2)

    def detach(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=60)


class Strace(Tracer):
    name = "strace -f -e trace=ioctl"

    def __init__(self, cpu: int | None = None, name: str | None = None):
        self.cpu = cpu
        self.name = name or self.name

    def attach(self, pid: int, exe: str) -> None:
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        self.proc = subprocess.Popen([*pin, "strace", "-f", "-e", "trace=ioctl", "-o",
                                      os.devnull, "-p", str(pid)], stderr=subprocess.PIPE,
                                     text=True)
        _wait_line(self.proc.stderr, "attached")

    def detach(self) -> None:
        self.proc.wait(60)


class PerfTrace(Tracer):
    name = "perf trace -e ioctl"

    @staticmethod
    def available() -> bool:
        if not shutil.which("perf"):
            return False
        r = subprocess.run(["perf", "trace", "-e", "ioctl", "-o", os.devnull, "--", "true"],
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0

    def attach(self, pid: int, exe: str) -> None:
        self.proc = subprocess.Popen(["perf", "trace", "-e", "ioctl", "-o", os.devnull, "-p",
                                      str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(2.0)  # perf trace says nothing when attached

    def detach(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Gdb(Tracer):
    """Breakpoints with `commands; silent; continue; end`: what operators do today."""

    name = "gdb breakpoints"

    def __init__(self, syms: tuple[str, ...]):
        self.syms = syms

    def attach(self, pid: int, exe: str) -> None:
        script = Path(tempfile.mkstemp(prefix="qtrace-gdb-", suffix=".gdb")[1])
        lines = ["set pagination off", "set confirm off", "set debuginfod enabled off"]
        lines += [f"break {s}" for s in self.syms]
        lines += [f"commands 1-{len(self.syms)}", "silent", "continue", "end", "continue"]
        script.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(["gdb", "-nx", "-batch", "-p", str(pid), "-x", str(script)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "DEBUGINFOD_URLS": ""})
        # attached when the process stopped (t) and then runs again
        state = lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # noqa: E731
        deadline = time.monotonic() + 60
        while state() != "t":
            if time.monotonic() > deadline:
                raise RuntimeError("gdb did not attach")
            time.sleep(0.01)
        while state() == "t":
            if time.monotonic() > deadline:
                raise RuntimeError("gdb did not continue")
            time.sleep(0.01)
        time.sleep(0.2)

    def detach(self) -> None:
        self.proc.wait(60)


def run_workload(exe: str, n: int, tracer: Tracer, cpu: int | None = None,
                 before_detach=None) -> list[float]:
    """Start the workload, let the tracer attach, time it; ns per call for each column.
    before_detach(): called once the workload is done, the tracer still attached."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    p = subprocess.Popen([*pin, exe, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdin is not None
    ready = p.stdout.readline().split()
    if not ready or ready[0] != "ready":
        p.kill()
        raise RuntimeError(f"{exe}: did not start ({ready})")
    try:
        tracer.attach(p.pid, exe)
        p.stdin.write("g")
        p.stdin.close()
        out = p.stdout.readline()
        p.wait(600)
        if before_detach is not None:
            before_detach()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    tracer.detach()
    return [float(x) for x in out.split()]


def bpf_progs() -> dict[int, tuple[int, int]]:
    """Every loaded BPF program: id -> (run_time_ns, run_cnt) (kernel.bpf_stats_enabled)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out.stdout or "[]")}


def per_run_ns(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               ids: set[int], min_runs: int) -> float:
    """Sum over these programs of their mean run time per run between the two snapshots:
    the BPF time one event costs when each program runs once per event.  Programs that ran
    fewer than min_runs times (a process-exit hook) are not per-event ones."""
    total = 0.0
    for i in ids:
        t0, c0 = before.get(i, (0, 0))
        t1, c1 = after.get(i, (0, 0))
        if c1 - c0 >= min_runs:
            total += (t1 - t0) / (c1 - c0)
    return total
