"""Shared test plumbing: capabilities (skip locally, fail in CI), a qprobe runner, leftovers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QPROBE = [sys.executable, "-m", "qtrace_bpf.cli"]
# .ci/run sets this: there, a missing capability is a failure, never a skip.
REQUIRE = os.environ.get("QTRACE_REQUIRE_CAPS") == "1" or os.environ.get("CI") == "true"
OUR_PROGS = ("qt_entry_", "qt_return_", "tp_enter_ioctl", "tp_exit_ioctl", "kp_kvm_ioctl",
             "kretp_kvm_ioctl", "kfunc__", "kretfunc__")


def require(what: str, ok: bool, how: str) -> None:
    if ok:
        return
    msg = f"needs {what}: {how}"
    if REQUIRE:
        pytest.fail(f"{msg} (QTRACE_REQUIRE_CAPS/CI set: capabilities must be present)")
    pytest.skip(msg)


def _bcc_importable() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


def check_bpf() -> None:
    require("root", os.geteuid() == 0, "run the tests as root")
    require("BCC", _bcc_importable(), "apt-get install python3-bpfcc; use scripts/setup.sh")
    build = f"/lib/modules/{os.uname().release}/build"
    require("kernel headers", os.path.exists(build), f"{build} (scripts/setup.sh links them)")
    require("tracefs with uprobes", os.path.exists("/sys/kernel/tracing/uprobe_events"),
            "mount -t tracefs nodev /sys/kernel/tracing")


def check_kvm() -> None:
    check_bpf()
    require("/dev/kvm", os.access("/dev/kvm", os.R_OK | os.W_OK), "a host with KVM")
    require("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None,
            "apt-get install qemu-system-x86")
    require("SeaBIOS", os.path.exists("/usr/share/seabios/bios-256k.bin"),
            "apt-get install seabios")


@pytest.fixture
def bpf_caps() -> None:
    check_bpf()


@pytest.fixture
def kvm_caps() -> None:
    check_kvm()


@pytest.fixture
def gcc() -> str:
    path = shutil.which("gcc")
    require("gcc", path is not None, "apt-get install gcc")
    return path  # type: ignore[return-value]


def leftovers() -> list[str]:
    """Anything of ours still attached: uprobe events, BPF programs, perf links."""
    found = []
    try:
        with open("/sys/kernel/tracing/uprobe_events") as f:
            found += [ln.strip() for ln in f if "qtrace" in ln]
    except OSError:
        pass
    if shutil.which("bpftool"):
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            for prog in json.loads(out.stdout):
                if str(prog.get("name", "")).startswith(OUR_PROGS):
                    found.append(f"bpf prog {prog.get('id')} {prog.get('name')}")
    return found


def wait_no_leftovers(timeout: float = 5.0) -> list[str]:
    """Programs go when their last fd closes; give the kernel a moment."""
    deadline = time.monotonic() + timeout
    left = leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers()
    return left


class Watcher:
    """`qprobe watch PID --json` in the background, attached before it returns."""

    def __init__(self, pid: int, *args: str, timeout: float = 60.0):
        self.proc = subprocess.Popen([*QPROBE, "watch", str(pid), "--json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
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
