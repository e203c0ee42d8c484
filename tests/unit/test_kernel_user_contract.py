"""The kernel/user contract has one source: probes/qtrace.h and <linux/kvm.h>.

gcc compiles the same header and prints what it means; Python's reading of it (abi.py),
BCC's struct layouts and the generated ioctl numbers must all agree with that.
"""

from __future__ import annotations

import pytest
from support import ROOT
from support.gcc import HEADER, gcc_print

from qtrace_bpf.contract import abi


def generate_numbers(gcc: str) -> str:
    """scripts/gen_kvm_ioctls.py's output (a script: only it and this test need it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_kvm_ioctls",
                                                  ROOT / "scripts" / "gen_kvm_ioctls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_numbers(gcc)


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
