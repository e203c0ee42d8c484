"""The systemd unit, the shipped config, and the alert rules, checked by their own tools."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from support import QPROBE, ROOT
from support.caps import require

from qtrace_bpf.commands.config import DEFAULT_PORT, load_config
from qtrace_bpf.errors import QtraceError

UNIT = ROOT / "systemd" / "qtrace.service"
PROM = ROOT / "exporters" / "prometheus"


@pytest.fixture
def rendered_unit(tmp_path):
    d = tmp_path / "units"
    d.mkdir()
    qprobe = ROOT / ".venv" / "bin" / "qprobe"
    exe = qprobe if qprobe.exists() else shutil.which("qprobe")
    require("an installed qprobe", exe is not None, "run scripts/setup.sh")
    unit = d / "qtrace.service"
    # as packaged it runs /usr/bin/qprobe; a checkout's is its venv's
    unit.write_text(UNIT.read_text().replace("/usr/bin/qprobe", str(exe)))
    return unit


def test_systemd_analyze_verify(rendered_unit):
    sa = shutil.which("systemd-analyze")
    require("systemd-analyze", sa is not None, "apt-get install systemd")
    # --man=no: Documentation='s pages come with the package (test_systemd checks them
    # where it is installed), not with this checkout
    r = subprocess.run([sa, "verify", "--man=no", str(rendered_unit)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_systemd_security_exposure(rendered_unit):
    sa = shutil.which("systemd-analyze")
    require("systemd-analyze", sa is not None, "apt-get install systemd")
    r = subprocess.run([sa, "security", "--offline=yes", str(rendered_unit)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for qtrace.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout  # the README shows the figure


def test_least_capabilities():
    text = UNIT.read_text()
    caps = set(re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M).group(1).split())
    assert caps == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    ambient = set(re.search(r"^AmbientCapabilities=(.*)$", text, re.M).group(1).split())
    assert ambient == caps
    for setting in ("User=qtrace", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "NoNewPrivileges=yes", "MemoryMax=", "CPUQuota=", "Restart=on-failure",
                    "Type=notify"):
        assert setting in text, setting


def test_shipped_config_is_the_default():
    cfg = load_config(str(ROOT / "systemd" / "qtrace.toml"))
    assert cfg == load_config(None)
    assert not 9100 <= DEFAULT_PORT <= 9999
    assert cfg.host_port == ("0.0.0.0", DEFAULT_PORT)


def test_flags_override_config(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('listen = "127.0.0.1:1234"\ngrace_period = 5\n')
    cfg = load_config(str(f), listen="[::1]:99", log_level=None)
    assert cfg.host_port == ("::1", 99) and cfg.grace_period == 5
    assert load_config(str(f), listen=":99").host_port == ("::", 99)  # v4 and v6
    with pytest.raises(QtraceError, match="go together"):
        f.write_text('[tls]\ncert_file = "a"\n')
        load_config(str(f))
    with pytest.raises(QtraceError, match="not valid TOML"):
        f.write_text("listen = \n")
        load_config(str(f))


@pytest.mark.parametrize("where,message", [
    ("/nonexistent-proc", "no such directory"),
    ("/sys", "not a proc filesystem (sysfs)"),
    ("TMP", "not a proc filesystem (not a mount point)"),
])
def test_a_proc_root_that_is_no_proc_is_one_clear_line(tmp_path, where, message):
    """--path.procfs names the host's /proc mounted into a container: anything else is
    refused before a pid is read (a wrong one would name every VM after the wrong process)."""
    where = str(tmp_path) if where == "TMP" else where
    with pytest.raises(QtraceError, match=re.escape(message)):
        load_config(None, proc_root=where)
    r = subprocess.run([*QPROBE, "daemon", "--check-config", f"--path.procfs={where}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"qprobe: config error: config: proc_root = {where!r}: {message}" +
        ("" if message == "no such directory" else
         ": mount the host's /proc there (e.g. -v /proc:/host/proc:ro) or leave it at /proc")]
    assert load_config(None, proc_root="/proc/").proc_root == "/proc/"


def test_promtool_check_and_unit_tests():
    promtool = shutil.which("promtool")
    require("promtool", promtool is not None, "apt-get install prometheus")
    r = subprocess.run([promtool, "check", "rules", "qtrace-alerts.yml"], cwd=PROM,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "qtrace-alerts.test.yml"], cwd=PROM,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "qtrace-alerts.test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROM / "qtrace-alerts.yml").read_text()))
    assert defined == tested  # every alert has unit tests


RUNBOOKS = "file:///usr/share/doc/qtrace/runbooks.md"


def test_every_alert_opens_its_runbook_where_the_package_installs_it():
    """runbook_url = the installed runbooks + a heading's anchor (GitHub's slugs); the
    package test checks that the file is installed, uncompressed."""
    import yaml

    rules = yaml.safe_load((PROM / "qtrace-alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in
             re.findall(r"^#+ (.+)$", (ROOT / "docs" / "runbooks.md").read_text(), re.M)}
    assert len(alerts) >= 10
    for rule in alerts:
        url = rule.get("annotations", {}).get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == RUNBOOKS and anchor in slugs, (rule["alert"], url)
    assert "docs/runbooks.md usr/share/doc/qtrace/" in \
        (ROOT / "debian" / "qtrace.install").read_text()


def test_the_scrape_job_is_named_in_one_place_and_the_example_config_checks(tmp_path):
    """Renaming the job means one rule (qtrace:up) and the scrape config's job_name."""
    import yaml

    text = (PROM / "qtrace-alerts.yml").read_text()
    code = "\n".join(ln.split("#")[0] for ln in text.splitlines())
    assert re.findall(r"\bjob\s*=~?", code) == ["job="], "one job selector, in qtrace:up"
    job = re.search(r'up\{job="([^"]+)"\}', code).group(1)
    example = yaml.safe_load((PROM / "prometheus.example.yml").read_text())
    assert [j["job_name"] for j in example["scrape_configs"]] == [job]
    promtool = shutil.which("promtool")
    require("promtool", promtool is not None, "apt-get install prometheus")
    shutil.copy(PROM / "prometheus.example.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROM / "qtrace-alerts.yml", tmp_path)
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 1 rule files found" in r.stdout + r.stderr, \
        r.stdout + r.stderr
