/* Functions whose first instruction the x86 uprobe code single-steps, shaped like Debian
 * QEMU 7.2's (objdump of kvm_cpu_synchronize_post_reset, qemu_system_reset_request,
 * apic_init_reset), plus two a probe must not be moved in: one that overwrites the argument
 * the catalog reads, one whose loop jumps back past its first instruction.
 * Run: entry_sites N wait -> calls each N times after a byte on stdin. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile int reboot_action = 1, sink;
void target(void) { sink++; }

#define FN(name, body) __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" #name ":\n" \
                               body "\n.size " #name ", .-" #name "\n")
/* xor; lea rsi; jmp (tail call): the probe goes to the jmp (+9) */
FN(tail_call, "xor %edx,%edx\n lea target(%rip),%rsi\n jmp target");
/* cmpl mem; push %rbx (arg1 in edi, read): the probe goes to the push (+7) */
FN(cmp_then_push, "cmpl $1, reboot_action(%rip)\n push %rbx\n mov %edi,%ebx\n"
                  " call target\n pop %rbx\n ret");
/* test; je (a jcc, emulated): the probe goes to the je (+3) */
FN(test_then_jcc, "test %rdi,%rdi\n je 1f\n jmp target\n1: ret");
/* xor %edi (arg1, read): the probe stays at the entry */
FN(clobbers_arg, "xor %edi,%edi\n jmp target");
/* a loop back to +3: the probe stays at the entry */
FN(loops_back, "test %rdi,%rdi\n1: je 2f\n sub $1,%rdi\n test %rdi,%rdi\n jmp 1b\n2: ret");

void tail_call(void); void cmp_then_push(int); void test_then_jcc(void *);
void clobbers_arg(int); void loops_back(long);

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    char c;
    if (argc > 2 && read(0, &c, 1) < 0) return 1;  /* wait until the test says go */
    for (int i = 0; i < n; i++) {
        tail_call();
        cmp_then_push(i);
        test_then_jcc(&c);
        clobbers_arg(i);
        loops_back(3);
    }
    printf("%d\n", sink);
    return 0;
}
