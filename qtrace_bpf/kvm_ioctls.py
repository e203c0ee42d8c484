"""x86-64 KVM ioctl numbers, their names, and which ones write vCPU/VM state.

Numbers are built the way <linux/kvm.h> builds them (_IO/_IOR/_IOW/_IOWR on type 0xAE
with the x86-64 struct sizes), so a reader can check each line against the header.
Match the full value: 0xaea2 is KVM_SET_TSC_KHZ, 0x4080aea2 KVM_SET_DEBUGREGS.
"""

from __future__ import annotations

from dataclasses import dataclass

KVMIO = 0xAE
_NONE, _W, _R, _RW = 0, 1, 2, 3


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


@dataclass(frozen=True)
class KvmIoctl:
    name: str
    number: int
    scope: str  # "system" | "vm" | "vcpu"
    state_write: bool


# (name, direction, nr, size, scope, state_write)
_TABLE = [
    ("KVM_GET_API_VERSION", _NONE, 0x00, 0, "system", False),
    ("KVM_CREATE_VM", _NONE, 0x01, 0, "system", False),
    ("KVM_GET_MSR_INDEX_LIST", _RW, 0x02, 4, "system", False),
    ("KVM_CHECK_EXTENSION", _NONE, 0x03, 0, "system", False),
    ("KVM_GET_VCPU_MMAP_SIZE", _NONE, 0x04, 0, "system", False),
    ("KVM_GET_SUPPORTED_CPUID", _RW, 0x05, 8, "system", False),
    ("KVM_GET_EMULATED_CPUID", _RW, 0x09, 8, "system", False),
    ("KVM_GET_MSR_FEATURE_INDEX_LIST", _RW, 0x0A, 4, "system", False),
    ("KVM_CREATE_VCPU", _NONE, 0x41, 0, "vm", True),
    ("KVM_GET_DIRTY_LOG", _W, 0x42, 16, "vm", False),
    ("KVM_SET_NR_MMU_PAGES", _NONE, 0x44, 0, "vm", False),
    ("KVM_GET_NR_MMU_PAGES", _NONE, 0x45, 0, "vm", False),
    ("KVM_SET_USER_MEMORY_REGION", _W, 0x46, 32, "vm", False),
    ("KVM_SET_TSS_ADDR", _NONE, 0x47, 0, "vm", False),
    ("KVM_SET_IDENTITY_MAP_ADDR", _W, 0x48, 8, "vm", False),
    ("KVM_SET_USER_MEMORY_REGION2", _W, 0x49, 160, "vm", False),
    ("KVM_CREATE_IRQCHIP", _NONE, 0x60, 0, "vm", False),
    ("KVM_IRQ_LINE", _W, 0x61, 8, "vm", False),
    ("KVM_GET_IRQCHIP", _RW, 0x62, 520, "vm", False),
    ("KVM_SET_IRQCHIP", _R, 0x63, 520, "vm", True),
    ("KVM_CREATE_PIT", _NONE, 0x64, 0, "vm", False),
    ("KVM_GET_PIT", _RW, 0x65, 72, "vm", False),
    ("KVM_SET_PIT", _R, 0x66, 72, "vm", True),
    ("KVM_IRQ_LINE_STATUS", _RW, 0x67, 8, "vm", False),
    ("KVM_REGISTER_COALESCED_MMIO", _W, 0x67, 16, "vm", False),
    ("KVM_UNREGISTER_COALESCED_MMIO", _W, 0x68, 16, "vm", False),
    ("KVM_SET_GSI_ROUTING", _W, 0x6A, 8, "vm", False),
    ("KVM_IRQFD", _W, 0x76, 32, "vm", False),
    ("KVM_CREATE_PIT2", _W, 0x77, 64, "vm", False),
    ("KVM_SET_BOOT_CPU_ID", _NONE, 0x78, 0, "vm", False),
    ("KVM_IOEVENTFD", _W, 0x79, 64, "vm", False),
    ("KVM_XEN_HVM_CONFIG", _W, 0x7A, 56, "vm", False),
    ("KVM_SET_CLOCK", _W, 0x7B, 48, "vm", True),
    ("KVM_GET_CLOCK", _R, 0x7C, 48, "vm", False),
    ("KVM_RUN", _NONE, 0x80, 0, "vcpu", False),
    ("KVM_GET_REGS", _R, 0x81, 144, "vcpu", False),
    ("KVM_SET_REGS", _W, 0x82, 144, "vcpu", True),
    ("KVM_GET_SREGS", _R, 0x83, 312, "vcpu", False),
    ("KVM_SET_SREGS", _W, 0x84, 312, "vcpu", True),
    ("KVM_TRANSLATE", _RW, 0x85, 24, "vcpu", False),
    ("KVM_INTERRUPT", _W, 0x86, 4, "vcpu", False),
    ("KVM_GET_MSRS", _RW, 0x88, 8, "vcpu", False),
    ("KVM_SET_MSRS", _W, 0x89, 8, "vcpu", True),
    ("KVM_SET_CPUID", _W, 0x8A, 8, "vcpu", True),
    ("KVM_SET_SIGNAL_MASK", _W, 0x8B, 4, "vcpu", False),
    ("KVM_GET_FPU", _R, 0x8C, 416, "vcpu", False),
    ("KVM_SET_FPU", _W, 0x8D, 416, "vcpu", True),
    ("KVM_GET_LAPIC", _R, 0x8E, 1024, "vcpu", False),
    ("KVM_SET_LAPIC", _W, 0x8F, 1024, "vcpu", True),
    ("KVM_SET_CPUID2", _W, 0x90, 8, "vcpu", True),
    ("KVM_GET_CPUID2", _RW, 0x91, 8, "vcpu", False),
    ("KVM_TPR_ACCESS_REPORTING", _RW, 0x92, 40, "vcpu", False),
    ("KVM_SET_VAPIC_ADDR", _W, 0x93, 8, "vcpu", True),
    ("KVM_GET_MP_STATE", _R, 0x98, 4, "vcpu", False),
    ("KVM_SET_MP_STATE", _W, 0x99, 4, "vcpu", True),
    ("KVM_NMI", _NONE, 0x9A, 0, "vcpu", False),
    ("KVM_SET_GUEST_DEBUG", _W, 0x9B, 72, "vcpu", True),
    ("KVM_X86_SETUP_MCE", _W, 0x9C, 8, "vcpu", True),
    ("KVM_X86_GET_MCE_CAP_SUPPORTED", _R, 0x9D, 8, "system", False),
    ("KVM_X86_SET_MCE", _W, 0x9E, 64, "vcpu", True),
    ("KVM_GET_VCPU_EVENTS", _R, 0x9F, 64, "vcpu", False),
    ("KVM_GET_PIT2", _R, 0x9F, 112, "vm", False),
    ("KVM_SET_VCPU_EVENTS", _W, 0xA0, 64, "vcpu", True),
    ("KVM_SET_PIT2", _W, 0xA0, 112, "vm", True),
    ("KVM_GET_DEBUGREGS", _R, 0xA1, 128, "vcpu", False),
    ("KVM_SET_DEBUGREGS", _W, 0xA2, 128, "vcpu", True),
    ("KVM_SET_TSC_KHZ", _NONE, 0xA2, 0, "vcpu", True),
    ("KVM_GET_TSC_KHZ", _NONE, 0xA3, 0, "vcpu", False),
    ("KVM_ENABLE_CAP", _W, 0xA3, 104, "vm", False),
    ("KVM_GET_XSAVE", _R, 0xA4, 4096, "vcpu", False),
    ("KVM_SET_XSAVE", _W, 0xA5, 4096, "vcpu", True),
    ("KVM_SIGNAL_MSI", _W, 0xA5, 32, "vm", False),
    ("KVM_GET_XCRS", _R, 0xA6, 392, "vcpu", False),
    ("KVM_SET_XCRS", _W, 0xA7, 392, "vcpu", True),
    ("KVM_GET_ONE_REG", _W, 0xAB, 16, "vcpu", False),
    ("KVM_SET_ONE_REG", _W, 0xAC, 16, "vcpu", True),
    ("KVM_KVMCLOCK_CTRL", _NONE, 0xAD, 0, "vcpu", False),
    ("KVM_SET_PMU_EVENT_FILTER", _W, 0xB2, 32, "vm", False),
    ("KVM_SMI", _NONE, 0xB7, 0, "vcpu", False),
    ("KVM_MEMORY_ENCRYPT_OP", _RW, 0xBA, 8, "vm", False),
    ("KVM_HYPERV_EVENTFD", _W, 0xBD, 24, "vm", False),
    ("KVM_GET_NESTED_STATE", _RW, 0xBE, 128, "vcpu", False),
    ("KVM_SET_NESTED_STATE", _W, 0xBF, 128, "vcpu", True),
    ("KVM_CLEAR_DIRTY_LOG", _RW, 0xC0, 24, "vm", False),
    ("KVM_GET_SUPPORTED_HV_CPUID", _RW, 0xC1, 8, "vcpu", False),
    ("KVM_X86_SET_MSR_FILTER", _W, 0xC6, 392, "vm", False),
    ("KVM_RESET_DIRTY_RINGS", _NONE, 0xC7, 0, "vm", False),
    ("KVM_GET_SREGS2", _R, 0xCC, 320, "vcpu", False),
    ("KVM_SET_SREGS2", _W, 0xCD, 320, "vcpu", True),
    ("KVM_GET_STATS_FD", _NONE, 0xCE, 0, "vcpu", False),
    ("KVM_GET_XSAVE2", _R, 0xCF, 4096, "vcpu", False),
    ("KVM_CREATE_DEVICE", _RW, 0xE0, 12, "vm", False),
    ("KVM_SET_DEVICE_ATTR", _W, 0xE1, 24, "vm", False),
    ("KVM_GET_DEVICE_ATTR", _W, 0xE2, 24, "vm", False),
    ("KVM_HAS_DEVICE_ATTR", _W, 0xE3, 24, "vm", False),
]

IOCTLS: dict[int, KvmIoctl] = {}
BY_NAME: dict[str, KvmIoctl] = {}
for _name, _dir, _nr, _size, _scope, _write in _TABLE:
    _entry = KvmIoctl(_name, _ioc(_dir, _nr, _size), _scope, _write)
    if _entry.number in IOCTLS:  # pragma: no cover - guarded by a unit test
        raise AssertionError(f"duplicate ioctl number {_entry.number:#x}")
    IOCTLS[_entry.number] = _entry
    BY_NAME[_name] = _entry

STATE_WRITES: frozenset[int] = frozenset(n for n, e in IOCTLS.items() if e.state_write)


def ioctl_name(number: int) -> str:
    entry = IOCTLS.get(number & 0xFFFFFFFF)
    return entry.name if entry else f"KVM_IOCTL_{number & 0xFFFFFFFF:#x}"
