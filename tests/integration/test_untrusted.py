"""The daemon among hostile processes: an unprivileged user runs fakes named like QEMU (one
claiming a real QEMU's build-id, many filling slots) and a root-owned parser bomb sits in
the configured globs; the real QEMU started next must be counted exactly, and no
breakpoint may land anywhere but in it."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from support.caps import check_kvm
from support.containers import container
from support.elf_fixtures import nm_address
from support.processes import popen
from support.qprobe import DaemonProcess, daemon_toml
from support.web import free_port, samples

from qtrace_bpf.commands.demo_vm import DemoQemu
from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.symbols import elf as elfio
from qtrace_bpf.vms.targets import running_qemus

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
RSS_LIMIT_MIB = 200


def fake_source(functions: list[str]) -> str:
    body = "".join(f"__attribute__((noinline,used)) void {f}(void) "
                   '{ __asm__ volatile("nop"); }\n' for f in functions)
    return body + "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n"


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def symbol_vaddr(exe: Path, fn: str) -> int:
    """From binutils' nm, .symtab or (a stripped QEMU) .dynsym."""
    found = nm_address(exe, fn) if "symtab" in subprocess.run(
        ["readelf", "-S", str(exe)], capture_output=True, text=True).stdout else []
    if not found:
        out = subprocess.run(["nm", "-D", "--defined-only", str(exe)], capture_output=True,
                             text=True, check=True).stdout
        found = [int(ln.split()[0], 16) for ln in out.splitlines() if ln.endswith(" " + fn)]
    return found[0]


def has_breakpoint(pid: int, exe: Path, functions: list[str]) -> list[str]:
    """The functions whose first byte reads int3 in the running process's memory: a uprobe
    is there (it lives in the page cache of the file every process maps)."""
    base = None
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(exe)) and base is None:
                base = int(line.split("-")[0], 16)
    assert base is not None
    out = []
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for fn in functions:
            mem.seek(base + symbol_vaddr(exe, fn))
            if mem.read(1) == b"\xcc":
                out.append(fn)
    return out


def test_fakes_of_an_unprivileged_user_steer_no_breakpoint(gcc, tmp_path):
    check_kvm()
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    real_id = elfio.read_build_id(real)
    functions = sorted(set(load_catalog().functions))
    # nobody's own directory: nobody can reach and write it (pytest's tmp is root's 0700)
    evil = Path(tempfile.mkdtemp(prefix="qtrace-evil-", dir="/var/tmp"))
    bomb_dir = Path(tempfile.mkdtemp(prefix="qtrace-bomb-", dir="/var/tmp"))
    procs: list[subprocess.Popen] = []
    daemon = None
    try:
        os.chmod(evil, 0o755)
        os.chmod(bomb_dir, 0o755)
        fake = evil / "qemu-system-x86_64"
        src = tmp_path / "fake.c"
        src.write_text(fake_source(functions))
        # the poisoning: the catalog's names at the fake's offsets, under the real build-id
        subprocess.run([gcc, "-O1", "-o", str(fake), str(src), f"-Wl,--build-id=0x{real_id}"],
                       check=True)
        assert elfio.read_build_id(str(fake)) == real_id
        sleepers = []
        for i in range(4):  # slot exhaustion: sleep binaries named like QEMU
            s = evil / f"s{i}" / "qemu-system-x"
            s.parent.mkdir()
            shutil.copy("/bin/sleep", s)
            sleepers.append(s)
        for p in [evil, *evil.iterdir(), *evil.glob("*/*")]:
            os.chown(p, NOBODY, NOBODY)
        # a parser bomb root put in the configured globs: 1 GiB of zeros as MiniDebugInfo
        bomb = bomb_dir / "qemu-system-bomb"
        subprocess.run([gcc, "-O1", "-o", str(bomb), str(src)], check=True)
        (tmp_path / "dd.xz").write_bytes(lzma.compress(b"\0" * (1 << 30), preset=1))
        subprocess.run(["objcopy", "--add-section", f".gnu_debugdata={tmp_path / 'dd.xz'}",
                        str(bomb)], check=True)
        assert bomb.stat().st_size < 1 << 20

        already = len(running_qemus())
        port = free_port()
        cfg = tmp_path / "q.toml"
        cfg.write_text(daemon_toml(port, qemu_binaries=[str(bomb)], rescan_interval=1,
                                   max_vms=already + 1, grace_period=1))
        daemon = DaemonProcess(cfg, port)
        procs.append(popen([*AS_NOBODY, str(fake)]))
        procs += [popen([*AS_NOBODY, str(s), "600"]) for s in sleepers]
        daemon.wait_for(lambda m: samples(m, "qtrace_untrusted_binaries_total")[0][1] >= 5)
        with DemoQemu("real-vm") as vm:
            vm.cmd("cont")
            time.sleep(0.3)
            vm.cmd("system_reset")
            time.sleep(0.3)
            vm.cmd("system_reset")
            time.sleep(0.5)
            vm.cmd("stop")
            qmp = Counter(e["data"]["reason"] for e in vm.collect_events()
                          if e["event"] == "RESET")
            assert qmp["host-qmp-system-reset"] == 2
            m = daemon.wait_for(lambda m: m if sum(
                v for _, v in samples(m, "qtrace_vm_resets_total", vm="real-vm")) >=
                sum(qmp.values()) else None)
            counted = {lab["cause"]: v for lab, v in samples(m, "qtrace_vm_resets_total",
                                                             vm="real-vm") if v}
            assert counted == dict(qmp), "the real QEMU is counted exactly"
            assert vm.proc.poll() is None, "the real QEMU runs"
            assert has_breakpoint(vm.pid, Path(real), ["qemu_system_reset"]) == \
                ["qemu_system_reset"], "the real QEMU is probed where its own symbols say"
        for p in procs:
            assert p.poll() is None
        assert has_breakpoint(procs[0].pid, fake, functions) == [], \
            "no breakpoint in the fake, whatever it claims"
        m = daemon.metrics()
        info = {lab["vm"] for lab, _ in samples(m, "qtrace_vm_info")}
        assert not any(str(evil) in str(lab) for fam in m.values() for _, lab, _ in fam), \
            "a fake's path is no label"
        assert "real-vm" in info
        assert samples(m, "qtrace_vms_refused_total")[0][1] == 0, "fakes hold no VM slot"
        assert peak_rss_mib(daemon.proc.pid) < RSS_LIMIT_MIB, "the bomb inflated in the daemon"
        assert daemon.proc.poll() is None
        bomb_probes = samples(m, "qtrace_probes_attached", binary=str(bomb))
        assert bomb_probes and bomb_probes[0][1] > 0, "the bomb's own symbols still resolve"
        assert any("inflates past" in line for line in daemon.log)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if daemon is not None:
            assert daemon.stop() == 0
        shutil.rmtree(evil)
        shutil.rmtree(bomb_dir)




