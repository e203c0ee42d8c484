"""What a file shows the resolver cannot steer where breakpoints go: ownership, the open
file's identity, build-ids, debug files, and parser bombs (ELF files built here by gcc)."""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import require
from elf_fixtures import nm_address

from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.errors import AttachError, ElfError
from qtrace_bpf.symbols import elf as elfio
from qtrace_bpf.symbols import elfsym, resolver
from qtrace_bpf.symbols.binaries import QemuBinaries
from qtrace_bpf.symbols.binfile import open_binary
from qtrace_bpf.symbols.debuginfod import Debuginfod

NOBODY = 65534
BUILD_ID = "0123456789abcdef0123456789abcdef01234567"


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


@pytest.fixture
def root_only() -> None:
    require("root", os.geteuid() == 0, "run the tests as root (chown)")


def test_a_build_id_claimed_by_another_file_lends_it_no_offsets(gcc, tmp_path):
    """The poisoning: a fake linked with a real binary's build-id, resolved first, must not
    decide the real one's offsets (the cache is per file, not per build-id)."""
    fake = cc(gcc, tmp_path / "fake", prog("lifecycle_step", pad=4000),
              f"-Wl,--build-id=0x{BUILD_ID}")
    real = cc(gcc, tmp_path / "real", prog("lifecycle_step"), f"-Wl,--build-id=0x{BUILD_ID}")
    assert elfio.read_build_id(str(fake)) == elfio.read_build_id(str(real)) == BUILD_ID
    r_fake = elfsym.resolve_cached(str(fake), ["lifecycle_step"])
    r_real = elfsym.resolve_cached(str(real), ["lifecycle_step"])
    assert r_fake.found["lifecycle_step"][0].vaddr == nm_address(fake, "lifecycle_step")[0]
    assert r_real.found["lifecycle_step"][0].vaddr == nm_address(real, "lifecycle_step")[0], \
        "the real binary's offsets must come from the real binary"
    assert r_real.found["lifecycle_step"][0].vaddr != r_fake.found["lifecycle_step"][0].vaddr
    again = elfsym.resolve_cached(str(real), ["lifecycle_step"])
    assert again is r_real, "one file resolves once"


