"""Run inside a Debian guest (scripts/debian-vm.sh) where the qtrace package is installed and
its service runs: drive nested QEMU/KVM VMs and the service, record what happened, and
leave the judging to tests/integration/test_debian_hosts.py on the host.

Debian's packages only (the guest has no pytest, no qemu.qmp): a small QMP client here.

    python3 scenario.py OUTDIR
Writes OUTDIR/result.json and, per step, the nested VM's strace log (OUTDIR/<step>.strace).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request

METRICS = "http://127.0.0.1:10471"
CONFIG = "/etc/qtrace/qtrace.toml"


def sh(*argv: str, check: bool = False, timeout: float = 600) -> dict:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv}: {r.returncode}: {r.stderr[-2000:]}")
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr[-4000:]}


def get(path: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(METRICS + path, timeout=timeout) as r:  # noqa: S310
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_ready(limit: float = 900) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        code, body = get("/-/ready", 10)
        if code == 200:
            return body
        time.sleep(2)
    raise RuntimeError(f"qtrace not ready within {limit}s: {get('/-/ready')}; "
                       + sh("journalctl", "-u", "qtrace", "--no-pager")["out"][-3000:])


class Qmp:
    """Just enough QMP: negotiate (reading past events), execute, keep events."""

    def __init__(self, path: str, limit: float = 120):
        deadline = time.monotonic() + limit
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP socket {path}")
            time.sleep(0.1)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self, timeout: float | None = None) -> dict | None:
        """One message; None when none came within timeout (a buffered socket read that
        times out is broken for good: select() on the raw socket instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(300)
            if reply is None:
                raise RuntimeError(f"QMP {name}: no answer in 300 s")
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return")

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                msg = self._read(left)
                if msg is None:
                    break
                if "event" in msg:
                    self.events.append(msg)
        except (EOFError, OSError):
            pass


def nested_vm(out: str, step: str, *, hotplug: bool = True, resets: int = 1,
              between=None, before_quit=None) -> dict:
    """One nested VM under strace: boot (paused, then running), a QMP vCPU hot-add, QMP
    resets; `between` runs after the first reset (e.g. a daemon restart), `before_quit`
    once the resets are done."""
    qmp_path = f"/run/qtvm-{step}.qmp"
    trace = os.path.join(out, f"{step}.strace")
    argv = ["strace", "-f", "-y", "-ttt", "-e", "trace=ioctl", "-o", trace,
            "qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-m", "64",
            "-smp", "1,maxcpus=2", "-nodefaults", "-display", "none", "-serial", "none",
            "-name", f"guest={step},debug-threads=on", "-S",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = Qmp(qmp_path)
    qemu_pid = int(sh("pgrep", "-f", f"guest={step},", check=True)["out"].split()[-1])
    qmp.cmd("cont")
    qmp.drain(1)
    hot = None
    if hotplug:
        slots = qmp.cmd("query-hotpluggable-cpus")
        free = [s for s in slots if "qom-path" not in s]
        hot = dict(free[-1]["props"])
        qmp.cmd("device_add", driver=free[-1]["type"], id="cpu-hot-1", **hot)
        qmp.drain(2)
    done_between = None
    for i in range(resets):
        qmp.cmd("system_reset")
        qmp.drain(2)
        if i == 0 and between is not None:
            done_between = between()
    if before_quit is not None:
        before_quit()
    qmp.cmd("stop")
    qmp.drain(1)
    resets_seen = [e["data"]["reason"] for e in qmp.events if e["event"] == "RESET"]
    try:
        qmp.cmd("quit")
    except (EOFError, OSError, RuntimeError):
        pass
    proc.wait(120)
    return {"step": step, "pid": qemu_pid, "strace": trace, "resets": resets_seen,
            "hotplug": hot, "between": done_between}


def set_hook(mode: str) -> None:
    text = open(CONFIG).read()
    text = re.sub(r'(?m)^kernel_hook = .*$', f'kernel_hook = "{mode}"', text)
    with open(CONFIG, "w") as f:
        f.write(text)


def journal_since(cursor_file: str) -> str:
    return sh("journalctl", "-u", "qtrace", "--no-pager", "-o", "cat",
              f"--cursor-file={cursor_file}")["out"]


def main() -> int:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    res: dict = {"kernel": os.uname().release, "steps": {}}
    cursor = "/run/qtvm-journal.cursor"
    journal_since(cursor)  # start the cursor here
    res["doctor"] = json.loads(sh("qprobe", "doctor", "--json")["out"] or "{}")
    res["unit"] = sh("systemctl", "show", "qtrace", "-p", "User", "-p", "AmbientCapabilities",
                     "-p", "CapabilityBoundingSet")["out"]
    for mode in ("auto", "kprobe", "tracepoint"):
        if mode != "auto":
            set_hook(mode)
            sh("systemctl", "restart", "qtrace", check=True, timeout=1200)
        res.setdefault("ready", {})[mode] = wait_ready()
        step = nested_vm(out, f"vm-{mode}")
        time.sleep(1)
        step["metrics"] = get("/metrics")[1]
        step["links"] = sh("bpftool", "-j", "link", "show")["out"]
        step["boot_journal"] = sh("journalctl", "-b", "-u", "qtrace", "--no-pager", "-o",
                                  "short-monotonic")["out"][-20000:]
        step["dmesg"] = sh("dmesg")["out"][-20000:]
        step["journal"] = journal_since(cursor)
        res["steps"][mode] = step
        if mode in ("auto", "kprobe"):  # restarts keep the pins and the counts

            def restart(mode=mode) -> dict:
                before = get("/metrics")[1]
                sh("systemctl", "restart", "qtrace", check=True, timeout=1200)
                wait_ready()
                return {"before": before, "after": get("/metrics")[1],
                        "journal": journal_since(cursor)}

            step = nested_vm(out, f"restart-{mode}", hotplug=False, resets=2, between=restart)
            time.sleep(1)
            step["metrics"] = get("/metrics")[1]
            res["steps"][f"restart-{mode}"] = step
    # a daemon killed: the kernel goes on counting; the unit starts it again
    set_hook("auto")
    sh("systemctl", "restart", "qtrace", check=True, timeout=1200)
    wait_ready()

    def killed() -> dict:
        pid = sh("systemctl", "show", "-p", "MainPID", "--value", "qtrace")["out"].strip()
        os.kill(int(pid), 9)
        return {"killed": int(pid)}

    def restarted() -> None:  # by the unit, while the VM still runs (RestartSec=5s)
        time.sleep(8)
        wait_ready()

    step = nested_vm(out, "killed", hotplug=False, resets=3, between=killed,
                     before_quit=restarted)
    time.sleep(1)
    step["metrics"] = get("/metrics")[1]
    step["journal"] = journal_since(cursor)
    res["steps"]["killed"] = step
    # qprobe watch on one VM (the engineer's tool, as root)
    watch_out = os.path.join(out, "watch.jsonl")
    watch_err = os.path.join(out, "watch.err")
    qmp_path = "/run/qtvm-watch.qmp"
    proc = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-m", "64",
                             "-smp", "1,maxcpus=2", "-nodefaults", "-display", "none",
                             "-name", "guest=watched", "-S", "-qmp",
                             f"unix:{qmp_path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qmp = Qmp(qmp_path)
    qpid = int(sh("pgrep", "-f", "guest=watched", check=True)["out"].split()[-1])
    with open(watch_out, "w") as wf, open(watch_err, "w") as ef:
        watcher = subprocess.Popen(["qprobe", "watch", str(qpid), "--json"], stdout=wf,
                                   stderr=ef, text=True)
        deadline = time.monotonic() + 900  # BCC compiles the program first (TCG: slow)
        while "attached to vm" not in open(watch_err).read() and time.monotonic() < deadline:
            if watcher.poll() is not None:
                break
            time.sleep(1)
        time.sleep(2)
        qmp.cmd("cont")
        slots = qmp.cmd("query-hotpluggable-cpus")
        free = [s for s in slots if "qom-path" not in s]
        qmp.cmd("device_add", driver=free[-1]["type"], id="cpu-hot-1", **free[-1]["props"])
        qmp.drain(2)
        qmp.cmd("system_reset")
        qmp.drain(2)
        qmp.cmd("quit")
        proc.wait(120)
        watcher.wait(120)
    res["watch"] = {"rc": watcher.returncode, "stderr": open(watch_err).read()[-3000:],
                    "events": [json.loads(ln) for ln in open(watch_out) if ln.startswith("{")]}
    # apt purge: nothing of qtrace stays in the kernel
    res["purge"] = sh("apt-get", "purge", "-y", "qtrace", timeout=600)
    res["after_purge"] = {
        "pins": sh("sh", "-c", "ls -R /sys/fs/bpf")["out"],
        "progs": sh("bpftool", "-j", "prog", "show")["out"],
        "links": sh("bpftool", "-j", "link", "show")["out"],
        "uprobe_events": sh("cat", "/sys/kernel/tracing/uprobe_events")["out"],
        "kprobe_events": sh("cat", "/sys/kernel/tracing/kprobe_events")["out"],
    }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
