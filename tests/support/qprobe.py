"""qprobe as the integration tests run it: `watch` in the background, a daemon with a
config and a pin root of its own."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from support import QPROBE, ROOT
from support.processes import popen
from support.web import free_port, samples, scrape

PIN_TEST_ROOT = "/sys/fs/bpf"


def daemon_toml(port: int, **extra: object) -> str:
    """A daemon config for tests: its own pin root (removed at exit unless the test keeps
    it on purpose), so no test reads another's pinned counters."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    conf = {"listen": f"127.0.0.1:{port}", "bpf_pin_root": f"{PIN_TEST_ROOT}/qtrace-test-{port}",
            "keep_on_exit": False, **extra}
    return "".join(f"{k} = {value(v)}\n" for k, v in conf.items())


def remove_test_pins() -> None:
    """Pins of test daemons that were killed (SIGKILL keeps pins, by design)."""
    import shutil as _shutil

    if os.path.isdir(PIN_TEST_ROOT):
        for name in os.listdir(PIN_TEST_ROOT):
            if name.startswith("qtrace-test-"):
                _shutil.rmtree(os.path.join(PIN_TEST_ROOT, name), ignore_errors=True)


class Watcher:
    """`qprobe watch PID --json` in the background, attached before it returns."""

    def __init__(self, pid: int | None, *args: str, timeout: float = 60.0):
        """pid None: args name the VM (--vm NAME)."""
        self.proc = popen([*QPROBE, "watch", *([str(pid)] if pid else []), "--json", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._attached = threading.Event()
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err.start()
        self._t_out.start()
        if not self._attached.wait(timeout):
            self.proc.kill()
            raise AssertionError("qprobe did not attach: " + "".join(self.stderr_lines))
        if self.proc.poll() is not None and not self.attached_line:
            raise AssertionError("qprobe exited: " + "".join(self.stderr_lines))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "attached to vm" in line:
                self._attached.set()
        self._attached.set()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)

    @property
    def attached_line(self) -> str:
        return next((ln for ln in self.stderr_lines if "attached to vm" in ln), "")

    def wait(self, timeout: float = 60.0) -> tuple[int, list[dict]]:
        rc = self.proc.wait(timeout)
        self._t_out.join(10)
        self._t_err.join(10)
        return rc, [json.loads(ln) for ln in self.stdout_lines if ln.strip()]

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)


class DaemonProcess:
    """`qprobe daemon --config PATH` started, waited for (msg=tracing: unless wait=False,
    for a test of what it serves before that), its log kept."""

    def __init__(self, config: Path, port: int, *args: str, env: dict | None = None,
                 prefix: tuple[str, ...] = (), wait: bool = True):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pin_root = f"{PIN_TEST_ROOT}/qtrace-test-{port}"
        self.proc = popen([*prefix, *QPROBE, "daemon", "--config", str(config), *args], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log: list[str] = []
        self.tracing = threading.Event()  # the daemon said msg=tracing
        ready = threading.Event()  # ... or it exited

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                # listening comes first, before the BPF load (logfmt or --log.format=json)
                if "msg=tracing" in line or '"msg": "tracing"' in line:
                    self.tracing.set()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if wait and (not ready.wait(90) or self.proc.poll() is not None):
            raise AssertionError("daemon did not start: " + "".join(self.log))

    def metrics(self) -> dict:
        return scrape(self.url)

    def wait_for(self, what, timeout: float = 20.0):
        """Scrape until what(metrics) is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            got = what(m)
            if got:
                return got
            assert time.monotonic() < deadline, (
                f"timed out; VMs: {[lab['vm'] for lab, _ in samples(m, 'qtrace_vm_info')]}; "
                f"tracked processes: {samples(m, 'qtrace_tracked_processes')}; "
                f"non-VM processes: {samples(m, 'qtrace_non_vm_processes_total')}; "
                f"daemon log:\n{''.join(self.log)[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


class HostDaemon(DaemonProcess):
    """qprobe daemon with a config of our own (rescans each second)."""

    def __init__(self, tmp: Path, env: dict | None = None, **cfg: object):
        port = free_port()
        path = tmp / f"qtrace-{port}.toml"
        path.write_text(daemon_toml(port, **{"rescan_interval": 1, "grace_period": 30, **cfg}))
        super().__init__(path, port, env=env)

    @classmethod
    def from_config(cls, path: Path, port: int) -> HostDaemon:
        d = cls.__new__(cls)
        DaemonProcess.__init__(d, path, port)
        return d


def qprobe(*args: str, prefix: list[str] | None = None, timeout: float = 120,
           python: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(prefix or []), *(python or QPROBE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_clean_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("qprobe: error:")]
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
