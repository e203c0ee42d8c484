"""qtrace: trace when and why QEMU writes vCPU state into KVM."""

__version__ = "0.1.0"
