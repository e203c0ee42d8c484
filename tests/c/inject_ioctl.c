// inject_ioctl PID FD CMD ARG: make thread PID of a running process call ioctl(FD, CMD, ARG)
// itself, as gdb's `call (int)ioctl(FD, CMD, ARG)` does, and print what it returned.
//
// Why not gdb: gdb 13 (Debian 12) saves and restores the extended FPU state around a call,
// and on hosts with AMX that write fails ("Couldn't write extended state status: Bad
// address").  Only the general registers are touched here.  The thread must be blocked in
// a system call (QEMU's main loop sits in ppoll): its `syscall` instruction is reused, and
// the interrupted call restarts when the thread resumes.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>

static int fail(const char *what) {
    fprintf(stderr, "inject_ioctl: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: inject_ioctl PID FD CMD ARG\n");
        return 2;
    }
    pid_t tid = (pid_t)atoi(argv[1]);
    unsigned long fd = strtoul(argv[2], NULL, 0), cmd = strtoul(argv[3], NULL, 0);
    unsigned long arg = strtoul(argv[4], NULL, 0);
    int status;
    if (ptrace(PTRACE_SEIZE, tid, 0, 0) || ptrace(PTRACE_INTERRUPT, tid, 0, 0))
        return fail("attach");
    if (waitpid(tid, &status, __WALL) < 0)
        return fail("wait for the stop");
    struct user_regs_struct saved, regs;
    if (ptrace(PTRACE_GETREGS, tid, 0, &saved))
        return fail("get registers");
    errno = 0;
    long insn = ptrace(PTRACE_PEEKTEXT, tid, saved.rip - 2, 0);
    if (errno || (insn & 0xffff) != 0x050f) {  // 0f 05: syscall
        fprintf(stderr, "inject_ioctl: thread %d is not stopped in a system call\n", tid);
        ptrace(PTRACE_DETACH, tid, 0, 0);
        return 1;
    }
    regs = saved;
    regs.rip = saved.rip - 2;
    regs.rax = SYS_ioctl;
    regs.orig_rax = -1;  // no restart of the interrupted call while ours runs
    regs.rdi = fd;
    regs.rsi = cmd;
    regs.rdx = arg;
    if (ptrace(PTRACE_SETREGS, tid, 0, &regs) || ptrace(PTRACE_SINGLESTEP, tid, 0, 0))
        return fail("run the call");
    if (waitpid(tid, &status, __WALL) < 0 || ptrace(PTRACE_GETREGS, tid, 0, &regs))
        return fail("read the result");
    long ret = (long)regs.rax;
    if (ptrace(PTRACE_SETREGS, tid, 0, &saved) || ptrace(PTRACE_DETACH, tid, 0, 0))
        return fail("restore");
    printf("%ld\n", ret);
    return 0;
}
