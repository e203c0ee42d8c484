"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing attached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import QPROBE, ROOT, require

from qtrace_bpf.commands.demo_vm import DemoQemu


def qprobe(*args: str, prefix: list[str] | None = None, timeout: float = 120,
           python: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(prefix or []), *(python or QPROBE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_clean_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("qprobe: error:")]
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""


@pytest.fixture(scope="module")
def paused_vm():
    from conftest import check_kvm

    check_kvm()
    with DemoQemu("errors-target") as vm:
        yield vm


def test_pid_absent():
    assert_clean_error(qprobe("watch", "999999999"), "no such process")


def test_pid_not_qemu():
    with subprocess.Popen(["sleep", "30"]) as p:
        try:
            assert_clean_error(qprobe("watch", str(p.pid)), "not a QEMU process")
        finally:
            p.kill()


def test_pid_not_a_number():
    r = qprobe("watch", "vm1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a valid integer" in r.stderr


def test_bad_duration():
    r = qprobe("watch", "1", "--duration", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr


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


def test_symbols_non_elf(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    assert_clean_error(qprobe("symbols", str(f)), "not an ELF file")


def test_symbols_missing_file(tmp_path):
    assert_clean_error(qprobe("symbols", str(tmp_path / "nope")), "no such file")


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


def test_symbols_needs_one_target():
    r = qprobe("symbols")
    assert r.returncode == 2 and "give either BINARY or --pid PID" in r.stderr
