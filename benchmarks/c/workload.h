// What every benchmark workload shares: a monotonic clock in ns, and the handshake that
// lets a tracer attach before timing starts ("ready PID" on stdout, then a byte on stdin).
#ifndef WORKLOAD_H
#define WORKLOAD_H
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

// Returns 0 once the harness said go.
static int ready_then_wait(void) {
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;
    return read(0, &c, 1) == 1 ? 0 : 3;
}
#endif
