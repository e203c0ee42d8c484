"""What a test needs of the machine: skipped locally with the missing piece named, a failure
in CI (QTRACE_REQUIRE_CAPS=1 or CI=true), where every test must run.  A test that asks for
BPF or KVM must also carry the marker that says so (tests/conftest.py sets CURRENT_MARKS),
so `-m "not bpf and not kvm"` and the folders never lie about what a test needs."""

from __future__ import annotations

import os
import shutil

import pytest

# .ci/run sets this: there, a missing capability is a failure, never a skip.
REQUIRE = os.environ.get("QTRACE_REQUIRE_CAPS") == "1" or os.environ.get("CI") == "true"
CURRENT_MARKS: set[str] = set()


def require(what: str, ok: bool, how: str) -> None:
    if ok:
        return
    msg = f"needs {what}: {how}"
    if REQUIRE:
        pytest.fail(f"{msg} (QTRACE_REQUIRE_CAPS/CI set: capabilities must be present)")
    pytest.skip(msg)


def marked(name: str) -> None:
    """Fail a test that needs `name` but does not say so with @pytest.mark.<name>."""
    if name not in CURRENT_MARKS:
        pytest.fail(f"this test needs {name} but is not marked @pytest.mark.{name}"
                    " (and belongs in tests/integration)")


def _bcc_importable() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


def check_root() -> None:
    if "bpf" not in CURRENT_MARKS:
        marked("root")
    require("root", os.geteuid() == 0, "run the tests as root")


def check_bpf() -> None:
    marked("bpf")
    require("root", os.geteuid() == 0, "run the tests as root")
    require("BCC", _bcc_importable(), "apt-get install python3-bpfcc; use scripts/setup.sh")
    build = f"/lib/modules/{os.uname().release}/build"
    require("kernel headers", os.path.exists(build), f"{build} (scripts/setup.sh links them)")
    require("tracefs with uprobes", os.path.exists("/sys/kernel/tracing/uprobe_events"),
            "mount -t tracefs nodev /sys/kernel/tracing")


def check_kvm() -> None:
    check_bpf()
    marked("kvm")
    require("/dev/kvm", os.access("/dev/kvm", os.R_OK | os.W_OK), "a host with KVM")
    require("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None,
            "apt-get install qemu-system-x86")
    require("SeaBIOS", os.path.exists("/usr/share/seabios/bios-256k.bin"),
            "apt-get install seabios")
