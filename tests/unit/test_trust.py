"""What a file shows the resolver cannot steer where breakpoints go: ownership, the open
file's identity, build-ids, debug files, and parser bombs (ELF files built here by gcc)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from support.elf_fixtures import nm_address
from support.gcc import add_section, cc, minidebuginfo_bomb, prog

from qtrace_bpf.symbols import elf as elfio
from qtrace_bpf.symbols import elfsym
from qtrace_bpf.symbols.debuginfod import Debuginfod

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"


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


def _note(owner: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(owner) + 1, len(desc), ntype) + pad(owner + b"\0") + pad(desc)


def test_a_build_id_note_not_owned_by_gnu_is_no_build_id(gcc, tmp_path):
    exe = cc(gcc, tmp_path / "q", prog("f"), "-Wl,--build-id=none")
    add_section(exe, ".note.evil", _note(b"EVIL", 3, b"/../../../etc/shadow"), tmp_path)
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
    add_section(exe, ".gnu_debuglink", data, tmp_path)
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


def test_a_minidebuginfo_bomb_is_refused_before_it_is_in_memory(gcc, tmp_path):
    exe = minidebuginfo_bomb(gcc, tmp_path / "q", 256 << 20)
    assert exe.stat().st_size < 1 << 20
    res = elfsym.resolve(str(exe), ["qemu_system_reset"])
    assert "qemu_system_reset" in res.found, "the binary's own symbols still serve"
    assert ".gnu_debugdata: unreadable (inflates past" in res.debug_hint
