"""The kernel hook chain on this kernel: every variant compiles; doctor names the one chosen."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from support import QPROBE, ROOT
from support.caps import require

from qtrace_bpf.contract.catalog import bpf_source
from qtrace_bpf.program import kernel_hook
from qtrace_bpf.program.bcc_compile import cflags

pytestmark = [pytest.mark.bpf]


@pytest.mark.parametrize("mode", kernel_hook.MODES)
def test_variant_compiles(bpf_caps, mode):
    """fentry and kprobe must exist and compile even where this kernel refuses them."""
    from bcc import BPF

    try:
        b = BPF(text=bpf_source().encode(), cflags=cflags(mode))
    except Exception as exc:  # noqa: BLE001 - BCC raises plain Exception
        # fentry programs auto-attach at construction: a refusal there is not a compile error
        assert "Failed to compile" not in str(exc), exc
        assert mode == "fentry", exc
        return
    try:
        if mode == "kprobe":  # loadable without kprobes: the verifier judges it here
            b.load_func(b"kp_kvm_ioctl", BPF.KPROBE)
            b.load_func(b"kretp_kvm_ioctl", BPF.KPROBE)
        for fn in (b"tp_sched_exec", b"tp_sched_exit", b"qt_entry_0", b"qt_return_0"):
            b.load_func(fn, BPF.TRACEPOINT if fn.startswith(b"tp_") else BPF.KPROBE)
    finally:
        b.cleanup()


def test_doctor_reports_the_chain(bpf_caps):
    r = subprocess.run([*QPROBE, "doctor", "--json"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    chosen = report["kernel_hook"]
    assert chosen in kernel_hook.MODES
    for mode in kernel_hook.MODES[: kernel_hook.MODES.index(chosen)]:
        assert report["kernel_hooks"][mode]["usable"] is False
        assert report["kernel_hooks"][mode]["reason"]
    assert report["kernel_hooks"][chosen]["usable"] is True
    text = subprocess.run([*QPROBE, "doctor"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120).stdout
    assert f"will use: {chosen}" in text


def test_doctor_on_this_machine(bpf_caps):
    """Here kprobes are compiled out and fentry is refused: doctor must say so and why."""
    require("a kernel without kprobes", not kernel_hook.precheck("kprobe").usable,
            "this kernel has kprobes: the fallback this test is about does not happen")
    r = subprocess.run([*QPROBE, "doctor", "--json"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    report = json.loads(r.stdout)
    assert "kprobe" in report["kernel_hooks"]["kprobe"]["reason"]
    assert report["kernel_hook"] in ("fentry", "tracepoint")


def test_hook_choice_does_not_need_kallsyms(bpf_caps):
    """The shipped unit hides /proc/kallsyms (ProtectKernelTunables): the verdicts must be
    the same without it, or production hosts would fall back to the slow tracepoint."""
    unshare = shutil.which("unshare")
    require("unshare", unshare is not None, "apt-get install util-linux")
    hidden = [unshare, "-m", "--propagation", "private", "sh", "-c",
              "mount --bind /dev/null /proc/kallsyms && exec \"$@\"", "sh"]
    probe = subprocess.run([*hidden, "sh", "-c", "wc -c < /proc/kallsyms"], capture_output=True,
                           text=True)
    assert probe.stdout.strip() == "0", "kallsyms was not hidden"
    with_kallsyms, without = _doctor(), _doctor(hidden)
    assert without["kernel_hook"] == with_kallsyms["kernel_hook"]
    assert without["kernel_hooks"] == with_kallsyms["kernel_hooks"]


def _doctor(prefix: list[str] = ()) -> dict:
    r = subprocess.run([*prefix, *QPROBE, "doctor", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.stdout, r.stderr
    return json.loads(r.stdout)
