// A KVM user like QEMU: opens /dev/kvm, creates a VM and a vCPU, prints "ready PID", waits
// for a byte on stdin, then times N calls each of a cheap non-write ioctl
// (KVM_CHECK_EXTENSION) and two vCPU state writes (KVM_SET_MSRS, KVM_SET_REGS).
// Prints ns per call for each, in that order.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

#include "workload.h"

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int kvm = open("/dev/kvm", O_RDWR);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_regs regs;
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[1];
    } msrs = {.hdr.nmsrs = 1, .e[0] = {.index = 0x174, .data = 0x10}};  // IA32_SYSENTER_CS
    if (kvm < 0 || vm < 0 || vcpu < 0 || ioctl(vcpu, KVM_GET_REGS, &regs))
        return 2;
    if (ready_then_wait())
        return 3;
    for (long i = 0; i < n / 10; i++) {  // warm-up, untimed
        ioctl(vcpu, KVM_SET_MSRS, &msrs);
        ioctl(vcpu, KVM_SET_REGS, &regs);
    }
    double t0 = now();
    for (long i = 0; i < n; i++)
        ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
    double t1 = now();
    for (long i = 0; i < n; i++)
        ioctl(vcpu, KVM_SET_MSRS, &msrs);
    double t2 = now();
    for (long i = 0; i < n; i++)
        ioctl(vcpu, KVM_SET_REGS, &regs);
    double t3 = now();
    printf("%f %f %f\n", (t1 - t0) / n, (t2 - t1) / n, (t3 - t2) / n);
    return 0;
}
