// SPDX-License-Identifier: Apache-2.0
// Will this kernel load qtrace's fentry hook?  The smallest program that needs what the
// real one needs (BPF trampoline on kvm_vcpu_ioctl, BTF task, task pt_regs): loading it
// takes ~0.3 s, compiling the whole qtrace.bpf.c ~1.5 s, so ask this first.  A plain
// BPF_PROG: qtrace_bpf/bpf/fentry.py loads it against KVM's BTF (vmlinux's or the module's).
#include <uapi/linux/ptrace.h>

BPF_PROG(fe_check, void *filp, unsigned int ioctl, unsigned long arg) {
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 di = 0;
    bpf_probe_read_kernel(&di, sizeof(di), &regs->di);
    return 0;  // tracing programs must return 0 (6.12's verifier checks)
}
