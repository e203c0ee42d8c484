"""What was written, per vCPU: the last TSC frequency and APIC base QEMU set, and how often
a write changed them, as the daemon exports them, against what strace saw QEMU pass."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ROOT
from support.caps import check_kvm, require
from support.processes import popen
from support.qemu import host_tsc_khz, vcpu_fd
from support.qprobe import DaemonProcess, daemon_toml
from support.strace_count import strace_argv
from support.web import free_port, samples

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


def strace_tsc_khz(path: Path) -> dict[int, int]:
    """vCPU fd's id -> the last successful KVM_SET_TSC_KHZ argument, as strace saw it."""
    out: dict[int, int] = {}
    for line in path.read_text().splitlines():
        m = re.search(r"ioctl\(\d+<anon_inode:kvm-vcpu:(\d+)>, KVM_SET_TSC_KHZ, "
                      r"(0x[0-9a-f]+|\d+)\) = 0", line)
        if m:  # strace prints the kHz in hex
            out[int(m.group(1))] = int(m.group(2), 0)
    return out


def test_value_gauges_equal_what_qemu_passed(tmp_path):
    check_kvm()
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port, rescan_interval=1))
    d = DaemonProcess(cfg, port)
    trace = tmp_path / "qemu.strace"
    khz = host_tsc_khz()
    try:
        with DemoQemu("values", cpu=f"qemu64,tsc-frequency={khz * 1000}",
                      wrapper=strace_argv(str(trace))) as vm:
            vm.cmd("cont")
            time.sleep(0.5)
            vm.cmd("system_reset")

            def exported(m):
                tsc = {lab["vcpu"]: v for lab, v in samples(m, "qtrace_vcpu_tsc_khz",
                                                            vm="values")}
                apic = {lab["vcpu"]: v for lab, v in samples(m, "qtrace_vcpu_apic_base",
                                                             vm="values")}
                return (tsc, apic) if tsc and apic else None

            tsc, apic = d.wait_for(exported)
            time.sleep(0.5)
            seen = strace_tsc_khz(trace)
            assert seen and set(seen.values()) == {khz}, seen
            assert tsc == {str(v): float(k) for v, k in seen.items()}, (tsc, seen)
            base = int(apic["0"])
            assert base & 0xFFFFF000 == 0xFEE00000 and base & 0x900 == 0x900, hex(base)
            changes = {lab["what"]: v for lab, v in
                       samples(d.metrics(), "qtrace_state_value_changes_total", vm="values")}
            # rewritten at reset and at every put with the same values: no change counted
            assert changes.get("tsc_khz", 0) == 0, changes
    finally:
        assert d.stop() == 0, "".join(d.log)


def test_apic_base_gauge_equals_an_independent_reader(tmp_path):
    """qtrace_vcpu_apic_base per vCPU equals the last APIC base that bpftrace read from the
    ioctl arguments itself (tests/bpftrace/apic_base.bt: its own struct offsets), through
    boot, a hot-added vCPU and a reset: the BSP has bit 8, the hot-added AP not."""
    check_kvm()
    bpftrace = shutil.which("bpftrace")
    require("bpftrace", bpftrace is not None, "apt-get install bpftrace")
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port, rescan_interval=1))
    d = DaemonProcess(cfg, port)
    try:
        with DemoQemu("apic", preconfig=True, smp="1,maxcpus=2") as vm:
            bt = popen([bpftrace, str(ROOT / "tests" / "bpftrace" / "apic_base.bt"),
                        str(vm.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert bt.stdout is not None
            first = bt.stdout.readline()
            assert first.startswith("Attaching"), first + bt.stderr.read() if bt.stderr else ""
            vm.cmd("x-exit-preconfig")
            vm.cmd("cont")
            time.sleep(0.3)
            vm.hotplug_cpu()
            time.sleep(0.3)
            vm.cmd("system_reset")
            time.sleep(0.5)
            fds = {vcpu_fd(vm.pid, n): n for n in (0, 1)}

            def exported(m):
                got = {lab["vcpu"]: int(v) for lab, v in samples(m, "qtrace_vcpu_apic_base",
                                                                  vm="apic")}
                return got if set(got) == {"0", "1"} else None

            ours = d.wait_for(exported)
            bt.send_signal(signal.SIGINT)
            out, _ = bt.communicate(timeout=30)
        seen = sorted((int(ns), int(fd), int(val)) for _, fd, val, ns in
                      (line.split() for line in out.splitlines() if line.startswith("apic ")))
        last = {str(fds[fd]): val for _, fd, val in seen if fd in fds}
        assert ours == last, (ours, last)
        assert last["0"] & 0x100 and not last["1"] & 0x100, last  # BSP bit
    finally:
        assert d.stop() == 0, "".join(d.log)
