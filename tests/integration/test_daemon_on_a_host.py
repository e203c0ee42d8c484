"""The daemon on a real host: short-lived and daemonized QEMUs, copied and replaced binaries,
restarted domains, full maps, signals at start-up, logs.  Real QEMU/KVM; oracles are QMP's
RESET events and strace, never qtrace's own tables."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.processes import popen
from support.qemu import qmp_resets
from support.qprobe import daemon_toml
from support.strace_count import count_state_writes, strace_argv
from support.web import free_port, samples, scrape, vm_resets

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
QEMU = "/usr/bin/qemu-system-x86_64"


def _catches(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    return bool(caught & (1 << (sig - 1)))


def _vm_names(m: dict) -> set[str]:
    return {lab["vm"] for lab, _ in samples(m, "qtrace_vm_info")}


def test_short_lived_and_probe_qemus_never_stop_the_daemon(daemon, tmp_path):
    """A binary not attached at start, processes that exit during attach, and libvirt-style
    capability probes (-machine none, no vCPU): the daemon keeps serving and exports no VM."""
    from qtrace_bpf.vms.targets import running_qemus

    copy = tmp_path / "qemu-system-x86_64"
    shutil.copy(QEMU, copy)
    others = set(running_qemus())  # QEMUs this test did not start
    d = daemon(qemu_binaries=[])  # nothing attached at start: every exec finds a new binary
    vms_before = _vm_names(d.metrics())
    for _ in range(20):
        subprocess.run([str(copy), "-version"], capture_output=True, check=True)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    for _ in range(3):  # what libvirtd runs for each binary at start and after upgrades
        sock = probe_dir / "qmp.sock"
        p = popen([str(copy), "-S", "-no-user-config", "-nodefaults", "-nographic",
                   "-machine", "none,accel=kvm", "-qmp", f"unix:{sock},server=on,wait=off"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # while it runs (long enough to be adopted): never in the per-VM families
            time.sleep(1.5)
            assert _vm_names(d.metrics()) == vms_before, "a process without a vCPU was exported"
        finally:
            p.terminate()
            p.wait(10)
    # every probe's exit handled: counted as a non-VM, no longer tracked
    # (another test's QEMU that was still exiting when `others` was taken is gone by now)
    m = d.wait_for(lambda m: samples(m, "qtrace_non_vm_processes_total")[0][1] >= 3 and
                   samples(m, "qtrace_tracked_processes")[0][1] ==
                   len(others & set(running_qemus())) and m)
    assert d.proc.poll() is None, "".join(d.log)
    assert _vm_names(m) == vms_before, "a process without a vCPU was exported as a VM"
    assert "Traceback" not in "".join(d.log)


def test_a_copy_of_the_binary_is_a_new_file_to_attach(daemon, tmp_path):
    """Same build-id, another inode (a reinstall, a copy, a container image): attached on its
    own; and a VM whose binary is then replaced on disk stays traced."""
    d = daemon()  # /usr/bin/qemu-system-* attached at start
    copy = tmp_path / "bin" / "qemu-system-x86_64"
    copy.parent.mkdir()
    shutil.copy(QEMU, copy)
    # A first process from the copy makes the daemon attach it (a VM that starts while its
    # binary is being attached may have its boot windows missed: README, limits).
    first = popen([str(copy), "-S", "-nodefaults", "-display", "none", "-machine", "none"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        d.wait_for(lambda m: any(lab["binary"] == str(copy) for lab, _ in
                                 samples(m, "qtrace_probes_attached")))
    finally:
        first.terminate()
        first.wait(10)
    with DemoQemu("copy-vm", qemu=str(copy)) as vm:
        vm.cmd("cont")
        time.sleep(0.3)
        vm.cmd("system_reset")
        # replace the file under the running VM (what a package upgrade does)
        tmp_new = copy.with_suffix(".new")
        shutil.copy(QEMU, tmp_new)
        os.replace(tmp_new, copy)
        assert os.readlink(f"/proc/{vm.pid}/exe").endswith("(deleted)")
        time.sleep(0.3)
        vm.cmd("system_reset")
        time.sleep(1.0)
        vm.cmd("stop")
        want = dict(qmp_resets(vm))
        m = d.wait_for(lambda m: vm_resets(m, "copy-vm") == want and m)
        reset_writes = samples(m, "qtrace_kvm_state_writes_total", vm="copy-vm", phase="reset")
        assert reset_writes, "the copy's uprobes did not fire: no write in phase reset"
        binaries = {lab["binary"] for lab, _ in samples(m, "qtrace_probes_attached")}
        assert str(copy) in binaries and QEMU in binaries


def test_daemonized_qemu_gets_its_name_and_its_parent_no_series(daemon, tmp_path):
    d = daemon()
    sock = tmp_path / "d.sock"
    pidfile = tmp_path / "d.pid"
    subprocess.run([QEMU, "-accel", "kvm", "-machine", "q35", "-m", "64", "-nodefaults",
                    "-display", "none", "-name", "guest=daemonized,debug-threads=on",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile),
                    "-daemonize"], check=True, timeout=30)
    pid = int(pidfile.read_text())
    try:
        m = d.wait_for(lambda m: "daemonized" in _vm_names(m) and m)
        info = {lab["vm"]: lab for lab, _ in samples(m, "qtrace_vm_info")}
        assert info["daemonized"]["pid"] == str(pid)
        assert not [n for n in _vm_names(m) if n.startswith("pid-")], _vm_names(m)
        boot = samples(m, "qtrace_kvm_state_writes_total", vm="daemonized", vcpu="0",
                       ioctl="KVM_CREATE_VCPU", phase="boot")
        assert boot and boot[0][1] == 1, "boot not counted from the first write"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_restarted_domain_keeps_its_name_and_its_counters(daemon):
    d = daemon(grace_period=3)
    with DemoQemu("web") as first:
        first.cmd("cont")
        time.sleep(0.3)
        first.cmd("system_reset")
        time.sleep(0.5)
        first.quit()
    with DemoQemu("web") as second:
        second.cmd("cont")
        time.sleep(0.3)
        second.cmd("system_reset")
        time.sleep(0.5)
        m = d.wait_for(lambda m: vm_resets(m, "web").get("host-qmp-system-reset") == 2 and m)
        assert not [n for n in _vm_names(m) if n.startswith("web~")], _vm_names(m)
        time.sleep(4)  # the first process is forgotten: its counts are carried
        m = d.metrics()
        assert vm_resets(m, "web").get("host-qmp-system-reset") == 2
        pids = {lab["pid"] for lab, _ in samples(m, "qtrace_vm_info", vm="web")}
        assert pids == {str(second.pid)}


def test_a_full_map_is_counted_never_silent(daemon):
    from qtrace_bpf.vms.targets import running_qemus

    # vcpu_fds holds one vCPU per VM slot; other QEMUs on this host take slots first
    d = daemon(max_vms=len(running_qemus()) + 1, max_vcpus_per_vm=1)
    with DemoQemu("two-vcpus", smp="2") as vm:
        vm.cmd("cont")
        m = d.wait_for(lambda m: {lab["map"]: v for lab, v in
                                  samples(m, "qtrace_map_updates_failed_total") if v})
        assert m.get("vcpu_fds", 0) >= 1, m


def test_signals_during_start_up_do_not_cost_the_hook(daemon, tmp_path):
    """A signal that lands while the verifier runs makes the load fail with EAGAIN: that is
    retried, not taken as the kernel refusing a hook."""
    import json

    expected = json.loads(subprocess.run([*QPROBE, "doctor", "--json"], capture_output=True,
                                         text=True, cwd=ROOT).stdout)["kernel_hook"]
    port = free_port()
    conf = tmp_path / "sig.toml"
    conf.write_text(daemon_toml(port))
    p = popen([*QPROBE, "daemon", "--config", str(conf)], cwd=ROOT, stderr=subprocess.PIPE,
              text=True)
    try:
        deadline = time.monotonic() + 30
        while not _catches(p.pid, signal.SIGHUP):  # before that, SIGHUP would kill it
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and p.poll() is None:
            p.send_signal(signal.SIGHUP)  # handled (rescan now), so it interrupts syscalls
            time.sleep(0.002)
        m = None
        deadline = time.monotonic() + 60
        while m is None:
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            try:
                m = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                assert time.monotonic() < deadline, "daemon never served"
                time.sleep(0.3)
        assert samples(m, "qtrace_kernel_hook_info")[0][0]["mode"] == expected
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_log_lines_cannot_be_forged_and_carry_journal_priorities(daemon):
    name = 'evil name="x"\nlevel=error msg=forged'
    d = daemon(env={"JOURNAL_STREAM": "8:1234"})
    with DemoQemu(name):
        d.wait_for(lambda m: _vm_names(m))
    d.stop()
    lines = d.log
    assert lines and all(re.match(r"^<[2-7]>level=(debug|info|warning|error) msg=", ln)
                         for ln in lines), lines
    tracking = [ln for ln in lines if "msg=tracking" in ln and "evil" in ln]
    # the label is made printable first (newline -> ?), and the log quotes what is left
    assert tracking and 'vm="evil name=\\"x\\"?level=error msg=forged"' in tracking[0]
    assert not any(ln.startswith("level=error msg=forged") for ln in lines)


def test_package_reinstall_under_a_running_vm(daemon):
    """apt-get install --reinstall: the running VM's binary is deleted (still traced), a new
    VM runs from the new inode (attached on its own); resets equal QMP's, writes strace's."""
    d = daemon()
    old = DemoQemu("before-upgrade")
    try:
        old.cmd("cont")
        r = subprocess.run(["apt-get", "install", "--reinstall", "-y", "-qq",
                            "--no-install-recommends", "qemu-system-x86"],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert r.returncode == 0, r.stderr
        assert os.readlink(f"/proc/{old.pid}/exe").endswith("(deleted)")
        old.cmd("system_reset")
        time.sleep(1.0)
        trace = Path(old.dir).with_name(Path(old.dir).name + ".strace")
        with DemoQemu("after-upgrade", wrapper=strace_argv(str(trace))) as new:
            new.cmd("cont")
            time.sleep(0.3)
            new.cmd("system_reset")
            time.sleep(1.0)
            new.cmd("stop")
            old.cmd("stop")
            want = {"before-upgrade": dict(qmp_resets(old)), "after-upgrade": dict(qmp_resets(new))}
            d.wait_for(lambda m: all(vm_resets(m, n) == w for n, w in want.items()))
            new.quit()
        ours = Counter()
        for lab, val in samples(d.metrics(), "qtrace_kvm_state_writes_total", vm="after-upgrade"):
            ours[(None if lab["vcpu"] == "vm" else int(lab["vcpu"]), lab["ioctl"])] += int(val)
        assert ours == count_state_writes(str(trace))
        inodes = {m.group(1) for ln in d.log
                  if (m := re.search(rf'binary attached" binary={QEMU} inode=(\S+)', ln))}
        assert len(inodes) == 2, inodes  # the old file at start, the reinstalled one later
    finally:
        old.close()
