"""The kernel/user contract has one source: probes/qtrace.h and <linux/kvm.h>.

gcc compiles the same header and prints what it means; Python's reading of it (abi.py),
BCC's struct layouts and the generated ioctl numbers must all agree with that.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from qtrace_bpf.contract import abi, maps

HEADER = ROOT / "probes" / "qtrace.h"


def generate_numbers(gcc: str) -> str:
    """scripts/gen_kvm_ioctls.py's output (a script: only it and this test need it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_kvm_ioctls",
                                                  ROOT / "scripts" / "gen_kvm_ioctls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_numbers(gcc)
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


def test_constants_match_what_gcc_compiles(gcc, tmp_path):
    """Every #define and enumerator abi.py read equals the compiler's value of it."""
    defines, enums = abi.parse_header(HEADER.read_text())
    names = [*defines, *(n for members in enums.values() for n in members)]
    assert {"K_EXEC", "PH_RESET", "FOLLOWUP_FLAG", "CAUSE_GUEST_RESET", "M_WRITE_COUNTS",
            "QTRACE_ABI_VERSION"} <= set(names)
    body = "\n".join(f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in names)
    compiled = gcc_print(gcc, tmp_path, body)
    assert {n: getattr(abi, n) for n in names} == compiled


def test_names_derive_from_the_c_names():
    assert abi.PHASES == ("boot", "reset", "hotplug", "migration", "runtime")
    assert abi.CAUSES[abi.CAUSE_HOST_QMP_SYSTEM_RESET] == "host-qmp-system-reset"
    assert abi.CAUSES[abi.CAUSE_GUEST_RESET] == "guest-reset"
    assert len(abi.CAUSES) == abi.NCAUSES
    assert len(abi.MAPS) == abi.NMAPS
    assert abi.KINDS[abi.K_STATE_WRITE] == "state_write"


def test_header_parser_refuses_implicit_enum_values():
    with pytest.raises(ValueError, match="no explicit value"):
        abi.parse_header("enum phase { PH_BOOT, PH_RESET = 1 };")


def test_kvm_ioctl_numbers_are_generated_from_kvm_h(gcc):
    """A hand-edited number (or a stale file) differs from what the compiler says."""
    committed = (ROOT / "qtrace_bpf" / "contract" / "kvm_ioctl_numbers.py").read_text()
    assert generate_numbers(gcc) == committed, \
        "qtrace_bpf/contract/kvm_ioctl_numbers.py is not what <linux/kvm.h> says: run " \
        "scripts/gen_kvm_ioctls.py"


@pytest.fixture(scope="module")
def program():
    from conftest import check_bpf

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


@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_struct_layouts_read_from_qtrace_h_match_gcc(struct, gcc, tmp_path):
    """The daemon reads maps and events with abi.STRUCTS (no BCC): gcc's offsetof and
    sizeof of each struct agree with them."""
    import ctypes as ct

    cls = abi.STRUCTS[struct]
    fields = [f[0] for f in cls._fields_]
    body = "\n".join(f'printf("{f} %zu\\n", offsetof(struct {struct}, {f}));' for f in fields)
    body += f'\nprintf("sizeof %zu\\n", sizeof(struct {struct}));'
    got = {f: getattr(cls, f).offset for f in fields}
    got["sizeof"] = ct.sizeof(cls)
    assert got == gcc_print(gcc, tmp_path, body)


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
