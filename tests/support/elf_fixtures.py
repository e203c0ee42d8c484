"""ELF fixtures built with gcc/binutils the way distributions ship binaries.

The expected file offset of a function is derived here with nm and readelf only, so the
resolver (pyelftools) is checked against an independent reading of the same file.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qtrace_bpf.symbols import elfsym

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile int counter;

/* A static lifecycle step: never exported, visible only with symbols. */
__attribute__((noinline)) static int lifecycle_step(int x) {
    counter += x;
    __asm__ volatile("" ::: "memory");
    return counter;
}

/* Always inlined: DWARF knows it, no symbol exists, a uprobe cannot see it. */
static inline __attribute__((always_inline)) int inlined_step(int x) {
    counter ^= x * 3;
    return counter;
}

/* One call site for the inlined body (a loop in main gets peeled: two copies, one DIE). */
__attribute__((noinline)) int inline_host(int x) {
    return inlined_step(x);
}

/* Called with a constant argument: GCC emits a clone (cloned_step.constprop.0). */
__attribute__((noinline)) static int cloned_step(int x, int scale) {
    counter += x * scale;
    return counter;
}

__attribute__((noinline)) int exported_step(int x) {
    return lifecycle_step(x) + 1;
}

int dup_name_a(void);
int dup_name_b(void);

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    if (argc > 2) {
        char c;
        if (read(0, &c, 1) < 0) return 1;  /* wait until the test says go */
    }
    for (int i = 0; i < n; i++) {
        lifecycle_step(i);
        inline_host(i);
        exported_step(i);
        cloned_step(i, 5);
    }
    printf("%d %d\n", counter, dup_name_a() + dup_name_b());
    return 0;
}
"""

# Two translation units, one static name: "several static functions with one name".
DUP_A = "__attribute__((noinline)) static int dup(void) { return 1; }\n" \
        "int dup_name_a(void) { return dup(); }\n"
DUP_B = "__attribute__((noinline)) static int dup(void) { return 2; }\n" \
        "int dup_name_b(void) { return dup() * 2; }\n"


@dataclass
class Fixture:
    name: str
    path: Path  # the binary to resolve/run
    full: Path  # the unstripped build it came from (for nm)
    debug_root: Path | None = None


def run(*cmd: str | Path, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          **kw).stdout


def nm_address(binary: Path, name: str) -> list[int]:
    out = run("nm", "--defined-only", binary)
    return [int(m.group(1), 16) for m in re.finditer(rf"^([0-9a-f]+) [tT] {re.escape(name)}$",
                                                      out, re.M)]


def readelf_offset(binary: Path, vaddr: int) -> int:
    """File offset of vaddr from `readelf -lW` program headers."""
    out = run("readelf", "-lW", binary)
    for m in re.finditer(r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+"
                         r"(0x[0-9a-f]+)", out, re.M):
        off, va, filesz = (int(g, 16) for g in m.groups())
        if va <= vaddr < va + filesz:
            return vaddr - va + off
    raise AssertionError(f"{vaddr:#x} not in a LOAD segment of {binary}")


def load_segments(binary: Path) -> list[tuple[int, int]]:
    out = run("readelf", "-lW", binary)
    return [(int(a, 16), int(b, 16)) for a, b in re.findall(
        r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out, re.M)]


def build_id(binary: Path) -> str:
    m = re.search(r"Build ID: ([0-9a-f]+)", run("readelf", "-n", binary))
    assert m, binary
    return m.group(1)


