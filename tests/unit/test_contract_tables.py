"""Unit tests on the tables and parsers everything else trusts."""

from __future__ import annotations

import re

import pytest
from support import ROOT

from qtrace_bpf.contract import decoders, kvm_ioctls
from qtrace_bpf.contract.catalog import absent_in, load_catalog, parse_catalog, version_tuple
from qtrace_bpf.contract.decoders import cause

FACTS = ROOT / "docs" / "qemu-kvm.md"
# The facts file's table, as read from <linux/kvm.h> (independent of our _IOC arithmetic).
FACT_NUMBERS = {
    "KVM_CREATE_VM": 0xAE01, "KVM_CREATE_VCPU": 0xAE41, "KVM_RUN": 0xAE80,
    "KVM_SET_REGS": 0x4090AE82, "KVM_SET_SREGS": 0x4138AE84, "KVM_SET_SREGS2": 0x4140AECD,
    "KVM_SET_LAPIC": 0x4400AE8F, "KVM_SET_TSC_KHZ": 0xAEA2, "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_SET_MSRS": 0x4008AE89, "KVM_SET_CPUID2": 0x4008AE90, "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_XSAVE": 0x5000AEA5, "KVM_SET_XCRS": 0x4188AEA7, "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_SET_MP_STATE": 0x4004AE99, "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_SET_NESTED_STATE": 0x4080AEBF, "KVM_KVMCLOCK_CTRL": 0xAEAD, "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B, "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_VAPIC_ADDR": 0x4008AE93, "KVM_X86_SET_MSR_FILTER": 0x4188AEC6,
    "KVM_ENABLE_CAP": 0x4068AEA3,
}


@pytest.mark.parametrize("name,number", sorted(FACT_NUMBERS.items()))
def test_ioctl_numbers_match_kvm_h(name, number):
    assert kvm_ioctls.BY_NAME[name].number == number
    assert decoders.ioctl(number) == name


def test_facts_file_numbers_agree():
    text = FACTS.read_text()
    pairs = re.findall(r"(KVM_[A-Z0-9_]+) \| (0x[0-9a-f]+)", text)
    assert len(pairs) >= 20
    for name, value in pairs:
        assert kvm_ioctls.BY_NAME[name].number == int(value, 16), name


def test_traps_are_distinct():
    assert decoders.ioctl(0xAEA2) == "KVM_SET_TSC_KHZ"
    assert decoders.ioctl(0x4080AEA2) == "KVM_SET_DEBUGREGS"
    assert decoders.ioctl(0xAEA3) == "KVM_GET_TSC_KHZ"
    assert decoders.ioctl(0x4068AEA3) == "KVM_ENABLE_CAP"
    assert decoders.ioctl(0x1234AE00 | 0xFF).startswith("KVM_IOCTL_0x")


def test_state_writes():
    names = {kvm_ioctls.IOCTLS[n].name for n in kvm_ioctls.STATE_WRITES}
    must = {"KVM_SET_REGS", "KVM_SET_SREGS", "KVM_SET_SREGS2", "KVM_SET_LAPIC",
            "KVM_SET_TSC_KHZ", "KVM_SET_MSRS", "KVM_SET_CPUID2", "KVM_SET_FPU", "KVM_SET_XSAVE",
            "KVM_SET_XCRS", "KVM_SET_VCPU_EVENTS", "KVM_SET_MP_STATE", "KVM_SET_DEBUGREGS",
            "KVM_SET_NESTED_STATE", "KVM_SET_GUEST_DEBUG", "KVM_CREATE_VCPU"}
    assert must <= names
    assert not names & {"KVM_RUN", "KVM_GET_REGS", "KVM_GET_MSRS", "KVM_CREATE_VM"}
    assert all(((n >> 8) & 0xFF) == 0xAE for n in kvm_ioctls.IOCTLS)


def test_catalog_loads_and_fits_the_bpf_program():
    cat = load_catalog()
    events = {p.event for p in cat.probes}
    assert {"vcpu_init", "arch_init_vcpu", "put_registers", "sync_post_init", "sync_post_reset",
            "system_reset", "apic_reset", "put_apicbase", "set_tsc_khz", "migration_load",
            "device_add", "machine_done"} <= events
    assert [p.slot for p in cat.probes] == list(range(len(cat.probes)))
    # never a uretprobe on code that runs in a coroutine
    assert not cat.by_event("migration_load").has_return
    assert cat.by_event("system_reset").arg1 == "shutdown_cause"


def test_catalog_rejects_unknown_action():
    with pytest.raises(ValueError, match="unknown action"):
        parse_catalog('[[probe]]\nevent="x"\nfunctions=["f"]\naction="explode"\n')


def test_versions():
    assert version_tuple("7.2.22 (Debian 1:7.2+dfsg-7)") == (7, 2, 22)
    assert version_tuple(None) == ()
    probe = load_catalog().by_event("vcpu_create")
    assert absent_in(probe, "7.2.22") and not absent_in(probe, "9.2.4")
    assert not absent_in(probe, None)


def test_shutdown_causes():
    assert cause(3) == "host-qmp-system-reset"
    assert cause(7) == "guest-reset"
    assert cause(10) == "snapshot-load"
    assert cause(99) == "cause-99"
