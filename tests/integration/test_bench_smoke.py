"""The benchmark suite runs end to end (tiny N, one repetition): every section produces its
table, the report and the raw results agree.  Numbers are not checked: a benchmark, not a
timed test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT
from support.caps import check_kvm, require

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


def test_bench_smoke(tmp_path):
    check_kvm()
    import shutil

    for tool in ("bpftrace", "strace", "gdb"):
        require(tool, shutil.which(tool) is not None, f"apt-get install {tool}")
    r = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    results = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    sections = {t["section"] for t in results["tables"]}
    assert sections == {"ioctl", "bystanders", "uprobes", "vm", "reset", "daemon",
                        "resolution", "placement"}
    for t in results["tables"]:
        assert f"### {t['title']}" in report
    ioctl = next(t for t in results["tables"] if t["section"] == "ioctl")
    assert {"untraced", "floor (empty BPF)", "qtrace daemon", "qtrace watch", "bpftrace",
            "strace -f -e trace=ioctl"} <= set(ioctl["rows"])
    assert results["meta"]["kernel_hook"] in ("fentry", "kprobe", "tracepoint")
    assert "## Headline" in report and "x floor" not in report
