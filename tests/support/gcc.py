"""Small C programs the tests compile with gcc: against probes/qtrace.h (what the compiler
says the contract means), and binaries with chosen functions and layouts."""

from __future__ import annotations

import lzma
import os
import subprocess
from pathlib import Path

from support import ROOT

HEADER = ROOT / "probes" / "qtrace.h"


PRELUDE = ("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
           "typedef uint32_t u32; typedef int32_t s32; typedef uint64_t u64; "
           "typedef int64_t s64;\n")


def gcc_print(gcc: str, tmp: Path, body: str) -> dict[str, int]:
    """Compile `body` (printf lines of `NAME VALUE`) against qtrace.h; run it; parse."""
    src = tmp / "p.c"
    src.write_text(f'{PRELUDE}#include "{HEADER}"\nint main(void) {{\n{body}\nreturn 0; }}\n')
    exe = tmp / "p"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def cc(gcc: str, out: Path, source: str, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([gcc, "-O1", "-o", str(out), str(src), *flags], check=True)
    return out


def prog(*functions: str, pad: int = 0) -> str:
    """A program that defines `functions` (noinline), `pad` bytes of code before them."""
    body = "".join(f"__attribute__((noinline,used)) void {f}(void) "
                   '{ __asm__ volatile("nop"); }\n' for f in functions)
    filler = f"__attribute__((used)) void filler(void) {{ __asm__(\".fill {pad},1,0x90\"); }}\n" \
        if pad else ""
    return filler + body + "int main(void) { return 0; }\n"


def add_section(exe: Path, name: str, data: bytes, tmp: Path) -> None:
    blob = tmp / (name.strip(".") + ".bin")
    blob.write_bytes(data)
    subprocess.run(["objcopy", "--add-section", f"{name}={blob}", str(exe)], check=True)


def minidebuginfo_bomb(gcc: str, out: Path, inflated: int, pad: int = 0) -> Path:
    """A binary whose .gnu_debugdata inflates to `inflated` zero bytes (`pad`: bytes of a
    section that make the file itself that much larger)."""
    out.parent.mkdir(exist_ok=True)
    exe = cc(gcc, out, prog("qemu_system_reset", "kvm_arch_put_registers"))
    xz = lzma.compress(b"\0" * inflated, preset=1)
    add_section(exe, ".gnu_debugdata", xz, out.parent)
    if pad:
        add_section(exe, ".pad", os.urandom(pad), out.parent)
    return exe
