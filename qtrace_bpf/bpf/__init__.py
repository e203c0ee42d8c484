"""The bpf() layer: system calls and kernel objects, nothing of QEMU or of the catalog.

bpfsys wraps bpf() through Debian's libbpf (links, pins, object info, uprobe_multi);
perf_events opens the perf events a link holds a program on (uprobes, tracepoints, kprobes);
fentry loads fentry/fexit programs against a module's BTF; pins manages a layout's bpffs
directory (which link pins this process holds, adopts or replaces).

May import: errors, log, and this package.
"""
