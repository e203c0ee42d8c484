"""The daemon takes node_exporter's flags: an operator's scripts, Ansible roles and Helm
values written for exporters fit; the older spellings still work, with a deprecation line."""

from __future__ import annotations

import json
import urllib.error

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm, require
from support.processes import popen
from support.qprobe import DaemonProcess, daemon_toml
from support.web import free_port, http_get

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


def test_node_exporter_flags_two_addresses_a_path_and_json_logs(tmp_path):
    check_kvm()
    p1, p2 = free_port(), free_port()
    conf = tmp_path / "qtrace.toml"
    conf.write_text(daemon_toml(p1, keep_on_exit=False))
    d = DaemonProcess(conf, p1, f"--web.listen-address=[::1]:{p1}",
                      f"--web.listen-address=127.0.0.1:{p2}", "--web.telemetry-path=/m",
                      "--log.level=debug", "--log.format=json")
    try:
        for base in (f"http://[::1]:{p1}", f"http://127.0.0.1:{p2}"):
            assert "qtrace_build_info{" in http_get(f"{base}/m")
            assert 'href="m"' in http_get(f"{base}/")
            with pytest.raises(urllib.error.HTTPError) as err:
                http_get(f"{base}/metrics")
            assert err.value.code == 404
        with pytest.raises(OSError):  # the config's own listen gave way to the flags
            http_get(f"http://127.0.0.1:{p1}/m", timeout=2)
    finally:
        assert d.stop() == 0, "".join(d.log)
    records = [json.loads(line) for line in d.log if line.strip()]  # every line is JSON
    assert {r["level"] for r in records} >= {"debug", "info"}, records[:5]
    start = next(r for r in records if r["msg"] == "starting qtrace")
    assert start["revision"] and start["branch"] and start["version"]
    listening = next(r for r in records if r["msg"] == "listening")
    assert listening["listen"] == f"[::1]:{p1},127.0.0.1:{p2}" and listening["path"] == "/m"


def test_the_old_flags_still_work_and_say_so(tmp_path):
    check_kvm()
    port = free_port()
    conf = tmp_path / "qtrace.toml"
    conf.write_text(daemon_toml(free_port(), keep_on_exit=False))
    d = DaemonProcess(conf, port, f"--listen=127.0.0.1:{port}", "--log-level=debug")
    try:
        assert "qtrace_build_info{" in http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        assert d.stop() == 0, "".join(d.log)
    log = "".join(d.log)
    assert "deprecated flag: use --web.listen-address" in log
    assert "deprecated flag: use --log.level" in log and "level=debug" in log


def test_web_systemd_socket_serves_on_the_socket_systemd_passes(tmp_path, nothing_left):
    """Socket activation: systemd-socket-activate listens, execs the daemon at the first
    connection with the socket as fd 3; the daemon binds nothing of its own."""
    import shutil
    import signal
    import subprocess
    import threading

    check_kvm()
    activate = shutil.which("systemd-socket-activate")
    require("systemd-socket-activate", activate is not None, "apt-get install systemd")
    port, own = free_port(), free_port()
    conf = tmp_path / "qtrace.toml"
    conf.write_text(daemon_toml(own, keep_on_exit=False))
    proc = popen([activate, "-l", f"127.0.0.1:{port}", *QPROBE, "daemon", "--config",
                  str(conf), "--web.systemd-socket"], cwd=ROOT, stderr=subprocess.PIPE,
                 text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        import time

        deadline = time.monotonic() + 30  # systemd-socket-activate says when it listens
        while not any("Listening on" in line for line in log):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
            time.sleep(0.05)
        # the first connection waits in the socket's backlog while the daemon starts
        assert "qtrace_build_info{" in http_get(f"http://127.0.0.1:{port}/metrics", timeout=90)
        with pytest.raises(OSError):  # the config's own listen address is not bound
            http_get(f"http://127.0.0.1:{own}/metrics", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.join(10)
    text = "".join(log)
    assert rc == 0, text
    assert f"msg=listening listen=systemd:127.0.0.1:{port} " in text, text


def test_web_systemd_socket_without_a_socket_is_a_clear_error(tmp_path):
    import subprocess

    conf = tmp_path / "qtrace.toml"
    conf.write_text(daemon_toml(free_port(), keep_on_exit=False))
    r = subprocess.run([*QPROBE, "daemon", "--config", str(conf), "--web.systemd-socket"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "systemd passed no socket" in r.stderr, r.stderr


def test_version_says_revision_branch_date_and_runtime():
    """prometheus/common's version.Print layout: what an operator pastes into a report."""
    import platform
    import subprocess

    from qtrace_bpf import __version__

    out = subprocess.run([*QPROBE, "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60).stdout
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    first, *rest = out.splitlines()
    assert first.startswith(f"qprobe, version {__version__} (branch: ")
    assert f"revision: {rev})" in first, out
    fields = dict(line.strip().split(":", 1) for line in rest)
    assert fields["python version"].strip() == platform.python_version()
    assert fields["build date"].strip()[:8].isdigit(), out
