"""Trust that rests on who owns a file: only binaries no unprivileged user could have written
are probed, so these tests need root, to own their files or to chown them: a file any user
could write is refused, the attach goes to the inode that was parsed whatever the name becomes,
a file changed while parsed is not attached, the resolver child keeps to its limits."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.caps import require
from support.elf_fixtures import nm_address
from support.gcc import cc, minidebuginfo_bomb, prog

from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.errors import AttachError, ElfError
from qtrace_bpf.symbols import resolver
from qtrace_bpf.symbols.binaries import QemuBinaries
from qtrace_bpf.symbols.binfile import open_binary

pytestmark = [pytest.mark.root]
NOBODY = 65534


@pytest.fixture
def root_only() -> None:
    require("root", os.geteuid() == 0, "run the tests as root (chown)")


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
    big = minidebuginfo_bomb(gcc, tmp_path / "big" / "qemu-system-x86_64", 100 << 20, pad=8 << 20)
    bf = bins.open(str(big), str(big))
    try:
        with pytest.raises(ElfError, match="64 MiB"):
            resolver.resolve_isolated(bf, ("qemu_system_reset",), (), None,
                                      resolver.Limits(memory_bytes=64 << 20))
    finally:
        bf.close()
