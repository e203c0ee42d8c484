"""The first instruction of a probed function, and what a uprobe on it costs.

Why it matters: the x86 uprobe code emulates some first instructions (push, nop, jmp:
~0.7 us a hit) and single-steps the rest (lea, mov, sub: ~20 us a hit); `qprobe symbols`
says which, so nobody probes a hot path blind.
"""

from __future__ import annotations

# First-instruction prefixes the x86 uprobe code emulates instead of single-stepping
# (cheap: ~0.7 us a hit) and a few that are single-stepped (~20 us a hit).
FIRST_INSN = [
    (b"\xf3\x0f\x1e\xfa", "endbr64", None),
    (b"\x55", "push %rbp", True),
    (b"\x53", "push %rbx", True),
    (b"\x41\x54", "push %r12", True),
    (b"\x41\x55", "push %r13", True),
    (b"\x41\x56", "push %r14", True),
    (b"\x41\x57", "push %r15", True),
    (b"\x90", "nop", True),
    (b"\x0f\x1f", "nop", True),
    (b"\xe9", "jmp rel32", True),
    (b"\xeb", "jmp rel8", True),
    (b"\xe8", "call rel32", True),
    (b"\x48\x8d", "lea", False),
    (b"\x48\x83\xec", "sub $imm8,%rsp", False),
    (b"\x48\x81\xec", "sub $imm32,%rsp", False),
    (b"\x48\x89", "mov", False),
    (b"\x48\x8b", "mov", False),
    (b"\x8b", "mov", False),
    (b"\x89", "mov", False),
    (b"\x31", "xor", False),
    (b"\xc3", "ret", False),
]


def classify(code: bytes) -> tuple[str, bool | None]:
    if code.startswith(b"\xf3\x0f\x1e\xfa"):
        rest, prefix = code[4:], "endbr64; "
    else:
        rest, prefix = code, ""
    for pattern, name, emulated in FIRST_INSN[1:]:
        if rest.startswith(pattern):
            return prefix + name, emulated
    return prefix + (rest[:4].hex() or "?"), None
