"""`qprobe demo`: a throwaway VM traced live while it boots, gets a vCPU, and resets."""

from __future__ import annotations

import subprocess
import sys
import time

from qtrace_bpf.commands.demo_vm import DemoQemu


def _say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def run_demo(duration: float | None = None, as_json: bool = False) -> int:
    with DemoQemu("qtrace-demo", preconfig=True, smp="1,maxcpus=4") as vm:
        _say(f"started QEMU pid {vm.pid} in --preconfig (no machine yet): attaching qprobe")
        cmd = [sys.executable, "-m", "qtrace_bpf.cli", "watch", str(vm.pid)]
        if as_json:
            cmd.append("--json")
        if duration:
            cmd += ["--duration", str(duration)]
        watch = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert watch.stderr is not None
        for line in watch.stderr:
            sys.stderr.write(line)
            if "attached to vm" in line:
                break
        else:
            return watch.wait() or 1
        steps = [
            ("create the machine (x-exit-preconfig): boot phase",
             lambda: vm.cmd("x-exit-preconfig")),
            ("run it (cont)", lambda: vm.cmd("cont")),
            ("hot-add a vCPU (device_add)", vm.hotplug_cpu),
            ("reset it over QMP (system_reset)", lambda: vm.cmd("system_reset")),
            ("quit", vm.quit),
        ]
        for what, action in steps:
            time.sleep(1.0)
            _say(what)
            action()
        for line in watch.stderr:
            sys.stderr.write(line)
        return watch.wait()
