"""Shared test plumbing: capabilities (skip locally, fail in CI), a qprobe runner, leftovers."""

from __future__ import annotations

import glob
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
# The Debian-kernel tier (tests/test_debian_hosts.py: guests booted under TCG, ~12 min a
# release) is collected when asked for: scripts/test.sh (so CI) asks, a bare pytest not.
collect_ignore = [] if os.environ.get("QTRACE_DEBIAN_VM") == "1" else ["test_debian_hosts.py"]
# .ci/run sets this: there, a missing capability is a failure, never a skip.
REQUIRE = os.environ.get("QTRACE_REQUIRE_CAPS") == "1" or os.environ.get("CI") == "true"

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


def host_tsc_khz() -> int:
    """The host's TSC kHz (KVM_GET_TSC_KHZ on a scratch vCPU): no TSC scaling in nested KVM,
    so a VM can only be given this frequency."""
    import fcntl

    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU
        khz = fcntl.ioctl(vcpu, 0xAEA3, 0)  # KVM_GET_TSC_KHZ
        os.close(vcpu)
        os.close(vm)
        return khz
    finally:
        os.close(kvm)


def upstream_qemu() -> str | None:
    """The upstream QEMU that scripts/build-qemu.sh built and cached (test.sh exports it)."""
    path = os.environ.get("QTRACE_UPSTREAM_QEMU")
    if path:
        return path if os.access(path, os.X_OK) else None
    found = sorted(p for p in glob.glob("/var/cache/qtrace/qemu/*/bin/qemu-system-x86_64")
                   if "-dtrace/" not in p)
    return found[-1] if found else None


def dtrace_qemu() -> str | None:
    """The upstream QEMU built with --enable-trace-backends=dtrace (USDT probes)."""
    found = sorted(glob.glob("/var/cache/qtrace/qemu/*-dtrace/bin/qemu-system-x86_64"))
    return found[-1] if found else None


# The QEMU versions every scenario runs on: Debian's (stripped, .dynsym only) and an
# upstream build with full DWARF.  Adding one: a build in scripts/build-qemu.sh, a line here.
QEMU_BUILDS = ("debian-7.2", "upstream-10.0")


