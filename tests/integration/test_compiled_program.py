"""What BCC compiled, held to the contract: struct offsets, map types, every map keyed by VM
forgettable, every insert's failure counted; and the tracker forgetting a VM in the real maps."""

from __future__ import annotations

import pytest
from support import ROOT
from support.doubles import FakeBinaries
from support.gcc import gcc_print

from qtrace_bpf.contract import abi, maps
from qtrace_bpf.vms.tracker import Tracker

pytestmark = [pytest.mark.bpf]


@pytest.fixture(scope="module")
def program():
    from support.caps import check_bpf

    check_bpf()
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.program.compiled import QtraceProgram

    with QtraceProgram(load_catalog(), discovery=True, write_events=True) as prog:
        yield prog


def table_names(program) -> list[str]:
    """Every map the compiled program has (not only those opened so far), from libbcc."""
    import ctypes as ct

    lib = ct.CDLL("libbcc.so.0")
    lib.bpf_num_tables.restype = ct.c_size_t
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    module = program.bpf.module
    return [lib.bpf_table_name(module, i).decode() for i in range(lib.bpf_num_tables(module))]


def test_rawevent_offsets_match_qtrace_h(program, gcc, tmp_path):
    """Python's struct event is BCC's compile of qtrace.h: gcc's offsetof agrees."""
    import ctypes as ct

    table = program.bpf["events"]
    buf = (ct.c_char * 4096)()
    cls = type(table.event(ct.addressof(buf)))
    fields = [f[0] for f in cls._fields_]
    assert {"ts", "tgid", "vm", "kind", "vcpu", "vals"} <= set(fields)
    body = "\n".join(f'printf("{f} %zu\\n", offsetof(struct event, {f}));' for f in fields)
    body += '\nprintf("sizeof %zu\\n", sizeof(struct event));'
    want = gcc_print(gcc, tmp_path, body)
    got = {f: getattr(cls, f).offset for f in fields}
    got["sizeof"] = ct.sizeof(cls)
    assert got == want


def test_map_types_are_what_bcc_compiled(program):
    """maps.TYPES (what the daemon opens pinned maps with) against BCC's Key and Leaf."""
    import ctypes as ct

    for name, (key, value) in maps.TYPES.items():
        table = program.bpf[name]
        for ours, theirs in ((abi.ctype(key), table.Key), (abi.ctype(value), table.Leaf)):
            assert ct.sizeof(ours) == ct.sizeof(theirs), (name, ours, theirs)
            assert [f[0] for f in getattr(ours, "_fields_", [])] == \
                [f[0] for f in getattr(theirs, "_fields_", [])], name


def test_every_map_keyed_by_vm_is_forgettable(program):
    """A map whose key starts with the VM id must be in maps.PER_VM (forget() deletes from
    those), and nothing else may be there."""
    keyed_by_vm = set()
    for name in table_names(program):
        key = program.bpf[name].Key
        fields = [f[0] for f in getattr(key, "_fields_", [])]
        if fields[:1] == ["vm"]:
            keyed_by_vm.add(name)
    assert keyed_by_vm == set(maps.PER_VM)


def test_update_failures_cover_every_map_the_program_inserts_into(program):
    """Every map the BPF C inserts into has an M_* id (so a full map is counted), and
    every M_* id names a map of the compiled program."""
    import re

    source = (ROOT / "probes" / "qtrace.bpf.c").read_text()
    inserted = set(re.findall(r"\b(\w+)\.(?:update|insert|lookup_or_try_init)\(", source))
    assert len(inserted) >= 8
    assert inserted == set(abi.MAPS)
    assert set(abi.MAPS) <= set(table_names(program))
    assert all(n >= 0 for n in program.maps.update_failures().values())


def test_forget_removes_every_per_vm_entry(bpf_caps, nothing_left):
    """On the real program: one entry in each per-VM map for two VMs; forget one."""


    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.program.compiled import QtraceProgram

    with QtraceProgram(load_catalog()) as prog:
        for vm in (0x80000101, 0x80000102):
            for name in maps.PER_VM:
                table = prog.bpf[name]
                key = table.Key()
                key.vm = vm
                table[key] = table.Leaf(1) if not hasattr(table.Leaf, "_fields_") \
                    else table.Leaf()
        t = Tracker(prog.maps, FakeBinaries(), max_vms=4, grace=0)
        t.forget(0x80000101)
        for name in maps.PER_VM:
            vms = [k.vm for k in prog.bpf[name].keys()]
            assert vms == [0x80000102], (name, vms)
