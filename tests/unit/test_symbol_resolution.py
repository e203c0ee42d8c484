"""Symbol resolution on gcc-built fixtures, Debian's QEMU, and malformed input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import QPROBE, ROOT
from support.caps import require
from support.elf_fixtures import (
    EXPECTED_SOURCE,
    load_segments,
    nm_address,
    readelf_offset,
    resolve,
)

from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols import elfsym


@pytest.mark.parametrize("kind", sorted(EXPECTED_SOURCE))
def test_offset_matches_readelf_and_source(fixtures, kind):
    fx = fixtures[kind]
    res = resolve(fx, "lifecycle_step", "exported_step")
    [vaddr] = nm_address(fx.full, "lifecycle_step")
    sym = res.best("lifecycle_step")
    assert sym is not None, res.missing
    assert sym.vaddr == vaddr
    assert sym.offset == readelf_offset(fx.full, vaddr)
    assert sym.source.startswith(EXPECTED_SOURCE[kind]), sym.source
    assert res.found["exported_step"][0].vaddr == nm_address(fx.full, "exported_step")[0]


def test_nopie_layout_has_vaddr_not_offset(fixtures):
    """The non-PIE fixture is the p_vaddr != p_offset layout; the offset accounts for it."""
    segs = load_segments(fixtures["nopie"].full)
    assert any(off != va for off, va in segs)
    sym = resolve(fixtures["nopie"], "lifecycle_step").best("lifecycle_step")
    assert sym is not None and sym.offset != sym.vaddr


def test_bare_stripped_reports_missing_with_hint(fixtures):
    res = resolve(fixtures["bare"], "lifecycle_step")
    assert res.found == {}
    reason = res.missing["lifecycle_step"].reason
    assert "install the debug symbols for build-id" in reason
    assert res.build_id and res.build_id in reason


def test_mismatched_build_id_rejected(fixtures):
    res = resolve(fixtures["wrong-buildid"], "lifecycle_step")
    assert "lifecycle_step" not in res.found
    assert "does not match" in res.debug_hint


def test_dangling_debuglink(fixtures, tmp_path):
    lonely = tmp_path / "app"
    shutil.copy(fixtures["debuglink"].path, lonely)
    res = elfsym.resolve(str(lonely), ["lifecycle_step"], debug_roots=(str(tmp_path / "x"),))
    assert "lifecycle_step" in res.missing
    assert "not found" in res.debug_hint


def test_debuglink_crc_checked(fixtures, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(fixtures["debuglink"].path, d / "app")
    dbg = (fixtures["debuglink"].path.parent / "app.debug").read_bytes()
    (d / "app.debug").write_bytes(dbg[:-1] + bytes([dbg[-1] ^ 0xFF]))
    res = elfsym.resolve(str(d / "app"), ["lifecycle_step"], debug_roots=(str(tmp_path / "x"),))
    assert "lifecycle_step" in res.missing
    assert "CRC mismatch" in res.debug_hint


def test_duplicate_static_names_are_not_chosen_silently(fixtures):
    res = resolve(fixtures["pie"], "dup")
    assert len(res.found["dup"]) == 2
    assert res.best("dup") is None


def test_inlined_function_reported(fixtures):
    res = resolve(fixtures["pie"], "inlined_step", "lifecycle_step")
    assert "inlined_step" in res.missing  # no out-of-line copy to probe
    assert res.inlined.get("inlined_step"), "DWARF inlined instances not found"
    assert not res.inlined.get("lifecycle_step")
    assert res.dwarf


def test_dwz_alt_file_followed(fixtures):
    """Debian's -dbgsym layout: the inlined function's abstract DIE lives in the dwz file
    that .gnu_debugaltlink names; its inlined instance is found all the same."""
    require("dwz", "dwz" in fixtures, "apt-get install dwz")
    fx = fixtures["dwz"]
    res = resolve(fx, "inlined_step", "lifecycle_step")
    plain = resolve(fixtures["pie"], "inlined_step")
    assert res.inlined.get("inlined_step") == plain.inlined["inlined_step"] != []
    assert res.found["lifecycle_step"][0].source.startswith("build-id:")
    moved = fx.debug_root / ".dwz" / "qtrace-test.debug"
    moved.rename(moved.with_suffix(".gone"))
    try:
        res = resolve(fx, "inlined_step")
    finally:
        moved.with_suffix(".gone").rename(moved)
    assert not res.inlined.get("inlined_step")
    assert "dwz file /usr/lib/debug/.dwz/qtrace-test.debug" in res.debug_hint


def test_dwarf_read_only_where_a_function_is_defined(fixtures):
    """Three compile units; a function with an out-of-line copy is looked for in the
    one unit that defines it (.debug_aranges), a function without one by its name."""
    from qtrace_bpf.symbols.dwarf_inline import DwarfFile, inlined_instances

    path = str(fixtures["nopie"].path)
    df = DwarfFile(path)
    try:
        assert len(df.unit_offsets()) >= 3
        at = {"lifecycle_step": nm_address(fixtures["nopie"].path, "lifecycle_step")}
        found, units = inlined_instances(df, ["lifecycle_step"], at)
        assert (found, units) == ({}, 1)
        found, units = inlined_instances(df, ["inlined_step"], {})
        assert found["inlined_step"]  # by string: a superset of units (4-byte matches)
        found, units = inlined_instances(df, ["no_such_function_anywhere"], {})
        assert (found, units) == ({}, 0)
    finally:
        df.close()


def test_no_dwarf_says_not_verifiable(fixtures):
    res = resolve(fixtures["minidebuginfo"], "lifecycle_step")
    assert not res.dwarf
    assert "inlining not verifiable" in res.debug_hint


def test_debian_qemu(fixtures):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        require("qemu-system-x86_64", False, "apt-get install qemu-system-x86")
    exported = ["kvm_init_vcpu", "kvm_arch_put_registers", "kvm_cpu_synchronize_post_init",
                "kvm_cpu_synchronize_post_reset", "qemu_system_reset", "kvm_put_apicbase",
                "qemu_loadvm_state", "qdev_device_add", "qdev_machine_creation_done"]
    static = ["kvm_apic_reset", "kvm_arch_set_tsc_khz"]
    res = elfsym.resolve(qemu, exported + static)
    require("Debian's stripped QEMU", ".symtab" not in res.sources,
            f"{qemu} has a .symtab: not the stripped package this test is about")
    for name in exported:
        assert res.found[name][0].source == ".dynsym", name
    for name in static:
        assert "install the debug symbols" in res.missing[name].reason
    assert res.qemu_version and res.qemu_version[0].isdigit()
    assert res.elf_type == "ET_DYN"


def test_symbols_command_json(fixtures):
    import json

    r = subprocess.run([*QPROBE, "symbols", "/usr/bin/qemu-system-x86_64", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    if r.returncode != 0 and "no such file" in r.stderr:
        from support.caps import require

        require("qemu-system-x86_64", False, "apt-get install qemu-system-x86")
    report = json.loads(r.stdout)
    events = {e["event"]: e for e in report["events"]}
    assert events["system_reset"]["resolved"] and events["system_reset"]["source"] == ".dynsym"
    assert not events["set_tsc_khz"]["resolved"]
    assert "debug symbols" in events["set_tsc_khz"]["missing"]
    assert events["vcpu_create"]["missing"].endswith("(exists since 9.2)")
    # the per-vCPU reset step of Debian's 7.2 (xor; lea; jmp) is probed on its jmp
    assert events["sync_post_reset"]["first_insn"] == "xor", events["sync_post_reset"]
    assert (events["sync_post_reset"]["probed_at"], events["sync_post_reset"]["probed_insn"]) \
        == ("+9", "jmp rel32")
    assert "probed_at" not in events["system_reset"]  # push %rbp: emulated where it is


def test_wrong_architecture(fixtures, tmp_path):
    data = bytearray(fixtures["pie"].path.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    f = tmp_path / "arm"
    f.write_bytes(bytes(data))
    with pytest.raises(ElfError, match="not an x86-64 ELF"):
        elfsym.resolve(str(f), ["main"])


def test_truncated(fixtures, tmp_path):
    f = tmp_path / "trunc"
    f.write_bytes(fixtures["pie"].path.read_bytes()[:100])
    with pytest.raises(ElfError):
        elfsym.resolve(str(f), ["main"])


def test_corrupt_gnu_debugdata(fixtures, tmp_path):
    """A corrupt MiniDebugInfo is a problem reported for that source, not a crash."""
    src = fixtures["minidebuginfo"].path
    data = bytearray(src.read_bytes())
    xz = (Path(src).parent / "mini.xz").read_bytes()
    at = data.find(xz[:64])
    assert at > 0
    data[at + 64: at + 128] = b"\0" * 64
    f = tmp_path / "corrupt"
    f.write_bytes(bytes(data))
    res = elfsym.resolve(str(f), ["lifecycle_step"])
    assert ".gnu_debugdata: unreadable" in res.debug_hint
    assert "lifecycle_step" in res.missing


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_malformed_elf(fixtures, tmp_path, data):
    """Mutated and truncated ELF files: the resolver raises ElfError or answers, and an
    answer is self-consistent (every offset inside the file, through the PT_LOAD that holds
    its address); the unmutated file resolves exactly as readelf says."""
    original = fixtures["minidebuginfo"].path.read_bytes()
    blob = bytearray(original)
    cut = data.draw(st.integers(min_value=0, max_value=len(blob)))
    blob = blob[:cut] if data.draw(st.booleans()) else blob
    for _ in range(data.draw(st.integers(min_value=0, max_value=24))):
        if not blob:
            break
        pos = data.draw(st.integers(min_value=0, max_value=min(len(blob) - 1, 4096)))
        blob[pos] = data.draw(st.integers(min_value=0, max_value=255))
    f = tmp_path / "fuzz"
    f.write_bytes(bytes(blob))
    try:
        res = elfsym.resolve(str(f), ["lifecycle_step", "main"], inline_names=["inlined_step"])
    except ElfError:
        assert bytes(blob) != original, "the intact fixture must resolve"
        return
    for syms in res.found.values():
        for sym in syms:
            segs = [(v, sz, off) for v, sz, off in res.loads if v <= sym.vaddr < v + sz]
            assert segs, f"{sym.name}@{sym.vaddr:#x} outside every PT_LOAD"
            v, _sz, off = segs[0]
            assert sym.offset == sym.vaddr - v + off < len(blob)
    if bytes(blob) == original:
        fx = fixtures["minidebuginfo"]
        (vaddr,) = nm_address(fx.full, "lifecycle_step")
        assert res.best("lifecycle_step").offset == readelf_offset(fx.full, vaddr)


def test_symbols_explains_what_a_clone_loses(fixtures):
    """`qprobe symbols` says which events sit on a clone and which detail they lose."""
    from qtrace_bpf.contract.catalog import parse_catalog
    from qtrace_bpf.symbols.binaries import plan_probes

    catalog = parse_catalog(
        '[[probe]]\nevent = "put"\nfunctions = ["cloned_step"]\naction = "put"\n'
        'arg2 = "level"\n')
    res = elfsym.resolve(str(fixtures["pie"].path), catalog.functions)
    [att] = plan_probes(catalog, res)
    assert att.lost_detail == ["the put level (its writes carry none)"]
    assert "GCC clone cloned_step.constprop.0" in att.notes[0]
    assert "lost: the put level" in att.notes[0]
