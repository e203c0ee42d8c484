"""Uprobes at the offsets symbol resolution gives fire where they should: gcc-built fixtures
(PIE, non-PIE, static, stripped with each kind of debug info), GCC clones, a binary seen only
in another mount namespace or replaced on disk, inlined instances, and entries moved past
instructions the kernel would single-step."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import ROOT
from support.elf_fixtures import EXPECTED_SOURCE, nm_address, resolve

from qtrace_bpf.contract import maps
from qtrace_bpf.symbols import elfsym

pytestmark = [pytest.mark.bpf]


COUNTER_BPF = b"""
BPF_ARRAY(hits, u64, 1);
int count_hit(struct pt_regs *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""


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
def test_uprobe_at_resolved_offset_fires(bpf_caps, fixtures, kind):
    fx = fixtures[kind]
    sym = resolve(fx, "lifecycle_step").best("lifecycle_step")
    assert sym is not None
    hits = count_hits(str(fx.path), sym.offset,
                      lambda: subprocess.run([str(fx.path), "7"], check=True,
                                             capture_output=True))
    # main calls it 7 times, exported_step 7 more
    assert hits == 14


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
        from support.caps import require

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
