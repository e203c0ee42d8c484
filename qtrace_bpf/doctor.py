"""`qprobe doctor`: what this host supports, and which kernel hook a session would use."""

from __future__ import annotations

import os
import shutil

from . import hooks
from .errors import QtraceError


def _bcc_status() -> tuple[bool, str]:
    try:
        import bcc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False, "missing: apt-get install python3-bpfcc (and a --system-site-packages venv)"
    return True, "python3-bpfcc importable"


def run_doctor() -> dict:
    checks: dict[str, dict] = {}

    def add(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": ok, "detail": detail}

    add("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else
        "not root: BPF needs root or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE")
    add("bcc", *_bcc_status())
    build = f"/lib/modules/{os.uname().release}/build"
    add("kernel_headers", os.path.exists(build),
        f"{build} -> {os.path.realpath(build)}" if os.path.exists(build) else
        f"{build} missing (scripts/setup.sh links Debian's linux-headers-amd64)")
    add("btf", os.path.exists("/sys/kernel/btf/vmlinux"), "/sys/kernel/btf/vmlinux")
    root = hooks.tracefs_root()
    add("tracefs", root is not None, root or "not mounted")
    add("uprobes", root is not None and os.path.exists(os.path.join(root, "uprobe_events")),
        "uprobe_events in tracefs")
    add("kvm", os.path.exists("/dev/kvm"), "/dev/kvm")
    qemu = shutil.which("qemu-system-x86_64")
    add("qemu", qemu is not None, qemu or "qemu-system-x86_64 not on PATH")

    prechecks = {m: hooks.precheck(m) for m in hooks.MODES}
    hook_report = {m: {"usable": c.usable, "reason": c.reason} for m, c in prechecks.items()}
    chosen = None
    if checks["root"]["ok"] and checks["bcc"]["ok"] and checks["kernel_headers"]["ok"]:
        # The real answer: compile and try each hook, as a watch session would.
        from .catalog import load_catalog
        from .session import Session

        try:
            s = Session(load_catalog())
            chosen = s.hook_mode
            for mode, why in s.refusals.items():
                hook_report[mode] = {"usable": False, "reason": why}
            hook_report[chosen] = {"usable": True, "reason": hook_report[chosen]["reason"]}
            s.close()
        except QtraceError as exc:
            add("session", False, str(exc))
    ready = chosen is not None and checks["uprobes"]["ok"]
    return {"checks": checks, "kernel_hooks": hook_report, "kernel_hook": chosen,
            "kernel": os.uname().release, "ready": ready}


def render_doctor(report: dict) -> str:
    lines = [f"kernel {report['kernel']}"]
    for name, c in report["checks"].items():
        lines.append(f"  {'ok ' if c['ok'] else 'NO '} {name:<15} {c['detail']}")
    lines.append("kernel hook on KVM ioctls (preference order):")
    for mode, h in report["kernel_hooks"].items():
        mark = "use" if mode == report["kernel_hook"] else ("ok " if h["usable"] else "NO ")
        lines.append(f"  {mark} {mode:<11} {h['reason']}")
    lines.append(f"will use: {report['kernel_hook'] or 'nothing: qprobe cannot trace here'}")
    return "\n".join(lines)
