"""qtrace and QEMU in containers, as a Kubernetes node runs them: the daemon in a PID
namespace of its own that reads the host's /proc mounted in (proc_root, no hostPID), and a
QEMU in a virt-launcher-like container (its own root, mount and PID namespaces) whose
domain is named NAMESPACE_NAME.  The QEMU is traced from its first write, named by its
host pid, counted exactly (resets = QMP's RESET events, writes = strace inside the
container) and carries KubeVirt's namespace and name."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm
from support.containers import container
from support.processes import popen
from support.qemu import qmp_resets
from support.qprobe import daemon_toml
from support.strace_count import count_state_writes
from support.web import free_port, samples, scrape

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]

# The daemon's container: the host's /proc bound at $1 first, then a PID namespace and a
# /proc of its own, as a pod without hostPID has.
DAEMON_CTR = 'mount --rbind /proc "$1" && shift && exec "$@"'


def ns_pid(host_pid: int) -> int:
    status = Path(f"/proc/{host_pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()[-1])


def daemon_in_a_container(tmp: Path, port: int, host_proc: Path) -> subprocess.Popen:
    cfg = tmp / "q.toml"
    cfg.write_text(daemon_toml(port, rescan_interval=1, kubevirt_names=True))
    host_proc.mkdir()
    return popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", DAEMON_CTR,
                  "sh", str(host_proc),
                  "unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM",
                  *QPROBE, "daemon", "--config", str(cfg), f"--path.procfs={host_proc}"],
                 cwd=ROOT, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if samples(scrape(url), "qtrace_ready") == [({}, 1.0)]:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError("daemon exited: " + proc.stderr.read())
        assert time.monotonic() < deadline, "daemon not ready"
        time.sleep(0.3)


def test_a_daemon_reading_the_hosts_proc_counts_a_kubevirt_qemu_in_its_container(tmp_path):
    check_kvm()
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    share = Path(tempfile.mkdtemp(prefix="qtrace-share-", dir="/var/tmp"))
    root = Path(tempfile.mkdtemp(prefix="qtrace-ctr-", dir="/var/tmp"))
    trace = share / "qemu.strace"
    daemon = daemon_in_a_container(tmp_path, port, tmp_path / "host-proc")
    try:
        wait_ready(url, daemon)
        inner = int(Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()[0])
        assert ns_pid(inner) == 1, "the daemon runs in a PID namespace of its own"
        with DemoQemu("prod_vm-1", wrapper=container(root, str(share), str(trace)),
                      tmp_root=str(share)) as vm, DemoQemu("plain-host-vm") as plain:
            assert ns_pid(vm.pid) != vm.pid, "the QEMU has a PID namespace of its own"
            for q in (vm, plain):
                q.cmd("cont")
            time.sleep(0.5)
            for q in (vm, vm, plain):
                q.cmd("system_reset")
                time.sleep(0.5)
            for q in (vm, plain):
                q.cmd("stop")
            want = {"prod_vm-1": dict(qmp_resets(vm)), "plain-host-vm": dict(qmp_resets(plain))}
            deadline = time.monotonic() + 30
            while True:
                m = scrape(url)
                got = {name: {lab["cause"]: int(v) for lab, v in
                              samples(m, "qtrace_vm_resets_total", vm=name) if v}
                       for name in want}
                if got == want:
                    break
                assert time.monotonic() < deadline, (got, want)
                time.sleep(0.5)
            info = {lab["vm"]: lab for lab, _ in samples(m, "qtrace_vm_info")}
            assert info["prod_vm-1"]["pid"] == str(vm.pid), "named by its host pid"
            assert (info["prod_vm-1"]["namespace"], info["prod_vm-1"]["name"]) == \
                ("prod", "vm-1")
            assert info["plain-host-vm"]["namespace"] == "", info  # empty: no such label
            ours = Counter()
            for lab, val in samples(m, "qtrace_kvm_state_writes_total", vm="prod_vm-1"):
                ours[(None if lab["vcpu"] == "vm" else int(lab["vcpu"]), lab["ioctl"])] += \
                    int(val)
            assert ours == count_state_writes(str(trace)), "every write, boot included"
            assert not samples(m, "qtrace_counting_gaps_total", vm="prod_vm-1"), \
                "found at its exec, not by a scan"
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        for d in (share, root):
            subprocess.run(["rm", "-rf", str(d)], check=False)