def test_a_qemu_in_a_container_is_trusted_through_its_own_root(tmp_path):
    """As KubeVirt runs it: QEMU from an image layer (root-owned) in its own mount and PID
    namespaces, its binary reachable only through /proc/PID/root.  It is checked there,
    probed, and counted from its exec."""
    check_kvm()
    real = shutil.which("qemu-system-x86_64")
    root = Path(tempfile.mkdtemp(prefix="qtrace-ctr-", dir="/var/tmp"))
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port, rescan_interval=1))
    daemon = DaemonProcess(cfg, port)
    ctr = None
    try:
        ctr = popen([*container(root), str(real), "-accel", "kvm", "-machine", "q35",
                     "-m", "64", "-display", "none", "-nodefaults", "-boot",
                     "reboot-timeout=500", "-name", "guest=ctr-vm"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        m = daemon.wait_for(lambda m: m if sum(v for _, v in samples(
            m, "qtrace_vm_resets_total", vm="ctr-vm", cause="guest-reset")) >= 2 else None,
            timeout=40)
        pid = next(int(lab["pid"]) for lab, _ in samples(m, "qtrace_vm_info", vm="ctr-vm"))
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe == "/usr/bin/qemu-system-x86_64"
        assert os.stat(f"/proc/{pid}/exe").st_ino != os.stat(real).st_ino, \
            "the container's own copy, not the host's file"
        boot = sum(v for _, v in samples(m, "qtrace_kvm_state_writes_total", vm="ctr-vm",
                                         phase="boot"))
        assert boot > 0, "counted from its first write (found at exec)"
        assert not samples(m, "qtrace_counting_gaps_total", vm="ctr-vm")
        assert samples(m, "qtrace_untrusted_binaries_total")[0][1] == 0
        binaries = [lab["binary"] for lab, _ in samples(m, "qtrace_probes_attached")]
        assert len(binaries) == len(set(binaries)), "two files, two series"
    finally:
        if ctr is not None:
            ctr.kill()
            ctr.wait()
        assert daemon.stop() == 0
        os.rmdir(root)
