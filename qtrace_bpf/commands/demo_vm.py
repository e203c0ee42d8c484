"""A throwaway QEMU/KVM VM driven over QMP (DemoQemu): the demo's subject and the tests' too.

Not a traced VM (that is tracker.TracedVm): this one launches QEMU and talks QMP to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import NegotiationError

from qtrace_bpf.errors import QtraceError

QEMU = "qemu-system-x86_64"


class _Negotiating(QMPClient):
    """qemu.qmp's client, but capabilities negotiation reads past events.

    With out-of-band enabled, QEMU's monitor thread may send an event (a RESET of a
    guest rebooting, ...) between switching the monitor to command mode and sending the
    answer to qmp_capabilities; qemu.qmp asserts that the first message is the answer and
    fails the connection (once seen in a test run).  Events read here are kept in `early`
    and anything else QEMU answered is named in the error."""

    early: list[dict]

    async def _negotiate(self) -> None:
        self.early = []
        args: dict = {}
        if self._greeting and "oob" in self._greeting.QMP.capabilities:
            args["enable"] = ["oob"]
        await self._send(self.make_execute_msg("qmp_capabilities", arguments=args))
        while True:
            reply = dict(await self._recv())
            if "event" in reply:
                self.early.append(reply)
                continue
            if "return" not in reply or "error" in reply:
                raise NegotiationError(f"QEMU answered qmp_capabilities with {reply!r}",
                                       ValueError(reply))
            return


def connect_qmp(path: str, deadline: float,
                alive: Callable[[], bool]) -> QEMUMonitorProtocol:
    """Connect and negotiate, retrying a refusal while QEMU lives and time is left.

    QEMU binds its socket before it listens: a connect in between is refused (seen in CI
    with QEMU under strace, which widens that window)."""
    while True:
        qmp = QEMUMonitorProtocol(path)
        qmp._qmp.__class__ = _Negotiating  # noqa: SLF001 - only _negotiate differs
        try:
            qmp.connect(negotiate=True)
            return qmp
        except ConnectError as e:
            if not isinstance(e.exc, ConnectionRefusedError) or not alive() \
                    or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class DemoQemu:
    """qemu-system-x86_64 -accel kvm, q35, QMP on a unix socket in a private temp dir."""

    def __init__(self, name: str = "qtrace-demo", *, smp: str = "1,maxcpus=4",
                 preconfig: bool = False, paused: bool = True, cpu: str | None = None,
                 extra: Sequence[str] = (), wrapper: Sequence[str] = (), memory: str = "128",
                 qemu: str | None = None, tmp_root: str | None = None):
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise QtraceError("/dev/kvm is missing or not accessible: KVM is needed")
        exe = qemu or shutil.which(QEMU)
        if exe is None:
            raise QtraceError(f"{QEMU} not found (apt-get install qemu-system-x86)")
        self.name = name
        # tmp_root: where the QMP socket's directory goes (a path a wrapper sees too)
        self.dir = tempfile.mkdtemp(prefix="qtrace-vm-", dir=tmp_root)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.argv = [
            *wrapper, exe, "-accel", "kvm", "-machine", "q35", "-m", memory, "-smp", smp,
            "-nodefaults", "-display", "none", "-serial", "none", "-no-user-config",
            "-name", f"guest={name},debug-threads=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if qemu:  # a binary outside /usr/bin does not find the packaged firmware itself
            self.argv += ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]
        if cpu:
            self.argv += ["-cpu", cpu]
        if paused:
            self.argv.append("-S")
        if preconfig:
            self.argv.append("--preconfig")
        self.argv += list(extra)
        self.log_path = os.path.join(self.dir, "qemu.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.qmp: QEMUMonitorProtocol | None = None
        self.events: list[dict] = []
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                raise QtraceError(f"QEMU exited at start ({self.proc.returncode}): "
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QtraceError("QEMU did not open its QMP socket")
            time.sleep(0.02)
        _ = self.pid  # known from now on: close() kills QEMU itself, not only a wrapper
        qmp = connect_qmp(self.qmp_path, deadline, lambda: self.proc.poll() is None)
        self.qmp = qmp
        self.events.extend(qmp._qmp.early)  # noqa: SLF001

    @property
    def pid(self) -> int:
        """The QEMU process (the last exec of the wrapper chain, e.g. under strace)."""
        if not hasattr(self, "_qemu_pid"):
            self._qemu_pid = _find_qemu_pid(self.proc.pid)
        return self._qemu_pid

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def cmd(self, name: str, **args: object) -> object:
        assert self.qmp is not None
        resp = self.qmp.cmd_obj({"execute": name, "arguments": args} if args
                                else {"execute": name})
        self.events.extend(self.qmp.get_events(wait=False))
        if "error" in resp:
            raise QtraceError(f"QMP {name}: {resp['error'].get('desc', resp['error'])}")
        return resp.get("return")

    def collect_events(self, wait: float = 0.0) -> list[dict]:
        assert self.qmp is not None
        deadline = time.monotonic() + wait
        while True:
            self.events.extend(self.qmp.get_events(wait=False))
            if time.monotonic() >= deadline:
                return self.events
            time.sleep(0.05)

    def hotplug_cpu(self, hmp: bool = False) -> dict:
        """device_add the first free hotpluggable CPU slot; returns its props.

        QMP and HMP reach different QEMU functions from 9.2 on (qdev_device_add_from_qdict
        directly vs qdev_device_add): `hmp` takes the monitor's text command."""
        slots = self.cmd("query-hotpluggable-cpus")
        free = [s for s in slots if "qom-path" not in s]  # type: ignore[union-attr]
        if not free:
            raise QtraceError("no free CPU slot (raise maxcpus)")
        slot = free[-1]
        props = dict(slot["props"])
        dev_id = f"cpu-hot-{len(slots) - len(free)}"
        if hmp:
            line = ",".join([slot["type"], f"id={dev_id}", *(f"{k}={v}" for k, v in props.items())])
            out = self.cmd("human-monitor-command", **{"command-line": f"device_add {line}"})
            now = self.cmd("query-hotpluggable-cpus")
            if len([s for s in now if "qom-path" not in s]) == len(free):  # type: ignore[union-attr]
                raise QtraceError(f"HMP device_add {line}: {out}")
        else:
            self.cmd("device_add", driver=slot["type"], id=dev_id, **props)
        return props

    def quit(self, timeout: float = 20.0) -> int:
        try:
            self.cmd("quit")
        except Exception:  # noqa: BLE001 - QEMU may close the socket before answering
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def close(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:  # noqa: BLE001
                pass
            self.qmp = None
        qemu = getattr(self, "_qemu_pid", None)
        if qemu is not None and qemu != self.proc.pid:
            # under a wrapper (strace), killing the wrapper would leave QEMU running
            try:
                os.kill(qemu, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DemoQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the VM (or its wrapper) when the process that started it dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _find_qemu_pid(root: int, timeout: float = 10.0) -> int:
    """The qemu-system process at or below `root` (a wrapper such as strace forks it)."""
    from qtrace_bpf.vms.targets import is_qemu_exe

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [root]
        while todo:
            pid = todo.pop()
            try:
                if is_qemu_exe(os.readlink(f"/proc/{pid}/exe")):
                    return pid
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        time.sleep(0.02)
    raise QtraceError(f"no QEMU process under pid {root}")
