"""Symbol resolution cost on real QEMU binaries, side by side in one run.

    .venv/bin/python benchmarks/bench_resolve.py [BINARY ...] [--runs N] [--no-baseline]

Default binaries: Debian's /usr/bin/qemu-system-x86_64 (stripped) and the upstream build
of scripts/build-qemu.sh (full DWARF) when it is cached.  Each measure runs in a fresh
interpreter: wall time of a cold resolution of the whole catalog (inlined instances
included) and the process's peak RSS.  "baseline" is what qtrace did before: pyelftools
walking every DIE of every compile unit (one run: it takes ~30 s).  Target for the
full-DWARF binary: <= 2 s and <= 200 MB.  A benchmark, not a test: numbers vary with the
machine and its load.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys

COLD = """
import json, resource, sys, time
from qtrace_bpf import elfsym
from qtrace_bpf.contract.catalog import load_catalog
names = load_catalog().functions
t = time.perf_counter()
res = elfsym.resolve(sys.argv[1], names, inline_names=names)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "inlined": sorted(res.inlined), "found": len(res.found)}))
"""

BASELINE = """
import json, resource, sys, time
from elftools.elf.elffile import ELFFile
from qtrace_bpf.contract.catalog import load_catalog
wanted = set(load_catalog().functions)
t = time.perf_counter()
found = set()
with open(sys.argv[1], "rb") as f:
    dwarf = ELFFile(f).get_dwarf_info()
    for cu in dwarf.iter_CUs():
        for die in cu.iter_DIEs():
            if die.tag != "DW_TAG_inlined_subroutine":
                continue
            name = die.get_DIE_from_attribute("DW_AT_abstract_origin").attributes.get("DW_AT_name")
            if name is not None and name.value.decode() in wanted:
                found.add(name.value.decode())
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "inlined": sorted(found), "found": None}))
"""


def run(code: str, binary: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, binary], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def has_dwarf(binary: str) -> bool:
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        return ELFFile(f).get_section_by_name(".debug_info") is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="*")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the 30 s full DIE walk")
    args = ap.parse_args()
    binaries = args.binaries or ["/usr/bin/qemu-system-x86_64",
                                 *sorted(glob.glob("/var/cache/qtrace/qemu/*/bin/qemu-system-x86_64"))]
    print(f"{'binary':<58}{'method':<22}{'wall s (median/max)':>22}{'peak RSS MB':>13}  inlined")
    for binary in binaries:
        rows = [run(COLD, binary) for _ in range(args.runs)]
        walls = [r["wall"] for r in rows]
        print(f"{binary[-57:]:<58}{'qtrace (cold)':<22}"
              f"{statistics.median(walls):>11.2f} /{max(walls):>8.2f}"
              f"{max(r['rss_mb'] for r in rows):>13.0f}  {','.join(rows[0]['inlined']) or '-'}")
        if not args.no_baseline and has_dwarf(binary):
            b = run(BASELINE, binary)
            print(f"{'':<58}{'baseline: every DIE':<22}{b['wall']:>11.2f} /{b['wall']:>8.2f}"
                  f"{b['rss_mb']:>13.0f}  {','.join(b['inlined']) or '-'}")


if __name__ == "__main__":
    main()
