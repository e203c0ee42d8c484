"""Compiling and loading probes/qtrace.bpf.c with BCC for one kernel hook: its flags,
libbcc's error text kept as the refusal reason, and retries when a signal interrupts the
verifier (EAGAIN must not read as "this kernel refuses the hook").
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading

from qtrace_bpf import procfs
from qtrace_bpf.contract import abi
from qtrace_bpf.program import kernel_hook
from qtrace_bpf.program.preflight import resource_problem

LOAD_ATTEMPTS = 4


def uprobe_mode() -> str:
    """"multi" (uprobe_multi links, kernel >= 6.6: no CAP_SYS_ADMIN needed) or "perf" (a
    perf event per uprobe).  QTRACE_UPROBES=perf forces the older path (tests use it)."""
    forced = os.environ.get("QTRACE_UPROBES", "")
    if forced in ("perf", "multi"):
        return forced
    return "multi" if kernel_hook.uprobe_multi() else "perf"


def cflags(mode: str, *, discovery: bool = True, write_events: bool = True,
           max_vms: int = 1024, max_vcpus: int = 64, pin_dir: str | None = None) -> list[str]:
    """How probes/qtrace.bpf.c is compiled for one kernel hook and one use."""
    flags = [f"-DQTRACE_HOOK_{mode.upper()}", f"-I{abi.include_dir()}",
             f"-DMAX_VMS={max_vms}", f"-DMAX_VCPUS={max_vcpus}", "-Wno-unused-function"]
    ns = procfs.pid_namespace()
    if ns:
        flags += [f"-DQTRACE_PIDNS_DEV={ns[0]}ULL", f"-DQTRACE_PIDNS_INO={ns[1]}ULL"]
    if pin_dir:
        flags.append(f'-DQTRACE_PIN_DIR="{pin_dir}/maps"')
    if discovery:
        flags.append("-DQTRACE_DISCOVERY")
    if write_events:
        flags.append("-DQTRACE_WRITE_EVENTS")
    return flags


class CapturedStderr:
    """libbcc prints load errors on fd 2; keep them for the refusal reason instead."""

    def __enter__(self) -> CapturedStderr:
        self.text = ""
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


@contextlib.contextmanager
def signals_held():
    """Hold catchable signals while the verifier runs: one that lands mid-load makes the
    kernel answer EAGAIN.  Held signals are delivered (and handled) right after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGCHLD, signal.SIGWINCH}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def transient(text: str) -> bool:
    """EAGAIN/EINTR from the kernel: a signal interrupted the load, try again."""
    return "Resource temporarily unavailable" in text or "Interrupted system call" in text


def refusal(mode: str, failure: str, bcc_stderr: str) -> str:
    """Why a hook's program did not load, in one line an operator can act on."""
    problem = resource_problem(failure + bcc_stderr)
    if problem:
        return f"{mode} program cannot load: {problem}"
    lines = [ln.strip() for ln in bcc_stderr.splitlines() if ln.strip()]
    kernel = next((ln for ln in lines if ln.startswith("bpf:")), "")
    if "super-user" in failure and os.geteuid() == 0:
        failure = "the kernel refused to load the program although we are root"
    if "Failed to compile" in failure:
        errors = [ln for ln in lines if "error:" in ln][:2]
        return f"{mode} program does not compile here: {' / '.join(errors) or failure}"
    return f"{failure}" + (f" ({kernel})" if kernel else "")