def test_files_any_user_could_write_are_not_trusted(gcc, tmp_path, root_only):
    base = Path(tempfile.mkdtemp(prefix="qtrace-trust-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)
        exe = cc(gcc, base / "qemu-system-x86_64", prog("lifecycle_step"))
        bf = open_binary(str(exe), str(exe))
        assert bf.untrusted == "", "root's 0755 file in root's directories (under sticky " \
            "/var/tmp) is trusted"
        bf.close()
        os.chown(exe, NOBODY, NOBODY)
        bf = open_binary(str(exe), str(exe))
        assert "owned by uid 65534" in bf.untrusted
        bf.close()
        os.chown(exe, 0, 0)
        os.chmod(exe, 0o775)
        bf = open_binary(str(exe), str(exe))
        assert "writable by group or others" in bf.untrusted
        bf.close()
        os.chmod(exe, 0o755)
        os.chmod(base, 0o777)  # anyone may swap the file in this directory
        bf = open_binary(str(exe), str(exe))
        assert "directory" in bf.untrusted and "777" in bf.untrusted
        bf.close()
        bins = QemuBinaries(load_catalog(), lambda _p: None)
        for _ in range(3):
            with pytest.raises(AttachError) as err:
                bins.get(str(exe), str(exe))
            assert err.value.reason == "untrusted_binary"
        assert bins.untrusted_total == 1, "counted once per file"
        assert not bins.plans and not bins.errors
    finally:
        shutil.rmtree(base)


def test_the_attach_goes_to_the_parsed_inode_whatever_the_name_becomes(gcc, tmp_path):
    """Parse what you attach: a file renamed over the parsed one's name meanwhile (an exec,
    a swapped symlink) gets nothing; the plan's path opens the inode that was parsed."""
    exe = cc(gcc, tmp_path / "qemu-system-x86_64", prog("qemu_system_reset"))
    other = cc(gcc, tmp_path / "other", prog("qemu_system_reset", pad=8000))
    original = os.stat(exe).st_ino
    shutil.copy(exe, tmp_path / "parsed")
    attached = []

    def attach(plan) -> None:
        os.replace(other, exe)  # the name now means another file
        attached.append((os.stat(plan.path).st_ino, plan.uprobes()))

    bins = QemuBinaries(load_catalog(), attach)
    plan = bins.get(str(exe), str(exe))
    assert plan.path.startswith("/proc/self/fd/")
    assert attached[0][0] == original, "the kernel is given the parsed inode, not the name"
    offsets = {off for off, *_ in attached[0][1]}
    sym = plan.resolution.found["qemu_system_reset"][0]
    assert sym.vaddr == nm_address(tmp_path / "parsed", "qemu_system_reset")[0]
    assert sym.vaddr != nm_address(exe, "qemu_system_reset")[0]
    assert sym.offset in offsets
    bins.close()


def test_a_file_changed_while_parsed_is_not_attached(gcc, tmp_path):
    exe = cc(gcc, tmp_path / "qemu-system-x86_64", prog("qemu_system_reset"))
    bins = QemuBinaries(load_catalog(), lambda _p: pytest.fail("attached a changed file"))
    bf = bins.open(str(exe), str(exe))
    res = bins.resolve(bf)
    with open(exe, "ab") as f:
        f.write(b"\0" * 16)  # rewritten in place after the parse
    with pytest.raises(AttachError) as err:
        bins.get(str(exe), str(exe), opened=(bf, res))
    assert "changed while it was read" in str(err.value)


def test_a_function_symbol_outside_code_places_no_breakpoint(gcc, tmp_path):
    """A .symtab that puts a catalog name on data (the fake's int3 landed in .dynstr)."""
    src = ('const char table[4096] = "data, not code";\n'
           '__asm__(".globl kvm_apic_reset\\n.type kvm_apic_reset, @function\\n'
           '.set kvm_apic_reset, table");\n' + prog("qemu_system_reset"))
    exe = cc(gcc, tmp_path / "q", src)
    res = elfsym.resolve(str(exe), ["kvm_apic_reset", "qemu_system_reset"])
    assert "qemu_system_reset" in res.found
    assert "kvm_apic_reset" not in res.found
    assert "outside the binary's executable segments" in res.debug_hint


def _add_section(exe: Path, name: str, data: bytes, tmp: Path) -> None:
    blob = tmp / (name.strip(".") + ".bin")
    blob.write_bytes(data)
    subprocess.run(["objcopy", "--add-section", f"{name}={blob}", str(exe)], check=True)


def _note(owner: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(owner) + 1, len(desc), ntype) + pad(owner + b"\0") + pad(desc)


def test_a_build_id_note_not_owned_by_gnu_is_no_build_id(gcc, tmp_path):
    exe = cc(gcc, tmp_path / "q", prog("f"), "-Wl,--build-id=none")
    _add_section(exe, ".note.evil", _note(b"EVIL", 3, b"/../../../etc/shadow"), tmp_path)
    subprocess.run(["objcopy", "--set-section-flags", ".note.evil=alloc,readonly",
                    str(exe)], check=True)
    elf, stream = elfio.open_elf(str(exe), "q")
    try:
        assert elfio.build_id(elf) is None
    finally:
        stream.close()


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/proc/self/pagemap", ".."])
def test_a_debuglink_that_is_a_path_is_not_followed(gcc, tmp_path, name):
    exe = cc(gcc, tmp_path / "q", prog("f"))
    data = name.encode() + b"\0"
    data += b"\0" * (-len(data) % 4) + struct.pack("<I", 0)
    _add_section(exe, ".gnu_debuglink", data, tmp_path)
    elf, stream = elfio.open_elf(str(exe), "q")
    try:
        assert elfio.debuglink(elf) is None
    finally:
        stream.close()


def test_a_debug_file_with_the_build_id_but_another_layout_is_refused(gcc, tmp_path):
    """A debug root (or a debuginfod answer) holding a file that claims the binary's
    build-id but was built from other code: its .symtab must not place probes."""
    binary = cc(gcc, tmp_path / "qemu", prog("kvm_apic_reset"), f"-Wl,--build-id=0x{BUILD_ID}")
    other = cc(gcc, tmp_path / "other", prog("kvm_apic_reset", pad=6000),
               f"-Wl,--build-id=0x{BUILD_ID}")
    subprocess.run(["strip", "-s", str(binary)], check=True)
    root = tmp_path / "debug"
    dest = root / ".build-id" / BUILD_ID[:2] / (BUILD_ID[2:] + ".debug")
    dest.parent.mkdir(parents=True)
    shutil.copy(other, dest)
    res = elfsym.resolve(str(binary), ["kvm_apic_reset"], debug_roots=(str(root),))
    assert "kvm_apic_reset" not in res.found
    assert "does not describe this binary" in res.debug_hint
    # the true debug file of the same build is used
    real_full = cc(gcc, tmp_path / "qemu-full", prog("kvm_apic_reset"),
                   f"-Wl,--build-id=0x{BUILD_ID}")
    subprocess.run(["objcopy", "--only-keep-debug", str(real_full), str(dest)], check=True)
    res = elfsym.resolve(str(binary), ["kvm_apic_reset"], debug_roots=(str(root),))
    assert res.found["kvm_apic_reset"][0].source.startswith("build-id:")


def test_debuginfod_over_plain_http_only_when_allowed(tmp_path):
    d = Debuginfod(urls=("http://127.0.0.1:9",), cache=str(tmp_path / "c"))
    assert d.fetch(BUILD_ID) is None
    assert any("not https" in p for p in d.problems)
    (tmp_path / "c" / "ab").mkdir(parents=True)
    (tmp_path / "c" / "ab" / ".fetch-half").write_bytes(b"x")
    assert d.remove_partial() == [str(tmp_path / "c" / "ab" / ".fetch-half")]


def _bomb(gcc: str, out: Path, inflated: int, pad: int = 0) -> Path:
    """A binary whose .gnu_debugdata inflates to `inflated` zero bytes (`pad`: bytes of a
    section that make the file itself that much larger)."""
    out.parent.mkdir(exist_ok=True)
    exe = cc(gcc, out, prog("qemu_system_reset", "kvm_arch_put_registers"))
    xz = lzma.compress(b"\0" * inflated, preset=1)
    _add_section(exe, ".gnu_debugdata", xz, out.parent)
    if pad:
        _add_section(exe, ".pad", os.urandom(pad), out.parent)
    return exe


def test_a_minidebuginfo_bomb_is_refused_before_it_is_in_memory(gcc, tmp_path):
    exe = _bomb(gcc, tmp_path / "q", 256 << 20)
    assert exe.stat().st_size < 1 << 20
    res = elfsym.resolve(str(exe), ["qemu_system_reset"])
    assert "qemu_system_reset" in res.found, "the binary's own symbols still serve"
    assert ".gnu_debugdata: unreadable (inflates past" in res.debug_hint


def test_the_resolver_child_answers_or_fails_within_its_limits(gcc, tmp_path):
    exe = cc(gcc, tmp_path / "qemu-system-x86_64", prog("qemu_system_reset"))
    bins = QemuBinaries(load_catalog(), lambda _p: None, isolate=True)
    bf = bins.open(str(exe), str(exe))
    try:
        res = bins.resolve(bf)
        assert res.found["qemu_system_reset"][0].vaddr == nm_address(exe, "qemu_system_reset")[0]
        with pytest.raises(ElfError, match="longer than 0.01s"):  # a child's start alone
            resolver.resolve_isolated(bf, ("qemu_system_reset",), (), None,  # takes longer
                                      resolver.Limits(seconds=0.01))
    finally:
        bf.close()
    # under the inflate cap (the file is 8 MiB) but over the child's address space
    big = _bomb(gcc, tmp_path / "big" / "qemu-system-x86_64", 100 << 20, pad=8 << 20)
    bf = bins.open(str(big), str(big))
    try:
        with pytest.raises(ElfError, match="64 MiB"):
            resolver.resolve_isolated(bf, ("qemu_system_reset",), (), None,
                                      resolver.Limits(memory_bytes=64 << 20))
    finally:
        bf.close()
