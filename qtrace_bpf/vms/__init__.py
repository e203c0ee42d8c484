"""The QEMU processes being traced.

targets reads a process from /proc once (name, uuid, binary, vCPU fds); tracker adopts,
follows and forgets them, and owns their entries in the BPF maps.

May import: errors, log, contract, symbols, program, and this package.
"""
