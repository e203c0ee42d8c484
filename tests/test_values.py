"""What was written, per vCPU: the last TSC frequency and APIC base QEMU set, and how often
a write changed them, as the daemon exports them, against what strace saw QEMU pass."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess, check_kvm, daemon_toml, free_port, host_tsc_khz, samples
from strace_count import strace_argv

from qtrace_bpf.demo_qemu import DemoQemu

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
