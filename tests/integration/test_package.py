"""The Debian package as lintian and an operator see it: clean, one identity, only what runs
on a host, and a qprobe that offers nothing it cannot do there."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from support import ROOT
from support.caps import require

pytestmark = [pytest.mark.root]  # the build installs its dependencies with apt
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def deb_files(deb: Path) -> set[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    return {ln.split()[-1].lstrip(".") for ln in out.splitlines() if not ln.endswith("/")}


def test_lintian_reports_no_error_and_no_warning(built_deb):
    lintian = shutil.which("lintian")
    require("lintian", lintian is not None, "apt-get install lintian (scripts/setup.sh)")
    changes = sorted(built_deb.parent.glob("qtrace_*.changes"))
    assert changes, "build-deb.sh keeps the .changes"
    r = subprocess.run([lintian, "-EvIL", "+pedantic", "--tag-display-limit", "0",
                        str(changes[-1])], capture_output=True, text=True, timeout=600)
    tags = [ln for ln in r.stdout.splitlines() if re.match(r"[A-Z]: ", ln)]
    bad = [t for t in tags if t.startswith(("E: ", "W: "))]
    assert not bad, "\n".join(bad)
    assert "N: Processing" in r.stdout or "qtrace" in r.stdout + r.stderr, r.stderr


def test_the_package_ships_what_runs_on_a_host_and_nothing_else(built_deb):
    files = deb_files(built_deb)
    site = "/usr/lib/python3/dist-packages/qtrace_bpf"
    assert f"{site}/commands/watch.py" in files  # the paths below are the package's own
    for absent in (f"{site}/commands/demo.py", f"{site}/commands/demo_vm.py",
                   f"{site}/probes/bench_floor.bpf.c", "/usr/share/man/man1/qprobe-demo.1.gz"):
        assert absent not in files, absent
    assert not [f for f in files if f.startswith(f"{site}/exporters/") and
                not f.endswith(".py")], "rules and dashboard live in /usr/share/qtrace only"
    assert not [f for f in files if ".test." in f], "promtool's test file is not for hosts"
    for present in ("/usr/share/qtrace/prometheus/qtrace-alerts.yml",
                    "/usr/share/qtrace/grafana/qtrace-dashboard.json",
                    "/usr/share/doc/qtrace/runbooks.md",  # uncompressed: runbook_url opens it
                    "/usr/share/doc/qtrace/examples/prometheus.example.yml",
                    "/usr/share/doc/qtrace/examples/web-config.example.yml",
                    f"{site}/probes/qtrace.bpf.c", "/usr/share/man/man5/qtrace.toml.5.gz"):
        assert present in files, present
    unit = (ROOT / "debian" / "qtrace.service").read_text()
    for page, sec in re.findall(r"man:([\w.-]+)\((\d)\)", unit):
        assert f"/usr/share/man/man{sec}/{page}.{sec}.gz" in files, page
    for path in re.findall(r"file://(\S+)", unit):
        assert path in files, path


def test_the_packaged_qprobe_offers_no_demo(built_deb, tmp_path):
    """Its QMP client is not in Debian: no command that could only fail there."""
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(tmp_path)], check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "usr/lib/python3/dist-packages")}
    # Debian's python as on a host (not the venv, whose editable install maps this tree)
    cmd = ["/usr/bin/python3", "-P", "-m", "qtrace_bpf.cli"]
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    commands = helped.stdout.split("Commands:")[1]
    assert "watch" in commands and "demo" not in commands
    demo = subprocess.run([*cmd, "demo"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert demo.returncode == 2 and "No such command 'demo'" in demo.stderr
    assert "Traceback" not in demo.stderr


def test_what_the_host_reads_names_host_paths_not_the_source_trees(built_deb, tmp_path):
    """Man pages, the config, the unit and the examples point where the package puts things."""
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(tmp_path)], check=True)
    texts = [p for p in tmp_path.rglob("*") if p.is_file() and "dist-packages" not in str(p)
             and p.suffix not in (".json",) and "changelog" not in p.name]
    assert len(texts) > 10
    tree = re.compile(r"(?<![\w/.-])(?:systemd|scripts|exporters|probes|docs)/[\w.-]+")
    for path in texts:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace")
        assert not tree.findall(text), (path.relative_to(tmp_path), tree.findall(text))
