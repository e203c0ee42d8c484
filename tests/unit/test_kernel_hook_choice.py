"""The kernel hook chain: every variant compiles; the chosen one is the first that works."""

from __future__ import annotations

import pytest

from qtrace_bpf.program import kernel_hook


def test_order():
    assert kernel_hook.order(None) == ["fentry", "kprobe", "tracepoint"]
    assert kernel_hook.order("tracepoint") == ["tracepoint", "fentry", "kprobe"]
    with pytest.raises(ValueError):
        kernel_hook.order("raw_sys_enter")


def test_btf_names_come_from_its_string_section(tmp_path, monkeypatch):
    """A BTF blob (header, then strings): a name counts only as a whole string."""
    import struct

    strings = b"\0kvm_vcpu_ioctl\0kvm_vm_ioctl_check_extension\0"
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 0, 0, len(strings))
    (tmp_path / "vmlinux").write_bytes(header + strings)
    (tmp_path / "kvm").write_bytes(b"\x00" * 8)  # not BTF: ignored, not an error
    monkeypatch.setattr(kernel_hook, "BTF_DIR", str(tmp_path))
    assert kernel_hook.btf_functions(kernel_hook.KVM_FUNCS) == {"kvm_vcpu_ioctl"}
    reason = kernel_hook.precheck("fentry").reason
    assert not kernel_hook.precheck("fentry").usable and "kvm_vm_ioctl" in reason, reason
