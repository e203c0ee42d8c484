"""A daemon in a PID namespace of its own (a container, a Kubernetes DaemonSet without
hostPID): BPF sees the host's pids, the daemon its namespace's.  The program is compiled
for that namespace (bpf_get_ns_current_pid_tgid): VMs inside are counted under the pids the
daemon sees, VMs outside are not its VMs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm
from support.processes import popen
from support.qprobe import daemon_toml
from support.web import free_port, samples, scrape

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
QEMU = "/usr/bin/qemu-system-x86_64"
# no boot device: SeaBIOS resets the guest every ~1.5 s (guest-reset), no QMP needed
REBOOTING = ["-accel", "kvm", "-machine", "q35", "-m", "64", "-display", "none",
             "-nodefaults", "-boot", "reboot-timeout=500"]


def ns_pid(host_pid: int) -> int:
    """The pid the innermost PID namespace gives a host process (NSpid's last field)."""
    status = Path(f"/proc/{host_pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()[-1])


def child_of(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError(f"{pid} has no child")


def test_a_daemon_in_its_own_pid_namespace_counts_its_vms_only(tmp_path):
    check_kvm()
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port, rescan_interval=1))
    url = f"http://127.0.0.1:{port}/metrics"
    outside = popen([QEMU, *REBOOTING, "-name", "guest=pidns-outside"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ns = popen(["unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM",
                *QPROBE, "daemon", "--config", str(cfg)], cwd=ROOT,
               stderr=subprocess.PIPE, text=True)
    inside = None
    try:
        daemon = child_of(ns.pid)
        assert ns_pid(daemon) == 1, "the daemon runs in a PID namespace of its own"
        deadline = time.monotonic() + 90
        while not samples(_try(url), "qtrace_ready") or \
                samples(_try(url), "qtrace_ready")[0][1] != 1:
            assert time.monotonic() < deadline and ns.poll() is None, "daemon did not start"
            time.sleep(0.3)
        inside = popen(["nsenter", "--target", str(daemon), "--pid", "--mount",
                        QEMU, *REBOOTING, "-name", "guest=pidns-inside"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        qemu_inside = child_of(inside.pid)
        deadline = time.monotonic() + 30
        while True:
            m = scrape(url)
            resets = {lab["cause"]: v for lab, v in
                      samples(m, "qtrace_vm_resets_total", vm="pidns-inside") if v}
            if resets.get("guest-reset", 0) >= 2:
                break
            assert time.monotonic() < deadline, (resets, m.get("qtrace_vm_info"))
            time.sleep(0.5)
        info = {lab["vm"]: lab["pid"] for lab, _ in samples(m, "qtrace_vm_info")}
        assert info == {"pidns-inside": str(ns_pid(qemu_inside))}, info
        assert ns_pid(qemu_inside) != qemu_inside, "pids differ between the namespaces"
        writes = samples(m, "qtrace_kvm_state_writes_total", vm="pidns-inside")
        assert sum(v for _, v in writes) > 0
    finally:
        for p in (inside, outside):
            if p is not None:
                p.kill()
                p.wait()
        ns.send_signal(signal.SIGTERM)
        try:
            ns.wait(30)
        except subprocess.TimeoutExpired:
            ns.kill()


def _try(url: str) -> dict:
    try:
        return scrape(url)
    except OSError:
        return {}


def test_the_program_is_compiled_for_the_namespace_it_runs_in():
    """Outside the host's PID namespace the loader passes that namespace to the program."""
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", os.environ.get("PYTHON", QPROBE[0]),
         "-c", "from qtrace_bpf.program.bcc_compile import cflags; "
               "from qtrace_bpf.procfs import pid_namespace; "
               "print(pid_namespace()); print(' '.join(cflags('tracepoint')))"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    ns, flags = out.stdout.splitlines()
    assert ns != "None" and "-DQTRACE_PIDNS_INO=" in flags, out
    host = subprocess.run([QPROBE[0], "-c", "from qtrace_bpf.procfs import "
                           "pid_namespace; print(pid_namespace())"],
                          capture_output=True, text=True, cwd=ROOT)
    assert host.stdout.strip() == "None", host
