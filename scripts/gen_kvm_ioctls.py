#!/usr/bin/env python3
"""Regenerate qtrace_bpf/kvm_ioctl_numbers.py from <linux/kvm.h> (needs gcc, linux-libc-dev).

The names and their meaning stay in qtrace_bpf/kvm_ioctls.py; only the compiler numbers them.
tests/test_abi.py fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qtrace_bpf.kvm_ioctls import generate_numbers  # noqa: E402

target = Path(__file__).resolve().parent.parent / "qtrace_bpf" / "kvm_ioctl_numbers.py"
target.write_text(generate_numbers())
print(f"wrote {target}")
