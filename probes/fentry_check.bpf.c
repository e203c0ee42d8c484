// SPDX-License-Identifier: Apache-2.0
// Will this kernel load qtrace's fentry hook?  The smallest program that needs what the
// real one needs (BPF trampoline on kvm_vcpu_ioctl, BTF task, task pt_regs): loading it
// takes ~0.3 s, compiling the whole qtrace.bpf.c ~1.5 s, so ask this first.
KFUNC_PROBE(kvm_vcpu_ioctl, void *filp, unsigned int ioctl, unsigned long arg) {
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    return regs ? 0 : 1;
}
