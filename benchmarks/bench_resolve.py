"""Symbol resolution cost on a real QEMU binary, side by side in one run.

    .venv/bin/python benchmarks/bench_resolve.py [BINARY] [--runs N]

Prints a table (median and max of N runs, each in a fresh interpreter for "cold"):
cold resolve of the whole catalog, a build-id cache hit, and reading the build-id alone.
A benchmark, not a test: numbers vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COLD = """
import time, sys
from qtrace_bpf import elfsym
from qtrace_bpf.catalog import load_catalog
names = [f for p in load_catalog().probes for f in p.functions]
t = time.perf_counter()
elfsym.resolve(sys.argv[1], names, inline_names=names)
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from qtrace_bpf import elfsym
    from qtrace_bpf.catalog import load_catalog

    names = [f for p in load_catalog().probes for f in p.functions]
    cold = [float(subprocess.run([sys.executable, "-c", COLD, args.binary], check=True,
                                 capture_output=True, text=True).stdout)
            for _ in range(args.runs)]
    elfsym.resolve_cached(args.binary, names, inline_names=names)
    hit, bid = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        elfsym.resolve_cached(args.binary, names, inline_names=names)
        hit.append(time.perf_counter() - t)
        t = time.perf_counter()
        elfsym.read_build_id(args.binary)
        bid.append(time.perf_counter() - t)
    print(f"binary: {args.binary}  runs: {args.runs}")
    print(f"{'measure':<36}{'median ms':>12}{'max ms':>12}")
    for label, xs in (("cold resolve (catalog, fresh process)", cold),
                      ("cached resolve (build-id hit)", hit), ("build-id read only", bid)):
        print(f"{label:<36}{statistics.median(xs) * 1e3:>12.1f}{max(xs) * 1e3:>12.1f}")


if __name__ == "__main__":
    main()
