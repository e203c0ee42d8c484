"""Resolve the whole catalog in a fresh interpreter and print what it cost (JSON): the
resolution section runs it once per binary, so each figure starts from an empty cache.

    python -m benchmarks.resolve_child BINARY                    # cold, then cached
    python -m benchmarks.resolve_child BINARY URL CACHE_DIR      # through debuginfod
"""

from __future__ import annotations

import json
import sys
import time

from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.symbols import elfsym
from qtrace_bpf.symbols.debuginfod import Debuginfod


def peak_mb() -> float:
    """VmHWM, not ru_maxrss: a child's ru_maxrss starts from its (large) parent's."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def main(argv: list[str]) -> dict:
    names = load_catalog().functions
    binary = argv[0]
    if len(argv) == 3:  # a stripped binary, its debug file from a debuginfod server
        d = Debuginfod(urls=(argv[1],), cache=argv[2], allow_http=True)
        t = time.perf_counter()
        res = elfsym.resolve(binary, names, inline_names=names, debuginfod=d)
        return {"cold": time.perf_counter() - t, "hwm_mb": peak_mb(), "dwarf": res.dwarf}
    t = time.perf_counter()
    elfsym.resolve_cached(binary, names, inline_names=names)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    elfsym.resolve_cached(binary, names, inline_names=names)
    return {"cold": cold, "cached": time.perf_counter() - t, "hwm_mb": peak_mb()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
