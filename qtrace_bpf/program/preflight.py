"""What must hold before a BPF program can load: privileges, BCC, kernel headers; and the
words for a load that failed for want of a resource.

Why apart: `qprobe doctor` asks the same questions without loading anything, and each
answer is a QtraceError an operator can act on (never a traceback).
"""

from __future__ import annotations

import os
import resource

from qtrace_bpf.errors import QtraceError

_CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_PERFMON": 38, "CAP_BPF": 39}


def import_bcc():
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError:
        raise QtraceError(
            "BCC is not installed for this Python: apt-get install python3-bpfcc bpfcc-tools "
            "(Debian's package; the PyPI package named 'bcc' is unrelated), and use a venv "
            "made with --system-site-packages (scripts/setup.sh does both)") from None
    return bcc


def effective_caps() -> set[str]:
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return set()
    return {name for name, bit in _CAPS.items() if eff & (1 << bit)}


def check_privileges() -> None:
    """Root, or the capabilities the shipped unit grants: said by name when one is missing."""
    caps = effective_caps()
    if "CAP_SYS_ADMIN" in caps:
        return
    missing = [c for c in ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE") if c not in caps]
    if missing:
        who = "running as root but " if os.geteuid() == 0 else ""
        raise QtraceError(f"permission denied: {who}missing capability {', '.join(missing)} "
                          "(loading BPF programs needs root, or CAP_BPF, CAP_PERFMON and "
                          "CAP_SYS_PTRACE)")


def kernel_headers_dir() -> str:
    return f"/lib/modules/{os.uname().release}/build"


def check_kernel_headers() -> None:
    build = kernel_headers_dir()
    if not os.path.exists(build):
        release = os.uname().release
        raise QtraceError(f"kernel headers missing for the running kernel {release}: {build} "
                          f"does not exist (BCC compiles against them); fix: apt install "
                          f"linux-headers-{release}, then restart (a kernel Debian does not "
                          f"package: link {build} to its headers)")


def resource_problem(text: str) -> str | None:
    """A load that failed for want of a resource, named as such (not "does not compile")."""
    if "Too many open files" in text:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (f"file-descriptor limit too low: {soft} open files (RLIMIT_NOFILE; the unit's "
                "LimitNOFILE=): loading the BPF program needs a few hundred")
    if "Cannot allocate memory" in text or "Operation not permitted" in text and \
            "memlock" in text.lower():
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return (f"locked-memory limit too low ({soft} bytes, RLIMIT_MEMLOCK; LimitMEMLOCK=) or "
                "the kernel is out of memory for BPF maps: raise it, or lower max_vms")
    return None
