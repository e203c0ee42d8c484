// Functions whose first instruction is of a kind found at the entry of QEMU's lifecycle
// functions; a uprobe there is emulated (push, nop) or single-stepped (most others), and
// that decides its cost.  After "ready PID" and a byte on stdin, times N calls of each and
// prints ns per call, in the order of FNS.

#include "workload.h"

#define FN(name, body) \
    __attribute__((naked, noinline, used)) void name(void) { __asm__ volatile(body); }
FN(f_push, "push %rbp\n\tpop %rbp\n\tret")
FN(f_endbr64, "endbr64\n\tret")
FN(f_xor, "xor %eax, %eax\n\tret")
FN(f_test, "test %edi, %edi\n\tret")
FN(f_lea, "lea 8(%rdi), %rax\n\tret")
FN(f_mov, "mov %rdi, %rax\n\tret")
FN(f_sub_rsp, "sub $8, %rsp\n\tadd $8, %rsp\n\tret")

// A USDT site (what QEMU's dtrace build has at its trace points): a `nop` in the code.
#include <sys/sdt.h>
__attribute__((noinline, used)) void g_usdt(void) {
    DTRACE_PROBE(bench, hit);
    __asm__ volatile("");
}

static void (*const FNS[])(void) = {f_push, f_endbr64, f_xor, f_test, f_lea, f_mov, f_sub_rsp,
                                    g_usdt};
#define NFNS (sizeof(FNS) / sizeof(FNS[0]))

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    if (ready_then_wait())
        return 3;
    for (unsigned f = 0; f < NFNS; f++) {
        void (*volatile fn)(void) = FNS[f];
        double t0 = now();
        for (long i = 0; i < n; i++)
            fn();
        printf("%s%f", f ? " " : "", (now() - t0) / n);
    }
    printf("\n");
    return 0;
}
