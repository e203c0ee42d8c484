"""The systemd unit, the shipped config, and the alert rules, checked by their own tools."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import ROOT, require

from qtrace_bpf.config import DEFAULT_PORT, load_config
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


def test_every_alert_has_a_runbook_section_in_the_readme():
    """runbook_url anchors name README headings (GitHub's slugs: lower case, no spaces)."""
    import re

    import yaml

    rules = yaml.safe_load((PROM / "qtrace-alerts.yml").read_text())
    urls = {r["alert"]: r.get("annotations", {}).get("runbook_url")
            for g in rules["groups"] for r in g["rules"] if "alert" in r}
    exporter = [g for g in rules["groups"] if g["name"] == "qtrace-exporter"][0]
    assert {"QtraceDown", "QtraceNotReady", "QtraceMapFull", "QtraceAttachErrors",
            "QtraceCountingGap"} <= {r["alert"] for r in exporter["rules"]}
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M)}
    needs = {r["alert"] for r in exporter["rules"]} | {"QemuVmUnexpectedStateWrite",
                                                       "QemuVmTscFrequencyChanged"}
    for alert, url in urls.items():
        if alert in needs or url:
            assert url and url.startswith("README.md#"), alert
            assert url.split("#", 1)[1] in slugs, (alert, url)
