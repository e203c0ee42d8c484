"""The first instruction of a probed function, and what a uprobe on it costs.

Why it matters: the x86 uprobe code emulates some first instructions (push, nop, jmp:
~0.7 us a hit) and single-steps the rest (lea, mov, sub: ~20 us a hit); `qprobe symbols`
says which, so nobody probes a hot path blind, and emulated_site() finds where a probe on a
single-stepped function can sit on an emulated instruction instead.
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


# ------------------------------------------------------------- a cheaper place for the entry
# A probe on a single-stepped first instruction can sit instead on the first emulated one,
# when every instruction before it runs on every call, writes no register the handler reads
# and nothing jumps between them.  The decoder below knows only the few instructions QEMU's
# small functions start with; anything else ends the search (the probe stays at the entry).
RSP, RSI, RDI = 4, 6, 7
ARG_REGISTERS = {1: RDI, 2: RSI}  # the SysV ABI's first two integer arguments
MAX_SKIPPED = 4  # instructions moved past, at most
MAX_FUNCTION_READ = 1 << 20  # a function's bytes scanned for jumps into its first lines


def _emulated(code: bytes) -> str | None:
    """The name of the instruction if the kernel emulates it (jcc too), else None."""
    if code[:1] and 0x70 <= code[0] <= 0x7F or code[:1] == b"\x0f" and len(code) > 1 \
            and 0x80 <= code[1] <= 0x8F:
        return "jcc"
    for pattern, name, emulated in FIRST_INSN[1:]:
        if emulated and code.startswith(pattern):
            return name
    return None


def _skippable(code: bytes) -> tuple[int, int] | None:
    """(length, register written or -1) of a straight-line instruction that writes no
    memory, or None for anything this decoder does not know."""
    if code.startswith(b"\xf3\x0f\x1e\xfa"):
        return 4, -1  # endbr64
    i, rex = (1, code[0]) if code[:1] and 0x40 <= code[0] <= 0x4F else (0, 0)
    if len(code) < i + 2:
        return None
    op, modrm = code[i], code[i + 1]
    if 0xB8 <= op <= 0xBF:  # mov $imm, reg (movabs with REX.W)
        return i + (9 if rex & 8 else 5), op - 0xB8 + (8 if rex & 1 else 0)
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    r, b, n = reg + (8 if rex & 4 else 0), rm + (8 if rex & 1 else 0), i + 2
    if mod == 3:  # register operands only
        if op in (0x01, 0x03, 0x09, 0x0B, 0x21, 0x23, 0x29, 0x2B, 0x31, 0x33, 0x89, 0x8B):
            return n, r if op & 2 else b  # add/or/and/sub/xor/mov: bit 1 = "to reg"
        if op in (0x84, 0x85, 0x38, 0x39, 0x3A, 0x3B):
            return n, -1  # test, cmp: flags only
        if op in (0x83, 0x81) and reg in (0, 5, 7):  # add/sub/cmp $imm, reg
            return n + (1 if op == 0x83 else 4), -1 if reg == 7 else b
        return None
    if mod == 0 and rm == 5:  # RIP-relative memory operand, only read
        if op in (0x8B, 0x8D):
            return n + 4, r  # mov load, lea
        if op in (0x39, 0x3B, 0x38, 0x3A, 0x85):
            return n + 4, -1  # cmp/test with memory
        if op in (0x80, 0x83, 0x81) and reg == 7:
            return n + 4 + (4 if op == 0x81 else 1), -1  # cmp $imm, mem
    return None


def _jump_targets(code: bytes) -> set[int]:
    """Every offset a relative jump or call decoded at any byte of `code` would reach: more
    than the real ones (some are not instructions), never fewer."""
    out = set()
    for j in range(len(code)):
        op = code[j]
        if 0x70 <= op <= 0x7F or op == 0xEB:
            if j + 2 <= len(code):
                out.add(j + 2 + int.from_bytes(code[j + 1:j + 2], "little", signed=True))
        elif op in (0xE8, 0xE9):
            if j + 5 <= len(code):
                out.add(j + 5 + int.from_bytes(code[j + 1:j + 5], "little", signed=True))
        elif op == 0x0F and j + 6 <= len(code) and 0x80 <= code[j + 1] <= 0x8F:
            out.add(j + 6 + int.from_bytes(code[j + 2:j + 6], "little", signed=True))
    return out


def emulated_site(code: bytes) -> tuple[int, str, list[int]]:
    """Where in a function (its whole code) the first emulated instruction is, its name and
    the registers the instructions before it write: (0, "", []) when there is no such place
    or the first instruction is emulated already."""
    pos, written = 0, []
    for _ in range(MAX_SKIPPED + 1):
        name = _emulated(code[pos:])
        if name is not None:
            if pos == 0 or any(0 < t <= pos for t in _jump_targets(code)):
                return 0, "", []
            return pos, name, written
        step = _skippable(code[pos:pos + 16])
        if step is None:
            return 0, "", []
        pos += step[0]
        written.append(step[1])
    return 0, "", []


def describe(code: bytes, size: int) -> tuple[str, bool | None, int, str, list[int]]:
    """A function's first instruction (classify), then, if the kernel single-steps it and
    `code` is the whole function, its emulated_site()."""
    insn, emulated = classify(code[:8])
    whole = 0 < size <= MAX_FUNCTION_READ and len(code) == size
    return insn, emulated, *(emulated_site(code) if whole and not emulated else (0, "", []))
