"""x86-64 KVM ioctls: their names, scope, and which ones write vCPU/VM state.

The numbers are not typed here: qtrace_bpf/contract/kvm_ioctl_numbers.py is generated from the
kernel's <linux/kvm.h> by the compiler (scripts/gen_kvm_ioctls.py; a test regenerates it and
compares), and the BPF C includes the same header.  Match the full value: 0xaea2 is
KVM_SET_TSC_KHZ, 0x4080aea2 KVM_SET_DEBUGREGS.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtrace_bpf.contract.kvm_ioctl_numbers import NUMBERS


@dataclass(frozen=True)
class KvmIoctl:
    name: str
    number: int
    scope: str  # "system" | "vm" | "vcpu"
    state_write: bool


# (name, scope, state_write): what each ioctl means to qtrace
TABLE = [
    ("KVM_GET_API_VERSION", "system", False),
    ("KVM_CREATE_VM", "system", False),
    ("KVM_GET_MSR_INDEX_LIST", "system", False),
    ("KVM_CHECK_EXTENSION", "system", False),
    ("KVM_GET_VCPU_MMAP_SIZE", "system", False),
    ("KVM_GET_SUPPORTED_CPUID", "system", False),
    ("KVM_GET_EMULATED_CPUID", "system", False),
    ("KVM_GET_MSR_FEATURE_INDEX_LIST", "system", False),
    ("KVM_CREATE_VCPU", "vm", True),
    ("KVM_GET_DIRTY_LOG", "vm", False),
    ("KVM_SET_NR_MMU_PAGES", "vm", False),
    ("KVM_GET_NR_MMU_PAGES", "vm", False),
    ("KVM_SET_USER_MEMORY_REGION", "vm", False),
    ("KVM_SET_TSS_ADDR", "vm", False),
    ("KVM_SET_IDENTITY_MAP_ADDR", "vm", False),
    ("KVM_SET_USER_MEMORY_REGION2", "vm", False),
    ("KVM_CREATE_IRQCHIP", "vm", False),
    ("KVM_IRQ_LINE", "vm", False),
    ("KVM_GET_IRQCHIP", "vm", False),
    ("KVM_SET_IRQCHIP", "vm", True),
    ("KVM_CREATE_PIT", "vm", False),
    ("KVM_GET_PIT", "vm", False),
    ("KVM_SET_PIT", "vm", True),
    ("KVM_IRQ_LINE_STATUS", "vm", False),
    ("KVM_REGISTER_COALESCED_MMIO", "vm", False),
    ("KVM_UNREGISTER_COALESCED_MMIO", "vm", False),
    ("KVM_SET_GSI_ROUTING", "vm", False),
    ("KVM_IRQFD", "vm", False),
    ("KVM_CREATE_PIT2", "vm", False),
    ("KVM_SET_BOOT_CPU_ID", "vm", False),
    ("KVM_IOEVENTFD", "vm", False),
    ("KVM_XEN_HVM_CONFIG", "vm", False),
    ("KVM_SET_CLOCK", "vm", True),
    ("KVM_GET_CLOCK", "vm", False),
    ("KVM_RUN", "vcpu", False),
    ("KVM_GET_REGS", "vcpu", False),
    ("KVM_SET_REGS", "vcpu", True),
    ("KVM_GET_SREGS", "vcpu", False),
    ("KVM_SET_SREGS", "vcpu", True),
    ("KVM_TRANSLATE", "vcpu", False),
    ("KVM_INTERRUPT", "vcpu", False),
    ("KVM_GET_MSRS", "vcpu", False),
    ("KVM_SET_MSRS", "vcpu", True),
    ("KVM_SET_CPUID", "vcpu", True),
    ("KVM_SET_SIGNAL_MASK", "vcpu", False),
    ("KVM_GET_FPU", "vcpu", False),
    ("KVM_SET_FPU", "vcpu", True),
    ("KVM_GET_LAPIC", "vcpu", False),
    ("KVM_SET_LAPIC", "vcpu", True),
    ("KVM_SET_CPUID2", "vcpu", True),
    ("KVM_GET_CPUID2", "vcpu", False),
    ("KVM_TPR_ACCESS_REPORTING", "vcpu", False),
    ("KVM_SET_VAPIC_ADDR", "vcpu", True),
    ("KVM_GET_MP_STATE", "vcpu", False),
    ("KVM_SET_MP_STATE", "vcpu", True),
    ("KVM_NMI", "vcpu", False),
    ("KVM_SET_GUEST_DEBUG", "vcpu", True),
    ("KVM_X86_SETUP_MCE", "vcpu", True),
    ("KVM_X86_GET_MCE_CAP_SUPPORTED", "system", False),
    ("KVM_X86_SET_MCE", "vcpu", True),
    ("KVM_GET_VCPU_EVENTS", "vcpu", False),
    ("KVM_GET_PIT2", "vm", False),
    ("KVM_SET_VCPU_EVENTS", "vcpu", True),
    ("KVM_SET_PIT2", "vm", True),
    ("KVM_GET_DEBUGREGS", "vcpu", False),
    ("KVM_SET_DEBUGREGS", "vcpu", True),
    ("KVM_SET_TSC_KHZ", "vcpu", True),
    ("KVM_GET_TSC_KHZ", "vcpu", False),
    ("KVM_ENABLE_CAP", "vm", False),
    ("KVM_GET_XSAVE", "vcpu", False),
    ("KVM_SET_XSAVE", "vcpu", True),
    ("KVM_SIGNAL_MSI", "vm", False),
    ("KVM_GET_XCRS", "vcpu", False),
    ("KVM_SET_XCRS", "vcpu", True),
    ("KVM_GET_ONE_REG", "vcpu", False),
    ("KVM_SET_ONE_REG", "vcpu", True),
    ("KVM_KVMCLOCK_CTRL", "vcpu", False),
    ("KVM_SET_PMU_EVENT_FILTER", "vm", False),
    ("KVM_SMI", "vcpu", False),
    ("KVM_MEMORY_ENCRYPT_OP", "vm", False),
    ("KVM_HYPERV_EVENTFD", "vm", False),
    ("KVM_GET_NESTED_STATE", "vcpu", False),
    ("KVM_SET_NESTED_STATE", "vcpu", True),
    ("KVM_CLEAR_DIRTY_LOG", "vm", False),
    ("KVM_GET_SUPPORTED_HV_CPUID", "vcpu", False),
    ("KVM_X86_SET_MSR_FILTER", "vm", False),
    ("KVM_RESET_DIRTY_RINGS", "vm", False),
    ("KVM_GET_SREGS2", "vcpu", False),
    ("KVM_SET_SREGS2", "vcpu", True),
    ("KVM_GET_STATS_FD", "vcpu", False),
    ("KVM_GET_XSAVE2", "vcpu", False),
    ("KVM_CREATE_DEVICE", "vm", False),
    ("KVM_SET_DEVICE_ATTR", "vm", False),
    ("KVM_GET_DEVICE_ATTR", "vm", False),
    ("KVM_HAS_DEVICE_ATTR", "vm", False),
]

IOCTLS: dict[int, KvmIoctl] = {}
BY_NAME: dict[str, KvmIoctl] = {}
for _name, _scope, _write in TABLE:
    if _name not in NUMBERS:  # older <linux/kvm.h> at generation time
        continue
    _entry = KvmIoctl(_name, NUMBERS[_name], _scope, _write)
    if _entry.number in IOCTLS:  # pragma: no cover - guarded by a unit test
        raise AssertionError(f"duplicate ioctl number {_entry.number:#x}")
    IOCTLS[_entry.number] = _entry
    BY_NAME[_name] = _entry

STATE_WRITES: frozenset[int] = frozenset(n for n, e in IOCTLS.items() if e.state_write)
# By name only: what an oracle that decodes ioctls itself (strace) should count.
STATE_WRITE_NAMES: frozenset[str] = frozenset(name for name, _scope, w in TABLE if w)
