"""Symbol resolution of the whole catalog: full DWARF, and a stripped binary through debuginfod."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from benchmarks.harness import HERE, Ctx, Table
from benchmarks.sections.uprobes import binary_name, qemu_binaries


def resolution(ctx: Ctx) -> Table:
    t = Table("Symbol resolution of the whole catalog (a fresh interpreter each)",
              ("cold wall s", "cached wall s", "peak RSS MB"), "")
    for binary in qemu_binaries():
        name = binary_name(binary)
        for _ in range(ctx.reps):
            out = subprocess.run([sys.executable, "-m", "benchmarks.resolve_child", binary],
                                 check=True, capture_output=True, text=True,
                                 cwd=HERE.parent).stdout
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
                [sys.executable, "-m", "benchmarks.resolve_child", str(stripped), url, str(cache)],
                check=True, capture_output=True, text=True, cwd=HERE.parent).stdout)
            warm = json.loads(subprocess.run(
                [sys.executable, "-m", "benchmarks.resolve_child", str(stripped), url, str(cache)],
                check=True, capture_output=True, text=True, cwd=HERE.parent).stdout)
            assert cold["dwarf"], "debuginfod sent nothing usable"
            rows.append([cold["cold"], warm["cold"], max(cold["hwm_mb"], warm["hwm_mb"])])
        return rows
    finally:
        server.terminate()
        server.wait(30)
