"""The daemon under Debian's libvirt, driven with virsh as an operator would.

A libvirtd restart (capability probes), then one domain through start, setvcpus, reset,
reboot, save, restore and destroy, and a package reinstall under a running domain followed
by a new domain on the reinstalled binary.  Oracles: QEMU's own `kvm_vcpu_ioctl` trace events
(in the domain's log) and libvirt's reboot events (QMP RESET), never qtrace's own tables.
"""

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
from support.caps import check_kvm, require
from support.processes import popen
from support.qemu import kvm_numbers
from support.qprobe import HostDaemon
from support.web import samples

from qtrace_bpf.contract.kvm_ioctls import STATE_WRITE_NAMES

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
VIRSH = ["virsh", "-c", "qemu:///system"]
LOGS = Path("/var/log/libvirt/qemu")
# 13425@1796033134.450521:kvm_vcpu_ioctl cpu_index 0, type 0xae80, arg (nil)
TRACE = re.compile(r"^(\d+)@[\d.]+:kvm_vcpu_ioctl cpu_index (\d+), type (0x[0-9a-f]+),")
DOMAIN = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu placement='static' current='1'>4</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <qemu:commandline><qemu:arg value='-trace'/><qemu:arg value='kvm_vcpu_ioctl'/>
  </qemu:commandline>
</domain>
"""


def virsh(*args: str, check: bool = True) -> str:
    started = time.monotonic()
    r = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=120)
    if time.monotonic() - started > 5:  # e.g. libvirtd re-probing capabilities (setup.sh)
        print(f"virsh {' '.join(args)}: {time.monotonic() - started:.1f}s", flush=True)
    if check:
        assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
    return r.stdout


def start_libvirtd() -> list[str]:
    """Start virtlogd and libvirtd where they do not run (no systemd here); returns those."""
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            subprocess.run([daemon, "-d"], check=True)
            started.append(daemon)
    deadline = time.monotonic() + 30
    while subprocess.run([*VIRSH, "version"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "libvirtd did not answer"
        time.sleep(0.3)
    return started


def restart_libvirtd() -> None:
    """As at a host's boot: no capabilities cached, so libvirtd probes every QEMU binary."""
    subprocess.run(["pkill", "-x", "libvirtd"])
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.2)
    shutil.rmtree("/var/cache/libvirt/qemu/capabilities", ignore_errors=True)
    start_libvirtd()


