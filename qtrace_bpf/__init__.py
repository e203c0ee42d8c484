"""qtrace: trace when and why QEMU writes vCPU state into KVM."""

from __future__ import annotations

import functools
import os
import subprocess

__version__ = "0.2.0"  # the one source: pyproject, the CLI, build info and debian/ read it


@functools.lru_cache(maxsize=1)
def revision() -> str:
    """The source revision: written into _revision.py when a package is built
    (scripts/build-deb.sh), else asked of git in a checkout, else "unknown"."""
    try:
        from ._revision import REVISION  # type: ignore[import-not-found]

        return str(REVISION)
    except ImportError:
        pass
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(top, ".git")):  # a directory, or a worktree's file
        try:
            out = subprocess.run(["git", "-C", top, "rev-parse", "--short=12", "HEAD"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"
