"""Two hosts, one Prometheus: each "host" a PID namespace of its own with its own qtrace
and its own QEMUs (a daemon counts only its namespace's VMs), one real Prometheus scraping
both with the project's rules.  A VM live-migrates from A to B over a unix socket, once at
the same TSC frequency and once onto a host that gives it another (an old machine type
does not carry the frequency, and B's QEMU sets its own, 300 kHz off: within KVM's
tolerance, so no TSC scaling is needed).  Then a reset storm on A.  Per-host counts equal
QMP's, qtrace:vm_tsc_khz:by_uuid follows the VM from A to B, QemuVmTscFrequencyChanged
fires for the second migration only, no reset is counted on both hosts, and the reset
alerts name host A and its VM only."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm
from support.processes import popen
from support.prometheus import Prometheus
from support.qemu import host_tsc_khz, qmp_resets
from support.qprobe import daemon_toml
from support.web import free_port, samples, scrape

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
# no boot device: SeaBIOS resets the guest every ~1.5 s (guest-reset), no QMP needed
STORM = ["-boot", "reboot-timeout=500"]


class Host:
    """A daemon in a PID namespace of its own; QEMUs started in that namespace."""

    def __init__(self, tmp: Path, name: str):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.instance = f"127.0.0.1:{self.port}"
        cfg = tmp / f"{name}.toml"
        cfg.write_text(daemon_toml(self.port, rescan_interval=1, grace_period=600))
        self.proc = popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM",
                           *QPROBE, "daemon", "--config", str(cfg)], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                if samples(scrape(self.url), "qtrace_ready") == [({}, 1.0)]:
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, f"host {name}: daemon not ready"
            time.sleep(0.3)
        self.daemon = int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                          .read_text().split()[0])

    def qemu(self, name: str, **kw) -> DemoQemu:
        return DemoQemu(name, wrapper=["nsenter", "--target", str(self.daemon), "--pid",
                                       "--mount"], **kw)

    def resets(self, vm: str) -> dict[str, int]:
        return {lab["cause"]: int(v) for lab, v in
                samples(scrape(self.url), "qtrace_vm_resets_total", vm=vm) if v}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def migrate(src: DemoQemu, dst: DemoQemu, sock: str) -> None:
    src.cmd("migrate", uri=f"unix:{sock}")
    deadline = time.monotonic() + 60
    while (status := src.cmd("query-migrate").get("status")) != "completed":
        assert status not in ("failed", "cancelled"), src.cmd("query-migrate")
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    dst.cmd("cont")


def until(what, timeout: float = 30.0, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, why()
        time.sleep(0.5)
    return got


def test_two_hosts_one_prometheus_a_migration_and_a_reset_storm(tmp_path):
    check_kvm()
    khz = host_tsc_khz()
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    prom = Prometheus(tmp_path, [a.port, b.port])
    vms: list[DemoQemu] = []
    try:
        # 1. the same TSC frequency on both sides (it travels with the VM)
        same = str(uuid.uuid4())
        cpu = f"qemu64,tsc-frequency={khz * 1000}"
        src = a.qemu("mig-same", cpu=cpu, extra=["-uuid", same])
        vms.append(src)
        src.cmd("cont")
        time.sleep(0.3)
        src.cmd("system_reset")
        sock = str(tmp_path / "same.sock")
        dst = b.qemu("mig-same", cpu="qemu64", extra=["-uuid", same, "-incoming", f"unix:{sock}"])
        vms.append(dst)
        migrate(src, dst, sock)
        # 2. onto a host that gives it another frequency (pc-i440fx-2.5 does not migrate it)
        other = str(uuid.uuid4())
        old = ["-machine", "pc-i440fx-2.5"]
        src2 = a.qemu("mig-other", cpu=cpu, extra=[*old, "-uuid", other])
        vms.append(src2)
        src2.cmd("cont")
        sock2 = str(tmp_path / "other.sock")
        dst2 = b.qemu("mig-other", cpu=f"qemu64,tsc-frequency={(khz + 300) * 1000}",
                      extra=[*old, "-uuid", other, "-incoming", f"unix:{sock2}"])
        vms.append(dst2)
        migrate(src2, dst2, sock2)
        # 3. a reset storm on A
        storm = a.qemu("storm", paused=False, extra=STORM)
        vms.append(storm)
        quiet = b.qemu("quiet", paused=False)
        vms.append(quiet)

        # per host: each QEMU's resets as QMP saw them, on its own host only
        until(lambda: a.resets("mig-same") == dict(qmp_resets(src)),
              why=lambda: (a.resets("mig-same"), qmp_resets(src)))
        until(lambda: b.resets("mig-same") == dict(qmp_resets(dst)),
              why=lambda: (b.resets("mig-same"), qmp_resets(dst)))
        assert dict(qmp_resets(src)).get("host-qmp-system-reset") == 1
        assert "host-qmp-system-reset" not in qmp_resets(dst)
        ids = {h.name: {lab["vm"] for lab, _ in samples(scrape(h.url), "qtrace_vm_info")}
               for h in (a, b)}
        assert ids == {"a": {"mig-same", "mig-other", "storm"},
                       "b": {"mig-same", "mig-other", "quiet"}}, "each host its own VMs"

        # Prometheus: the VM's frequency followed it from A to B; counted once
        def by_uuid(u: str) -> dict[str, float]:
            return {r["metric"]["instance"]: float(r["value"][1])
                    for r in prom.query(f'qtrace:vm_tsc_khz:by_uuid{{uuid="{u}"}}')}
        want = {a.instance: khz, b.instance: khz}
        until(lambda: by_uuid(same) == want, why=lambda: by_uuid(same))
        until(lambda: by_uuid(other) == {a.instance: khz, b.instance: khz + 300},
              why=lambda: by_uuid(other))
        host_resets = prom.query('sum(qtrace_vm_resets_total{vm="mig-same",'
                                 'cause="host-qmp-system-reset"})')
        assert float(host_resets[0]["value"][1]) == 1, "one reset, on one host: counted once"

        changed = until(lambda: prom.firing("QemuVmTscFrequencyChanged"),
                        why=lambda: prom.firing("QemuVmTscFrequencyChanged"))
        loop = until(lambda: prom.firing("QemuVmResetLoop"), timeout=60)
        time.sleep(3)  # a few more evaluations: nothing else may fire
        assert [x["uuid"] for x in prom.firing("QemuVmTscFrequencyChanged")] == [other], changed
        assert {(x["instance"], x["vm"]) for x in prom.firing("QemuVmResetLoop")} == \
            {(a.instance, "storm")}, loop
        assert {(x["instance"], x["vm"]) for x in prom.firing("QemuVmUnexpectedReset")} == \
            {(a.instance, "storm")}
    finally:
        for vm in vms:
            vm.close()
        prom.stop()
        a.stop()
        b.stop()
