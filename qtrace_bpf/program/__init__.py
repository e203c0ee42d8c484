"""The BPF program's life: chosen hook, compiled, loaded, pinned, attached, read.

kernel_hook picks fentry, kprobe or the ioctl tracepoints; preflight says what is missing
before a load; bcc_compile builds probes/qtrace.bpf.c with BCC; loader is `qprobe load`,
the short-lived privileged process that compiles and pins for the daemon; compiled
(QtraceProgram, BCC in this process: watch) and pinned (PinnedProgram, from the loader's
pins: the daemon) share running.RunningProgram; attachments holds each binary's uprobe
links; vm_maps is typed access to the per-VM map entries.

May import: errors, log, logfmt, contract, bpf, symbols, and this package.
"""
