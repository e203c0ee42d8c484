"""From a QEMU binary file to the offsets to probe.

elf opens an ELF safely; elfsym resolves function names from .symtab, .dynsym,
MiniDebugInfo or a separate debug file (debugfiles, debuginfod); dwarf_inline finds inlined
instances; first_insn classifies a function's first instruction and finds a cheaper
place for its probe; binfile opens a binary once and checks it is trusted; resolver runs
the resolution in a bounded child process; binaries joins catalog and symbols into each
file's attach plan.

May import: errors, log, contract, and this package.  Never bpf, program, vms or commands.
"""