class Domain:
    """A defined domain, its log read from where this test started it, its reboot events."""

    def __init__(self, name: str, tmp: Path):
        self.name = name
        self.log = LOGS / f"{name}.log"
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
        self.log.unlink(missing_ok=True)
        xml = tmp / f"{name}.xml"
        xml.write_text(DOMAIN.format(name=name))
        virsh("define", str(xml))
        self.events = popen([*VIRSH, "event", "--domain", name, "--event", "reboot", "--loop"],
                            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the event loop is registered

    def pid(self) -> int:
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())

    def reboots(self) -> int:
        """libvirt's reboot events so far (one per QMP RESET)."""
        self.events.send_signal(signal.SIGINT)
        out, _ = self.events.communicate(timeout=10)
        n = out.count("event 'reboot'")
        self.events = popen([*VIRSH, "event", "--domain", self.name, "--event", "reboot",
                             "--loop"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        return n

    def oracle(self, numbers: dict[int, str]) -> Counter:
        """(vcpu, ioctl) -> state writes, from QEMU's trace events of every process."""
        out: Counter = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            m = TRACE.match(line)
            if m and numbers.get(int(m.group(3), 16)) in STATE_WRITE_NAMES:
                out[(int(m.group(2)), numbers[int(m.group(3), 16)])] += 1
        return out

    def close(self) -> None:
        self.events.kill()
        self.events.wait()
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, check=False)


def ours(metrics: dict, vm: str) -> Counter:
    """qtrace's per-vCPU writes, as the oracle can see them (vCPU ioctls but CREATE_VCPU)."""
    out: Counter = Counter()
    for lab, val in samples(metrics, "qtrace_kvm_state_writes_total", vm=vm):
        if lab["vcpu"] != "vm" and lab["ioctl"] != "KVM_CREATE_VCPU" and val:
            out[(int(lab["vcpu"]), lab["ioctl"])] += int(val)
    return out


def resets(metrics: dict, vm: str) -> int:
    return int(sum(v for _, v in samples(metrics, "qtrace_vm_resets_total", vm=vm)))


@pytest.fixture(scope="module")
def libvirt(tmp_path_factory):
    check_kvm()
    require("libvirt", shutil.which("libvirtd") is not None and shutil.which("virsh") is not None,
            "apt-get install libvirt-daemon-system libvirt-clients (scripts/setup.sh)")
    started = start_libvirtd()
    yield tmp_path_factory.mktemp("libvirt")
    for daemon in reversed(started):  # leave the host as we found it
        subprocess.run(["pkill", "-x", daemon])


def test_daemon_through_a_domains_life_under_libvirt(libvirt, gcc):
    tmp = libvirt
    t0 = time.monotonic()

    def step(what: str) -> None:  # where the time goes, for slow CI runs (pytest -s)
        print(f"[{time.monotonic() - t0:6.1f}s] {what}", flush=True)

    numbers = kvm_numbers(gcc, STATE_WRITE_NAMES)
    d = HostDaemon(tmp, grace_period=600)
    domains: list[Domain] = []
    try:
        step("libvirtd restart")
        restart_libvirtd()  # capability probes: -machine none, no vCPU
        time.sleep(1)
        a = Domain("qt-lv-a", tmp)
        domains.append(a)
        virsh("start", a.name)
        first_pid = a.pid()
        time.sleep(1)
        virsh("setvcpus", a.name, "2", "--live")
        time.sleep(1)
        virsh("reset", a.name)
        time.sleep(1)
        virsh("reboot", a.name, check=False)  # ACPI: no guest OS answers, nothing happens
        time.sleep(1)
        step("save")
        virsh("save", a.name, str(tmp / "a.save"))
        step("restore")
        virsh("restore", str(tmp / "a.save"))
        time.sleep(1)
        virsh("reset", a.name)
        time.sleep(1.5)
        restored_pid = a.pid()
        assert restored_pid != first_pid
        reboots = a.reboots()
        assert reboots >= 2
        virsh("suspend", a.name)  # no more writes while we compare
        step("wait for a")
        m = d.wait_for(lambda m: resets(m, a.name) == reboots and m, timeout=30)
        assert d.proc.poll() is None, "".join(d.log)
        assert ours(m, a.name) == a.oracle(numbers)
        info = {lab["vm"]: lab for lab, _ in samples(m, "qtrace_vm_info")}
        assert info[a.name]["pid"] == str(restored_pid)  # restored: same name, new pid
        assert not [n for n in info if n.startswith(("pid-", f"{a.name}~"))], info
        assert samples(m, "qtrace_non_vm_processes_total")[0][1] >= 1  # the probes
        # save/restore is an incoming migration: its TSC writes are expected ones
        unexpected = samples(m, "qtrace_unexpected_state_writes_total", vm=a.name)
        assert unexpected and not any(v for _, v in unexpected), unexpected
        assert samples(m, "qtrace_lifecycle_duration_seconds_count", vm=a.name,
                       step="migration")[0][1] == 1
        virsh("destroy", a.name)

        # a package reinstall under a running domain, then a domain on the new binary
        b = Domain("qt-lv-b", tmp)
        domains.append(b)
        virsh("start", b.name)
        time.sleep(1)
        step("reinstall")
        r = subprocess.run(["apt-get", "install", "--reinstall", "-y", "-qq",
                            "--no-install-recommends", "qemu-system-x86"], capture_output=True,
                           text=True, timeout=600,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert r.returncode == 0, r.stderr
        assert os.readlink(f"/proc/{b.pid()}/exe").endswith("(deleted)")
        virsh("reset", b.name)
        c = Domain("qt-lv-c", tmp)
        domains.append(c)
        step("start c")
        virsh("start", c.name)  # libvirtd probes the upgraded binary first
        time.sleep(1)
        virsh("setvcpus", c.name, "2", "--live")
        time.sleep(1)
        virsh("reset", c.name)
        time.sleep(1.5)
        want = {b.name: b.reboots(), c.name: c.reboots()}
        virsh("suspend", b.name)
        virsh("suspend", c.name)
        step("wait for b, c")
        m = d.wait_for(lambda m: all(resets(m, n) == w for n, w in want.items()) and m,
                       timeout=30)
        for dom in (b, c):
            assert ours(m, dom.name) == dom.oracle(numbers), dom.name
            assert not any(v for _, v in samples(m, "qtrace_unexpected_state_writes_total",
                                                 vm=dom.name)), dom.name
        # setvcpus --live: one vCPU hotplug, timed
        assert samples(m, "qtrace_lifecycle_duration_seconds_count", vm=c.name,
                       step="hotplug")[0][1] == 1
        assert d.proc.poll() is None
        assert "Traceback" not in "".join(d.log)
        assert not [n for n in {lab["vm"] for lab, _ in samples(m, "qtrace_vm_info")}
                    if n.startswith("pid-")]
    finally:
        for dom in domains:
            dom.close()
        assert d.stop() == 0, "".join(d.log)