def build_all(gcc: str, out: Path) -> dict[str, Fixture]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "app.c").write_text(SOURCE)
    (out / "dup_a.c").write_text(DUP_A)
    (out / "dup_b.c").write_text(DUP_B)
    srcs = [out / "app.c", out / "dup_a.c", out / "dup_b.c"]
    common = ["-O2", "-g", "-Wl,--build-id"]
    fx: dict[str, Fixture] = {}

    def cc(name: str, *flags: str) -> Path:
        path = out / name
        run(gcc, *common, *flags, "-o", path, *srcs)
        return path

    pie = cc("pie", "-fPIE", "-pie")
    fx["pie"] = Fixture("pie", pie, pie)
    nopie = cc("nopie", "-fno-pie", "-no-pie")
    fx["nopie"] = Fixture("nopie", nopie, nopie)
    static = cc("static", "-static")
    fx["static"] = Fixture("static", static, static)

    # Stripped + MiniDebugInfo (Fedora/RHEL): an xz'd ELF holding .symtab only.
    dbg = out / "mini.full.debug"
    run("objcopy", "--only-keep-debug", pie, dbg)
    mini = out / "mini.symtab"
    run("objcopy", "--strip-debug", "--remove-section=.gdb_index", dbg, mini)
    (out / "mini.xz").write_bytes(lzma.compress(mini.read_bytes(), format=lzma.FORMAT_XZ))
    stripped_mini = out / "stripped-minidebuginfo"
    run("strip", "--strip-all", "-o", stripped_mini, pie)
    run("objcopy", "--add-section", f".gnu_debugdata={out / 'mini.xz'}", stripped_mini)
    fx["minidebuginfo"] = Fixture("minidebuginfo", stripped_mini, pie)

    # Stripped + .gnu_debuglink to a debug file beside it (CRC-checked).
    link_dir = out / "debuglink"
    link_dir.mkdir(exist_ok=True)
    debug_file = link_dir / "app.debug"
    run("objcopy", "--only-keep-debug", pie, debug_file)
    stripped_link = link_dir / "app"
    run("strip", "--strip-all", "-o", stripped_link, pie)
    run("objcopy", f"--add-gnu-debuglink={debug_file}", stripped_link, cwd=link_dir)
    fx["debuglink"] = Fixture("debuglink", stripped_link, pie)

    # Stripped + a debug root with .build-id/xx/rest.debug
    root = out / "debugroot"
    bid = build_id(pie)
    (root / ".build-id" / bid[:2]).mkdir(parents=True, exist_ok=True)
    run("objcopy", "--only-keep-debug", pie, root / ".build-id" / bid[:2] / f"{bid[2:]}.debug")
    stripped_bid = out / "stripped-buildid"
    run("strip", "--strip-all", "-o", stripped_bid, pie)
    fx["buildid"] = Fixture("buildid", stripped_bid, pie, debug_root=root)

    # Stripped, no symbols anywhere.
    bare = out / "stripped-bare"
    run("strip", "--strip-all", "-o", bare, pie)
    fx["bare"] = Fixture("bare", bare, pie)

    # A debug file of *another* build at this build's build-id path: must be rejected.
    other = cc("other", "-fPIE", "-pie", "-DOTHER=1", "-Wl,--build-id=0xdeadbeef")
    wrong_root = out / "wrongroot"
    (wrong_root / ".build-id" / bid[:2]).mkdir(parents=True, exist_ok=True)
    shutil.copy(other, wrong_root / ".build-id" / bid[:2] / f"{bid[2:]}.debug")
    fx["wrong-buildid"] = Fixture("wrong-buildid", stripped_bid, pie, debug_root=wrong_root)

    # Debian's -dbgsym layout: dwz moved what two binaries share (the inlined function's
    # abstract DIE among it) into a common file named by .gnu_debugaltlink.
    if shutil.which("dwz"):
        dwz_dir = out / "dwz"
        dwz_dir.mkdir(exist_ok=True)
        a, b = dwz_dir / "a", dwz_dir / "b"
        shutil.copy(pie, a)
        shutil.copy(nopie, b)
        run("dwz", "-m", dwz_dir / "common.debug", "-M", DWZ_NAME, a, b)
        dwz_root = out / "dwzroot"
        bid_a = build_id(a)
        (dwz_root / ".build-id" / bid_a[:2]).mkdir(parents=True, exist_ok=True)
        run("objcopy", "--only-keep-debug", a, dwz_root / ".build-id" / bid_a[:2] /
            f"{bid_a[2:]}.debug")
        (dwz_root / ".dwz").mkdir(exist_ok=True)
        shutil.copy(dwz_dir / "common.debug", dwz_root / DWZ_NAME.removeprefix("/usr/lib/debug/"))
        stripped_dwz = dwz_dir / "a-stripped"
        run("strip", "--strip-all", "-o", stripped_dwz, a)
        fx["dwz"] = Fixture("dwz", stripped_dwz, pie, debug_root=dwz_root)
    return fx


DWZ_NAME = "/usr/lib/debug/.dwz/qtrace-test.debug"


EXPECTED_SOURCE = {
    "pie": ".symtab", "nopie": ".symtab", "static": ".symtab",
    "minidebuginfo": ".gnu_debugdata", "debuglink": "debuglink:", "buildid": "build-id:",
}


def resolve(fx, *names: str, path: str | None = None, display: str | None = None):
    roots = (str(fx.debug_root),) if fx.debug_root else ("/nonexistent-debug-root",)
    return elfsym.resolve(path or str(fx.path), names, debug_roots=roots, display=display,
                          inline_names=names)
