// A process unrelated to KVM: times N calls each of getppid and a non-KVM ioctl (FIONREAD on
// a pipe), after "ready PID" and a byte on stdin.  Prints ns per call for each.
#include <sys/ioctl.h>
#include <sys/syscall.h>

#include "workload.h"

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int p[2], avail;
    if (pipe(p))
        return 1;
    if (ready_then_wait())
        return 3;
    double t0 = now();
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    double t1 = now();
    for (long i = 0; i < n; i++)
        ioctl(p[0], FIONREAD, &avail);
    double t2 = now();
    printf("%f %f\n", (t1 - t0) / n, (t2 - t1) / n);
    return 0;
}
