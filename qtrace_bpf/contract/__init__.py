"""The kernel/user contract: what the BPF program and Python agree on.

abi reads probes/qtrace.h (structs, kinds, phases, causes, window bits); kvm_ioctls names the
KVM ioctls and which of them write state (their numbers generated from <linux/kvm.h>);
catalog is probes/catalog.toml as typed data (which QEMU function means which event);
maps says every map Python reaches by name; decoders and events turn map keys and
ring-buffer records into names and the JSON contract.

May import: errors, log, and this package.  Imported by every layer above.
"""
