"""How a QEMU process's command line becomes a VM's name and labels, and which files a glob
must never attach (a package manager's half-written ones)."""

from __future__ import annotations

import pytest

from qtrace_bpf.contract.decoders import kubevirt_name
from qtrace_bpf.vms.targets import parse_name, parse_uuid, sanitize_label


@pytest.mark.parametrize("argv,name", [
    (["qemu", "-name", "guest=web1,debug-threads=on"], "web1"),
    (["qemu", "-name", "db"], "db"),
    (["qemu", "-name", "guest=a,,b,debug-threads=on"], "a,b"),
    (["qemu", "-name", "debug-threads=on,guest=x"], "x"),
    (["qemu", "-m", "1G"], None),
])
def test_parse_name(argv, name):
    assert parse_name(argv) == name


def test_only_a_real_uuid_becomes_a_label():
    u = "5A2E3F10-0C1B-4D2E-9F3A-1B2C3D4E5F60"
    assert parse_uuid(["q", "-uuid", u]) == u.lower()
    assert parse_uuid(["q", "-uuid", u.replace("-", "")]) == u.lower()
    assert parse_uuid(["q", "-uuid", "abc"]) == ""
    assert parse_uuid(["q", "-uuid", u + "0" * 128 * 1024]) == "", "a 128 KiB -uuid is no label"
    assert parse_uuid(["q", "-uuid", u + "\n"]) == ""


def test_sanitize_label():
    assert sanitize_label("a\nb\x00c" + "x" * 100) == "a?b?c" + "x" * 59


def test_package_manager_temp_files_are_not_attached():
    """A glob sees dpkg's and rpm's half-written files during an upgrade: never attach
    those (their inode becomes the real binary after the rename)."""
    from qtrace_bpf.vms.targets import _TEMP_NAME

    for name in ("qemu-system-x86_64.dpkg-new", "qemu-system-x86_64.dpkg-tmp",
                 "qemu-kvm;5f3a9c2e", "qemu-system-x86_64.rpmnew"):
        assert _TEMP_NAME.search(f"/usr/bin/{name}"), name
    for name in ("qemu-system-x86_64", "qemu-system-x86_64-microvm", "qemu-kvm"):
        assert not _TEMP_NAME.search(f"/usr/bin/{name}"), name


@pytest.mark.parametrize("vm,labels", [
    ("prod_vm-1", ("prod", "vm-1")),
    ("kube-system_db.example", ("kube-system", "db.example")),
    ("web1", ("", "")),  # a plain domain
    ("Prod_vm", ("", "")),  # not a DNS label: upper case
    ("a_b_c", ("", "")),  # the name part has a "_": not KubeVirt's
    ("_vm", ("", "")),
    ("ns_" + "v" * 61, ("", "")),  # 64 characters: maybe cut to the label's cap
    ("ns_" + "v" * 60, ("ns", "v" * 60)),
])
def test_kubevirt_domain_names_split_into_namespace_and_name(vm, labels):
    assert kubevirt_name(vm) == labels
