"""Symbol resolution on gcc-built fixtures, Debian's QEMU, and malformed input."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QPROBE, ROOT, require
from elf_fixtures import (
    build_all,
    load_segments,
    nm_address,
    readelf_offset,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrace_bpf.contract import maps
from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols import elfsym

COUNTER_BPF = b"""
BPF_ARRAY(hits, u64, 1);
int count_hit(struct pt_regs *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""
EXPECTED_SOURCE = {
    "pie": ".symtab", "nopie": ".symtab", "static": ".symtab",
    "minidebuginfo": ".gnu_debugdata", "debuglink": "debuglink:", "buildid": "build-id:",
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        from conftest import require

        require("gcc", False, "apt-get install gcc")
    return build_all(gcc, tmp_path_factory.mktemp("elf"))


def resolve(fx, *names: str, path: str | None = None, display: str | None = None):
    roots = (str(fx.debug_root),) if fx.debug_root else ("/nonexistent-debug-root",)
    return elfsym.resolve(path or str(fx.path), names, debug_roots=roots, display=display,
                          inline_names=names)


def count_hits(path: str, offset: int, run_it) -> int:
    """Attach a counting uprobe at (path, offset), run the fixture, return the hit count."""
    import ctypes as ct

    from bcc import BPF

    b = BPF(text=COUNTER_BPF)
    try:
        fn = b.load_func(b"count_hit", BPF.KPROBE)
        ev_name = f"p_qtrace_test_{os.getpid()}".encode()
        # libbcc's own attach, with its real 7-argument prototype (independent of qtrace's
        # link-based attach: this test is about the offsets, not about qtrace's attaching)
        attach = ct.CDLL("libbcc.so.0", use_errno=True).bpf_attach_uprobe
        attach.argtypes = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_uint64, ct.c_int,
                           ct.c_uint32]
        fd = attach(fn.fd, 0, ev_name, path.encode(), offset, -1, 0)
        assert fd >= 0, f"uprobe at {path}+{offset:#x} refused"
        b._add_uprobe_fd(ev_name, fd)  # b.cleanup() detaches it
        run_it()
        return int(b[b"hits"][0].value)
    finally:
        b.cleanup()


def run_tracked(prog, path: Path, vm_id: int) -> int:
    """Run the fixture's loop 6 times as a tracked process (past boot) of `prog`."""
    proc = subprocess.Popen([str(path), "6", "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        prog.maps.insert_proc(proc.pid, vm_id, boot_done=True)
        release(proc)
    finally:
        proc.kill()
        proc.wait()
    return vm_id


def release(proc: subprocess.Popen) -> None:
    """Let a fixture started with 'N wait' run its loop, and wait for it."""
    assert proc.stdin is not None
    proc.stdin.write(b"g")
    proc.stdin.close()
    proc.wait(10)


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


@pytest.mark.parametrize("kind", sorted(EXPECTED_SOURCE))
def test_uprobe_at_resolved_offset_fires(bpf_caps, fixtures, kind):
    fx = fixtures[kind]
    sym = resolve(fx, "lifecycle_step").best("lifecycle_step")
    assert sym is not None
    hits = count_hits(str(fx.path), sym.offset,
                      lambda: subprocess.run([str(fx.path), "7"], check=True,
                                             capture_output=True))
    # main calls it 7 times, exported_step 7 more
    assert hits == 14


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


def test_gcc_clone_resolves_and_says_so(bpf_caps, fixtures):
    fx = fixtures["pie"]
    res = resolve(fx, "cloned_step")
    sym = res.best("cloned_step")
    assert sym is not None and sym.is_clone, res.found
    assert sym.name.startswith("cloned_step.")
    [vaddr] = nm_address(fx.full, sym.name)
    assert sym.vaddr == vaddr
    hits = count_hits(str(fx.path), sym.offset,
                      lambda: subprocess.run([str(fx.path), "4"], check=True,
                                             capture_output=True))
    assert hits == 4


def test_binary_only_in_another_mount_namespace(bpf_caps, fixtures, tmp_path):
    """A containerised QEMU: its binary path exists only in its own mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        from conftest import require

        require("unshare", False, "apt-get install util-linux")
    hidden = tmp_path / "ns-only"
    hidden.mkdir()
    script = (f"mount -t tmpfs none {hidden} && cp {fixtures['pie'].path} {hidden}/app && "
              f"exec {hidden}/app 3 wait")
    proc = subprocess.Popen([unshare, "-m", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.readlink(f"/proc/{proc.pid}/exe").endswith("/app"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (hidden / "app").exists()  # not visible from here
        res = elfsym.resolve(f"/proc/{proc.pid}/exe", ["lifecycle_step"])
        sym = res.best("lifecycle_step")
        assert sym is not None

        assert count_hits(f"/proc/{proc.pid}/exe", sym.offset, lambda: release(proc)) == 6
    finally:
        proc.kill()
        proc.wait()


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


def test_binary_replaced_on_disk_still_traced(bpf_caps, fixtures, tmp_path):
    """A package upgrade unlinks the binary under a running process: resolve and trace via
    /proc/PID/exe, which names the mapped (deleted) inode, not the new file."""
    path = tmp_path / "app"
    shutil.copy(fixtures["pie"].path, path)
    proc = subprocess.Popen([str(path), "5", "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        time.sleep(0.2)
        path.unlink()
        shutil.copy(fixtures["nopie"].path, path)  # the "new version" at the same path
        exe = os.readlink(f"/proc/{proc.pid}/exe")
        assert exe.endswith(" (deleted)")
        res = elfsym.resolve(f"/proc/{proc.pid}/exe", ["lifecycle_step"],
                             display=exe.removesuffix(" (deleted)"))
        sym = res.best("lifecycle_step")
        assert sym is not None
        assert sym.vaddr == nm_address(fixtures["pie"].full, "lifecycle_step")[0]

        assert count_hits(f"/proc/{proc.pid}/exe", sym.offset, lambda: release(proc)) == 10
    finally:
        proc.kill()
        proc.wait()


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
        from conftest import require

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


def test_catalog_can_probe_inlined_instances(bpf_caps, fixtures, nothing_left):
    """attach_inlined: a function with no out-of-line copy is still counted, via DWARF."""

    from qtrace_bpf.contract.catalog import parse_catalog
    from qtrace_bpf.program.compiled import QtraceProgram
    from qtrace_bpf.symbols.binaries import QemuBinaries

    catalog = parse_catalog(
        '[[probe]]\nevent = "step"\nfunctions = ["inlined_step"]\naction = "mark"\n'
        "attach_inlined = true\n"
        '[[probe]]\nevent = "plain"\nfunctions = ["inlined_step"]\naction = "mark"\n')
    fx = fixtures["pie"]
    res = elfsym.resolve(str(fx.path), ["inlined_step"], inline_names=["inlined_step"])
    with pytest.raises(ValueError, match="entry-only"):
        parse_catalog('[[probe]]\nevent = "x"\nfunctions = ["f"]\naction = "put"\n'
                      "attach_inlined = true\n")
    with QtraceProgram(catalog) as prog:
        plan = QemuBinaries(catalog, prog.attach_binary).get(str(fx.path), str(fx.path), res)
        step, plain = plan.attached
        assert step.ok and step.symbol is None and step.inlined_offsets
        assert not plain.ok  # without attach_inlined: reported missing, as before
        vm_id = run_tracked(prog, fx.path, 0x80000001)
        counts = {k.probe: v for k, v in prog.maps.items(maps.LIFECYCLE.name) if k.vm == vm_id}
        assert counts == {0: 6}


def test_gcc_clone_arguments_are_not_read(bpf_caps, fixtures, nothing_left):
    """cloned_step(x, 5) became cloned_step.constprop.0(x): its registers are not
    cloned_step's arguments.  A reset probed there counts under cause `unknown`, never
    under whatever rdi held; a plain function's argument is still read."""
    from qtrace_bpf.contract import abi
    from qtrace_bpf.contract.catalog import parse_catalog
    from qtrace_bpf.program.compiled import QtraceProgram
    from qtrace_bpf.symbols.binaries import QemuBinaries

    catalog = parse_catalog(
        '[[probe]]\nevent = "clone"\nfunctions = ["cloned_step"]\naction = "reset"\n'
        'arg1 = "shutdown_cause"\n'
        '[[probe]]\nevent = "plain"\nfunctions = ["lifecycle_step"]\naction = "reset"\n'
        'arg1 = "shutdown_cause"\n')
    fx = fixtures["pie"]
    res = elfsym.resolve(str(fx.path), catalog.functions)
    logged: list[dict] = []
    with QtraceProgram(catalog) as prog:
        plan = QemuBinaries(catalog, prog.attach_binary,
                        log=lambda msg, **kw: logged.append({"msg": msg, **kw})).get(
            str(fx.path), str(fx.path), res)
        clone, plain = plan.attached
        assert clone.symbol is not None and clone.symbol.name.startswith("cloned_step.constprop.")
        assert not clone.trust_args and plain.trust_args
        assert clone.lost_detail == ["the reset cause (counted as cause unknown)"]
        assert any("not read" in n for n in clone.notes)
        assert sorted(k for _, _, k, _ in plan.uprobes()) == ["blind", "entry", "return", "return"]
        vm_id = run_tracked(prog, fx.path, 0x80000002)
        resets = {k.cause: v for k, v in prog.maps.items(maps.RESETS.name) if k.vm == vm_id}
    [line] = [x for x in logged if x["msg"] == "binary attached"]
    assert f"clone (GCC clone {clone.symbol.name}): the reset cause" in line["lost"]
    # lifecycle_step(i), from main and from exported_step, for i in 0..5: causes 0..5 read
    # from rdi, twice each; the clone: unknown, six times
    assert resets == {**{c: 2 for c in range(6)}, abi.CAUSE_UNKNOWN: 6}, resets


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


def test_entry_probe_moves_past_single_stepped_instructions(bpf_caps, tmp_path, nothing_left):
    """A function whose first instruction the kernel single-steps (~20x an emulated hit) is
    probed at its first emulated one when nothing before it matters; counts and arguments
    stay exact, and a probe stays at the entry where moving it would change them."""
    from qtrace_bpf.contract import abi
    from qtrace_bpf.contract.catalog import parse_catalog
    from qtrace_bpf.program.compiled import QtraceProgram
    from qtrace_bpf.symbols.binaries import QemuBinaries

    exe = tmp_path / "entry_sites"
    subprocess.run(["gcc", "-O2", "-o", exe, ROOT / "tests" / "c" / "entry_sites.c"],
                   check=True)
    probes = {"tail_call": "mark", "cmp_then_push": "reset", "test_then_jcc": "mark",
              "clobbers_arg": "reset", "loops_back": "mark"}
    catalog = parse_catalog("".join(
        f'[[probe]]\nevent = "{fn}"\nfunctions = ["{fn}"]\naction = "{action}"\n' +
        ('arg1 = "shutdown_cause"\n' if action == "reset" else "")
        for fn, action in probes.items()))
    res = elfsym.resolve(str(exe), catalog.functions)
    with QtraceProgram(catalog) as prog:
        plan = QemuBinaries(catalog, prog.attach_binary).get(str(exe), str(exe), res)
        start = {att.function: att.symbol.offset for att in plan.attached}
        placed = {(att.probe.slot, kind): off for off, att_slot, kind, _ in plan.uprobes()
                  for att in plan.attached if att.probe.slot == att_slot}
        moved = {att.function: (placed[att.probe.slot, "entry"] - start[att.function],
                                placed.get((att.probe.slot, "return"), start[att.function])
                                - start[att.function]) for att in plan.attached}
        # +9: past xor and lea (registers no catalog argument is read from) to the jmp;
        # +7: past a cmp to the push, for the return probe too (the stack is untouched);
        # +3: to the je.  Not moved: an entry after xor %edi (arg1, read; its return probe
        # reads no argument: +2), anything in a function that loops back to +3.
        assert moved == {"tail_call": (9, 0), "cmp_then_push": (7, 7), "test_then_jcc": (3, 0),
                         "clobbers_arg": (0, 2), "loops_back": (0, 0)}, moved
        proc = subprocess.Popen([str(exe), "6", "wait"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        try:
            vm_id = 0x80000003
            prog.maps.insert_proc(proc.pid, vm_id, boot_done=True)
            release(proc)
        finally:
            proc.kill()
            proc.wait()
        counts = {catalog.probes[k.probe].event: v
                  for k, v in prog.maps.items(maps.LIFECYCLE.name) if k.vm == vm_id}
        resets = {k.cause: v for k, v in prog.maps.items(maps.RESETS.name) if k.vm == vm_id}
    assert counts == dict.fromkeys(probes, 6), counts  # loops_back moved: 24
    # cmp_then_push(i) and clobbers_arg(i), i in 0..5: cause i read from edi, twice each
    assert resets == {c: 2 for c in range(6)}, resets
    assert abi.CAUSE_UNKNOWN not in resets