@pytest.fixture(scope="session")
def built_deb() -> Path:
    """The .deb (and its .changes, source package) built from this tree, once a session."""
    r = subprocess.run(["bash", "scripts/build-deb.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return ROOT / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module", params=QEMU_BUILDS)
def qemu(request) -> str | None:
    """Which qemu-system-x86_64 a scenario runs (None: the one on PATH, Debian's)."""
    check_kvm()
    if request.param == "debian-7.2":
        return None
    path = upstream_qemu()
    require("upstream QEMU 10.0", path is not None,
            "bash scripts/build-qemu.sh (builds Debian trixie's QEMU source, ~3 min)")
    return path


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


def _bpftool(*what: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", *what], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)


def bpf_state() -> dict[str, set]:
    """What the kernel holds of BPF now, by id: programs, maps, links, perf-event
    attachments (BCC's uprobes and tracepoints are perf events: `bpftool perf`), uprobe
    events in tracefs, and pins under /sys/fs/bpf."""
    require("bpftool", shutil.which("bpftool") is not None, "apt-get install bpftool")
    state = {
        "progs": {(p["id"], p.get("name", "")) for p in _bpftool("prog", "show")},
        "maps": {(m["id"], m.get("name", "")) for m in _bpftool("map", "show")},
        "links": {(lk["id"], lk.get("type", "")) for lk in _bpftool("link", "show")},
        "perf": {(e.get("pid"), e.get("fd"), e.get("prog_id"))
                 for e in _bpftool("perf", "show")},
        "uprobe_events": set(),
        "pins": set(),
    }
    try:
        with open("/sys/kernel/tracing/uprobe_events") as f:
            state["uprobe_events"] = {ln.strip() for ln in f if ln.strip()}
    except OSError:
        pass
    for dirpath, _dirs, files in os.walk("/sys/fs/bpf"):
        state["pins"] |= {os.path.join(dirpath, f) for f in files}
    return state


def added(before: dict[str, set], after: dict[str, set]) -> dict[str, set]:
    """What `after` holds that `before` did not (empty dict: nothing)."""
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


def wait_settled(before: dict[str, set], timeout: float = 10.0) -> dict[str, set]:
    """Programs and maps go when their last fd closes: give the kernel a moment."""
    deadline = time.monotonic() + timeout
    left = added(before, bpf_state())
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = added(before, bpf_state())
    return left


@pytest.fixture
def nothing_left():
    """The test must leave the kernel's BPF state as it found it."""
    before = bpf_state()
    yield
    assert wait_settled(before) == {}, "left behind"


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (a timeout, a kill)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def popen(argv: list[str], **kw) -> subprocess.Popen:
    """Popen for helpers (qprobe, prometheus): never outlives the test run."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)


def kill_stray_test_processes() -> list[str]:
    """QEMUs of earlier runs (their QMP socket sits in a qtrace-vm-* temp dir: under strace,
    killing the wrapper leaves QEMU running) and qprobe processes of this checkout."""
    import signal

    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        # QEMUs of our VM helper (QMP socket in a qtrace-vm-* dir) or run from a test's
        # own copy of the binary (a pytest tmp dir)
        stray_vm = "qemu-system" in text and ("qtrace-vm-" in text or
                                              text.startswith("/tmp/pytest-of-"))
        stray_qprobe = "qtrace_bpf.cli" in text and ("daemon" in text or "watch" in text)
        if stray_vm or stray_qprobe:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(text[:120])
            except OSError:
                pass
    return killed


def pytest_sessionstart(session) -> None:
    for what in kill_stray_test_processes():
        print(f"conftest: killed a stray process of an earlier run: {what}", file=sys.stderr)
    remove_test_pins()


def pytest_sessionfinish(session, exitstatus) -> None:
    kill_stray_test_processes()
    remove_test_pins()


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


def kvm_numbers(gcc: str, names) -> dict[int, str]:
    """ioctl number -> name, as the compiler reads <linux/kvm.h> (for oracles that log
    numbers, e.g. QEMU's kvm_vcpu_ioctl trace event; independent of qtrace's tables)."""
    import tempfile

    lines = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for n in sorted(names):
        lines += [f"#ifdef {n}", f'printf("{n} %lu\\n", (unsigned long)({n}));', "#endif"]
    lines += ["return 0; }"]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "k.c", Path(tmp) / "k"
        src.write_text("\n".join(lines) + "\n")
        subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {int(v): n for n, v in (ln.split() for ln in out.splitlines())}


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


# -- a daemon under test, and what it serves ----------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read().decode()


def scrape(url: str) -> dict[str, list]:
    """family name -> samples (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(http_get(url)):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def samples(metrics: dict, name: str, **labels: str) -> list[tuple[dict, float]]:
    fam = name.removesuffix("_total")
    for suffix in ("_bucket", "_count", "_sum"):  # a histogram's samples
        if fam not in metrics and fam.endswith(suffix):
            fam = fam.removesuffix(suffix)
    return [(lab, val) for n, lab, val in metrics.get(fam, [])
            if n == name and all(lab.get(k) == v for k, v in labels.items())]


def make_cert(tmp: Path, name: str = "srv", cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and ::1: (cert, key)."""
    require("openssl", shutil.which("openssl") is not None, "apt-get install openssl")
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1,IP:::1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


class DaemonProcess:
    """`qprobe daemon --config PATH` started, waited for (msg=tracing), its log kept."""

    def __init__(self, config: Path, port: int, *args: str, env: dict | None = None,
                 prefix: tuple[str, ...] = ()):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pin_root = f"{PIN_TEST_ROOT}/qtrace-test-{port}"
        self.proc = popen([*prefix, *QPROBE, "daemon", "--config", str(config), *args], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                # listening comes first, before the BPF load (logfmt or --log.format=json)
                if "msg=tracing" in line or '"msg": "tracing"' in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(90) or self.proc.poll() is not None:
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


def vcpu_fd(pid: int, vcpu: int = 0) -> int:
    """The fd number of a QEMU's vCPU in its own fd table."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == f"anon_inode:kvm-vcpu:{vcpu}":
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"pid {pid} has no fd for vCPU {vcpu}")


def call_ioctl_inside(pid: int, fd: int, cmd: int, arg: int, tmp: Path) -> int:
    """ioctl(fd, cmd, arg) made by the process itself (its main thread), as gdb's `call`
    makes it (tests/c/inject_ioctl.c says why not gdb itself).  The VM must be paused (QMP
    stop): no vCPU thread may sit in KVM_RUN holding the vCPU.  Returns what ioctl returned."""
    exe = tmp / "inject_ioctl"
    if not exe.exists():
        cc = shutil.which("gcc")
        require("gcc", cc is not None, "apt-get install gcc")
        subprocess.run([str(cc), "-O2", "-Wall", "-Werror", "-o", str(exe),
                        str(ROOT / "tests" / "c" / "inject_ioctl.c")], check=True)
    r = subprocess.run([str(exe), str(pid), str(fd), hex(cmd), str(arg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)
