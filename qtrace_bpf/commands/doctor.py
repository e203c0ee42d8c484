"""`qprobe doctor`: what this host supports, and which kernel hook qprobe would use."""

from __future__ import annotations

import os
import shutil

from qtrace_bpf.errors import QtraceError
from qtrace_bpf.program import bcc_compile, kernel_hook, preflight


def _passes(check, ok: str) -> tuple[bool, str]:
    """(True, ok) when the check passes, else (False, its error message)."""
    try:
        check()
    except QtraceError as exc:
        return False, str(exc)
    return True, ok


def run_doctor() -> dict:
    checks: dict[str, dict] = {}

    def add(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": ok, "detail": detail}

    add("root", *_passes(preflight.check_privileges, "running as root"))
    add("bcc", *_passes(preflight.import_bcc, "python3-bpfcc importable"))
    build = preflight.kernel_headers_dir()
    add("kernel_headers", *_passes(preflight.check_kernel_headers,
                                   f"{build} -> {os.path.realpath(build)}"))
    add("btf", os.path.exists("/sys/kernel/btf/vmlinux"), "/sys/kernel/btf/vmlinux")
    root = kernel_hook.tracefs_root()
    add("tracefs", root is not None, root or "not mounted")
    add("uprobes", root is not None and os.path.exists(os.path.join(root, "uprobe_events")),
        "uprobe_events in tracefs")
    add("kvm", os.path.exists("/dev/kvm"), "/dev/kvm")
    qemu = shutil.which("qemu-system-x86_64")
    add("qemu", qemu is not None, qemu or "qemu-system-x86_64 not on PATH")

    prechecks = {m: kernel_hook.precheck(m) for m in kernel_hook.MODES}
    hook_report = {m: {"usable": c.usable, "reason": c.reason} for m, c in prechecks.items()}
    chosen = None
    if checks["root"]["ok"] and checks["bcc"]["ok"] and checks["kernel_headers"]["ok"]:
        # The real answer: compile and try each hook, as a watch session would.
        from qtrace_bpf.contract.catalog import load_catalog
        from qtrace_bpf.program.compiled import QtraceProgram

        try:
            with QtraceProgram(load_catalog()) as prog:
                chosen = prog.hook_mode
                for mode, why in prog.refusals.items():
                    hook_report[mode] = {"usable": False, "reason": why}
            hook_report[chosen] = {"usable": True, "reason": hook_report[chosen]["reason"]}
        except QtraceError as exc:
            add("program", False, str(exc))
    ready = chosen is not None and checks["uprobes"]["ok"]
    return {"checks": checks, "kernel_hooks": hook_report, "kernel_hook": chosen,
            "uprobes": bcc_compile.uprobe_mode(), "kernel": os.uname().release, "ready": ready}


def render_doctor(report: dict) -> str:
    lines = [f"kernel {report['kernel']}"]
    for name, c in report["checks"].items():
        lines.append(f"  {'ok ' if c['ok'] else 'NO '} {name:<15} {c['detail']}")
    lines.append("kernel hook on KVM ioctls (preference order):")
    for mode, h in report["kernel_hooks"].items():
        mark = "use" if mode == report["kernel_hook"] else ("ok " if h["usable"] else "NO ")
        lines.append(f"  {mark} {mode:<11} {h['reason']}")
    lines.append(f"will use: {report['kernel_hook'] or 'nothing: qprobe cannot trace here'}")
    how = {"multi": "uprobe_multi links (kernel >= 6.6)",
           "perf": "one perf event per uprobe (kernel < 6.6)"}
    lines.append(f"uprobes attach as: {how.get(report['uprobes'], report['uprobes'])}")
    return "\n".join(lines)
