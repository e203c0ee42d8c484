"""Fixtures every folder shares, and the rules of the two folders: tests/unit needs no root,
no BPF and no KVM (scripts/test-debian-deps.sh runs it on Debian's own Python packages);
every test in tests/integration is marked with what it needs (bpf, kvm, root, debian_vm),
and a test that asks for BPF or KVM without its marker fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, caps
from support.caps import check_bpf, check_kvm, check_root, require
from support.elf_fixtures import build_all
from support.kernel_state import bpf_state, wait_settled
from support.processes import kill_stray_test_processes, remove_stray_pods
from support.qemu import QEMU_BUILDS, upstream_qemu
from support.qprobe import remove_test_pins

# The Debian-kernel tier (integration/test_debian_hosts.py: guests booted under TCG, ~7 min a
# release) is collected when asked for: scripts/test.sh (so CI) asks, a bare pytest not.
collect_ignore = ([] if os.environ.get("QTRACE_DEBIAN_VM") == "1"
                  else ["integration/test_debian_hosts.py"])
NEEDS = ("bpf", "kvm", "root", "debian_vm")


def pytest_addoption(parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden files (tests/unit/golden/) from this run")


def pytest_collection_modifyitems(config, items) -> None:
    """A marker says what a test needs; where a test lives must agree with it."""
    unit, integration = ROOT / "tests" / "unit", ROOT / "tests" / "integration"
    wrong = []
    for item in items:
        marks = {m.name for m in item.iter_markers()} & set(NEEDS)
        path = Path(str(item.path))
        if path.is_relative_to(unit) and marks:
            wrong.append(f"{item.nodeid}: marked {sorted(marks)} but in tests/unit (root-free)")
        if path.is_relative_to(integration) and not marks:
            wrong.append(f"{item.nodeid}: in tests/integration without a marker of {NEEDS}")
    if wrong:
        raise pytest.UsageError("tests in the wrong folder or unmarked:\n" + "\n".join(wrong))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    caps.CURRENT_MARKS = {m.name for m in item.iter_markers()}


def pytest_sessionstart(session) -> None:
    for what in kill_stray_test_processes():
        print(f"conftest: killed a stray process of an earlier run: {what}", file=sys.stderr)
    for pod in remove_stray_pods(ROOT):
        print(f"conftest: removed a stray pod of an earlier run: {pod}", file=sys.stderr)
    remove_test_pins()

def pytest_sessionfinish(session, exitstatus) -> None:
    kill_stray_test_processes()
    remove_test_pins()


@pytest.fixture(scope="session")
def built_deb() -> Path:
    """The .deb (and its .changes, source package) built from this tree, once a session."""
    check_root()  # scripts/build-deb.sh installs its build dependencies with apt
    r = subprocess.run(["bash", "scripts/build-deb.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return ROOT / r.stdout.strip().splitlines()[-1]

@pytest.fixture(scope="module", params=QEMU_BUILDS)
def qemu(request) -> str | None:
    """Which qemu-system-x86_64 a scenario runs (None: the one on PATH, Debian's)."""
    check_kvm()
    if request.param == "debian-7.2":
        return None
    path = upstream_qemu()
    require("upstream QEMU 10.0", path is not None,
            "bash scripts/build-qemu.sh (builds Debian trixie's QEMU source, ~3 min)")
    return path

@pytest.fixture
def bpf_caps() -> None:
    check_bpf()

@pytest.fixture
def kvm_caps() -> None:
    check_kvm()

@pytest.fixture(scope="session")
def gcc() -> str:
    path = shutil.which("gcc")
    require("gcc", path is not None, "apt-get install gcc")
    return path  # type: ignore[return-value]

@pytest.fixture
def nothing_left():
    """The test must leave the kernel's BPF state as it found it."""
    before = bpf_state()
    yield
    assert wait_settled(before) == {}, "left behind"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, gcc):
    """The gcc-built ELF fixtures (support/elf_fixtures.py), built once per test module."""
    return build_all(gcc, tmp_path_factory.mktemp("elf"))
