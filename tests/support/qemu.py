"""The QEMU builds every scenario runs on, and ways into a running QEMU that do not go
through qtrace (the oracles' side)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from support import ROOT
from support.caps import require

if TYPE_CHECKING:
    from qtrace_bpf.commands.demo_vm import DemoQemu


def upstream_qemu() -> str | None:
    """The upstream QEMU that scripts/build-qemu.sh built and cached (test.sh exports it)."""
    path = os.environ.get("QTRACE_UPSTREAM_QEMU")
    if path:
        return path if os.access(path, os.X_OK) else None
    found = sorted(p for p in glob.glob("/var/cache/qtrace/qemu/*/bin/qemu-system-x86_64")
                   if "-dtrace/" not in p)
    return found[-1] if found else None


def dtrace_qemu() -> str | None:
    """The upstream QEMU built with --enable-trace-backends=dtrace (USDT probes)."""
    found = sorted(glob.glob("/var/cache/qtrace/qemu/*-dtrace/bin/qemu-system-x86_64"))
    return found[-1] if found else None

# The QEMU versions every scenario runs on: Debian's (stripped, .dynsym only) and an
# upstream build with full DWARF.  Adding one: a build in scripts/build-qemu.sh, a line here.
QEMU_BUILDS = ("debian-7.2", "upstream-10.0")


def host_tsc_khz() -> int:
    """The host's TSC kHz (KVM_GET_TSC_KHZ on a scratch vCPU): no TSC scaling in nested KVM,
    so a VM can only be given this frequency."""
    import fcntl

    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU
        khz = fcntl.ioctl(vcpu, 0xAEA3, 0)  # KVM_GET_TSC_KHZ
        os.close(vcpu)
        os.close(vm)
        return khz
    finally:
        os.close(kvm)


def vcpu_fd(pid: int, vcpu: int = 0) -> int:
    """The fd number of a QEMU's vCPU in its own fd table."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == f"anon_inode:kvm-vcpu:{vcpu}":
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"pid {pid} has no fd for vCPU {vcpu}")


def call_ioctl_inside(pid: int, fd: int, cmd: int, arg: int, tmp: Path) -> int:
    """ioctl(fd, cmd, arg) made by the process itself (its main thread), as gdb's `call`
    makes it (tests/c/inject_ioctl.c says why not gdb itself).  The VM must be paused (QMP
    stop): no vCPU thread may sit in KVM_RUN holding the vCPU.  Returns what ioctl returned."""
    exe = tmp / "inject_ioctl"
    if not exe.exists():
        cc = shutil.which("gcc")
        require("gcc", cc is not None, "apt-get install gcc")
        subprocess.run([str(cc), "-O2", "-Wall", "-Werror", "-o", str(exe),
                        str(ROOT / "tests" / "c" / "inject_ioctl.c")], check=True)
    r = subprocess.run([str(exe), str(pid), str(fd), hex(cmd), str(arg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def kvm_numbers(gcc: str, names) -> dict[int, str]:
    """ioctl number -> name, as the compiler reads <linux/kvm.h> (for oracles that log
    numbers, e.g. QEMU's kvm_vcpu_ioctl trace event; independent of qtrace's tables)."""
    import tempfile

    lines = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for n in sorted(names):
        lines += [f"#ifdef {n}", f'printf("{n} %lu\\n", (unsigned long)({n}));', "#endif"]
    lines += ["return 0; }"]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "k.c", Path(tmp) / "k"
        src.write_text("\n".join(lines) + "\n")
        subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {int(v): n for n, v in (ln.split() for ln in out.splitlines())}


def qmp_resets(vm: DemoQemu) -> Counter:
    return Counter(e["data"]["reason"] for e in vm.collect_events() if e["event"] == "RESET")
