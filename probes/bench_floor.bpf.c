// SPDX-License-Identifier: Apache-2.0
// The floor for benchmarks/suite.py: BPF programs that do nothing, on the same hooks as
// qtrace (the syscalls:sys_enter/exit_ioctl tracepoints, uprobes).  What any tracer on
// those hooks pays before doing any work; qtrace's own cost is measured against it.

int floor_enter(void *ctx) { return 0; }
int floor_exit(void *ctx) { return 0; }
int floor_uprobe(struct pt_regs *ctx) { return 0; }
