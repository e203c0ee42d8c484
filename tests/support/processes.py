"""Helper processes that never outlive the test run, and the strays of earlier runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (a timeout, a kill)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def popen(argv: list[str], **kw) -> subprocess.Popen:
    """Popen for helpers (qprobe, prometheus): never outlives the test run."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)


def kill_stray_test_processes() -> list[str]:
    """QEMUs of earlier runs (their QMP socket sits in a qtrace-vm-* temp dir: under strace,
    killing the wrapper leaves QEMU running) and qprobe processes of this checkout."""
    import signal

    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        # QEMUs of our VM helper (QMP socket in a qtrace-vm-* dir) or run from a test's
        # own copy of the binary (a pytest tmp dir)
        stray_vm = "qemu-system" in text and ("qtrace-vm-" in text or
                                              text.startswith("/tmp/pytest-of-"))
        stray_qprobe = "qtrace_bpf.cli" in text and ("daemon" in text or "watch" in text)
        if stray_vm or stray_qprobe:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(text[:120])
            except OSError:
                pass
    return killed


def remove_stray_pods(root: Path) -> list[str]:
    """Pods that tests/integration/test_kubernetes_pod.py played (qtrace-PORT) and a killed
    run left running: their daemon would hold its pins and its port."""
    import re
    import shutil

    if shutil.which("podman") is None or os.geteuid() != 0:
        return []
    env = {**os.environ, "CONTAINERS_CONF": str(root / "scripts" / "podman.conf")}
    names = subprocess.run(["podman", "pod", "ls", "--format", "{{.Name}}"], env=env,
                           capture_output=True, text=True).stdout.split()
    stray = [n for n in names if re.fullmatch(r"qtrace-\d+", n)]
    for name in stray:
        subprocess.run(["podman", "pod", "rm", "-f", name], env=env, capture_output=True)
    return stray
