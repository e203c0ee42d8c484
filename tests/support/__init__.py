"""Helpers the tests share, one module per concern: capabilities (caps), the kernel's BPF
state (kernel_state), helper processes, qprobe runs (qprobe), scrapes (web), QEMU builds and
oracles (qemu), gcc-built ELF fixtures (elf_fixtures) and strace counting (strace_count).
Fixtures stay in the conftest.py files; these are plain functions and classes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QPROBE = [sys.executable, "-m", "qtrace_bpf.cli"]
