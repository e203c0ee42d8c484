"""The daemon's own weight, side by side with an earlier qtrace in one run.

    .venv/bin/python benchmarks/bench_daemon.py [--runs N] [--vms N] [--baseline REV]

For this checkout and for REV (default: the commit before the loader, a099e9b; checked out
in a temp worktree with its own venv), N times each, in alternating order:
  - start-up, cold (no pins): exec to the first /metrics answer, and to ready (qtrace_ready 1)
  - RSS when ready with no VM, then with --vms paused QEMU/KVM VMs tracked
  - start-up, warm (a restart with the pins the first run kept)
  - whether LLVM, clang or libbcc are mapped in the long-lived process
Each cell: median (min-max).  Needs root, KVM, BPF.  A benchmark, not a test: numbers vary
with the machine and its load; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
COMPILER_LIBS = ("libLLVM", "libclang", "libbcc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return kb / 1024


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return -1.0  # answered, without that metric yet
    except OSError:
        return None


class Daemon:
    def __init__(self, python: str, cwd: Path, port: int, pin_root: str, keep: bool):
        self.tmp = tempfile.mkdtemp(prefix="qtrace-bench-")  # removed by stop()
        cfg = Path(self.tmp) / "q.toml"
        cfg.write_text(f'listen = "127.0.0.1:{port}"\nbpf_pin_root = "{pin_root}"\n'
                       f"keep_on_exit = {'true' if keep else 'false'}\nrescan_interval = 2\n")
        self.port = port
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([python, "-m", "qtrace_bpf.cli", "daemon", "--config",
                                      str(cfg)], cwd=cwd, stderr=subprocess.DEVNULL)
        self.first = self.ready = float("nan")
        deadline = self.t0 + 120
        while time.monotonic() < deadline:
            v = metric(port, "qtrace_ready")
            now = time.monotonic() - self.t0
            if v is not None and self.first != self.first:
                self.first = now
            if v == 1.0:
                self.ready = now
                return
            time.sleep(0.01)
        raise SystemExit("daemon did not become ready")

    def wait_vms(self, n: int) -> None:
        deadline = time.monotonic() + 120
        while metric(self.port, "qtrace_tracked_vms") != float(n):
            if time.monotonic() > deadline:
                raise SystemExit(f"daemon did not track {n} VMs")
            time.sleep(0.3)

    def compilers(self) -> str:
        text = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return ",".join(lib for lib in COMPILER_LIBS if lib in text) or "none"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_vms(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([QEMU, "-accel", "kvm", "-machine", "q35", "-m", "64", "-S",
                              "-display", "none", "-nodefaults", "-name", f"guest=bench-{i}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(n)]


def baseline_python(rev: str) -> tuple[str, Path]:
    tree = Path(tempfile.gettempdir()) / f"qtrace-bench-{rev}"
    if not (tree / ".venv" / "bin" / "python").exists():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), rev],
                       cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        str(tree / ".venv")], check=True)
        subprocess.run([str(tree / ".venv/bin/pip"), "install", "-q",
                        "--disable-pip-version-check", "-e", str(tree)], check=True)
    return str(tree / ".venv" / "bin" / "python"), tree


def measure(python: str, cwd: Path, vms: int) -> dict[str, float | str]:
    port = free_port()
    pin_root = f"/sys/fs/bpf/qtrace-bench-{port}"
    d = Daemon(python, cwd, port, pin_root, keep=True)
    out: dict[str, float | str] = {"cold first scrape (s)": d.first, "cold ready (s)": d.ready}
    time.sleep(3)
    out["RSS, 0 VMs (MB)"] = rss_mb(d.proc.pid)
    procs = start_vms(vms)
    try:
        d.wait_vms(vms)
        time.sleep(3)
        out[f"RSS, {vms} VMs (MB)"] = rss_mb(d.proc.pid)
        out["compiler mapped"] = d.compilers()
        d.stop()
        warm = Daemon(python, cwd, port, pin_root, keep=False)
        out["warm first scrape (s)"] = warm.first
        out["warm ready (s)"] = warm.ready
        warm.wait_vms(vms)
        warm.stop()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if d.proc.poll() is None:
            d.stop()
        shutil.rmtree(pin_root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--baseline", default="a099e9b", help="git revision to compare with")
    args = ap.parse_args()
    configs = {"this checkout": (sys.executable, ROOT)}
    if args.baseline:
        configs[f"before ({args.baseline})"] = baseline_python(args.baseline)
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for i in range(args.runs):
        for name in (list(configs) if i % 2 == 0 else list(configs)[::-1]):
            results[name].append(measure(*configs[name], args.vms))
    rows = list(next(iter(results.values()))[0])
    print(f"daemon footprint, {args.runs} runs each, {args.vms} paused VMs, kernel "
          f"{os.uname().release}: median (min-max)")
    print(f"{'':<26}" + "".join(f"{name:>26}" for name in configs))
    for row in rows:
        cells = []
        for name in configs:
            vals = [r[row] for r in results[name]]
            if isinstance(vals[0], str):
                cells.append(f"{'/'.join(sorted(set(vals))):>26}")
            else:
                cells.append(f"{statistics.median(vals):>12.2f} ({min(vals):.2f}-{max(vals):.2f})"
                             .rjust(26))
        print(f"{row:<26}" + "".join(cells))


if __name__ == "__main__":
    main()
