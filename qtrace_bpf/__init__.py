"""qtrace: trace when and why QEMU writes vCPU state into KVM."""

from __future__ import annotations

import functools
import os
import subprocess

__version__ = "0.2.0"  # the one source: pyproject, the CLI, build info and debian/ read it


def _git(*args: str) -> str:
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(top, ".git")):  # a directory, or a worktree's file
        return ""
    try:
        out = subprocess.run(["git", "-C", top, *args], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """revision, branch and build date: written into _revision.py when a package is built
    (scripts/build-deb.sh), else asked of git in a checkout, else "unknown"."""
    try:
        from qtrace_bpf import _revision  # type: ignore[attr-defined]

        return {"revision": str(_revision.REVISION),
                "branch": str(getattr(_revision, "BRANCH", "unknown")),
                "build_date": str(getattr(_revision, "BUILD_DATE", "unknown"))}
    except ImportError:
        pass
    return {"revision": _git("rev-parse", "--short=12", "HEAD") or "unknown",
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
            "build_date": _git("log", "-1", "--format=%cd", "--date=format:%Y%m%d-%H:%M:%S")
            or "unknown"}


def revision() -> str:
    return build_info()["revision"]


def version_text(prog: str = "qprobe") -> str:
    """What --version prints and the daemon logs at start (prometheus/common's layout)."""
    import platform

    b = build_info()
    return (f"{prog}, version {__version__} (branch: {b['branch']}, revision: "
            f"{b['revision']})\n  build date:       {b['build_date']}\n"
            f"  python version:   {platform.python_version()}\n"
            f"  platform:         {platform.system().lower()}/{platform.machine()}")
