#!/usr/bin/env python3
"""qtrace side by side with the floor and with what operators use instead, in one run.

    bash scripts/bench.sh            # three runs: BENCHMARKS.md and benchmarks/results.json
    .venv/bin/python -m benchmarks.suite --smoke --out /tmp/b   # tiny N, 1 repetition

Sections (each a table; the method is in harness.py), one module each under sections/: the
KVM ioctl path of a traced process and bystanders, the uprobe path, a real VM, a reset's
breakdown, the daemon, symbol resolution, placement.  Needs root, BCC, /dev/kvm, bpftrace,
strace, gdb (and perf, if `perf trace` runs here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import HERE, Ctx, Table
from benchmarks.sections import daemon, ioctl, placement, reset, resolution, uprobes, vm

SECTIONS = {"ioctl": ioctl.ioctl_path, "bystanders": ioctl.bystanders,
            "uprobes": uprobes.uprobe_path, "vm": vm.real_vm, "reset": reset.reset_breakdown,
            "daemon": daemon.daemon_costs, "resolution": resolution.resolution,
            "placement": placement.placement}


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
    from benchmarks.report import render_report

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
    tables: list[tuple[str, Table]] = []
    for name, fn in SECTIONS.items():
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
