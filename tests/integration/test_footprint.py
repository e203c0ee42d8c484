"""The long-lived daemon holds no compiler and stays inside its limits: a loader process
compiles and pins; the daemon counts from the pins, under any fd limit, quietly."""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support import QPROBE
from support.caps import check_kvm
from support.qprobe import PIN_TEST_ROOT, DaemonProcess, daemon_toml
from support.web import free_port, http_get, samples

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
COMPILER_LIBS = ("libLLVM", "libclang", "libbcc")


def compilers_mapped(pid: int) -> set[str]:
    text = Path(f"/proc/{pid}/maps").read_text()
    return {lib for lib in COMPILER_LIBS if lib in text}


def resets(m: dict, vm: str) -> dict[str, int]:
    return {lab["cause"]: int(v) for lab, v in samples(m, "qtrace_vm_resets_total", vm=vm) if v}


def qmp_resets(vm: DemoQemu) -> Counter:
    return Counter(e["data"]["reason"] for e in vm.collect_events() if e["event"] == "RESET")


def run_and_reset(vm: DemoQemu) -> dict[str, int]:
    """Start the VM, reset it over QMP once: the resets QMP reported (boot's aside)."""
    vm.cmd("cont")
    time.sleep(0.3)
    vm.cmd("system_reset")
    time.sleep(0.5)
    want = dict(qmp_resets(vm))
    want.pop("none", None)
    return want


def start(tmp: Path, port: int, *, prefix: tuple[str, ...] = (), env: dict | None = None,
          **cfg: object) -> DaemonProcess:
    path = tmp / f"qtrace-{port}.toml"
    path.write_text(daemon_toml(port, **{"rescan_interval": 1, **cfg}))
    return DaemonProcess(path, port, prefix=prefix, env=env)


@pytest.mark.parametrize("uprobes", ["multi", "perf"])
def test_uprobes_count_the_same_either_way(tmp_path, uprobes):
    """uprobe_multi links (kernel >= 6.6, what runs here by default) and one perf event per
    uprobe (older kernels): resets equal QMP's, and the links are of the kind asked for."""
    import json
    import subprocess

    check_kvm()
    port = free_port()
    d = start(tmp_path, port, env={"QTRACE_UPROBES": uprobes})
    try:
        with DemoQemu(f"uprobes-{uprobes}") as vm:
            want = run_and_reset(vm)
            d.wait_for(lambda m: resets(m, f"uprobes-{uprobes}") == want and m)
        # this daemon's uprobe links, by their pins (the host may hold others' links: the
        # previous case's, released by the kernel a little after its daemon exited)
        pins = list(Path(PIN_TEST_ROOT, f"qtrace-test-{port}").glob("*/links/u-*"))
        assert pins, "the daemon pinned its uprobe links"
        types = set()
        for pin in pins:
            out = subprocess.run(["bpftool", "-j", "link", "show", "pinned", str(pin)],
                                 capture_output=True, text=True).stdout
            types.add(json.loads(out or "{}").get("type"))
        multi = {"uprobe_multi", 12}  # BPF_LINK_TYPE_UPROBE_MULTI: bpftool 7.1 has no name
        assert types <= multi if uprobes == "multi" else types == {"perf_event"}, types
    finally:
        assert d.stop() == 0, "".join(d.log)


def test_the_daemon_maps_no_compiler_while_it_counts_a_new_vm(tmp_path):
    check_kvm()
    d = start(tmp_path, free_port())
    try:
        assert any("running the BPF loader" in ln for ln in d.log), "".join(d.log)
        with DemoQemu("no-compiler") as vm:
            want = run_and_reset(vm)
            m = d.wait_for(lambda m: resets(m, "no-compiler") == want and m)
            assert samples(m, "qtrace_kvm_state_writes_total", vm="no-compiler")
            assert compilers_mapped(d.proc.pid) == set(), "the daemon maps a compiler"
    finally:
        assert d.stop() == 0, "".join(d.log)


