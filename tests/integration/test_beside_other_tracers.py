"""Other tracers beside a running daemon: bpftrace and perf attach to the same QEMU functions,
gdb sets breakpoints.  (A uprobe attached with a garbage ref_ctr_offset, as BCC's Python
binding does, makes the kernel refuse every later uprobe on the same function: EINVAL.)"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from support.caps import require
from support.web import vm_resets

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
QEMU = "/usr/bin/qemu-system-x86_64"


def test_bpftrace_perf_and_gdb_beside_the_daemon(daemon):
    for tool in ("bpftrace", "perf", "gdb"):
        require(tool, shutil.which(tool) is not None,
                "apt-get install bpftrace linux-perf gdb (scripts/setup.sh)")
    d = daemon()
    with DemoQemu("neighbours") as vm:
        vm.cmd("cont")
        out: dict[str, str] = {}

        def run_bpftrace() -> None:
            p = subprocess.Popen(["bpftrace", "-e", f"uprobe:{QEMU}:qemu_system_reset "
                                  "{ @resets = count(); } interval:s:4 { exit(); }"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out["bpftrace"] = p.communicate(timeout=60)[0]
            _remove_uprobe_events(f"_bcc_{p.pid}")  # bpftrace 0.17 leaves its tracefs event

        t = threading.Thread(target=run_bpftrace)
        t.start()
        time.sleep(2)  # attached by now
        vm.cmd("system_reset")
        t.join(60)
        assert "@resets: " in out["bpftrace"] and "@resets: 0" not in out["bpftrace"], \
            out["bpftrace"]
        d.wait_for(lambda m: vm_resets(m, "neighbours").get("host-qmp-system-reset") == 1)

        r = subprocess.run(["perf", "probe", "-x", QEMU, "qemu_system_reset"],
                           capture_output=True, text=True, timeout=60)
        try:
            assert r.returncode == 0, r.stderr
        finally:
            subprocess.run(["perf", "probe", "-d", "probe_qemu:*"], capture_output=True)

        g = subprocess.run(["gdb", "-p", str(vm.pid), "-batch", "-ex",
                            "break qemu_system_reset", "-ex", "info breakpoints"],
                           capture_output=True, text=True, timeout=120)
        assert "qemu_system_reset" in g.stdout and g.returncode == 0, g.stdout + g.stderr
        assert vm.cmd("query-status")["status"] in ("running", "paused")


def _remove_uprobe_events(suffix: str) -> None:
    path = "/sys/kernel/tracing/uprobe_events"
    with open(path) as f:
        names = [ln.split()[0].split(":", 1)[1] for ln in f if suffix in ln]
    for name in names:
        with open(path, "a") as f:
            f.write(f"-:{name}\n")
