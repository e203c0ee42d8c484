"""Counts survive a daemon restart: pinned maps and probe links keep counting with no daemon,
and the next daemon continues them.  Oracles: QMP RESET events and strace."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm
from support.kernel_state import bpf_state, wait_settled
from support.qemu import qmp_resets
from support.qprobe import HostDaemon, daemon_toml
from support.strace_count import count_state_writes, strace_argv
from support.web import free_port, samples

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


class Restartable:
    """The same daemon config started again and again (as systemd would)."""

    def __init__(self, tmp: Path):
        check_kvm()
        self.tmp = tmp
        self.port = free_port()
        self.root = f"/sys/fs/bpf/qtrace-test-{self.port}"
        self.config = tmp / "restart.toml"
        self.config.write_text(daemon_toml(self.port, keep_on_exit=True, rescan_interval=1,
                                           grace_period=60))
        self.current: HostDaemon | None = None
        self.logs: list[str] = []

    def start(self) -> HostDaemon:
        self.current = HostDaemon.from_config(self.config, self.port)
        return self.current

    def kill(self) -> None:
        assert self.current is not None
        self.current.proc.kill()
        self.current.proc.wait(10)
        self.logs += self.current.log

    def cleanup(self) -> str:
        r = subprocess.run([*QPROBE, "cleanup", "--pin-root", self.root], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return r.stdout


def writes_by_vcpu(metrics: dict, vm: str) -> Counter:
    out: Counter = Counter()
    for lab, val in samples(metrics, "qtrace_kvm_state_writes_total", vm=vm):
        out[(None if lab["vcpu"] == "vm" else int(lab["vcpu"]), lab["ioctl"])] += int(val)
    return out


def resets(metrics: dict, vm: str) -> dict[str, int]:
    return {lab["cause"]: int(v) for lab, v in samples(metrics, "qtrace_vm_resets_total", vm=vm)
            if v}


def test_pinned_counters_survive_daemon_restart(tmp_path):
    """SIGKILL the daemon; reset and hot-plug while it is down; the next daemon's counts
    equal QMP's RESET events and strace's writes, with no counting gap."""
    before = bpf_state()
    d = Restartable(tmp_path)
    trace = tmp_path / "vm.strace"
    try:
        first = d.start()
        with DemoQemu("survivor", wrapper=strace_argv(str(trace))) as vm:
            vm.cmd("cont")
            time.sleep(0.3)
            vm.cmd("system_reset")
            vm.hotplug_cpu()
            time.sleep(0.5)
            first.wait_for(lambda m: resets(m, "survivor"))
            d.kill()  # no chance to clean up: the pins are all that is left
            assert any(Path(d.root).rglob("tp-sys_enter_ioctl")), "hook link not pinned"
            vm.cmd("system_reset")  # while no daemon runs
            vm.hotplug_cpu()
            time.sleep(1.0)
            second = d.start()
            pins = next(ln for ln in second.log if "msg=pins" in ln)
            assert "counters=continued" in pins and "links_replaced=0" in pins, pins
            vm.cmd("system_reset")
            time.sleep(1.0)
            vm.cmd("stop")
            want = dict(qmp_resets(vm))
            m = second.wait_for(lambda m: resets(m, "survivor") == want and m)
            vm.quit()
        assert want.get("host-qmp-system-reset") == 3
        m = second.metrics()
        assert writes_by_vcpu(m, "survivor") == count_state_writes(str(trace))
        hotplugged = samples(m, "qtrace_kvm_state_writes_total", vm="survivor", vcpu="2",
                             ioctl="KVM_CREATE_VCPU", phase="hotplug")
        assert hotplugged, "the vCPU hot-added while no daemon ran was counted as hotplug"
        assert not [g for g in samples(m, "qtrace_counting_gaps_total") if g[1]], \
            samples(m, "qtrace_counting_gaps_total")
        assert second.stop() == 0
        assert os.path.isdir(d.root), "SIGTERM with keep_on_exit keeps the pins"
        assert "removed" in d.cleanup()
        assert not os.path.exists(d.root)
        assert wait_settled(before) == {}, "qprobe cleanup leaves nothing"
    finally:
        if d.current is not None and d.current.proc.poll() is None:
            d.current.proc.kill()
        d.cleanup()


def test_stale_layout_is_replaced_with_a_log_line(tmp_path):
    d = Restartable(tmp_path)
    stale = Path(d.root) / "v1-16x4" / "maps"
    stale.mkdir(parents=True)
    subprocess.run(["bpftool", "map", "create", str(stale / "write_counts"), "type", "hash",
                    "key", "12", "value", "8", "entries", "16", "name", "write_counts"],
                   check=True)
    try:
        daemon = d.start()
        line = next((ln for ln in daemon.log if "pins of another layout removed" in ln), "")
        assert "stale=v1-16x4" in line, daemon.log
        assert not (Path(d.root) / "v1-16x4").exists()
        gaps = {lab["reason"]: v for lab, v in samples(daemon.metrics(),
                                                          "qtrace_counting_gaps_total")}
        assert gaps.get("layout_replaced") == 1
        assert daemon.stop() == 0
    finally:
        d.cleanup()


def test_a_changed_program_replaces_the_old_attachment(tmp_path):
    """A pinned link holding another program (an older qtrace) is replaced, not read."""
    from bcc import BPF

    from qtrace_bpf.bpf import bpfsys, perf_events
    from qtrace_bpf.commands.config import load_config
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.program import loader

    d = Restartable(tmp_path)
    cfg = load_config(str(d.config))
    layout = Path(cfg.bpf_pin_root, loader.layout_name(load_catalog(), cfg.max_vms,
                                                     cfg.max_vcpus_per_vm)) / "links"
    layout.mkdir(parents=True)
    other = BPF(text=b"int tp_other(void *ctx) { return 0; }")
    fn = other.load_func(b"tp_other", BPF.TRACEPOINT)
    perf = perf_events.tracepoint_event("syscalls", "sys_enter_ioctl")
    link = bpfsys.link(fn.fd, perf)
    old_tag = bpfsys.prog_tag(fn.fd)
    os.close(perf)
    bpfsys.pin(link, str(layout / "tp-sys_enter_ioctl"))
    os.close(link)
    other.cleanup()
    try:
        daemon = d.start()
        replaced = [ln for ln in daemon.log if "pinned program differs" in ln]
        assert replaced and "link=tp-sys_enter_ioctl" in replaced[0], daemon.log
        gaps = {lab["reason"]: v for lab, v in samples(daemon.metrics(),
                                                          "qtrace_counting_gaps_total")}
        assert gaps.get("program_replaced") == 1
        pinned = bpfsys.get_pinned(str(layout / "tp-sys_enter_ioctl"))
        assert pinned is not None
        try:
            assert bpfsys.link_prog_tag(pinned) not in ("", old_tag), "still the old program"
        finally:
            os.close(pinned)
        assert daemon.stop() == 0
    finally:
        d.cleanup()


def test_keep_on_exit_false_removes_everything_at_sigterm(tmp_path):
    before = bpf_state()
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port, keep_on_exit=False))
    daemon = HostDaemon.from_config(cfg, port)
    assert os.path.isdir(f"/sys/fs/bpf/qtrace-test-{port}")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(f"/sys/fs/bpf/qtrace-test-{port}")
    assert wait_settled(before) == {}