def test_a_restart_with_matching_pins_compiles_nothing(tmp_path):
    check_kvm()
    port = free_port()
    first = start(tmp_path, port, keep_on_exit=True)
    try:
        with DemoQemu("kept") as vm:
            vm.cmd("cont")
            time.sleep(0.3)
            vm.cmd("system_reset")
            first.wait_for(lambda m: resets(m, "kept").get("host-qmp-system-reset") == 1)
            assert first.stop() == 0
            second = start(tmp_path, port, keep_on_exit=False)
            try:
                log = "".join(second.log)
                assert "running the BPF loader" not in log and "program=reused" in log, log
                second.wait_for(lambda m: resets(m, "kept").get("host-qmp-system-reset") == 1)
                vm.cmd("system_reset")  # the pinned program counted on while we restarted
                second.wait_for(lambda m: resets(m, "kept").get("host-qmp-system-reset") == 2)
            finally:
                assert second.stop() == 0, "".join(second.log)
    finally:
        first.stop()


def test_half_requests_under_a_1024_fd_limit_neither_kill_nor_flood(tmp_path):
    """prlimit 1024:1024 and the default max_connections (1024): 1,000 clients that send
    half a request and wait.  The daemon stays up, still answers scrapes (idle ones are
    evicted), caps its connections below the limit, and logs a handful of lines."""
    check_kvm()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port = free_port()
    d = start(tmp_path, port, prefix=("prlimit", "--nofile=1024:1024"))
    clients: list[socket.socket] = []
    try:
        before = len(d.log)
        for _ in range(1000):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: half
            clients.append(c)
        d.proc.send_signal(signal.SIGHUP)  # a /proc rescan while the connections are held
        for _ in range(5):
            m = d.metrics()
            assert samples(m, "qtrace_ready")[0][1] == 1
            time.sleep(0.5)
        cap = samples(m, "qtrace_http_max_connections")[0][1]
        assert 16 <= cap <= 1024 - 128, cap
        assert http_get(f"http://127.0.0.1:{port}/-/healthy").startswith("alive")
        assert d.proc.poll() is None, "".join(d.log)
        noisy = [ln for ln in d.log[before:] if "level=error" in ln or "level=warning" in ln]
        assert len(noisy) <= 20, "".join(noisy[:40])
        assert not [ln for ln in d.log if "Traceback" in ln], "".join(d.log)
    finally:
        for c in clients:
            c.close()
        assert d.stop() == 0, "".join(d.log[-40:])
    start_line = next(ln for ln in d.log if "msg=listening" in ln)
    assert "nofile=1024" in start_line and f"max_connections={int(cap)}" in start_line


def test_a_daemon_that_cannot_pin_still_counts(tmp_path):
    """No bpffs at the pin root: the program is compiled in the daemon itself (said once)."""
    check_kvm()
    port = free_port()
    d = start(tmp_path, port, bpf_pin_root=str(tmp_path / "not-bpffs"))
    try:
        assert any("pinning off" in ln for ln in d.log), "".join(d.log)
        assert os.path.isdir(tmp_path) and compilers_mapped(d.proc.pid)
    finally:
        assert d.stop() == 0, "".join(d.log)


CGROUP_V1 = Path("/sys/fs/cgroup")


