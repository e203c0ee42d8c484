"""Bad input against a real, paused VM: no permission, BCC or kernel headers missing, no
kernel hook; an unreadable binary.  One clear line, a non-zero exit, nothing attached."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
from support import ROOT
from support.caps import require
from support.qprobe import assert_clean_error, qprobe

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


@pytest.fixture(scope="module")
def paused_vm():
    from support.caps import check_kvm

    check_kvm()
    with DemoQemu("errors-target") as vm:
        yield vm


def test_no_permission(paused_vm, nothing_left):
    setpriv = shutil.which("setpriv")
    require("setpriv", setpriv is not None, "apt-get install util-linux")
    r = qprobe("watch", str(paused_vm.pid),
               prefix=[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert_clean_error(r, "permission denied")


def test_bcc_missing(paused_vm, nothing_left):
    """The same interpreter, with only BCC made unimportable (the other dependencies may
    come from Debian's dist-packages too, where BCC lives)."""
    code = ("import sys\n"
            "class NoBcc:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'bcc' or name.startswith('bcc.'):\n"
            "            raise ModuleNotFoundError(\"No module named 'bcc'\", name='bcc')\n"
            "sys.meta_path.insert(0, NoBcc())\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from qtrace_bpf.cli import main\n"
            "main(prog_name='qprobe')\n")
    r = qprobe("watch", str(paused_vm.pid), python=[sys.executable, "-c", code])
    assert_clean_error(r, "BCC is not installed")
    assert "python3-bpfcc" in r.stderr


def _in_mount_ns(script: str) -> list[str]:
    unshare = shutil.which("unshare")
    require("unshare", unshare is not None, "apt-get install util-linux")
    require("root", os.geteuid() == 0, "run as root")
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh"]


def test_kernel_headers_missing(paused_vm, nothing_left):
    mods = f"/lib/modules/{os.uname().release}"
    prefix = _in_mount_ns(f"mount -t tmpfs none {mods} && exec \"$@\"")
    r = qprobe("watch", str(paused_vm.pid), prefix=prefix)
    assert_clean_error(r, "kernel headers missing")
    assert f"apt install linux-headers-{os.uname().release}" in r.stderr  # the fix, exactly


def test_no_usable_kernel_hook(paused_vm, nothing_left):
    """Without tracefs (and with kprobes/fentry unavailable) nothing can hook KVM ioctls."""
    prefix = _in_mount_ns("mount -t tmpfs none /sys/kernel/tracing && "
                          "(mount -t tmpfs none /sys/kernel/debug 2>/dev/null || true) && "
                          "exec \"$@\"")
    r = qprobe("watch", str(paused_vm.pid), "--hook", "tracepoint", prefix=prefix)
    require("a kernel without a working fentry/kprobe hook", r.returncode != 0,
            "this host hooks KVM without tracefs: nothing to prove here")
    assert_clean_error(r, "no usable kernel hook")
    for mode in ("fentry", "kprobe", "tracepoint"):
        assert f"{mode}:" in r.stderr


def test_symbols_unreadable():
    setpriv = shutil.which("setpriv")
    require("setpriv", setpriv is not None, "apt-get install util-linux")
    d = tempfile.mkdtemp(prefix="qtrace-unreadable-")
    try:
        os.chmod(d, 0o755)
        f = os.path.join(d, "qemu")
        shutil.copy("/bin/true", f)
        os.chmod(f, 0)
        nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        assert_clean_error(qprobe("symbols", f, prefix=nobody), "cannot read: Permission denied")
        os.chmod(d, 0o700)
        assert_clean_error(qprobe("symbols", f, prefix=nobody), "permission denied")
    finally:
        shutil.rmtree(d)