class UnitLimits:
    """The unit's TasksMax=32, MemoryMax=512M and CPUQuota=50% as cgroup v1 (these
    machines have no systemd): pids.max, memory.limit_in_bytes, cpu.cfs_quota_us."""

    def __init__(self, name: str):
        self.dirs = {c: CGROUP_V1 / c / name for c in ("pids", "memory", "cpu")}
        for d in self.dirs.values():
            d.mkdir(exist_ok=True)
        (self.dirs["pids"] / "pids.max").write_text("32")
        (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(512 << 20))
        (self.dirs["cpu"] / "cpu.cfs_period_us").write_text("100000")
        (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text("50000")

    def enter(self) -> tuple[str, ...]:
        """A command prefix that runs the daemon inside the three groups."""
        procs = " ".join(str(d / "cgroup.procs") for d in self.dirs.values())
        return ("sh", "-c", f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"', "sh")

    def read(self, controller: str, name: str) -> str:
        return (self.dirs[controller] / name).read_text()

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def test_the_daemon_stays_inside_the_units_limits(tmp_path):
    """1,000 idle connections, 20 scrapers and 70 VMs: no task, memory or fd limit is hit,
    and every scrape answers."""
    import threading
    import urllib.request

    check_kvm()
    if not (CGROUP_V1 / "pids").is_dir():
        pytest.fail("needs cgroup v1 pids/memory/cpu hierarchies (or add the v2 variant)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    limits = UnitLimits(f"qtrace-test-{os.getpid()}")
    port = free_port()
    vms: list = []
    clients: list[socket.socket] = []
    d = None
    try:
        d = start(tmp_path, port, prefix=limits.enter())
        qemu = "/usr/bin/qemu-system-x86_64"
        import subprocess

        for i in range(70):
            vms.append(subprocess.Popen(
                [qemu, "-accel", "kvm", "-machine", "q35", "-m", "64", "-S", "-display", "none",
                 "-nodefaults", "-name", f"guest=limits-{i}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        d.wait_for(lambda m: samples(m, "qtrace_tracked_vms")[0][1] >= 70, timeout=120)
        for _ in range(1000):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        failures, done = [], []

        def scraper() -> None:
            end = time.monotonic() + 15
            while time.monotonic() < end:
                try:
                    with urllib.request.urlopen(d.url, timeout=10) as r:
                        assert b"qtrace_vm_info" in r.read()
                    done.append(1)
                except Exception as exc:  # noqa: BLE001 - counted, shown below
                    failures.append(repr(exc))

        threads = [threading.Thread(target=scraper) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures and len(done) >= 20, (failures[:5], len(done))
        assert d.proc.poll() is None, "".join(d.log)
        assert "max 0" in limits.read("pids", "pids.events"), "a thread or fork was refused"
        assert int(limits.read("memory", "memory.failcnt")) == 0, "memory limit reached"
        threads_now = int(next(ln.split()[1] for ln in
                               Path(f"/proc/{d.proc.pid}/status").read_text().splitlines()
                               if ln.startswith("Threads:")))
        assert threads_now <= 16, threads_now
    finally:
        for c in clients:
            c.close()
        if d is not None:
            assert d.stop() == 0, "".join(d.log[-40:])
        for p in vms:
            p.kill()
            p.wait()
        limits.remove()


def test_the_units_load_step_pins_for_the_daemon_which_then_compiles_nothing(tmp_path):
    """`qprobe load` (the unit's privileged ExecStartPre) compiles, pins and hands every pin
    to the daemon's user; run again it reuses them; the daemon then starts from them."""
    check_kvm()
    port = free_port()
    path = tmp_path / "qtrace.toml"
    path.write_text(daemon_toml(port, rescan_interval=1, keep_on_exit=False))
    root = f"{PIN_TEST_ROOT}/qtrace-test-{port}"
    load = [*QPROBE, "load", "--config", str(path), "--owner", "nobody"]
    first = subprocess.run(load, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "program=compiled" in first.stderr, first.stderr
    owners = {os.stat(os.path.join(d, n)).st_uid for d, ds, fs in os.walk(root)
              for n in ds + fs}
    assert owners == {pwd.getpwnam("nobody").pw_uid}, owners
    again = subprocess.run(load, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "program=reused" in again.stderr, again.stderr
    bad = subprocess.run([*QPROBE, "load", "--config", str(path), "--owner", "no-such-user"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no such user 'no-such-user'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    off = tmp_path / "off.toml"  # pinning off: nothing to load ahead, not a failed unit
    off.write_text(daemon_toml(port, bpf_pin_root=""))
    nothing = subprocess.run([*QPROBE, "load", "--config", str(off)], capture_output=True,
                             text=True, timeout=60)
    assert nothing.returncode == 0 and "pinning is off" in nothing.stderr, nothing.stderr
    daemon = DaemonProcess(path, port)
    try:
        log = "".join(daemon.log)
        assert "running the BPF loader" not in log and "program=reused" in log, log
        with DemoQemu("loaded") as vm:
            want = run_and_reset(vm)
            daemon.wait_for(lambda m: resets(m, "loaded") == want)
    finally:
        assert daemon.stop() == 0, "".join(daemon.log)
    assert not os.path.exists(root) or not os.listdir(root)
